"""Named mesh, logical-axis sharding rules and sharding helpers.

Mesh axes: `data` (pure data parallelism), `fsdp` (batch and parameter sharding), `tensor` (heads / MLP width /
vocabulary). Arrays name their dimensions by logical axes (MaxText style): parameters in ipo_jax/model/params.py,
activations and the KV cache in ipo_jax/model/transformer.py. `LOGICAL_RULES`, the one table here, maps them to mesh
axes. A dimension that its mesh axes do not divide stays unsharded on them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import logical_to_mesh_axes
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.model import params as params_lib

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order (flax semantics): a dimension takes its mesh axes only when no earlier
# rule gave them to another dimension of the same array. So the residual stream's `embed` of an activation stays
# whole (`batch` already holds fsdp), while a parameter's `embed` is split over fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("head_vocab", ("fsdp", "tensor")),  # the LM head's rows (untied) and the logits of a few positions per row
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


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices: Sequence[Any] | None = None,
              slice_axis: str = "data") -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices (default: all on fsdp).

  Devices are laid out by the chip network (`mesh_utils.create_device_mesh`): on TPU the fsdp and tensor axes follow
  the torus, on GPU hosts stay contiguous. Devices of several slices (TPU multi-slice: each device's
  `slice_index`) make a hybrid mesh whose `slice_axis` (data by default, or fsdp) spans the slices over the data-center
  network and every other axis stays within a slice.
  """
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
  return Mesh(_device_grid(sizes, devices, slice_axis), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _device_grid(sizes: list[int], devices: list[Any], slice_axis: str) -> np.ndarray:
  """The devices as an array of `sizes`, placed by the physical network (list order where it has no topology)."""
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    if slice_axis not in ("data", "fsdp"):
      raise ValueError(f"mesh.slice_axis must be data or fsdp, got {slice_axis!r}")
    axis = AXES.index(slice_axis)
    if sizes[axis] % slices:
      raise ValueError(f"the devices span {slices} slices: mesh.shape.{slice_axis}={sizes[axis]} (mesh.slice_axis) "
                       f"must be a multiple of {slices}")
    dcn = [slices if i == axis else 1 for i in range(len(sizes))]
    ici = [s // d for s, d in zip(sizes, dcn)]
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # a topology the helper does not map: list order
    return np.asarray(devices).reshape(sizes)


def platform(mesh: Any = None) -> str:
  """"cpu", "gpu" or "tpu": the platform of `mesh`'s devices (a Mesh or AbstractMesh); without one, of the mesh set
  with `jax.set_mesh` (also while tracing, so a program traced for a TPU mesh on a CPU host makes TPU decisions);
  without that, of the default device (mesh-less calls on the host)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if isinstance(mesh, Mesh):
    name = mesh.devices.flat[0].platform
  elif mesh is not None and not mesh.empty and getattr(mesh, "abstract_device", None) is not None:
    name = mesh.abstract_device.platform
  else:
    name = jax.devices()[0].platform
  return "gpu" if name in ("cuda", "rocm", "gpu") else name


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


def rows_spec(mesh: Any, shape: Sequence[int], row_axis: int = 0, length_axis: int | None = None) -> P:
  """Where a batch array goes: dim `row_axis` (its rows) over the batch axes (data, fsdp) when they divide it; else,
  when the array has a sequence dim `length_axis` they divide, that dim (activations split over the sequence: a
  micro-batch of fewer rows than data x fsdp); else whole."""
  size = math.prod(mesh.shape[a] for a in BATCH)
  spec: list[Any] = [None] * len(shape)
  if shape[row_axis] % size == 0:
    spec[row_axis] = BATCH
  elif length_axis is not None and shape[length_axis] % size == 0:
    spec[length_axis] = BATCH
  return P(*spec)


def context_mesh() -> Any:
  """The (data, fsdp, tensor) mesh set with `jax.set_mesh`, as traced code sees it; None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or not set(AXES) <= set(mesh.axis_names) else mesh


def sequence_split(rows: int, length: int) -> bool:
  """Whether activations of `rows` x `length` tokens split over the sequence under the mesh set with `jax.set_mesh`
  (`rows_spec`): the batch axes do not divide the rows but do divide the length."""
  mesh = context_mesh()
  return mesh is not None and rows_spec(mesh, (rows, length), 0, 1)[1] is not None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` to the logical `axes` under the mesh set with `jax.set_mesh`; a no-op without one.
  An activation with both `batch` and `length` whose rows the batch axes do not divide is split over its sequence
  instead where they divide that (`rows_spec`)."""
  mesh = context_mesh()
  if mesh is None:
    return x
  spec = list(_fit(logical_spec(axes), x.shape, mesh))
  if "batch" in axes and "length" in axes:
    b, t = axes.index("batch"), axes.index("length")
    if rows_spec(mesh, (x.shape[b], x.shape[t]), 0, 1)[1] is not None:
      spec[b], spec[t] = None, BATCH
  return jax.lax.with_sharding_constraint(x, P(*spec))


# XLA options of the programs compiled for a mesh, by its platform (`jit`). TPU: FSDP weights are all-gathered and
# weight gradients summed whole per layer (each overlapped with compute) rather than streamed through windowed
# einsums ("collective matmuls"), whose per-shard dots contract or produce only two shards' width at a time.
# Compiled for a v5e 4x4 with fsdp=16, Llama-3.1-8B scoring's gate/up projections ran at 41% of peak that way;
# without, its estimated step fell from 740 to 462 ms and a DPO step's (remat minimal) from 1144 to 790 ms
# (`experiments/bench/pod.py`).
COMPILER_OPTIONS = {"tpu": {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                            "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}}


def compiler_options(mesh: Any) -> dict[str, Any]:
  return dict(COMPILER_OPTIONS.get(platform(mesh), {}))


def jit(fn: Any, mesh: Any, **kwargs: Any) -> Any:
  """`jax.jit(fn, **kwargs)` (explicit in/out shardings on `mesh`) with the mesh's platform's compiler options: the
  one way the engines compile a program for a mesh, so the tasks and the `aot` task compile the same program."""
  return jax.jit(fn, compiler_options=compiler_options(mesh) or None, **kwargs)


def to_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from host data that every process holds in full (each device takes its slice)."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def abstract(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
  """An argument of a program compiled ahead of time: its shape, dtype and placement."""
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def abstract_tree(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for a pytree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda x, s: abstract(x.shape, x.dtype, s), shapes, shardings)


def abstract_params(cfg: Any, dtype: Any, mesh: Mesh) -> Any:
  """The model's parameters as ShapeDtypeStructs placed as `param_shardings` places real ones."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), params_lib.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  return abstract_tree(shapes, param_shardings(shapes, mesh))


class Lowerable(NamedTuple):
  """A jitted program and abstract arguments to lower it with (static ones included): `lower()` traces it under its
  mesh, so every decision (attention path, dtypes) is the mesh's platform's."""

  name: str
  fn: Any
  args: tuple
  mesh: Mesh

  def lower(self) -> Any:
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*self.args)
