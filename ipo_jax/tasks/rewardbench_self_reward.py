"""Task `rewardbench_self_reward`: the model grades each RewardBench response on the additive 5-point rubric
(configs/rewardbench_self_reward.py).

The same pairs, section scores and outputs as task `rewardbench` (scores.jsonl, summary.json, report.md, the plot,
run.json), so the judge's table sits next to the IPO classifier's: `compare_with` adds a side-by-side table on the
common pairs to report.md. A rerun with the same settings resumes; other settings are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ipo_jax import runtime
from ipo_jax.evals import judge, report, rewardbench
from ipo_jax.rundir import SUMMARY_FILE, RunDir

PLOT_FILE = "rewardbench.png"
TITLE = "RewardBench: self-rewarding judge"


def _comparison_dirs(compare_with: str) -> list[str]:
  """The output dirs of other RewardBench runs (comma-separated), checked before any judging."""
  dirs = [e.strip() for e in compare_with.split(",") if e.strip()]
  for directory in dirs:
    for name in (SUMMARY_FILE, rewardbench.SCORES_FILE):
      if not os.path.exists(os.path.join(directory, name)):
        raise FileNotFoundError(f"compare_with: {directory} is not a RewardBench output dir (no {name})")
  return dirs


def _other_summaries(dirs: Sequence[str], keys: set[tuple[str, str]]) -> dict[str, Mapping[str, Any]]:
  """Summaries of other RewardBench runs on the pairs in `keys`, by method."""
  out = {}
  for directory in dirs:
    with open(os.path.join(directory, SUMMARY_FILE), encoding="utf-8") as f:
      method = json.load(f).get("method", "run")
    rows = rewardbench.read_scores(directory, keys)
    if rows:
      out[f"{method} ({directory})"] = rewardbench.summarize(rows)
  return out


def identity(config: Any, settings: judge.JudgeSettings, pairs: rewardbench.Pairs) -> dict[str, Any]:
  """What determines a judgement: model, data, rubric, layout, truncation, decoding, seed."""
  return {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"), "method": "self_reward",
      "data": {"path": config.data.get("path", ""), "split": config.data.get("split", "filtered"),
               "fingerprint": pairs.fingerprint},
      "template": rewardbench.fingerprint({"template": settings.template}),
      "chat_template": settings.chat_template, "max_prompt_tokens": settings.max_prompt_tokens,
      "truncation": settings.truncation, "sampling": dataclasses.asdict(settings.sampling), "seed": config.seed,
  }


def _judge_stats(rows: Sequence[Mapping[str, Any]], settings: judge.JudgeSettings) -> dict[str, Any]:
  unparsable = sum((r["parsed_chosen"] is None) + (r["parsed_rejected"] is None) for r in rows)
  return {"unparsable": unparsable, "unparsable_rate": unparsable / (2 * len(rows)),
          "unparsable_score": settings.unparsable_score,
          "mean_score_chosen": float(np.mean([r["score_chosen"] for r in rows])),
          "mean_score_rejected": float(np.mean([r["score_rejected"] for r in rows]))}


def run(config: Any) -> dict[str, Any]:
  """Judges RewardBench pairs with the model itself; writes and returns the summary."""
  start = time.time()
  settings = judge.JudgeSettings.from_config(config.judge, config.sampling)
  pairs = rewardbench.load_pairs(config.data)
  if not pairs:
    raise ValueError(f"{pairs.source}: no pairs selected")
  compare_dirs = _comparison_dirs(config.get("compare_with", ""))
  run_dir = RunDir.open(config.output_dir, "rewardbench_self_reward", identity(config, settings, pairs),
                        overwrite=config.get("overwrite", False))

  progress = config.judge.get("progress", True)
  raw, judged = rewardbench.run_generative(
      pairs, run_dir, "rewardbench_self_reward", lambda: runtime.load_model_from_config(config),
      lambda model, todo: judge.judge_pairs(model, todo, settings, config.seed, progress=progress))
  rows = [judge.score_pair(r, settings.unparsable_score) for r in raw]
  method = (f"self-rewarding judge ({'chat' if settings.chat_template else 'raw'} layout, "
            f"{'default rubric' if settings.template == judge.DEFAULT_TEMPLATE else 'rubric from file'})")
  summary = rewardbench.summarize(
      rows, model=config.model.path, data=pairs.source, method=method, wall_time_s=round(time.time() - start, 1),
      judge={**_judge_stats(rows, settings), **judged},
      skipped_invalid=pairs.skipped, settings=run_dir.identity, config=json.loads(config.to_json_best_effort()))
  stats = summary["judge"]
  extra = [f"\nUnparsable judgements: {stats['unparsable']} of {2 * len(rows)} (scored {settings.unparsable_score})."]
  others = _other_summaries(compare_dirs, {rewardbench.pair_key(r) for r in rows})
  if others:
    extra += ["", "## Side by side (the pairs both runs scored)", "",
              rewardbench.comparison_table({**others, method: summary})]
  text = report.report_text(summary, title=TITLE) + "\n".join(extra) + "\n"
  summary = run_dir.finish(summary, text)
  report.plot_rewardbench(run_dir.file(PLOT_FILE), summary, title=TITLE)
  runtime.log(text)
  return summary
