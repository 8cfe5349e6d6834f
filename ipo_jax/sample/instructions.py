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


def _is_transcript(text: Any) -> bool:
  """Whether `text` is an HH-RLHF transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...")."""
  return isinstance(text, str) and text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def _format_and_field(data: Any, row: dict[str, Any], source: str) -> tuple[str, str]:
  """`data.format` and `data.field`; `auto` reads the first row: `turns` (MT-Bench), `instruction`, a `chosen`
  HH-RLHF transcript, else a `prompt` field (e.g. RewardBench or TRL preference pairs)."""
  fmt, field = data.get("format", "auto"), data.get("field")
  if fmt == "auto" and field:
    fmt = {"turns": "mt_bench", "chosen": "hh_rlhf", "rejected": "hh_rlhf"}.get(field, "instruction")
  elif fmt == "auto":
    if "turns" in row:
      fmt = "mt_bench"
    elif "instruction" in row:
      fmt = "instruction"
    elif _is_transcript(row.get("chosen")):
      fmt = "hh_rlhf"
    elif "prompt" in row:
      fmt, field = "instruction", "prompt"
    else:
      raise data_lib.DataError(
          f"{source}: data.format=auto cannot tell where the instruction is (row 0 has fields "
          f"{', '.join(sorted(map(str, row)))}); set data.field=<the field holding it> (and data.format)")
  if fmt not in PROMPT_FORMATS:
    raise ValueError(f"data.format={fmt!r} is not one of auto, {', '.join(PROMPT_FORMATS)}")
  return fmt, field or PROMPT_FORMATS[fmt]


def _prompt_of(row: dict[str, Any], fmt: str, field: str) -> str | None:
  value = row[field]
  if fmt == "mt_bench":
    value = value[0] if isinstance(value, list) and value else None
  elif fmt == "hh_rlhf":
    value = _first_human_turn(value) if _is_transcript(value) else None
  return value if isinstance(value, str) and value.strip() else None


def load_instructions(data: Any) -> list[tuple[int, str]]:
  """(row index, instruction) pairs from `data` (path, split, name, format, field, start, limit, skip_invalid).

  Formats: `instruction` (a text field, `instruction` by default: AlpacaEval), `mt_bench` (first of `turns`),
  `hh_rlhf` (first human turn of the `chosen` transcript); `auto` picks one from the first row's fields (a row
  with `prompt` and a `chosen` that is no transcript, as RewardBench's, is read from `prompt`).
  """
  source = data["path"]
  rows = data_lib.read_records(source, data.get("split", "train"), data.get("name") or None)
  if not rows:
    raise data_lib.DataError(f"{source}: no rows")
  if not isinstance(rows[0], dict):
    raise data_lib.DataError(f"{source}: row 0 is not an object with fields")
  fmt, field = _format_and_field(data, rows[0], source)
  start, limit = int(data.get("start", 0)), int(data.get("limit", 0))
  rows = [dict(row, _index=i) for i, row in enumerate(rows)][start:start + limit if limit > 0 else None]
  skip = data.get("skip_invalid", False)
  rows, _ = data_lib.require_fields(rows, [field], source, skip_invalid=skip, rename="data.field")
  out = []
  for row in rows:
    value = _prompt_of(row, fmt, field)
    if value is None:
      if skip:
        continue
      what = ("is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript; to read another field set "
              "data.format=instruction and data.field=<field>, or" if fmt == "hh_rlhf" else f"holds no {fmt} prompt;")
      raise data_lib.DataError(f"{source}: row {row['_index']} field {field!r} {what} set data.skip_invalid=True "
                               "to skip such rows")
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
