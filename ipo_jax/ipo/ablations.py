"""Prompt ablations: instructions given to subsets they were not written for.

The authors ran two ablations of their per-subset instructions, one generic instruction for every subset and a
fixed table of mismatched ones; both are plain prompts files (the sources `paper:rewardbench_prompts_same` and
`paper:rewardbench_prompts_shuffled`). Their table leaves hep-go and alpacaeval-hard with their own instruction and
gives mt-bench-easy and hep-java one of their own section. This module holds the project's control, a seeded
derangement of RewardBench's four sections (Chat, Chat Hard, Safety, Reasoning; evals/taxonomy.py):

  `section_derangement(seed)`: a permutation of the sections with no fixed section, uniform over the 9 such
      permutations (numpy's default generator seeded with `seed`, permutations drawn until one has no fixed point);
  `donors(prompt_set, seed)`: per subset of the sections, the subset whose instructions it takes, one of the
      section its own section is sent to. The donors of that section are put in a seeded order and dealt out in
      turn (each serves before any serves twice), skipping a donor whose instructions equal the subset's own when
      the section has one that differs (the authors' mt-bench-hard has the words of mt-bench-easy);
  `deranged(prompt_set, seed)`: the `PromptSet` with those instructions (`scoring.derangement_seed`,
      configs/rewardbench.py:deranged).

Subsets outside the four sections (prior sets, hep-kotlin) resolve as in the original set; the fallback key stays
(when it is one of the sections' subsets, it carries that subset's new instructions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ipo_jax.evals.taxonomy import SUBSET_MAPPING

SECTIONS = tuple(SUBSET_MAPPING)
SECTION_OF = {s: section for section, subsets in SUBSET_MAPPING.items() for s in subsets}


def check_seed(seed: Any, key: str = "scoring.derangement_seed") -> int:
  """The seed as an int; anything but an integer >= 0 is an error naming `key`."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"{key}={seed!r} must be an integer >= 0; set --config.{key}=<n>")
  return int(seed)


def section_derangement(seed: int) -> dict[str, str]:
  """{section: the section whose subsets lend it their instructions}, no section mapped to itself."""
  rng = np.random.default_rng(check_seed(seed))
  while True:
    order = rng.permutation(len(SECTIONS))
    if not np.any(order == np.arange(len(SECTIONS))):
      return {SECTIONS[i]: SECTIONS[int(j)] for i, j in enumerate(order)}


def donors(prompt_set: Any, seed: int) -> dict[str, str]:
  """{subset: donor subset} for every subset of the four sections (see the module docstring)."""
  sent_to = section_derangement(seed)
  rng = np.random.default_rng((seed, 1))  # a stream of its own for the donors' order
  out = {}
  for section in SECTIONS:
    pool = SUBSET_MAPPING[sent_to[section]]
    lenders = [pool[int(i)] for i in rng.permutation(len(pool))]
    for i, subset in enumerate(SUBSET_MAPPING[section]):
      own = prompt_set.instructions(subset)
      turn = [lenders[(i + k) % len(lenders)] for k in range(len(lenders))]
      out[subset] = next((d for d in turn if prompt_set.instructions(d) != own), turn[0])
  return out


def deranged(prompt_set: Any, seed: int) -> Any:
  """`prompt_set` with each subset of the four sections given its donor's instructions."""
  lent = donors(prompt_set, seed)
  table = {**prompt_set.prompts, **{s: prompt_set.instructions(d) for s, d in lent.items()}}
  return dataclasses.replace(prompt_set, prompts=table, source=f"{prompt_set.source}, deranged (seed {seed})")
