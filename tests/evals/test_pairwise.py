"""The pairwise judge: the authors' verdict pattern on realistic outputs, the prompt and its truncation, the views."""

import dataclasses

import pytest

from ipo_jax.evals import pairwise
from ipo_jax.model import loading, tokenizer as tokenizer_lib
from ipo_jax.sample import engine
from tests.conftest import source_path

# (judgement, the authors' verdict, the lenient verdict)
OUTPUTS = [
    ("Better response: Response 1\nExplanation: It answers the question.", 1, 1),
    ("better response: response 2\nexplanation: more complete", 2, 2),  # lowercase
    ("BETTER RESPONSE:Response2", 2, 2),  # no spaces
    ("Better response:\n\nResponse 1\n\nExplanation: ...", 1, 1),  # the verdict on its own line
    ("Better response: Response 2. Response 1 misses the point, although Response 1 is shorter.", 2, 2),  # trailing
    ("Response 1 is better because it is accurate.", None, None),  # no prefix: unparsable
    ("Better response: [Response 1/Response 2]", None, None),  # the format line copied back: no verdict
    ("Better response: [Response 2]\nExplanation: [It is right]", None, 2),  # brackets kept from the format
    ("**Better response:** Response 2\n**Explanation:** clearer", None, 2),  # markdown bold around the prefix
    ("**Better response: Response 1**", 1, 1),  # bold around the whole line
    ("Better response: **Response 2**", None, 2),
    ("Better response: The first one.", None, None),  # no number
    ("Better response: Response 3", None, None),
    ("I think both are good.\nBetter response: Response 2\nBetter response: Response 1", 2, 2),  # the first counts
    ("The better response is Response 1.", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text,paper,lenient", OUTPUTS)
def test_verdicts_of_realistic_outputs(text, paper, lenient):
  assert pairwise.parse_verdict(text) == paper
  assert pairwise.parse_verdict(text, "lenient") == lenient


def test_the_authors_prompt_is_filled_once():
  template = pairwise.load_template(source_path("paper:pairwise_judge_prompt"))
  assert all(p in template for p in pairwise.PLACEHOLDERS) and "Better response: [Response 1/Response 2]" in template
  text = pairwise.fill(template, "Q {response2}?", "first {instruction}", "second")
  assert "User Question: Q {response2}?" in text  # placeholders inside the texts stay as written
  assert text.index("first {instruction}") < text.index("second")
  assert text == template.format(instruction="Q {response2}?", response1="first {instruction}", response2="second")


def test_a_prompt_file_without_the_placeholders_is_refused(tmp_path):
  bad = tmp_path / "prompt.txt"
  bad.write_text("Compare {instruction} with {response1}.")
  with pytest.raises(ValueError, match=r"prompt.txt lacks the placeholder\(s\) \{response2\}"):
    pairwise.load_template(str(bad))
  with pytest.raises(ValueError, match="pairwise.parser must be one of"):
    pairwise.PairwiseSettings(parser="regex")


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer(loading.embedded_model_path())


def test_long_prompts_lose_the_ends_of_the_responses(tokenizer):
  settings = pairwise.PairwiseSettings(max_prompt_tokens=200)
  question, short, long = "What is the capital of France?", "Paris.", "The capital of France is Paris. " * 60
  ids, cut = pairwise.encode(tokenizer, settings, question, short, long)
  assert cut and 190 <= len(ids) <= 200
  text = tokenizer.decode(ids)
  assert question in text and "Response 1:\nParis." in text and text.rstrip().endswith("<|im_start|>assistant")
  assert 'Better response: Response 1' in text  # the answer format is never cut
  fits, not_cut = pairwise.encode(tokenizer, settings, question, short, "Lyon.")
  assert not not_cut and tokenizer.decode(fits) == pairwise.render(tokenizer, settings, question, short, "Lyon.")
  both = " ".join(f"word{i}" for i in range(300))  # both long: both are cut, to about the same length
  ids, cut = pairwise.encode(tokenizer, settings, question, both, both + " more")
  body = tokenizer.decode(ids).split("Response 1:\n", 1)[1]
  first, second = body.split("\n\nResponse 2:\n")[0], body.split("\n\nResponse 2:\n")[1].split("\n\nAnswer")[0]
  assert cut and len(ids) <= 200 and abs(len(first) - len(second)) <= 16 and len(first) > 20
  raw = dataclasses.replace(settings, chat_template=False)
  assert pairwise.encode(tokenizer, raw, question, short, "Lyon.")[0] == tokenizer(
      pairwise.fill(raw.template, question, short, "Lyon."))["input_ids"]


def _row(subset, first, swapped):
  """A row whose chosen-first judgement says `first` and swapped judgement says `swapped` (1, 2 or None)."""
  say = lambda v: "no idea" if v is None else f"Better response: Response {v}"
  return pairwise.read_row({"subset": subset, "id": 0, "judgement_chosen_first": say(first),
                            "judgement_swapped": say(swapped), "truncated_chosen_first": False,
                            "truncated_swapped": subset == "hep-go"})


def test_views_score_both_orders_and_unparsable_verdicts():
  rows = [_row("hep-go", 1, 2),  # right in both orders
          _row("hep-go", 1, 1),  # always "Response 1": the orders disagree (position bias)
          _row("hep-go", 2, 1),  # wrong in both
          _row("math-prm", None, 2),  # unparsable first, right swapped
          _row("math-prm", 2, None)]  # wrong first, unparsable swapped
  assert [r["pick_chosen_first"] for r in rows] == ["chosen", "chosen", "rejected", None, "rejected"]
  assert [r["pick_swapped"] for r in rows] == ["chosen", "rejected", "rejected", "chosen", None]
  assert [r["correct"] for r in rows] == [True, True, False, False, False]  # the authors': chosen first, None wrong
  expected = {  # (view, unparsable): (hep-go, math-prm) accuracy by hand
      ("chosen_first", 0.0): (2 / 3, 0.0), ("chosen_first", 0.5): (2 / 3, 0.25),
      ("swapped", 0.0): (1 / 3, 0.5), ("swapped", 0.5): (1 / 3, 0.75),
      ("both", 0.0): (1 / 3, 0.0), ("both", 0.5): (1.5 / 3, 0.5),
  }
  for (view, unparsable), (code, math) in expected.items():
    summary = pairwise.view_summary(rows, view, unparsable)
    assert summary["subsets"] == pytest.approx({"hep-go": code, "math-prm": math}), (view, unparsable)
    assert summary["paper"]["Code"] == pytest.approx(code) and summary["paper"]["Math"] == pytest.approx(math)
  assert [pairwise.view_summary(rows, v, 0.0)["counts"]["ties"] for v in pairwise.VIEWS] == [1, 1, 3]
  stats = pairwise.statistics(rows)
  assert stats["unparsable"] == {"chosen_first": 1, "swapped": 1}
  assert stats["agreement"] == {"pairs_parsed_in_both": 3, "agree": 2, "rate": 2 / 3}
  assert stats["says_response_1"] == pytest.approx(4 / 8) and stats["truncated"] == 3


def test_each_pair_is_judged_in_both_orders(tokenizer, monkeypatch):
  """A judge that always prefers the response marked GOOD: right in both orders, whatever the position."""
  seen = []

  def fake_stream(model, prompts, sampling, key, **kwargs):
    for pos, ids in enumerate(prompts):
      text = tokenizer.decode(ids)
      seen.append(text)
      first = text.split("Response 1:\n", 1)[1].split("Response 2:\n", 1)[0]
      yield pos, [engine.Generation([], "eos", f"Better response: Response {1 if 'GOOD' in first else 2}")]

  monkeypatch.setattr(engine, "stream", fake_stream)
  model = type("Model", (), {"tokenizer": tokenizer})()
  pairs = [{"subset": "hep-go", "id": i, "prompt": f"Question {i}", "chosen": f"GOOD answer {i}",
            "rejected": f"bad answer {i}"} for i in range(3)]
  rows = list(pairwise.judge_pairs(model, pairs, pairwise.PairwiseSettings(), progress=False))
  assert [r["id"] for r in rows] == [0, 1, 2] and len(seen) == 6
  assert [r["verdict_chosen_first"] for r in rows] == [1, 1, 1] and [r["verdict_swapped"] for r in rows] == [2, 2, 2]
  assert all(r["pick_chosen_first"] == r["pick_swapped"] == "chosen" and r["correct"] for r in rows)
  assert seen[0].index("GOOD answer 0") < seen[0].index("bad answer 0")  # chosen first, then swapped
  assert seen[1].index("bad answer 0") < seen[1].index("GOOD answer 0")
  assert all(pairwise.view_summary(rows, v, 0.0)["subsets"]["hep-go"] == 1.0 for v in pairwise.VIEWS)
