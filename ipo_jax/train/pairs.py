"""Preference pairs in TRL's convention, tokenized and collated into [B, 2, T] batches.

A row holds `prompt`, `chosen` and `rejected`, either all plain strings or all conversational (lists of
{"role", "content"} messages: the prompt's turns, then the responses' assistant turns). Without a `prompt` field the
prompt is the shared beginning of `chosen` and `rejected` (TRL's implicit prompt): their common messages, or for
strings their common text up to the last whitespace.

Formatting: a conversational prompt goes through the tokenizer's chat template with the generation prompt, and each
response is what the template adds after it for the full conversation. A plain prompt is wrapped as one user turn
and its response as one assistant turn when `chat_template` is on (for instruct models); with it off, the prompt
is tokenized as is (with the tokenizer's special tokens) and the response gets the EOS token.

A batch pairs (chosen, rejected) on axis 1: `input_ids`, `attention_mask`, `loss_mask` [B, 2, T], right-padded to a
power-of-two length bucket, `loss_mask` on the response tokens (`collate`). Or one row per pair, the prompt once
(`collate_shared`, the trainer's default): prompt, chosen, rejected and padding in [B, L], with the positions whose
next-token log-probs the loss sums listed in [B, K]. Over-long pairs keep the prompt's last `max_prompt_length`
tokens, then cut each response at `max_length` (prompt + response), in both layouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

import numpy as np

from ipo_jax.data import DataError, read_records

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass
class PreferenceSet:
  """Tokenized pairs: per row the prompt, chosen and rejected response token ids."""

  prompt_ids: list[np.ndarray]
  chosen_ids: list[np.ndarray]
  rejected_ids: list[np.ndarray]
  source: str = ""

  def __len__(self) -> int:
    return len(self.prompt_ids)

  def subset(self, indices: Sequence[int]) -> "PreferenceSet":
    pick = lambda xs: [xs[i] for i in indices]
    return PreferenceSet(pick(self.prompt_ids), pick(self.chosen_ids), pick(self.rejected_ids), self.source)

  def fingerprint(self) -> str:
    """A hash of every token id: identifies the data a cached reference pass belongs to."""
    h = hashlib.sha256()
    for parts in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids):
      for ids in parts:
        h.update(np.asarray(ids, np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _is_messages(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_field(value: Any, field: str, where: str) -> None:
  if value is None or (isinstance(value, (str, list)) and len(value) == 0):
    raise DataError(f"{where}: field {field!r} is missing or empty")
  if isinstance(value, str):
    return
  if not _is_messages(value):
    raise DataError(f"{where}: field {field!r} must be a string or a list of {{'role', 'content'}} messages, "
                    f"got {type(value).__name__}")
  for i, m in enumerate(value):
    if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: field {field!r}, message {i} needs string 'role' and 'content', got {sorted(m)}")


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
  """Splits the shared beginning off `chosen` and `rejected`."""
  if isinstance(chosen, str):
    n = 0
    for a, b in zip(chosen, rejected):
      if a != b:
        break
      n += 1
    if n < min(len(chosen), len(rejected)):
      n = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1), 0)
    return chosen[:n], chosen[n:], rejected[n:]
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  return chosen[:n], chosen[n:], rejected[n:]


def validate_row(row: Any, index: int, source: str) -> tuple[Any, Any, Any]:
  """(prompt, chosen, rejected) of one row, or a DataError naming the row and field."""
  where = f"{source}: row {index}"
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected an object with fields {FIELDS}, got {type(row).__name__}")
  for field in ("chosen", "rejected"):
    _check_field(row.get(field), field, where)
  chosen, rejected = row["chosen"], row["rejected"]
  if isinstance(chosen, str) != isinstance(rejected, str):
    raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both be message lists")
  if row.get("prompt") is None:
    prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    if not prompt:
      raise DataError(f"{where}: field 'prompt' is missing and 'chosen'/'rejected' share no beginning to use as one")
  else:
    prompt = row["prompt"]
    _check_field(prompt, "prompt", where)
    if isinstance(prompt, str) != isinstance(chosen, str):
      raise DataError(f"{where}: field 'prompt' must be of the same kind (string or messages) as 'chosen'")
  for field, value in (("chosen", chosen), ("rejected", rejected)):
    if not value:
      raise DataError(f"{where}: field {field!r} has an empty response after the prompt")
  return prompt, chosen, rejected


def format_pair(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, chat_template: bool, where: str
                ) -> tuple[str, str, str]:
  """Prompt text and the two response texts that follow it."""
  if isinstance(prompt, str):
    if not chat_template:
      eos = tokenizer.eos_token or ""
      return prompt, chosen + eos, rejected + eos
    prompt = [{"role": "user", "content": prompt}]
    chosen = [{"role": "assistant", "content": chosen}]
    rejected = [{"role": "assistant", "content": rejected}]
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(f"{where}: conversational data needs a tokenizer with a chat template")
  prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  responses = []
  for field, response in (("chosen", chosen), ("rejected", rejected)):
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
      raise DataError(f"{where}: field {field!r}: the chat template does not render prompt + response as an "
                      "extension of the prompt")
    responses.append(full[len(prompt_text):])
  return prompt_text, responses[0], responses[1]


def tokenize_rows(rows: Sequence[Any], tokenizer: Any, *, source: str, chat_template: bool = True,
                  skip_invalid: bool = False) -> tuple[PreferenceSet, int]:
  """Validates, formats and tokenizes rows; returns the set and the number of skipped rows."""
  texts, skipped = [], 0
  for i, row in enumerate(rows):
    try:
      texts.append(format_pair(*validate_row(row, i, source), tokenizer, chat_template, f"{source}: row {i}"))
    except DataError as e:
      if not skip_invalid:
        raise DataError(f"{e} (set data.skip_invalid=True to skip such rows)") from None
      skipped += 1
  if not texts:
    if not rows:
      raise DataError(f"{source}: no preference rows; nothing to learn")
    raise DataError(f"{source}: all {len(rows)} rows were skipped as invalid (data.skip_invalid=True); nothing to "
                    "learn: fix the rows' 'prompt'/'chosen'/'rejected' fields")
  prompts, chosen, rejected = (list(col) for col in zip(*texts))
  encode = lambda xs, special: [np.asarray(ids, np.int32) for ids in
                                tokenizer(xs, add_special_tokens=special)["input_ids"]]
  pset = PreferenceSet(encode(prompts, not chat_template), encode(chosen, False), encode(rejected, False), source)
  return pset, skipped


def load(path: str, tokenizer: Any, *, split: str = "train", name: str | None = None, chat_template: bool = True,
         skip_invalid: bool = False, limit: int = 0) -> tuple[PreferenceSet, int]:
  """A preference set from a hub id or a local .jsonl/.parquet file (first `limit` rows when > 0)."""
  rows = read_records(path, split=split, name=name)
  if limit > 0:
    rows = rows[:limit]
  return tokenize_rows(rows, tokenizer, source=path, chat_template=chat_template, skip_invalid=skip_invalid)


def bucket_length(n: int, max_length: int, minimum: int = 16, fine: bool = False) -> int:
  """The padded length for a longest row of `n` tokens: the next power of two (`fine`: the next of 2^k and
  1.5 x 2^k, two programs per octave), at most `max_length`."""
  up = 1 << max(n - 1, 0).bit_length()
  if fine and n <= 3 * up // 4:
    up = 3 * up // 4
  return min(max_length, max(minimum, up))


def identical_pairs(pset: PreferenceSet, *, max_length: int, max_prompt_length: int) -> int:
  """How many pairs have the same chosen and rejected tokens within the budget the batches keep."""
  return sum(bool(np.array_equal(chosen, rejected))
             for _, chosen, rejected in truncated(pset, range(len(pset)), max_length, max_prompt_length))


def truncated(pset: PreferenceSet, indices: Sequence[int], max_length: int, max_prompt_length: int
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(prompt, chosen, rejected) of the rows `indices` within the budget: the prompt's last `max_prompt_length`
  tokens, each response cut so that prompt + response is at most `max_length`."""
  if not 0 < max_prompt_length < max_length:
    raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
  out = []
  for i in indices:
    prompt = pset.prompt_ids[i][-max_prompt_length:]
    room = max_length - len(prompt)
    out.append((prompt, pset.chosen_ids[i][:room], pset.rejected_ids[i][:room]))
  return out


def collate(pset: PreferenceSet, indices: Sequence[int], *, max_length: int, max_prompt_length: int,
            pad_id: int = 0, length: int | None = None) -> dict[str, np.ndarray]:
  """A [B, 2, T] batch of the rows `indices` (T: `length`, else the bucket of the longest row)."""
  seqs = [[(prompt, chosen), (prompt, rejected)]
          for prompt, chosen, rejected in truncated(pset, indices, max_length, max_prompt_length)]
  longest = max(len(p) + len(r) for pair in seqs for p, r in pair)
  t = length or bucket_length(longest, max_length)
  ids = np.full((len(seqs), 2, t), pad_id, np.int32)
  attention = np.zeros((len(seqs), 2, t), np.int32)
  loss = np.zeros((len(seqs), 2, t), np.int32)
  for b, pair in enumerate(seqs):
    for j, (prompt, response) in enumerate(pair):
      n, m = len(prompt), len(response)
      ids[b, j, :n + m] = np.concatenate([prompt, response])
      attention[b, j, :n + m] = 1
      loss[b, j, n:n + m] = 1
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def collate_shared(pset: PreferenceSet, indices: Sequence[int], *, max_length: int, max_prompt_length: int,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
  """One row per pair, the prompt once: `input_ids` [B, L] = prompt, chosen, rejected, padding; `segment_ids`
  (1 on the pair's tokens, 0 on padding), `branch_ids` (0 prompt, 1 chosen, 2 rejected: a response attends to the
  prompt and itself, and its positions continue from the prompt's end), `attention_mask` (a real token).

  The loss's positions [B, K]: `target_pos` (the slot whose next-token distribution predicts the token: the prompt's
  last slot for each response's first token), `target_ids` (the token) and `target_member` (1 chosen, 2 rejected,
  0 padding). L and K are buckets (`bucket_length(fine=True)`) of the batch's longest pair and longest pair of
  responses, so the forward runs each prompt once and the LM head only where a log-prob is summed."""
  rows = truncated(pset, indices, max_length, max_prompt_length)
  t = bucket_length(max(len(p) + len(c) + len(r) for p, c, r in rows), 2 * max_length, fine=True)
  k = bucket_length(max(len(c) + len(r) for _, c, r in rows), 2 * max_length, fine=True)
  b = len(rows)
  ids, segments, branches = (np.full((b, t), pad_id, np.int32), np.zeros((b, t), np.int32),
                             np.zeros((b, t), np.int32))
  target_pos, target_ids, member = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32), np.zeros((b, k), np.int32)
  for i, (prompt, chosen, rejected) in enumerate(rows):
    n = len(prompt)
    ids[i, :n], segments[i, :n] = prompt, 1
    start, slot = n, 0
    for branch, response in ((1, chosen), (2, rejected)):
      m = len(response)
      ids[i, start:start + m], segments[i, start:start + m], branches[i, start:start + m] = response, 1, branch
      # token j of the response is predicted at the slot before it in its branch: the prompt's last for j = 0
      target_pos[i, slot:slot + m] = np.concatenate([[n - 1], np.arange(start, start + m - 1)])
      target_ids[i, slot:slot + m], member[i, slot:slot + m] = response, branch
      start, slot = start + m, slot + m
  return {"input_ids": ids, "attention_mask": (segments > 0).astype(np.int32), "segment_ids": segments,
          "branch_ids": branches, "target_pos": target_pos, "target_ids": target_ids, "target_member": member}


# ---------------------------------------------------------------------------------------------------------------
# Data order: a fixed function of the seed. Epoch e visits the pairs in `np.random.default_rng([seed, e])` order,
# `batch_size` pairs per optimizer step (the last partial batch of an epoch is dropped), so step s always sees the
# same pairs and a resumed run is identical to an uninterrupted one.


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def step_indices(num_pairs: int, batch_size: int, seed: int, step: int) -> tuple[np.ndarray, int]:
  """The pairs of optimizer step `step` (0-based) and its epoch."""
  per_epoch = num_pairs // batch_size
  epoch, k = divmod(step, per_epoch)
  return epoch_order(num_pairs, seed, epoch)[k * batch_size:(k + 1) * batch_size], epoch


def split_train_eval(pset: PreferenceSet, fraction: float, seed: int) -> tuple[PreferenceSet, PreferenceSet | None]:
  """A held-out `fraction` of the pairs, drawn with the seed."""
  if fraction <= 0:
    return pset, None
  order = np.random.default_rng([seed, 1 << 20]).permutation(len(pset))
  n_eval = max(1, int(round(fraction * len(pset))))
  if n_eval >= len(pset):
    raise ValueError(f"data.eval_fraction={fraction} leaves no training pairs out of {len(pset)}")
  return pset.subset(np.sort(order[n_eval:])), pset.subset(np.sort(order[:n_eval]))


def in_order(pset: PreferenceSet, batch_size: int, *, max_length: int, max_prompt_length: int, pad_id: int = 0,
             layout: Callable[..., dict[str, np.ndarray]] = collate):
  """Every pair once in order, in [batch_size] batches (the last one filled with pair 0) laid out by `layout`
  (`collate` or `collate_shared`); yields (batch, count)."""
  for start in range(0, len(pset), batch_size):
    idx = list(range(start, min(start + batch_size, len(pset))))
    count = len(idx)
    idx += [0] * (batch_size - count)
    yield layout(pset, idx, max_length=max_length, max_prompt_length=max_prompt_length, pad_id=pad_id), count
