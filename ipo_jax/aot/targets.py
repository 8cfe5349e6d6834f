"""Hardware targets for ahead-of-time compilation: `Target("tpu:v5e:4x4")` names the chips, how many, and the
published figures the analysis needs; `Target.devices()` returns the abstract (compile-only) devices.

Forms (see `FORMS`):
  tpu:<chip>:<topology>[:slices=<n>]   chip v4 | v5e | v5p | v6e; topology AxB (v5e, v6e) or AxBxC (v4, v5p), a
                                       topology libtpu knows (v5e:2x2 ... 16x16, v5p:2x2x1 ... 8x8x8, v4:2x2x1 ...);
                                       slices=n: n such slices joined by the data-center network (multi-slice)
  gpu:<chip>x<gpus per host>[x<hosts>] chip h100 (SXM) | h200; e.g. gpu:h100x8, gpu:h200x8x2 (2 hosts of 8 GPUs)

Every figure is per device (a TPU chip, a GPU) and named with its source in `SOURCES`. Bandwidths are one
direction's bytes per second (the egress a ring collective can use): half of a published bidirectional figure.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
from typing import Any

from ipo_jax import sources

GiB = 1 << 30

FORMS = ("tpu:<v4|v5e|v5p|v6e>:<topology>[:slices=<n>] (e.g. tpu:v5e:4x4, tpu:v5p:4x4x4, tpu:v5e:16x16:slices=2)",
         "gpu:<h100|h200>x<gpus per host>[x<hosts>] (e.g. gpu:h100x8, gpu:h200x8x2)")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-device figures of one accelerator (bytes, FLOP/s, bytes/s, Hz)."""
  platform: str
  hbm_bytes: int  # what the compiler treats as usable HBM (TPU: the compiler's limit; GPU: the target config)
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # within a slice (TPU ICI) or host (GPU NVLink), one direction, per device
  dcn_bytes_per_s: float | None  # across slices (TPU DCN) or hosts (GPU InfiniBand), one direction, per device
  clock_hz: float | None = None  # TPU: converts the compiler's estimated cycles to seconds
  dims: int = 0  # TPU topology rank (2: AxB, 3: AxBxC)
  spec_file: str = ""  # GPU: the source (ipo_jax/sources.py) of XLA's GpuTargetConfigProto text for the chip
  device_kind: str = ""  # what the abstract devices report


CHIPS: dict[str, Chip] = {
    "v4": Chip("tpu", int(30.75 * GiB), 275e12, 1200e9, 1.1e15 / 4096, None, 275e12 / (8 * 128 * 128 * 2), 3,
               device_kind="TPU v4"),
    "v5e": Chip("tpu", int(15.75 * GiB), 197e12, 819e9, 400e9 / 2, 6.4e12 / 8 / 256, 197e12 / (4 * 128 * 128 * 2), 2,
                device_kind="TPU v5 lite"),
    "v5p": Chip("tpu", int(95.74 * GiB), 459e12, 2765e9, 1200e9 / 2, 50e9 / 8, 459e12 / (8 * 128 * 128 * 2), 3,
                device_kind="TPU v5"),
    "v6e": Chip("tpu", int(31.25 * GiB), 918e12, 1638e9, 800e9 / 2, 4 * 200e9 / 8 / 8, 918e12 / (4 * 256 * 256 * 2),
                2, device_kind="TPU v6 lite"),
    "h100": Chip("gpu", 84942979072, 989.4e12, 3.35e12, 900e9 / 2, 400e9 / 8, spec_file="xla:h100_sxm_target_config",
                 device_kind="NVIDIA H100 80GB HBM3"),
    "h200": Chip("gpu", 151397597184, 989.4e12, 4.8e12, 900e9 / 2, 400e9 / 8, spec_file="xla:h200_target_config",
                 device_kind="NVIDIA H200 141GB HBM3e"),
}

SOURCES = """\
TPU (Google Cloud TPU documentation, system-architecture pages cloud.google.com/tpu/docs/<v4|v5e|v5p-training|v6e>):
  v4:  peak 275 TFLOP/s bf16; HBM2 32 GiB, 1200 GBps; 2 TensorCores x 4 MXUs (128x128); "All-reduce bandwidth per
       Pod 1.1 PB/s" over 4096 chips -> 268.6 GB/s per chip (no per-chip ICI figure is published); no DCN figure
       is published, so multi-slice v4 is refused.
  v5e: peak 197 TFLOP/s bf16; HBM2 16 GB, 819 GBps; 1 TensorCore x 4 MXUs; ICI 400 GBps bidirectional per chip;
       data-center network 6.4 Tbps per 256-chip Pod (2 x 100 Gbps NIC per 8-chip host) -> 25 Gbps per chip.
  v5p: peak 459 TFLOP/s bf16; HBM2e 95 GB, 2765 GBps; 2 TensorCores x 4 MXUs; ICI 1200 GBps bidirectional per
       chip; DCN 50 Gbps per chip.
  v6e: peak 918 TFLOP/s bf16; HBM 32 GB, 1638 GBps; ICI 800 GBps bidirectional per chip; per-host NIC 4 x 200 Gbps
       for 8 chips -> 100 Gbps per chip.
  Usable HBM: the limit the TPU compiler states in its RESOURCE_EXHAUSTED message (libtpu 0.0.42.1): v4 30.75G,
  v5e 15.75G, v5p 95.74G, v6e 31.25G (GiB).
  Clock (derived, not published): peak / (MXUs x MXU MACs per cycle x 2): v4 1.05 GHz, v5e 1.50 GHz, v5p 1.75 GHz;
  v6e 1.75 GHz assumes 4 MXUs of 256x256 per chip: the v6e page lists two 256x256 MXUs, which would mean 3.5 GHz,
  but then the compiler's own cycle estimate for an 8192^3 matmul (2,977,840 cycles) would exceed peak (140%).
GPU (NVIDIA datasheets; the XLA target configs for the compiler):
  H100 SXM (NVIDIA H100 Tensor Core GPU datasheet): BF16 Tensor Core 1,979 TFLOP/s with sparsity -> 989.4 dense;
       80 GB HBM3, 3.35 TB/s; NVLink 900 GB/s bidirectional per GPU.
  H200 SXM (NVIDIA H200 Tensor Core GPU datasheet): BF16 1,979 TFLOP/s with sparsity -> 989.4 dense; 141 GB HBM3e,
       4.8 TB/s; NVLink 900 GB/s.
  Across hosts (NVIDIA DGX H100 / DGX H200 datasheets): 8 x ConnectX-7 400 Gb/s InfiniBand per 8-GPU host -> 400 Gb/s
       per GPU.
  Memory: device_memory_size of XLA's target config (openxla/xla xla/backends/gpu/target_config/specs at a
       pinned commit, fetched through ipo_jax/sources.py); a JAX process preallocates 75% of it unless
       XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
"""

_TPU_RE = re.compile(r"^tpu:(?P<chip>[a-z0-9]+):(?P<topology>\d+(?:x\d+)*)(?::slices=(?P<slices>\d+))?$")
_GPU_RE = re.compile(r"^gpu:(?P<chip>[a-z]+\d+)x(?P<per_host>\d+)(?:x(?P<hosts>\d+))?$")


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target parsed from its name (`Target("tpu:v5e:4x4")`); every other field is derived from it."""
  name: str
  platform: str = dataclasses.field(init=False)  # "tpu" | "gpu" (the JAX device platform may say "cuda"/"gpu")
  chip: str = dataclasses.field(init=False)  # v4 | v5e | v5p | v6e | h100 | h200
  topology: str = dataclasses.field(init=False)  # TPU: "4x4"; GPU: the XLA topology "1x<hosts>x<gpus per host>"
  slices: int = dataclasses.field(init=False)  # TPU slices or GPU hosts (1: one slice / host)
  devices_per_slice: int = dataclasses.field(init=False)
  num_devices: int = dataclasses.field(init=False)
  device_kind: str = dataclasses.field(init=False)
  hbm_bytes: int = dataclasses.field(init=False)  # usable HBM per device
  peak_flops: float = dataclasses.field(init=False)
  hbm_bytes_per_s: float = dataclasses.field(init=False)
  ici_bytes_per_s: float = dataclasses.field(init=False)  # NVLink on GPU
  dcn_bytes_per_s: float | None = dataclasses.field(init=False)  # InfiniBand on GPU
  clock_hz: float | None = dataclasses.field(init=False)

  def __post_init__(self):
    fields = _parse(self.name)
    for key, value in fields.items():
      object.__setattr__(self, key, value)

  def unavailable(self) -> str | None:
    """Why this host cannot compile for the target (the compiler it needs is not installed), or None."""
    return libtpu_missing() if self.platform == "tpu" else cuda_plugin_missing()

  def devices(self) -> list[Any]:
    """The abstract devices of this target, in the order libtpu / the CUDA plugin lists them."""
    return list(_devices(self.platform, self.chip, self.topology, self.slices))

  def slice_of(self, device: Any) -> int:
    """The slice (TPU) or host (GPU) index of one of `devices()`."""
    if self.platform == "tpu":
      return int(getattr(device, "slice_index", 0) or 0)
    return int(device.process_index)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def parse(name: str) -> Target:
  """`Target(name)`; a ValueError lists the valid forms."""
  return Target(name)


def _parse(name: str) -> dict[str, Any]:
  tpu, gpu = _TPU_RE.match(name), _GPU_RE.match(name)
  match = tpu or gpu
  chip = CHIPS.get(match["chip"]) if match else None
  if chip is None or chip.platform != ("tpu" if tpu else "gpu"):
    raise ValueError(f"unknown target {name!r}; valid forms: {'; '.join(FORMS)}")
  if tpu:
    sizes = [int(s) for s in tpu["topology"].split("x")]
    slices = int(tpu["slices"] or 1)
    if len(sizes) != chip.dims or min(sizes) < 1 or slices < 1:
      raise ValueError(f"target {name!r}: a {tpu['chip']} topology has {chip.dims} sizes "
                       f"({'AxB' if chip.dims == 2 else 'AxBxC'}, each >= 1) and slices >= 1; "
                       f"valid forms: {'; '.join(FORMS)}")
    if slices > 1 and chip.dcn_bytes_per_s is None:
      raise ValueError(f"target {name!r}: no published data-center network figure for {tpu['chip']}; "
                       "use one slice or another chip")
    per_slice, topology = math.prod(sizes), tpu["topology"]
  else:
    per_slice, slices = int(gpu["per_host"]), int(gpu["hosts"] or 1)
    if not 1 <= per_slice <= 8 or slices < 1:
      raise ValueError(f"target {name!r}: 1 to 8 GPUs per host and at least 1 host; valid forms: {'; '.join(FORMS)}")
    topology = f"1x{slices}x{per_slice}"
  return dict(platform=chip.platform, chip=match["chip"], topology=topology, slices=slices,
              devices_per_slice=per_slice, num_devices=per_slice * slices, device_kind=chip.device_kind,
              hbm_bytes=chip.hbm_bytes,
              peak_flops=chip.peak_flops, hbm_bytes_per_s=chip.hbm_bytes_per_s, ici_bytes_per_s=chip.ici_bytes_per_s,
              dcn_bytes_per_s=chip.dcn_bytes_per_s, clock_hz=chip.clock_hz)


def normalise_platform(platform: str) -> str:
  """"tpu" for TPU devices; "gpu" for the CUDA / ROCm / "gpu" platform names JAX devices carry."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def real_tpu_host() -> bool:
  return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def quiet_plugins() -> None:
  """Call before JAX first initialises (Target.devices() does): where libtpu is installed on a host without TPU,
  name a small slice and this host so libtpu prints no initialisation errors, and let several processes load it
  (never on a TPU host or over the user's values); on a host without an NVIDIA GPU, skip the CUDA plugin's driver check (it would print an error
  and leave the plugin unregistered). JAX itself keeps running on the CPU."""
  if libtpu_missing() is None and not (real_tpu_host() or "TPU_ACCELERATOR_TYPE" in os.environ
                                      or "TPU_WORKER_HOSTNAMES" in os.environ):
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-4"
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not real_gpu_host():
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def real_gpu_host() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*"))


def libtpu_missing() -> str | None:
  """Why TPU targets cannot be compiled here (None when libtpu is installed)."""
  if importlib.util.find_spec("libtpu") is None:
    return 'TPU targets need libtpu: `make setup-dev` (requirements-dev.txt has libtpu==0.0.42.1)'
  return None


def cuda_plugin_missing() -> str | None:
  """Why GPU targets cannot be compiled here (None when the CUDA plugin is installed)."""
  if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    return ('GPU targets need the CUDA plugin: `make setup-gpu-aot` (a separate environment with '
            '`pip install "jax[cuda12]==0.10.2"`)')
  return None


@functools.lru_cache(maxsize=None)
def _devices(platform: str, chip: str, topology: str, slices: int) -> tuple[Any, ...]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if platform == "tpu":
    if libtpu_missing():
      raise RuntimeError(libtpu_missing())
    quiet_plugins()
    kwargs: dict[str, Any] = {"num_slices": slices} if slices > 1 else {}
    if chip == "v4":
      kwargs["chip_config_name"] = "megacore"
    return tuple(topologies.get_topology_desc(topology_name=f"{chip}:{topology}", platform="tpu", **kwargs).devices)
  missing = cuda_plugin_missing()
  if missing:
    raise RuntimeError(missing)
  quiet_plugins()
  config = sources.resolve(CHIPS[chip].spec_file).read_text()
  try:
    return tuple(topologies.get_topology_desc(platform="cuda", target_config=config, topology=topology).devices)
  except NotImplementedError:
    if real_gpu_host():
      raise
  # JAX initialised its backends before (the plugin failed its driver check then): register the plugin now.
  import jax_plugins.xla_cuda12 as cuda_plugin  # pylint: disable=g-import-not-at-top
  cuda_plugin.initialize()
  return tuple(topologies.get_topology_desc(platform="cuda", target_config=config, topology=topology).devices)
