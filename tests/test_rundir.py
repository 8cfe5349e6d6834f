"""The run-directory protocol: identity, refusal before any write, torn rows, stages, children, strict JSON."""

import json
import math

import pytest

from ipo_jax.rundir import RUN_FILE, IdentityMismatch, RunDir, differing_keys
from tests.conftest import file_hashes


def test_resume_refuses_other_settings_and_repairs_a_torn_line(tmp_path):
  run = RunDir.open(str(tmp_path), "rewardbench", {"layout": "paper", "data": {"path": "x", "fingerprint": "1"}})
  assert run.rows("scores.jsonl") == []
  scores = tmp_path / "scores.jsonl"
  scores.write_text('{"subset": "a", "id": 1, "correct": true}\n{"subset": "a", "id": 2, "corr')
  again = RunDir.open(str(tmp_path), "rewardbench", {"layout": "paper", "data": {"path": "x", "fingerprint": "1"}})
  assert [r["id"] for r in again.rows("scores.jsonl")] == [1]
  assert scores.read_text() == '{"subset": "a", "id": 1, "correct": true}\n'
  before = file_hashes(tmp_path)
  with pytest.raises(IdentityMismatch, match=r"other settings \(data.fingerprint, layout differ\); use another "
                     r"output_dir, or --config.overwrite=True to start over"):
    RunDir.open(str(tmp_path), "rewardbench", {"layout": "chat", "data": {"path": "x", "fingerprint": "2"}})
  with pytest.raises(IdentityMismatch, match="holds a 'rewardbench' run, not 'generate'"):
    RunDir.open(str(tmp_path), "generate", {"layout": "paper"})
  assert file_hashes(tmp_path) == before  # a refused rerun writes nothing


def test_overwrite_clears_the_directory_and_unknown_contents_are_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(IdentityMismatch, match="holds files but no run.json"):
    RunDir.open(str(tmp_path), "dpo", {"lr": 1})
  assert (tmp_path / "notes.txt").read_text() == "mine"
  run = RunDir.open(str(tmp_path), "dpo", {"lr": 1}, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FILE] and run.identity == {"lr": 1}
  with pytest.raises(ValueError, match="output_dir is required"):
    RunDir.open("", "dpo", {})
  (tmp_path / "file").write_text("x")
  killed = tmp_path / "killed_in_first_write"  # SIGKILL between run.json's temp file and its rename
  killed.mkdir()
  (killed / f"{RUN_FILE}.tmp").write_text('{"task": "dp')
  RunDir.open(str(killed), "dpo", {"lr": 1})
  assert sorted(p.name for p in killed.iterdir()) == [RUN_FILE]
  assert json.loads((killed / RUN_FILE).read_text())["identity"] == {"lr": 1}
  with pytest.raises(ValueError, match="is a file, not a directory"):
    RunDir.open(str(tmp_path / "file"), "dpo", {})
  (tmp_path / RUN_FILE).write_text("{not json")
  with pytest.raises(ValueError, match=r"run.json: not valid JSON"):
    RunDir.open(str(tmp_path), "dpo", {"lr": 1})


def test_stages_children_and_strict_summaries(tmp_path):
  run = RunDir.open(str(tmp_path), "self_improve", {"arm": "ipo"})
  assert not run.done("prompts")
  run.finish_stage("prompts", train=3, mean=float("nan"))
  reopened = RunDir.open(str(tmp_path), "self_improve", {"arm": "ipo"})
  assert reopened.done("prompts") and reopened.stage_info("prompts") == {"train": 3, "mean": None}
  child = reopened.child("round_1", "self_improve_round", {"round": 1})
  child.append("generations.jsonl", [{"index": 0}])
  child.finish_stage("generate", samples=1)
  assert json.loads((tmp_path / "round_1" / RUN_FILE).read_text())["stages"] == {"generate": {"samples": 1}}
  summary = run.finish({"score": math.nan, "sections": {"Chat": 0.5}}, "# report\n")
  assert summary == {"score": None, "sections": {"Chat": 0.5}}
  assert json.loads((tmp_path / "summary.json").read_text()) == summary  # strict JSON: null, never NaN
  assert (tmp_path / "report.md").read_text() == "# report\n"


def test_differing_keys_are_dotted_paths():
  assert differing_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 4}) == ["a.c", "d", "e"]
