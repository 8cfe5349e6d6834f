"""Analysis: memory and fit (a compile refused for memory included), the time model by hand, collectives over the
slice / host network or across it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.aot import Target, compile_and_analyze, hlo, parse_oom, targets
from ipo_jax.aot.targets import GiB

TPU_SKIP, GPU_SKIP = targets.libtpu_missing(), targets.cuda_plugin_missing()
needs_tpu = pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))
needs_gpu = pytest.mark.skipif(bool(GPU_SKIP), reason=str(GPU_SKIP))


def fsdp_step(target, layers=4, width=512, rows=64):
  """A data x fsdp sharded training step over a scan of matmul layers: gathers weights, reduces gradients."""
  devices = target.devices()
  mesh = Mesh(np.asarray(devices).reshape(2, len(devices) // 2), ("data", "fsdp"))

  def loss(w, x):
    def body(h, wi):
      return jnp.tanh(h @ jax.lax.with_sharding_constraint(wi, NamedSharding(mesh, P()))), None
    return jnp.mean(jax.lax.scan(body, x, w)[0].astype(jnp.float32) ** 2)

  def step(w, x):
    value, grad = jax.value_and_grad(loss)(w, x)
    return value, w - 0.1 * grad

  ws = NamedSharding(mesh, P(None, "fsdp", None))
  w = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=ws)
  x = jax.ShapeDtypeStruct((rows * len(devices), width), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
  return jax.jit(step, out_shardings=(NamedSharding(mesh, P()), ws)).lower(w, x)


@needs_tpu
def test_training_step_tpu():
  target = Target("tpu:v5e:2x2")
  a = compile_and_analyze(fsdp_step(target), target)
  assert a.compiled and a.fits and a.limit_bytes == int(15.75 * GiB)
  m = a.memory
  assert a.needed_bytes == m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  assert m["argument"] >= 4 * 512 * 512 * 2 // 2 + 64 * 512 * 2  # this device's weight shard and rows
  assert a.flops == 6 * 4 * 64 * 512 * 512  # forward + two backward matmuls per layer, this device's rows
  assert a.flops_cost_analysis < a.flops / 2  # XLA counts each loop body once
  assert [loop["trip_count"] for loop in a.loops] == [4, 4]
  assert a.compute_method == "tpu-compiler-cycles" and a.compute_seconds > a.flops / target.peak_flops
  assert a.memory_seconds == a.hbm_traffic_bytes / 819e9 and a.hbm_traffic_bytes >= m["argument"]
  assert {"all-gather", "all-reduce"} <= set(a.collectives) or {"all-gather", "reduce-scatter"} <= set(a.collectives)
  gather = a.collectives["all-gather"]
  assert gather.count == 4 and gather.bytes == 4 * 512 * 512 * 2  # each layer's whole weight, once per layer
  n = gather.group_sizes[0]
  assert gather.traffic_bytes == pytest.approx(gather.bytes * (n - 1) / n)
  assert gather.seconds == pytest.approx(gather.traffic_bytes / target.ici_bytes_per_s)
  assert a.collective_seconds == pytest.approx(sum(c.seconds for c in a.collectives.values()))
  assert a.step_seconds == max(a.compute_seconds, a.collective_seconds)
  assert a.step_seconds_no_overlap == pytest.approx(a.compute_seconds + a.collective_seconds)
  model_flops = 6 * 4 * 512 * 512 * 64 * 4
  assert a.mfu(model_flops) == pytest.approx(model_flops / (4 * 197e12 * a.step_seconds))
  assert a.to_dict()["collectives"]["all-gather"]["count"] == 4


@needs_tpu
def test_multislice_sends_cross_slice_data_over_dcn():
  target = Target("tpu:v5e:2x2:slices=2")
  a = compile_and_analyze(fsdp_step(target), target)
  dcn = a.collectives["dcn-all-reduce"]
  assert dcn.count >= 1 and dcn.cross_slice == dcn.count and dcn.group_sizes == [2]
  assert dcn.seconds == pytest.approx(dcn.traffic_bytes / target.dcn_bytes_per_s)
  assert dcn.traffic_bytes == pytest.approx(dcn.bytes * 2 * (2 - 1) / 2)
  assert all(c.cross_slice == 0 for kind, c in a.collectives.items() if not kind.startswith("dcn-"))


@needs_tpu
def test_too_large_for_v5e():
  target = Target("tpu:v5e:2x2")
  s = NamedSharding(Mesh(np.asarray(target.devices()[:1]), ("x",)), P())
  x = jax.ShapeDtypeStruct((2000, 1024, 1024), jnp.float32, sharding=s)  # 7.8 GiB in, 15.6 GiB out
  a = compile_and_analyze(jax.jit(lambda v: (v * 2, v + 1)).lower(x), target)
  assert not a.compiled and not a.fits and "RESOURCE_EXHAUSTED" in a.error
  assert a.needed_bytes > 16 * GiB and a.needed_bytes == pytest.approx(3 * 2000 * 4 * 2**20, rel=1e-3)
  assert a.limit_bytes == int(15.75 * GiB) and a.flops is None and a.mfu(1e12) is None
  assert a.memory == {"total": a.needed_bytes}


def test_parse_oom_forms():
  assert parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                   "(23.44G) exceeds available HBM (15.75G).", 1) == (int(23.44 * GiB), int(15.75 * GiB))
  assert parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                   "Used 20.52G of 15.75G hbm.", 1) == (int(20.52 * GiB), int(15.75 * GiB))
  assert parse_oom("RESOURCE_EXHAUSTED: out of memory", 7) == (0, 7)


def test_other_compile_errors_propagate():
  class Lowered:
    def compile(self):
      raise ValueError("INVALID_ARGUMENT: bad")
  with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
    compile_and_analyze(Lowered(), Target("tpu:v5e:2x2"))


@needs_gpu
def test_gpu_two_hosts_cross_host_collectives_over_infiniband():
  target = Target("gpu:h100x8x2")
  a = compile_and_analyze(fsdp_step(target), target)
  assert a.compiled and a.fits and a.flops == 6 * 4 * 64 * 512 * 512 and a.flops_cost_analysis is None
  assert a.compute_method.startswith("roofline") and a.memory_seconds == a.hbm_traffic_bytes / 3.35e12
  assert a.compute_seconds == max(a.flops / 989.4e12, a.memory_seconds)
  crossing = [c for c in a.collectives.values() if c.cross_slice]
  within = [c for c in a.collectives.values() if not c.cross_slice]
  assert crossing and within
  for c in crossing:
    assert c.seconds == pytest.approx(c.traffic_bytes / target.dcn_bytes_per_s)
  for c in within:
    assert c.seconds == pytest.approx(c.traffic_bytes / target.ici_bytes_per_s)


def test_ring_factors():
  assert [hlo._RING[k](4) for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")] == [
      3, 0.75, 1.5, 0.75]


@needs_gpu
def test_gpu_attention_is_cudnn_costed_by_its_shape():
  """On a GPU mesh a bf16 cache-less call attends with cuDNN's fused attention (`model.attention=auto`), forward
  and backward kernels once per layer, each charged its causal FLOPs (cuDNN states no cost)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from ipo_jax import sharding  # pylint: disable=import-outside-toplevel
  from ipo_jax.aot import hlo_module, jobs  # pylint: disable=import-outside-toplevel
  from ipo_jax.ipo import programs  # pylint: disable=import-outside-toplevel
  from ipo_jax.model.architecture import ModelConfig  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig("llama", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32)
  target = Target("gpu:h100x8")
  mesh = sharding.make_mesh({"fsdp": 8}, target.devices())

  def kernels(c, lowerable=None):
    lowerable = lowerable or programs.lowerable(c, mesh, jnp.bfloat16, "plain", 16, 200)
    module = hlo_module.parse_module(lowerable.lower().compile().as_text())
    return [(inst.name, runs, hlo_module.attention_kernel_cost(module, comp, inst))
            for comp, inst, runs in module.instructions() if inst.opcode == "custom-call"
            and hlo_module.attention_kernel_cost(module, comp, inst) is not None]

  found = kernels(cfg)
  assert [runs for _, runs, _ in found] == [cfg.num_layers], found
  queries = 2 * 200 * cfg.num_heads * cfg.head_dim  # per device: 2 rows
  assert found[0][2][0] == pytest.approx(2 * 2 * queries * 200 * 201 / 400)
  assert not kernels(dataclasses.replace(cfg, attention="xla"))
  config = ml_collections.ConfigDict({
      "model": {"dtype": "bfloat16"}, "dpo": dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                                 reference="precomputed"),
      "train": dict(compute_dtype="auto", remat=False, vocab_chunk=8192), "lora": dict(rank=0),
      "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                    eps=1e-8, max_grad_norm=1.0)})
  job = jobs.Job("sft", (1, 8, 1), rows=8, length=200)
  step = kernels(cfg, jobs.lowerable(config, cfg, job, jobs.mesh_for(job, target.devices())))
  backward = [cost for name, _, cost in step if "bwd" in name or "backward" in name.lower()]
  assert len(step) == 2 and len(backward) == 1 and backward[0][0] == pytest.approx(2.5 * found[0][2][0] / 2), step
