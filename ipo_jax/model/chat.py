"""The chat conventions of a tokenizer: one user turn in its chat template, the end-of-turn token, the pad id."""

from __future__ import annotations

from typing import Any


def user_turn(tokenizer: Any, text: str, *, system_prompt: str | None = None, response: str | None = None,
              hint: str = "") -> str:
  """`text` as one user turn in the tokenizer's chat template (after a system turn when `system_prompt` is given).

  Without `response`: ends with the assistant header (add_generation_prompt), ready for the model to answer. With
  `response`: the assistant's turn follows, as the whole exchange (how a reward model reads it). The text carries
  the template's special tokens: encode it without adding special tokens. `hint` ends the error message raised for
  a tokenizer without a chat template (e.g. "set data.chat_template=False for raw text").
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat template" + (f"; {hint}" if hint else ""))
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": text})
  if response is not None:
    messages.append({"role": "assistant", "content": response})
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
  """The special token the chat template writes after an assistant turn (<|im_end|>, <|eot_id|>, <end_of_turn>);
  () without a tokenizer, a template, or a special token there."""
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    return ()
  marker = "MARKER7f3a"
  try:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
  except Exception:  # pylint: disable=broad-except  # templates raise their own errors for layouts they refuse
    return ()
  if marker not in text:
    return ()
  ids = tokenizer.encode(text.split(marker, 1)[1], add_special_tokens=False)
  added = getattr(tokenizer, "added_tokens_decoder", {})
  return (ids[0],) if ids and ids[0] in added and added[ids[0]].special else ()


def pad_id(tokenizer: Any) -> int:
  """The id padded positions hold: the pad token, else EOS, else 0 (padded positions are always masked out, so any
  valid id does; `tokenizer.load_tokenizer` sets pad = EOS where a tokenizer has no pad token)."""
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if isinstance(value, int):
      return value
  return 0
