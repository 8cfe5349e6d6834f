"""Targets: names parsed into published figures, bad names refused, abstract devices from libtpu / the CUDA plugin."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.aot import targets
from ipo_jax.aot.targets import GiB, SOURCES, Target

GPU_SKIP = targets.cuda_plugin_missing()
TPU_SKIP = targets.libtpu_missing()
needs_tpu = pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))


@pytest.mark.parametrize("name,platform,chip,devices,slices,memory", [
    ("tpu:v5e:4x4", "tpu", "v5e", 16, 1, 15.75 * GiB),
    ("tpu:v5e:16x16:slices=2", "tpu", "v5e", 512, 2, 15.75 * GiB),
    ("tpu:v5p:4x4x4", "tpu", "v5p", 64, 1, 95.74 * GiB),
    ("tpu:v4:2x2x1", "tpu", "v4", 4, 1, 30.75 * GiB),
    ("tpu:v6e:4x4", "tpu", "v6e", 16, 1, 31.25 * GiB),
    ("gpu:h100x8", "gpu", "h100", 8, 1, 84942979072),
    ("gpu:h200x8", "gpu", "h200", 8, 1, 151397597184),
    ("gpu:h100x8x2", "gpu", "h100", 16, 2, 84942979072),
    ("gpu:h200x8x2", "gpu", "h200", 16, 2, 151397597184),
])
def test_parse(name, platform, chip, devices, slices, memory):
  t = Target(name)
  assert (t.platform, t.chip, t.num_devices, t.slices, t.hbm_bytes) == (platform, chip, devices, slices, int(memory))
  assert t.devices_per_slice * t.slices == t.num_devices
  assert t.peak_flops > 1e14 and t.hbm_bytes_per_s > 5e11 and t.ici_bytes_per_s > 1e11
  assert t == Target(name) and hash(t) == hash(Target(name))
  assert t.to_dict()["name"] == name and targets.parse(name) == t


def test_published_figures():
  v5e, h100, v5p = Target("tpu:v5e:2x2"), Target("gpu:h100x8x2"), Target("tpu:v5p:2x2x1")
  assert (v5e.peak_flops, v5e.ici_bytes_per_s, v5e.dcn_bytes_per_s) == (197e12, 200e9, 3.125e9)
  assert v5e.clock_hz == pytest.approx(1.503e9, rel=1e-3) and v5p.clock_hz == pytest.approx(1.751e9, rel=1e-3)
  assert (h100.peak_flops, h100.ici_bytes_per_s, h100.dcn_bytes_per_s) == (989.4e12, 450e9, 50e9)
  assert Target("gpu:h100x8").topology == "1x1x8" and h100.topology == "1x2x8"
  for chip in targets.CHIPS:
    assert re.search(rf"\b{chip}\b", SOURCES, re.IGNORECASE), chip
  assert "datasheet" in SOURCES and "cloud.google.com/tpu/docs" in SOURCES


@pytest.mark.parametrize("name", ["tpu:v5e:4x4x4", "tpu:v5p:4x4", "tpu:v9:2x2", "tpu:v5e", "gpu:a100x8", "gpu:h100x9",
                                  "gpu:h100", "tpu:v5e:2x2:slices=0", "h100x8", "tpu:v4:2x2x1:slices=2", ""])
def test_refuses(name):
  with pytest.raises(ValueError, match="valid forms|no published"):
    Target(name)


def test_normalise_platform():
  assert [targets.normalise_platform(p) for p in ("tpu", "cuda", "gpu", "rocm", "cpu")] == [
      "tpu", "gpu", "gpu", "gpu", "cpu"]


@needs_tpu
def test_tpu_devices():
  devices = Target("tpu:v5e:2x2").devices()
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  assert devices[0].device_kind == "TPU v5 lite"
  two = Target("tpu:v5e:2x2:slices=2")
  assert sorted(two.slice_of(d) for d in two.devices()) == [0] * 4 + [1] * 4
  for name in ("tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v4:2x2x1", "tpu:v6e:2x2"):
    t = Target(name)
    assert [d.device_kind for d in t.devices()] == [t.device_kind] * 4


def test_quiet_plugins_leaves_user_values_and_accelerator_hosts(monkeypatch):
  for key in ("TPU_WORKER_HOSTNAMES", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
  monkeypatch.setattr(targets, "real_gpu_host", lambda: True)
  targets.quiet_plugins()
  assert "TPU_WORKER_HOSTNAMES" not in targets.os.environ
  assert "JAX_SKIP_CUDA_CONSTRAINTS_CHECK" not in targets.os.environ
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
  monkeypatch.setattr(targets, "real_tpu_host", lambda: True)
  targets.quiet_plugins()
  assert "TPU_ACCELERATOR_TYPE" not in targets.os.environ
  monkeypatch.setattr(targets, "real_tpu_host", lambda: False)
  monkeypatch.setattr(targets, "real_gpu_host", lambda: False)
  monkeypatch.setattr(targets, "libtpu_missing", lambda: "no libtpu")  # nothing to quiet: no TPU variables
  targets.quiet_plugins()
  assert "TPU_ACCELERATOR_TYPE" not in targets.os.environ
  monkeypatch.setattr(targets, "libtpu_missing", lambda: None)
  targets.quiet_plugins()
  assert targets.os.environ["TPU_ACCELERATOR_TYPE"] == "v5litepod-4"
  assert targets.os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
  assert targets.os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"


@needs_tpu
@pytest.mark.parametrize("name", ["tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v4:2x2x1", "tpu:v6e:2x2"])
def test_clock_matches_compiler_cycles(name):
  """A 4096^3 bf16 matmul: the compiler's estimated cycles / the stated clock must give 50-100% of peak."""
  t = Target(name)
  sharding = NamedSharding(Mesh(np.asarray(t.devices()[:1]), ("x",)), P())
  a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=sharding)
  text = jax.jit(jnp.matmul).lower(a, a).compile().as_text()
  cycles = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', text))
  efficiency = 2 * 4096**3 / (cycles / t.clock_hz) / t.peak_flops
  assert 0.5 < efficiency <= 1.0, efficiency


@pytest.mark.skipif(bool(GPU_SKIP), reason=str(GPU_SKIP))
def test_gpu_devices():
  assert len(Target("gpu:h100x8").devices()) == 8
  two = Target("gpu:h200x8x2")
  devices = two.devices()
  assert len(devices) == 16 and targets.normalise_platform(devices[0].platform) == "gpu"
  assert {d.device_kind for d in devices} == {two.device_kind} == {"NVIDIA H200 141GB HBM3e"}
  assert sorted(two.slice_of(d) for d in devices) == [0] * 8 + [1] * 8
