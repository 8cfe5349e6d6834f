"""Prompt ablations: the seeded section derangement, and the config variants same, shuffled and deranged against
the offline copies of the authors' files."""

import itertools
import json
import pathlib

import pytest

from configs import rewardbench as rewardbench_config
from ipo_jax.ipo import ablations, prompts
from tests.conftest import source_path


def _json(ref):
  return json.loads(pathlib.Path(source_path(ref)).read_text())


@pytest.fixture(scope="module")
def official_sections():
  """RewardBench's own section -> subsets (its constants.py), not the package's taxonomy."""
  return _json("reward-bench:constants")["subset_mapping"]


@pytest.fixture(scope="module")
def paper():
  return prompts.load_prompts("paper:rewardbench_prompts"), _json("paper:rewardbench_prompts")["prompts"]


def _scoring(arg, **overrides):
  config = rewardbench_config.get_config(arg)
  config.scoring.update(overrides)
  return prompts.prompts_from_scoring(config.scoring)


def test_the_section_derangement_is_a_seeded_permutation_without_a_fixed_section(official_sections):
  names = sorted(official_sections)
  derangements = {p for p in itertools.permutations(names) if all(a != b for a, b in zip(names, p))}
  assert len(derangements) == 9
  drawn = {}
  for seed in range(60):
    mapping = ablations.section_derangement(seed)
    assert sorted(mapping) == sorted(mapping.values()) == names  # a permutation of the four
    assert all(mapping[s] != s for s in names)  # no fixed section
    assert mapping == ablations.section_derangement(seed)  # reproducible
    drawn[seed] = tuple(mapping[s] for s in names)
  assert set(drawn.values()) == derangements  # every one of the 9 is drawn
  assert drawn[0] != drawn[1]


def test_every_subset_takes_a_donor_of_the_section_its_section_is_sent_to(official_sections, paper):
  loaded, raw = paper
  section_of = {s: section for section, subsets in official_sections.items() for s in subsets}
  for seed in (0, 1, 7):
    sent_to = ablations.section_derangement(seed)
    donors = ablations.donors(loaded, seed)
    deranged = ablations.deranged(loaded, seed)
    assert sorted(donors) == sorted(section_of)
    for subset, donor in donors.items():
      assert section_of[donor] == sent_to[section_of[subset]] != section_of[subset]
      assert deranged.instruction(subset) == raw[donor]
      assert deranged.instruction(subset) != raw[subset]  # never its own words (mt-bench-hard shares Chat's)
    assert donors == ablations.donors(loaded, seed)
    assert deranged.fallback == loaded.fallback == "alpacaeval-easy"
  assert ablations.donors(loaded, 0) != ablations.donors(loaded, 1)


def test_donors_are_dealt_in_turn():
  # One text everywhere: nothing is skipped, so the donors of a section serve 5/6/5/7 subsets as evenly as possible.
  same = prompts.load_prompts("paper:rewardbench_prompts_same")
  donors = ablations.donors(same, 4)
  for section, subsets in ablations.SUBSET_MAPPING.items():
    lenders = ablations.SUBSET_MAPPING[ablations.section_derangement(4)[section]]
    uses = [[donors[s] for s in subsets].count(d) for d in lenders]
    assert max(uses) - min(uses) <= 1 and sum(uses) == len(subsets)


def test_same_gives_every_subset_the_one_generic_instruction():
  raw = _json("paper:rewardbench_prompts_same")
  (text,) = set(raw["prompts"].values())
  same = _scoring("paper,same")
  for subset in ablations.SECTION_OF:
    assert same.resolve(subset) == (subset, "subset") and same.instruction(subset) == text
  assert same.instruction("not-a-subset") == text  # the file's fallback subset


def test_shuffled_gives_each_subset_the_authors_mismatched_instruction(paper):
  _, own = paper
  raw = _json("paper:rewardbench_prompts_shuffled")["prompts"]
  shuffled = _scoring("paper,shuffled")
  for subset in ablations.SECTION_OF:
    assert shuffled.instruction(subset) == raw[subset]
  # The authors' table, read off their ours_prompt_shuffle.py: some subsets keep their own instruction.
  assert shuffled.instruction("hep-python") == own["refusals-dangerous"]
  assert shuffled.instruction("math-prm") == own["donotanswer"]
  assert shuffled.instruction("mt-bench-hard") == own["xstest-should-respond"]
  assert shuffled.instruction("hep-go") == own["hep-go"] and shuffled.instruction("alpacaeval-hard") == own[
      "alpacaeval-hard"]


def test_deranged_variant_is_seeded_by_a_config_field(paper):
  loaded, _ = paper
  config = rewardbench_config.get_config("paper,deranged")
  assert config.scoring.derangement_seed == 0 and config.scoring.truncation == "paper"
  assert _scoring("paper,deranged").prompts == ablations.deranged(loaded, 0).prompts
  assert _scoring("paper,deranged", derangement_seed=5).prompts == ablations.deranged(loaded, 5).prompts
  assert _scoring("paper,deranged", derangement_seed=-1).prompts == loaded.prompts  # off
  assert _scoring("paper").prompts == loaded.prompts and "derangement_seed" not in rewardbench_config.get_config(
      "paper").scoring
  with pytest.raises(ValueError, match=r"scoring.derangement_seed=-2 must be an integer >= 0"):
    _scoring("paper,deranged", derangement_seed=-2)


def test_prompt_variants_choose_one_file_and_their_own_output_dir():
  dirs = {arg: rewardbench_config.get_config(arg).output_dir
          for arg in ("paper", "paper,same", "paper,shuffled", "paper,deranged")}
  assert len(set(dirs.values())) == 4
  assert rewardbench_config.get_config("same").scoring.prompts_file == "paper:rewardbench_prompts_same"
  for bad in ("same,shuffled", "ensemble,same"):
    with pytest.raises(ValueError, match="each choose the prompts file; pick one"):
      rewardbench_config.get_config(bad)
