"""Record reading, field validation, crash-safe JSONL appends and offline data discovery."""

import gzip
import json

import pytest

from ipo_jax import data


def test_read_every_local_format(tmp_path):
  rows = [{"prompt": "p1", "n": 1}, {"prompt": "p2", "n": 2}]
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
  (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
  for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.parquet"):
    assert data.read_records(str(tmp_path / name)) == rows


def test_bad_json_line_is_named(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
  with pytest.raises(data.DataError, match=r"bad\.jsonl: line 2"):
    data.read_local(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data.read_local(tmp_path / "missing.jsonl")


def test_require_fields_names_row_and_field():
  rows = [{"prompt": "a", "chosen": "b"}, {"prompt": "a", "chosen": ""}, {"prompt": "a"}]
  with pytest.raises(data.DataError, match=r"src: row 1 has a missing or empty field 'chosen'"):
    data.require_fields(rows, ["prompt", "chosen"], "src")
  kept, skipped = data.require_fields(rows, ["prompt", "chosen"], "src", skip_invalid=True)
  assert kept == rows[:1] and skipped == 2


def test_append_after_torn_write_keeps_finished_rows(tmp_path):
  path = tmp_path / "scores.jsonl"
  data.append_jsonl(path, [{"id": 1}, {"id": 2}])
  with open(path, "a") as f:
    f.write('{"id": 3, "sco')  # interrupted mid-row
  assert [r["id"] for r in data.iter_jsonl(path)] == [1, 2]
  data.append_jsonl(path, [{"id": 3}])
  assert [r["id"] for r in data.iter_jsonl(path)] == [1, 2, 3]

