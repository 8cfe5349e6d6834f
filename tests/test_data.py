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



def test_undecodable_damaged_and_renamed_files_are_named(tmp_path):
  """Non-UTF-8 bytes name the file and line; damaged gzip/parquet files name the file; a field no row has names
  the file's columns and the setting that maps one (not skip_invalid)."""
  (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
  (tmp_path / "latin1.json").write_bytes(b'[{"a": "ok"},\n\n {"a": "caf\xe9"}]')
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:30])
  (tmp_path / "random.parquet").write_bytes(b"\x00" * 64)
  for name, message in (("latin1.jsonl", r"latin1\.jsonl: line 2 is not UTF-8 \(byte 0xe9"),
                        ("latin1.json", r"latin1\.json: line 3 is not UTF-8"),
                        ("cut.jsonl.gz", r"cut\.jsonl\.gz: cannot be read as gzip .*cut short"),
                        ("random.parquet", r"random\.parquet: not a readable parquet file")):
    with pytest.raises(data.DataError, match=message):
      data.read_local(tmp_path / name)
  rows = [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}]
  with pytest.raises(data.DataError, match=r"src: row 0 .*'prompt'.*columns: answer, question\).*"
                     r"set data\.columns\.prompt=<column>$") as err:
    data.require_fields(rows, ["prompt"], "src", skip_invalid=True)  # not skippable: no row has it
  assert "skip_invalid" not in str(err.value)
  with pytest.raises(data.DataError, match=r"set data\.field=<column>"):
    data.require_fields(rows, ["prompt"], "src", rename="data.field")


def test_results_file_with_a_torn_multibyte_tail(tmp_path):
  """An interrupted write can cut a UTF-8 character: the torn line is dropped, the finished rows kept."""
  path = tmp_path / "rows.jsonl"
  path.write_bytes('{"t": "é"}\n'.encode() + '{"t": "é'.encode()[:-1])
  assert list(data.iter_jsonl(path)) == [{"t": "é"}]
  path.write_bytes(b'{"t": "\xe9"}\n{"t": 1}\n')
  with pytest.raises(data.DataError, match=r"rows\.jsonl: line 1 is not UTF-8"):
    list(data.iter_jsonl(path))
