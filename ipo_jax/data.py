"""Reading records and results files.

Every path-taking option accepts a local `.jsonl`, `.jsonl.gz`, `.json` or `.parquet` file, a registered source
or a hub id; `ipo_jax.sources.resolve` turns the latter two into a local file (cache, remote, offline copy).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterable, Iterator, Sequence

from ipo_jax import sources

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DataError(ValueError):
  """Bad input data; the message names the file, row and field."""


def read_local(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a local `.jsonl[.gz]`, `.json[.gz]` (a list, or {"data"/"rows": list}) or `.parquet` file."""
  path = str(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if os.path.isdir(path):
    raise DataError(f"{path} is a directory; a data option takes a .jsonl, .json or .parquet file")
  if path.endswith(".parquet"):
    return _read_parquet(path)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream an EOFError
    raise DataError(f"{path}: cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} ({e}); "
                    "the file is damaged or cut short, get it again") from None
  text = _decode(raw, path)
  if path.endswith((".jsonl", ".jsonl.gz")):
    return _jsonl_rows(text, path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(data, dict):
    for key in ("data", "rows", "examples"):
      if isinstance(data.get(key), list):
        return data[key]
    raise DataError(f"{path}: a JSON file must hold a list of rows (or {{'data': [...]}})")
  if not isinstance(data, list):
    raise DataError(f"{path}: a JSON file must hold a list of rows (or {{'data': [...]}}), not a "
                    f"{type(data).__name__}")
  return data


def _decode(raw: bytes, path: str, torn_tail: bool = False) -> str:
  """UTF-8 text; other bytes are an error naming the line and byte (with `torn_tail`, bytes after the last newline
  are an interrupted write's torn line: they are dropped instead)."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if torn_tail and e.start > raw.rfind(b"\n"):
      return raw[:raw.rfind(b"\n") + 1].decode("utf-8")
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}: line {line} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); save the "
                    "file as UTF-8") from None


def _jsonl_rows(text: str, path: str) -> list[Any]:
  rows = []
  for n, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
  return rows


def _read_parquet(path: str) -> list[dict[str, Any]]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    return pq.read_table(path).to_pylist()
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())}); get it again") from None


def local_file(path: str, split: str | None = None, name: str | None = None, what: str = "data file") -> str:
  """The local file behind a data option: itself, or a registered source's or hub data set's copy."""
  return str(sources.resolve(path, split=split, name=name, log=_log, what=what))


def read_template(path: str, placeholders: Sequence[str], what: str) -> str:
  """The text of a prompt template file (a local path or a registered source) holding every one of
  `placeholders`, or a ValueError naming the file and the ones it lacks."""
  path = local_file(path, what=what)
  with open(path, encoding="utf-8") as f:
    template = f.read()
  missing = [p for p in placeholders if p not in template]
  if missing:
    raise ValueError(f"{what} {path} lacks the placeholder(s) {', '.join(missing)}")
  return template


def read_records(path: str, split: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
  """Rows of a local file, a registered source or a hub data set (split and configuration `name`)."""
  return read_local(local_file(path, split, name))


def _log(message: str) -> None:
  from ipo_jax import runtime  # pylint: disable=import-outside-toplevel  # runtime imports jax
  runtime.log(message)


def require_fields(rows: Iterable[dict[str, Any]], fields: Iterable[str], source: str, *,
                   skip_invalid: bool = False, rename: str = "data.columns.{field}"
                   ) -> tuple[list[dict[str, Any]], int]:
  """Checks every row has non-empty `fields`; raises naming the row and field, or skips and counts.

  A field that no row has is always an error (the file names its column otherwise): it names the file's columns
  and the setting that maps one (`rename`, e.g. `data.columns.{field}`), not `skip_invalid`."""
  fields, rows = tuple(fields), list(rows)
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
    elif all(r.get(field) is None for r in rows):  # no row has it: the file names the column otherwise
      columns = sorted(k for k in row if not str(k).startswith("_"))
      raise DataError(f"{problem}, and no row has it (the file's columns: {', '.join(map(str, columns))}); "
                      f"if the file names it otherwise, set {rename.format(field=field)}=<column>")
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
  with open(path, "rb") as f:
    lines = _decode(f.read(), str(path), torn_tail=True).splitlines(keepends=True)
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      yield json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:
        return
      raise DataError(f"{path}: line {n + 1} is not valid JSON") from None


TEMP_SUFFIX = ".tmp"  # an atomic write's file before its rename; alone, it is what a killed write left


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a file atomically (temp file + rename): a reader sees the old file or the whole new one."""
  tmp = f"{path}{TEMP_SUFFIX}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
  """Writes rows atomically: the whole file or none of it."""
  write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically."""
  write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))

