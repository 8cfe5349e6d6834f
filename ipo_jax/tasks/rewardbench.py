"""Task `rewardbench`: the IPO classifier on RewardBench, with the official section scores (configs/rewardbench.py).

Outputs in `output_dir` (a run directory, ipo_jax/rundir.py): `scores.jsonl` (one row per pair, appended as pairs
finish), `summary.json`, `report.md`, `rewardbench.png` and `run.json` (the identity a resumed run must match). A
rerun with the same settings scores only the pairs not yet in scores.jsonl; other settings are refused.

Before anything is written, every subset must have an instruction (ipo/prompts.py `check_subsets`: a subset unknown
to RewardBench's taxonomy needs an entry of its own or `scoring.fallback_instruction=True`). summary.json records
the pairs scored under the fallback instruction per subset (`instructions`) and the Yes+No mass (`yes_no_mass`,
`low` when the instruction is probably not a yes/no question); report.md and the log say both, and say so when no
official section was scored (the score is then null).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ipo_jax import runtime
from ipo_jax.evals import ipo_rows, report, rewardbench
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.rundir import RunDir

PLOT_FILE = "rewardbench.png"


def identity(config: Any, settings: scorer_lib.Settings, prompt_set: prompts_lib.PromptSet,
             pairs: rewardbench.Pairs) -> dict[str, Any]:
  """What determines a pair's scores: model, data, layout, answers, truncation, instructions."""
  seed = config.scoring.get("derangement_seed", -1)  # a prompt ablation (configs/rewardbench.py:deranged)
  return {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"),
      "data": {"path": config.data.get("path", ""), "split": config.data.get("split", "filtered"),
               "fingerprint": pairs.fingerprint},
      "layout": settings.layout, "template": settings.template, "yes": settings.yes, "no": settings.no,
      "max_length": settings.max_length, "truncation": settings.truncation, "ensemble": settings.ensemble,
      "prompts": rewardbench.fingerprint({k: list(v) for k, v in prompt_set.prompts.items()} | {
          "fallback": prompt_set.fallback}),
      **({"derangement_seed": seed} if seed != -1 else {}),
  }


def run(config: Any) -> dict[str, Any]:
  """Scores RewardBench pairs with the IPO classifier; writes and returns the summary."""
  start = time.time()
  settings = scorer_lib.Settings.from_config(config.scoring)
  prompts_file = config.scoring.get("prompts_file", "")
  prompt_set = prompts_lib.prompts_from_scoring(config.scoring)
  pairs = rewardbench.load_pairs(config.data)
  if not pairs:
    raise ValueError(f"{pairs.source}: no pairs selected")
  checked = prompts_lib.check_subsets(prompt_set, {p["subset"] for p in pairs}, prompts_file,
                                      bool(config.scoring.get("fallback_instruction", False)))
  run_dir = RunDir.open(config.output_dir, "rewardbench", identity(config, settings, prompt_set, pairs),
                        overwrite=config.get("overwrite", False))
  model = runtime.load_model_from_config(config)
  scorer = scorer_lib.Scorer(model, settings)
  evaluator = rewardbench.Evaluator(pairs, lambda todo: ipo_rows.score_rewardbench_pairs(scorer, todo, prompt_set),
                                    run_dir)
  runtime.log(evaluator.describe("rewardbench"))
  scoring_start, compiled = time.time(), scorer_lib.num_compilations()
  dict(evaluator.run())
  scoring_time, compiled = time.time() - scoring_start, scorer_lib.num_compilations() - compiled
  rows = evaluator.rows()
  summary = rewardbench.summarize(
      rows, model=model.name, data=pairs.source, method=f"IPO P(Yes), {settings.layout} layout",
      wall_time_s=round(time.time() - start, 1),
      scoring={"pairs_scored": evaluator.scored, "seconds": round(scoring_time, 2),
               "pairs_per_s": round(evaluator.scored / scoring_time, 3) if evaluator.scored else None,
               "compilations": compiled, **_plan_info(scorer.last_plan),
               **scorer.stats, **scorer_lib.flop_rate(scorer.stats, scoring_time)},
      instructions=checked.summary(rows), yes_no_mass=ipo_rows.yes_no_mass(rows),
      skipped_invalid=pairs.skipped, settings=run_dir.identity, config=json.loads(config.to_json_best_effort()))
  summary = run_dir.finish(summary, report.report_text(summary))
  report.plot_rewardbench(run_dir.file(PLOT_FILE), summary)
  runtime.log("\n" + report.format_table(summary))
  for note in report.notes(summary):  # no section scored, fallback instructions, a low Yes+No mass
    runtime.log(note)
  runtime.log(f"\n{len(rows)} pairs, {summary['counts']['ties']} ties, {summary['counts']['truncated']} truncated; "
              f"{compiled} compilations; {summary['wall_time_s']} s; results in {run_dir.path}")
  return summary


def _plan_info(plan: Any) -> dict[str, Any]:
  """How the last plan ran the pairs: packed rows, shared-prefix slots, bucket lengths (None before any plan)."""
  return {"packed": bool(plan.packed) if plan else None, "prefix": plan.prefix if plan else None,
          "buckets": list(plan.buckets) if plan else None}
