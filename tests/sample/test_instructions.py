"""Instruction data sets (AlpacaEval, MT-Bench, HH-RLHF, a local file) and the prompt text of an instruction."""

import json

import pytest

from configs import generate
from ipo_jax import data
from ipo_jax.model import chat, loading
from ipo_jax.sample import instructions
from tests.conftest import source_path


def test_prompt_formats(tmp_path):
  alpaca = instructions.load_instructions(dict(generate.get_config().data, start=800, limit=3))
  assert [i for i, _ in alpaca] == [800, 801, 802] and all(t.strip() for _, t in alpaca)
  mt = instructions.load_instructions(dict(generate.get_config("mt_bench").data, limit=2))
  assert mt[0] == (0, json.loads(open(source_path("fastchat:mt_bench_questions")).readline())["turns"][0])
  hh = instructions.load_instructions(dict(generate.get_config("hh_rlhf").data, limit=1))
  assert hh == [(0, "what are some pranks with a pen i can do?")]
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "a"}\n{"question": ""}\n')
  with pytest.raises(data.DataError, match=r"row 1 .*'question'"):
    instructions.load_instructions({"path": str(path), "field": "question"})
  assert instructions.load_instructions({"path": str(path), "field": "question", "skip_invalid": True}) == [(0, "a")]


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


def test_chat_layout_and_end_of_turn(smollm):
  tok = smollm.tokenizer
  text = instructions.format_prompt(tok, "Hi")
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert instructions.encode_prompt(tok, text) == tok.apply_chat_template(
      [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
  assert chat.end_of_turn_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)
  assert instructions.format_prompt(tok, "Hi", chat_template=False) == "Hi"
