"""Command line: `python -m ipo_jax.main --config configs/<file>.py[:variant] [--config.a.b=value ...]`.

`config.task` picks what runs; each task is a `run(config)` function in its module.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

TASKS = {
    "model_info": "ipo_jax.model_info",
    "rewardbench": "ipo_jax.rewardbench",
    "rewardbench_self_reward": "ipo_jax.judge",
    "generate": "ipo_jax.generation",
    "dpo": "ipo_jax.trainer",
    "self_improve": "ipo_jax.self_improve",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `:variant`.",
                                          lock_config=True)


def run_task(config) -> object:
  """Runs `config.task`; an unknown task is an error listing the valid ones."""
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}")
  from ipo_jax import runtime
  runtime.maybe_initialize_distributed(config)
  return importlib.import_module(TASKS[task]).run(config)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/rewardbench.py")
  run_task(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
