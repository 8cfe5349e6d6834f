"""The IPO preference classifier: P(Yes) of a (prompt, response) under a yes/no question, batched and jitted.

The score is the next-token distribution after the laid-out text (`layout`), renormalised over the Yes and No
tokens: P(Yes) = sigmoid(logit_yes - logit_no). Each row also records the raw log-odds and the Yes+No probability
mass (which needs the log-sum-exp over the vocabulary at that one position only).

`Scorer.score_pairs` plans the shapes of a run (`planner`: length buckets under `max_programs` compiled programs,
shared chosen/rejected starts run once into a KV cache, or packed rows), builds the batches on the host and runs
them one ahead of the host through the jitted programs (`programs`). Whatever the plan, the scores equal the
plain ones to 1e-5. RewardBench rows under one or several instructions are built in ipo_jax/evals/ipo_rows.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from ipo_jax import runtime, sections, sharding
from ipo_jax.ipo import layout as layout_lib
from ipo_jax.ipo import planner, programs
from ipo_jax.model import chat

ENSEMBLES = ("mean_prob", "mean_log_odds")
PACKING = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class Settings(planner.BatchTokens):
  """`config.scoring` (see configs/rewardbench.py for what each field means)."""

  CPU_BATCH_TOKENS = 2048  # a batch's activations stay in cache
  ACCELERATOR_BATCH_TOKENS = 8192

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
    layouts, truncations = layout_lib.LAYOUTS, layout_lib.TRUNCATIONS
    checks = [
        (self.layout in layouts, f"scoring.layout must be one of {layouts}, got {self.layout!r}"),
        (self.truncation in truncations, f"scoring.truncation must be one of {truncations}, got {self.truncation!r}"),
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

  @classmethod
  def from_config(cls, scoring: Any) -> "Settings":
    """From the scoring section (fields this class does not know, e.g. prompts_file, are ignored)."""
    return sections.from_section(cls, scoring)


def num_compilations() -> int:
  """Scoring programs compiled so far in this process (all scorers together)."""
  return programs.num_compilations()


def sigmoid(x: np.ndarray) -> np.ndarray:
  """P(Yes) from log-odds."""
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def flop_rate(stats: dict[str, Any], seconds: float) -> dict[str, float]:
  """Useful and executed GFLOP/s, and the slots processed per token of the sequences (padding adds to it, shared
  starts run once take from it) of a scoring run's stats."""
  return {
      "useful_gflops": stats["useful_flops"] / seconds / 1e9 if seconds else math.nan,
      "executed_gflops": stats["executed_flops"] / seconds / 1e9 if seconds else math.nan,
      "slots_per_token": stats["processed_slots"] / stats["tokens"] if stats["tokens"] else 0.0,
  }


def _left_pad(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """ids and mask [rows, length] with `seqs` at the right end of the first rows (the rest: filler rows)."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, s in enumerate(seqs):
    if len(s):
      ids[r, length - len(s):] = s
      mask[r, length - len(s):] = 1
  return ids, mask


def _pack(seqs: Sequence[Sequence[int]], shared: np.ndarray | None, batch: Sequence[Sequence[tuple[int, ...]]],
          rows: int, capacity: int, scored: int, pad_id: int) -> tuple[list[np.ndarray], list[int], list[int]]:
  """The arrays of one batch of packed rows ([ids, segments, branches] [rows, capacity] and ends [rows, scored]),
  the scored sequences and their output slots. A segment of a pair holds the shared start (branch 0), then the
  chosen (1) and the rejected (2) continuations."""
  ids = np.full((rows, capacity), pad_id, np.int32)
  segments = np.zeros((rows, capacity), np.int32)
  branches = np.zeros((rows, capacity), np.int32)
  ends = np.zeros((rows, scored), np.int32)
  idx, slots = [], []
  for r, row in enumerate(batch):
    start, done = 0, 0
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
          ends[r, done] = start - 1
          slots.append(r * scored + done)
          idx.append(i)
          done += 1
  return [ids, segments, branches, ends], idx, slots


class Scorer:
  """P(Yes) of token sequences on a loaded model (`loading.Model`: config, params, mesh, tokenizer).

  `stats` accumulates the sequences, their tokens, the processed slots and the useful / executed FLOPs of every
  run; `shapes` the (program, rows, length) run so far; `last_plan` the plan of the last `score_pairs` call.
  """

  def __init__(self, model: Any, settings: Settings = Settings(), answers: tuple[int, int] | None = None):
    """`answers`: (yes id, no id) to score token ids without a tokenizer; by default from the layout's answers."""
    self.cfg, self.mesh, self.tokenizer = model.config, model.mesh, model.tokenizer
    self.model, self.settings = model, settings.on(sharding.platform(self.mesh))
    if settings.max_length > self.cfg.max_position_embeddings:
      raise ValueError(f"scoring.max_length={settings.max_length} exceeds the model's "
                       f"{self.cfg.max_position_embeddings} positions")
    self.layout = None if answers else layout_lib.make_layout(settings, self.tokenizer)
    self.answer_ids = tuple(answers) if answers else layout_lib.answer_ids(self.tokenizer, self.layout)
    self.pad_id = chat.pad_id(self.tokenizer)
    self.multiple = sharding.batch_multiple(self.mesh)
    self.programs = programs.build(self.cfg, self.mesh, model.params)
    self.stats = {"sequences": 0, "tokens": 0, "processed_slots": 0, "useful_flops": 0.0, "executed_flops": 0.0}
    self.shapes: set[tuple[str, int, int]] = set()
    self.last_plan: planner.Plan | None = None

  @property
  def num_programs(self) -> int:
    """Distinct programs this scorer has run: each is compiled at most once per process."""
    return len(self.shapes)

  def encode(self, examples: Sequence[tuple[str, str, str]]) -> list[tuple[list[int], bool]]:
    """Token ids and a truncated flag for each (instruction, prompt, response), laid out and truncated."""
    s = self.settings
    return layout_lib.encode_examples(self.tokenizer, self.layout, examples, s.max_length, s.truncation)

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
    shared = np.array([planner.shared_length(a, b) for a, b in pairs]) if self.settings.shared_prefix else None
    p = planner.plan(self.cfg, lengths, shared, self.settings, self.multiple)
    self.last_plan = p
    seqs = [s for pair in pairs for s in pair]
    self.stats["sequences"] += len(seqs)
    self.stats["tokens"] += int(lengths.sum())
    causal = planner.flops(self.cfg, lengths, (lengths + 1) / 2).sum()
    self.stats["useful_flops"] += float(causal + planner.head_flops(self.cfg) * len(seqs))
    if p.packed:
      steps = self._packed_steps(seqs, shared, p)
    else:
      steps = self._shared_steps(seqs, shared, p) if p.prefix else self._plain_steps(seqs, p)
    yield from self._run(steps, len(seqs))

  # -- steps: (sequence indices, output slots or None, a thunk dispatching the program) -------------------------

  def _plain_steps(self, seqs, p: planner.Plan):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = 0
    for bucket, rows in zip(p.buckets, p.rows):
      end = start
      while end < len(order) and len(seqs[order[end]]) <= bucket:
        end += 1
      for k in range(start, end, rows):
        idx = order[k:min(k + rows, end)]
        ids, mask = _left_pad([seqs[i] for i in idx], rows, bucket, self.pad_id)
        self._count(rows * bucket, planner.row_flops(self.cfg, bucket) * rows)
        self.shapes.add(("plain", rows, bucket))
        yield np.array(idx), None, lambda ids=ids, mask=mask: self.programs.plain(
            self.cfg, self.model.params, self._put(ids), self._put(mask), self._answers())
      start = end

  def _shared_steps(self, seqs, shared, p: planner.Plan):
    """Windows of pairs: their prefixes prefilled in one call, then the continuations in bucketed batches."""
    n_pairs = len(seqs) // 2
    cut = np.minimum(shared, p.prefix)
    cont_len = np.array([len(s) for s in seqs]) - np.repeat(cut, 2)
    window = max(self.multiple, -(-min(self.settings.window, n_pairs) // self.multiple) * self.multiple)
    order = sorted(range(n_pairs), key=lambda i: max(cont_len[2 * i], cont_len[2 * i + 1]))
    for w in range(0, n_pairs, window):
      members = order[w:w + window]
      ids, mask = _left_pad([seqs[2 * i][:cut[i]] for i in members], window, p.prefix, self.pad_id)
      self._count(window * p.prefix, planner.flops(self.cfg, p.prefix, p.prefix) * window)
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
          executed = planner.flops(self.cfg, bucket, p.prefix + bucket) + planner.head_flops(self.cfg)
          self._count(rows * bucket, executed * rows)
          self.shapes.add(("continuation", rows, bucket))
          yield seq_idx, None, self._continuation_step(ids, mask, cache, row_idx, c_ids, c_mask)
        start = end

  def _continuation_step(self, ids, mask, cache, row_idx, c_ids, c_mask):
    """A thunk scoring continuations after the window's prefill (run by the first of its steps, kept in `cache`)."""

    def step():
      if not cache:
        cache.append(self.programs.prefill(self.cfg, self.model.params, self._put(ids), self._put(mask)))
      return self.programs.continuation(self.cfg, self.model.params, cache[0], self._replicate(row_idx),
                                        self._put(c_ids), self._put(c_mask), self._answers())

    return step

  def _packed_steps(self, seqs, shared, p: planner.Plan):
    """Batches of packed rows; each step's outputs are the [rows * scored] slots, read back at `slots`."""
    capacity, rows = p.buckets[0], p.rows[0]
    for batch in p.packed:
      arrays, idx, slots = _pack(seqs, shared, batch, rows, capacity, p.scored, self.pad_id)
      self._count(rows * capacity, planner.row_flops(self.cfg, capacity, p.scored) * rows)
      self.shapes.add(("packed", rows, capacity))
      yield np.array(idx), np.array(slots), lambda arrays=arrays: self.programs.packed(
          self.cfg, self.model.params, *(self._put(x) for x in arrays), self._answers())

  # -- running ---------------------------------------------------------------------------------------------------

  def _put(self, x: np.ndarray) -> jax.Array:
    return sharding.to_global(x, sharding.batch_sharding(self.mesh, x.ndim))

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
