"""The IPO preference classifier: P(Yes) of a (prompt, response) under a yes/no question, batched and jitted.

The score is the next-token distribution after the laid-out text, renormalised over the Yes and No tokens:
P(Yes) = sigmoid(logit_yes - logit_no). Each row also records the raw log-odds and the Yes+No probability mass
(which needs the log-sum-exp over the vocabulary at that one position only). Only the last position's hidden
state reaches the LM head; no [batch, seq, vocab] logits are ever formed.

Layouts (`scoring.layout`):
  paper     the authors' text, reproduced exactly: `PAPER_TEMPLATE`, no chat template, the tokenizer's default
            special tokens, " Yes" / " No" (leading space).
  chat      the same content as one user turn in the model's chat template with the generation prompt;
            "Yes" / "No".
  template  `scoring.template`, a string with {instruction}, {prompt} and {response}; " Yes" / " No".

Each answer must be exactly one token where it stands (checked by tokenizing the laid-out text with and
without it), never summed over pieces.

Sequences longer than `max_length` lose the end of the response, then of the prompt; the instruction and the
question around the response are never cut (`truncation="keep_question"`). `truncation="paper"` cuts every
sequence on the right at `max_length` tokens as the authors' code did.

Batches are left-padded to a few length buckets chosen from the data (an exact dynamic programme minimising
padded FLOPs) under a budget of `max_programs` compiled programs, rows sorted by length, split over the mesh's
(data, fsdp) axes. With `shared_prefix`, the tokens a chosen/rejected pair shares (instruction and prompt, up to
`prefix_length` of them) can be run once into a KV cache that both continuations attend to (gathered along the
batch); the planner uses it when its FLOP model says it saves work, and the scores equal the plain ones to 1e-5.
With `packing` ("auto": when the FLOP model says it saves work; "always"; "never"), sequences are instead packed
first-fit into rows as long as the longest one (segments attend only within themselves, positions restart, each
sequence's last position is scored): no padding and one compiled program, at the price of attention over the
longer rows; with `shared_prefix` a pair that fits in a row is one segment, its shared start once and then both
continuations, each attending to the start and to itself. Cache-less attention is block-causal
(`modeling.QUERY_BLOCK`), which the FLOP model counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ipo_jax import modeling, runtime, sharding
from ipo_jax.config import ModelConfig

LAYOUTS = ("paper", "chat", "template")
TRUNCATIONS = ("keep_question", "paper")
ENSEMBLES = ("mean_prob", "mean_log_odds")
PACKING = ("auto", "always", "never")
PAPER_TEMPLATE = "{instruction}\n    User : {prompt}\n    Response : {response}\n    "
CHAT_CONTENT = "{instruction}\n    User : {prompt}\n    Response : {response}"
_FIELDS = re.compile(r"\{(instruction|prompt|response)\}")
_DEFAULT_ANSWERS = {"paper": (" Yes", " No"), "chat": ("Yes", "No"), "template": (" Yes", " No")}
_PREFIX_CHOICES = 8  # shared-prefix lengths tried by the planner (multiples of length_multiple)


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.scoring` (see configs/rewardbench.py for what each field means)."""

  layout: str = "paper"
  template: str = ""
  yes: str = ""
  no: str = ""
  max_length: int = 1024
  truncation: str = "keep_question"
  batch_tokens: int = 0
  max_batch: int = 64
  max_programs: int = 8
  length_multiple: int = 32
  buckets: tuple[int, ...] = ()
  shared_prefix: bool = True
  prefix_length: int = 0
  window: int = 256
  packing: str = "auto"
  ensemble: str = "mean_prob"
  progress: bool = True

  def __post_init__(self):
    checks = [
        (self.layout in LAYOUTS, f"scoring.layout must be one of {LAYOUTS}, got {self.layout!r}"),
        (self.truncation in TRUNCATIONS, f"scoring.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}"),
        (self.ensemble in ENSEMBLES, f"scoring.ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}"),
        (self.packing in PACKING, f"scoring.packing must be one of {PACKING}, got {self.packing!r}"),
        (self.layout != "template" or self.template, "scoring.layout='template' needs scoring.template"),
        (self.max_length > 1, f"scoring.max_length must be > 1, got {self.max_length}"),
        (self.max_programs >= 2, f"scoring.max_programs must be >= 2, got {self.max_programs}"),
        (self.length_multiple >= 1, "scoring.length_multiple must be >= 1"),
        (self.batch_tokens == 0 or self.batch_tokens >= self.length_multiple,
         "scoring.batch_tokens must be 0 (the backend's default) or >= scoring.length_multiple"),
        (len(self.buckets) <= self.max_programs, "scoring.buckets has more entries than scoring.max_programs"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  def tokens_per_batch(self) -> int:
    """`batch_tokens`, or when 0: 2048 on CPU (a batch's activations stay in cache), 8192 on an accelerator."""
    return self.batch_tokens or (2048 if jax.default_backend() == "cpu" else 8192)

  @classmethod
  def from_config(cls, scoring: Any) -> "Settings":
    """Reads the fields this class knows from a ConfigDict / dict (others, e.g. prompts_file, are ignored)."""
    get = scoring.get if hasattr(scoring, "get") else lambda k, d=None: getattr(scoring, k, d)
    kwargs = {}
    for field in dataclasses.fields(cls):
      value = get(field.name, None)
      if value is not None:
        kwargs[field.name] = tuple(int(v) for v in value) if field.name == "buckets" else value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Text layout, answer tokens, encoding with truncation.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How (instruction, prompt, response) become the text the model reads, and the two answer strings."""

  kind: str
  template: str
  yes: str
  no: str

  def fill(self, instruction: str, prompt: str, response: str) -> str:
    values = {"instruction": instruction, "prompt": prompt, "response": response}
    return _FIELDS.sub(lambda m: values[m.group(1)], self.template)  # one pass: placeholders in values stay

  def render(self, tokenizer: Any, instruction: str, prompt: str, response: str) -> str:
    text = self.fill(instruction, prompt, response)
    if self.kind != "chat":
      return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)

  @property
  def add_special_tokens(self) -> bool:
    """Raw layouts get the tokenizer's default special tokens; a chat template writes its own."""
    return self.kind != "chat"


def make_layout(settings: Settings, tokenizer: Any | None = None) -> Layout:
  if settings.layout == "paper":
    template = PAPER_TEMPLATE
  elif settings.layout == "chat":
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
      raise ValueError("scoring.layout='chat' needs a tokenizer with a chat template; this one has none")
    template = CHAT_CONTENT
  else:
    template = settings.template
    missing = [f"{{{f}}}" for f in ("prompt", "response") if f"{{{f}}}" not in template]
    if missing:
      raise ValueError(f"scoring.template must contain {' and '.join(missing)}")
  yes, no = _DEFAULT_ANSWERS[settings.layout]
  return Layout(settings.layout, template, settings.yes or yes, settings.no or no)


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
  if not texts:  # fast tokenizers fail on an empty batch
    return []
  return tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


def answer_ids(tokenizer: Any, layout: Layout) -> tuple[int, int]:
  """(yes id, no id): each answer must be one token right after the laid-out text, as the model would see it."""
  context = layout.render(tokenizer, "Is the response correct? Answer Yes or No.", "What is 2 + 2?", "4")
  base, *with_answers = _encode(tokenizer, [context] + [context + a for a in (layout.yes, layout.no)],
                                layout.add_special_tokens)
  ids = []
  for answer, tokens in zip((layout.yes, layout.no), with_answers):
    if tokens[:len(base)] == base and len(tokens) == len(base) + 1:
      ids.append(tokens[-1])
      continue
    pieces = tokenizer.convert_ids_to_tokens
    if tokens[:len(base)] == base:
      how = f"the tokenizer writes it as {len(tokens) - len(base)} tokens {pieces(tokens[len(base):])}"
    else:
      how = (f"the tokenizer merges it with the text before it (the text ends in tokens {pieces(base[-2:])}, with "
             f"the answer in {pieces(tokens[-3:])})")
    raise ValueError(
        f"the answer {answer!r} is not exactly one token where it stands: after the {layout.kind} layout's text "
        f"(ending {context[-16:]!r}) {how}. P(Yes) compares single next-token probabilities; SentencePiece "
        "tokenizers often split ' Yes' into '▁' + 'Yes', and summing the pieces' probabilities (as the paper's "
        "code did) scores a shared piece for both answers. Set scoring.yes / scoring.no to strings that are single "
        "tokens here (e.g. 'Yes' and 'No'), or choose another layout.")
  if ids[0] == ids[1]:
    raise ValueError(f"the answers {layout.yes!r} and {layout.no!r} are the same token ({ids[0]})")
  return ids[0], ids[1]


def _cut_end(tokenizer: Any, text: str, num_tokens: int) -> str:
  """`text` without its last `num_tokens` tokens (cut at a token boundary; "" when nothing is left)."""
  offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
  keep = len(offsets) - num_tokens
  return text[:offsets[keep - 1][1]] if keep > 0 else ""


def encode_examples(tokenizer: Any, layout: Layout, examples: Sequence[tuple[str, str, str]], max_length: int,
                    truncation: str = "keep_question") -> list[tuple[list[int], bool]]:
  """Token ids and a truncated flag for each (instruction, prompt, response)."""
  texts = [layout.render(tokenizer, *ex) for ex in examples]
  encoded = _encode(tokenizer, texts, layout.add_special_tokens)
  out = []
  for example, ids in zip(examples, encoded):
    if len(ids) <= max_length:
      out.append((ids, False))
    elif truncation == "paper":
      out.append((ids[:max_length], True))
    else:
      out.append((_truncate_keeping_question(tokenizer, layout, example, ids, max_length), True))
  return out


def _truncate_keeping_question(tokenizer: Any, layout: Layout, example: tuple[str, str, str], ids: list[int],
                               max_length: int) -> list[int]:
  """Cuts the end of the response, then of the prompt, until the laid-out text fits in `max_length` tokens."""
  instruction, prompt, response = example
  stalled = 0
  while len(ids) > max_length:
    excess = len(ids) - max_length + stalled
    if response:
      response = _cut_end(tokenizer, response, excess)
    elif prompt:
      prompt = _cut_end(tokenizer, prompt, excess)
    else:
      raise ValueError(f"the instruction and the {layout.kind} layout alone take {len(ids)} tokens, more than "
                       f"scoring.max_length={max_length}")
    new = _encode(tokenizer, [layout.render(tokenizer, instruction, prompt, response)], layout.add_special_tokens)[0]
    stalled = stalled + 1 if len(new) >= len(ids) else 0  # a merge across the cut can keep the length
    ids = new
  return ids


# ----------------------------------------------------------------------------------------------------------------
# Length buckets: a few shapes chosen from the data to minimise padded FLOPs.


def flops(cfg: ModelConfig, tokens: np.ndarray | int, context: np.ndarray | int) -> np.ndarray:
  """Forward FLOPs of `tokens` positions that each attend over `context` slots (matmuls + attention)."""
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  return np.asarray(tokens, np.float64) * (2.0 * cfg.num_params_per_token + attention * np.asarray(context))


def head_flops(cfg: ModelConfig) -> float:
  """The LM head at the one scored position of a row."""
  return 2.0 * cfg.hidden_size * cfg.vocab_size


def row_flops(cfg: ModelConfig, length: int, scored: int = 1) -> float:
  """One cache-less row of `length` slots (block-causal attention) and the LM head at `scored` positions."""
  return float(flops(cfg, length, modeling.attended_slots(length))) + scored * head_flops(cfg)


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


def batch_rows(bucket: int, settings: Settings, multiple: int) -> int:
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


def _packed_plan(cfg: ModelConfig, lengths: np.ndarray, shared: np.ndarray | None, settings: Settings,
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


def plan(cfg: ModelConfig, lengths: np.ndarray, shared: np.ndarray | None, settings: Settings,
         multiple: int = 1) -> Plan:
  """Chooses the prefix length and buckets. `lengths` [N, 2] tokens of each pair's sequences; `shared` [N] the
  tokens each pair shares at its start (None: no sharing); `multiple` the mesh's batch split. Compiled
  programs: len(buckets) (+1 prefill), or 1 when packed; a bucket with fewer sequences than a batch gets a smaller
  batch. `settings.packing`: "always", "never", or "auto" (when cheaper, unless `buckets` or `prefix_length` fix the
  shapes)."""
  flat = lengths.reshape(-1)
  mult = settings.length_multiple
  options = [0]
  if shared is not None and settings.shared_prefix:
    if settings.prefix_length:
      options = [settings.prefix_length]
    else:
      options += [mult * i for i in range(1, _PREFIX_CHOICES + 1) if mult * i < settings.max_length]
  best = None
  for prefix in options:
    if prefix:
      pair_cont = lengths - np.minimum(shared, prefix)[:, None]
      cont, count = pair_cont.reshape(-1), settings.max_programs - 1
      fixed = len(lengths) * flops(cfg, prefix, prefix)
    else:
      cont, count, fixed = flat, settings.max_programs, 0.0

    def cost(length, prefix=prefix):  # one row of a bucket: `length` new tokens attending to prefix + length slots
      if prefix:
        return flops(cfg, length, prefix + length)
      return flops(cfg, length, np.vectorize(modeling.attended_slots)(length))

    def partial_batch(length):  # a bucket's last batch is half filler rows on average
      return cost(length) * settings.tokens_per_batch() // (2 * length)

    buckets = settings.buckets or choose_buckets(cont, count, mult, cost, partial_batch)
    if max(cont) > buckets[-1]:
      raise ValueError(f"scoring.buckets {buckets} do not hold sequences of {max(cont)} tokens")
    assigned = np.searchsorted(buckets, cont)
    if prefix:  # windows of pairs (as `Scorer` forms them) each end their buckets with a partial batch
      window = min(settings.window, len(lengths))
      order = np.argsort(pair_cont.max(-1), kind="stable")
      window_of = np.empty(len(lengths), np.int64)
      window_of[order] = np.arange(len(lengths)) // window
      fixed += window_of.max() * flops(cfg, prefix, prefix) * window / 2
      touched = np.unique(np.repeat(window_of, 2) * len(buckets) + assigned) % len(buckets)
    else:
      touched = np.arange(len(buckets))
    counts = np.bincount(assigned, minlength=len(buckets))
    rows = tuple(min(batch_rows(b, settings, multiple), max(multiple, -(-int(n) // multiple) * multiple))
                 for b, n in zip(buckets, counts))
    if prefix:
      total = fixed + float(cost(np.asarray(buckets)[assigned]).sum()) + sum(partial_batch(buckets[i]) for i in touched)
    else:  # exact: every batch of every bucket, filler rows included
      batches = [-(-int(n) // r) for n, r in zip(counts, rows)]
      total = sum(k * r * row_flops(cfg, b) for b, k, r in zip(buckets, batches, rows))
    if best is None or total < best.cost:
      best = Plan(prefix, tuple(buckets), rows, float(total))
  forced = settings.buckets or (shared is not None and settings.shared_prefix and settings.prefix_length)
  if settings.packing == "always" or (settings.packing == "auto" and not forced):
    packed = _packed_plan(cfg, lengths, shared, settings, multiple)
    if settings.packing == "always" or packed.cost < best.cost:
      best = packed
  return best


# ----------------------------------------------------------------------------------------------------------------
# Jitted programs.


def _yes_no(params, cfg: ModelConfig, hidden: jax.Array, answers: jax.Array) -> jax.Array:
  """[B, 2] (replicated): log-odds of yes over no and the log yes+no probability mass, from hidden states [B, D]."""
  logits = modeling.lm_head(params, cfg, hidden)  # [B, V] at the one scored position
  pair = jnp.take(logits, answers, axis=-1)
  log_mass = jax.nn.logsumexp(pair, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
  return sharding.constrain(jnp.stack([pair[:, 0] - pair[:, 1], log_mass], axis=-1), P())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_plain(params, ids, mask, answers, *, cfg):
  hidden, _ = modeling.forward(params, cfg, ids, mask)
  return _yes_no(params, cfg, modeling.last_token_hidden(hidden, mask), answers)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(params, ids, mask, *, cfg):
  cache = modeling.init_cache(cfg, ids.shape[0], ids.shape[1], params["embed"].dtype)
  return modeling.forward(params, cfg, ids, mask, cache=cache)[1]


def _gather_rows(cache: modeling.Cache, rows: jax.Array, extra_slots: int) -> modeling.Cache:
  """The cache of `rows` (indices into its batch) with `extra_slots` empty slots appended."""

  def take(x, batch_axis):
    x = jnp.take(x, rows, axis=batch_axis)
    pad = [(0, 0)] * x.ndim
    pad[batch_axis + 1] = (0, extra_slots)
    return jnp.pad(x, pad)

  kv_spec = P(None, sharding.BATCH, None, "tensor", None)
  return {
      "k": sharding.constrain(take(cache["k"], 1), kv_spec),
      "v": sharding.constrain(take(cache["v"], 1), kv_spec),
      "valid": take(cache["valid"], 0), "pos": take(cache["pos"], 0),
      "next_pos": jnp.take(cache["next_pos"], rows), "length": cache["length"],
  }


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_continuation(params, cache, rows, ids, mask, answers, *, cfg):
  cache = _gather_rows(cache, rows, ids.shape[1])
  hidden, _ = modeling.forward(params, cfg, ids, mask, cache=cache)
  return _yes_no(params, cfg, modeling.last_token_hidden(hidden, mask), answers)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_packed(params, ids, segments, branches, ends, answers, *, cfg):
  """Packed rows: `ends` [B, M] the last position of each sequence (padding slots point anywhere)."""
  hidden, _ = modeling.forward(params, cfg, ids, segment_ids=segments, branch_ids=branches)
  last = jnp.take_along_axis(hidden, ends[:, :, None], axis=1)
  return _yes_no(params, cfg, last.reshape(-1, last.shape[-1]), answers)


def num_compilations() -> int:
  """Scoring programs compiled so far in this process."""
  programs = (_score_plain, _prefill, _score_continuation, _score_packed)
  return sum(f._cache_size() for f in programs)  # pylint: disable=protected-access


def _left_pad(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, s in enumerate(seqs):
    if len(s):
      ids[r, length - len(s):] = s
      mask[r, length - len(s):] = 1
  return ids, mask


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
  """Tokens two sequences share at their start, leaving each at least one token of its own."""
  n = min(len(a), len(b)) - 1
  if n <= 0:
    return 0
  diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
  return int(diff[0]) if len(diff) else n


class Scorer:
  """P(Yes) of token sequences on a loaded model (`loading.Model`: config, params, mesh, tokenizer)."""

  def __init__(self, model: Any, settings: Settings = Settings(), answers: tuple[int, int] | None = None):
    """`answers`: (yes id, no id) to score token ids without a tokenizer; by default from the layout's answers."""
    self.model, self.settings = model, settings
    self.cfg, self.mesh, self.tokenizer = model.config, model.mesh, model.tokenizer
    if settings.max_length > self.cfg.max_position_embeddings:
      raise ValueError(f"scoring.max_length={settings.max_length} exceeds the model's "
                       f"{self.cfg.max_position_embeddings} positions")
    self.layout = None if answers else make_layout(settings, self.tokenizer)
    self.answer_ids = tuple(answers) if answers else answer_ids(self.tokenizer, self.layout)
    self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
    self.multiple = sharding.batch_multiple(self.mesh)
    self.stats = {"sequences": 0, "tokens": 0, "processed_slots": 0, "useful_flops": 0.0, "executed_flops": 0.0}
    self.shapes: set[tuple[str, int, int]] = set()  # (program, rows, length) run so far

  @property
  def num_programs(self) -> int:
    """Distinct programs this scorer has run: each is compiled at most once per process."""
    return len(self.shapes)

  def encode(self, examples: Sequence[tuple[str, str, str]]) -> list[tuple[list[int], bool]]:
    s = self.settings
    return encode_examples(self.tokenizer, self.layout, examples, s.max_length, s.truncation)

  def _put(self, x: np.ndarray) -> jax.Array:
    return sharding.to_global(x, sharding.batch_sharding(self.mesh, x.ndim))

  def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (sequence indices, [n, 2] log-odds and log yes+no mass) as batches finish.

    Sequence 2*i is pairs[i][0], 2*i+1 is pairs[i][1]. Shared starts are scored once when the plan says so.
    """
    lengths = np.array([[len(a), len(b)] for a, b in pairs], np.int64).reshape(-1, 2)
    if not len(lengths):
      return
    if lengths.min() < 1:
      raise ValueError("cannot score an empty sequence")
    shared = np.array([shared_length(a, b) for a, b in pairs]) if self.settings.shared_prefix else None
    p = plan(self.cfg, lengths, shared, self.settings, self.multiple)
    self.last_plan = p
    seqs = [s for pair in pairs for s in pair]
    self.stats["sequences"] += len(seqs)
    self.stats["tokens"] += int(lengths.sum())
    useful = flops(self.cfg, lengths, (lengths + 1) / 2).sum() + head_flops(self.cfg) * len(seqs)  # causal
    self.stats["useful_flops"] += float(useful)
    if p.packed:
      steps = self._packed_steps(seqs, shared, p)
    else:
      steps = self._shared_steps(seqs, shared, p) if p.prefix else self._plain_steps(seqs, p)
    yield from self._run(steps, len(seqs))

  def _plain_steps(self, seqs, p: Plan):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = 0
    for bucket, rows in zip(p.buckets, p.rows):
      end = start
      while end < len(order) and len(seqs[order[end]]) <= bucket:
        end += 1
      for k in range(start, end, rows):
        idx = order[k:min(k + rows, end)]
        ids, mask = _left_pad([seqs[i] for i in idx], rows, bucket, self.pad_id)
        self._count(rows * bucket, row_flops(self.cfg, bucket) * rows)
        self.shapes.add(("plain", rows, bucket))
        yield np.array(idx), None, lambda ids=ids, mask=mask: _score_plain(
            self.model.params, self._put(ids), self._put(mask), self._answers(), cfg=self.cfg)
      start = end

  def _shared_steps(self, seqs, shared, p: Plan):
    """Windows of pairs: their prefixes prefilled in one call, then the continuations in bucketed batches."""
    n_pairs = len(seqs) // 2
    cut = np.minimum(shared, p.prefix)
    cont_len = np.array([len(s) for s in seqs]) - np.repeat(cut, 2)
    window = max(self.multiple, -(-min(self.settings.window, n_pairs) // self.multiple) * self.multiple)
    order = sorted(range(n_pairs), key=lambda i: max(cont_len[2 * i], cont_len[2 * i + 1]))
    for w in range(0, n_pairs, window):
      members = order[w:w + window]
      ids, mask = _left_pad([seqs[2 * i][:cut[i]] for i in members], window, p.prefix, self.pad_id)
      self._count(window * p.prefix, flops(self.cfg, p.prefix, p.prefix) * window)
      self.shapes.add(("prefill", window, p.prefix))
      cache = []  # filled on first use, so the prefill is dispatched in step order
      slots = sorted((cont_len[2 * i + side], 2 * i + side, slot) for slot, i in enumerate(members) for side in (0, 1))
      start = 0
      for bucket, rows in zip(p.buckets, p.rows):
        end = start
        while end < len(slots) and slots[end][0] <= bucket:
          end += 1
        for k in range(start, end, rows):
          chunk = slots[k:min(k + rows, end)]
          seq_idx = np.array([s for _, s, _ in chunk])
          row_idx = np.zeros(rows, np.int32)
          row_idx[:len(chunk)] = [slot for _, _, slot in chunk]
          c_ids, c_mask = _left_pad([seqs[s][cut[s // 2]:] for s in seq_idx], rows, bucket, self.pad_id)
          self._count(rows * bucket, (flops(self.cfg, bucket, p.prefix + bucket) + head_flops(self.cfg)) * rows)
          self.shapes.add(("continuation", rows, bucket))

          def step(ids=ids, mask=mask, cache=cache, row_idx=row_idx, c_ids=c_ids, c_mask=c_mask):
            if not cache:
              cache.append(_prefill(self.model.params, self._put(ids), self._put(mask), cfg=self.cfg))
            return _score_continuation(self.model.params, cache[0], self._replicate(row_idx), self._put(c_ids),
                                       self._put(c_mask), self._answers(), cfg=self.cfg)

          yield seq_idx, None, step
        start = end

  def _packed_steps(self, seqs, shared, p: Plan):
    """Batches of packed rows; each step's outputs are the [rows * scored] slots, read back at `slots`. A segment
    of a pair holds the shared start (branch 0), then the chosen (1) and the rejected (2) continuations."""
    capacity, rows = p.buckets[0], p.rows[0]
    for batch in p.packed:
      ids = np.full((rows, capacity), self.pad_id, np.int32)
      segments = np.zeros((rows, capacity), np.int32)
      branches = np.zeros((rows, capacity), np.int32)
      ends = np.zeros((rows, p.scored), np.int32)
      idx, slots = [], []
      for r, row in enumerate(batch):
        start, scored = 0, 0
        for k, unit in enumerate(row):
          pair = len(unit) > 1
          cut = int(shared[unit[0] // 2]) if pair else 0
          pieces = [(seqs[unit[0]][:cut], 0, None)]  # (tokens, branch, scored sequence)
          pieces += [(seqs[i][cut:], branch, i) for branch, i in enumerate(unit, start=1 if pair else 0)]
          for tokens, branch, i in pieces:
            ids[r, start:start + len(tokens)] = tokens
            segments[r, start:start + len(tokens)] = k + 1
            branches[r, start:start + len(tokens)] = branch
            start += len(tokens)
            if i is not None:
              ends[r, scored] = start - 1
              slots.append(r * p.scored + scored)
              idx.append(i)
              scored += 1
      self._count(rows * capacity, row_flops(self.cfg, capacity, p.scored) * rows)
      self.shapes.add(("packed", rows, capacity))
      yield np.array(idx), np.array(slots), lambda ids=ids, segments=segments, branches=branches, ends=ends: (
          _score_packed(self.model.params, self._put(ids), self._put(segments), self._put(branches), self._put(ends),
                        self._answers(), cfg=self.cfg))

  def _replicate(self, x: np.ndarray) -> jax.Array:
    return sharding.to_global(np.asarray(x, np.int32), sharding.replicated(self.mesh))

  def _answers(self) -> jax.Array:
    return self._replicate(np.asarray(self.answer_ids))

  def _count(self, processed_slots: int, executed: float) -> None:
    self.stats["processed_slots"] += int(processed_slots)
    self.stats["executed_flops"] += float(executed)

  def _run(self, steps, total: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Runs the steps one ahead of the host (dispatch the next batch before reading the last one back)."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, unit="seq", disable=not (self.settings.progress and runtime.is_main_process()),
               dynamic_ncols=True, leave=False)
    pending = None
    for idx, slots, step in steps:
      with jax.set_mesh(self.mesh):
        out = step()
      if pending is not None:
        yield self._fetch(*pending, bar)
      pending = (idx, slots, out)
    if pending is not None:
      yield self._fetch(*pending, bar)
    bar.close()

  @staticmethod
  def _fetch(idx: np.ndarray, slots: np.ndarray | None, out: jax.Array, bar: Any) -> tuple[np.ndarray, np.ndarray]:
    """The outputs of sequences `idx`: the first len(idx) rows, or the rows at `slots`."""
    values = np.asarray(out)[slice(len(idx)) if slots is None else slots].astype(np.float64)
    bar.update(len(idx))
    return idx, values


# ----------------------------------------------------------------------------------------------------------------
# Pairs under one or several instructions.


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def combine(log_odds: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
  """(P(Yes), comparison key) of K scores along the last axis: mean P(Yes) or mean log-odds."""
  if method == "mean_log_odds":
    key = log_odds.mean(-1)
    return sigmoid(key), key
  prob = sigmoid(log_odds).mean(-1)
  return prob, prob


def score_rewardbench_pairs(scorer: Scorer, rows: Sequence[dict[str, Any]],
                            prompt_set: Any) -> Iterator[list[dict[str, Any]]]:
  """Scores (prompt, chosen, rejected, subset) rows under their instructions; yields rows as they finish.

  Each row is scored under every instruction `prompt_set` gives its subset (an ensemble when several, combined
  with `scoring.ensemble`). A result has P(Yes) (`score_*`), log-odds, Yes+No mass, `correct` (chosen strictly
  above rejected; ties are wrong and flagged), truncation flags and token counts. All rows share one plan, so
  the compiled programs stay within `scoring.max_programs`.
  """
  items, item_row = [], []
  for r, row in enumerate(rows):
    for instruction in prompt_set.instructions(row["subset"]):
      items.append(instruction)
      item_row.append(r)
  examples = [(ins, rows[r]["prompt"], rows[r][side]) for ins, r in zip(items, item_row)
              for side in ("chosen", "rejected")]
  encoded = scorer.encode(examples)
  row_items = [[] for _ in rows]
  for i, r in enumerate(item_row):
    row_items[r].append(i)
  remaining = np.array([2 * len(x) for x in row_items])
  values = np.zeros((len(encoded), 2))
  for idx, out in scorer.score_pairs([(encoded[2 * i][0], encoded[2 * i + 1][0]) for i in range(len(items))]):
    values[idx] = out
    finished = []
    for seq in idx:
      r = item_row[seq // 2]
      remaining[r] -= 1
      if remaining[r] == 0:
        finished.append(_pair_result(rows[r], scorer.settings.ensemble, values, encoded, row_items[r]))
    if finished:
      yield finished


def _pair_result(row, method, values, encoded, item_idx) -> dict[str, Any]:
  seq = np.array([[2 * j, 2 * j + 1] for j in item_idx])  # [K, 2]
  log_odds, log_mass = values[seq, 0], values[seq, 1]
  prob, key = combine(log_odds.T, method)
  result = {
      "subset": row["subset"], "id": row["id"],
      "score_chosen": float(prob[0]), "score_rejected": float(prob[1]),
      "log_odds_chosen": float(log_odds[:, 0].mean()), "log_odds_rejected": float(log_odds[:, 1].mean()),
      "yes_no_mass_chosen": float(np.exp(log_mass[:, 0]).mean()),
      "yes_no_mass_rejected": float(np.exp(log_mass[:, 1]).mean()),
      "correct": bool(key[0] > key[1]), "tie": bool(key[0] == key[1]),
      "truncated_chosen": any(encoded[s][1] for s in seq[:, 0]),
      "truncated_rejected": any(encoded[s][1] for s in seq[:, 1]),
      "tokens_chosen": max(len(encoded[s][0]) for s in seq[:, 0]),
      "tokens_rejected": max(len(encoded[s][0]) for s in seq[:, 1]),
  }
  if len(item_idx) > 1:
    result["candidates"] = {"log_odds_chosen": log_odds[:, 0].tolist(), "log_odds_rejected": log_odds[:, 1].tolist()}
  return result


def flop_rate(stats: dict[str, Any], seconds: float) -> dict[str, float]:
  """Useful and executed GFLOP/s, and the slots processed per token of the sequences (padding adds to it, shared
  starts run once take from it) of a scoring run's stats."""
  return {
      "useful_gflops": stats["useful_flops"] / seconds / 1e9 if seconds else math.nan,
      "executed_gflops": stats["executed_flops"] / seconds / 1e9 if seconds else math.nan,
      "slots_per_token": stats["processed_slots"] / stats["tokens"] if stats["tokens"] else 0.0,
  }
