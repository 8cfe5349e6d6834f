"""RewardBench: the IPO classifier (P(Yes)) against the self-rewarding 5-point judge, across models, one table.

For each model, the same RewardBench pairs are scored twice by the model itself: IPO (`ipo_jax.rewardbench`, the
paper's layout and per-subset prompts) and the self-rewarding judge (`ipo_jax.judge`, the paper's rubric). Both
runs resume from their output directories, so an interrupted comparison picks up where it stopped.

Local (embedded SmolLM2-135M-Instruct and Gemma 3 270M base, offline data, one pair per subset (23 pairs), judge
answers of at most 48 tokens; about 10 minutes on 2 CPU cores):

  python experiments/rewardbench_ipo_vs_self_reward.py --max_per_subset 1 --judge_tokens 48 \\
      --output_dir runs/rb_ipo_vs_self_reward_local

The paper's sizes (the whole filtered split, 2985 pairs; judge answers of up to 200 tokens), on an accelerator:

  python experiments/rewardbench_ipo_vs_self_reward.py --max_per_subset 0 --judge_tokens 200 \\
      --models embedded,gemma3-270m,<HF dir or hub id> --output_dir runs/rb_ipo_vs_self_reward

The table (RewardBench score, sections and the paper's categories, in %) goes to <output_dir>/comparison.md and
the summaries to <output_dir>/comparison.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

from ipo_jax import data as data_lib
from ipo_jax import main as cli
from ipo_jax.evals import rewardbench
from ipo_jax.tasks import rewardbench as rewardbench_task, rewardbench_self_reward

DATA = rewardbench.DEFAULT_HUB_ID  # its filtered split, through ipo_jax.sources (cache, hub, offline copy)


def _config(name: str, arg: str):
  return cli.load_config(f"{REPO / 'configs' / name}.py:{arg}")


def method_configs(model: str, output_dir: str, max_per_subset: int, judge_tokens: int, subsets: str = ""):
  """(IPO config, self-rewarding config) for `model`, on the same pairs, writing under `output_dir`/<method>."""
  configs = {"ipo": _config("rewardbench", "paper"), "self_reward": _config("rewardbench_self_reward", "paper")}
  for method, c in configs.items():
    c.model.path = model
    c.data.update(path=DATA, max_per_subset=max_per_subset, subsets=subsets)
    c.output_dir = os.path.join(output_dir, model.replace("/", "_"), method)
  configs["ipo"].scoring.progress = False
  configs["self_reward"].judge.progress = False
  configs["self_reward"].sampling.max_new_tokens = judge_tokens
  return configs["ipo"], configs["self_reward"]


def compare(models: list[str], output_dir: str, max_per_subset: int, judge_tokens: int, subsets: str = ""
            ) -> tuple[str, dict]:
  """Runs both methods on every model; returns the Markdown table and the summaries by column name."""
  summaries = {}
  for model in models:
    ipo_config, self_reward_config = method_configs(model, output_dir, max_per_subset, judge_tokens, subsets)
    summaries[f"{model}: IPO"] = rewardbench_task.run(ipo_config)
    summaries[f"{model}: self-reward"] = rewardbench_self_reward.run(self_reward_config)
  table = rewardbench.comparison_table(summaries)
  os.makedirs(output_dir, exist_ok=True)
  keep = ("score", "sections", "paper", "counts", "wall_time_s")
  data_lib.write_json(os.path.join(output_dir, "comparison.json"),
                      {name: {k: s[k] for k in keep} for name, s in summaries.items()})
  with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
    f.write("# RewardBench: IPO vs self-rewarding (%)\n\n" + table + "\n")
  return table, summaries


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--models", default="embedded,gemma3-270m", help="comma-separated model paths or ids")
  parser.add_argument("--max_per_subset", type=int, default=1, help="pairs per subset; 0: all (the paper)")
  parser.add_argument("--subsets", default="", help="comma-separated subsets; empty: all")
  parser.add_argument("--judge_tokens", type=int, default=48, help="judge answer tokens (the paper: 200)")
  parser.add_argument("--output_dir", default="runs/rb_ipo_vs_self_reward")
  args = parser.parse_args()
  table, _ = compare(args.models.split(","), args.output_dir, args.max_per_subset, args.judge_tokens, args.subsets)
  print(table)


if __name__ == "__main__":
  main()
