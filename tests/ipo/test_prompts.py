"""Instruction sets: the project's defaults, the authors' per-subset file, candidate lists, bad files."""

import json
import pathlib

import pytest

from ipo_jax.evals import taxonomy
from ipo_jax.ipo import prompts
from tests.conftest import source_path

ALL_SUBSETS = [s for subsets in taxonomy.SUBSET_MAPPING.values() for s in subsets]


def test_every_subset_has_a_category_and_a_default_instruction():
  assert sorted(taxonomy.SUBSET_CATEGORY) == sorted(ALL_SUBSETS)
  default = prompts.default_prompts()
  for category in taxonomy.CATEGORIES:
    assert category in default.prompts
  for subset in ALL_SUBSETS:
    key = default.key_for(subset)
    assert key in (subset, taxonomy.category_of(subset))
    assert default.instruction(subset).endswith("Answer Yes or No.")
  assert default.key_for("hep-python") == "code" and default.key_for("math-prm") == "math"
  assert default.key_for("xstest-should-respond") == "xstest-should-respond"
  assert default.key_for("some-new-subset") == prompts.DEFAULT_FALLBACK
  assert taxonomy.category_of("hep-kotlin") == "code" and taxonomy.category_of("unknown") is None


def test_paper_prompts_file_gives_each_subset_its_instruction():
  raw = json.loads(pathlib.Path(source_path("paper:rewardbench_prompts")).read_text())
  loaded = prompts.load_prompts("paper:rewardbench_prompts")
  assert loaded.fallback == raw["fallback_subset"] == "alpacaeval-easy"
  for subset in ALL_SUBSETS:
    assert loaded.instruction(subset) == raw["prompts"][subset]
  assert loaded.instruction("not-a-subset") == raw["prompts"]["alpacaeval-easy"]
  assert loaded.max_candidates == 1


def test_candidate_file_is_an_ensemble_with_default_for_missing_subsets():
  path = source_path("paper:candidate_prompts")
  loaded = prompts.load_prompts(path)
  raw = json.loads(pathlib.Path(path).read_text())
  assert loaded.fallback == "default" and loaded.max_candidates == 10
  assert loaded.instructions("hep-go") == tuple(raw["hep-go"])
  assert loaded.instructions("llmbar-adver-manual") == (raw["default"],)  # missing in the authors' file
  with pytest.raises(ValueError, match="10 instructions; set scoring.ensemble"):
    loaded.instruction("hep-go")


def test_category_file_matches_categories_case_insensitively():
  loaded = prompts.load_prompts("paper:self_improvement_prompts")
  raw = json.loads(pathlib.Path(source_path("paper:self_improvement_prompts")).read_text())["prompts"]
  assert loaded.instruction("math-prm") == raw["Math"]
  assert loaded.instruction("donotanswer") == raw["Safety"]
  assert loaded.instruction("alpacaeval-easy") == raw["chat"]
  assert loaded.instruction("hep-go") == raw["General"]  # no "code" key: the fallback category


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a JSON object"),
    ('{"prompts": {"chat": "q"}}', "exactly one of 'fallback_subset'"),
    ('{"fallback_subset": "math", "prompts": {"chat": "q"}}', "fallback 'math' is not one of its keys"),
    ('{"fallback": "chat", "prompts": {"chat": "  "}}', r"prompts\['chat'\]\[0\] must be a non-empty string"),
    ('{"fallback": "chat", "prompts": {"chat": []}}', "non-empty list"),
    ('{"fallback": "chat", "prompts": {"chat": "q"}, "extra": 1}', "unknown top-level keys"),
    ('{"chat": ["q"]}', "needs a 'default' entry"),
    ('{"fallback": "chat", ', "not valid JSON"),
])
def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path, content, message):
  path = tmp_path / "my_prompts.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as err:
    prompts.load_prompts(str(path))
  assert "my_prompts.json" in str(err.value)


def test_missing_prompts_file():
  with pytest.raises(FileNotFoundError, match="prompts file not found"):
    prompts.prompts_from_config("no/such/prompts.json")
  assert prompts.prompts_from_config("").source == "default"


PAPER_FILES = ("paper:rewardbench_prompts", "paper:candidate_prompts", "paper:rewardbench_prompts_same",
               "paper:rewardbench_prompts_shuffled", "paper:self_improvement_prompts")


@pytest.mark.parametrize("prompts_file", ("",) + PAPER_FILES)
def test_the_paper_files_and_the_defaults_pass_the_check_on_all_23_subsets(prompts_file):
  prompt_set = prompts.prompts_from_config(prompts_file)
  before = {s: prompt_set.instructions(s) for s in ALL_SUBSETS}
  checked = prompts.check_subsets(prompt_set, ALL_SUBSETS, prompts_file)  # no error: every subset is known
  assert {s: prompt_set.instructions(s) for s in ALL_SUBSETS} == before  # the check changes no instruction
  expected_fallback = {
      "paper:candidate_prompts": ("llmbar-adver-manual",),  # the authors' file lacks it: their "default"
      "paper:self_improvement_prompts": tuple(s for s in ALL_SUBSETS if s.startswith("hep-")),  # no code key
  }.get(prompts_file, ())
  assert checked.fallback_subsets == tuple(sorted(expected_fallback)) and checked.unknown_subsets == ()
  for subset in expected_fallback:
    assert prompt_set.resolve(subset) == (prompt_set.fallback, "fallback")
  rows = [{"subset": s} for s in ALL_SUBSETS for _ in range(2)]
  summary = checked.summary(rows)
  assert summary["fallback_pairs"] == {s: 2 for s in expected_fallback}
  assert summary["fallback_pairs_total"] == 2 * len(expected_fallback)
  assert summary["fallback"] == prompt_set.fallback and summary["prompts_file"] == (prompts_file or "default")


def test_an_unknown_subset_is_an_error_naming_it_the_file_and_the_fix():
  paper = prompts.load_prompts("paper:rewardbench_prompts")
  with pytest.raises(ValueError) as err:
    prompts.check_subsets(paper, {"alpacaeval-easy", "my-new-subset", "other-set"}, "paper:rewardbench_prompts")
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith("scoring.prompts_file=paper:rewardbench_prompts (rewardbench_prompts.json) has no "
                            "instruction for the subsets ['my-new-subset', 'other-set']")
  assert "add an entry for each to that file" in message
  assert "--config.scoring.fallback_instruction=True" in message and "'alpacaeval-easy'" in message
  with pytest.raises(ValueError, match=r"scoring.prompts_file \(empty: the project's default instructions\) has no "
                     r"instruction for the subsets \['my-new-subset'\].*give a prompts file with an entry for each"):
    prompts.check_subsets(prompts.default_prompts(), ["my-new-subset", "hep-go"])

  allowed = prompts.check_subsets(paper, ["my-new-subset", "hep-go"], "paper:rewardbench_prompts",
                                  fallback_instruction=True)
  assert allowed.fallback_subsets == allowed.unknown_subsets == ("my-new-subset",)
  assert allowed.summary([{"subset": "my-new-subset"}, {"subset": "hep-go"}])["fallback_pairs"] == {
      "my-new-subset": 1}


def test_known_names_may_fall_back_and_an_own_entry_needs_no_fallback(tmp_path):
  path = tmp_path / "mine.json"
  path.write_text(json.dumps({"fallback": "chat", "prompts": {"chat": "q?", "my-new-subset": "r?"}}))
  mine = prompts.load_prompts(str(path))
  # hep-kotlin has a category (code) and shp is a prior set: known, so the file's fallback serves them.
  checked = prompts.check_subsets(mine, ["my-new-subset", "hep-kotlin", "shp", "alpacaeval-easy"], str(path))
  assert checked.fallback_subsets == ("hep-kotlin", "shp") and checked.unknown_subsets == ()
  assert mine.resolve("my-new-subset") == ("my-new-subset", "subset")
  assert mine.resolve("alpacaeval-easy") == ("chat", "category")
  assert taxonomy.known_subset("shp") and not taxonomy.known_subset("my-new-subset")
