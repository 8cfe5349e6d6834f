"""A classifier reward model (`*ForSequenceClassification`, a `score` head) on RewardBench pairs.

Each response is read as the authors' reward-model baseline read it (their `reward_model.py`, a transformers
text-classification pipeline): `"Instruction: {prompt}\\nResponse: {response}"` with the tokenizer's special tokens,
cut on the right to `max_length` (1024) tokens (`format="paper"`, `truncation="right"`). `format="chat"` lays the
pair out as a user and an assistant turn of the reward model's own chat template (how most hub reward models were
trained); `truncation="left"` keeps the last tokens instead. The reward is the head's logit `label` (0 for the
usual scalar head; the pipeline reports its sigmoid, the same order) and a pair is correct when the chosen
response's reward is strictly higher (ties are wrong and flagged), as the authors counted.

Sequences run right-padded in a few length buckets chosen from the data (`planner.choose_buckets`, at most
`max_programs` compiled shapes), through one jitted program with explicit shardings (params as loaded, rows over
the mesh's batch axes, the rewards replicated), one batch ahead of the host. The task is ipo_jax/tasks/
rewardbench_reward_model.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipo_jax import runtime, sections, sharding
from ipo_jax.ipo import planner
from ipo_jax.model import chat, transformer

FORMATS = ("paper", "chat")
TRUNCATIONS = ("right", "left")
PAPER_PREFIX = "Instruction: {prompt}\nResponse: "  # the authors' reward_model.py; the response follows as is

_TRACES: collections.Counter = collections.Counter()


def num_compilations() -> int:
  """Reward programs compiled so far in this process."""
  return sum(_TRACES.values())


@dataclasses.dataclass(frozen=True)
class RewardSettings(planner.BatchTokens):
  """`config.reward_model` (see configs/rewardbench_reward_model.py for each field)."""

  CPU_BATCH_TOKENS = 4096
  ACCELERATOR_BATCH_TOKENS = 16384

  format: str = "paper"
  max_length: int = 1024
  truncation: str = "right"
  label: int = 0
  batch_tokens: int = 0
  max_batch: int = 32
  max_programs: int = 4
  length_multiple: int = 32
  progress: bool = True

  def __post_init__(self):
    checks = [
        (self.format in FORMATS, f"reward_model.format must be one of {FORMATS}, got {self.format!r}"),
        (self.truncation in TRUNCATIONS,
         f"reward_model.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}"),
        (self.max_length > 1, f"reward_model.max_length must be > 1, got {self.max_length}"),
        (self.label >= 0, f"reward_model.label must be >= 0, got {self.label}"),
        (self.max_batch >= 1, f"reward_model.max_batch must be >= 1, got {self.max_batch}"),
        (self.max_programs >= 1, f"reward_model.max_programs must be >= 1, got {self.max_programs}"),
        (self.length_multiple >= 1, f"reward_model.length_multiple must be >= 1, got {self.length_multiple}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  @classmethod
  def from_config(cls, section: Any) -> "RewardSettings":
    return sections.from_section(cls, section)


def check_path(path: str) -> None:
  """A model path that is surely not a sequence classifier (a GGUF file, the embedded model, a directory whose
  config.json names no *ForSequenceClassification architecture) is refused before anything is written."""
  expanded = os.path.expanduser(path)
  if path in ("", "embedded", "gemma3-270m") or path.endswith(".gguf"):
    raise ValueError(f"model.path={path!r} is a causal LM, not a reward model; set --config.model.path to a "
                     "*ForSequenceClassification directory (config.json, *.safetensors, tokenizer)")
  config_file = os.path.join(expanded, "config.json")
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      architectures = (json.load(f).get("architectures") or [])
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
      raise ValueError(f"{config_file}: architectures {architectures} name no *ForSequenceClassification model; "
                       "model.path must be a reward model (a classifier head), not a causal LM")


def _rewards(cfg, params, ids, mask):
  """[B, num_labels] (replicated): the classifier head at each row's last real token."""
  _TRACES["rewards"] += 1
  return sharding.constrain(transformer.classifier_scores(params, cfg, ids, mask), (None, None))


def build(cfg: Any, mesh: jax.sharding.Mesh, params: Any) -> Any:
  """The reward program `program(cfg, params, ids, mask)`: explicit in/out shardings, `cfg` static."""
  rows = sharding.batch_sharding(mesh, 2)
  return sharding.jit(_rewards, mesh, in_shardings=(sharding.param_shardings(params, mesh), rows, rows),
                      out_shardings=sharding.replicated(mesh), static_argnames=("cfg",))


def lowerable(cfg: Any, mesh: jax.sharding.Mesh, dtype: Any, rows: int, length: int) -> sharding.Lowerable:
  """The reward program of `build` for `rows` x `length` tokens with abstract arguments, to compile ahead of time
  for `mesh` (any platform). `cfg` must be a classifier's (num_labels > 0)."""
  if not cfg.num_labels:
    raise ValueError("a reward program needs a classifier config (num_labels > 0)")
  params = sharding.abstract_params(cfg, dtype, mesh)
  tokens = sharding.abstract((rows, length), jnp.int32, sharding.batch_sharding(mesh, 2))
  return sharding.Lowerable("reward", build(cfg, mesh, params), (cfg, params, tokens, tokens), mesh)


def pad_rows(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int, left: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
  """ids and mask [rows, length]: `seqs` in the first rows, padded on the right (or left); filler rows hold one
  masked-in pad token so every row has a last token."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, s in enumerate(seqs):
    span = slice(length - len(s), length) if left else slice(0, len(s))
    ids[r, span], mask[r, span] = s, 1
  mask[len(seqs):, -1 if left else 0] = 1
  return ids, mask


class RewardScorer:
  """Rewards of (prompt, response) texts under a loaded sequence-classification model (`loading.Model`).

  `shapes` holds the (rows, length) batches run so far (each compiled once per process)."""

  def __init__(self, model: Any, settings: RewardSettings = RewardSettings()):
    cfg, tok = model.config, model.tokenizer
    if not cfg.num_labels:
      raise ValueError(f"{model.name} is a causal LM, not a reward model: model.path must be a "
                       "*ForSequenceClassification directory (config.json architectures, a `score` head)")
    if settings.label >= cfg.num_labels:
      raise ValueError(f"reward_model.label={settings.label} but {model.name} has {cfg.num_labels} label(s)")
    if tok is None:
      raise ValueError(f"{model.name}: no tokenizer in the directory; save the reward model's tokenizer there")
    if settings.format == "chat" and not getattr(tok, "chat_template", None):
      raise ValueError(f"{model.name}: reward_model.format='chat' needs a tokenizer with a chat template; this one "
                       "has none (use reward_model.format=paper)")
    if settings.max_length > cfg.max_position_embeddings:
      raise ValueError(f"reward_model.max_length={settings.max_length} exceeds the model's "
                       f"{cfg.max_position_embeddings} positions")
    self.model, self.settings, self.cfg, self.tokenizer = model, settings.on(sharding.platform(model.mesh)), cfg, tok
    self.pad_id = chat.pad_id(tok)
    self.multiple = sharding.batch_multiple(model.mesh)
    self.program = build(cfg, model.mesh, model.params)
    self.shapes: set[tuple[int, int]] = set()

  def text(self, prompt: str, response: str) -> str:
    """The text the reward model reads (with its chat template's special tokens for format='chat')."""
    if self.settings.format == "chat":
      return chat.user_turn(self.tokenizer, prompt, response=response)
    return PAPER_PREFIX.replace("{prompt}", prompt) + response

  def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], bool]]:
    """Token ids and a truncated flag per (prompt, response). Right truncation is the tokenizer's own
    (`truncation=True`, as the pipeline: special tokens kept), left keeps the last `max_length` tokens."""
    if not prompts:
      return []
    s, tok = self.settings, self.tokenizer
    texts = [self.text(p, r) for p, r in zip(prompts, responses)]
    special = s.format == "paper"
    ids = tok(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
    out = []
    for text, seq in zip(texts, ids):
      if len(seq) <= s.max_length:
        out.append((list(seq), False))
      elif s.truncation == "left":
        out.append((list(seq[-s.max_length:]), True))
      else:
        cut = tok(text, add_special_tokens=special, truncation=True, max_length=s.max_length)["input_ids"]
        out.append((list(cut), True))
    return out

  def _steps(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[np.ndarray, Any]]:
    """(sequence indices, a thunk dispatching their batch) in length buckets, shortest first."""
    s = self.settings
    lengths = [len(x) for x in seqs]
    row_cost = lambda b: float(planner.flops(self.cfg, b, transformer.attended_slots(b)))
    buckets = planner.choose_buckets(lengths, s.max_programs, s.length_multiple, row_cost)
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    start = 0
    for bucket in buckets:
      end = start
      while end < len(order) and lengths[order[end]] <= bucket:
        end += 1
      rows = planner.batch_rows(bucket, s, self.multiple)
      if end - start < rows:  # a bucket with fewer sequences than a batch: a smaller batch (still few shapes)
        rows = min(rows, -(-(1 << max(0, end - start - 1).bit_length()) // self.multiple) * self.multiple)
      for k in range(start, end, rows):
        idx = order[k:min(k + rows, end)]
        ids, mask = pad_rows([seqs[i] for i in idx], rows, bucket, self.pad_id)
        self.shapes.add((rows, bucket))
        yield np.array(idx), lambda ids=ids, mask=mask: self.program(
            self.cfg, self.model.params, sharding.to_global(ids, sharding.batch_sharding(self.model.mesh, 2)),
            sharding.to_global(mask, sharding.batch_sharding(self.model.mesh, 2)))
      start = end

  def score(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (sequence indices, their rewards [n]) as batches finish, one batch dispatched ahead."""
    if any(not len(x) for x in seqs):
      raise ValueError("cannot score an empty sequence")
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(seqs), unit="seq", desc="reward model", leave=False, dynamic_ncols=True,
               disable=not (self.settings.progress and runtime.is_main_process()))
    pending = None
    for idx, step in self._steps(seqs):
      with jax.set_mesh(self.model.mesh):
        out = step()
      if pending is not None:
        yield self._fetch(*pending, bar)
      pending = (idx, out)
    if pending is not None:
      yield self._fetch(*pending, bar)
    bar.close()

  def _fetch(self, idx: np.ndarray, out: jax.Array, bar: Any) -> tuple[np.ndarray, np.ndarray]:
    bar.update(len(idx))
    return idx, np.asarray(out)[:len(idx), self.settings.label].astype(np.float64)

  def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Rewards [N] of (prompt, response) pairs, in order."""
    out = np.zeros(len(prompts))
    for idx, values in self.score([ids for ids, _ in self.encode(prompts, responses)]):
      out[idx] = values
    return out


def score_rewardbench_pairs(scorer: RewardScorer, rows: Sequence[Mapping[str, Any]]
                            ) -> Iterator[list[dict[str, Any]]]:
  """Both responses of each RewardBench pair; yields result rows (the IPO rows' fields: score_*, correct, tie,
  truncated_*, tokens_*) as pairs finish."""
  sides = ("chosen", "rejected")
  encoded = scorer.encode([r["prompt"] for r in rows for _ in sides], [r[s] for r in rows for s in sides])
  values = np.zeros(len(encoded))
  remaining = np.full(len(rows), 2)
  for idx, out in scorer.score([ids for ids, _ in encoded]):
    values[idx] = out
    finished = []
    for i in idx:
      remaining[i // 2] -= 1
      if remaining[i // 2] == 0:
        finished.append(pair_result(rows[i // 2], values[i - i % 2:i - i % 2 + 2], encoded[i - i % 2:i - i % 2 + 2]))
    if finished:
      yield finished


def pair_result(row: Mapping[str, Any], rewards: Sequence[float], encoded: Sequence[tuple[list[int], bool]]
                ) -> dict[str, Any]:
  """The result row of a pair from its (chosen, rejected) rewards and encodings (strict `>`: ties are wrong)."""
  chosen, rejected = float(rewards[0]), float(rewards[1])
  return {"subset": row["subset"], "id": row["id"], "score_chosen": chosen, "score_rejected": rejected,
          "correct": chosen > rejected, "tie": chosen == rejected,
          "truncated_chosen": bool(encoded[0][1]), "truncated_rejected": bool(encoded[1][1]),
          "tokens_chosen": len(encoded[0][0]), "tokens_rejected": len(encoded[1][0])}
