"""The decoder family as pure functions over a params pytree.

Params: the layout of ipo_jax/model/params.py (layers stacked on a leading axis and run with `lax.scan`, so a
30-layer model compiles one layer). Norm weights keep the Hugging Face convention (Gemma's are applied as 1 + w).
Activations and the KV cache name their logical axes (`HIDDEN`, `CACHE_AXES`; mapped to the mesh by
ipo_jax/sharding.py). `forward` returns the final hidden
states; `lm_head` turns chosen positions into logits, optionally for a few vocabulary rows only.

A KV cache (`init_cache`) holds `S` slots per row. A call writes its `T` new tokens at slots
[length, length + T); a query attends to valid slots at or before its own slot. Positions come from the attention
mask (left or right padding), continuing from each row's `next_pos`, so a left-padded prefix followed by a
left-padded continuation is attended exactly as the unpadded concatenation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ipo_jax import sharding
from ipo_jax.model import attention
from ipo_jax.model.architecture import SLIDING, ModelConfig, RopeSpec
from ipo_jax.model.params import param_shapes
from ipo_jax.sharding import constrain, platform

Params = dict[str, Any]
Cache = dict[str, jax.Array]
_NEG = -1e30
_NO_WINDOW = np.iinfo(np.int32).max
QUERY_BLOCK = 128  # queries per attention block in cache-less calls

# Logical axes (ipo_jax/sharding.py) of the activations and of the KV cache's entries.
HIDDEN = ("batch", "length", "embed")  # the residual stream [B, T, D]
QUERIES = ("batch", "length", "heads", "head_dim")
MLP_HIDDEN = ("batch", "length", "mlp")
KV = ("layers", "batch", "kv_heads", "length", "head_dim")  # heads-major: attention reads it without a transpose
LAYER_KV = KV[1:]  # one layer's entry of a per-layer cache
CACHE_AXES = {"k": KV, "v": KV, "valid": ("batch", "length"), "pos": ("batch", "length"), "next_pos": ("batch",),
              "length": ()}


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> np.ndarray:
  """Inverse frequencies with `linear` or `llama3` scaling, as in transformers' rope init functions."""
  inv = 1.0 / (spec.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if spec.rope_type == "linear":
    inv = inv / spec.factor
  elif spec.rope_type == "llama3":
    low_wavelen = spec.original_max_position_embeddings / spec.low_freq_factor
    high_wavelen = spec.original_max_position_embeddings / spec.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (spec.original_max_position_embeddings / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _rope_tables(spec: RopeSpec, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  angles = positions[..., None].astype(jnp.float32) * rope_inv_freq(spec, head_dim)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, Dh]; cos/sin [B, T, Dh] (rotate-half convention of HF)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, spec: str, out_in: bool = False) -> jax.Array:
  """A projection accumulated in fp32 and returned in x's dtype (on CPU also the fast bf16 GEMM path). `spec`
  contracts x's last axis with w's first; `out_in`: w is stored [out, in] (`decode_layers`) and its last axis is
  contracted. On a CPU mesh its gradient is `_cpu_dense`'s."""
  if out_in:  # a 2D product: XLA's dot canonicalization transposes the weight of a [..., I] x [O, I] product back
    y = jnp.einsum("ti,oi->to", x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)
  if platform() == "cpu":
    return _cpu_dense(x, w)
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def _cpu_dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., I] @ w [I, O] -> [..., O] with the weight gradient written as one [I, T] x [T, O] product.

  Autodiff of the einsum computes the weight gradient as (dy^T x)^T, for which XLA's CPU backend lays out dy
  transposed and fuses that transposition into the elementwise op producing dy (the SiLU backward, the MLP
  product), where it runs several times slower than the product itself (8 ms of a 2 ms GEMM per weight per layer,
  SmolLM2-135M DPO). Written as x^T dy, the operands keep their layouts: the gradients are the same, and a
  135M-parameter forward and backward takes 0.65x the time."""
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _cpu_dense_fwd(x, w):
  return _cpu_dense(x, w), (x, w)


def _cpu_dense_bwd(res, dy):
  x, w = res
  dx = jnp.einsum("...o,io->...i", dy, w, preferred_element_type=jnp.float32).astype(x.dtype)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dw = jnp.einsum("ti,to->io", rows(x), rows(dy), preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def _act(name: str, x: jax.Array) -> jax.Array:
  """The MLP's activation `name` (`ModelConfig.hidden_act`)."""
  return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_gated_down(act: str, gate: jax.Array, up: jax.Array, w: jax.Array) -> jax.Array:
  """The MLP's output act(gate) * up @ w [F, D] on a CPU mesh, keeping only `gate` and `up` for the backward pass.

  Autodiff keeps six [tokens, F] values per layer for it (the activation's intermediates, the product, the down
  projection's input); the backward here recomputes the elementwise part from gate and up instead, which took the
  gradient program's temporaries from 1273 to 913 MiB (SmolLM2-135M, 2 pairs x 2 x 128 tokens). Gradients are
  those of `_act` and `_cpu_dense`."""
  return _cpu_dense(_act(act, gate) * up, w)


def _cpu_gated_down_fwd(act, gate, up, w):
  return _cpu_gated_down(act, gate, up, w), (gate, up, w)


def _cpu_gated_down_bwd(act, res, dy):
  gate, up, w = res
  a, a_vjp = jax.vjp(functools.partial(_act, act), gate)
  dh, dw = _cpu_dense_bwd((a * up, w), dy)
  (d_gate,) = a_vjp(dh * up)
  return d_gate, dh * a, dw


_cpu_gated_down.defvjp(_cpu_gated_down_fwd, _cpu_gated_down_bwd)


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
  """Position of each token: the number of real tokens before it (plus each row's `start`)."""
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
  if start is not None:
    pos = pos + start[:, None]
  return jnp.maximum(pos, 0)


def _run_starts(ids: jax.Array) -> jax.Array:
  return jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], 1)


def _since_start(values: jax.Array, starts: jax.Array) -> jax.Array:
  """Inclusive running sum of `values` [B, T] (non-negative) restarted at each `starts`."""
  total = jnp.cumsum(values, axis=1)
  return total - jax.lax.cummax(jnp.where(starts, total - values, 0), axis=1)


def segment_positions(segment_ids: jax.Array, branch_ids: jax.Array | None = None) -> jax.Array:
  """Position of each token within its segment of a packed row (segments are contiguous runs of one id).

  With `branch_ids`, a segment is its shared start (branch 0) followed by branches 1, 2, ... that each continue
  from the end of the shared start."""
  starts = _run_starts(segment_ids)
  ones = jnp.ones_like(segment_ids)
  if branch_ids is None:
    return _since_start(ones, starts) - 1
  shared = _since_start((branch_ids == 0).astype(segment_ids.dtype), starts)
  in_branch = _since_start(ones, starts | _run_starts(branch_ids)) - 1
  return jnp.where(branch_ids == 0, in_branch, shared + in_branch)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32, per_layer: bool = False
               ) -> Cache:
  """An empty cache of `max_len` slots per row: k, v [L, B, Hkv, S, Dh] (`per_layer`: tuples of L arrays
  [B, Hkv, S, Dh]); valid, pos [B, S]; next_pos [B]; length.

  With a per-layer cache `forward` runs the layers one after another, each reading and writing its own entry in
  place; a stacked cache is carried through the layer scan, whose per-layer slice XLA's CPU backend copies (and
  whose bf16 update it computes in fp32 over the whole cache)."""
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  if per_layer:
    kv = lambda: tuple(constrain(jnp.zeros(shape, dtype), LAYER_KV) for _ in range(cfg.num_layers))
  else:
    kv = lambda: constrain(jnp.zeros((cfg.num_layers,) + shape, dtype), KV)
  cache = {
      "k": kv(),
      "v": kv(),
      "valid": jnp.zeros((batch, max_len), bool),
      "pos": jnp.zeros((batch, max_len), jnp.int32),
      "next_pos": jnp.zeros((batch,), jnp.int32),
      "length": jnp.zeros((), jnp.int32),
  }
  return {name: x if name in ("k", "v") else constrain(x, CACHE_AXES[name]) for name, x in cache.items()}


def map_kv(fn: Any, cache: Cache) -> Cache:
  """`cache` with fn(x, batch_axis, slot_axis) applied to its keys and values, stacked or per layer (the axes of
  the entry fn gets)."""
  def apply(x):
    if isinstance(x, tuple):
      return tuple(constrain(fn(e, LAYER_KV.index("batch"), LAYER_KV.index("length")), LAYER_KV) for e in x)
    return constrain(fn(x, KV.index("batch"), KV.index("length")), KV)
  return dict(cache, k=apply(cache["k"]), v=apply(cache["v"]))


def query_blocks(t: int) -> list[tuple[int, int]]:
  """[start, end) of the query blocks of a cache-less call over `t` tokens."""
  return [(a, min(a + QUERY_BLOCK, t)) for a in range(0, t, QUERY_BLOCK)]


def attended_slots(t: int) -> float:
  """Key slots a query of a cache-less call over `t` tokens computes scores for, on average (block-causal)."""
  return sum((end - start) * end for start, end in query_blocks(t)) / t


def _attend(cfg: ModelConfig, q, k, v, mask):
  """Softmax attention of q [..., Q, Dh] over k, v [..., S, Dh] where `mask` [..., Q, S] allows -> [..., Q, Dh]."""
  scores = jnp.einsum("...qd,...sd->...qs", q, k, preferred_element_type=jnp.float32) * cfg.attn_scale
  if cfg.attn_softcap:
    scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
  probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1).astype(v.dtype)
  return jnp.einsum("...qs,...sd->...qd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _attention(cfg: ModelConfig, q, k, v, mask, causal_blocks: bool = False, segments=None, sliding=False):
  """q [B,T,H,Dh]; k, v [B,Hkv,S,Dh]; mask [B,T,S] -> [B,T,H*Dh]; or one row of each, without the B axis.

  The one attention function: a cache-less call (`causal_blocks`) goes to the fused kernel that
  `attention.implementation` picks from `cfg.attention` and the mesh's platform (splash needs `segments` [B,T], the
  call's mask as segment ids, and the layer's type `sliding`); everything else attends here, with XLA.

  `causal_blocks` (a cache-less call, S = T, the mask causal): each block of QUERY_BLOCK queries is computed only
  against the keys up to its end, which skips the upper triangle's blocks (the same result; about half the
  attention FLOPs on long rows). The query heads sharing a KV head are folded into the query axis, so each
  (row, KV head) is one GEMM pair. On a CPU mesh a cache-less call runs its rows one at a time and each KV head as a
  plain 2D GEMM pair: XLA's CPU backend runs 2D bf16 dots on its fast (AMX) path and batched ones about 2x slower,
  and one row's score blocks stay in cache. The platform is the mesh's (`sharding.platform`), so a program traced
  on a CPU host for a TPU mesh takes the batched path it would take there."""
  one_row = q.ndim == 3
  if causal_blocks and not one_row:
    kernel = attention.implementation(cfg, q.dtype, q.shape[1], True, segments is not None)
    if kernel == "splash":
      return attention.splash(cfg, q, k, v, segments, sliding)
    if kernel == "cudnn":
      return attention.cudnn(cfg, q, k, v, mask)
  if causal_blocks and not one_row and platform() == "cpu":
    return jax.lax.map(lambda row: _attention(cfg, *row, causal_blocks=True), (q, k, v, mask))
  if causal_blocks and q.shape[-3] > QUERY_BLOCK:
    blocks = [_attention(cfg, q[..., a:e, :, :], k[..., :e, :], v[..., :e, :], mask[..., a:e, :e])
              for a, e in query_blocks(q.shape[-3])]
    return jnp.concatenate(blocks, axis=-2)
  *_, t, h, dh = q.shape
  kv_heads = cfg.num_kv_heads
  groups = h // kv_heads
  if one_row:
    q, mask = q.reshape(t, kv_heads, groups, dh), jnp.repeat(mask, groups, axis=0)
    heads = [_attend(cfg, q[:, j].reshape(t * groups, dh), k[j], v[j], mask).reshape(t, groups * dh)
             for j in range(kv_heads)]
    return jnp.concatenate(heads, axis=-1)
  b = q.shape[0]
  q = q.reshape(b, t, kv_heads, groups, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * groups, dh)
  mask = jnp.repeat(mask, groups, axis=1)[:, None]
  out = _attend(cfg, q, k, v, mask)
  return out.reshape(b, kv_heads, t, groups, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h * dh)


def _layer(cfg: ModelConfig, h, p, layer_window, is_sliding, rope, kv_mask_fn, cache_kv, out_in: bool = False,
           segments=None, blocks: bool = True):
  """One decoder layer; returns the new hidden state and this layer's (k, v) as stored. `out_in`: the projection
  weights of `p` are stored [out, in] (`decode_layers`); `segments`: a cache-less call's mask as segment ids, when
  it is one (`_attention`); `blocks`: a cache-less call may attend block by block (not when split over its
  sequence)."""
  b, t, _ = h.shape
  x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  q = _dense(x, p["q"], "btd,de->bte", out_in)
  k = _dense(x, p["k"], "btd,de->bte", out_in)
  v = _dense(x, p["v"], "btd,de->bte", out_in)
  if cfg.qkv_bias:
    q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
  q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  (cos_f, sin_f), (cos_s, sin_s) = rope
  cos, sin = jnp.where(is_sliding, cos_s, cos_f), jnp.where(is_sliding, sin_s, sin_f)
  q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
  q = constrain(q, QUERIES)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh], the cache's layout
  if cache_kv is not None:  # write this layer's new slots in place: its own entry, or its part of the stacked cache
    ck, cv, start, layer = cache_kv  # layer None: ck, cv are this layer's own entry
    lead = () if layer is None else (layer,)
    write = lambda c, new: jax.lax.dynamic_update_slice(c, new.astype(c.dtype)[(None,) * len(lead)],
                                                        lead + (0, 0, start, 0))
    ck, cv = write(ck, k), write(cv, v)
    k, v = (ck, cv) if layer is None else (ck[layer], cv[layer])
  attn = _attention(cfg, q, k, v, kv_mask_fn(layer_window), causal_blocks=cache_kv is None and blocks,
                    segments=segments, sliding=is_sliding)
  attn = _dense(attn, p["o"], "bte,ed->btd", out_in)
  if cfg.o_bias:
    attn = attn + p["o_bias"]
  if cfg.post_norms:
    attn = rms_norm(attn, p["attn_post_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  h = h + attn
  x = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  gate = _dense(x, p["gate"], "btd,df->btf", out_in)
  up = _dense(x, p["up"], "btd,df->btf", out_in)
  if platform() == "cpu" and not out_in:
    mlp = _cpu_gated_down(cfg.hidden_act, gate, up, p["down"])
  else:
    mlp = constrain(_act(cfg.hidden_act, gate) * up, MLP_HIDDEN)
    mlp = _dense(mlp, p["down"], "btf,fd->btd", out_in)
  if cfg.post_norms:
    mlp = rms_norm(mlp, p["mlp_post_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  h = constrain(h + mlp, HIDDEN)
  return h, (None if cache_kv is None else (ck, cv))


def embed(params: Params, cfg: ModelConfig, input_ids: jax.Array) -> jax.Array:
  h = jnp.take(params["embed"], input_ids, axis=0)  # the looked-up rows only, not the whole table, move
  if cfg.embed_scale != 1.0:
    h = h * jnp.asarray(cfg.embed_scale, h.dtype)
  return constrain(h, HIDDEN)


def _positions(attention_mask: jax.Array, cache: Cache | None, segment_ids: jax.Array | None,
               branch_ids: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions [B, T] of a call's tokens, and validity and positions [B, S] of the keys it attends (its own tokens
  without a cache; every cache slot, this call's written in, with one)."""
  mask = attention_mask.astype(bool)
  if cache is None:
    positions = (positions_from_mask(attention_mask) if segment_ids is None
                 else segment_positions(segment_ids, branch_ids))
    return positions, mask, positions
  start = cache["length"]
  positions = positions_from_mask(attention_mask, cache["next_pos"])
  kv_valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, start))
  kv_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, start))
  return positions, kv_valid, kv_pos


def _causal_mask(kv_valid: jax.Array, t: int, cache: Cache | None, segment_ids: jax.Array | None,
                 branch_ids: jax.Array | None) -> jax.Array:
  """[B, T, S]: the valid keys at or before each query's slot, within its segment and branch."""
  q_slot = jnp.arange(t, dtype=jnp.int32)
  if cache is not None:
    q_slot = q_slot + cache["length"]
  kv_slot = jnp.arange(kv_valid.shape[1], dtype=jnp.int32)
  causal = kv_valid[:, None, :] & (kv_slot[None, None, :] <= q_slot[None, :, None])
  if segment_ids is not None:
    causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if branch_ids is not None:
    causal = causal & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
  return causal


# Rematerialisation policies of the layer scan (`forward(remat=...)`): what a layer keeps for the backward pass.
REMAT_POLICIES = {
    "full": "nothing_saveable",  # only the layer's inputs: everything else recomputed
    "minimal": "dots_with_no_batch_dims_saveable",  # also the projections' outputs (attention recomputed)
    "dots": "dots_saveable",  # every matmul's output, attention scores included
    "offload": "offload_dot_with_no_batch_dims",  # minimal's projections kept in host memory (TPU, GPU)
}


def remat_policy(remat: bool | str) -> Any:
  """The `jax.checkpoint` policy of `remat`: True is "full", a name one of `REMAT_POLICIES`."""
  name = "full" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat policy {name!r} is not one of {tuple(REMAT_POLICIES)}")
  if name == "offload":
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  return getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    cache: Cache | None = None,
    *,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    remat: bool | str = False,
) -> tuple[jax.Array, Cache | None]:
  """Final hidden states [B, T, D] (after the final norm) and the updated cache (None without one).

  `segment_ids` [B, T] (instead of `attention_mask`, without a cache): packed rows of several sequences, numbered
  1, 2, ... with 0 for padding; a token attends only within its own segment, and positions restart at each one.
  `branch_ids` [B, T] (with `segment_ids`): sequences that share a start packed as one segment, the start once
  (branch 0) then each sequence's own tokens (branches 1, 2, ...); a token attends to the start and its own branch.
  `remat` (training): each layer recomputed in the backward pass, keeping what its policy keeps (True: "full"; or a
  name of `REMAT_POLICIES`).
  """
  b, t = input_ids.shape
  if segment_ids is not None:
    if cache is not None or attention_mask is not None:
      raise ValueError("segment_ids replace attention_mask and take no cache")
    attention_mask = segment_ids > 0
  elif branch_ids is not None:
    raise ValueError("branch_ids need segment_ids")
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  positions, kv_valid, kv_pos = _positions(attention_mask, cache, segment_ids, branch_ids)
  causal = _causal_mask(kv_valid, t, cache, segment_ids, branch_ids)
  distance = positions[:, :, None] - kv_pos[:, None, :]

  def kv_mask(window):
    return causal & (distance < window)

  rope = (_rope_tables(cfg.rope_full, cfg.head_dim, positions),
          _rope_tables(cfg.rope_sliding, cfg.head_dim, positions))
  is_sliding = np.array([lt == SLIDING for lt in cfg.layer_types])
  windows = np.where(is_sliding, cfg.sliding_window or _NO_WINDOW, _NO_WINDOW).astype(np.int32)

  # A cache-less call's mask as segment ids (padding 0), for a kernel that takes them; none with branches. Rows
  # split over their sequence (`sharding.sequence_split`) attend with XLA over whole rows of keys, gathered.
  split = cache is None and sharding.sequence_split(b, t)
  segments = None if cache is not None or branch_ids is not None or split else (
      attention_mask.astype(jnp.int32) if segment_ids is None else segment_ids)

  def body(carry, xs):
    h, kv = carry
    p, window, sliding, layer = xs
    h, kv = _layer(cfg, h, p, window, sliding, rope, kv_mask,
                   None if cache is None else (*kv, cache["length"], layer), segments=segments, blocks=not split)
    return (h, kv), None

  if remat:
    body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(remat))
  h = embed(params, cfg, input_ids)
  split = isinstance(params["layers"], tuple)  # `decode_layers`
  if cache is not None and isinstance(cache["k"], tuple):  # a per-layer cache: the layers one after another
    layers, written = params["layers"], []
    for i in range(cfg.num_layers):
      if split:
        p = layers[i]
      else:  # A dynamic index (the barrier keeps XLA from folding it): XLA's CPU backend copies a static slice of
        # the stacked weights several times slower than a dynamic one.
        index = jax.lax.optimization_barrier(jnp.int32(i))
        p = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), layers)
      h, layer_kv = _layer(cfg, h, p, windows[i], is_sliding[i], rope, kv_mask,
                           (cache["k"][i], cache["v"][i], cache["length"], None), out_in=split)
      written.append(layer_kv)
    kv = tuple(map(tuple, zip(*written)))  # ((k of each layer), (v of each layer))
  elif split:
    raise ValueError("split layers (`decode_layers`) run only with a per-layer cache")
  else:
    xs = (params["layers"], windows, is_sliding, jnp.arange(cfg.num_layers))
    kv = None if cache is None else (cache["k"], cache["v"])  # carried: each layer updates its slots in place
    (h, kv), _ = jax.lax.scan(body, (h, kv), xs)
  h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  if cache is None:
    return h, None
  new_cache = {
      "k": kv[0], "v": kv[1], "valid": kv_valid, "pos": kv_pos,
      "next_pos": cache["next_pos"] + attention_mask.astype(jnp.int32).sum(-1),
      "length": cache["length"] + t,
  }
  return h, new_cache


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # a layer's projection weights, each [in, out]


def decode_layers(params: Params) -> Params:
  """`params` as decoding on a CPU mesh reads them: "layers" a tuple of per-layer weights, each projection stored
  [out, in]. Made by its own program (a copy of the layers' weights) and passed to the decode program, so the
  weights arrive in that layout: inside one program XLA would lay them out [in, out] again.

  XLA's CPU backend copies a layer's slice of stacked weights before a dot reads it, and its few-row GEMMs read an
  [out, in] weight faster than an [in, out] one (30 layers of [576, 1536] MLP weights for 8 rows: 6.6 against 12.3
  ms in bf16; 32 rows in fp32: 25.8 against 32.7 ms). `forward` runs such layers with a per-layer cache."""
  layers = params["layers"]
  count = jax.tree_util.tree_leaves(layers)[0].shape[0]
  split = tuple({name: x[i].T if name in PROJECTIONS else x[i] for name, x in layers.items()} for i in range(count))
  return dict(params, layers=split)


def decode_layers_shardings(shardings: Params, num_layers: int) -> Params:
  """The NamedShardings of `decode_layers(params)` from those of `params`: a layer's weight placed as its stack
  without the layer axis, a projection's axes swapped."""
  def one(name, s):
    spec = tuple(s.spec)[1:]
    if name in PROJECTIONS:
      spec = (spec + (None,) * (2 - len(spec)))[::-1]
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))
  layer = {name: one(name, s) for name, s in shardings["layers"].items()}
  return dict(shardings, layers=(layer,) * num_layers)


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array, vocab_ids: jax.Array | None = None,
            split_vocab: bool = False) -> jax.Array:
  """Logits (fp32) for `hidden` [..., D] over the whole vocabulary, or only the rows `vocab_ids` [K].

  `split_vocab` (a few positions per row: scoring, decoding): each device computes every row's logits over its own
  slice of the vocabulary (`head_vocab`: the fsdp and tensor axes), so the table never moves whole: the rows are
  gathered instead (B x D, small beside V x D), and a table stored split over its width (a tied embedding) is
  resharded by an all-to-all, 1/n of the gather. The logits stay split over the vocabulary."""
  w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
  if vocab_ids is not None:
    w = jnp.take(w, jnp.asarray(vocab_ids), axis=0)
  if split_vocab:
    w = constrain(w, ("head_vocab", None))
    hidden = constrain(hidden, (None,) * hidden.ndim)
  logits = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
  if split_vocab:
    logits = constrain(logits, (None,) * (logits.ndim - 1) + ("head_vocab",))
  if cfg.final_softcap:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


def last_token_hidden(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The hidden state of each row's last real token (works for left and right padding)."""
  t = attention_mask.shape[1]
  idx = t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def classifier_scores(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Sequence-classification scores [B, num_labels] from each row's last real token (reward models)."""
  hidden, _ = forward(params, cfg, input_ids, attention_mask)
  last = last_token_hidden(hidden, attention_mask)
  return jnp.einsum("bd,ld->bl", last, params["score"], preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_logits(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """[B, T, V] logits at every position: for parity checks and small inputs only."""
  hidden, _ = forward(params, cfg, input_ids, attention_mask)
  return lm_head(params, cfg, hidden)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02) -> Params:
  """Random parameters (normal(0, scale) matrices, norms at their identity) for toy models in tests."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, shape), k in zip(leaves, keys):
    name = str(getattr(path[-1], "key", path[-1]))
    if name.endswith("norm"):
      out.append(jnp.full(shape, 1.0 - cfg.norm_offset, dtype))
    else:
      out.append((scale * jax.random.normal(k, shape)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
