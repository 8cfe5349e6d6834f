"""What one compiled program needs on a target: per-device memory (and whether it fits), FLOPs counted through while
loops, collectives by kind, and estimated compute / collective / step seconds (the time model: `METHOD`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

from ipo_jax.aot import collectives, hlo_module
from ipo_jax.aot.targets import Target

_RING = {"all-gather": lambda n: n - 1, "reduce-scatter": lambda n: (n - 1) / n,
         "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
         "collective-permute": lambda n: 1.0, "collective-broadcast": lambda n: 1.0}
_DCN = {"ALL_REDUCE": lambda s: 2 * (s - 1) / s, "ALL_GATHER": lambda s: s - 1,
        "REDUCE_SCATTER": lambda s: (s - 1) / s}
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

METHOD = """\
Time model (an estimate from the compiled program, not a measurement; per device):
- compute: on TPU the compiler's estimated cycles of every kernel x the runs of its computation (while-loop trip
  counts multiplied through) / the chip clock, plus max(FLOPs / peak, bytes / HBM bandwidth) for custom kernels that
  state a cost instead, and for fused attention kernels (splash, cuDNN), which state none: their causal blocks'
  FLOPs from their shapes (an optimistic charge); on GPU (or a TPU module without cycle estimates) the roofline max(matmul FLOPs / peak dense
  bf16 FLOP/s, HBM traffic / HBM bandwidth). `compute_method` says which.
- HBM traffic: bytes every kernel reads and writes in HBM (on-chip arrays excluded; a fused read through a slice
  counts the slice, an in-place update the update), x trip counts: an estimate (`memory_seconds` = traffic / bandwidth).
- collectives: ring algorithm bytes per device: all-gather and reduce-scatter (n-1)/n of the full array, all-reduce
  2(n-1)/n, all-to-all (n-1)/n, collective-permute all of it; over the one-direction bandwidth per device within a
  slice / host (ICI, NVLink), or the data-center network (DCN, InfiniBand) for a group spanning slices / hosts.
  Multi-slice TPU programs send cross-slice data as DCN transfers: all-reduce 2(S-1)/S of the bytes over S slices,
  all-gather S-1, reduce-scatter (S-1)/S. Latency and link topology are ignored: a lower bound.
- step: `step_seconds` = max(compute, collectives) (compute and communication overlap perfectly; used for MFU);
  `step_seconds_no_overlap` = their sum. MFU = model FLOPs per step / (devices x peak x step_seconds).
- FLOPs: dots, convolutions, cuBLAS gemms, kernels stating their cost and fused attention kernels, x trip counts; elementwise work is not
  counted. XLA's cost_analysis (`flops_cost_analysis`) counts each loop body once.
- memory: argument + output - alias + temp + generated code, against the compiler's usable HBM per device; a compile
  refused with RESOURCE_EXHAUSTED reports the bytes the compiler said it needed. Activations offloaded to host
  memory (remat policy "offload") are reported (`host_offload_bytes`) but their transfers are not timed.
"""


@dataclasses.dataclass
class CollectiveSummary:
  """All collectives of one kind: `bytes` per device summed over runs (an all-gather's result, the operand
  otherwise), `traffic_bytes` what a ring moves per device, `cross_slice` how many cross slices / hosts."""
  count: float = 0.0
  bytes: float = 0.0
  traffic_bytes: float = 0.0
  seconds: float = 0.0
  group_sizes: list[int] = dataclasses.field(default_factory=list)
  cross_slice: float = 0.0


@dataclasses.dataclass
class Analysis:
  """One program on one target; every byte, FLOP and second is per device. `compiled` is False when the compiler
  refused the program for memory (then only `fits`, `needed_bytes`, `limit_bytes` and `error` are known)."""
  target: str
  compiled: bool
  fits: bool
  needed_bytes: int  # argument + output - alias + temp + generated code (or the compiler's stated need)
  limit_bytes: int
  memory: dict[str, int] = dataclasses.field(default_factory=dict)
  flops: float | None = None
  flops_cost_analysis: float | None = None  # XLA's cost_analysis (loop bodies once); None where it has none (GPU)
  hbm_traffic_bytes: float | None = None  # bytes the kernels read and write in HBM, x trip counts (an estimate)
  host_offload_bytes: float = 0.0  # host-memory buffers (remat "offload"): written, then read back; not timed
  loops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  collectives: dict[str, CollectiveSummary] = dataclasses.field(default_factory=dict)
  compute_seconds: float | None = None
  compute_method: str = ""
  # TPU: where the estimated compute time goes (`top_kernels`): {"kernel", "share" of compute_seconds, "seconds",
  # "peak_fraction" (kernels with FLOPs)}, the largest first, then "all matmuls"
  top_kernels: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  memory_seconds: float | None = None  # hbm_traffic_bytes / HBM bandwidth
  collective_seconds: float | None = None
  step_seconds: float | None = None
  step_seconds_no_overlap: float | None = None
  compile_seconds: float | None = None
  num_devices: int = 0
  peak_flops: float = 0.0
  notes: list[str] = dataclasses.field(default_factory=list)
  error: str | None = None

  def mfu(self, model_flops_per_step: float, overlap: bool = True) -> float | None:
    """Model FLOPs per step (all devices together, e.g. 6 x params x tokens) over what the devices could do in
    the estimated step (`step_seconds`; the no-overlap sum when overlap=False)."""
    step = self.step_seconds if overlap else self.step_seconds_no_overlap
    if not step:
      return None
    return model_flops_per_step / (self.num_devices * self.peak_flops * step)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def analyze(compiled: Any, target: Target, devices: list[Any] | None = None) -> Analysis:
  """The Analysis of a compiled program (`jax.jit(...).lower(...).compile()`) for `target`. `devices`: the
  program's devices in partition order (default: from its input shardings), to tell which groups span slices."""
  mem = compiled.memory_analysis()
  memory = {key: int(getattr(mem, f"{key}_size_in_bytes", 0) or 0)
            for key in ("argument", "output", "alias", "temp", "generated_code")}
  needed = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
  memory["total"] = needed
  module = hlo_module.parse_module(compiled.as_text())
  out = Analysis(target.name, True, needed <= target.hbm_bytes, needed, target.hbm_bytes, memory,
                 num_devices=target.num_devices, peak_flops=target.peak_flops)
  out.flops = hlo_module.flops(module)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  out.flops_cost_analysis = float(cost["flops"]) if cost and "flops" in cost else None
  out.loops = [{"while": name, "trip_count": trip, "from": how} for name, trip, how in module.loops]
  if module.unknown_loops:
    out.notes.append(f"trip count unknown (counted once): {', '.join(module.unknown_loops)}")
  out.hbm_traffic_bytes = hlo_module.hbm_bytes(module)
  out.host_offload_bytes = hlo_module.host_buffer_bytes(module)
  if out.host_offload_bytes:
    out.notes.append(f"{out.host_offload_bytes / 2**30:.1f} GiB offloaded to host memory per step, written and "
                     "read back over the host link: not in the time estimate")
  out.memory_seconds = out.hbm_traffic_bytes / target.hbm_bytes_per_s
  out.compute_seconds, out.compute_method = _compute_seconds(module, target, out.flops, out.memory_seconds)
  out.top_kernels = top_kernels(module, target, out.compute_seconds)
  slices = _partition_slices(compiled, target, devices, module.num_partitions)
  out.collectives = _collectives(module, target, slices, out.notes)
  out.collective_seconds = sum(c.seconds for c in out.collectives.values())
  out.step_seconds = max(out.compute_seconds, out.collective_seconds)
  out.step_seconds_no_overlap = out.compute_seconds + out.collective_seconds
  return out


def compile_and_analyze(lowered: Any, target: Target, devices: list[Any] | None = None) -> Analysis:
  """`lowered.compile()` then `analyze`; a compile refused with RESOURCE_EXHAUSTED becomes an Analysis with
  compiled=False, fits=False and the bytes the compiler said it needed."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    needed, limit = parse_oom(message, target.hbm_bytes)
    return Analysis(target.name, False, False, needed, limit, {"total": needed}, num_devices=target.num_devices,
                    peak_flops=target.peak_flops, compile_seconds=time.perf_counter() - start,
                    error=message.strip().splitlines()[0][:2000])
  seconds = time.perf_counter() - start
  out = analyze(compiled, target, devices)
  out.compile_seconds = seconds
  return out


def parse_oom(message: str, default_limit: int) -> tuple[int, int]:
  """(needed bytes, limit bytes) from a RESOURCE_EXHAUSTED message: "... required for HLO temporaries (23.44G)
  exceeds available HBM (15.75G)" or "Used 20.52G of 15.75G hbm"; sizes in K/M/G/T are binary units. The need is
  0 when the message states none."""
  size = r"([\d.]+)\s*([KMGT]?)i?B?"
  for pattern in (rf"\({size}\) exceeds available \w+ \({size}\)", rf"[Uu]sed {size} of {size}"):
    m = re.search(pattern, message)
    if m:
      return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  return 0, default_limit


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


def _compute_seconds(module: hlo_module.Module, target: Target, flops: float,
                     memory_seconds: float) -> tuple[float, str]:
  cycles, kernels = hlo_module.estimated_cycles(module) if target.platform == "tpu" else (0.0, 0)
  if kernels and target.clock_hz:
    stated = sum(max(f / target.peak_flops, b / target.hbm_bytes_per_s) * runs
                 for f, b, runs in hlo_module.stated_kernels(module))
    return cycles / target.clock_hz + stated, "tpu-compiler-cycles"
  return max(flops / target.peak_flops, memory_seconds), "roofline: max(FLOPs / peak, HBM traffic / bandwidth)"


def top_kernels(module: hlo_module.Module, target: Target, compute_seconds: float, count: int = 6
                ) -> list[dict[str, Any]]:
  """Where the TPU compiler's estimated cycles go: the `count` kernel kinds (`hlo_module.kernel_label`) that take
  most, then "all matmuls" (every kernel with FLOPs); each with its share of the compute time and, where it has
  FLOPs, the fraction of the chip's peak FLOP/s it runs at. Empty where the compiler gives no estimates."""
  if target.platform != "tpu" or not target.clock_hz or not compute_seconds:
    return []
  cycles: dict[str, float] = collections.defaultdict(float)
  flops: dict[str, float] = collections.defaultdict(float)
  for inst, c, f in hlo_module.kernel_cycles(module):
    for label in (hlo_module.kernel_label(inst),) + (("all matmuls",) if f else ()):
      cycles[label] += c
      flops[label] += f

  def entry(label: str) -> dict[str, Any]:
    seconds = cycles[label] / target.clock_hz
    out = {"kernel": label, "share": seconds / compute_seconds, "seconds": seconds}
    if flops[label]:
      out["peak_fraction"] = flops[label] / (seconds * target.peak_flops)
    return out

  kinds = sorted((k for k in cycles if k != "all matmuls"), key=cycles.get, reverse=True)[:count]
  return [entry(k) for k in kinds] + ([entry("all matmuls")] if "all matmuls" in cycles else [])


def describe_top_kernels(kernels: list[dict[str, Any]], count: int = 2) -> str:
  """`top_kernels` in words: the `count` largest kinds and all matmuls, each with its share of the compute time and
  the fraction of peak it runs at ("btd,df->btf dot_general 43% at 79% of peak; ...")."""
  kinds = [k for k in kernels if k["kernel"] != "all matmuls"][:count] + [
      k for k in kernels if k["kernel"] == "all matmuls"]
  return "; ".join(f"{k['kernel']} {100 * k['share']:.0f}%" + (
      f" at {100 * k['peak_fraction']:.0f}% of peak" if "peak_fraction" in k else "") for k in kinds)


def _partition_slices(compiled: Any, target: Target, devices: list[Any] | None,
                      num_partitions: int) -> list[int] | None:
  """The slice / host of each partition id, when the program's devices are known and one per partition."""
  if target.slices == 1:
    return None
  if devices is None:
    try:
      assignments = [s._device_assignment for s in _leaves(compiled.input_shardings)  # pylint: disable=protected-access
                     if hasattr(s, "_device_assignment")]
      devices = list(max(assignments, key=len)) if assignments else None
    except Exception:  # pylint: disable=broad-except
      devices = None
  if not devices or len(devices) != num_partitions:
    return None
  return [target.slice_of(d) for d in devices]


def _leaves(tree: Any) -> list[Any]:
  if isinstance(tree, (list, tuple)):
    return [leaf for item in tree for leaf in _leaves(item)]
  if isinstance(tree, dict):
    return [leaf for item in tree.values() for leaf in _leaves(item)]
  return [tree]


def _collectives(module: hlo_module.Module, target: Target, slices: list[int] | None,
                 notes: list[str]) -> dict[str, CollectiveSummary]:
  out: dict[str, CollectiveSummary] = {}
  unknown = []
  for op in collectives.collectives(module):
    n = op.group_size or module.num_partitions
    if op.group_size is None:
      unknown.append(op.name)
    cross = bool(slices) and any(len({slices[i] for i in g if i < len(slices)}) > 1 for g in op.groups or [])
    full = op.bytes * (n if op.kind == "all-gather" else 1)
    traffic = op.bytes * _RING[op.kind](n) if n > 1 else 0.0
    bandwidth = target.dcn_bytes_per_s if cross else target.ici_bytes_per_s
    entry = out.setdefault(op.kind, CollectiveSummary())
    entry.count += op.runs
    entry.bytes += full * op.runs
    entry.traffic_bytes += traffic * op.runs
    entry.seconds += traffic * op.runs / bandwidth
    entry.cross_slice += op.runs if cross else 0.0
    if n not in entry.group_sizes:
      entry.group_sizes = sorted(entry.group_sizes + [n])
  for kind, size, runs in collectives.dcn_transfers(module):
    entry = out.setdefault(f"dcn-{kind.lower().replace('_', '-')}", CollectiveSummary())
    traffic = size * _DCN.get(kind, lambda s: 1.0)(target.slices)
    entry.count, entry.bytes = entry.count + runs, entry.bytes + size * runs
    entry.traffic_bytes += traffic * runs
    entry.seconds += traffic * runs / (target.dcn_bytes_per_s or target.ici_bytes_per_s)
    entry.cross_slice += runs
    entry.group_sizes = [target.slices]
  if unknown:
    notes.append(f"replica groups not understood (taken as all {module.num_partitions} partitions): "
                 f"{', '.join(unknown[:5])}")
  if target.slices > 1 and slices is None and target.platform == "gpu":
    notes.append("devices per partition unknown: every collective assumed within one host")
  return out
