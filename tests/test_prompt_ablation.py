"""experiments/rewardbench_prompt_ablation.py on a small slice with the embedded model (8 subsets, one pair each):
the four prompt sets score the same pairs, and the table's numbers are recomputed here from the rows files the
runs wrote."""

import importlib.util
import json
import pathlib
import sys

import pytest

from ipo_jax import data, runtime
from ipo_jax.rundir import IdentityMismatch
from ipo_jax.tasks import rewardbench as rewardbench_task
from tests.conftest import source_path

REPO = pathlib.Path(__file__).resolve().parent.parent
SUBSETS = "alpacaeval-easy,mt-bench-hard,llmbar-natural,donotanswer,xstest-should-respond,math-prm,hep-go,hep-rust"
NAMES = ("paper", "same", "shuffled", "deranged_0")


def _script():
  spec = importlib.util.spec_from_file_location("rewardbench_prompt_ablation",
                                                REPO / "experiments" / "rewardbench_prompt_ablation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablation = _script()


@pytest.fixture(scope="module")
def smollm():
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel
  return loading.load_model("embedded")


def _run(out, monkeypatch, smollm):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: smollm)
  monkeypatch.setattr(sys, "argv", ["rewardbench_prompt_ablation.py", "--max_per_subset", "1", "--subsets", SUBSETS,
                                    "--max_length", "256", "--output_dir", str(out)])
  ablation.main()
  return json.loads((out / "ablation.json").read_text())


def _decision(row):
  return "tie" if row["tie"] else "chosen" if row["correct"] else "rejected"


def test_ablation_table_recomputed_from_the_rows_files(tmp_path, monkeypatch, smollm):
  official = json.loads(pathlib.Path(source_path("reward-bench:constants")).read_text())
  table = _run(tmp_path, monkeypatch, smollm)
  rows = {n: {(r["subset"], str(r["id"])): r for r in data.iter_jsonl(tmp_path / n / "scores.jsonl")} for n in NAMES}
  keys = set(rows["paper"])
  assert len(keys) == 8 and all(set(r) == keys for r in rows.values())  # the same pairs everywhere
  assert list(table["summaries"]) == list(NAMES) and table["pairs"] == 8
  run = json.loads((tmp_path / "deranged_0" / "run.json").read_text())
  assert run["identity"]["derangement_seed"] == 0  # the seed is part of the run's identity

  # The paper's categories: Chat = Chat + Chat Hard, Code = hep-*, Math, Safety; each the mean of its subsets'
  # accuracies weighted by RewardBench's example counts (ties count as wrong).
  sections = official["subset_mapping"]
  categories = {"Chat": sections["Chat"] + sections["Chat Hard"], "Code": sections["Reasoning"][1:],
                "Math": ["math-prm"], "Safety": sections["Safety"]}
  weight = official["example_counts"]
  changed_rows = [json.loads(line) for line in (tmp_path / "changed_pairs.jsonl").read_text().splitlines()]
  for name in NAMES:
    accuracy = {}
    for (subset, _), r in rows[name].items():
      accuracy.setdefault(subset, []).append(r["correct"] and not r["tie"])
    accuracy = {s: sum(v) / len(v) for s, v in accuracy.items()}
    assert table["summaries"][name]["subsets"] == pytest.approx(accuracy)
    for category, subsets in categories.items():
      present = [s for s in subsets if s in accuracy]
      expected = sum(weight[s] * accuracy[s] for s in present) / sum(weight[s] for s in present)
      assert table["summaries"][name]["paper"][category] == pytest.approx(expected)
    if name == "paper":
      continue
    changed = {k for k in keys if _decision(rows[name][k]) != _decision(rows["paper"][k])}
    counts = table["changed_vs_paper"][name]
    assert counts["all"] == len(changed)
    for category, subsets in categories.items():
      assert counts[f"paper: {category}"] == sum(s in subsets for s, _ in changed)
    for section, subsets in sections.items():
      assert counts[section] == sum(s in subsets for s, _ in changed)
    listed = {(r["subset"], str(r["id"])): r for r in changed_rows if r["prompts"] == name}
    assert set(listed) == changed
    for k, r in listed.items():
      assert (r["decision_paper"], r["decision"]) == (_decision(rows["paper"][k]), _decision(rows[name][k]))
  assert sum(c["all"] for c in table["changed_vs_paper"].values()) > 0
  report = (tmp_path / "ablation.md").read_text()
  assert "| all | " + " | ".join(str(table["changed_vs_paper"][n]["all"]) for n in NAMES[1:]) + " |" in report

  # A rerun resumes: nothing is scored again and the table is the same.
  again = _run(tmp_path, monkeypatch, smollm)
  assert again["changed_vs_paper"] == table["changed_vs_paper"]
  for name in NAMES:
    assert json.loads((tmp_path / name / "summary.json").read_text())["scoring"]["pairs_scored"] == 0
    assert again["summaries"][name]["paper"] == table["summaries"][name]["paper"]
  other = ablation.variant_configs("embedded", str(tmp_path), 1, [0], SUBSETS, max_length=256)["deranged_0"]
  other.scoring.derangement_seed = 1  # another derangement into the same directory: refused, naming the seed
  with pytest.raises(IdentityMismatch, match=r"\(derangement_seed, prompts differ\)"):
    rewardbench_task.run(other)


def test_prompt_sets_differ_only_in_their_instructions(tmp_path):
  configs = ablation.variant_configs("embedded", str(tmp_path), 3, [0, 4])
  assert list(configs) == ["paper", "same", "shuffled", "deranged_0", "deranged_4"]
  strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("scoring", "output_dir")}
  plain = lambda c: {k: v for k, v in c.scoring.items() if k not in ("prompts_file", "derangement_seed")}
  for name, config in configs.items():
    assert strip(config) == strip(configs["paper"]) and plain(config) == plain(configs["paper"])
    assert config.output_dir == str(tmp_path / name)
  assert configs["deranged_4"].scoring.derangement_seed == 4
  assert configs["shuffled"].scoring.prompts_file == "paper:rewardbench_prompts_shuffled"
  assert ablation.seed_list("0, 3") == [0, 3] and ablation.seed_list("") == []
  for bad in ("-1", "a", "2,2"):
    with pytest.raises(Exception, match="distinct integers >= 0"):
      ablation.seed_list(bad)
