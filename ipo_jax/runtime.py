"""Process-level set-up shared by every task: multi-host initialisation, the mesh, the model, logging."""

from __future__ import annotations

import os
from typing import Any

import jax

from ipo_jax import sharding

_INITIALIZED = False


def maybe_initialize_distributed(config: Any) -> None:
  """`jax.distributed.initialize` when `config.distributed` asks for it (or `$IPO_JAX_DISTRIBUTED=1`).

  `config.distributed` is a ConfigDict with `coordinator_address`, `num_processes`, `process_id` (empty/-1 means
  auto-detect, as on TPU pods and SLURM/Open MPI GPU clusters) and `enabled`.
  """
  global _INITIALIZED
  dist = config.get("distributed") if hasattr(config, "get") else None
  enabled = bool(dist and dist.get("enabled")) or os.environ.get("IPO_JAX_DISTRIBUTED") == "1"
  if not enabled or _INITIALIZED:
    return
  if dist and dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  kwargs = {}
  if dist:
    if dist.get("coordinator_address"):
      kwargs["coordinator_address"] = dist.coordinator_address
    if dist.get("num_processes", -1) > 0:
      kwargs["num_processes"] = dist.num_processes
    if dist.get("process_id", -1) >= 0:
      kwargs["process_id"] = dist.process_id
  jax.distributed.initialize(**kwargs)
  _INITIALIZED = True


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(*args: Any) -> None:
  """Prints on process 0 only."""
  if is_main_process():
    print(*args, flush=True)


def mesh_from_config(config: Any, choose: bool = True) -> jax.sharding.Mesh:
  """The mesh of `config.mesh`: its shape, or with `auto` (and `choose`) the one `ipo_jax.aot.chooser` picks by
  compiling the task's main program on candidate meshes."""
  section = config.get("mesh", {}) if hasattr(config, "get") else {}
  if section.get("auto", False) and choose:
    from ipo_jax.aot import chooser  # pylint: disable=import-outside-toplevel
    return chooser.choose_mesh(config, log=log)
  shape = section.get("shape")
  return sharding.make_mesh(dict(shape) if shape else None, slice_axis=section.get("slice_axis", "data"))


def load_model_from_config(config: Any, mesh: jax.sharding.Mesh | None = None):
  """Loads `config.model` (path, dtype, allow_hub) onto `mesh` (default: from `config.mesh`); a `preset:` path (random
  weights, no tokenizer) only for the tasks in `presets.PRESET_TASKS`."""
  from ipo_jax.model import presets
  from ipo_jax.model.loading import load_model
  presets.check_task(config.model.path, config.get("task") if hasattr(config, "get") else None)
  mesh = mesh or mesh_from_config(config)
  return load_model(config.model.path, dtype=config.model.get("dtype", "float32"), mesh=mesh,
                    allow_hub=bool(config.model.get("allow_hub", False)),
                    attention=config.model.get("attention", "auto"))


def model_config_from_config(config: Any):
  """The `ModelConfig` of `config.model` (path, allow_hub, attention) without reading weights."""
  from ipo_jax.model import loading
  return loading.model_config(config.model.path, allow_hub=bool(config.model.get("allow_hub", False)),
                              attention=config.model.get("attention", "auto"))
