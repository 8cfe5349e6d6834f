"""The self-improvement experiment: the labelling arms side by side, one comparison table.

Each arm runs the self-improvement loop from the same initial model, prompts, split and sampling settings and
differs only in who labels the pairs (`ipo`: the model's own P(Yes); `self_reward`: its own 1-5 grade;
`reward_model`: an external sequence-classification reward model, with --reward_model; `random`: a control). The
table compares the final round of each arm: win rate against the initial model on the held-out prompts, the judge's
score, answer length (length hacking shows here), the policy's RewardBench score on a slice and the number of
pairs.

Local (embedded SmolLM2-135M-Instruct, the `local` size of configs/self_improve.py; about 5 minutes per arm on
2 CPU cores):

  python experiments/self_improvement.py --size local --output_dir runs/arms_local

At the paper's sizes on an accelerator, with any model the loader reads:

  python experiments/self_improvement.py --size paper --model <model> --output_dir runs/arms_paper \
      --reward_model <a *ForSequenceClassification directory>

Each arm's run is resumable (rerun the same command); the table goes to <output_dir>/arms.md and arms.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

from ipo_jax import data as data_lib
from ipo_jax import main as cli
from ipo_jax.evals import improvement
from ipo_jax.tasks import self_improve

COLUMNS = ("arm", "round", "win_rate", "judge_score", "mean_length", "rewardbench", "pairs", "dpo_loss",
           "dpo_accuracy")


def arm_config(size: str, arm: str, output_dir: str, model: str | None, rounds: int, reward_model: str = ""):
  config = cli.load_config(f"{REPO / 'configs' / 'self_improve.py'}:{f'{size},{arm}' if size else arm}")
  config.output_dir = os.path.join(output_dir, arm)
  config.rounds = rounds
  if model:
    config.model.path = model
  config.reward_model.path = reward_model
  return config


def compare_arms(size: str, arms: list[str], output_dir: str, model: str | None = None, rounds: int = 1,
                 reward_model: str = "") -> list[dict]:
  """Runs each arm and returns the final round's row of each, with the initial model's row first."""
  rows = []
  for arm in arms:
    summary = self_improve.run(arm_config(size, arm, output_dir, model, rounds, reward_model))
    if not rows:
      rows.append({**summary["rounds"][0], "arm": "initial"})
    rows.append(summary["rounds"][-1])
  data_lib.write_json(os.path.join(output_dir, "arms.json"), rows)
  with open(os.path.join(output_dir, "arms.md"), "w", encoding="utf-8") as f:
    f.write(improvement.markdown_table(rows, COLUMNS))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--size", default="local", choices=("local", "paper", ""))
  parser.add_argument("--arms", default="", help="comma-separated; default: every arm (reward_model only with "
                      "--reward_model)")
  parser.add_argument("--reward_model", default="", help="a *ForSequenceClassification directory (reward_model arm)")
  parser.add_argument("--model", default=None, help="model path or id (default: the config's, embedded)")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--output_dir", default="runs/arms")
  args = parser.parse_args()
  os.makedirs(args.output_dir, exist_ok=True)
  arms = args.arms.split(",") if args.arms else [a for a in self_improve.ARMS
                                                 if a != "reward_model" or args.reward_model]
  rows = compare_arms(args.size, arms, args.output_dir, args.model, args.rounds, args.reward_model)
  print(improvement.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
  main()
