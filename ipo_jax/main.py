"""Command line: `python -m ipo_jax.main --config configs/<file>.py[:variant] [--config.a.b=value ...]`.

`config.task` picks what runs: `ipo_jax.tasks.<task>.run(config)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

TASKS = ("model_info", "rewardbench", "rewardbench_self_reward", "generate", "dpo", "self_improve")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `:variant`.",
                                          lock_config=True)


def run_task(config) -> object:
  """Runs `config.task`; an unknown task is an error listing the valid ones."""
  task = config.get("task")
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(TASKS))}")
  from ipo_jax import runtime
  runtime.maybe_initialize_distributed(config)
  return importlib.import_module(f"ipo_jax.tasks.{task}").run(config)


def _config_root_importable(argv: list[str]) -> None:
  """Config files import their shared sections as `configs.common`: the folder holding `configs/` of the file
  named by --config goes on the import path (the repository root, wherever the command runs from)."""
  for i, arg in enumerate(argv):
    path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and i + 1 < len(
        argv) else None
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":", 1)[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def load_config(spec: str) -> Any:
  """The ConfigDict of `path/to/configs/<file>.py[:arg]`, as `--config` builds it (for experiments, notebooks)."""
  _config_root_importable(["--config", spec])
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_ipo_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_flags(argv: list[str]) -> None:
  """Parses --config and its overrides; a wrong field or value exits with a message naming it."""
  _config_root_importable(argv)
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
