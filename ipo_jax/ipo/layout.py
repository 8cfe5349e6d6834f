"""How an IPO question is laid out as text, its two answer tokens, and encoding with truncation.

Layouts (`scoring.layout`):
  paper     the authors' text, reproduced exactly: `PAPER_TEMPLATE`, no chat template, the tokenizer's default
            special tokens, " Yes" / " No" (leading space).
  chat      the same content as one user turn in the model's chat template with the generation prompt;
            "Yes" / "No".
  template  `scoring.template`, a string with {instruction}, {prompt} and {response}; " Yes" / " No".
  paper_rmbench  the authors' RM-Bench text, reproduced exactly: `PAPER_RMBENCH_TEMPLATE` (the question comes after
            the response and nothing follows it), otherwise as `paper`.

Each answer must be exactly one token where it stands (checked by tokenizing the laid-out text with and
without it), never summed over pieces.

Sequences longer than `max_length` lose the end of the response, then of the prompt; the instruction and the
question around the response are never cut (`truncation="keep_question"`). `truncation="paper"` cuts every
sequence on the right at `max_length` tokens as the authors' code did.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from ipo_jax.model import chat

LAYOUTS = ("paper", "chat", "template", "paper_rmbench")
TRUNCATIONS = ("keep_question", "paper")
PAPER_TEMPLATE = "{instruction}\n    User : {prompt}\n    Response : {response}\n    "
PAPER_RMBENCH_TEMPLATE = "Given the following:\n    User : {prompt}\n    Response : {response}\n    {instruction}"
CHAT_CONTENT = "{instruction}\n    User : {prompt}\n    Response : {response}"
_FIELDS = re.compile(r"\{(instruction|prompt|response)\}")
_DEFAULT_ANSWERS = {"paper": (" Yes", " No"), "chat": ("Yes", "No"), "template": (" Yes", " No"),
                    "paper_rmbench": (" Yes", " No")}


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
    return chat.user_turn(tokenizer, text)

  @property
  def add_special_tokens(self) -> bool:
    """Raw layouts get the tokenizer's default special tokens; a chat template writes its own."""
    return self.kind != "chat"


def make_layout(settings: Any, tokenizer: Any | None = None) -> Layout:
  """The layout of `settings` (a `scorer.Settings`: layout, template, yes, no)."""
  if settings.layout == "paper":
    template = PAPER_TEMPLATE
  elif settings.layout == "paper_rmbench":
    template = PAPER_RMBENCH_TEMPLATE
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
    raise ValueError(_split_answer_message(tokenizer, layout, context, answer, base, tokens))
  if ids[0] == ids[1]:
    raise ValueError(f"the answers {layout.yes!r} and {layout.no!r} are the same token ({ids[0]})")
  return ids[0], ids[1]


def _split_answer_message(tokenizer: Any, layout: Layout, context: str, answer: str, base: list[int],
                          tokens: list[int]) -> str:
  """Why `answer` is not one token after `context` (`base` its tokens, `tokens` those of context + answer)."""
  pieces = tokenizer.convert_ids_to_tokens
  if tokens[:len(base)] == base:
    how = f"the tokenizer writes it as {len(tokens) - len(base)} tokens {pieces(tokens[len(base):])}"
  else:
    how = (f"the tokenizer merges it with the text before it (the text ends in tokens {pieces(base[-2:])}, with "
           f"the answer in {pieces(tokens[-3:])})")
  return (f"the answer {answer!r} is not exactly one token where it stands: after the {layout.kind} layout's text "
          f"(ending {context[-16:]!r}) {how}. P(Yes) compares single next-token probabilities; SentencePiece "
          "tokenizers often split ' Yes' into '▁' + 'Yes', and summing the pieces' probabilities (as the paper's "
          "code did) scores a shared piece for both answers. Set scoring.yes / scoring.no to strings that are single "
          "tokens here (e.g. 'Yes' and 'No'), or choose another layout.")


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
