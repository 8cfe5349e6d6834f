"""Named mesh, partition rules and sharding helpers.

Mesh axes: `data` (pure data parallelism), `fsdp` (batch and parameter sharding), `tensor` (heads / MLP width /
vocabulary). The batch is split over (data, fsdp). A dimension that an axis does not divide stays unsharded on it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# (regex on the "/"-joined parameter path, spec of the trailing dims). Stacked layer params get a leading None.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embed$", ("tensor", "fsdp")),
    (r"^lm_head$", ("tensor", "fsdp")),
    (r"^score$", (None, "fsdp")),
    (r"layers/(q|k|v|gate|up)$", ("fsdp", "tensor")),
    (r"layers/(o|down)$", ("tensor", "fsdp")),
    (r"layers/(q|k|v)_bias$", ("tensor",)),
    (r"layers/o_bias$", (None,)),
    (r"(norm|_norm)$", (None,)),
    (r"lora_a$", ("fsdp", None)),
    (r"lora_b$", (None, "tensor")),
)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices (default: all on fsdp)."""
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    shape = {"fsdp": -1}
  if not isinstance(shape, dict):
    shape = dict(zip(AXES, shape))
  unknown = set(shape) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {AXES}")
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, {len(devices)} available")
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Any) -> P:
  """Drops mesh axes that do not divide their dimension."""
  out = []
  for dim, axis in zip(shape, spec):
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axis if names and dim % size == 0 and size > 1 else None)
  return P(*out)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
  """Partition spec of one parameter from `PARTITION_RULES`."""
  for pattern, trailing in PARTITION_RULES:
    if re.search(pattern, path):
      lead = (None,) * (len(shape) - len(trailing))
      return _fit(lead + tuple(trailing), shape, mesh)
  raise ValueError(f"no partition rule matches parameter {path!r}")


def path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(shapes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, spec_for(path_str(p), x.shape, mesh)), shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def batch_multiple(mesh: Mesh) -> int:
  """Batch sizes must be a multiple of this to split over (data, fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, spec: P) -> jax.Array:
  """`with_sharding_constraint` under the mesh set with `jax.set_mesh`; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _fit(spec, x.shape, mesh))


def to_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from host data that every process holds in full (each device takes its slice)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
