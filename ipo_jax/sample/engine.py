"""The sampler: prompts padded into buckets, prefill and the whole decode loop in one jitted program.

The engine pads prompts on the left into length and batch buckets (a bounded number of compilations), prefills
each prompt once into a preallocated KV cache, copies that cache to the prompt's N samples and runs the whole
decode loop in the same `jax.jit`: `lax.while_loop`s that stop as soon as every row has finished, one per segment
of DECODE_SEGMENT tokens, each over a cache just large enough for it. Rows are split over the mesh's (data, fsdp)
axes. Row (prompt i, sample s) draws from `fold_in(fold_in(key, indices[i]), s)`, folded with the step, so its
tokens do not depend on the batch it ran in.

Sampling follows transformers' order: temperature, then top-k, top-p and min-p; temperature 0 is greedy. A row
ends at an EOS id (the model's or the tokenizer's), at a stop id (the chat template's end-of-turn and
`stop_token_ids`) or after `max_new_tokens`; its `token_ids` include the id that ended it.

How an instruction becomes a prompt, and the instruction data sets, are in ipo_jax/sample/instructions.py; the
`generate` task in ipo_jax/tasks/generate.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ipo_jax import runtime, sections, sharding
from ipo_jax.model import chat, transformer

FINISH_REASONS = ("length", "eos", "stop")
_LENGTH, _EOS, _STOP = range(3)
_PAD = -1  # fills the token buffer after a row has finished
MIN_PROMPT_BUCKET = 32
GENERATIONS_FILE = "generations.jsonl"  # rows {index, instruction, sample, text, token_ids, finish_reason, ...}
_TRACES = [0]  # decode programs traced (= compiled) in this process


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn. `temperature` 0 is greedy; `top_k` 0, `top_p` 1 and `min_p` 0 switch a filter off."""

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  num_samples: int = 1
  stop_token_ids: tuple[int, ...] = ()  # besides the EOS ids and the chat template's end-of-turn

  def __post_init__(self):
    checks = {
        "max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
        "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1, "min_p": 0 <= self.min_p < 1,
        "num_samples": self.num_samples >= 1,
    }
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"sampling.{name}={getattr(self, name)!r} is out of range")
    object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @classmethod
  def from_config(cls, section: Any) -> "SamplingConfig":
    """From a ConfigDict (or dict); keys that are not sampling fields (e.g. `batch_size`) are ignored."""
    return sections.from_section(cls, section)


@dataclasses.dataclass(frozen=True)
class Generation:
  """One sampled continuation: its ids (with the EOS/stop id that ended it), why it ended, and its text."""

  token_ids: list[int]
  finish_reason: str
  text: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Token choice.


_TOP_P_CANDIDATES = 256


def _top_p_threshold(probs: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Per row ([rows, 1]), the probability of the least likely token top-p keeps.

  The kept tokens are the most likely ones up to the first whose cumulative mass reaches `top_p`. Usually they are
  among the few hundred most likely (`lax.top_k`, fast); otherwise a bisection over the bit patterns of
  non-negative floats finds the exact threshold without sorting the vocabulary (sorting is slow on CPU).
  """
  ranked = jax.lax.top_k(probs, min(_TOP_P_CANDIDATES, probs.shape[-1]))[0]
  mass_before = jnp.cumsum(ranked, axis=-1) - ranked
  from_ranked = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)

  def bisection():
    # Smallest t whose strictly more likely tokens have mass below top_p.
    def halve(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      mass = jnp.where(probs > jax.lax.bitcast_convert_type(mid, jnp.float32), probs, 0).sum(-1, keepdims=True)
      return jnp.where(mass >= top_p, mid, lo), jnp.where(mass >= top_p, hi, mid)

    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)
    hi = jnp.full_like(lo, jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32) + 1)
    return jax.lax.bitcast_convert_type(jax.lax.fori_loop(0, 31, halve, (lo, hi))[1], jnp.float32)

  return jax.lax.cond(jnp.all(ranked.sum(-1) >= top_p), lambda: from_ranked, bisection)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: jax.Array | float | None = None,
                  min_p: jax.Array | float | None = None) -> jax.Array:
  """Sets to -inf what top-k, then top-p, then min-p remove (transformers' warpers; 0 or None is off).

  top-k keeps the logits at least as large as the k-th; top-p keeps the most likely tokens until their mass
  reaches `top_p` (at least one); min-p drops tokens less likely than `min_p` times the most likely one.
  """
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0].min(-1, keepdims=True)  # [..., -1:] would sort
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < _top_p_threshold(probs, top_p), -jnp.inf, logits)
  if min_p is not None:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), -jnp.inf, logits)
  return logits


@dataclasses.dataclass(frozen=True)
class _DecodeSpec:
  """The static part of a decode program (a new value compiles a new program)."""

  max_new_tokens: int
  num_samples: int
  greedy: bool
  top_k: int
  top_p: bool
  min_p: bool
  eos_ids: tuple[int, ...]
  stop_ids: tuple[int, ...]

  @classmethod
  def make(cls, sampling: SamplingConfig, eos_ids: Sequence[int]) -> "_DecodeSpec":
    eos_ids = tuple(sorted(set(eos_ids)))
    return cls(sampling.max_new_tokens, sampling.num_samples, sampling.greedy, sampling.top_k,
               sampling.top_p < 1, sampling.min_p > 0, eos_ids,
               tuple(sorted(set(sampling.stop_token_ids) - set(eos_ids))))


_DRAW_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF draw


def _first_above(cumulative: jax.Array, target: jax.Array) -> jax.Array:
  """Per row, the first index whose running total exceeds `target` [rows, 1]; where rounding leaves none, the last
  index that adds mass. An index that adds nothing never exceeds first, so zero-probability entries are never
  chosen."""
  n = cumulative.shape[-1]
  above = jnp.argmax(cumulative > target, axis=-1)
  adds = jnp.diff(cumulative, axis=-1, prepend=jnp.zeros_like(cumulative[..., :1])) > 0
  last_adding = n - 1 - jnp.argmax(adds[..., ::-1], axis=-1)
  return jnp.where(jnp.any(cumulative > target, axis=-1), above, last_adding)


def draw(probs: jax.Array, keys: jax.Array) -> jax.Array:
  """One index per row of `probs` [rows, V] (non-negative, not necessarily normalised), each from its row's key.

  Inverse CDF with one uniform per row, in two levels: the block of _DRAW_BLOCK entries whose running mass crosses
  it, then the entry within that block. It reads the probabilities about twice, where a Gumbel-max draw
  (`jax.random.categorical`) generates V random numbers per row and step."""
  rows, v = probs.shape
  blocks = -(-v // _DRAW_BLOCK)
  probs = jnp.pad(probs, ((0, 0), (0, blocks * _DRAW_BLOCK - v))).reshape(rows, blocks, _DRAW_BLOCK)
  block_mass = probs.sum(-1)
  block_cum = jnp.cumsum(block_mass, axis=-1)
  target = jax.vmap(jax.random.uniform)(keys)[:, None] * block_cum[:, -1:]
  block = _first_above(block_cum, target)
  within = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]
  before = jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=1)
  return (block * _DRAW_BLOCK + _first_above(jnp.cumsum(within, axis=-1), target - before)).astype(jnp.int32)


def _next_tokens(logits, keys, spec: _DecodeSpec, temperature, top_p, min_p) -> jax.Array:
  """[rows, V] fp32 logits -> [rows] ids: argmax, or a draw from the filtered softmax with each row's key."""
  if spec.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, spec.top_k, top_p if spec.top_p else None,
                         min_p if spec.min_p else None)
  return draw(jax.nn.softmax(logits, axis=-1), keys)


def _any_of(tokens: jax.Array, ids: tuple[int, ...]) -> jax.Array:
  return functools.reduce(jnp.logical_or, [tokens == i for i in ids], jnp.zeros(tokens.shape, bool))


def _share_prompt_cache(cache: transformer.Cache, num_samples: int) -> transformer.Cache:
  """Repeats each prompt's cache for its samples (rows i*N .. i*N+N-1)."""
  cache = transformer.map_kv(lambda x, batch_axis, _: jnp.repeat(x, num_samples, axis=batch_axis), cache)
  return dict(cache, valid=jnp.repeat(cache["valid"], num_samples, axis=0),
              pos=jnp.repeat(cache["pos"], num_samples, axis=0), next_pos=jnp.repeat(cache["next_pos"], num_samples))


def _grow_cache(cache: transformer.Cache, slots: int) -> transformer.Cache:
  """Appends empty slots up to `slots`."""

  def grow(x, axis):
    return jnp.pad(x, [(0, slots - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])

  cache = transformer.map_kv(lambda x, _, slot_axis: grow(x, slot_axis), cache)
  return dict(cache, valid=grow(cache["valid"], 1), pos=grow(cache["pos"], 1))


DECODE_SEGMENT = 64  # new tokens per decode loop; each loop's cache has only the slots it can reach


def _segment_ends(max_new_tokens: int) -> list[int]:
  return list(range(DECODE_SEGMENT, max_new_tokens, DECODE_SEGMENT)) + [max_new_tokens]


def _decode(cfg, spec, params, prompt_ids, prompt_mask, active, key_data, temperature, top_p, min_p):
  """Prefill + decode loops. prompt_ids/mask [B, T] left-padded; active [B] (False: a bucket filler row);
  key_data [B, N, ...] raw keys. Returns tokens [B*N, max_new_tokens] (_PAD after the end) and reasons [B*N].

  Decoding runs in segments of DECODE_SEGMENT tokens, each a `lax.while_loop` over a cache just large enough for
  it (attention reads every slot), and stops as soon as every row has finished.
  """
  _TRACES[0] += 1
  b, t = prompt_ids.shape
  n = spec.num_samples
  # On a CPU mesh the layers' weights come split (`decode_params`) and the cache is kept per layer: the layers run
  # one after another, each writing and reading its own entry in place. XLA's CPU backend computes a bf16 update of
  # a stacked cache in fp32 over the whole cache (every layer, every step); for fp32 a stacked cache beside split
  # weights measured 5% faster but with 0.55 GB more peak memory and 1.7x the compilation time (SmolLM2-135M, 32
  # rows sampled).
  dtype = params["embed"].dtype
  cache = transformer.init_cache(cfg, b, t, dtype, per_layer=sharding.platform() == "cpu")
  hidden, cache = transformer.forward(params, cfg, prompt_ids, prompt_mask, cache)
  logits = jnp.repeat(transformer.lm_head(params, cfg, hidden[:, -1]), n, axis=0)
  keys = jax.random.wrap_key_data(key_data.reshape(b * n, *key_data.shape[2:]))

  def choose(step, logits):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return _next_tokens(logits, step_keys, spec, temperature, top_p, min_p)

  def record(step, token, tokens, done, reason):
    token = jnp.where(done, _PAD, token)
    eos, stop = _any_of(token, spec.eos_ids), _any_of(token, spec.stop_ids)
    reason = jnp.where(eos, _EOS, jnp.where(stop, _STOP, reason))
    return token, tokens.at[:, step].set(token), done | eos | stop, reason

  def step_fn(state):
    step, cache, token, tokens, done, reason = state
    hidden, cache = transformer.forward(params, cfg, jnp.maximum(token, 0)[:, None], None, cache)
    token = choose(step, transformer.lm_head(params, cfg, hidden[:, 0]))
    return (step + 1, cache) + record(step, token, tokens, done, reason)

  tokens = jnp.full((b * n, spec.max_new_tokens), _PAD, jnp.int32)
  first = record(0, choose(0, logits), tokens, ~jnp.repeat(active, n), jnp.full((b * n,), _LENGTH, jnp.int32))
  step, cache, *rest = (jnp.int32(1), _share_prompt_cache(cache, n)) + first
  for end in _segment_ends(spec.max_new_tokens):  # the token fed at step s sits in slot t + s - 1
    unfinished = lambda state, end=end: (state[0] < end) & ~jnp.all(state[4])
    step, cache, *rest = jax.lax.while_loop(unfinished, step_fn, (step, _grow_cache(cache, t + end - 1), *rest))
  _, tokens, _, reason = rest
  return tokens, reason


def _decode_param_shardings(mesh: jax.sharding.Mesh, params: Any) -> Any:
  """Where the decode program takes the weights of a model with `params` (`decode_params`)."""
  shardings = sharding.param_shardings(params, mesh)
  if sharding.platform(mesh) != "cpu":
    return shardings
  return transformer.decode_layers_shardings(shardings, jax.tree_util.tree_leaves(params["layers"])[0].shape[0])


def decode_params(mesh: jax.sharding.Mesh, params: Any) -> Any:
  """The weights as the decode program for `mesh` takes them: on a CPU mesh `transformer.decode_layers(params)`
  (per-layer, projections [out, in]; a copy made by its own program, so their layout reaches the decode program's
  dots), elsewhere `params` themselves. Abstract `params` give abstract weights."""
  if sharding.platform(mesh) != "cpu":
    return params
  shardings = _decode_param_shardings(mesh, params)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
    return sharding.abstract_tree(jax.eval_shape(transformer.decode_layers, params), shardings)
  return sharding.jit(transformer.decode_layers, mesh, out_shardings=shardings)(params)


def build_decode(mesh: jax.sharding.Mesh, params: Any) -> Callable:
  """The decode program for a model with `params` on `mesh`: called as (cfg, spec, decode_params(mesh, params),
  prompt_ids, prompt_mask, active, key_data, temperature, top_p, min_p); batch inputs and outputs split over (data,
  fsdp), the sampling scalars replicated. Each (cfg, spec, shape) compiles once per process whichever built program
  runs it."""
  rows, scalar = sharding.batch_sharding(mesh, 1), sharding.replicated(mesh)
  return sharding.jit(_decode, mesh, static_argnames=("cfg", "spec"),
                      in_shardings=(_decode_param_shardings(mesh, params), rows, rows, rows, rows, scalar, scalar,
                                    scalar),
                      out_shardings=(rows, rows))


def lowerable(cfg: Any, mesh: jax.sharding.Mesh, dtype: Any, sampling: SamplingConfig, rows: int,
              prompt_length: int, eos: Sequence[int] = (0,)) -> sharding.Lowerable:
  """The decode program of `build_decode` (prefill + the decode loops) for `rows` prompts of `prompt_length` tokens
  and `sampling` (num_samples generations of max_new_tokens each), with abstract arguments, to compile ahead of
  time for `mesh` (any platform)."""
  params = sharding.abstract_params(cfg, dtype, mesh)
  rows_sharding = sharding.batch_sharding(mesh, 1)  # as `stream` places them
  key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  scalar = sharding.abstract((), jnp.float32, sharding.replicated(mesh))
  args = (cfg, _DecodeSpec.make(sampling, eos), decode_params(mesh, params),
          sharding.abstract((rows, prompt_length), jnp.int32, rows_sharding),
          sharding.abstract((rows, prompt_length), jnp.int32, rows_sharding),
          sharding.abstract((rows,), jnp.bool_, rows_sharding),
          sharding.abstract((rows, sampling.num_samples) + key_shape.shape, key_shape.dtype, rows_sharding),
          scalar, scalar, scalar)
  return sharding.Lowerable("generate", build_decode(mesh, params), args, mesh)


def num_compilations() -> int:
  """Decode programs compiled so far in this process (one per prompt bucket x batch bucket x static settings)."""
  return _TRACES[0]


# ----------------------------------------------------------------------------------------------------------------
# Stop ids and batches.


def eos_ids(model: Any) -> tuple[int, ...]:
  """EOS ids of the model config and the tokenizer."""
  ids = set(model.config.eos_token_ids)
  tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
  if tokenizer_eos is not None:
    ids.add(int(tokenizer_eos))
  return tuple(sorted(ids))


def _bucket(length: int, cap: int) -> int:
  """Prompt-length bucket: the next power of two (at least MIN_PROMPT_BUCKET), at most `cap`."""
  return min(cap, max(MIN_PROMPT_BUCKET, 1 << max(0, length - 1).bit_length()))


def _batches(lengths: Sequence[int], batch_size: int, cap: int) -> list[tuple[int, list[int]]]:
  """(length bucket, prompt positions) per batch: prompts sorted by length, `batch_size` per batch."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  return [(_bucket(lengths[order[k]], cap), order[k:k + batch_size]) for k in range(0, len(order), batch_size)]


def _batch_rows(count: int, batch_size: int, multiple: int) -> int:
  """Rows of a compiled batch: a power of two up to `batch_size`, a multiple of the mesh's batch split."""
  rows = min(batch_size, 1 << max(0, count - 1).bit_length())
  return -(-rows // multiple) * multiple


def _row_keys(key: Any, indices: Sequence[int], num_samples: int) -> np.ndarray:
  """Raw key data [P, N, ...]: `key` is a seed, a key (folded with index and sample) or a [P, N] key array."""
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 2:
    if key.shape != (len(indices), num_samples):
      raise ValueError(f"a key array must have shape (prompts, num_samples) = {(len(indices), num_samples)}, "
                       f"got {key.shape}")
    return np.asarray(jax.random.key_data(key))
  fold = jax.vmap(jax.vmap(lambda k, i, s: jax.random.fold_in(jax.random.fold_in(k, i), s),
                           (None, None, 0)), (None, 0, None))
  return np.asarray(jax.random.key_data(fold(key, jnp.asarray(indices, jnp.uint32), jnp.arange(num_samples))))


def _to_host(x: jax.Array) -> np.ndarray:
  return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)




def _prompt_ids(tokenizer: Any, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
  """Token ids of each prompt (a text is encoded without added special tokens)."""
  texts = [p for p in prompts if isinstance(p, str)]
  encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
  ids = [next(encoded) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
  if any(not p for p in ids):
    raise ValueError(f"prompt {next(i for i, p in enumerate(ids) if not p)} is empty")
  return ids


def _batch_arrays(ids: list[list[int]], keys: np.ndarray, batch: list[int], rows: int, length: int
                  ) -> list[np.ndarray]:
  """Host inputs of one batch: prompt ids and mask [rows, length] (left-padded), active [rows] (False: a filler
  row of the batch bucket) and key data [rows, N, ...]."""
  prompt_ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, i in enumerate(batch):
    prompt_ids[r, length - len(ids[i]):] = ids[i]
    mask[r, length - len(ids[i]):] = 1
  key_data = np.zeros((rows,) + keys.shape[1:], keys.dtype)
  key_data[:len(batch)] = keys[batch]
  return [prompt_ids, mask, np.arange(rows) < len(batch), key_data]


def _generations(tokens: np.ndarray, reasons: np.ndarray, r: int, n: int, tokenizer: Any) -> list[Generation]:
  """The `n` generations of batch row `r` from the decoded tokens [rows * n, T] and finish reasons [rows * n]."""
  gens = []
  for row in range(r * n, (r + 1) * n):
    out = tokens[row][tokens[row] != _PAD].tolist()
    reason = FINISH_REASONS[reasons[row]]
    text = None
    if tokenizer is not None:
      text = tokenizer.decode(out if reason == "length" else out[:-1], skip_special_tokens=True)
    gens.append(Generation(out, reason, text))
  return gens


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def stream(model: Any, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig, key: Any = 0, *,
           indices: Sequence[int] | None = None, batch_size: int = 16, max_prompt_tokens: int | None = None,
           progress: bool = True, desc: str = "generate") -> Iterator[tuple[int, list[Generation]]]:
  """Yields (position in `prompts`, its `num_samples` generations) as each batch finishes.

  `model` is a `loading.Model` (config, params, mesh, tokenizer; the tokenizer may be None when every prompt is a
  list of ids). A text prompt is encoded as laid out (see `instructions.format_prompt`). `key`: a seed or key,
  folded with `indices` (default: positions) and the sample index; or a [len(prompts), num_samples] key array used
  as is. Prompts longer than `max_prompt_tokens` (default 2048, within the model's context) keep their last tokens.
  """
  if batch_size < 1 or (max_prompt_tokens or 0) < 0:
    raise ValueError(f"sampling.batch_size={batch_size} must be >= 1 and sampling.max_prompt_tokens="
                     f"{max_prompt_tokens} >= 0")
  if not prompts:
    return
  cfg, mesh, tokenizer = model.config, model.mesh, model.tokenizer
  ids = _prompt_ids(tokenizer, prompts)
  cap = max_prompt_tokens or min(2048, cfg.max_position_embeddings - sampling.max_new_tokens)
  if cap < 1:
    raise ValueError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the model's "
                     f"{cfg.max_position_embeddings} positions")
  truncated = sum(len(p) > cap for p in ids)
  if truncated:
    runtime.log(f"{truncated} prompt(s) longer than {cap} tokens keep their last {cap} tokens")
    ids = [p[-cap:] for p in ids]
  n = sampling.num_samples
  keys = _row_keys(key, list(range(len(ids))) if indices is None else indices, n)
  spec = _DecodeSpec.make(sampling, eos_ids(model) + chat.end_of_turn_ids(tokenizer))
  scalars = [np.float32(v) for v in (sampling.temperature or 1.0, sampling.top_p, sampling.min_p)]
  multiple = sharding.batch_multiple(mesh)
  batch_size = -(-batch_size // multiple) * multiple
  decode, rows_sharding = build_decode(mesh, model.params), sharding.batch_sharding(mesh, 1)
  params = decode_params(mesh, model.params)
  bar = tqdm(total=len(ids), unit="prompt", desc=desc, disable=not progress or not runtime.is_main_process())
  with bar:
    for length, batch in _batches([len(p) for p in ids], batch_size, cap):
      rows = _batch_rows(len(batch), batch_size, multiple)
      inputs = [sharding.to_global(x, rows_sharding) for x in _batch_arrays(ids, keys, batch, rows, length)]
      with jax.set_mesh(mesh):
        tokens, reasons = decode(cfg, spec, params, *inputs, *scalars)
      tokens, reasons = _to_host(tokens), _to_host(reasons)
      for r, i in enumerate(batch):
        yield i, _generations(tokens, reasons, r, n, tokenizer)
      bar.update(len(batch))


def generate(model: Any, prompts: Sequence[str | Sequence[int]], sampling: SamplingConfig, key: Any = 0,
             **kwargs: Any) -> list[list[Generation]]:
  """`num_samples` generations for each prompt, in prompt order (arguments as `stream`)."""
  out: list[list[Generation]] = [[] for _ in prompts]
  for i, gens in stream(model, prompts, sampling, key, **kwargs):
    out[i] = gens
  return out
