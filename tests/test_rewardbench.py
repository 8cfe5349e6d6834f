"""RewardBench: data loading and validation, section arithmetic, outputs, resume, and the task end to end."""

import gzip
import json

import pathlib

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import rewardbench as rewardbench_config
from ipo_jax import data, main, prompts, rewardbench, runtime, scoring, sources
from tests.conftest import source_path
from tests.test_scoring import toy_model

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
  assert rewardbench.EXAMPLE_COUNTS == official["example_counts"]
  assert {k: list(v) for k, v in rewardbench.SUBSET_MAPPING.items()} == official["subset_mapping"]


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


def test_summarize_counts_ties_as_wrong_and_reports_them(tmp_path):
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
  rewardbench.write_report(str(tmp_path), s)
  report = (tmp_path / rewardbench.REPORT_FILE).read_text()
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
      k: v for k, v in rewardbench.EXAMPLE_COUNTS.items() if k != "math-prm"}
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
# Resume, outputs, and the task.


def test_resume_refuses_other_settings_and_repairs_a_torn_line(tmp_path):
  out = str(tmp_path)
  assert rewardbench.resume(out, {"layout": "paper"}) == {}
  scores = tmp_path / rewardbench.SCORES_FILE
  scores.write_text('{"subset": "a", "id": 1, "correct": true}\n{"subset": "a", "id": 2, "corr')
  finished = rewardbench.resume(out, {"layout": "paper"})
  assert list(finished) == [("a", "1")]
  assert scores.read_text() == '{"subset": "a", "id": 1, "correct": true}\n'
  with pytest.raises(ValueError, match=r"other settings \(layout differ\)"):
    rewardbench.resume(out, {"layout": "chat"})


def run_config(tmp_path, **scoring_overrides):
  config = rewardbench_config.get_config("demo")
  config.output_dir = str(tmp_path / "run")
  config.data.subsets = "xstest-should-respond,llmbar-natural,hep-go"
  config.data.max_per_subset = 3
  config.scoring.update(dict(max_length=256, batch_tokens=1024, max_programs=2, progress=False,
                             **scoring_overrides))
  return config


@pytest.fixture(scope="module")
def toy():
  return toy_model()


def test_run_writes_outputs_and_resumes_after_an_interruption(tmp_path, monkeypatch, toy):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config: toy)
  config = run_config(tmp_path)
  score_pairs = scoring.score_rewardbench_pairs

  def interrupted(*args, **kwargs):
    for chunk in score_pairs(*args, **kwargs):
      yield chunk
      raise KeyboardInterrupt  # stop after the first pairs were written

  monkeypatch.setattr(scoring, "score_rewardbench_pairs", interrupted)
  with pytest.raises(KeyboardInterrupt):
    rewardbench.run(config)
  scores = tmp_path / "run" / rewardbench.SCORES_FILE
  first = scores.read_text().splitlines()
  assert 1 <= len(first) < 9
  scores.write_text("\n".join(first) + '\n{"subset": "hep-go", "id": 4')  # torn by the interruption
  monkeypatch.setattr(scoring, "score_rewardbench_pairs", score_pairs)
  summary = rewardbench.run(config)

  rows = [json.loads(line) for line in scores.read_text().splitlines()]
  keys = [rewardbench.pair_key(r) for r in rows]
  assert len(keys) == len(set(keys)) == 9 and rows[:len(first)] == [json.loads(x) for x in first]
  assert summary["scoring"]["pairs_scored"] == 9 - len(first)
  assert summary["counts"]["pairs"] == 9 and set(summary["subsets"]) == set(config.data.subsets.split(","))
  assert summary["scoring"]["compilations"] <= 2
  for r in rows:
    assert r["correct"] == (r["log_odds_chosen"] > r["log_odds_rejected"])
    assert 0 < r["score_chosen"] < 1 and 0 < r["yes_no_mass_chosen"] <= 1
  out = tmp_path / "run"
  assert json.loads((out / rewardbench.SUMMARY_FILE).read_text())["score"] == pytest.approx(summary["score"])
  report = (out / rewardbench.REPORT_FILE).read_text()
  assert "| subset | section | pairs | accuracy | ties | truncated |" in report
  assert "| hep-go | Reasoning | 3 |" in report
  assert (out / rewardbench.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

  fresh = run_config(tmp_path)  # the same pairs scored in one go give the same rows
  fresh.output_dir = str(tmp_path / "fresh")
  rewardbench.run(fresh)
  again = {rewardbench.pair_key(r): r for r in data.iter_jsonl(tmp_path / "fresh" / rewardbench.SCORES_FILE)}
  for r in rows:
    assert again[rewardbench.pair_key(r)]["score_chosen"] == pytest.approx(r["score_chosen"], abs=1e-6)

  changed = run_config(tmp_path, layout="chat")
  with pytest.raises(ValueError, match="other settings"):
    rewardbench.run(changed)


def test_config_variants():
  paper = rewardbench_config.get_config("paper")
  assert paper.scoring.truncation == "paper" and paper.scoring.prompts_file == "paper:rewardbench_prompts"
  assert prompts.prompts_from_config(paper.scoring.prompts_file).fallback == "alpacaeval-easy"
  combined = rewardbench_config.get_config("ensemble,demo")
  assert combined.scoring.prompts_file == "paper:candidate_prompts" and combined.data.max_per_subset == 2
  assert rewardbench_config.get_config("chat").scoring.layout == "chat"
  assert scoring.Settings.from_config(rewardbench_config.get_config().scoring) == scoring.Settings()
  with pytest.raises(ValueError, match="unknown variant"):
    rewardbench_config.get_config("papr")
  assert main.TASKS["rewardbench"] == rewardbench.__name__
