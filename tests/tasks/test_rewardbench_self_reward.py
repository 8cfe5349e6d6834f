"""Task `rewardbench_self_reward` on the embedded model: judgements, scores, the side-by-side report, resume."""

import dataclasses
import json
import os

import numpy as np
import pytest

from ipo_jax import data, runtime
from ipo_jax.evals import judge, rewardbench
from ipo_jax.model import loading
from ipo_jax.rundir import REPORT_FILE, RUN_FILE, SUMMARY_FILE
from ipo_jax.tasks import rewardbench_self_reward


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


def _config(output_dir, **overrides):
  from configs import rewardbench_self_reward  # pylint: disable=import-outside-toplevel
  config = rewardbench_self_reward.get_config("demo")
  config.output_dir = str(output_dir)
  config.data.subsets = "alpacaeval-easy,hep-python"
  config.judge.max_prompt_tokens = 320  # the hep-python pair does not fit: its response is cut
  config.judge.progress = False
  config.sampling.max_new_tokens = 40
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_rewardbench_self_reward_task(smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  ipo_dir = tmp_path / "ipo"  # an IPO run that scored these pairs and one more (left out of the comparison)
  ipo_dir.mkdir()
  pairs = rewardbench.load_pairs(_config(tmp_path).data)
  ipo_rows = [{"subset": p["subset"], "id": p["id"], "correct": c} for p, c in zip(pairs, (True, False))]
  ipo_rows.append({"subset": "donotanswer", "id": -1, "correct": True})
  data.append_jsonl(ipo_dir / rewardbench.SCORES_FILE, ipo_rows)
  data.write_json(ipo_dir / SUMMARY_FILE, rewardbench.summarize(ipo_rows, method="IPO P(Yes)"))
  out = tmp_path / "judge"
  config = _config(out, **{"sampling.temperature": 0.0})
  config.compare_with = str(ipo_dir)
  summary = rewardbench_self_reward.run(config)

  rows = list(data.iter_jsonl(out / rewardbench.SCORES_FILE))
  assert sorted(r["subset"] for r in rows) == ["alpacaeval-easy", "hep-python"]
  unparsable = 0
  for r in rows:
    for side in ("chosen", "rejected"):
      assert r[f"parsed_{side}"] == judge.parse_score(r[f"judgement_{side}"])
      assert r[f"tokens_{side}"] <= 320
      unparsable += r[f"parsed_{side}"] is None
    assert r["correct"] == (r["score_chosen"] > r["score_rejected"])
    assert r["tie"] == (r["score_chosen"] == r["score_rejected"])
  assert any(r["truncated_chosen"] or r["truncated_rejected"] for r in rows)
  assert summary["judge"]["unparsable"] == unparsable and summary["counts"]["pairs"] == 2
  assert summary["counts"]["ties"] == sum(r["tie"] for r in rows)
  report = (out / REPORT_FILE).read_text()
  table = report[report.index("## Side by side"):]
  assert "IPO P(Yes)" in table and "| Chat | 100.0 |" in table and "| pairs (ties) | 2 (0) |" in table
  assert f"{unparsable} of 4" in report
  assert (out / rewardbench_self_reward.PLOT_FILE).exists()

  # The API gives the same judgements (greedy here; keys differ) and scores them with its unparsable value.
  settings = judge.JudgeSettings.from_config(config.judge, config.sampling)
  by_key = {rewardbench.pair_key(r): r for r in rows}
  items = [(p, side) for p in pairs for side in ("chosen", "rejected")]  # the task's shapes: no compilation
  scores = judge.judge_scores(smollm, [p["prompt"] for p, _ in items], [p[side] for p, side in items],
                              dataclasses.replace(settings, unparsable_score=0.5), progress=False)
  parsed = [by_key[rewardbench.pair_key(p)][f"parsed_{side}"] for p, side in items]
  np.testing.assert_array_equal(scores, [0.5 if v is None else v for v in parsed])

  # A rerun resumes (nothing left to judge); the unparsable value is applied when summarizing.
  again = rewardbench_self_reward.run(_config(out, **{"sampling.temperature": 0.0, "judge.unparsable_score": 0.5}))
  assert again["judge"]["pairs_judged"] == 0 and again["judge"]["unparsable_score"] == 0.5
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  with pytest.raises(ValueError, match=r"other settings \(sampling.temperature differ\)"):
    rewardbench_self_reward.run(_config(out, **{"sampling.temperature": 0.3}))
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the refused rerun wrote nothing
  assert json.loads((out / RUN_FILE).read_text())["identity"]["method"] == "self_reward"
  assert os.path.getsize(out / rewardbench.SCORES_FILE) > 0
