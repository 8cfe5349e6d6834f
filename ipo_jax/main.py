"""Command line: `python -m ipo_jax.main --config configs/<file>.py[:variant] [--config.a.b=value ...]`.

`config.task` picks what runs: `ipo_jax.tasks.<task>.run(config)`. Bad input (a wrong setting, bad data, a
missing file or source, an output_dir holding other results) stops with one line, `error: <message>`, and exit
status 2; `--traceback` (or `IPO_JAX_TRACEBACK=1`) shows the stack instead. Other exceptions keep their traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_flags

TASKS = ("model_info", "rewardbench", "rewardbench_self_reward", "rewardbench_pairwise", "rewardbench_reward_model",
         "rmbench", "generate", "sft", "dpo", "self_improve", "aot")
EXIT_INPUT_ERROR = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `:variant`.",
                                          lock_config=True)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the stack of an input error instead of one line "
                               "(also IPO_JAX_TRACEBACK=1).")


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


def _fail(message: str) -> NoReturn:
  """`error: <message>` on one line (stderr), exit status 2."""
  line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
  print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(EXIT_INPUT_ERROR)


def _reset_flags(argv: list[str]) -> None:
  """Forgets a previous parse (`main` may run several times in one process): the override flags
  (`--config.a.b`), registered from `sys.argv` when --config is parsed, and every flag's value."""
  for name in [n for n in list(flags.FLAGS) if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def _culprit(argv: list[str], message: str) -> str:
  """" --config.a.b" for the override a flag error is about (named in its message), else ""."""
  for arg in argv:
    name = arg.split("=", 1)[0]
    if name.startswith("--config.") and (name[2:] in message or message in name.split(".") or any(
        f"'{part}'" in message or f'"{part}"' in message for part in name.split(".")[1:])):
      return f" {name}"
  return ""


def parse_flags(argv: list[str]) -> None:
  """Parses --config and its overrides; a wrong field or value exits with a message naming it."""
  _config_root_importable(argv)
  saved_argv = sys.argv
  if argv is not sys.argv:  # the override flags are read from sys.argv
    _reset_flags(argv)
    sys.argv = list(argv)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace('\\"', '"')
    if isinstance(e, KeyError) and " " not in message:
      message = f"the config has no field {message!r}"
    _fail(f"invalid --config override{_culprit(argv, message)}: {message}")
  finally:
    sys.argv = saved_argv
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config configs/rewardbench.py")


# ----------------------------------------------------------------------------------------------------------------
# Settings checked before a task starts (so nothing is written for a run that cannot work).


def _sections(config: Any, prefix: str = ""):
  """(dotted key, section) of every ConfigDict in `config`, itself first."""
  yield prefix, config
  for key, value in config.items():
    if hasattr(value, "items") and hasattr(value, "get"):
      yield from _sections(value, f"{prefix}{key}.")


# A sampling section's sizes and ranges: key -> (test, what it must be).
SAMPLING_RULES = {
    "num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_prompt_tokens": (lambda v: v >= 0, "an integer >= 0 (0: the model's limit)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
}


def _check_sampling(section: Any, key: str) -> None:
  for name, (ok, what) in SAMPLING_RULES.items():
    value = section.get(name, None)
    if value is not None and not ok(value):
      raise ValueError(f"{key}.{name}={value!r} is out of range: it must be {what}; set --config.{key}.{name}")


def _check_output_dir(output_dir: str) -> None:
  """`output_dir` must be a directory (or creatable as one) that this process can write into."""
  path = os.path.abspath(os.path.expanduser(output_dir))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
    raise ValueError(f"output_dir {output_dir} {where}; set --config.output_dir to a directory")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"output_dir {output_dir} is not writable: cannot create a file in {existing} "
                     f"({e.strerror or e}); set --config.output_dir to a directory you can write to") from None


def check_config(config: Any) -> None:
  """Settings that are wrong whatever the data: sizes, sampling ranges, model dtype and path, the mesh, and
  whether output_dir can be written. Raises ValueError (FileNotFoundError for a missing model) naming the key."""
  from ipo_jax import runtime  # pylint: disable=import-outside-toplevel  # these import jax
  from ipo_jax.model import loading, presets  # pylint: disable=import-outside-toplevel
  from ipo_jax.model.architecture import check_attention  # pylint: disable=import-outside-toplevel
  for key, section in _sections(config):
    for name in ("batch_size", "max_batch"):
      value = section.get(name, None)
      if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError(f"{key}{name}={value} must be at least 1; set --config.{key}{name}=<n>")
    if key.endswith("sampling.") or key == "sampling.":
      _check_sampling(section, key[:-1])
  model = config.get("model", None)
  if model is not None and hasattr(model, "get"):
    loading.check_dtype(model.get("dtype", "float32"), "model.dtype")
    check_attention(model.get("attention", "auto"))
    if model.get("path", None):
      loading.check_model_path(model.path, allow_hub=bool(model.get("allow_hub", False)))
      presets.check_task(model.path, config.get("task"))
  if config.get("mesh", None) is not None and config.get("task") != "aot":  # aot: a mesh of the target's devices
    runtime.mesh_from_config(config, choose=False)  # (the shape is checked; mesh.auto chooses when the task runs)
  if isinstance(config.get("output_dir", None), str) and config.output_dir:
    _check_output_dir(config.output_dir)


def _input_errors() -> tuple[type[BaseException], ...]:
  """The project's own bad-input errors (DataError, IdentityMismatch and SourceUnavailable are among these)."""
  from ipo_jax import data, rundir, sources  # pylint: disable=import-outside-toplevel
  return ValueError, FileNotFoundError, data.DataError, rundir.IdentityMismatch, sources.SourceUnavailable


def main(argv: list[str] | None = None) -> None:
  parse_flags(sys.argv if argv is None else list(argv))
  show_stack = _TRACEBACK.value or os.environ.get("IPO_JAX_TRACEBACK", "") not in ("", "0")
  errors = _input_errors()
  config = _CONFIG.value
  try:
    if config.get("task") in TASKS:
      from ipo_jax import runtime  # pylint: disable=import-outside-toplevel
      runtime.maybe_initialize_distributed(config)
      check_config(config)
    run_task(config)
  except errors as e:
    if show_stack:
      raise
    _fail(str(e) or type(e).__name__)


if __name__ == "__main__":
  main()
