"""Task `rmbench`: the IPO classifier on RM-Bench, with RM-Bench's hard / normal / easy accuracy (configs/rmbench.py).

Outputs in `output_dir` (a run directory, ipo_jax/rundir.py): `scores.jsonl` (one row per RM-Bench row with its six
responses' scores, appended as rows finish), `summary.json`, `report.md`, `rmbench.png` (heat maps of the accuracy
matrices) and `run.json`. A rerun with the same settings scores only the rows not yet in scores.jsonl; other
settings are refused before anything is written. The arithmetic and the data schemas: ipo_jax/evals/rmbench.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ipo_jax import runtime
from ipo_jax.evals import rmbench
from ipo_jax.evals.rewardbench import fingerprint
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.rundir import RunDir

PLOT_FILE = "rmbench.png"


def identity(config: Any, settings: scorer_lib.Settings, prompt_set: prompts_lib.PromptSet,
             rows: rmbench.Rows) -> dict[str, Any]:
  """What determines a row's scores: model, data, layout, answers, truncation, instructions."""
  return {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"),
      "data": {"path": config.data.get("path", ""), "split": config.data.get("split", "train"),
               "domain": config.data.get("domain", ""), "fingerprint": rows.fingerprint},
      "layout": settings.layout, "template": settings.template, "yes": settings.yes, "no": settings.no,
      "max_length": settings.max_length, "truncation": settings.truncation, "ensemble": settings.ensemble,
      "prompts": fingerprint({k: list(v) for k, v in prompt_set.prompts.items()} | {"fallback": prompt_set.fallback}),
  }


def run(config: Any) -> dict[str, Any]:
  """Scores RM-Bench rows (six responses each) with the IPO classifier; writes and returns the summary."""
  start = time.time()
  settings = scorer_lib.Settings.from_config(config.scoring)
  prompts_file = config.scoring.get("prompts_file", "")
  prompt_set, _ = rmbench.load_instructions(prompts_file)
  rows = rmbench.load_rows(config.data)
  if not rows:
    raise ValueError(f"{rows.source}: no rows selected")
  run_dir = RunDir.open(config.output_dir, "rmbench", identity(config, settings, prompt_set, rows),
                        overwrite=config.get("overwrite", False))
  finished = {rmbench.row_key(r): r for r in run_dir.rows(rmbench.SCORES_FILE)}
  todo = [r for r in rows if rmbench.row_key(r) not in finished]
  run_dir.agree(len(todo), "finished rows")
  runtime.log(f"rmbench: {len(rows)} rows from {rows.source}"
              + (f"; {len(rows) - len(todo)} already scored in {run_dir.path}" if len(todo) < len(rows) else ""))
  model = runtime.load_model_from_config(config)
  scorer = scorer_lib.Scorer(model, settings)
  scoring_start, compiled = time.time(), scorer_lib.num_compilations()
  if todo:
    for done in rmbench.score_rows(scorer, todo, prompt_set):
      run_dir.append(rmbench.SCORES_FILE, done)
      finished.update((rmbench.row_key(r), r) for r in done)
  seconds, compiled = time.time() - scoring_start, scorer_lib.num_compilations() - compiled
  results = [finished[rmbench.row_key(r)] for r in rows]
  summary = rmbench.summarize(
      results, model=model.name, data=rows.source, method=f"IPO P(Yes), {settings.layout} layout",
      wall_time_s=round(time.time() - start, 1),
      scoring={"rows_scored": len(todo), "responses_scored": 2 * rmbench.LEVELS * len(todo),
               "seconds": round(seconds, 2),
               "responses_per_s": round(2 * rmbench.LEVELS * len(todo) / seconds, 3) if todo else None,
               "compilations": compiled, **scorer.stats, **scorer_lib.flop_rate(scorer.stats, seconds)},
      instructions=rmbench.instructions_summary(prompt_set, results, prompts_file),
      settings=run_dir.identity, config=json.loads(config.to_json_best_effort()))
  notes = rmbench.notes(summary)
  summary = run_dir.finish(summary, rmbench.report_text(summary, notes))
  rmbench.plot(run_dir.file(PLOT_FILE), summary)
  runtime.log("\n" + rmbench.format_table(summary))
  for note in notes:
    runtime.log(note)
  c = summary["counts"]
  runtime.log(f"\n{c['rows']} rows ({c['responses']} responses), {c['ties']} ties, {c['truncated_responses']} "
              f"truncated responses; {compiled} compilations; {summary['wall_time_s']} s; results in {run_dir.path}")
  return summary
