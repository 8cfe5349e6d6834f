"""The decoder on a toy model: KV-cache continuation, padding invariance, LM-head rows, remat, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipo_jax.model import transformer
from ipo_jax.model.architecture import FULL, SLIDING, ModelConfig, RopeSpec

CFG = ModelConfig(model_type="gemma2", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, attn_scale=0.3, attn_softcap=20.0, final_softcap=15.0,
                  sliding_window=4, layer_types=(SLIDING, FULL, SLIDING), post_norms=True, norm_offset=1.0,
                  embed_scale=32**0.5, hidden_act="gelu_tanh", rope_sliding=RopeSpec(theta=100.0))


@pytest.fixture(scope="module")
def params():
  return transformer.init_params(CFG, jax.random.key(0), scale=0.3)


def logits(params, ids, mask):
  return np.asarray(transformer.full_logits(params, CFG, jnp.asarray(ids), jnp.asarray(mask)))


def test_golden_values(params):
  ids = np.array([[3, 14, 15, 9, 26, 5, 35, 8]])
  out = logits(params, ids, np.ones_like(ids))
  assert out.shape == (1, 8, 50)
  # Softcap bounds every logit; values pinned to catch silent changes of the forward pass.
  assert np.abs(out).max() < CFG.final_softcap
  np.testing.assert_allclose(out[0, -1, :4], GOLDEN, atol=2e-4)


GOLDEN = np.array([-1.789417, -0.771460, -1.267793, -3.122992])  # HF-parity-checked forward, jax threefry init


def test_padding_invariance(params):
  ids = np.array([[3, 14, 15, 9, 26, 5, 35, 8]])
  ref = logits(params, ids, np.ones_like(ids))
  left = logits(params, np.pad(ids, ((0, 0), (3, 0))), np.pad(np.ones_like(ids), ((0, 0), (3, 0))))
  right = logits(params, np.pad(ids, ((0, 0), (0, 3))), np.pad(np.ones_like(ids), ((0, 0), (0, 3))))
  np.testing.assert_allclose(left[:, 3:], ref, atol=1e-5)
  np.testing.assert_allclose(right[:, :8], ref, atol=1e-5)


@pytest.mark.parametrize("per_layer,split", [(False, False), (True, False), (True, True)])
def test_cache_continuation_equals_full_pass(params, per_layer, split):
  """A stacked cache (carried through the layer scan) and a per-layer one (the layers one after another) both
  continue exactly as the full pass; so does a per-layer cache with the weights split per layer and the
  projections [out, in] (`decode_layers`), as the sampler decodes on CPU."""
  ids = np.array([[3, 14, 15, 9, 26, 5, 35, 8], [0, 0, 7, 7, 1, 2, 3, 4]])
  mask = np.array([[1] * 8, [0, 0] + [1] * 6])
  ref = logits(params, ids, mask)
  weights = transformer.decode_layers(params) if split else params
  if split:
    assert len(weights["layers"]) == CFG.num_layers
    np.testing.assert_array_equal(weights["layers"][1]["gate"], params["layers"]["gate"][1].T)
    np.testing.assert_array_equal(weights["layers"][2]["attn_norm"], params["layers"]["attn_norm"][2])
  cache = transformer.init_cache(CFG, 2, 12, per_layer=per_layer)
  assert isinstance(cache["k"], tuple) == per_layer
  _, cache = transformer.forward(weights, CFG, jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]), cache)
  # Continuation is itself left-padded: a gap of padding slots must not change anything.
  cont_ids = np.pad(ids[:, 5:], ((0, 0), (1, 0)))
  cont_mask = np.pad(mask[:, 5:], ((0, 0), (1, 0)))
  hidden, cache = transformer.forward(weights, CFG, jnp.asarray(cont_ids), jnp.asarray(cont_mask), cache)
  out = np.asarray(transformer.lm_head(weights, CFG, hidden))
  np.testing.assert_allclose(out[:, 1:], ref[:, 5:], atol=1e-5)
  assert int(cache["length"]) == 9 and list(np.asarray(cache["next_pos"])) == [8, 6]


def test_split_layers_need_a_per_layer_cache(params):
  split = transformer.decode_layers(params)
  with pytest.raises(ValueError, match="only with a per-layer cache"):
    transformer.forward(split, CFG, jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="only with a per-layer cache"):
    transformer.forward(split, CFG, jnp.ones((1, 3), jnp.int32), cache=transformer.init_cache(CFG, 1, 4))


def test_lm_head_rows_and_last_token(params):
  ids = np.array([[0, 0, 3, 14, 15], [3, 14, 15, 9, 26]])
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  hidden, _ = transformer.forward(params, CFG, jnp.asarray(ids), jnp.asarray(mask))
  last = transformer.last_token_hidden(hidden, jnp.asarray(mask))
  rows = np.asarray(transformer.lm_head(params, CFG, last, jnp.array([7, 3])))
  full = logits(params, ids, mask)[:, -1]
  np.testing.assert_allclose(rows, full[:, [7, 3]], atol=1e-5)


def test_remat_and_bf16(params):
  ids = jnp.array([[3, 14, 15, 9, 26, 5, 35, 8]])
  plain, _ = transformer.forward(params, CFG, ids)
  remat, _ = transformer.forward(params, CFG, ids, remat=True)
  np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  low, _ = transformer.forward(bf16, CFG, ids)
  assert low.dtype == jnp.bfloat16
  ref = np.asarray(transformer.lm_head(params, CFG, plain))
  approx = np.asarray(transformer.lm_head(bf16, CFG, low))
  assert np.abs(approx - ref).max() < 0.05 * np.abs(ref).max()


def test_query_blocks_give_the_dense_result(params, monkeypatch):
  """Block-causal attention (queries in blocks, keys up to each block's end) equals dense attention, with left
  padding and sliding windows; on CPU (a row at a time, 2D GEMMs) and as on accelerators (batched GEMMs)."""
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 50, (2, 21))
  mask = np.ones_like(ids)
  mask[1, :6] = 0
  forward = lambda: np.asarray(transformer.forward(params, CFG, jnp.asarray(ids), jnp.asarray(mask))[0])
  dense = forward()
  monkeypatch.setattr(transformer, "QUERY_BLOCK", 4)  # 6 blocks, the last one short
  assert transformer.query_blocks(21)[-1] == (20, 21)
  assert transformer.attended_slots(8) == (4 * 4 + 4 * 8) / 8
  np.testing.assert_allclose(forward()[mask == 1], dense[mask == 1], atol=1e-5)
  monkeypatch.setattr(transformer, "platform", lambda: "tpu")
  np.testing.assert_allclose(forward()[mask == 1], dense[mask == 1], atol=1e-5)


def test_packed_segments_equal_separate_rows(params, monkeypatch):
  """Several sequences packed into one row (segment ids, positions restarting) give each sequence's own states."""
  monkeypatch.setattr(transformer, "QUERY_BLOCK", 8)
  rng = np.random.default_rng(2)
  seqs = [rng.integers(1, 50, n) for n in (7, 3, 9)]
  ids = np.concatenate(seqs + [np.zeros(5, np.int64)])[None]
  segments = np.concatenate([np.full(len(s), k + 1) for k, s in enumerate(seqs)] + [np.zeros(5, np.int64)])[None]
  np.testing.assert_array_equal(transformer.segment_positions(jnp.asarray(segments))[0, :19],
                                np.concatenate([np.arange(len(s)) for s in seqs]))
  packed = np.asarray(transformer.forward(params, CFG, jnp.asarray(ids), segment_ids=jnp.asarray(segments))[0])[0]
  start = 0
  for s in seqs:
    alone = np.asarray(transformer.forward(params, CFG, jnp.asarray(s[None]))[0])[0]
    np.testing.assert_allclose(packed[start:start + len(s)], alone, atol=1e-5)
    start += len(s)
  with pytest.raises(ValueError, match="segment_ids"):
    transformer.forward(params, CFG, jnp.asarray(ids), jnp.asarray(segments > 0), segment_ids=jnp.asarray(segments))


def test_branches_continue_a_shared_start(params, monkeypatch):
  """A segment holding a shared start once and then two continuations gives each sequence's own states."""
  monkeypatch.setattr(transformer, "QUERY_BLOCK", 8)
  rng = np.random.default_rng(4)
  start, first, second, other = (rng.integers(1, 50, n) for n in (6, 4, 7, 5))
  ids = np.concatenate([other, start, first, second, np.zeros(3, np.int64)])[None]
  segments = np.array([1] * 5 + [2] * 17 + [0] * 3)[None]
  branches = np.array([0] * 5 + [0] * 6 + [1] * 4 + [2] * 7 + [0] * 3)[None]
  np.testing.assert_array_equal(
      transformer.segment_positions(jnp.asarray(segments), jnp.asarray(branches))[0, :22],
      np.concatenate([np.arange(5), np.arange(10), np.arange(6, 13)]))
  packed = np.asarray(transformer.forward(params, CFG, jnp.asarray(ids), segment_ids=jnp.asarray(segments),
                                       branch_ids=jnp.asarray(branches))[0])[0]
  cases = ((other, np.r_[0:5]), (np.r_[start, first], np.r_[5:15]), (np.r_[start, second], np.r_[5:11, 15:22]))
  for seq, rows in cases:
    alone = np.asarray(transformer.forward(params, CFG, jnp.asarray(seq[None]))[0])[0]
    np.testing.assert_allclose(packed[rows], alone, atol=1e-5)
  with pytest.raises(ValueError, match="branch_ids need segment_ids"):
    transformer.forward(params, CFG, jnp.asarray(ids), branch_ids=jnp.asarray(branches))


def test_remat_policies_give_the_same_gradients_and_keep_less_in_turn(params, monkeypatch):
  """Every policy's gradients equal the plain backward pass; the residuals kept for it shrink from no remat to
  "dots" (every matmul output) to "minimal" (projections only) to "full" (layer inputs only). On the accelerators'
  attention path: the CPU path's attention matmuls are 2D GEMMs, which "minimal" keeps too."""
  monkeypatch.setattr(transformer, "platform", lambda: "gpu")
  ids = jnp.array([[3, 14, 15, 9, 26, 5, 35, 8], [2, 7, 1, 8, 2, 8, 18, 28]])
  loss = lambda p, remat: transformer.forward(p, CFG, ids, remat=remat)[0].astype(jnp.float32).var()
  want = jax.grad(loss)(params, False)
  kept = {}
  for remat in (False, *transformer.REMAT_POLICIES):
    got = jax.grad(loss)(params, remat)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    _, backward = jax.vjp(lambda p: loss(p, remat), params)  # its leaves: what the forward kept for the backward
    kept[remat] = sum(x.size for x in jax.tree.leaves(backward))
  assert kept[False] > kept["dots"] > kept["minimal"] > kept["full"], kept
  with pytest.raises(ValueError, match="remat policy 'some' is not one of"):
    transformer.forward(params, CFG, ids, remat="some")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_projection_gradient_equals_the_einsum_autodiff(dtype):
  """`_cpu_dense` (the projections on a CPU mesh: weight gradient as x^T dy) has the einsum's value and gradients."""
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k[0], (2, 5, 6), dtype)
  w = jax.random.normal(k[1], (6, 7), dtype)
  ct = jax.random.normal(k[2], (2, 5, 7), jnp.float32)
  plain = lambda x, w: jnp.einsum("btd,de->bte", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  for f in (plain, transformer._cpu_dense):
    assert f(x, w).dtype == dtype
  value = lambda f: jax.jit(jax.grad(lambda x, w: (f(x, w).astype(jnp.float32) * ct).sum(), argnums=(0, 1)))
  for got, want in zip(value(transformer._cpu_dense)(x, w), value(plain)(x, w)):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6)


def test_cpu_path_gradients_equal_the_accelerator_path_with_and_without_remat(params, monkeypatch):
  """The whole decoder's gradients on the CPU path (custom projection gradients, row-wise attention) equal the
  accelerators' path, also under remat."""
  ids = jnp.array([[3, 14, 15, 9, 26, 5, 35, 8], [2, 7, 1, 8, 2, 8, 18, 28]])
  loss = lambda p, remat: transformer.forward(p, CFG, ids, remat=remat)[0].astype(jnp.float32).var()
  grads = {}
  for name in ("cpu", "gpu"):
    monkeypatch.setattr(transformer, "platform", lambda name=name: name)
    grads[name] = [jax.grad(loss)(params, remat) for remat in (False, "minimal")]
  for got, want in zip(grads["cpu"], grads["gpu"]):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
