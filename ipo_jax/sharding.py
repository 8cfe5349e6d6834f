"""Named mesh, logical-axis sharding rules and sharding helpers.

Mesh axes: `data` (pure data parallelism), `fsdp` (batch and parameter sharding), `tensor` (heads / MLP width /
vocabulary). Arrays name their dimensions by logical axes (MaxText style): parameters in ipo_jax/model/params.py,
activations and the KV cache in ipo_jax/model/transformer.py. `LOGICAL_RULES`, the one table here, maps them to mesh
axes. A dimension that its mesh axes do not divide stays unsharded on them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax.linen import logical_to_mesh_axes
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.model import params as params_lib

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order (flax semantics): a dimension takes its mesh axes only when no earlier
# rule gave them to another dimension of the same array. So the residual stream's `embed` of an activation stays
# whole (`batch` already holds fsdp), while a parameter's `embed` is split over fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),  # query heads (in parameters: heads x head_dim features)
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),  # the residual-stream width of a parameter matrix
    ("lora_in", "fsdp"),  # LoRA A's input features
    ("lora_out", "tensor"),  # LoRA B's output features
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("norm", None),  # residual-width vectors: norm scales, the o bias
    ("labels", None),
    ("lora_rank", None),
)
_LOGICAL = dict(LOGICAL_RULES)
BATCH = _LOGICAL["batch"]


def logical_spec(axes: Sequence[str | None]) -> P:
  """The mesh PartitionSpec of an array whose dims have these logical axes (None: unsharded)."""
  unknown = [a for a in axes if a is not None and a not in _LOGICAL]
  if unknown:
    raise ValueError(f"unknown logical axes {unknown}; known: {list(_LOGICAL)}")
  return logical_to_mesh_axes(tuple(axes), LOGICAL_RULES)


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
  _check_mesh_sizes(sizes, len(devices), devices[0].platform if devices else "none")
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // math.prod(s for s in sizes if s != -1)
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _check_mesh_sizes(sizes: list[int], count: int, platform: str) -> None:
  """The asked axis sizes must multiply to the device count (one -1 takes the rest); a ValueError says how many
  devices there are and which axes asked for how many."""
  asked = ", ".join(f"mesh.shape.{a}={s}" for a, s in zip(AXES, sizes))
  fix = (f"set mesh.shape so the sizes multiply to {count} (one axis may be -1 to take the remaining devices), "
         "with --config.mesh.shape.<axis>=<n>")
  bad = [f"mesh.shape.{a}={s}" for a, s in zip(AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"{', '.join(bad)}: a mesh axis size must be a positive number or -1; {fix}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1 ({asked}); {fix}")
  known = math.prod(s for s in sizes if s != -1)
  if (count % known if -1 in sizes else known != count):
    needs = f"a multiple of {known}" if -1 in sizes else str(known)
    raise ValueError(f"the mesh needs {needs} devices ({asked}) but there {'is' if count == 1 else 'are'} "
                     f"{count} {platform} device{'' if count == 1 else 's'}; {fix}")


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Any) -> P:
  """Drops mesh axes that do not divide their dimension."""
  out = []
  for dim, axis in zip(shape, spec):
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axis if names and dim % size == 0 and size > 1 else None)
  return P(*out)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
  """Partition spec of one parameter (or LoRA adapter) from its logical axes."""
  return _fit(logical_spec(params_lib.logical_axes(path, len(shape))), shape, mesh)


def path_str(path: tuple) -> str:
  """A pytree key path as "/"-joined keys ("layers/q")."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def param_shardings(shapes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of parameters or adapters (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, spec_for(path_str(p), x.shape, mesh)), shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows split over the batch axes, the other `ndim - 1` dims whole."""
  return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1)))


def batch_multiple(mesh: Mesh) -> int:
  """Batch sizes must be a multiple of this to split over the batch axes (data, fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` to the logical `axes` under the mesh set with `jax.set_mesh`; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _fit(logical_spec(axes), x.shape, mesh))


def to_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from host data that every process holds in full (each device takes its slice)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
