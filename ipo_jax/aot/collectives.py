"""Collectives in an optimized HLO module: their kind, bytes, device groups (every replica-group form XLA prints) and
how often they run; and the cross-slice sends of multi-slice TPU programs (data-center network transfers)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from ipo_jax.aot.hlo_module import Computation, Instruction, Module, balanced

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "collective-broadcast")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: `bytes` is its operands' size per device (an all-gather's input shard)."""
  kind: str
  name: str
  bytes: int
  groups: list[list[int]] | None  # partition ids (None: the form was not understood)
  runs: float

  @property
  def group_size(self) -> int | None:
    return len(self.groups[0]) if self.groups else None


def collectives(module: Module) -> list[Collective]:
  """Every collective, its async -start form counted once (its -done skipped). Instructions sharing a
  `channel_id` are one collective: the TPU compiler's async collective fusion threads one in-flight collective
  through several fusions (e.g. the LM head's weight gather progressed across every layer of the scan), each
  holding a copy of the instruction (same channel, kind, shape and groups); it runs as often as its least frequent
  copy. The TPU compiler emits a reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion (each device
  keeping its slice of the sum, in one kernel): that is a reduce-scatter, its bytes the summed input."""
  out: dict[object, Collective] = {}
  for comp, inst, mult in module.instructions():
    base = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
    base = "all-to-all" if base == "ragged-all-to-all" else base
    if base == "all-reduce" and reduce_scatter_fusion(comp):
      base = "reduce-scatter"
    if base in COLLECTIVES:
      size = sum(a.bytes for name in inst.operands for a in module.shape_of(comp, name))
      channel = inst.attr(r"channel_id=(\d+)")
      groups = inst.attr(r"(replica_groups=\S+|source_target_pairs=\S+)")
      key = (channel, base, str([(a.dtype, a.dims) for a in inst.shapes]), groups) if channel else inst.name
      if key not in out or mult < out[key].runs:
        out[key] = Collective(base, inst.name, size, replica_groups(inst, module.num_partitions), mult)
  return list(out.values())


def reduce_scatter_fusion(comp: Computation) -> bool:
  """Whether `comp` is the body of a TPU reduce-scatter: an `all-reduce-scatter` fusion (its all-reduce followed by
  each device's dynamic slice of the result)."""
  return comp.name.lstrip("%").startswith("all-reduce-scatter")


def dcn_transfers(module: Module) -> list[tuple[str, int, float]]:
  """(transfer type, bytes, runs) of the cross-slice (multi-slice TPU, data-center network) sends."""
  out = []
  for comp, inst, mult in module.instructions():
    kind = inst.attr(r'_xla_megascale_transfer_type="(\w+)"')
    if inst.opcode == "send" and kind:
      out.append((kind, sum(a.bytes for a in module.shape_of(comp, inst.operands[0])), mult))
  return out


def replica_groups(inst: Instruction, num_partitions: int) -> list[list[int]] | None:
  """The device groups of a collective as lists of partition ids: explicit `{{0,1},{2,3}}`, iota
  `[2,4]<=[4,2]T(1,0)`, mesh-axes `mesh['a'=2,'b'=4] {'b'}`, or a permute's source-target pairs."""
  pairs = inst.attr(r"source_target_pairs=\{(.*?)\}\}")
  if pairs is not None:
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{?(\d+,\d+)", pairs)]
  text = inst.attr(r"replica_groups=(\S.*)")
  if text is None or text.startswith("{}"):
    return [list(range(num_partitions))]
  if text.startswith("{"):
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]+)\}", text[:balanced(text, 0)])]
  iota = re.match(r"\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", text)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    return _iota(iota.group(2)).reshape(shape[0], -1).tolist()
  mesh = re.match(r"mesh\[([^\]]*)\](?:, device_ids=\((.*?)\))? \{([^}]*)\}", text)
  if mesh:
    axes = [(a, int(s)) for a, s in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))]
    names = [a for a, _ in axes]
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(3)) if a in names]
    total = math.prod(s for _, s in axes)
    ids = _iota(mesh.group(2)) if mesh.group(2) else np.arange(total)
    ids = ids.reshape([s for _, s in axes])
    rest = [i for i in range(len(axes)) if i not in chosen]
    size = math.prod(axes[i][1] for i in chosen)
    return ids.transpose(rest + chosen).reshape(-1, size).tolist()
  return None


def _iota(text: str) -> np.ndarray:
  """`[4,2]T(1,0)` (iota reshaped, transposed, flattened) or `0,2,1,3` (explicit ids)."""
  m = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if not m:
    return np.asarray([int(x) for x in text.split(",")])
  dims = [int(x) for x in m.group(1).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(2):
    ids = ids.transpose([int(x) for x in m.group(2).split(",")])
  return ids.reshape(-1)
