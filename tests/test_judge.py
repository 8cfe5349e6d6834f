"""The self-rewarding judge: score parsing, rubric layout, and RewardBench with the embedded SmolLM2."""

import dataclasses
import json
import os

import numpy as np
import pytest

from ipo_jax import data, generation, judge, loading, rewardbench

# What judges write (after the rubric), and the score to read from it.
JUDGEMENTS = [
    ("The response answers the question directly and is well organized.\n\nScore: 4", 4.0),
    ("The response is relevant but incomplete. Score 2", 2.0),
    ("**Justification:** Accurate and helpful, though a bit long.\n\n**Score:** 4", 4.0),
    ("**Score: 5**\n\nThe answer is expert-level and concise.", 5.0),
    ('Conclusion: "Score: 3"', 3.0),
    ('Score: "2"', 2.0),
    ("Score:\n\n3", 3.0),
    ("Justification: it covers most of the question.\nScore: 3/5", 3.0),
    ("I would rate this response 4/5 because it is clear.", 4.0),
    ("This response deserves 3 out of 5 points.", 3.0),
    ("The response earns a total of 2 points: relevance and partial coverage.", 2.0),
    ("I give this response a score of 5.", 5.0),
    ("The total score is 4 points.", 4.0),
    ("SCORE = 1", 1.0),
    ("Score: four", 4.0),
    ("Score: 4.5", 4.5),
    ("Score (out of 5): 3", 3.0),
    ("Score: [2]", 2.0),
    ("4\n\nThe response is relevant and answers the basic question.", 4.0),
    ("3 points", 3.0),
    ("Score: 10", 5.0),  # clamped
    ("Score: 0\nThe response is off topic.", 1.0),  # clamped
    ("Score: 3\n\nUser: What is 2+2?\nScore: 5", 3.0),  # the first verdict, not a continuation's
    ("1. Relevance: the response is on topic.\n2. Coverage: it answers part of it.", None),  # a list, no score
    ("The response is relevant. Briefly justify your total score, up to 100 words.", None),
    ('Conclude with the score using the format: "Score: "', None),
    ("Score: N/A", None),
    ("I cannot evaluate this response.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", JUDGEMENTS)
def test_parse_score(text, expected):
  assert judge.parse_score(text) == expected


def test_templates(tmp_path):
  assert judge.load_template("") == judge.DEFAULT_TEMPLATE
  paper = judge.load_template("paper:self_reward_judge_prompt")
  assert paper.startswith("Review the user's question") and paper.endswith('"Score: " ')
  bad = tmp_path / "rubric.txt"
  bad.write_text("Grade {instruction} from 1 to 5.")
  with pytest.raises(ValueError, match=r"rubric.txt lacks the placeholder\(s\) \{response\}"):
    judge.load_template(str(bad))
  # One pass: braces and placeholders inside the texts stay as they are.
  layout = judge.JudgeSettings(template=paper, chat_template=False).layout()
  text = layout.fill("", "Format {response} as JSON {", "{instruction} done")
  assert "User: Format {response} as JSON {\n<response>{instruction} done</response>" in text


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


def test_layouts_match_the_generation_prompts(smollm):
  tok = smollm.tokenizer
  settings = judge.JudgeSettings()
  filled = judge.DEFAULT_TEMPLATE.replace("{instruction}", "Q?").replace("{response}", "A.")
  assert settings.layout().render(tok, "", "Q?", "A.") == generation.format_prompt(tok, filled)
  raw = dataclasses.replace(settings, chat_template=False).layout()
  assert raw.render(tok, "", "Q?", "A.") == generation.format_prompt(tok, filled, chat_template=False)


def _pair_row(subset, pid, chosen, rejected):
  return {"subset": subset, "id": pid, "parsed_chosen": chosen, "parsed_rejected": rejected}


def test_pair_scores_count_ties_and_unparsable_as_configured():
  rows = [_pair_row("a", 1, 4.0, 2.0), _pair_row("a", 2, 3.0, 3.0), _pair_row("a", 3, None, 1.0),
          _pair_row("a", 4, None, None)]
  zero = [judge._score_pair(r, 0.0) for r in rows]  # pylint: disable=protected-access
  assert [(r["correct"], r["tie"]) for r in zero] == [(True, False), (False, True), (False, False), (False, True)]
  half = judge._score_pair(rows[2], 0.5)  # pylint: disable=protected-access
  assert half["score_chosen"] == 0.5 and not half["correct"]
  assert rewardbench.summarize(zero)["counts"]["ties"] == 2


def _config(output_dir, **overrides):
  from configs import rewardbench_self_reward  # pylint: disable=import-outside-toplevel
  config = rewardbench_self_reward.get_config("demo")
  config.output_dir = str(output_dir)
  config.data.subsets = "alpacaeval-easy,hep-python"
  config.judge.max_prompt_tokens = 320  # the hep-python pair does not fit: its response is cut
  config.judge.progress = False
  config.sampling.max_new_tokens = 40
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_rewardbench_self_reward_task(smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(judge.runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  ipo_dir = tmp_path / "ipo"  # an IPO run that scored these pairs and one more (left out of the comparison)
  ipo_dir.mkdir()
  pairs = rewardbench.load_pairs(_config(tmp_path).data)
  ipo_rows = [{"subset": p["subset"], "id": p["id"], "correct": c} for p, c in zip(pairs, (True, False))]
  ipo_rows.append({"subset": "donotanswer", "id": -1, "correct": True})
  data.append_jsonl(ipo_dir / rewardbench.SCORES_FILE, ipo_rows)
  data.write_json(ipo_dir / rewardbench.SUMMARY_FILE, rewardbench.summarize(ipo_rows, method="IPO P(Yes)"))
  out = tmp_path / "judge"
  config = _config(out, **{"sampling.temperature": 0.0})
  config.compare_with = str(ipo_dir)
  summary = judge.run(config)

  rows = list(data.iter_jsonl(out / rewardbench.SCORES_FILE))
  assert sorted(r["subset"] for r in rows) == ["alpacaeval-easy", "hep-python"]
  unparsable = 0
  for r in rows:
    for side in ("chosen", "rejected"):
      assert r[f"parsed_{side}"] == judge.parse_score(r[f"judgement_{side}"])
      assert r[f"tokens_{side}"] <= 320
      unparsable += r[f"parsed_{side}"] is None
    assert r["correct"] == (r["score_chosen"] > r["score_rejected"])
    assert r["tie"] == (r["score_chosen"] == r["score_rejected"])
  assert any(r["truncated_chosen"] or r["truncated_rejected"] for r in rows)
  assert summary["judge"]["unparsable"] == unparsable and summary["counts"]["pairs"] == 2
  assert summary["counts"]["ties"] == sum(r["tie"] for r in rows)
  report = (out / rewardbench.REPORT_FILE).read_text()
  table = report[report.index("## Side by side"):]
  assert "IPO P(Yes)" in table and "| Chat | 100.0 |" in table and "| pairs (ties) | 2 (0) |" in table
  assert f"{unparsable} of 4" in report
  assert (out / rewardbench.PLOT_FILE).exists()

  # The API gives the same judgements (greedy here; keys differ) and scores them with its unparsable value.
  settings = judge.JudgeSettings.from_config(config.judge, config.sampling)
  by_key = {rewardbench.pair_key(r): r for r in rows}
  items = [(p, side) for p in pairs for side in ("chosen", "rejected")]  # the task's shapes: no compilation
  scores = judge.judge_scores(smollm, [p["prompt"] for p, _ in items], [p[side] for p, side in items],
                              dataclasses.replace(settings, unparsable_score=0.5), progress=False)
  parsed = [by_key[rewardbench.pair_key(p)][f"parsed_{side}"] for p, side in items]
  np.testing.assert_array_equal(scores, [0.5 if v is None else v for v in parsed])

  # A rerun resumes (nothing left to judge); the unparsable value is applied when summarizing.
  again = judge.run(_config(out, **{"sampling.temperature": 0.0, "judge.unparsable_score": 0.5}))
  assert again["judge"]["pairs_judged"] == 0 and again["judge"]["unparsable_score"] == 0.5
  with pytest.raises(ValueError, match="sampling"):
    judge.run(_config(out, **{"sampling.temperature": 0.3}))
  assert json.loads((out / rewardbench.SETTINGS_FILE).read_text())["method"] == "self_reward"
  assert os.path.getsize(out / rewardbench.SCORES_FILE) > 0
