"""Supervised fine-tuning data and loss: (instruction, response) examples and the completion-only loss.

A row holds an instruction, an optional context and a response; `data.columns` names the file's columns, and an
empty name takes the first present of `ALIASES` (Dolly's instruction/context/response, Alpaca's
instruction/input/output, TRL's prompt/completion). The prompt is the instruction, then a blank line and the context
when there is one. Instruction and response may also be lists of {"role", "content"} messages (TRL's
conversational prompt/completion). A file with neither but a `transcript` column (default `chosen`: HH-RLHF's
"\n\nHuman: ... \n\nAssistant: ..." transcripts) learns each transcript's last assistant turn after the turns
before it (as chat messages with `chat_template`, else the raw text up to the last "Assistant:").

The layout is DPO's (ipo_jax/train/pairs.py), so a response means the same tokens in both trainers: with
`chat_template` the prompt is one user turn of the tokenizer's chat template with the assistant header, and the
response is what the template adds after it for the whole exchange (the answer and the end-of-turn token); without
it, the raw prompt (with the tokenizer's special tokens), then the response and EOS. These are the tokens and the
loss mask of TRL's SFTTrainer on conversational prompt/completion rows (TRL warns and goes on where a template does
not render the prompt as the beginning of the whole exchange; here that row is an error). Over-long examples keep the
prompt's last `max_prompt_length` tokens, then cut the response at `max_length`; batches are right-padded to a
power-of-two length bucket.

The loss (TRL's SFTTrainer with `completion_only_loss`, `loss_type="nll"`): the mean negative log-likelihood of the
response tokens of an optimizer step, every token weighing the same, however the step is split into micro-batches
(TRL's `num_items_in_batch`); `completion_only=False` takes every token after the first.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from ipo_jax.data import DataError, read_records
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.train import loss as loss_lib, pairs as pairs_lib

FIELDS = ("instruction", "context", "response", "transcript")
ALIASES = {"instruction": ("instruction", "prompt"), "context": ("context", "input"),
           "response": ("response", "output", "completion"), "transcript": ("chosen",)}
TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclasses.dataclass
class ExampleSet:
  """Tokenized examples: per row the prompt and response token ids."""

  prompt_ids: list[np.ndarray]
  response_ids: list[np.ndarray]
  source: str = ""

  def __len__(self) -> int:
    return len(self.prompt_ids)

  def subset(self, indices: Sequence[int]) -> "ExampleSet":
    return ExampleSet([self.prompt_ids[i] for i in indices], [self.response_ids[i] for i in indices], self.source)

  def as_pairs(self) -> pairs_lib.PreferenceSet:
    """The examples as pairs whose two responses are the same (the layout of `pairs.collate`)."""
    return pairs_lib.PreferenceSet(self.prompt_ids, self.response_ids, self.response_ids, self.source)

  def fingerprint(self) -> str:
    """A hash of every token id."""
    return self.as_pairs().fingerprint()


# ---------------------------------------------------------------------------------------------------------------
# Rows


def resolve_columns(columns: Any, keys: Any, source: str) -> dict[str, str | None]:
  """Our field -> the file's column: `columns[field]` when set, else the first alias among the rows' `keys` (None:
  not used). A transcript column is used when the instruction or response column is not found."""
  given = {k: v for k, v in dict(columns or {}).items() if v}
  unknown = set(given) - set(FIELDS)
  if unknown:
    raise ValueError(f"data.columns names unknown fields {sorted(unknown)}; ours are {FIELDS}")
  keys = sorted(map(str, keys))
  out = {field: given.get(field) or next((n for n in names if n in keys), None) for field, names in ALIASES.items()}
  if out["instruction"] and out["response"] and "transcript" not in given:
    return {**out, "transcript": None}
  if out["transcript"]:
    return {field: out["transcript"] if field == "transcript" else None for field in FIELDS}
  field = "instruction" if not out["instruction"] else "response"
  raise DataError(f"{source}: no row has a {field} column (looked for {', '.join(ALIASES[field])}; the columns: "
                  f"{', '.join(keys)}); set data.columns.{field}=<column>")


def transcript_example(text: Any, where: str, column: str, chat_template: bool) -> tuple[Any, Any]:
  """(prompt, response) of an HH-RLHF transcript: the turns before its last assistant turn, and that turn."""
  turns = TURN.split("\n\n" + text.lstrip("\n")) if isinstance(text, str) else []
  if len(turns) < 5 or turns[0].strip() or turns[-2] != "Assistant" or not turns[-1].strip():
    raise DataError(f"{where}: field {column!r} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript ending "
                    "in a non-empty assistant turn")
  if not chat_template:
    head, _, answer = text.rpartition("\n\nAssistant:")
    return head + "\n\nAssistant:", answer
  roles = {"Human": "user", "Assistant": "assistant"}
  messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(turns[1::2], turns[2::2])]
  return messages[:-1], messages[-1:]


def _is_text(value: Any) -> bool:
  """A non-empty string or list of {"role": str, "content": str} messages."""
  if isinstance(value, str):
    return bool(value)
  return isinstance(value, list) and bool(value) and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def example_of(row: Any, index: int, source: str, columns: dict[str, str | None], chat_template: bool = True
               ) -> tuple[Any, Any]:
  """(prompt, response) of one row, or a DataError naming the row and column."""
  where = f"{source}: row {index}"
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected an object with an instruction and a response, got {type(row).__name__}")
  if columns.get("transcript"):
    return transcript_example(row.get(columns["transcript"]), where, columns["transcript"], chat_template)
  values = {field: row.get(column) if column else None for field, column in columns.items()}
  for field in ("instruction", "response"):
    if not _is_text(values[field]):
      raise DataError(f"{where}: field {columns[field]!r} ({field}) is missing, empty, or neither a string nor a list "
                      "of {'role', 'content'} messages")
  prompt, response, context = values["instruction"], values["response"], values["context"]
  if isinstance(prompt, str) != isinstance(response, str):
    raise DataError(f"{where}: fields {columns['instruction']!r} and {columns['response']!r} must both be strings "
                    "or both be message lists")
  if context:
    if not (isinstance(context, str) and isinstance(prompt, str)):
      raise DataError(f"{where}: field {columns['context']!r} (context) must be a string beside a string instruction")
    prompt = f"{prompt}\n\n{context}"
  return prompt, response


def tokenize_rows(rows: Sequence[Any], tokenizer: Any, *, source: str, columns: Any = None,
                  chat_template: bool = True, skip_invalid: bool = False) -> tuple[ExampleSet, int]:
  """Validates, formats (as `pairs.format_pair` does a response) and tokenizes rows; returns the set and the number
  of skipped rows."""
  if not rows:
    raise DataError(f"{source}: no rows; nothing to learn")
  cols = resolve_columns(columns, {k for row in rows if isinstance(row, dict) for k in row}, source)
  texts, skipped = [], 0
  for i, row in enumerate(rows):
    try:
      prompt, response = example_of(row, i, source, cols, chat_template)
      texts.append(pairs_lib.format_pair(prompt, response, response, tokenizer, chat_template, f"{source}: row {i}"))
    except DataError as e:
      if not skip_invalid:
        raise DataError(f"{e} (set data.skip_invalid=True to skip such rows)") from None
      skipped += 1
  if not texts:
    raise DataError(f"{source}: all {len(rows)} rows were skipped as invalid (data.skip_invalid=True); nothing to "
                    f"learn: fix the rows' {cols['instruction']!r}/{cols['response']!r} fields")
  encode = lambda xs, special: [np.asarray(ids, np.int32) for ids in
                                tokenizer(xs, add_special_tokens=special)["input_ids"]]
  return ExampleSet(encode([t[0] for t in texts], not chat_template), encode([t[1] for t in texts], False),
                    source), skipped


def load(path: str, tokenizer: Any, *, split: str = "train", name: str | None = None, columns: Any = None,
         chat_template: bool = True, skip_invalid: bool = False, limit: int = 0) -> tuple[ExampleSet, int]:
  """Examples from a hub id, a registered source or a local .jsonl/.json/.parquet file (first `limit` rows when
  > 0)."""
  rows = read_records(path, split=split, name=name)
  if limit > 0:
    rows = rows[:limit]
  return tokenize_rows(rows, tokenizer, source=path, columns=columns, chat_template=chat_template,
                       skip_invalid=skip_invalid)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def collate(examples: ExampleSet, indices: Sequence[int], *, max_length: int, max_prompt_length: int,
            pad_id: int = 0, completion_only: bool = True, length: int | None = None) -> dict[str, np.ndarray]:
  """A [B, T] batch of the rows `indices`: `pairs.collate`'s layout, one member; `loss_mask` on the response
  tokens (every real token when not `completion_only`)."""
  return _one_member(pairs_lib.collate(examples.as_pairs(), indices, max_length=max_length,
                                       max_prompt_length=max_prompt_length, pad_id=pad_id, length=length),
                     completion_only)


def in_order(examples: ExampleSet, batch_size: int, *, max_length: int, max_prompt_length: int, pad_id: int = 0,
             completion_only: bool = True):
  """Every example once in order, in [batch_size] batches (the last one filled with example 0); yields (batch,
  count)."""
  for batch, count in pairs_lib.in_order(examples.as_pairs(), batch_size, max_length=max_length,
                                         max_prompt_length=max_prompt_length, pad_id=pad_id):
    yield _one_member(batch, completion_only), count


def _one_member(batch: dict[str, np.ndarray], completion_only: bool) -> dict[str, np.ndarray]:
  """The [B, T] examples of a [B, 2, T] batch of pairs whose members are the same."""
  batch = {k: v[:, 0] for k, v in batch.items()}
  if not completion_only:
    batch["loss_mask"] = batch["attention_mask"].copy()
  return batch


@dataclasses.dataclass
class PackedSet:
  """Examples packed into rows of `length` tokens (`pack`): per row the indices of its examples, in order."""

  examples: ExampleSet
  rows: list[list[int]]
  length: int  # tokens per row (data.max_length)
  max_prompt_length: int

  def __len__(self) -> int:  # the unit of batching: a packed row
    return len(self.rows)

  def fingerprint(self) -> str:
    return self.examples.fingerprint()

  def fill(self) -> float:
    """The fraction of the rows' token slots that hold a token."""
    used = sum(len(p) + len(r) for p, r in self.truncated(range(len(self.examples))))
    return used / max(len(self.rows) * self.length, 1)

  def truncated(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt, response) token ids of the examples `indices` as a row holds them."""
    return [truncate(self.examples, i, self.length, self.max_prompt_length) for i in indices]


def truncate(examples: ExampleSet, index: int, max_length: int, max_prompt_length: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt, response) token ids of example `index` as a batch holds them (`pairs.collate`'s truncation: the
  prompt's last `max_prompt_length` tokens, then the response cut at `max_length`)."""
  prompt = examples.prompt_ids[index][-max_prompt_length:]
  return prompt, examples.response_ids[index][:max_length - len(prompt)]


def pack(examples: ExampleSet, *, max_length: int, max_prompt_length: int) -> PackedSet:
  """The examples packed first-fit-decreasing into rows of `max_length` tokens (each example whole, as truncated
  for a batch; ties in length keep the data order, so the packing is a fixed function of the set)."""
  if not 0 < max_prompt_length < max_length:
    raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
  sizes = [sum(map(len, truncate(examples, i, max_length, max_prompt_length))) for i in range(len(examples))]
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    row = next((r for r, room in enumerate(free) if room >= sizes[i]), None)
    if row is None:
      rows.append([])
      free.append(max_length)
      row = len(rows) - 1
    rows[row].append(i)
    free[row] -= sizes[i]
  return PackedSet(examples, [sorted(r) for r in rows], max_length, max_prompt_length)


def collate_packed(packed: PackedSet, indices: Sequence[int], *, pad_id: int = 0, completion_only: bool = True
                   ) -> dict[str, np.ndarray]:
  """A [B, T] batch of the packed rows `indices` (T: the packing length): `segment_ids` numbering each row's
  examples 1, 2, ... (0: padding; attention stays within a segment and positions restart), `attention_mask` (a real
  token), and `loss_mask` on the response tokens (every real token when not `completion_only`), never on a
  segment's first token (which no token of its own segment predicts)."""
  t = packed.length
  ids = np.full((len(indices), t), pad_id, np.int32)
  segments = np.zeros((len(indices), t), np.int32)
  loss = np.zeros((len(indices), t), np.int32)
  for b, row in enumerate(indices):
    start = 0
    for k, (prompt, response) in enumerate(packed.truncated(packed.rows[row]), start=1):
      n, m = len(prompt), len(response)
      ids[b, start:start + n + m] = np.concatenate([prompt, response])
      segments[b, start:start + n + m] = k
      loss[b, start + (1 if not completion_only else n):start + n + m] = 1
      start += n + m
  return {"input_ids": ids, "attention_mask": (segments > 0).astype(np.int32), "segment_ids": segments,
          "loss_mask": loss}


def step_weights(batch: dict[str, np.ndarray], grad_accum: int) -> np.ndarray:
  """[B] float32 weight of each row's summed log-likelihood in an optimizer step of `grad_accum` micro-batches:
  grad_accum / (the step's loss tokens), so the mean over micro-batches is the token mean of the step."""
  tokens = int(batch["loss_mask"][:, 1:].sum())
  return np.full(batch["loss_mask"].shape[0], grad_accum / max(tokens, 1), np.float32)


def sft_loss(params: transformer.Params, cfg: ModelConfig, batch: dict[str, jax.Array], *, vocab_chunk: int = 8192,
             remat: bool | str = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted negative log-likelihood of one micro-batch (`weight` [B] from `step_weights`) and its metrics."""
  logps = loss_lib.sequence_logps(params, cfg, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                  vocab_chunk=vocab_chunk, remat=remat, segment_ids=batch.get("segment_ids"))
  loss = -(logps * batch["weight"]).sum()
  return loss, {"loss": loss}


def mean_nll(logps: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
  """Held-out metrics from per-example summed log-likelihoods and loss-token counts: the token-mean `loss` and
  its `perplexity`."""
  loss = float(-np.sum(logps) / max(float(np.sum(lengths)), 1.0))
  return {"loss": loss, "perplexity": float(np.exp(loss))}
