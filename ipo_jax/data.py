"""Reading records from local files or the Hugging Face hub, and finding the offline data copies.

Every path-taking option accepts a hub id (through `datasets.load_dataset`) or a local `.jsonl`, `.jsonl.gz`,
`.json` or `.parquet` file. Offline copies are found through `$IPO_JAX_DATA`, then `../shared/data` beside the
repository or the working directory.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
DATA_ENV = "IPO_JAX_DATA"


class DataError(ValueError):
  """Bad input data; the message names the file, row and field."""


def is_local(path: str) -> bool:
  return os.path.exists(path) or str(path).endswith(LOCAL_SUFFIXES)


def shared_data_dir() -> Path | None:
  """The offline data directory: `$IPO_JAX_DATA`, else `../shared/data` next to the repo or the cwd."""
  env = os.environ.get(DATA_ENV)
  if env:
    return Path(env)
  for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
    candidate = base.parent / "shared" / "data"
    if candidate.is_dir():
      return candidate
  return None


def shared_data_path(relative: str) -> Path:
  """A file of the offline data copy, with a clear error when it cannot be found."""
  root = shared_data_dir()
  if root is None or not (root / relative).exists():
    raise FileNotFoundError(
        f"offline data file {relative!r} not found; set ${DATA_ENV} to the data directory "
        f"(looked in {root or '../shared/data'})")
  return root / relative


def resolve_data_path(path: str) -> str:
  """Expands `shared:<relative>` to the offline data directory; other paths pass through."""
  if path.startswith("shared:"):
    return str(shared_data_path(path[len("shared:"):]))
  return path


def read_local(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a local `.jsonl[.gz]`, `.json[.gz]` (a list, or {"data"/"rows": list}) or `.parquet` file."""
  path = str(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    if path.endswith((".jsonl", ".jsonl.gz")):
      rows = []
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
      return rows
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(data, dict):
    for key in ("data", "rows", "examples"):
      if isinstance(data.get(key), list):
        return data[key]
    raise DataError(f"{path}: a JSON file must hold a list of rows (or {{'data': [...]}})")
  return data


def read_records(path: str, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
  """Rows from a local file or a hub dataset id (`datasets.load_dataset(path, name, split=split)`)."""
  path = resolve_data_path(path)
  if is_local(path):
    return read_local(path)
  import datasets
  return list(datasets.load_dataset(path, name, split=split))


def require_fields(rows: Iterable[dict[str, Any]], fields: Iterable[str], source: str, *,
                   skip_invalid: bool = False) -> tuple[list[dict[str, Any]], int]:
  """Checks every row has non-empty `fields`; raises naming the row and field, or skips and counts."""
  fields = tuple(fields)
  kept, skipped = [], 0
  for i, row in enumerate(rows):
    problem = None
    for field in fields:
      value = row.get(field)
      if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        problem = f"{source}: row {i} has a missing or empty field {field!r}"
        break
    if problem is None:
      kept.append(row)
    elif skip_invalid:
      skipped += 1
    else:
      raise DataError(problem + " (set data.skip_invalid=True to skip such rows)")
  return kept, skipped


def drop_torn_tail(path: str | os.PathLike) -> None:
  """Cuts an unfinished last line (an interrupted write) off a results file, so appending continues cleanly."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
  """Appends rows and flushes them to disk, so finished work survives an interruption."""
  drop_torn_tail(path)
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
  """Rows of a results file; a torn last line (an interrupted write) is ignored."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      yield json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:
        return
      raise DataError(f"{path}: line {n + 1} is not valid JSON") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)

