"""The self-rewarding judge (Yuan et al., 2024): the rubric, the judgements and their scores.

The model reads a user's question and a response under an additive 5-point rubric, writes a short justification
and a score; the score is parsed from what it wrote (`parse_score`) and clamped to 1-5. A judgement with no score
in it gets `unparsable_score` (0 as the IPO paper's code, 0.5 as RewardBench's generative scoring) and is counted.

The rubric is the project's own wording (`DEFAULT_TEMPLATE`) or a `prompt_file` with `{instruction}` and
`{response}` placeholders (the paper's trimmed prompt is the source `paper:self_reward_judge_prompt`). It is laid
out as one user turn of the chat template (default) or as raw text, as the paper's code did. Texts longer than
`max_prompt_tokens` lose the end of the response, then of the question (`truncation="keep_question"`), or are
cut on the right as the paper's code did (`truncation="paper"`).

On RewardBench (`judge_pairs`) each pair's chosen and rejected responses are judged separately; a pair is correct
when the chosen one scores strictly higher (ties are wrong and counted). The task is ipo_jax/tasks/
rewardbench_self_reward.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ipo_jax import data as data_lib, sections
from ipo_jax.evals import rewardbench
from ipo_jax.ipo import layout as layout_lib
from ipo_jax.sample import engine

DEFAULT_TEMPLATE = """\
Evaluate how well the response below answers the user's question on an additive 5-point scale. Start from 0 \
and add points as follows:
- Add 1 point if the response is on topic and gives some information relevant to the question, even if it is \
incomplete or partly off topic.
- Add 1 more point if it covers a substantial part of the question without fully resolving it.
- Add 1 more point if it answers the essential parts of the question in a useful way, whatever its style.
- Add 1 more point if it answers the question directly and completely, as a helpful assistant would, and is \
well organized, with at most minor flaws in clarity, brevity or focus.
- Add 1 more point if it is an outstanding, expert answer tailored exactly to the question, with nothing \
superfluous, engaging and insightful.

Question: {instruction}
<response>{response}</response>

Explain your assessment in at most 100 words, then end with the total on its own line as "Score: <points>"."""

# As the paper's code: sampling at temperature 0.1, at most 200 new tokens.
DEFAULT_SAMPLING = engine.SamplingConfig(max_new_tokens=200, temperature=0.1)
PLACEHOLDERS = ("{instruction}", "{response}")

_NUMBER = r"(?P<n>\d+(?:\.\d+)?|one|two|three|four|five)\b"
_WORDS = {"one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0, "five": 5.0}
# In order of trust; the first pattern with a match decides, at its first match.
SCORE_PATTERNS = (
    # Score: 4 | Score 4 | **Score:** 4 | "Score: 4" | Score = "4" | score of 4 | total score is 4 | scored 4
    re.compile(r"\bscore[sd]?\b(?:\s*\((?:out of 5|[01]\s*-\s*5)\))?\s*(?:is|of|would be|will be|[:=\-–])?\s*"
               r"[:=]?[\s*\"'`<\[(]*" + _NUMBER, re.IGNORECASE),
    # 4/5 | 4 out of 5
    re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?:/|out of)\s*5\b", re.IGNORECASE),
    # a total of 4 points | total: 4 points
    re.compile(r"\btotal(?:\s+of)?\s*:?\s*" + _NUMBER + r"\s*points?\b", re.IGNORECASE),
    # the answer is the number, alone on its first line (the paper's prompt ends in `"Score: "`); not "1. ..."
    re.compile(r"^[\s*\"'`<\[(]*(?P<n>\d+(?:\.\d+)?)[\s*\"'`>\])]*(?:$|\n|points?\b)", re.IGNORECASE),
)


def parse_score(text: str) -> float | None:
  """The score a judgement gives, clamped to 1-5; None when it states none."""
  for pattern in SCORE_PATTERNS:
    match = pattern.search(text)
    if match:
      value = match.group("n").lower()
      return float(min(max(_WORDS.get(value) or float(value), 1.0), 5.0))
  return None


def load_template(prompt_file: str = "") -> str:
  """The rubric: `DEFAULT_TEMPLATE`, or a file (a local path or a registered source such as
  `paper:self_reward_judge_prompt`) with both placeholders."""
  if not prompt_file:
    return DEFAULT_TEMPLATE
  return data_lib.read_template(prompt_file, PLACEHOLDERS, "judge prompt file")


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  """How the judge reads and writes (see configs/rewardbench_self_reward.py for each field)."""

  template: str = DEFAULT_TEMPLATE
  chat_template: bool = True
  max_prompt_tokens: int = 2048
  truncation: str = "keep_question"
  unparsable_score: float = 0.0
  batch_size: int = 16
  sampling: engine.SamplingConfig = DEFAULT_SAMPLING

  def __post_init__(self):
    if self.truncation not in layout_lib.TRUNCATIONS:
      raise ValueError(f"judge.truncation must be one of {layout_lib.TRUNCATIONS}, got {self.truncation!r}")
    if self.sampling.num_samples != 1:
      raise ValueError("the judge writes one judgement per response; set sampling.num_samples=1")

  @classmethod
  def from_config(cls, judge: Any, sampling: Any = None) -> "JudgeSettings":
    return sections.from_section(
        cls, judge, template=load_template(judge.get("prompt_file", "")),
        sampling=engine.SamplingConfig.from_config(sampling) if sampling else DEFAULT_SAMPLING)

  def layout(self) -> layout_lib.Layout:
    """The judge text as a scoring layout: the user's question fills {prompt}, the response {response}."""
    template = self.template.replace("{instruction}", "{prompt}")
    return layout_lib.Layout("chat" if self.chat_template else "template", template, "", "")


@dataclasses.dataclass(frozen=True)
class Judgement:
  """What the judge wrote, the score parsed from it (None: none found) and whether the input was cut."""

  text: str
  parsed: float | None
  truncated: bool
  prompt_tokens: int

  def score(self, unparsable_score: float) -> float:
    return unparsable_score if self.parsed is None else self.parsed


def stream_judgements(model: Any, instructions: Sequence[str], responses: Sequence[str],
                      settings: JudgeSettings = JudgeSettings(), key: Any = 0, *,
                      indices: Sequence[int] | None = None, progress: bool = True) -> Iterator[tuple[int, Judgement]]:
  """Yields (position, judgement) as batches finish; `key`/`indices` seed the sampling as in `engine.stream`."""
  if len(instructions) != len(responses):
    raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses")
  if not instructions:
    return
  encoded = layout_lib.encode_examples(model.tokenizer, settings.layout(),
                                    [("", q, r) for q, r in zip(instructions, responses)],
                                    settings.max_prompt_tokens, settings.truncation)
  for pos, (gen,) in engine.stream(model, [ids for ids, _ in encoded], settings.sampling, key, indices=indices,
                                       batch_size=settings.batch_size,
                                       max_prompt_tokens=settings.max_prompt_tokens, progress=progress,
                                       desc="judge"):
    ids, truncated = encoded[pos]
    yield pos, Judgement(gen.text, parse_score(gen.text), truncated, len(ids))


def judge(model: Any, instructions: Sequence[str], responses: Sequence[str],
          settings: JudgeSettings = JudgeSettings(), key: Any = 0, **kwargs: Any) -> list[Judgement]:
  """One judgement per (instruction, response), in order."""
  out: list[Judgement | None] = [None] * len(instructions)
  for pos, judgement in stream_judgements(model, instructions, responses, settings, key, **kwargs):
    out[pos] = judgement
  return out


def judge_scores(model: Any, instructions: Sequence[str], responses: Sequence[str],
                 settings: JudgeSettings = JudgeSettings(), key: Any = 0, **kwargs: Any) -> np.ndarray:
  """Scores in [1, 5] (`settings.unparsable_score` where the judgement states none)."""
  return np.array([j.score(settings.unparsable_score)
                   for j in judge(model, instructions, responses, settings, key, **kwargs)], np.float32)


# ----------------------------------------------------------------------------------------------------------------
# RewardBench.


def score_pair(row: dict[str, Any], unparsable_score: float) -> dict[str, Any]:
  """Scores, correctness and tie of a pair row with this unparsable value (ties are wrong)."""
  chosen, rejected = (unparsable_score if row[f"parsed_{s}"] is None else row[f"parsed_{s}"]
                      for s in ("chosen", "rejected"))
  return {**row, "score_chosen": chosen, "score_rejected": rejected, "correct": chosen > rejected,
          "tie": chosen == rejected}


def judge_pairs(model: Any, pairs: Sequence[Mapping[str, Any]], settings: JudgeSettings, key: Any = 0,
                progress: bool = True) -> Iterator[dict[str, Any]]:
  """Judges both responses of each RewardBench pair; yields a result row as each pair completes."""
  sides = ("chosen", "rejected")
  items = [(p, side) for p in pairs for side in sides]
  waiting: dict[int, dict[str, Judgement]] = {}
  stream = stream_judgements(model, [p["prompt"] for p, _ in items], [p[side] for p, side in items], settings, key,
                             indices=[rewardbench.item_index(p, side) for p, side in items], progress=progress)
  for pos, judgement in stream:
    pair, side = items[pos]
    got = waiting.setdefault(pos // 2, {})
    got[side] = judgement
    if len(got) == 2:
      del waiting[pos // 2]
      row = {"subset": pair["subset"], "id": pair["id"]}
      for s in sides:
        row.update({f"parsed_{s}": got[s].parsed, f"judgement_{s}": got[s].text,
                    f"truncated_{s}": got[s].truncated, f"tokens_{s}": got[s].prompt_tokens})
      yield score_pair(row, settings.unparsable_score)
