"""Task `rewardbench_pairwise`: the model compares each RewardBench pair's two responses and names the better one,
in both orders (the authors' pairwise-judge baseline; configs/rewardbench_pairwise.py).

Outputs as task `rewardbench` (scores.jsonl, summary.json, report.md, the plot, run.json). A row holds both
verdicts, the judgements and which response each names; `correct` is the authors' reading (chosen shown first, an
unparsable verdict wrong) and is what the headline tables use. summary.json's `pairwise` holds every view (chosen
first, swapped, both orders) under both unparsable scores (0 and 0.5), the unparsable counts, how often the orders
agree and the share of verdicts for "Response 1". The verdicts are parsed again from the stored judgements at each
run, so `pairwise.parser` is not part of the identity: a rerun with another parser re-reads without judging.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Mapping, Sequence

from ipo_jax import runtime
from ipo_jax.evals import pairwise, report, rewardbench
from ipo_jax.rundir import RunDir

PLOT_FILE = "rewardbench.png"
TITLE = "RewardBench: pairwise judge"
UNPARSABLE = (0.0, 0.5)  # the authors' and RewardBench's generative scoring of an unparsable verdict or a tie


def identity(config: Any, settings: pairwise.PairwiseSettings, pairs: rewardbench.Pairs) -> dict[str, Any]:
  """What determines a verdict: model, data, prompt, layout, truncation, decoding, seed."""
  return {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"), "method": "pairwise",
      "data": {"path": config.data.get("path", ""), "split": config.data.get("split", "filtered"),
               "fingerprint": pairs.fingerprint},
      "template": rewardbench.fingerprint({"template": settings.template}),
      "chat_template": settings.chat_template, "max_prompt_tokens": settings.max_prompt_tokens,
      "sampling": dataclasses.asdict(settings.sampling), "seed": config.seed,
  }


def views(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """{view: {"0.0"|"0.5": the view's summary}} for every view and unparsable score."""
  return {v: {str(u): pairwise.view_summary(rows, v, u) for u in UNPARSABLE} for v in pairwise.VIEWS}


def _report(summary: Mapping[str, Any]) -> str:
  """report.md: the headline (the authors' reading), then every view side by side and the verdict statistics."""
  stats, table = summary["pairwise"], {}
  for view, by_score in stats["views"].items():
    for score, s in by_score.items():
      table[f"{view.replace('_', ' ')}, unparsable = {score}"] = s
  agreement = stats["agreement"]
  lines = ["", "## Every view (%)", "",
           "chosen first: the authors' order; swapped: the rejected response shown first; both: correct when both "
           "verdicts name the chosen response, a tie (scored as an unparsable verdict) when they differ.", "",
           rewardbench.comparison_table(table), "",
           f"Unparsable verdicts: {stats['unparsable']['chosen_first']} (chosen first) and "
           f"{stats['unparsable']['swapped']} (swapped) of {stats['pairs']} each (parser {stats['parser']!r}).",
           f"The orders agree on {agreement['agree']} of the {agreement['pairs_parsed_in_both']} pairs parsed in both"
           + (f" ({100 * agreement['rate']:.1f}%)." if agreement["rate"] is not None else "."),
           "Verdicts for Response 1 (position bias; 50% is none): "
           + ("n/a" if stats["says_response_1"] is None else f"{100 * stats['says_response_1']:.1f}%") + "."]
  return report.report_text(summary, title=TITLE) + "\n".join(lines) + "\n"


def run(config: Any) -> dict[str, Any]:
  """Judges RewardBench pairs with the pairwise prompt in both orders; writes and returns the summary."""
  start = time.time()
  settings = pairwise.PairwiseSettings.from_config(config.pairwise, config.sampling)
  pairs = rewardbench.load_pairs(config.data)
  if not pairs:
    raise ValueError(f"{pairs.source}: no pairs selected")
  run_dir = RunDir.open(config.output_dir, "rewardbench_pairwise", identity(config, settings, pairs),
                        overwrite=config.get("overwrite", False))

  progress = config.pairwise.get("progress", True)
  raw, judged = rewardbench.run_generative(
      pairs, run_dir, "rewardbench_pairwise", lambda: runtime.load_model_from_config(config),
      lambda model, todo: pairwise.judge_pairs(model, todo, settings, config.seed, progress=progress))
  rows = [pairwise.read_row(r, settings.parser) for r in raw]
  method = (f"pairwise judge ({'chat' if settings.chat_template else 'raw'} layout, "
            f"{'default prompt' if settings.template == pairwise.DEFAULT_TEMPLATE else 'prompt from file'}; "
            "chosen first, unparsable = 0)")
  summary = rewardbench.summarize(
      rows, model=config.model.path, data=pairs.source, method=method, wall_time_s=round(time.time() - start, 1),
      pairwise={**pairwise.statistics(rows), "parser": settings.parser, "views": views(rows),
                **judged},
      skipped_invalid=pairs.skipped, settings=run_dir.identity, config=json.loads(config.to_json_best_effort()))
  text = _report(summary)
  summary = run_dir.finish(summary, text)
  report.plot_rewardbench(run_dir.file(PLOT_FILE), summary, title=TITLE)
  runtime.log(text)
  return summary
