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


def parse_flags(argv: list[str]) -> None:
  """Parses --config and its overrides; a wrong field or value exits with a message naming it."""
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace('\\"', '"')
    sys.exit(f"error: invalid --config override: {message}")
  if len(rest) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(rest[1:])}")
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config configs/rewardbench.py")


def main(argv: list[str] | None = None) -> None:
  parse_flags(sys.argv if argv is None else argv)
  from ipo_jax import sources  # pylint: disable=import-outside-toplevel
  try:
    run_task(_CONFIG.value)
  except sources.SourceUnavailable as e:  # no copy of the data anywhere: one line with the fixes
    sys.exit(f"error: {e}")
  except ValueError as e:
    if str(e).startswith("unknown task"):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  main()
