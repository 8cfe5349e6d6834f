"""The jitted scoring programs, with explicit shardings from the mesh.

Every program returns [B, 2] (replicated): the log-odds of the yes over the no token and the log yes+no probability
mass, from the next-token distribution after each sequence. Only the scored positions' hidden states reach the LM
head; no [batch, seq, vocab] logits are ever formed.

  plain         left-padded rows ids/mask [B, T]; scores each row's last position.
  prefill       left-padded shared starts [W, P] -> their KV cache.
  continuation  the cache rows `rows` [B] of a prefill, then continuations ids/mask [B, T] after them.
  packed        packed rows ids/segments/branches [B, T] (sequences attend within their segment and branch);
                scores the positions `ends` [B, M].

`build(cfg, mesh, params)` jits them for a model: params as `sharding.param_shardings` places them, batches over
(data, fsdp), the answer ids and gather rows replicated. The model config is the static first argument, so each
(config, shape) is compiled once per process whichever `Programs` runs it.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ipo_jax import sharding
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig

_TRACES: collections.Counter = collections.Counter()  # program name -> times traced (= compiled) in this process


def num_compilations() -> int:
  """Scoring programs compiled so far in this process (each trace of a program is one compilation)."""
  return sum(_TRACES.values())


def _yes_no(params, cfg: ModelConfig, hidden: jax.Array, answers: jax.Array) -> jax.Array:
  """[B, 2] (replicated): log-odds of yes over no and the log yes+no probability mass, from hidden states [B, D]."""
  logits = transformer.lm_head(params, cfg, hidden, split_vocab=True)  # [B, V] at the one scored position
  pair = jnp.take(logits, answers, axis=-1)
  log_mass = jax.nn.logsumexp(pair, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
  return sharding.constrain(jnp.stack([pair[:, 0] - pair[:, 1], log_mass], axis=-1), (None, None))


def _score_plain(cfg, params, ids, mask, answers):
  _TRACES["plain"] += 1
  hidden, _ = transformer.forward(params, cfg, ids, mask)
  return _yes_no(params, cfg, transformer.last_token_hidden(hidden, mask), answers)


def _prefill(cfg, params, ids, mask):
  _TRACES["prefill"] += 1
  cache = transformer.init_cache(cfg, ids.shape[0], ids.shape[1], params["embed"].dtype)
  return transformer.forward(params, cfg, ids, mask, cache=cache)[1]


def _gather_rows(cache: transformer.Cache, rows: jax.Array, extra_slots: int) -> transformer.Cache:
  """The cache of `rows` (indices into its batch) with `extra_slots` empty slots appended."""

  def take(x, batch_axis, slot_axis):
    x = jnp.take(x, rows, axis=batch_axis)
    pad = [(0, 0)] * x.ndim
    pad[slot_axis] = (0, extra_slots)
    return jnp.pad(x, pad)

  cache = transformer.map_kv(take, cache)
  return dict(cache, valid=take(cache["valid"], 0, 1), pos=take(cache["pos"], 0, 1),
              next_pos=jnp.take(cache["next_pos"], rows))


def _score_continuation(cfg, params, cache, rows, ids, mask, answers):
  _TRACES["continuation"] += 1
  cache = _gather_rows(cache, rows, ids.shape[1])
  hidden, _ = transformer.forward(params, cfg, ids, mask, cache=cache)
  return _yes_no(params, cfg, transformer.last_token_hidden(hidden, mask), answers)


def _score_packed(cfg, params, ids, segments, branches, ends, answers):
  """Packed rows: `ends` [B, M] the last position of each sequence (padding slots point anywhere)."""
  _TRACES["packed"] += 1
  hidden, _ = transformer.forward(params, cfg, ids, segment_ids=segments, branch_ids=branches)
  last = jnp.take_along_axis(hidden, ends[:, :, None], axis=1)
  return _yes_no(params, cfg, last.reshape(-1, last.shape[-1]), answers)


class Programs(NamedTuple):
  """The four scoring programs of one model on one mesh; each is called as program(cfg, params, *arrays)."""

  plain: Callable
  prefill: Callable
  continuation: Callable
  packed: Callable


def cache_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """Shardings of a prefill's KV cache: batch over (data, fsdp), KV heads over `tensor` when it divides them."""
  tensor = mesh.shape["tensor"]
  heads = "tensor" if tensor > 1 and cfg.num_kv_heads % tensor == 0 else None
  named = lambda *spec: NamedSharding(mesh, P(*spec))
  kv = named(None, sharding.BATCH, heads, None, None)
  return {"k": kv, "v": kv, "valid": named(sharding.BATCH, None), "pos": named(sharding.BATCH, None),
          "next_pos": named(sharding.BATCH), "length": named()}


def build(cfg: ModelConfig, mesh: jax.sharding.Mesh, params: Any) -> Programs:
  """The scoring programs for a model with `params` on `mesh` (explicit in/out shardings; `cfg` static)."""
  weights = sharding.param_shardings(params, mesh)
  rows = sharding.batch_sharding(mesh, 2)
  replicated = sharding.replicated(mesh)
  cache = cache_shardings(cfg, mesh)

  def jit(fn, in_shardings, out_shardings):
    return sharding.jit(fn, mesh, in_shardings=in_shardings, out_shardings=out_shardings, static_argnames=("cfg",))

  return Programs(
      plain=jit(_score_plain, (weights, rows, rows, replicated), replicated),
      prefill=jit(_prefill, (weights, rows, rows), cache),
      continuation=jit(_score_continuation, (weights, cache, replicated, rows, rows, replicated), replicated),
      packed=jit(_score_packed, (weights, rows, rows, rows, rows, replicated), replicated),
  )


KINDS = ("plain", "packed", "prefill", "continuation")


def lowerable(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any, kind: str, rows: int, length: int, *,
              sequences: int = 1, prefix_rows: int = 0, prefix_length: int = 0) -> sharding.Lowerable:
  """One scoring program of `build` with abstract arguments, to compile ahead of time for `mesh` (any platform).

  plain / packed: `rows` x `length` tokens (packed: `sequences` scored per row); prefill: `rows` shared starts of
  `length` tokens; continuation: `rows` continuations of `length` tokens after a prefill of `prefix_rows` x
  `prefix_length` (default: `rows` x `length`)."""
  if kind not in KINDS:
    raise ValueError(f"scoring program must be one of {KINDS}, got {kind!r}")
  params = sharding.abstract_params(cfg, dtype, mesh)
  progs = build(cfg, mesh, params)
  row_sharding, rep = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
  tokens = lambda r=rows, n=length: sharding.abstract((r, n), jnp.int32, row_sharding)
  answers = sharding.abstract((2,), jnp.int32, rep)
  if kind == "plain":
    args = (tokens(), tokens(), answers)
  elif kind == "packed":
    args = (tokens(), tokens(), tokens(), tokens(rows, sequences), answers)
  elif kind == "prefill":
    args = (tokens(), tokens())
  else:
    w, p = prefix_rows or rows, prefix_length or length
    cache_shapes = jax.eval_shape(lambda: transformer.init_cache(cfg, w, p, jnp.dtype(dtype)))
    cache = sharding.abstract_tree(cache_shapes, cache_shardings(cfg, mesh))
    args = (cache, sharding.abstract((rows,), jnp.int32, rep), tokens(), tokens(), answers)
  return sharding.Lowerable(f"score_{kind}", getattr(progs, kind), (cfg, params) + args, mesh)
