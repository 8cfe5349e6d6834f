"""RewardBench: data loading and validation, section arithmetic, the summary and its report, the evaluator."""

import gzip
import json

import pathlib

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import rewardbench as rewardbench_config
from ipo_jax import data, sources
from ipo_jax.evals import report as report_lib
from ipo_jax.evals import rewardbench, taxonomy
from tests.conftest import source_path

OFFLINE = rewardbench.DEFAULT_HUB_ID  # its filtered split, resolved through ipo_jax.sources


def data_config(**overrides):
  cfg = rewardbench_config.get_config().data
  cfg.update(overrides)
  return cfg


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def good_rows(n=3):
  return [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "subset": "hep-go", "id": i} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Section arithmetic.


def test_constants_match_rewardbench():
  official = json.loads(pathlib.Path(source_path("reward-bench:constants")).read_text())
  assert taxonomy.EXAMPLE_COUNTS == official["example_counts"]
  assert {k: list(v) for k, v in taxonomy.SUBSET_MAPPING.items()} == official["subset_mapping"]


def test_section_scores_reproduce_the_published_example():
  """The per-subset accuracies of RewardBench's README example; the expected values are what its own
  `calculate_scores_per_section` gives for them."""
  example = json.loads(pathlib.Path(source_path("reward-bench:section_example")).read_text())
  sections = rewardbench.section_scores(example["per_subset_accuracy"])
  expected = {"Chat": 0.6089385474860335, "Chat Hard": 0.44956140350877194, "Safety": 0.7216216216216216,
              "Reasoning": 0.46675669776831996}
  assert sections.keys() == expected.keys()
  for name, value in expected.items():
    assert sections[name] == pytest.approx(value, abs=1e-12)
  score = rewardbench.overall_score(sections, example["per_subset_accuracy"])
  assert score == pytest.approx(0.5617195675961868, abs=1e-12)


def test_prior_sets_weigh_half_a_section_and_the_paper_view():
  acc = {"alpacaeval-easy": 0.8, "math-prm": 0.2, "hep-go": 0.6, "donotanswer": 0.5}
  sections = rewardbench.section_scores(acc)
  assert sections == pytest.approx({"Chat": 0.8, "Safety": 0.5, "Reasoning": (0.2 * 984 + 0.6 * 164) / 1148})
  assert rewardbench.overall_score(sections, acc) == pytest.approx(sum(sections.values()) / 3)
  with_prior = dict(acc, anthropic_hhh=0.7, shp=0.5)
  assert rewardbench.overall_score(sections, with_prior) == pytest.approx(
      (2 * sum(sections.values()) + 0.6) / 7)  # prior sets: their mean, weight 1 against 2 per section
  paper = rewardbench.paper_scores(acc)
  assert paper == pytest.approx({"Chat": 0.8, "Code": 0.6, "Math": 0.2, "Safety": 0.5, "mean": 2.1 / 4})


def test_summarize_counts_ties_as_wrong_and_reports_them():
  rows = [{"subset": "hep-go", "id": 0, "correct": True, "tie": False},
          {"subset": "hep-go", "id": 1, "correct": False, "tie": True, "truncated_chosen": True},
          {"subset": "math-prm", "id": 0, "correct": False, "tie": False,
           "candidates": {"log_odds_chosen": [1.0, -1.0], "log_odds_rejected": [0.0, 0.0]}},
          {"subset": "new-subset", "id": 0, "correct": True, "tie": False}]
  s = rewardbench.summarize(rows, model="m")
  assert s["subsets"]["hep-go"] == {"count": 2, "correct": 1, "ties": 1, "truncated": 1, "accuracy": 0.5}
  assert s["counts"] == {"pairs": 4, "correct": 2, "ties": 1, "truncated": 1, "other_subsets": ["new-subset"]}
  assert s["sections"] == pytest.approx({"Reasoning": (0.5 * 164 + 0.0 * 984) / (164 + 984)})
  assert s["prompt_search"]["math-prm"] == {"accuracy": [1.0, 0.0], "best": 0, "best_accuracy": 1.0}
  assert s["prompt_search_selected"]["sections"] == pytest.approx({"Reasoning": (0.5 * 164 + 1.0 * 984) / 1148})
  report = report_lib.report_text(s)
  assert "| math-prm | 100.0 | 0.0 | #0 |" in report and "With the best candidate of each subset" in report
  assert s["model"] == "m"


# ----------------------------------------------------------------------------------------------------------------
# Data.


def test_offline_copy_loads_with_keys_unique_per_subset():
  pairs = rewardbench.load_pairs(data_config(path=OFFLINE))
  assert len(pairs) == 2985 and pairs.skipped == 0
  counts = {}
  for r in pairs:
    counts[r["subset"]] = counts.get(r["subset"], 0) + 1
  assert {k: v for k, v in counts.items() if k != "math-prm"} == {
      k: v for k, v in taxonomy.EXAMPLE_COUNTS.items() if k != "math-prm"}
  assert counts["math-prm"] == 447
  assert {("donotanswer", "3692"), ("hep-python", "3692")} <= {rewardbench.pair_key(r) for r in pairs}


def test_without_cache_or_hub_the_offline_copy_is_read(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
  (tmp_path / "reward_bench").mkdir()  # $IPO_JAX_DATA points at a copy of our own
  with gzip.open(tmp_path / "reward_bench" / "reward_bench_filtered.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in good_rows(2))
  monkeypatch.setenv(sources.DATA_ENV, str(tmp_path))
  pairs = rewardbench.load_pairs(data_config(path=""))  # empty: allenai/reward-bench
  assert len(pairs) == 2 and pairs.source.startswith("allenai/reward-bench:filtered (" + str(tmp_path))
  with pytest.raises(sources.SourceUnavailable, match=r"^cannot get hub data set allenai/reward-bench split raw: "
                     r"tried cache .*; remote \(offline mode is set\)\. Fix: connect to the network"):
    rewardbench.load_pairs(data_config(split="raw"))


def test_subset_selection():
  pairs = rewardbench.load_pairs(data_config(path=OFFLINE, subsets="hep-go, math-prm", max_per_subset=3))
  assert sorted(r["subset"] for r in pairs) == ["hep-go"] * 3 + ["math-prm"] * 3
  with pytest.raises(ValueError, match=r"names \['hep-cobol'\], not in the data"):
    rewardbench.load_pairs({"path": OFFLINE, "subsets": ["hep-cobol"]})


def test_parquet_with_renamed_columns(tmp_path):
  offline = rewardbench.load_pairs(data_config(path=OFFLINE, max_per_subset=2))
  renamed = {"prompt": "question", "chosen": "response_A", "rejected": "response_B"}
  path = str(tmp_path / "renamed.parquet")
  pq.write_table(pa.Table.from_pylist([{renamed.get(k, k): v for k, v in r.items()} for r in offline]), path)
  with pytest.raises(data.DataError, match="row 0 has a missing or empty field 'prompt'"):
    rewardbench.load_pairs(data_config(path=path))
  cfg = data_config(path=path, max_per_subset=2)
  cfg.columns = ml_collections.ConfigDict(renamed)
  pairs = rewardbench.load_pairs(cfg)
  assert list(pairs) == list(offline)


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a", "rejected": "b", "subset": "s", "id": 1}, "row 1 has a missing or empty field 'prompt'"),
    ({"prompt": "p", "chosen": "", "rejected": "b", "subset": "s", "id": 1},
     "row 1 has a missing or empty field 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s"}, "row 1 has a missing or empty field 'id'"),
    ({"prompt": "p", "chosen": "a", "rejected": " \n", "subset": "s", "id": 1}, "id=1\\) has a blank field 'rejected'"),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b", "subset": "s", "id": 1}, "has a non-text field 'prompt'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "hep-go", "id": 0}, r"\('hep-go', '0'\) appears twice"),
])
def test_bad_rows_name_the_row_and_field(tmp_path, row, message):
  path = write_jsonl(tmp_path / "pairs.jsonl", [good_rows(1)[0], row])
  with pytest.raises(data.DataError, match=message) as err:
    rewardbench.load_pairs(data_config(path=path))
  assert "pairs.jsonl" in str(err.value)


def test_skip_invalid_counts_the_skipped_rows(tmp_path):
  rows = good_rows(3) + [{"prompt": "p", "chosen": "", "rejected": "b", "subset": "s", "id": 9},
                         {"prompt": "p", "chosen": "a", "rejected": "  ", "subset": "s", "id": 10},
                         {"chosen": "a", "rejected": "b", "subset": "s", "id": 11}]
  pairs = rewardbench.load_pairs(data_config(path=write_jsonl(tmp_path / "p.jsonl", rows), skip_invalid=True))
  assert len(pairs) == 3 and pairs.skipped == 3


def test_unknown_format_and_missing_file(tmp_path):
  csv = tmp_path / "pairs.csv"
  csv.write_text("prompt,chosen\n")
  with pytest.raises(data.DataError, match="pairs.csv: unknown format; expected one of .jsonl"):
    rewardbench.load_pairs(data_config(path=str(csv)))
  with pytest.raises(FileNotFoundError, match="data file not found"):
    rewardbench.load_pairs(data_config(path=str(tmp_path / "missing.jsonl")))
  with pytest.raises(ValueError, match="data.split must be one of"):
    rewardbench.load_pairs(data_config(split="test"))


# ----------------------------------------------------------------------------------------------------------------


def test_evaluator_scores_only_the_unfinished_pairs_and_yields_the_metrics(tmp_path):
  from ipo_jax.rundir import RunDir
  pairs = rewardbench.Pairs([{"subset": "hep-go", "id": i, "prompt": "p", "chosen": "a", "rejected": "b"}
                             for i in range(3)] + [{"subset": "math-prm", "id": 0, "prompt": "p", "chosen": "a",
                                                    "rejected": "b"}], "test")
  asked = []

  def score(todo):
    asked.append([p["id"] for p in todo])
    for p in todo:
      yield [{"subset": p["subset"], "id": p["id"], "correct": p["id"] != 1, "tie": False}]

  run = RunDir.open(str(tmp_path), "test", {"a": 1})
  run.append(rewardbench.SCORES_FILE, [{"subset": "hep-go", "id": 0, "correct": True, "tie": False}])
  evaluator = rewardbench.Evaluator(pairs, score, run)
  metrics = dict(evaluator.run())
  assert asked == [[1, 2, 0]] and evaluator.scored == 3
  assert metrics["sections/Reasoning"] == pytest.approx((2 / 3 * 164 + 1.0 * 984) / (164 + 984))
  assert metrics["score"] == metrics["sections/Reasoning"] and metrics["paper/Math"] == 1.0
  assert [r["id"] for r in evaluator.rows()] == [0, 1, 2, 0]
  assert len(run.rows(rewardbench.SCORES_FILE)) == 4
  assert dict(rewardbench.Evaluator(pairs, score, RunDir.open(str(tmp_path), "test", {"a": 1})).run()) == metrics
  assert len(asked) == 1  # nothing left to score
