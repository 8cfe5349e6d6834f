"""Readings of a model as an IPO classifier beyond RewardBench: P(Yes) of (instruction, prompt, response)
examples, a pairwise preference read in both orders, and a prompt's category."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ipo_jax.evals.taxonomy import CATEGORIES
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.ipo import scorer as scorer_lib

# The yes/no question that puts a prompt in a category (one reading per category; the most likely Yes wins).
CATEGORY_QUESTIONS = {
    "chat": "a general question or conversation",
    "code": "a programming task or a question about code",
    "math": "a math problem or a calculation",
    "safety": "a request for something harmful, dangerous, illegal or unethical",
}
PAIRWISE_INSTRUCTION = ("Below is a user's request and two responses, A and B. Is response A better than response B: "
                        "more helpful, accurate and harmless? Answer Yes or No.")


def yes_probabilities(scorer: scorer_lib.Scorer, examples: Sequence[tuple[str, str, str]]) -> np.ndarray:
  """P(Yes) [N] of (instruction, prompt, response) examples; consecutive examples run as pairs (a shared prompt
  is read once)."""
  if not examples:
    return np.zeros((0,), np.float32)
  encoded = [ids for ids, _ in scorer.encode(examples)]
  if len(encoded) % 2:
    encoded.append(encoded[-1])
  log_odds = np.zeros(len(encoded))
  for idx, out in scorer.score_pairs(list(zip(encoded[0::2], encoded[1::2]))):
    log_odds[idx] = out[:, 0]
  return scorer_lib.sigmoid(log_odds[:len(examples)]).astype(np.float32)


def ipo_scores(scorer: scorer_lib.Scorer, prompt_set: prompts_lib.PromptSet, prompts: Sequence[str],
               responses: Sequence[str], categories: Sequence[str]) -> np.ndarray:
  """P(Yes) [N] of each (prompt, response) under its category's instruction."""
  return yes_probabilities(scorer, [(prompt_set.instruction(c), p, r)
                                    for p, r, c in zip(prompts, responses, categories)])


def pairwise_preference(scorer: scorer_lib.Scorer, prompts: Sequence[str], first: Sequence[str],
                        second: Sequence[str]) -> np.ndarray:
  """P(`first` better than `second`) [N], the mean of both presentation orders (cancels position bias)."""
  def ask(a, b):
    return yes_probabilities(scorer, [(PAIRWISE_INSTRUCTION, p, f"A: {x}\n\nB: {y}") for p, x, y in zip(prompts, a, b)])
  return 0.5 * (ask(first, second) + 1.0 - ask(second, first))


def classify_categories(scorer: scorer_lib.Scorer, prompts: Sequence[str]) -> list[str]:
  """The category whose yes/no question gets the highest P(Yes), per prompt (one reading per category)."""
  examples = [(f"Below is a user's request. Is it {CATEGORY_QUESTIONS[c]}? Answer Yes or No.", p, "")
              for p in prompts for c in CATEGORIES]
  yes = yes_probabilities(scorer, examples).reshape(len(prompts), len(CATEGORIES))
  return [CATEGORIES[i] for i in yes.argmax(axis=1)]
