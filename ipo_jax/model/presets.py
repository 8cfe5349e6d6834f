"""Model presets: the published `config.json` of common models, usable without downloading anything.

`model.path=preset:<name>` (e.g. `preset:llama-3.1-8b-instruct`) loads a model of that architecture with seeded
random weights and no tokenizer: enough to size a job by ahead-of-time compilation and to benchmark it, never to
score or generate text. Each preset is one JSON file in `presets/` holding the published fields, `_source` naming
the Hugging Face repository they come from; Gemma 3 4B/27B are the text part (`text_config`) of their multimodal
config. `ALIASES` adds short names (`gemma-2-9b` is `gemma-2-9b-it`) and the base models of the instruct ones
(`llama-3.1-8b`: same shapes, its own published `_source`, eos ids and context length).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ipo_jax import sharding
from ipo_jax.model import params as params_lib, transformer
from ipo_jax.model.architecture import ModelConfig

PREFIX = "preset:"
PRESET_DIR = Path(__file__).with_name("presets")
_NOT_CONFIG_FIELDS = ("model_type",)  # passed to AutoConfig.for_model separately; "_..." keys are metadata

_LLAMA_BASE_EOS = {"eos_token_id": 128001}
_QWEN_BASE_EOS = {"eos_token_id": 151643}
# alias -> (preset file it shares shapes with, the published fields of the alias that differ from that file).
# Without a `_source` override the alias is the same model (a short name); with one, the base model's config.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama-3.2-1b-instruct", {"_source": "meta-llama/Llama-3.2-1B", **_LLAMA_BASE_EOS}),
    "llama-3.2-3b": ("llama-3.2-3b-instruct", {"_source": "meta-llama/Llama-3.2-3B", **_LLAMA_BASE_EOS}),
    "llama-3.1-8b": ("llama-3.1-8b-instruct", {"_source": "meta-llama/Llama-3.1-8B", **_LLAMA_BASE_EOS}),
    "llama-3.1-70b": ("llama-3.1-70b-instruct", {"_source": "meta-llama/Llama-3.1-70B", **_LLAMA_BASE_EOS}),
    "qwen2.5-0.5b": ("qwen2.5-0.5b-instruct", {"_source": "Qwen/Qwen2.5-0.5B", **_QWEN_BASE_EOS,
                                               "max_window_layers": 24}),
    "qwen2.5-1.5b": ("qwen2.5-1.5b-instruct", {"_source": "Qwen/Qwen2.5-1.5B", **_QWEN_BASE_EOS,
                                               "max_position_embeddings": 131072, "sliding_window": 131072,
                                               "max_window_layers": 28}),
    "qwen2.5-7b": ("qwen2.5-7b-instruct", {"_source": "Qwen/Qwen2.5-7B", **_QWEN_BASE_EOS,
                                           "max_position_embeddings": 131072}),
    "qwen2.5-72b": ("qwen2.5-72b-instruct", {"_source": "Qwen/Qwen2.5-72B", **_QWEN_BASE_EOS,
                                             "max_position_embeddings": 131072, "max_window_layers": 80,
                                             "rms_norm_eps": 1e-05}),
    "gemma-2-2b": ("gemma-2-2b-it", {}),
    "gemma-2-9b": ("gemma-2-9b-it", {}),
    "gemma-2-27b": ("gemma-2-27b-it", {}),
    "gemma-3-1b": ("gemma-3-1b-it", {}),
    "gemma-3-4b": ("gemma-3-4b-it", {}),
    "gemma-3-27b": ("gemma-3-27b-it", {}),
}


def _files() -> dict[str, Path]:
  return {p.stem: p for p in sorted(PRESET_DIR.glob("*.json"))}


def names() -> list[str]:
  """Every preset name (files and aliases), sorted."""
  return sorted({*_files(), *ALIASES})


def _unknown(name: str) -> ValueError:
  return ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(names())} "
                    f"(write model.path={PREFIX}<name>)")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> dict[str, Any]:
  file_name, overrides = ALIASES.get(name, (name, {}))
  path = _files().get(file_name)
  if path is None:
    raise _unknown(name)
  with open(path, encoding="utf-8") as f:
    return {**json.load(f), **overrides}


def fields(name: str) -> dict[str, Any]:
  """The published config.json fields of preset `name` (`_source`: the repository they come from)."""
  return json.loads(json.dumps(_read(preset_name(name))))  # a fresh copy: callers may edit it


def source(name: str) -> str:
  """The Hugging Face repository whose config.json preset `name` holds."""
  return _read(preset_name(name))["_source"]


def is_preset(path: Any) -> bool:
  """Whether a model path names a preset (`preset:<name>`)."""
  return isinstance(path, str) and path.startswith(PREFIX)


def preset_name(path: str) -> str:
  """The preset name of a `preset:<name>` path; an unknown name is a ValueError listing the valid ones."""
  name = path[len(PREFIX):] if is_preset(path) else path
  _read(name)
  return name


def hf_config(name: str) -> Any:
  """The transformers config of preset `name` (`AutoConfig.for_model` on its published fields)."""
  import transformers  # pylint: disable=import-outside-toplevel
  values = _read(preset_name(name))
  kwargs = {k: v for k, v in values.items() if not k.startswith("_") and k not in _NOT_CONFIG_FIELDS}
  return transformers.AutoConfig.for_model(values["model_type"], **json.loads(json.dumps(kwargs)))


def model_config(name: str) -> ModelConfig:
  """The `ModelConfig` of preset `name` (or of a `preset:<name>` path)."""
  return ModelConfig.from_hf(hf_config(name))


def num_params(cfg: ModelConfig) -> int:
  """Total parameter count of a model of `cfg` (every tensor of `params.param_shapes`)."""
  leaves = jax.tree_util.tree_leaves(params_lib.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  return sum(math.prod(shape) for shape in leaves)


def _draw(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: float) -> jax.Array:
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02
                ) -> transformer.Params:
  """As `transformer.init_params` (normal(0, scale) matrices and biases, norms at identity), drawing a stacked
  [layers, ...] parameter one layer at a time (`lax.map`), so its random bits never need more than one layer's
  slice of memory. Parameter i draws from fold_in(key, i), layer l of it from fold_in(that, l)."""
  shapes = params_lib.param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  out = []
  with jax.threefry_partitionable(True):  # bits depend only on the key, not on the sharding
    for i, (path, shape) in enumerate(leaves):
      k = jax.random.fold_in(key, i)
      if str(getattr(path[-1], "key", path[-1])).endswith("norm"):
        out.append(jnp.full(shape, 1.0 - cfg.norm_offset, dtype))
      elif str(getattr(path[0], "key", path[0])) == "layers":
        out.append(jax.lax.map(lambda l, k=k, s=shape[1:]: _draw(jax.random.fold_in(k, l), s, dtype, scale),
                               jnp.arange(shape[0])))
      else:
        out.append(_draw(k, shape, dtype, scale))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=16)
def init_fn(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32) -> Callable:
  """`key -> params`: `init_params` jitted with the parameters' shardings on `mesh` as its output shardings, so
  each device draws only its own slices (threefry is partitionable): no full tensor ever sits on one device."""
  structs = jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), params_lib.param_shapes(cfg),
                                   is_leaf=lambda x: isinstance(x, tuple))
  return jax.jit(lambda key: init_params(cfg, key, dtype), out_shardings=sharding.param_shardings(structs, mesh))


def random_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32, seed: int = 0
                  ) -> transformer.Params:
  """Seeded random parameters (see `init_params`) created in their shardings on `mesh`."""
  return init_fn(cfg, mesh, dtype)(jax.random.key(seed))


# Tasks that can run on a preset model; every other task reads text and so needs a tokenizer.
PRESET_TASKS = ("model_info", "aot")


def check_task(path: Any, task: Any) -> None:
  """A preset given to a task that reads text is refused in one line (before any weight is made)."""
  if is_preset(path) and task not in PRESET_TASKS:
    raise ValueError(f"{no_tokenizer_message(path)} (task {task!r} reads text)")


def no_tokenizer_message(path: str) -> str:
  """The one-line error for a task that needs a tokenizer but was given a preset."""
  return (f"model.path={path} has shapes and random weights only, no tokenizer; use it for aot sizing and "
          "benchmarks")
