"""The aot jobs: the task's own programs compiled for a TPU slice from this CPU host, their FLOP model and the
settings tried until a job fits."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from ipo_jax import sharding
from ipo_jax.aot import collectives, hlo, hlo_module, jobs, targets
from ipo_jax.ipo import planner, programs
from ipo_jax.model import presets
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.sample import engine

TINY = ModelConfig("llama", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                   num_kv_heads=4, head_dim=32, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def v5e():
  target = targets.parse("tpu:v5e:2x2")
  return target, target.devices()


def _compile(lowerable, target):
  return hlo.compile_and_analyze(lowerable.lower(), target)


def test_model_flops_by_hand():
  job = jobs.Job("score", (1, 4, 1), rows=8, length=256)
  d, f, hd, layers, v = 256, 512, 32, 4, 4096
  matmul = layers * (d * hd * (2 * 8 + 2 * 4) + 3 * d * f)
  per_token = 2 * matmul + 4 * layers * 8 * hd * 128  # attention over half the row on average
  assert jobs.model_flops(TINY, job) == pytest.approx(8 * (256 * per_token + 2 * d * v))
  dpo = dataclasses.replace(job, program="dpo")
  forward = 8 * 2 * (256 * per_token + 256 * 2 * d * v)
  assert jobs.model_flops(TINY, dpo) == pytest.approx(3 * forward)
  assert jobs.model_flops(TINY, dataclasses.replace(job, program="dpo_lora")) == pytest.approx(2 * forward)
  assert jobs.model_flops(TINY, dpo, on_the_fly_reference=True) == pytest.approx(4 * forward)
  reward = dataclasses.replace(job, program="reward")  # the one-label head at one position per row
  assert jobs.model_flops(TINY, reward) == pytest.approx(8 * (256 * per_token + 2 * d))
  assert float(planner.flops(TINY, 1, 128)) == per_token


def test_candidate_meshes_and_escalations():
  assert jobs.candidate_meshes(16, TINY) == [(1, 16, 1), (2, 8, 1), (1, 8, 2), (2, 4, 2), (1, 4, 4), (2, 2, 4),
                                             (1, 2, 8), (2, 1, 8)]
  assert jobs.round_rows(10, (2, 4, 1)) == 16 and jobs.round_rows(16, (1, 4, 1), grad_accum=2) == 16
  # A training step's micro-batch may hold fewer rows than data x fsdp (it splits over its sequence).
  assert jobs.round_rows(6, (2, 4, 1), grad_accum=2, sequence_split=True) == 6
  assert jobs.round_rows(10, (1, 4, 1), grad_accum=2, sequence_split=True) == 16
  tried = [(j.remat_label, j.grad_accum) for j in jobs.escalations(jobs.Job("dpo", (1, 4, 1), 16, 128))]
  assert tried == [("off", 1), ("minimal", 1), ("full", 1), ("full", 2), ("full", 4), ("full", 8)]
  minimal = jobs.Job("dpo", (1, 4, 1), 16, 128, remat=True, remat_policy="minimal")
  assert [j.key for j in jobs.escalations(minimal)][:2] == ["dpo[1x4x1,remat=minimal,accum=1,rows=16]",
                                                             "dpo[1x4x1,remat=full,accum=1,rows=16]"]
  assert [j.key for j in jobs.escalations(jobs.Job("score", (1, 4, 1), 16, 128))] == ["score[1x4x1,rows=16]"]


def test_scoring_memory_is_the_sharded_weights(v5e):
  """Compiled for v5e 2x2 with fsdp=4, the scoring program's arguments are the weights split four ways (plus the
  token ids), and its peak stays within the weights plus the activations of one layer's batch."""
  target, devices = v5e
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  analysis = _compile(programs.lowerable(TINY, mesh, jnp.bfloat16, "plain", 8, 256), target)
  weights = jobs.parameter_count(TINY) * 2
  ids = 2 * 8 * 256 * 4 // 4 + 2 * 4
  assert analysis.memory["argument"] == pytest.approx(weights / 4 + ids, rel=0.02)
  assert analysis.fits and analysis.memory["total"] < weights  # the whole model never sits on one chip
  assert analysis.flops >= 0.9 * jobs.model_flops(TINY, jobs.Job("score", (1, 4, 1), 8, 256)) / 4


def _collectives(analysis) -> float:
  return sum(v.count for v in analysis.collectives.values())


def test_tpu_scoring_has_no_per_row_collective_loop(v5e):
  """Traced for a TPU mesh on this CPU host the program takes the accelerator attention path (the CPU path runs its
  rows one at a time): no loop but the layers', and its collectives per step (each weight gathered once per layer)
  do not grow with the rows or the sequence length."""
  target, devices = v5e
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  analyze = lambda rows, length: _compile(programs.lowerable(TINY, mesh, jnp.bfloat16, "plain", rows, length), target)
  analyses = {(rows, length): analyze(rows, length) for rows, length in ((8, 1024), (8, 2048), (16, 1024))}
  counts = {k: _collectives(a) for k, a in analyses.items()}
  assert len(set(counts.values())) == 1, counts
  weights_per_layer = 7
  assert counts[(8, 1024)] <= 3 * weights_per_layer * TINY.num_layers + 8
  assert [loop["trip_count"] for loop in analyses[(16, 1024)].loops] == [TINY.num_layers]  # the layers only


def test_too_large_is_reported_with_its_bytes(v5e):
  """Llama-3.1-70B's weights alone (141 GB in bf16) cannot fit four 16 GiB chips: not fitting, with the bytes."""
  target, devices = v5e
  cfg = presets.model_config("preset:llama-3.1-70b")
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  analysis = _compile(programs.lowerable(cfg, mesh, jnp.bfloat16, "plain", 4, 128), target)
  assert not analysis.fits
  assert analysis.memory["total"] > jobs.parameter_count(cfg) * 2 / 4 > target.hbm_bytes


def test_dpo_step_for_tpu_uses_bf16_and_shards_the_optimizer(v5e):
  """`compute_dtype=auto` resolves to the mesh's platform (bf16 on TPU), and the fp32 weights and Adam moments are
  split four ways: arguments = (4 + 4 + 4) bytes x params / 4 + the batch."""
  target, devices = v5e
  config = ml_collections.ConfigDict({
      "model": {"dtype": "bfloat16"},
      "dpo": dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="precomputed"),
      "train": dict(compute_dtype="auto", remat=False, vocab_chunk=8192),
      "lora": dict(rank=0), "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1,
                                          weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)})
  job = jobs.Job("dpo", (1, 4, 1), rows=4, length=128)
  mesh = jobs.mesh_for(job, devices)
  assert jobs.dpo_settings(config, job, sharding.platform(mesh)).compute_dtype == "bfloat16"
  analysis = _compile(jobs.lowerable(config, TINY, job, mesh), target)
  params = jobs.parameter_count(TINY)
  assert analysis.memory["argument"] == pytest.approx(12 * params / 4, rel=0.05)
  kinds = {k for k, v in analysis.collectives.items() if v.count}
  assert "all-gather" in kinds and kinds & {"all-reduce", "reduce-scatter"}


def test_platform_follows_the_mesh(v5e):
  _, devices = v5e
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  assert sharding.platform(mesh) == "tpu" and sharding.platform(sharding.make_mesh()) == "cpu"
  seen = []
  with jax.set_mesh(mesh):
    jax.jit(lambda x: seen.append(sharding.platform()) or x).lower(jax.ShapeDtypeStruct((4,), jnp.float32))
  assert seen == ["tpu"]


def test_largest_fitting_by_doubling_and_bisection():
  calls = []

  def fits(rows):
    calls.append(rows)
    return rows <= 44

  assert jobs.largest_fitting(fits, 4, 256) == 44
  assert calls[:5] == [4, 8, 16, 32, 64] and len(calls) <= 10
  assert jobs.largest_fitting(lambda r: True, 4, 30) == 28
  assert jobs.largest_fitting(lambda r: False, 4, 30) == 0


def test_an_async_collective_threaded_through_fusions_counts_once(v5e):
  """The TPU compiler progresses an in-flight collective across several fusions (one channel, a copy of the
  instruction in each fusion it runs in): in the sampling program each layer weight's gather is threaded this way.
  Each channel is one collective, run as often as its least frequent copy."""
  target, devices = v5e
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  sampling = engine.SamplingConfig(max_new_tokens=8, num_samples=2)
  compiled = engine.lowerable(TINY, mesh, jnp.bfloat16, sampling, 8, 64).lower().compile()
  module = hlo_module.parse_module(compiled.as_text())
  copies = collections.defaultdict(list)
  for _, i, runs in module.instructions():
    if i.opcode.removesuffix("-start") in collectives.COLLECTIVES and i.attr(r"channel_id=(\d+)"):
      copies[i.attr(r"channel_id=(\d+)")].append(runs)
  threaded = {channel: runs for channel, runs in copies.items() if len(runs) > 2}
  assert len(threaded) >= TINY.num_layers, copies
  found = collectives.collectives(module)
  with_channel = [c for c in found if c.name in {i.name for _, i, _ in module.instructions()
                                                 if i.attr(r"channel_id=(\d+)")}]
  assert len(with_channel) == len(copies)
  assert sorted(c.runs for c in with_channel) == sorted(min(r) for r in copies.values())

def test_sft_step_compiles_with_the_dpo_steps_state_and_one_sequence_per_row(v5e):
  """The SFT step is the trainer's step with SFT's batch ([accum, rows, T] and a weight per row): the same fp32
  weights and Adam moments split four ways, half the tokens of a DPO step of as many pairs, a third of the FLOPs per
  token of forward + backward."""
  target, devices = v5e
  config = ml_collections.ConfigDict({
      "model": {"dtype": "bfloat16"},
      "train": dict(compute_dtype="auto", remat=False, vocab_chunk=8192), "lora": dict(rank=0),
      "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                    eps=1e-8, max_grad_norm=1.0)})
  job = jobs.Job("sft", (1, 4, 1), rows=4, length=128)
  assert job.tokens == 4 * 128 and "remat=off" in job.key
  assert jobs.model_flops(TINY, job) == pytest.approx(jobs.model_flops(TINY, dataclasses.replace(job, program="dpo")) / 2)
  mesh = jobs.mesh_for(job, devices)
  settings = jobs.dpo_settings(config, job, sharding.platform(mesh))
  assert settings.objective == "sft" and settings.compute_dtype == "bfloat16"
  analysis = _compile(jobs.lowerable(config, TINY, job, mesh), target)
  assert analysis.memory["argument"] == pytest.approx(12 * jobs.parameter_count(TINY) / 4, rel=0.05)
  assert [j.remat_label for j in jobs.escalations(job)][:3] == ["off", "minimal", "full"]


def test_offload_remat_reports_its_host_memory(v5e):
  """Remat policy "offload" keeps the projections' outputs in host memory: the step compiled for v5e 2x2 allocates
  host buffers for them (reported, not timed), which "minimal" keeps on the device; a CPU mesh refuses it."""
  config = ml_collections.ConfigDict({
      "model": {"dtype": "bfloat16"}, "train": dict(compute_dtype="auto", remat=True, vocab_chunk=8192),
      "lora": dict(rank=0), "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1,
                                          weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)})
  rows = {}
  for policy in ("minimal", "offload"):
    job = jobs.Job("sft", (1, 4, 1), rows=8, length=256, remat=True, remat_policy=policy)
    target, devices = v5e
    rows[policy] = _compile(jobs.lowerable(config, TINY, job, jobs.mesh_for(job, devices)), target)
  assert rows["minimal"].host_offload_bytes == 0 and rows["offload"].host_offload_bytes > 0
  assert any("offloaded to host memory" in note for note in rows["offload"].notes)
  # At least every projection's bf16 output for each of a device's 512 tokens and 4 layers goes to the host.
  d, f, kv = TINY.hidden_size, TINY.intermediate_size, TINY.num_kv_heads * TINY.head_dim
  projections = d + 2 * kv + d + 2 * f + d  # q, k, v, o, gate, up, down
  assert projections * 2 * 512 * 4 <= rows["offload"].host_offload_bytes < 4 * projections * 2 * 512 * 4
  config.train.remat_policy = "offload"
  with pytest.raises(ValueError, match="train.remat_policy='offload' .* TPU or GPU mesh"):
    jobs.dpo_settings(config, dataclasses.replace(job, remat_policy="offload"), "cpu")
