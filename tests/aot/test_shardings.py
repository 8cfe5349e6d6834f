"""The collective pattern of the tasks' programs compiled for a TPU v5e 2x2 (fsdp=4): weight gradients
reduce-scattered to their shards, and scoring never moving the vocabulary table whole."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import pytest

from ipo_jax import sharding
from ipo_jax.aot import collectives, hlo_module, jobs, targets
from ipo_jax.ipo import programs
from ipo_jax.model import params as params_lib
from ipo_jax.model.architecture import ModelConfig

TPU_SKIP = targets.libtpu_missing()
pytestmark = pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))

TINY = ModelConfig("llama", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                   num_kv_heads=4, head_dim=32, max_position_embeddings=4096)
TIED = dataclasses.replace(TINY, tie_embeddings=True)
TABLE_SHARD = TINY.vocab_size * TINY.hidden_size * 2 // 4  # one device's quarter of the bf16 [V, D] table
TRAIN = ml_collections.ConfigDict({
    "model": {"dtype": "bfloat16"},
    "dpo": dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="precomputed"),
    "train": dict(compute_dtype="auto", remat=False, vocab_chunk=8192), "lora": dict(rank=0),
    "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                  eps=1e-8, max_grad_norm=1.0)})


@pytest.fixture(scope="module")
def devices():
  return targets.parse("tpu:v5e:2x2").devices()


def _collectives(lowerable) -> list[collectives.Collective]:
  return collectives.collectives(hlo_module.parse_module(lowerable.lower().compile().as_text()))


@pytest.mark.parametrize("cfg", [TINY, TIED], ids=["untied", "tied"])
def test_dpo_gradients_are_reduce_scattered(devices, cfg):
  """Each layer's weight gradients are summed straight into their fsdp shards, once per layer of the backward scan
  (fp32: the gradient of the fp32 weights), and so is the embedding table's; no all-reduce moves more than the
  step's scalars."""
  job = jobs.Job("dpo", (1, 4, 1), rows=4, length=128)
  found = _collectives(jobs.lowerable(TRAIN, cfg, job, jobs.mesh_for(job, devices)))
  layer = sum(s[1] * s[2] for p, s in params_lib.flat_shapes(cfg).items() if p.startswith("layers/") and len(s) == 3)
  scattered = [c for c in found if c.kind == "reduce-scatter"]
  assert any(c.runs == cfg.num_layers and c.bytes == 4 * layer for c in scattered), scattered
  assert any(c.runs == 1 and c.bytes >= TABLE_SHARD for c in scattered), scattered  # the embedding table's
  assert max((c.bytes for c in found if c.kind == "all-reduce"), default=0) < 16 * 1024, found


@pytest.mark.parametrize("cfg", [TINY, TIED], ids=["untied", "tied"])
def test_scoring_never_gathers_the_table(devices, cfg):
  """IPO scoring needs two vocabulary rows and one log-sum-exp at one position per row: each device takes its
  vocabulary slice's logits for every row (the rows gathered: [B, D]). An untied LM head is stored split over its
  vocabulary and does not move at all; a tied table (split over its width for the embedding lookup) is resharded by
  one all-to-all of its shard (a quarter of what a gather moves to each device). Nothing gathers the table."""
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  found = _collectives(programs.lowerable(cfg, mesh, jnp.bfloat16, "plain", 8, 128))
  table_sized = [c for c in found if c.bytes > TABLE_SHARD // 2]  # layer weights and the rows are smaller
  assert [c.kind for c in table_sized] == ([] if cfg is TINY else ["all-to-all"]), table_sized
  outside_layers = [c for c in found if c.kind == "all-gather" and c.runs == 1]
  assert sum(c.bytes for c in outside_layers) <= 8 * TINY.hidden_size * 2, outside_layers  # the scored rows

def test_untied_lm_head_is_split_over_its_vocabulary(devices):
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices)
  shapes = params_lib.param_shapes(TINY)
  assert sharding.spec_for("lm_head", shapes["lm_head"], mesh) == sharding.P(("fsdp", "tensor"), None)
  assert sharding.spec_for("embed", shapes["embed"], mesh) == sharding.P("tensor", "fsdp")


def test_tpu_weights_gathered_per_layer_not_streamed(devices):
  """On a TPU mesh the engines compile with `sharding.compiler_options`: each FSDP weight is all-gathered once per
  layer, with no windowed einsum (collective-permutes streaming weight shards through the matmuls), which the
  compiler picks for layers this wide without the options."""
  cfg = ModelConfig("llama", vocab_size=4096, hidden_size=2048, intermediate_size=8192, num_layers=2, num_heads=16,
                    num_kv_heads=4, head_dim=128, max_position_embeddings=4096)
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  assert sharding.compiler_options(mesh) and not sharding.compiler_options(sharding.make_mesh())
  found = _collectives(programs.lowerable(cfg, mesh, jnp.bfloat16, "plain", 8, 1024))
  kinds = {c.kind for c in found}
  assert "collective-permute" not in kinds, found
  per_layer = [c for c in found if c.kind == "all-gather" and c.runs == cfg.num_layers]
  assert len(per_layer) == 7, per_layer  # q, k, v, o, gate, up, down


def _attention_kernels(lowerable) -> list[tuple[str, float, float]]:
  """(kernel name, runs, FLOPs the estimator charges) of every fused attention kernel of a compiled program."""
  module = hlo_module.parse_module(lowerable.lower().compile().as_text())
  found = []
  for comp, inst, runs in module.instructions():
    cost = hlo_module.attention_kernel_cost(module, comp, inst) if inst.opcode == "custom-call" else None
    if cost is not None:
      found.append((inst.name, runs, cost[0]))
  return found


def test_tpu_attention_is_splash_costed_by_its_blocks(devices):
  """On a TPU mesh a cache-less call attends with splash attention (`model.attention=auto`): scoring runs its
  forward kernel once per layer, and the estimator charges it the causal blocks' FLOPs of its per-device shape (the
  kernel states no cost); with attention=xla there is no kernel. A training step also runs the two backward ones."""
  mesh = sharding.make_mesh({"fsdp": 4}, devices)
  kernels = _attention_kernels(programs.lowerable(TINY, mesh, jnp.bfloat16, "plain", 8, 384))
  assert [(runs, "fwd" in name) for name, runs, _ in kernels] == [(TINY.num_layers, True)], kernels
  queries = 2 * TINY.num_heads * 384 * TINY.head_dim  # per device: 2 rows
  assert kernels[0][2] == 2 * 2 * queries * 384 * (3 + 1) / (2 * 3)  # 3 blocks of 128: 6 of 9 block pairs
  assert not _attention_kernels(programs.lowerable(dataclasses.replace(TINY, attention="xla"), mesh, jnp.bfloat16,
                                                   "plain", 8, 384))
  job = jobs.Job("sft", (1, 4, 1), rows=4, length=256)
  step = _attention_kernels(jobs.lowerable(TRAIN, TINY, job, jobs.mesh_for(job, devices)))
  roles = sorted(r for name, _, _ in step for r in ("fwd", "dq", "dkv") if f"_{r}_" in name)
  assert roles == ["dkv", "dq", "fwd"], step


def test_a_micro_batch_smaller_than_the_batch_axes_splits_over_its_sequence(devices):
  """A training step of 2 sequences per micro-batch on fsdp=4: the batch goes over its tokens (the input's last
  dim), and each device runs about a quarter of the one-device program's matmul FLOPs, not a replica of it."""
  job = jobs.Job("sft", (1, 4, 1), rows=2, length=256)
  compiled = jobs.lowerable(TRAIN, TINY, job, jobs.mesh_for(job, devices)).lower().compile()
  batch = compiled.input_shardings[0][-1]
  assert batch["input_ids"].spec == sharding.P(None, None, sharding.BATCH)
  one = dataclasses.replace(job, mesh_shape=(1, 1, 1))
  single = jobs.lowerable(TRAIN, TINY, one, jobs.mesh_for(one, devices[:1])).lower().compile()
  per_device, whole = (hlo_module.flops(hlo_module.parse_module(c.as_text())) for c in (compiled, single))
  assert 0.2 < per_device / whole < 0.3, (per_device, whole)  # (the attention paths differ: splash on one device)
