"""The fused attention kernels behind `transformer._attention`, and which one a call takes.

`ModelConfig.attention` (the `model.attention` setting) chooses, for each cache-less call (scoring, prefill-free
forwards, training steps; a call with a KV cache, a decoding step or a prefill, always attends with XLA):

  auto    the mesh's platform's kernel where the call suits it (TPU: splash attention, the Pallas kernel in
          `jax.experimental.pallas.ops.tpu.splash_attention`; GPU: cuDNN's fused attention through
          `jax.nn.dot_product_attention`), XLA's attention (`transformer._attend`) otherwise and on CPU
  xla     XLA's attention everywhere (the reference every kernel is tested against)
  splash  splash attention where the call suits it, on any platform (off TPU it runs in the Pallas interpreter:
          slow, for parity tests on CPU)
  cudnn   cuDNN's fused attention where the call suits it (a GPU mesh only)

Splash takes rows whose mask is a segment pattern (padding, or packed sequences by `segment_ids`; not the
shared-start branches of `branch_ids`, which no segment ids express) and whose length is a multiple of 128; it
attends causally within each segment (and within a layer's sliding window), skipping whole blocks the mask
excludes. It runs per device (`jax.shard_map` over the mesh: rows over the batch axes, heads over `tensor` when
they divide). cuDNN takes any mask (as a bias, with causal block skipping on) for bf16/fp16 models whose head
size is at most 128 and a multiple of 8, without attention logit soft-capping (Gemma 2); the partitioner shards
it like any op. Padding queries (whose outputs nothing reads) may attend differently from XLA's path; every
valid position is the same within the dtype's tolerance (tests/model/test_attention.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ipo_jax.model.architecture import SLIDING, ModelConfig
from ipo_jax.sharding import BATCH, context_mesh, platform

_PLATFORM_KERNEL = {"tpu": "splash", "gpu": "cudnn"}
SPLASH_BLOCKS = (512, 256, 128)  # block sizes splash may use, largest first; a row length must be a multiple of one


def implementation(cfg: ModelConfig, dtype: Any, length: int, cache_less: bool, segmented: bool) -> str:
  """"xla", "splash" or "cudnn": how a call attends. `segmented`: its mask is a segment pattern (no branches)."""
  if cfg.attention == "xla" or not cache_less:
    return "xla"
  kernel = cfg.attention if cfg.attention != "auto" else _PLATFORM_KERNEL.get(platform())
  if kernel == "splash":
    return "splash" if segmented and length % SPLASH_BLOCKS[-1] == 0 else "xla"
  if kernel == "cudnn":
    why = _cudnn_unsuited(cfg, dtype)
    if why and cfg.attention == "cudnn":
      raise ValueError(f"model.attention='cudnn': {why}; use model.attention=auto or xla")
    return "xla" if why else "cudnn"
  return "xla"


def _cudnn_unsuited(cfg: ModelConfig, dtype: Any) -> str | None:
  if platform() != "gpu":
    return f"cuDNN attention needs a GPU mesh, this one is {platform()}"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN attention takes bfloat16 or float16, the model computes in {jnp.dtype(dtype).name}"
  if cfg.head_dim > 128 or cfg.head_dim % 8:
    return f"cuDNN attention takes a head size of at most 128 and a multiple of 8, not {cfg.head_dim}"
  if cfg.attn_softcap:
    return "cuDNN attention has no logit soft-capping (attn_logit_softcapping)"
  return None


def cudnn(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
          implementation_: str = "cudnn") -> jax.Array:
  """q [B,T,H,Dh]; k, v [B,Hkv,S,Dh]; mask [B,T,S] (causal) -> [B,T,H*Dh] through `jax.nn.dot_product_attention`
  (`implementation_` "xla" runs the same arguments through its XLA path: the CPU test of this layout)."""
  b, t, h, dh = q.shape
  out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
                                     scale=cfg.attn_scale, is_causal=True, implementation=implementation_)
  return out.reshape(b, t, h * dh)


def splash_block(length: int) -> int:
  """The splash block size of rows of `length` tokens: the largest of SPLASH_BLOCKS that divides it."""
  return next(b for b in SPLASH_BLOCKS if length % b == 0)


def _splash_kernel(heads: int, length: int, window: int | None, softcap: float | None, interpret: bool) -> Any:
  """A splash kernel for rows of `length` tokens and `heads` query heads: causal, within `window` when given."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  shape = (length, length)
  head_mask = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
  block = splash_block(length)
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def splash(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
           sliding: Any) -> jax.Array:
  """q [B,T,H,Dh]; k, v [B,Hkv,T,Dh]; segments [B,T] (0 padding, then 1, 2, ... per packed sequence); `sliding`
  (a bool, traced inside the layer scan) the layer's type -> [B,T,H*Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernel_lib)
  b, t, h, dh = q.shape
  mesh = context_mesh()
  sharded = mesh is not None
  size = lambda axes: math.prod(mesh.shape[a] for a in axes) if sharded else 1
  batch = BATCH if sharded and b % size(BATCH) == 0 else None
  tensor = size(("tensor",)) if sharded else 1
  heads = "tensor" if tensor > 1 and h % tensor == 0 and cfg.num_kv_heads % tensor == 0 else None
  local_heads = h // (tensor if heads else 1)
  interpret = platform() != "tpu"
  full = _splash_kernel(local_heads, t, None, cfg.attn_softcap, interpret)
  windowed = (_splash_kernel(local_heads, t, cfg.sliding_window, cfg.attn_softcap, interpret)
              if cfg.sliding_window and SLIDING in cfg.layer_types else None)

  def run(q, k, v, segments, sliding):
    ids = kernel_lib.SegmentIds(q=segments, kv=segments)
    call = lambda kernel: jax.vmap(kernel)(q, k, v, ids)
    if windowed is None:
      return call(full)
    return jax.lax.cond(sliding, lambda: call(windowed), lambda: call(full))

  if sharded:
    heads_spec, rows_spec = P(batch, heads), P(batch)
    run = jax.shard_map(run, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, rows_spec, P()),
                        out_specs=heads_spec, check_vma=False)
  q = (q * jnp.asarray(cfg.attn_scale, q.dtype)).transpose(0, 2, 1, 3)  # splash does not scale the logits
  out = run(q, k, v, segments.astype(jnp.int32), jnp.asarray(sliding, bool))
  return out.transpose(0, 2, 1, 3).reshape(b, t, h * dh)
