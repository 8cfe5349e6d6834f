"""Task `rewardbench` end to end on a toy model: outputs, resume after an interruption, refusal of other settings."""

import json

import pytest

from configs import rewardbench as rewardbench_config
from ipo_jax import data, main, runtime
from ipo_jax.evals import ipo_rows, rewardbench
from ipo_jax.ipo import prompts
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.rundir import REPORT_FILE, SUMMARY_FILE
from ipo_jax.tasks import rewardbench as rewardbench_task
from tests.conftest import file_hashes
from tests.ipo.test_scorer import toy_model

def run_config(tmp_path, **scoring_overrides):
  config = rewardbench_config.get_config("demo")
  config.output_dir = str(tmp_path / "run")
  config.data.subsets = "xstest-should-respond,llmbar-natural,hep-go"
  config.data.max_per_subset = 3
  config.scoring.update(dict(max_length=256, batch_tokens=1024, max_programs=2, progress=False,
                             **scoring_overrides))
  return config


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def test_run_writes_outputs_and_resumes_after_an_interruption(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  config = run_config(tmp_path)
  score_pairs = ipo_rows.score_rewardbench_pairs

  def interrupted(*args, **kwargs):
    for chunk in score_pairs(*args, **kwargs):
      yield chunk
      raise KeyboardInterrupt  # stop after the first pairs were written

  monkeypatch.setattr(ipo_rows, "score_rewardbench_pairs", interrupted)
  with pytest.raises(KeyboardInterrupt):
    rewardbench_task.run(config)
  scores = tmp_path / "run" / rewardbench.SCORES_FILE
  first = scores.read_text().splitlines()
  assert 1 <= len(first) < 9
  scores.write_text("\n".join(first) + '\n{"subset": "hep-go", "id": 4')  # torn by the interruption
  monkeypatch.setattr(ipo_rows, "score_rewardbench_pairs", score_pairs)
  summary = rewardbench_task.run(config)

  rows = [json.loads(line) for line in scores.read_text().splitlines()]
  keys = [rewardbench.pair_key(r) for r in rows]
  assert len(keys) == len(set(keys)) == 9 and rows[:len(first)] == [json.loads(x) for x in first]
  assert summary["scoring"]["pairs_scored"] == 9 - len(first)
  assert summary["counts"]["pairs"] == 9 and set(summary["subsets"]) == set(config.data.subsets.split(","))
  assert summary["scoring"]["compilations"] <= 2
  for r in rows:
    assert r["correct"] == (r["log_odds_chosen"] > r["log_odds_rejected"])
    assert 0 < r["score_chosen"] < 1 and 0 < r["yes_no_mass_chosen"] <= 1
  out = tmp_path / "run"
  assert json.loads((out / SUMMARY_FILE).read_text())["score"] == pytest.approx(summary["score"])
  report = (out / REPORT_FILE).read_text()
  assert "| subset | section | pairs | accuracy | ties | truncated |" in report
  assert "| hep-go | Reasoning | 3 |" in report
  assert (out / rewardbench_task.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

  fresh = run_config(tmp_path)  # the same pairs scored in one go give the same rows
  fresh.output_dir = str(tmp_path / "fresh")
  rewardbench_task.run(fresh)
  again = {rewardbench.pair_key(r): r for r in data.iter_jsonl(tmp_path / "fresh" / rewardbench.SCORES_FILE)}
  for r in rows:
    assert again[rewardbench.pair_key(r)]["score_chosen"] == pytest.approx(r["score_chosen"], abs=1e-6)

  changed = run_config(tmp_path, layout="chat")
  with pytest.raises(ValueError, match="other settings"):
    rewardbench_task.run(changed)


def test_config_variants():
  paper = rewardbench_config.get_config("paper")
  assert paper.scoring.truncation == "paper" and paper.scoring.prompts_file == "paper:rewardbench_prompts"
  assert prompts.prompts_from_config(paper.scoring.prompts_file).fallback == "alpacaeval-easy"
  combined = rewardbench_config.get_config("ensemble,demo")
  assert combined.scoring.prompts_file == "paper:candidate_prompts" and combined.data.max_per_subset == 2
  assert rewardbench_config.get_config("chat").scoring.layout == "chat"
  assert scorer_lib.Settings.from_config(rewardbench_config.get_config().scoring) == scorer_lib.Settings()
  with pytest.raises(ValueError, match="unknown variant"):
    rewardbench_config.get_config("papr")
  assert "rewardbench" in main.TASKS and rewardbench_task.__name__ == "ipo_jax.tasks.rewardbench"


def test_a_rerun_with_other_data_or_settings_is_refused_before_anything_is_written(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  config = run_config(tmp_path)
  config.data.subsets, config.data.max_per_subset = "hep-go", 2
  rewardbench_task.run(config)
  before = file_hashes(tmp_path / "run")
  assert {"run.json", "scores.jsonl", "summary.json", "report.md", "rewardbench.png"} <= set(before)

  changed = run_config(tmp_path, truncation="paper")
  changed.data.subsets, changed.data.max_per_subset = "hep-go", 2
  with pytest.raises(ValueError, match=r"other settings \(truncation differ\); use another output_dir, or "
                     r"--config.overwrite=True"):
    rewardbench_task.run(changed)
  other_data = tmp_path / "pairs.jsonl"  # the same keys, other texts
  rows = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in rewardbench.load_pairs(config.data)]
  other_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  moved = run_config(tmp_path)
  moved.data.update(path=str(other_data), subsets="hep-go", max_per_subset=2)
  with pytest.raises(ValueError, match=r"data.fingerprint, data.path differ"):
    rewardbench_task.run(moved)
  assert file_hashes(tmp_path / "run") == before  # nothing of the finished run was touched

  again = rewardbench_task.run(config)  # the same settings: everything is already scored
  assert again["scoring"]["pairs_scored"] == 0 and file_hashes(tmp_path / "run")["scores.jsonl"] == before["scores.jsonl"]
  config.data.max_per_subset = 3  # a larger selection of the same data resumes
  assert rewardbench_task.run(config)["scoring"]["pairs_scored"] == 1
  moved.overwrite = True  # the way out: start over
  assert rewardbench_task.run(moved)["counts"]["pairs"] == 2


def _write_pairs(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_a_changed_data_file_under_the_same_path_is_refused_naming_the_fingerprint(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  config = run_config(tmp_path)
  config.data.subsets, config.data.max_per_subset = "hep-go", 2
  pairs = [dict(p) for p in rewardbench.load_pairs(config.data)]
  path = _write_pairs(tmp_path / "pairs.jsonl", pairs)
  config.data.path = path
  rewardbench_task.run(config)
  before = file_hashes(tmp_path / "run")
  _write_pairs(tmp_path / "pairs.jsonl", [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs])
  with pytest.raises(ValueError, match=r"other settings \(data.fingerprint differ\); use another output_dir"):
    rewardbench_task.run(config)
  assert file_hashes(tmp_path / "run") == before


def _no_nan(constant):
  raise ValueError(f"not strict JSON: {constant}")


def test_unknown_subsets_are_refused_unless_allowed_then_scored_with_a_null_score(tmp_path, monkeypatch, toy, capsys):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  base = run_config(tmp_path)
  base.data.subsets, base.data.max_per_subset = "hep-go", 2
  rows = [dict(p, subset=name) for name in ("my-a", "my-b") for p in rewardbench.load_pairs(base.data)]
  config = run_config(tmp_path)
  config.data.update(path=_write_pairs(tmp_path / "mine.jsonl", rows), subsets="", max_per_subset=0)
  with pytest.raises(ValueError, match=r"^scoring.prompts_file \(empty: the project's default instructions\) has no "
                     r"instruction for the subsets \['my-a', 'my-b'\] .*fallback_instruction=True"):
    rewardbench_task.run(config)
  assert not (tmp_path / "run").exists()  # refused before anything was written

  config.scoring.fallback_instruction = True
  summary = rewardbench_task.run(config)
  out = tmp_path / "run"
  written = json.loads((out / SUMMARY_FILE).read_text(), parse_constant=_no_nan)
  assert written["score"] is None and summary["score"] is None and written["sections"] == {}
  assert written["instructions"]["fallback_pairs"] == {"my-a": 2, "my-b": 2}
  assert written["instructions"]["unknown_subsets"] == ["my-a", "my-b"]
  report = (out / REPORT_FILE).read_text()
  assert "- no official RewardBench section was scored (subsets: my-a, my-b)" in report
  assert ("- fallback instruction: 4 pairs were scored under the fallback 'chat' of default, having no instruction "
          "of their own (my-a: 2, my-b: 2); not RewardBench subsets: my-a, my-b") in report
  assert (out / rewardbench_task.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
  assert "no official RewardBench section was scored" in capsys.readouterr().out


def test_the_authors_own_fallback_is_counted_and_reported(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  config = run_config(tmp_path, prompts_file="paper:candidate_prompts")
  config.data.subsets, config.data.max_per_subset = "llmbar-adver-manual,hep-go", 1
  summary = rewardbench_task.run(config)  # llmbar-adver-manual is missing in the file: its "default", no error
  assert summary["instructions"]["fallback_pairs"] == {"llmbar-adver-manual": 1}
  assert summary["instructions"]["unknown_subsets"] == [] and summary["score"] is not None
  report = (tmp_path / "run" / REPORT_FILE).read_text()
  assert ("- fallback instruction: 1 pairs were scored under the fallback 'default' of paper:candidate_prompts, "
          "having no instruction of their own (llmbar-adver-manual: 1)\n") in report


@pytest.fixture(scope="module")
def smollm():
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel
  return loading.load_model("embedded")


def test_a_low_yes_no_mass_warns_once_and_a_normal_run_does_not(tmp_path, monkeypatch, smollm, capsys):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: smollm)
  warning = "warning: the Yes+No probability mass is low"
  for name, overrides, low in [("normal", {}, False),
                               ("no_question", dict(layout="template", template="{prompt}\n\n{response}"), True)]:
    config = run_config(tmp_path, **overrides)
    config.output_dir, config.scoring.max_length = str(tmp_path / name), 384
    config.data.subsets, config.data.max_per_subset = "hep-go,hep-python,llmbar-adver-neighbor", 1
    rewardbench_task.run(config)
    mass = json.loads((tmp_path / name / SUMMARY_FILE).read_text())["yes_no_mass"]
    assert mass["low"] is low and mass["threshold"] == ipo_rows.LOW_YES_NO_MASS
    assert (mass["geometric_mean"] < 1e-5) if low else (mass["geometric_mean"] > 3e-4)
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith(warning)]
    assert len(logged) == int(low)
    assert (warning in (tmp_path / name / REPORT_FILE).read_text()) is low
