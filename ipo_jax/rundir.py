"""The run directory: one protocol for every task's outputs, resume and refusal.

A task opens its `output_dir` with the settings that determine its results (its *identity*: model, data and its
fingerprint, every result-determining hyperparameter). The first run records `run.json` = {task, identity, stages};
a rerun with the same identity resumes (finished stages are skipped, results files continue where they stopped);
a rerun with another identity is refused *before anything is written*, with an error naming the differing keys
and the two ways out (another output_dir, or `overwrite=True`, which clears the directory first).

Results files are JSONL, appended as work finishes: a torn last line (an interrupted write) is dropped, process 0
writes, and all processes must agree on what is finished. Child directories (a self-improvement round, its dpo/)
are run directories of their own. A run finishes with summary.json (strict JSON: NaN becomes null), report.md and
its figures.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Iterable, Mapping

import numpy as np

from ipo_jax import data, runtime

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


class IdentityMismatch(ValueError):
  """A rerun under settings other than the ones a directory's results were made with."""


def _plain(value: Any) -> Any:
  """JSON-safe, with NaN and infinities as None (summary.json and run.json are strict JSON)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (str, int, bool)) or value is None:
    return value
  return json.loads(json.dumps(value, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  a, b = flatten(saved), flatten(current)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _contents(directory: str) -> list[str]:
  """What a directory holds, less the temp files of atomic writes a kill interrupted: a run killed while writing
  its first run.json leaves only `run.json.tmp`, and that directory holds no results yet."""
  return [name for name in os.listdir(directory) if not name.endswith(data.TEMP_SUFFIX)]


class RunDir:
  """An opened run directory (see the module docstring). Use `RunDir.open`."""

  def __init__(self, path: str, task: str, identity: dict[str, Any], record: dict[str, Any]):
    self.path, self.task, self.identity, self._record = path, task, identity, record

  # -- opening -------------------------------------------------------------------------------------------------

  @classmethod
  def open(cls, output_dir: str, task: str, identity: Mapping[str, Any], *, overwrite: bool = False) -> "RunDir":
    """Opens `output_dir` for `task`; refuses (writing nothing) when it holds results of another identity."""
    if not output_dir:
      raise ValueError(f"{task}: output_dir is required (--config.output_dir=<directory>)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
      raise ValueError(f"output_dir {output_dir} is a file, not a directory")
    identity = _plain(identity)
    run_file = os.path.join(output_dir, RUN_FILE)
    record = {"task": task, "identity": identity, "stages": {}}
    if os.path.exists(run_file) and not overwrite:
      record = cls._check(output_dir, run_file, task, identity)
    elif os.path.isdir(output_dir) and _contents(output_dir) and not overwrite:
      raise IdentityMismatch(f"{output_dir} holds files but no {RUN_FILE}, so the settings that made them are "
                             "unknown; use another output_dir, or --config.overwrite=True to clear it")
    elif overwrite and os.path.isdir(output_dir) and runtime.is_main_process():
      shutil.rmtree(output_dir)
    run = cls(output_dir, task, identity, record)
    if runtime.is_main_process():
      os.makedirs(output_dir, exist_ok=True)
      if not os.path.exists(run_file):
        run._save()
    return run

  @staticmethod
  def _check(output_dir: str, run_file: str, task: str, identity: dict[str, Any]) -> dict[str, Any]:
    try:
      with open(run_file, encoding="utf-8") as f:
        record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{run_file}: not valid JSON ({e.msg} at line {e.lineno}); use another output_dir, or "
                       "--config.overwrite=True to clear it") from None
    if record.get("task") != task:
      raise IdentityMismatch(f"{output_dir} holds a {record.get('task')!r} run, not {task!r}; use another "
                             "output_dir")
    changed = differing_keys(record.get("identity", {}), identity)
    if changed:
      raise IdentityMismatch(f"{output_dir} holds results made with other settings ({', '.join(changed)} "
                             "differ); use another output_dir, or --config.overwrite=True to start over")
    record.setdefault("stages", {})
    return record

  def child(self, name: str, task: str, identity: Mapping[str, Any], *, overwrite: bool = False) -> "RunDir":
    """A run directory nested in this one (a round, its dpo/)."""
    return RunDir.open(os.path.join(self.path, name), task, identity, overwrite=overwrite)

  # -- files ---------------------------------------------------------------------------------------------------

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def rows(self, name: str) -> list[dict[str, Any]]:
    """The rows of a results file (a torn last line is dropped from the file first, on process 0)."""
    if runtime.is_main_process():
      data.drop_torn_tail(self.file(name))
    return list(data.iter_jsonl(self.file(name)))

  def append(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
    """Appends finished rows (process 0 writes; each call is flushed to disk)."""
    rows = list(rows)
    if rows and runtime.is_main_process():
      data.append_jsonl(self.file(name), rows)

  def agree(self, count: int, what: str) -> None:
    """All processes must see the same count of finished work (a shared filesystem)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.assert_equal(np.array([count]), f"processes see different {what} in {self.path}; it must "
                                   "be on a filesystem they share")

  def write_json(self, name: str, obj: Any) -> None:
    if runtime.is_main_process():
      data.write_json(self.file(name), _plain(obj))

  def read_json(self, name: str) -> Any:
    with open(self.file(name), encoding="utf-8") as f:
      return json.load(f)

  def write_text(self, name: str, text: str) -> None:
    if runtime.is_main_process():
      data.write_text(self.file(name), text)

  # -- stages --------------------------------------------------------------------------------------------------

  def done(self, stage: str) -> bool:
    return stage in self._record["stages"]

  def stage_info(self, stage: str) -> dict[str, Any]:
    return self._record["stages"].get(stage, {})

  def finish_stage(self, stage: str, **info: Any) -> None:
    """Marks `stage` finished (with a little information about it); a rerun skips it."""
    self._record["stages"][stage] = _plain(info)
    if runtime.is_main_process():
      self._save()

  def finish(self, summary: Mapping[str, Any], report: str | None = None) -> dict[str, Any]:
    """Writes summary.json (strict JSON) and report.md; returns the summary as written."""
    summary = _plain(summary)
    self.write_json(SUMMARY_FILE, summary)
    if report is not None:
      self.write_text(REPORT_FILE, report)
    return summary

  def _save(self) -> None:
    data.write_json(self.file(RUN_FILE), self._record)
