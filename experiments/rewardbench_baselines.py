"""RewardBench: IPO beside the paper's baselines on the same pairs, one table per subset and category.

The model scores the same RewardBench pairs as an IPO classifier (task `rewardbench`, the authors' prompts and
layout), as a self-rewarding 5-point judge (task `rewardbench_self_reward`, the authors' rubric) and as a pairwise
judge (task `rewardbench_pairwise`, the authors' prompt, both orders); with `--reward-model <dir>` a classifier
reward model (task `rewardbench_reward_model`, the authors' text) scores them too. Each method runs in its own run
directory under <output_dir>, so an interrupted comparison resumes where it stopped.

Local (embedded SmolLM2-135M-Instruct, offline data, 3 pairs per subset (69 pairs), judges writing at most 48
tokens of prompts cut at 1024 tokens):

  python experiments/rewardbench_baselines.py --model embedded --max_per_subset 3 --judge_tokens 48 \\
      --max_prompt_tokens 1024 --output_dir runs/rb_baselines_local [--reward-model <classifier dir>]

The paper's sizes (the whole filtered split, 2985 pairs; judges writing up to 200 tokens), on an accelerator:

  python experiments/rewardbench_baselines.py --model <gguf or HF dir> --max_per_subset 0 --judge_tokens 200 \\
      --reward-model <HF *ForSequenceClassification dir> --output_dir runs/rb_baselines

The table (accuracy in % per subset, per official section, per paper category, and the score) goes to
<output_dir>/comparison.md, the numbers to <output_dir>/comparison.json. A pairwise cell reads "a / b": unparsable
verdicts (and, for both orders together, disagreeing orders) scored 0 (the authors') / 0.5 (RewardBench's
generative scoring).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Mapping

REPO = pathlib.Path(__file__).resolve().parent.parent

from ipo_jax import data as data_lib
from ipo_jax import main as cli
from ipo_jax.evals import rewardbench
from ipo_jax.evals.taxonomy import PAPER_CATEGORIES, SUBSET_MAPPING
from ipo_jax.tasks import rewardbench as rewardbench_task
from ipo_jax.tasks import rewardbench_pairwise, rewardbench_reward_model, rewardbench_self_reward

DATA = rewardbench.DEFAULT_HUB_ID  # its filtered split, through ipo_jax.sources (cache, hub, offline copy)
TASKS = {"ipo": rewardbench_task, "self_reward": rewardbench_self_reward, "pairwise": rewardbench_pairwise,
         "reward_model": rewardbench_reward_model}
PAIRWISE_COLUMNS = {"chosen_first": "pairwise: chosen first", "swapped": "pairwise: swapped",
                    "both": "pairwise: both orders"}


def method_configs(model: str, output_dir: str, max_per_subset: int, judge_tokens: int, subsets: str = "",
                   reward_model: str = "", max_prompt_tokens: int = 2048) -> dict[str, Any]:
  """{method: its task config} on the same pairs, each writing under `output_dir`/<method>."""
  load = lambda name, arg="": cli.load_config(f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else ""))
  configs = {"ipo": load("rewardbench", "paper"), "self_reward": load("rewardbench_self_reward", "paper"),
             "pairwise": load("rewardbench_pairwise")}
  if reward_model:
    configs["reward_model"] = load("rewardbench_reward_model")
  for method, c in configs.items():
    c.model.path = reward_model if method == "reward_model" else model
    c.data.update(path=DATA, max_per_subset=max_per_subset, subsets=subsets)
    c.output_dir = os.path.join(output_dir, method)
  configs["ipo"].scoring.progress = False
  for method, section in (("self_reward", "judge"), ("pairwise", "pairwise")):
    configs[method][section].update(progress=False, max_prompt_tokens=max_prompt_tokens)
    configs[method].sampling.max_new_tokens = judge_tokens
  if reward_model:
    configs["reward_model"].reward_model.progress = False
  return configs


def _view(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The accuracies of a task's headline summary."""
  return {"subsets": {s: v["accuracy"] for s, v in summary["subsets"].items()}, "sections": summary["sections"],
          "paper": summary["paper"], "score": summary["score"]}


def columns(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """{column: {scoring: accuracies}}: one scoring for IPO, the self-rewarding judge (the authors' reading:
  unparsable = 0) and the reward model; unparsable 0 and 0.5 for each pairwise view."""
  out = {"IPO": {"": _view(summaries["ipo"])}, "self-reward": {"": _view(summaries["self_reward"])}}
  for view, name in PAIRWISE_COLUMNS.items():
    out[name] = dict(summaries["pairwise"]["pairwise"]["views"][view])
  if "reward_model" in summaries:
    out["reward model"] = {"": _view(summaries["reward_model"])}
  return out


def _cell(by_scoring: Mapping[str, Mapping[str, Any]], get) -> str:
  values = [get(v) for v in by_scoring.values()]
  return " / ".join("" if x is None or x != x else f"{100 * x:.1f}" for x in values)


def table(cols: Mapping[str, Mapping[str, Mapping[str, Any]]], counts: Mapping[str, Any]) -> str:
  """Markdown: one row per subset (by section), section, paper category and the score; one column per method."""
  names = list(cols)
  present = set().union(*(v["subsets"] for c in cols.values() for v in c.values()))
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  row = lambda label, get: lines.append(f"| {label} | " + " | ".join(_cell(cols[n], get) for n in names) + " |")
  for section, subsets in SUBSET_MAPPING.items():
    for s in subsets:
      if s in present:
        row(s, lambda v, s=s: v["subsets"].get(s))
  for s in sorted(present - {s for subs in SUBSET_MAPPING.values() for s in subs}):
    row(s, lambda v, s=s: v["subsets"].get(s))
  for section in SUBSET_MAPPING:
    row(f"**{section}**", lambda v, k=section: v["sections"].get(k))
  for category in list(PAPER_CATEGORIES) + ["mean"]:
    row(f"paper: {category}", lambda v, k=category: v["paper"].get(k))
  row("**Score**", lambda v: v["score"])
  lines.append(f"\n{counts['pairs']} pairs ({counts['subsets']} subsets) scored by every method. Pairwise verdicts "
               f"unparsable: {counts['unparsable']['chosen_first']} (chosen first), {counts['unparsable']['swapped']}"
               f" (swapped); the orders agree on {counts['agreement']['agree']} of "
               f"{counts['agreement']['pairs_parsed_in_both']} pairs parsed in both. Self-reward judgements "
               f"unparsable: {counts['self_reward_unparsable']} of {2 * counts['pairs']}.")
  return "\n".join(lines)


def compare(configs: Mapping[str, Any], output_dir: str) -> tuple[str, dict[str, Any]]:
  """Runs every method; writes comparison.md and comparison.json; returns the table and the summaries."""
  summaries = {method: TASKS[method].run(config) for method, config in configs.items()}
  keys = [{rewardbench.pair_key(r) for r in rewardbench.read_scores(c.output_dir)} for c in configs.values()]
  if any(k != keys[0] for k in keys):
    raise RuntimeError("the methods scored different pairs; rerun with the same data settings")
  stats = summaries["pairwise"]["pairwise"]
  counts = {"pairs": len(keys[0]), "subsets": len({s for s, _ in keys[0]}), "unparsable": stats["unparsable"],
            "agreement": stats["agreement"], "says_response_1": stats["says_response_1"],
            "self_reward_unparsable": summaries["self_reward"]["judge"]["unparsable"]}
  cols = columns(summaries)
  text = table(cols, counts)
  os.makedirs(output_dir, exist_ok=True)
  data_lib.write_json(os.path.join(output_dir, "comparison.json"), {
      "columns": cols, "counts": counts, "model": configs["ipo"].model.path,
      "reward_model": configs["reward_model"].model.path if "reward_model" in configs else None,
      "wall_time_s": {m: s["wall_time_s"] for m, s in summaries.items()},
      "output_dirs": {m: c.output_dir for m, c in configs.items()}})
  data_lib.write_text(os.path.join(output_dir, "comparison.md"),
                      "# RewardBench: IPO and its baselines (accuracy, %)\n\nPairwise cells: unparsable verdicts "
                      "scored 0 / 0.5.\n\n" + text + "\n")
  return text, summaries


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", default="embedded", help="the model judged as IPO classifier and both judges")
  parser.add_argument("--reward-model", default="", help="a *ForSequenceClassification directory (optional)")
  parser.add_argument("--max_per_subset", type=int, default=3, help="pairs per subset; 0: all (the paper)")
  parser.add_argument("--subsets", default="", help="comma-separated subsets; empty: all")
  parser.add_argument("--judge_tokens", type=int, default=48, help="judge answer tokens (the paper: 200)")
  parser.add_argument("--max_prompt_tokens", type=int, default=2048, help="judge prompts are cut to this")
  parser.add_argument("--output_dir", default="runs/rb_baselines")
  args = parser.parse_args()
  configs = method_configs(args.model, args.output_dir, args.max_per_subset, args.judge_tokens, args.subsets,
                           args.reward_model, args.max_prompt_tokens)
  text, _ = compare(configs, args.output_dir)
  print(text)


if __name__ == "__main__":
  main()
