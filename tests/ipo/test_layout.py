"""The IPO question's text layouts, its answer tokens and truncation."""

import pytest

from ipo_jax.ipo import layout as layout_lib
from ipo_jax.ipo import scorer as scorer_lib
from tests.ipo.test_scorer import sentencepiece_like_tokenizer, smollm_tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Layouts and answer tokens.


def test_paper_layout_is_the_authors_text():
  layout = layout_lib.make_layout(scorer_lib.Settings())
  text = layout.render(None, "Q?", "2 + {response}", "4")
  assert text == "Q?\n    User : 2 + {response}\n    Response : 4\n    "  # placeholders in values stay
  assert (layout.yes, layout.no, layout.add_special_tokens) == (" Yes", " No", True)


def test_chat_layout_is_one_user_turn_with_the_generation_prompt():
  tok = smollm_tokenizer()
  layout = layout_lib.make_layout(scorer_lib.Settings(layout="chat"), tok)
  text = layout.render(tok, "Q?", "P", "R")
  assert text.endswith("<|im_start|>user\nQ?\n    User : P\n    Response : R<|im_end|>\n<|im_start|>assistant\n")
  assert (layout.yes, layout.no, layout.add_special_tokens) == ("Yes", "No", False)
  with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
    layout_lib.make_layout(scorer_lib.Settings(layout="chat"), sentencepiece_like_tokenizer())


def test_template_layout():
  settings = scorer_lib.Settings(layout="template", template="[{instruction}] {prompt} => {response}:")
  layout = layout_lib.make_layout(settings)
  assert layout.fill("I", "P", "R") == "[I] P => R:"
  with pytest.raises(ValueError, match=r"must contain \{response\}"):
    layout_lib.make_layout(scorer_lib.Settings(layout="template", template="{instruction} {prompt}"))
  with pytest.raises(ValueError, match="needs scoring.template"):
    scorer_lib.Settings(layout="template")
  with pytest.raises(ValueError, match="scoring.truncation must be one of"):
    scorer_lib.Settings(truncation="left")


def test_answers_are_single_tokens_in_context():
  tok = smollm_tokenizer()
  paper = layout_lib.answer_ids(tok, layout_lib.make_layout(scorer_lib.Settings()))
  assert paper == tuple(tok.convert_tokens_to_ids(["ĠYes", "ĠNo"]))
  chat = layout_lib.answer_ids(tok, layout_lib.make_layout(scorer_lib.Settings(layout="chat"), tok))
  assert chat == tuple(tok.convert_tokens_to_ids(["Yes", "No"]))
  with pytest.raises(ValueError, match="are the same token"):
    layout_lib.answer_ids(tok, layout_lib.make_layout(scorer_lib.Settings(yes=" Yes", no=" Yes")))


def test_split_answer_token_is_a_clear_error():
  tok = sentencepiece_like_tokenizer()
  layout = layout_lib.make_layout(scorer_lib.Settings())
  with pytest.raises(ValueError) as err:
    layout_lib.answer_ids(tok, layout)
  message = str(err.value)
  assert "' Yes' is not exactly one token" in message and "['▁', 'Yes']" in message
  assert "SentencePiece" in message and "scoring.yes" in message
  fixed = layout_lib.make_layout(scorer_lib.Settings(yes="Yes", no="No"))  # the remedy the message suggests
  assert layout_lib.answer_ids(tok, fixed) == tuple(tok.convert_tokens_to_ids(["Yes", "No"]))


# ----------------------------------------------------------------------------------------------------------------
# Truncation.


def test_truncation_cuts_the_response_then_the_prompt_never_the_question():
  tok = smollm_tokenizer()
  layout = layout_lib.make_layout(scorer_lib.Settings())
  instruction = "Is the response correct? Answer Yes or No."
  prompt = " ".join(f"question{i}" for i in range(20))
  response = " ".join(f"answer{i}" for i in range(200))
  (ids, cut), = layout_lib.encode_examples(tok, layout, [(instruction, prompt, response)], 120)
  text = tok.decode(ids)
  assert cut and 110 <= len(ids) <= 120
  assert text.startswith(instruction + "\n    User : " + prompt + "\n    Response : answer0 answer1")
  assert text.endswith("\n    ") and "answer199" not in text
  (ids, cut), = layout_lib.encode_examples(tok, layout, [(instruction, prompt, response)], 60)
  text = tok.decode(ids)
  assert cut and len(ids) <= 60
  assert text.startswith(instruction + "\n    User : question0") and "question19" not in text
  assert text.endswith("\n    Response : \n    ")
  (ids, cut), = layout_lib.encode_examples(tok, layout, [(instruction, "short", "fits")], 60)
  assert not cut and tok.decode(ids) == layout.fill(instruction, "short", "fits")
  with pytest.raises(ValueError, match="the instruction and the paper layout alone take"):
    layout_lib.encode_examples(tok, layout, [(instruction, prompt, response)], 8)


def test_paper_truncation_cuts_on_the_right():
  tok = smollm_tokenizer()
  layout = layout_lib.make_layout(scorer_lib.Settings())
  example = ("Q?", "p " * 50, "r " * 200)
  full = tok(layout.fill(*example))["input_ids"]
  (ids, cut), = layout_lib.encode_examples(tok, layout, [example], 100, truncation="paper")
  assert cut and ids == full[:100]
