"""The shapes of a scoring run, chosen from the data: a FLOP model, length buckets, packing and shared prefixes.

Batches are left-padded to a few length buckets chosen from the data (an exact dynamic programme minimising
padded FLOPs) under a budget of `max_programs` compiled programs, rows sorted by length, split over the mesh's
(data, fsdp) axes. With `shared_prefix`, the tokens a chosen/rejected pair shares (instruction and prompt, up to
`prefix_length` of them) can be run once into a KV cache that both continuations attend to (gathered along the
batch); the planner uses it when its FLOP model says it saves work. With `packing` ("auto": when the FLOP model
says it saves work; "always"; "never"), sequences are instead packed first-fit into rows as long as the longest
one: no padding and one compiled program, at the price of attention over the longer rows; with `shared_prefix` a
pair that fits in a row is one segment, its shared start once and then both continuations. Cache-less attention is
block-causal (`transformer.QUERY_BLOCK`), which the FLOP model counts.

`settings` below is a `scorer.Settings`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np

from ipo_jax import sharding
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig

PREFIX_CHOICES = 8  # shared-prefix lengths tried by the planner (multiples of length_multiple)


# ----------------------------------------------------------------------------------------------------------------
# The FLOP model.


def flops(cfg: ModelConfig, tokens: np.ndarray | int, context: np.ndarray | int) -> np.ndarray:
  """Forward FLOPs of `tokens` positions that each attend over `context` slots (matmuls + attention)."""
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  return np.asarray(tokens, np.float64) * (2.0 * cfg.num_params_per_token + attention * np.asarray(context))


def head_flops(cfg: ModelConfig) -> float:
  """The LM head at the one scored position of a row."""
  return 2.0 * cfg.hidden_size * cfg.vocab_size


def row_flops(cfg: ModelConfig, length: int, scored: int = 1) -> float:
  """One cache-less row of `length` slots (block-causal attention) and the LM head at `scored` positions."""
  return float(flops(cfg, length, transformer.attended_slots(length))) + scored * head_flops(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Length buckets.


def choose_buckets(lengths: Sequence[int], count: int, multiple: int, row_cost: Any,
                   bucket_cost: Any = lambda b: 0.0) -> tuple[int, ...]:
  """At most `count` bucket lengths (multiples of `multiple`) minimising the total cost.

  The total is sum(row_cost(bucket of each length)) + sum(bucket_cost(each bucket)) (e.g. the padding rows of a
  bucket's last, partial batch); an exact dynamic programme over the distinct rounded lengths.
  """
  rounded = np.maximum(multiple, -(-np.asarray(lengths, np.int64) // multiple) * multiple)
  values, counts = np.unique(rounded, return_counts=True)
  n, cum = len(values), np.concatenate([[0], np.cumsum(counts)])
  rows = np.array([float(row_cost(int(v))) for v in values])
  fixed = np.array([float(bucket_cost(int(v))) for v in values])
  # best[k, j]: cheapest cover of values[:j+1] by k+1 buckets, the last one at values[j].
  best = np.full((count, n), np.inf)
  back = np.zeros((count, n), np.int64)
  best[0] = cum[1:] * rows + fixed
  for k in range(1, count):
    for j in range(1, n):
      options = best[k - 1, :j] + (cum[j + 1] - cum[1:j + 1]) * rows[j] + fixed[j]
      i = int(np.argmin(options))
      best[k, j], back[k, j] = options[i], i
  k = int(np.argmin(best[:, n - 1]))
  chosen, j = [], n - 1
  while k >= 0:
    chosen.append(int(values[j]))
    j, k = int(back[k, j]), k - 1
  return tuple(sorted(chosen))


class BatchTokens:
  """What settings with a `batch_tokens` field (0: the hardware's default) share: the default per platform, set
  by each class as CPU_BATCH_TOKENS and ACCELERATOR_BATCH_TOKENS, and settings with it fixed for a mesh."""

  CPU_BATCH_TOKENS: ClassVar[int]
  ACCELERATOR_BATCH_TOKENS: ClassVar[int]

  def tokens_per_batch(self, platform: str | None = None) -> int:
    """`batch_tokens`, or when 0 the default of `platform` (cpu, gpu, tpu): the mesh's (default:
    `sharding.platform()`, the mesh set or the default device)."""
    cpu = (platform or sharding.platform()) == "cpu"
    return self.batch_tokens or (self.CPU_BATCH_TOKENS if cpu else self.ACCELERATOR_BATCH_TOKENS)

  def on(self, platform: str) -> Any:
    """These settings with the defaults that depend on the hardware fixed for `platform`."""
    return dataclasses.replace(self, batch_tokens=self.tokens_per_batch(platform))


def batch_rows(bucket: int, settings: BatchTokens, multiple: int) -> int:
  """Rows per batch of a bucket: about `batch_tokens` tokens, at most `max_batch`, a multiple of the mesh split."""
  rows = min(settings.max_batch, max(1, settings.tokens_per_batch() // bucket))
  return max(multiple, rows // multiple * multiple)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The shapes of a scoring run: prefix slots (0: no sharing), buckets and the rows of each bucket's batches;
  or, when packed, the batches of packed rows (sequence indices per row) and the segment slots per row."""

  prefix: int
  buckets: tuple[int, ...]
  rows: tuple[int, ...]
  cost: float
  packed: tuple[tuple[tuple[tuple[int, ...], ...], ...], ...] = ()  # batches > rows > segments > sequences
  scored: int = 0  # scored positions per packed row


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
  """Tokens two sequences share at their start, leaving each at least one token of its own."""
  n = min(len(a), len(b)) - 1
  if n <= 0:
    return 0
  diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
  return int(diff[0]) if len(diff) else n


# ----------------------------------------------------------------------------------------------------------------
# Packing.


def first_fit(lengths: Sequence[int], indices: Sequence[int], capacity: int) -> list[list[int]]:
  """`indices` packed into rows of at most `capacity` tokens, longest first, each into the first row it fits."""
  rows: list[list[int]] = []
  free = np.zeros(0, np.int64)
  for i in sorted(indices, key=lambda i: -lengths[i]):
    fits = np.nonzero(free >= lengths[i])[0]
    if len(fits):
      rows[fits[0]].append(i)
      free[fits[0]] -= lengths[i]
    else:
      rows.append([i])
      free = np.append(free, capacity - lengths[i])
  return rows


def pack_batches(lengths: Sequence[int], capacity: int, rows_per_batch: int, window: int
                 ) -> list[list[list[int]]]:
  """Batches of `rows_per_batch` packed rows, filled window by window (pairs 2i, 2i+1 stay in one window) so
  results stream; a window's last, partial batch is packed again with the next window's sequences."""
  batches, carried = [], []
  for start in range(0, len(lengths), 2 * window):
    rows = first_fit(lengths, carried + list(range(start, min(start + 2 * window, len(lengths)))), capacity)
    full = len(rows) // rows_per_batch * rows_per_batch
    batches += [rows[k:k + rows_per_batch] for k in range(0, full, rows_per_batch)]
    carried = [i for row in rows[full:] for i in row]
  if carried:
    batches.append(first_fit(lengths, carried, capacity))
  return batches


def packing_units(lengths: np.ndarray, shared: np.ndarray | None, capacity: int
                  ) -> tuple[list[tuple[int, ...]], np.ndarray]:
  """The segments to pack and their lengths: a pair whose sequences share a start and fit in `capacity` together
  is one segment (the start once, then each continuation), any other sequence is a segment of its own."""
  units, sizes = [], []
  for p, (a, b) in enumerate(lengths):
    if shared is not None and shared[p] and a + b - shared[p] <= capacity:
      units.append((2 * p, 2 * p + 1))
      sizes.append(a + b - shared[p])
    else:
      units += [(2 * p,), (2 * p + 1,)]
      sizes += [a, b]
  return units, np.array(sizes)


def _packed_plan(cfg: ModelConfig, lengths: np.ndarray, shared: np.ndarray | None, settings: Any,
                 multiple: int) -> Plan:
  mult = settings.length_multiple
  capacity = int(-(-lengths.max() // mult) * mult)
  rows = batch_rows(capacity, settings, multiple)
  units, sizes = packing_units(lengths, shared, capacity)
  batches = [[[units[u] for u in row] for row in batch]
             for batch in pack_batches(sizes, capacity, rows, settings.window)]
  scored = -(-max(sum(map(len, row)) for batch in batches for row in batch) // 4) * 4
  cost = len(batches) * rows * row_flops(cfg, capacity, scored)
  return Plan(0, (capacity,), (rows,), cost, tuple(tuple(tuple(row) for row in b) for b in batches), scored)


# ----------------------------------------------------------------------------------------------------------------
# The plan.


def _bucket_plan(cfg: ModelConfig, lengths: np.ndarray, shared: np.ndarray | None, settings: Any, multiple: int,
                 prefix: int) -> Plan:
  """Buckets (and their cost) for one prefix length (0: no sharing)."""
  if prefix:
    pair_cont = lengths - np.minimum(shared, prefix)[:, None]
    cont, count = pair_cont.reshape(-1), settings.max_programs - 1
    fixed = len(lengths) * flops(cfg, prefix, prefix)
  else:
    cont, count, fixed = lengths.reshape(-1), settings.max_programs, 0.0

  def cost(length):  # one row of a bucket: `length` new tokens attending to prefix + length slots
    if prefix:
      return flops(cfg, length, prefix + length)
    return flops(cfg, length, np.vectorize(transformer.attended_slots)(length))

  def partial_batch(length):  # a bucket's last batch is half filler rows on average
    return cost(length) * settings.tokens_per_batch() // (2 * length)

  buckets = settings.buckets or choose_buckets(cont, count, settings.length_multiple, cost, partial_batch)
  if max(cont) > buckets[-1]:
    raise ValueError(f"scoring.buckets {buckets} do not hold sequences of {max(cont)} tokens")
  assigned = np.searchsorted(buckets, cont)
  counts = np.bincount(assigned, minlength=len(buckets))
  rows = tuple(min(batch_rows(b, settings, multiple), max(multiple, -(-int(n) // multiple) * multiple))
               for b, n in zip(buckets, counts))
  if prefix:  # windows of pairs (as `Scorer` forms them) each end their buckets with a partial batch
    window = min(settings.window, len(lengths))
    order = np.argsort(pair_cont.max(-1), kind="stable")
    window_of = np.empty(len(lengths), np.int64)
    window_of[order] = np.arange(len(lengths)) // window
    fixed += window_of.max() * flops(cfg, prefix, prefix) * window / 2
    touched = np.unique(np.repeat(window_of, 2) * len(buckets) + assigned) % len(buckets)
    total = fixed + float(cost(np.asarray(buckets)[assigned]).sum()) + sum(partial_batch(buckets[i]) for i in touched)
  else:  # exact: every batch of every bucket, filler rows included
    batches = [-(-int(n) // r) for n, r in zip(counts, rows)]
    total = sum(k * r * row_flops(cfg, b) for b, k, r in zip(buckets, batches, rows))
  return Plan(prefix, tuple(buckets), rows, float(total))


def plan(cfg: ModelConfig, lengths: np.ndarray, shared: np.ndarray | None, settings: Any,
         multiple: int = 1) -> Plan:
  """Chooses the prefix length and buckets. `lengths` [N, 2] tokens of each pair's sequences; `shared` [N] the
  tokens each pair shares at its start (None: no sharing); `multiple` the mesh's batch split. Compiled
  programs: len(buckets) (+1 prefill), or 1 when packed; a bucket with fewer sequences than a batch gets a smaller
  batch. `settings.packing`: "always", "never", or "auto" (when cheaper, unless `buckets` or `prefix_length` fix the
  shapes)."""
  mult = settings.length_multiple
  options = [0]
  if shared is not None and settings.shared_prefix:
    if settings.prefix_length:
      options = [settings.prefix_length]
    else:
      options += [mult * i for i in range(1, PREFIX_CHOICES + 1) if mult * i < settings.max_length]
  best = None
  for prefix in options:
    candidate = _bucket_plan(cfg, lengths, shared, settings, multiple, prefix)
    if best is None or candidate.cost < best.cost:
      best = candidate
  forced = settings.buckets or (shared is not None and settings.shared_prefix and settings.prefix_length)
  if settings.packing == "always" or (settings.packing == "auto" and not forced):
    packed = _packed_plan(cfg, lengths, shared, settings, multiple)
    if settings.packing == "always" or packed.cost < best.cost:
      best = packed
  return best
