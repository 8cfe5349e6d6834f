"""RewardBench: how much the IPO classifier owes its instructions, four prompt sets on the same pairs, one table.

Each prompt set is a variant of configs/rewardbench.py, run with the paper's layout and truncation on the same
pairs, each in its own run directory under --output_dir (so an interrupted ablation resumes where it stopped):

  paper       `:paper`, the authors' instruction per subset (paper:rewardbench_prompts);
  same        `:paper,same`, the authors' one generic instruction for every subset (their ours_same_prompt.py);
  shuffled    `:paper,shuffled`, the authors' fixed table of mismatched instructions (their ours_prompt_shuffle.py);
  deranged_N  `:paper,deranged` with scoring.derangement_seed=N: the paper's instructions dealt to the subsets of
              other sections under a seeded derangement of the four sections (ipo_jax/ipo/ablations.py).

Local (embedded SmolLM2-135M-Instruct, offline data, 5 pairs per subset, 115 pairs x 4 prompt sets; 11 minutes
on a 2-core AMD EPYC CPU shared with other jobs, 4.5 CPU-minutes; 2 to 3.5 minutes of scoring per prompt set):

  python experiments/rewardbench_prompt_ablation.py --max_per_subset 5 --output_dir runs/rb_prompt_ablation

The whole filtered split (2985 pairs per prompt set), several derangements, on an accelerator:

  python experiments/rewardbench_prompt_ablation.py --max_per_subset 0 --derangement_seeds 0,1,2 \\
      --model <HF dir or hub id> --output_dir runs/rb_prompt_ablation_full

Outputs in --output_dir: ablation.md (RewardBench score, sections and the paper's categories; accuracy per subset;
the pairs whose decision (chosen, rejected or tie) differs from `paper`'s, per section and category), ablation.json
(the same numbers, and each derangement's donors) and changed_pairs.jsonl (one row per changed pair and prompt
set: subset, id, both decisions and both P(Yes) pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

from ipo_jax import data as data_lib
from ipo_jax import main as cli
from ipo_jax.evals import rewardbench
from ipo_jax.evals.taxonomy import PAPER_CATEGORIES, SUBSET_MAPPING
from ipo_jax.ipo import ablations
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.tasks import rewardbench as rewardbench_task

DATA = rewardbench.DEFAULT_HUB_ID  # its filtered split, through ipo_jax.sources (cache, hub, offline copy)
BASE = "paper"
FIXED = {"paper": "paper", "same": "paper,same", "shuffled": "paper,shuffled"}


def variant_configs(model: str, output_dir: str, max_per_subset: int, seeds: list[int], subsets: str = "",
                    data: str = DATA, dtype: str = "float32", max_length: int = 0) -> dict:
  """{prompt set name: config}: everything but the instructions (and output_dir) the same."""
  args = {**FIXED, **{f"deranged_{s}": "paper,deranged" for s in seeds}}
  configs = {}
  for name, arg in args.items():
    c = cli.load_config(f"{REPO / 'configs' / 'rewardbench.py'}:{arg}")
    c.model.update(path=model, dtype=dtype)
    c.data.update(path=data, max_per_subset=max_per_subset, subsets=subsets)
    c.scoring.progress = False
    if max_length:
      c.scoring.max_length = max_length
    if name.startswith("deranged_"):
      c.scoring.derangement_seed = int(name.split("_")[1])
    c.output_dir = os.path.join(output_dir, name)
    configs[name] = c
  return configs


def decision(row: dict) -> str:
  """Which response a row's scores prefer: chosen, rejected or tie."""
  return "tie" if row.get("tie") else "chosen" if row["correct"] else "rejected"


def changed_pairs(base: list[dict], other: list[dict], name: str) -> list[dict]:
  """The pairs (matched by subset and id) whose decision under `name` differs from `base`'s."""
  by_key = {rewardbench.pair_key(r): r for r in other}
  out = []
  for b in base:
    o = by_key[rewardbench.pair_key(b)]
    if decision(o) != decision(b):
      out.append({"prompts": name, "subset": b["subset"], "id": b["id"],
                  "section": ablations.SECTION_OF.get(b["subset"]), "decision_paper": decision(b),
                  "decision": decision(o), "p_yes_paper": [b["score_chosen"], b["score_rejected"]],
                  "p_yes": [o["score_chosen"], o["score_rejected"]]})
  return out


def changed_counts(changed: list[dict]) -> dict[str, int]:
  """Changed pairs per section and per paper category (prefixed `paper: `), and in all."""
  out = {section: 0 for section in SUBSET_MAPPING} | {f"paper: {c}": 0 for c in PAPER_CATEGORIES} | {"all": 0}
  for row in changed:
    for section, subsets in SUBSET_MAPPING.items():
      out[section] += row["subset"] in subsets
    for category, subsets in PAPER_CATEGORIES.items():
      out[f"paper: {category}"] += row["subset"] in subsets
    out["all"] += 1
  return out


def _check_instructions(name: str, config, summary: dict) -> None:
  """The run's recorded instructions are the ones this prompt set means (a task that ignored the setting would
  otherwise pass for the ablation)."""
  expected = prompts_lib.prompts_from_scoring(config.scoring)
  fingerprint = rewardbench.fingerprint({k: list(v) for k, v in expected.prompts.items()} | {
      "fallback": expected.fallback})
  if summary["settings"]["prompts"] != fingerprint:
    raise ValueError(f"{config.output_dir}: the run's instructions are not those of prompt set {name} "
                     f"({expected.source}); does task rewardbench read scoring.derangement_seed?")


def run_all(configs: dict) -> tuple[dict, dict]:
  """Runs (or resumes) every prompt set; (summaries, result rows in the pairs' order) by name."""
  summaries, rows = {}, {}
  keys = [rewardbench.pair_key(p) for p in rewardbench.load_pairs(configs[BASE].data)]
  for name, config in configs.items():
    summaries[name] = rewardbench_task.run(config)
    _check_instructions(name, config, summaries[name])
    found = {rewardbench.pair_key(r): r for r in rewardbench.read_scores(config.output_dir, set(keys))}
    rows[name] = [found[k] for k in keys]
  return summaries, rows


def subset_table(summaries: dict) -> str:
  names = list(summaries)
  lines = ["| subset | section | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
  for section, subsets in SUBSET_MAPPING.items():
    for s in subsets:
      if s in summaries[BASE]["subsets"]:
        lines.append(f"| {s} | {section} | " + " | ".join(
            f"{100 * summaries[n]['subsets'][s]['accuracy']:.1f}" for n in names) + " |")
  return "\n".join(lines)


def changed_table(counts: dict) -> str:
  names = list(counts)
  lines = ["| changed vs paper | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for key in next(iter(counts.values())):
    lines.append(f"| {key} | " + " | ".join(str(counts[n][key]) for n in names) + " |")
  return "\n".join(lines)


def compare(configs: dict, output_dir: str) -> tuple[str, dict]:
  """Runs the prompt sets and writes ablation.md, ablation.json and changed_pairs.jsonl; (report, table)."""
  summaries, rows = run_all(configs)
  changed = {n: changed_pairs(rows[BASE], rows[n], n) for n in configs if n != BASE}
  counts = {n: changed_counts(c) for n, c in changed.items()}
  donors = {n: ablations.donors(prompts_lib.prompts_from_config(c.scoring.prompts_file), c.scoring.derangement_seed)
            for n, c in configs.items() if n.startswith("deranged_")}
  n_pairs = len(rows[BASE])
  report = "\n\n".join([
      f"# RewardBench prompt ablation ({n_pairs} pairs, the same for every prompt set; %)",
      rewardbench.comparison_table(summaries),
      "Accuracy per subset (%):", subset_table(summaries),
      "Pairs whose decision (chosen / rejected / tie) differs from paper's:", changed_table(counts)]) + "\n"
  keep = ("score", "sections", "paper", "counts", "wall_time_s")
  table = {"pairs": n_pairs, "prompt_sets": {n: c.scoring.prompts_file for n, c in configs.items()},
           "summaries": {n: {k: s[k] for k in keep} | {"subsets": {k: v["accuracy"] for k, v in s["subsets"].items()}}
                         for n, s in summaries.items()},
           "changed_vs_paper": counts, "donors": donors}
  os.makedirs(output_dir, exist_ok=True)
  data_lib.write_json(os.path.join(output_dir, "ablation.json"), table)
  with open(os.path.join(output_dir, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(report)
  with open(os.path.join(output_dir, "changed_pairs.jsonl"), "w", encoding="utf-8") as f:
    for name_rows in changed.values():
      f.writelines(json.dumps(r) + "\n" for r in name_rows)
  return report, table


def seed_list(text: str) -> list[int]:
  """--derangement_seeds: "0,1,2" -> [0, 1, 2]."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    seeds = [-1]
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"{text!r}: give distinct integers >= 0, comma-separated")
  return seeds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", default="embedded", help="model path or id")
  parser.add_argument("--data", default=DATA, help="RewardBench pairs: hub id (filtered split) or local file")
  parser.add_argument("--max_per_subset", type=int, default=5, help="pairs per subset; 0: all (the paper)")
  parser.add_argument("--subsets", default="", help="comma-separated subsets; empty: all")
  parser.add_argument("--derangement_seeds", default="0", type=seed_list,
                      help="comma-separated seeds (integers >= 0), one prompt set each; empty: none")
  parser.add_argument("--max_length", type=int, default=0, help="tokens per sequence; 0: the paper's 1024")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and activations")
  parser.add_argument("--output_dir", default="runs/rb_prompt_ablation")
  args = parser.parse_args()
  configs = variant_configs(args.model, args.output_dir, args.max_per_subset, args.derangement_seeds, args.subsets,
                            args.data, args.dtype, args.max_length)
  report, _ = compare(configs, args.output_dir)
  print(report)


if __name__ == "__main__":
  main()
