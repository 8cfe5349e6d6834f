"""RewardBench: the paper's one instruction per subset against an ensemble of candidate instructions, one table.

The single-instruction run is `configs/rewardbench.py:paper` (the authors' per-subset prompts, paper layout, right
truncation at 1024 tokens); the ensemble run is `configs/rewardbench.py:paper,ensemble` (the 10 candidate
instructions per subset of the paper's candidate_prompts.json (source paper:candidate_prompts), same layout and truncation, mean P(Yes)). The ensemble
costs K forward passes per response, so it can run on a per-subset slice (`--ensemble_max_per_subset`) while the
single instruction covers more; the table then shows the single instruction on all its pairs and on the ensemble's
pairs, the ensemble combined by mean P(Yes) and by mean log-odds (recomputed from the stored per-candidate scores),
and the prompt search (the best candidate per subset, picked on these same pairs, so an optimistic bound). Both
runs resume from their output directories.

Local (embedded SmolLM2-135M-Instruct; the whole filtered split with the paper's prompts, 2985 pairs, about 54
minutes on a 2-core CPU; the ensemble on 4 pairs per subset, 92 pairs x 10 instructions, about 13 minutes):

  python experiments/rewardbench_ensemble.py --single_max_per_subset 0 --ensemble_max_per_subset 4 \\
      --output_dir runs/rb_ensemble

The ensemble over the whole split, in bf16 (the single instruction 22.5 minutes, the ensemble about 4 hours on a
2-core CPU; it resumes where an interrupted invocation stopped; `--model <model>` for another model):

  python experiments/rewardbench_ensemble.py --single_max_per_subset 0 --ensemble_max_per_subset 0 \\
      --dtype bfloat16 --output_dir runs/rb_ensemble_full_bf16

The table goes to <output_dir>/comparison.md and the summaries to <output_dir>/comparison.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent

from ipo_jax import data as data_lib
from ipo_jax import main as cli
from ipo_jax.evals import ipo_rows, rewardbench
from ipo_jax.tasks import rewardbench as rewardbench_task

DATA = rewardbench.DEFAULT_HUB_ID  # its filtered split, through ipo_jax.sources (cache, hub, offline copy)


def _config(arg: str):
  return cli.load_config(f"{REPO / 'configs' / 'rewardbench.py'}:{arg}")


def run_configs(model: str, output_dir: str, single_max_per_subset: int, ensemble_max_per_subset: int,
                data: str = DATA, dtype: str = "float32"):
  """(single-instruction config, ensemble config): same model, dtype, data, layout and truncation."""
  configs = {"single": _config("paper"), "ensemble": _config("paper,ensemble")}
  for name, c in configs.items():
    c.model.path = model
    c.model.dtype = dtype
    c.data.path = data
    c.output_dir = os.path.join(output_dir, name)
  configs["single"].data.max_per_subset = single_max_per_subset
  configs["ensemble"].data.max_per_subset = ensemble_max_per_subset
  return configs["single"], configs["ensemble"]


def recombine(rows: list[dict], method: str) -> list[dict]:
  """Ensemble rows with `correct` and `tie` recomputed under another combination of their candidates' scores
  (a row scored under one instruction only has no candidates and stays as it is)."""
  out = []
  for r in rows:
    cand = r.get("candidates")
    if cand is None:
      out.append(r)
      continue
    _, key = ipo_rows.combine(np.array([cand["log_odds_chosen"], cand["log_odds_rejected"]]), method)
    out.append({**r, "correct": bool(key[0] > key[1]), "tie": bool(key[0] == key[1])})
  return out


def seconds_per_pair(summary: dict) -> float | None:
  run = summary.get("scoring", {})
  return run["seconds"] / run["pairs_scored"] if run.get("pairs_scored") else None


def compare(model: str, output_dir: str, single_max_per_subset: int, ensemble_max_per_subset: int,
            data: str = DATA, dtype: str = "float32") -> tuple[str, dict]:
  """Runs both and returns the Markdown report and the summaries by column name."""
  single_config, ensemble_config = run_configs(model, output_dir, single_max_per_subset, ensemble_max_per_subset,
                                               data, dtype)
  single = rewardbench_task.run(single_config)
  ensemble = rewardbench_task.run(ensemble_config)
  keys = {rewardbench.pair_key(p) for p in rewardbench.load_pairs(ensemble_config.data)}
  ensemble_rows = rewardbench.read_scores(ensemble_config.output_dir, keys)
  single_rows = rewardbench.read_scores(single_config.output_dir, keys)
  if len(single_rows) < len(keys):
    raise ValueError(f"the single-instruction run scored {len(single_rows)} of the ensemble's {len(keys)} pairs; "
                     "select at least as many pairs per subset for it")
  n_single, n_ensemble = single["counts"]["pairs"], len(keys)
  summaries = {
      f"paper prompts ({n_single})": single,
      f"paper prompts ({n_ensemble})": rewardbench.summarize(single_rows),
      f"ensemble, mean P(Yes) ({n_ensemble})": ensemble,
      f"ensemble, mean log-odds ({n_ensemble})": rewardbench.summarize(recombine(ensemble_rows, "mean_log_odds")),
  }
  selected = ensemble.get("prompt_search_selected", {}).get("score")
  timing = {name: seconds_per_pair(s) for name, s in (("single", single), ("ensemble", ensemble))}
  lines = ["# RewardBench: one instruction vs an ensemble (%)", "", rewardbench.comparison_table(summaries), ""]
  if selected is not None:
    lines.append(f"Prompt search (best candidate per subset, chosen on these {n_ensemble} pairs): "
                 f"{100 * selected:.1f}.")
  timed = [f"{name} {t:.2f} s" for name, t in timing.items() if t is not None]
  if timed:
    lines.append("Scoring time per pair (the latest invocation of each run that scored): " + ", ".join(timed) + ".")
  report = "\n".join(lines) + "\n"
  keep = ("score", "sections", "paper", "counts", "wall_time_s", "scoring", "prompt_search_selected")
  data_lib.write_json(os.path.join(output_dir, "comparison.json"),
                      {name: {k: s[k] for k in keep if k in s} for name, s in summaries.items()})
  with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(report)
  return report, summaries


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", default="embedded", help="model path or id")
  parser.add_argument("--data", default=DATA, help="RewardBench pairs: hub id (filtered split) or local file")
  parser.add_argument("--single_max_per_subset", type=int, default=0, help="pairs per subset; 0: all")
  parser.add_argument("--ensemble_max_per_subset", type=int, default=4, help="pairs per subset; 0: all")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and activations")
  parser.add_argument("--output_dir", default="runs/rb_ensemble")
  args = parser.parse_args()
  report, _ = compare(args.model, args.output_dir, args.single_max_per_subset, args.ensemble_max_per_subset,
                      args.data, args.dtype)
  print(report)


if __name__ == "__main__":
  main()
