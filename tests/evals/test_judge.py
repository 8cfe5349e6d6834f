"""The self-rewarding judge: score parsing, rubric layout, and RewardBench with the embedded SmolLM2."""

import dataclasses

import pytest

from ipo_jax.evals import judge, rewardbench
from ipo_jax.model import loading
from ipo_jax.sample import instructions

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
  assert settings.layout().render(tok, "", "Q?", "A.") == instructions.format_prompt(tok, filled)
  raw = dataclasses.replace(settings, chat_template=False).layout()
  assert raw.render(tok, "", "Q?", "A.") == instructions.format_prompt(tok, filled, chat_template=False)


def _pair_row(subset, pid, chosen, rejected):
  return {"subset": subset, "id": pid, "parsed_chosen": chosen, "parsed_rejected": rejected}


def test_pair_scores_count_ties_and_unparsable_as_configured():
  rows = [_pair_row("a", 1, 4.0, 2.0), _pair_row("a", 2, 3.0, 3.0), _pair_row("a", 3, None, 1.0),
          _pair_row("a", 4, None, None)]
  zero = [judge.score_pair(r, 0.0) for r in rows]
  assert [(r["correct"], r["tie"]) for r in zero] == [(True, False), (False, True), (False, False), (False, True)]
  half = judge.score_pair(rows[2], 0.5)
  assert half["score_chosen"] == 0.5 and not half["correct"]
  assert rewardbench.summarize(zero)["counts"]["ties"] == 2
