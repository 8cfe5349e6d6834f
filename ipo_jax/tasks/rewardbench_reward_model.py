"""Task `rewardbench_reward_model`: a classifier reward model (`*ForSequenceClassification`) on RewardBench, the
authors' reward-model baseline (configs/rewardbench_reward_model.py).

The same pairs, rows and outputs as task `rewardbench` (scores.jsonl with both rewards, `correct` and `tie` per
pair; summary.json, report.md, rewardbench.png, run.json), so the tables line up. A rerun with the same settings
scores only the pairs not yet in scores.jsonl; other settings are refused before anything is written.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from ipo_jax import runtime
from ipo_jax.evals import report, rewardbench
from ipo_jax.evals import reward_model as reward_lib
from ipo_jax.rundir import RunDir

PLOT_FILE = "rewardbench.png"
TITLE = "RewardBench: classifier reward model"


def identity(config: Any, settings: reward_lib.RewardSettings, pairs: rewardbench.Pairs) -> dict[str, Any]:
  """What determines a pair's rewards: model, data, the text read, truncation and the label."""
  return {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"), "method": "reward_model",
      "data": {"path": config.data.get("path", ""), "split": config.data.get("split", "filtered"),
               "fingerprint": pairs.fingerprint},
      "format": settings.format, "max_length": settings.max_length, "truncation": settings.truncation,
      "label": settings.label,
  }


def run(config: Any) -> dict[str, Any]:
  """Scores RewardBench pairs with a reward model; writes and returns the summary."""
  start = time.time()
  if not config.model.get("path", ""):
    raise ValueError("rewardbench_reward_model: model.path is empty; set --config.model.path=<a "
                     "*ForSequenceClassification directory or hf:owner/name>")
  reward_lib.check_path(config.model.path)
  settings = reward_lib.RewardSettings.from_config(config.reward_model)
  pairs = rewardbench.load_pairs(config.data)
  if not pairs:
    raise ValueError(f"{pairs.source}: no pairs selected")
  run_dir = RunDir.open(config.output_dir, "rewardbench_reward_model", identity(config, settings, pairs),
                        overwrite=config.get("overwrite", False))
  model = runtime.load_model_from_config(config)
  scorer = reward_lib.RewardScorer(model, settings)
  evaluator = rewardbench.Evaluator(pairs, lambda todo: reward_lib.score_rewardbench_pairs(scorer, todo), run_dir)
  runtime.log(evaluator.describe("rewardbench_reward_model"))
  scoring_start, compiled = time.time(), reward_lib.num_compilations()
  dict(evaluator.run())
  scoring_time = time.time() - scoring_start
  rows = evaluator.rows()
  summary = rewardbench.summarize(
      rows, model=model.name, data=pairs.source,
      method=f"classifier reward model ({settings.format} text, {settings.truncation} truncation at "
             f"{settings.max_length})",
      wall_time_s=round(time.time() - start, 1),
      reward_model={"pairs_scored": evaluator.scored, "seconds": round(scoring_time, 2),
                    "compilations": reward_lib.num_compilations() - compiled,
                    "shapes": sorted(scorer.shapes),
                    "mean_reward_chosen": float(np.mean([r["score_chosen"] for r in rows])),
                    "mean_reward_rejected": float(np.mean([r["score_rejected"] for r in rows]))},
      skipped_invalid=pairs.skipped, settings=run_dir.identity, config=json.loads(config.to_json_best_effort()))
  summary = run_dir.finish(summary, report.report_text(summary, title=TITLE))
  report.plot_rewardbench(run_dir.file(PLOT_FILE), summary, title=TITLE)
  runtime.log("\n" + report.format_table(summary))
  runtime.log(f"\n{len(rows)} pairs, {summary['counts']['ties']} ties, {summary['counts']['truncated']} truncated; "
              f"{summary['reward_model']['compilations']} compilations; {summary['wall_time_s']} s; results in "
              f"{run_dir.path}")
  return summary
