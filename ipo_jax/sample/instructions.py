"""Instructions to answer: the prompt data sets, and how an instruction becomes the text a model reads.

Data formats (`data.format`): `instruction` (a text field, `instruction` by default: AlpacaEval), `mt_bench` (the
first of `turns`: MT-Bench's first turn), `hh_rlhf` (the first human turn of HH-RLHF's `chosen` transcript), or
`auto`, which picks one from the first row's fields. An instruction is laid out as one user turn in the model's
chat template (with the assistant header, `model.chat.user_turn`) or as raw text (`format_prompt`).
"""

from __future__ import annotations

from typing import Any

from ipo_jax import data as data_lib
from ipo_jax.model import chat

PROMPT_FORMATS = {"instruction": "instruction", "mt_bench": "turns", "hh_rlhf": "chosen"}  # format -> field


def _first_human_turn(transcript: str) -> str | None:
  """The first human turn of a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript."""
  _, found, rest = transcript.partition("Human:")
  return rest.split("\n\nAssistant:", 1)[0].strip() if found else None


def load_instructions(data: Any) -> list[tuple[int, str]]:
  """(row index, instruction) pairs from `data` (path, split, name, format, field, start, limit, skip_invalid).

  Formats: `instruction` (a text field, `instruction` by default: AlpacaEval), `mt_bench` (first of `turns`),
  `hh_rlhf` (first human turn of the `chosen` transcript); `auto` picks one from the first row's fields.
  """
  source = data["path"]
  rows = data_lib.read_records(source, data.get("split", "train"), data.get("name") or None)
  if not rows:
    raise data_lib.DataError(f"{source}: no rows")
  fmt, field = data.get("format", "auto"), data.get("field")
  if fmt == "auto" and field:
    fmt = {"turns": "mt_bench", "chosen": "hh_rlhf", "rejected": "hh_rlhf"}.get(field, "instruction")
  elif fmt == "auto":
    fmt = ("mt_bench" if "turns" in rows[0] else
           "hh_rlhf" if "instruction" not in rows[0] and "chosen" in rows[0] else "instruction")
  if fmt not in PROMPT_FORMATS:
    raise ValueError(f"data.format={fmt!r} is not one of auto, {', '.join(PROMPT_FORMATS)}")
  field = field or PROMPT_FORMATS[fmt]
  start, limit = int(data.get("start", 0)), int(data.get("limit", 0))
  rows = [dict(row, _index=i) for i, row in enumerate(rows)][start:start + limit if limit > 0 else None]
  rows, _ = data_lib.require_fields(rows, [field], source, skip_invalid=data.get("skip_invalid", False))
  out = []
  for row in rows:
    value = row[field]
    if fmt == "mt_bench":
      value = value[0] if isinstance(value, list) else None
    elif fmt == "hh_rlhf":
      value = _first_human_turn(value) if isinstance(value, str) else None
    if not isinstance(value, str) or not value.strip():
      if data.get("skip_invalid", False):
        continue
      raise data_lib.DataError(f"{source}: row {row['_index']} field {field!r} holds no {fmt} prompt "
                               "(set data.skip_invalid=True to skip such rows)")
    out.append((row["_index"], value))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Prompt text.


def format_prompt(tokenizer: Any, instruction: str, chat_template: bool = True,
                  system_prompt: str | None = None) -> str:
  """The text the model reads: one user turn in the chat template (with the assistant header), or raw text.

  Raw text starts with the special tokens the tokenizer adds by default (e.g. BOS), so the result is always
  encoded without adding special tokens.
  """
  if not chat_template:
    return _default_prefix(tokenizer) + (f"{system_prompt}\n\n" if system_prompt else "") + instruction
  return chat.user_turn(tokenizer, instruction, system_prompt=system_prompt,
                        hint="set data.chat_template=False for raw text")


def _default_prefix(tokenizer: Any) -> str:
  """The text of the special tokens the tokenizer puts before a text by default ("" for most chat models)."""
  with_special = tokenizer.encode("a", add_special_tokens=True)
  plain = tokenizer.encode("a", add_special_tokens=False)
  extra = len(with_special) - len(plain)
  if extra <= 0 or with_special[extra:] != plain:
    return ""
  return tokenizer.decode(with_special[:extra])


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False)
