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


def test_rewardbench_pairs_are_read_from_their_prompts(tmp_path):
  """format=auto: a row with `prompt` and a `chosen` that is no HH-RLHF transcript (RewardBench, TRL pairs) is
  read from `prompt`; asking for hh_rlhf on such a file says how to read another field."""
  rows = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 0},
          {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "subset": "alpacaeval-easy", "id": 1}]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert instructions.load_instructions({"path": str(path)}) == [(0, "What is 2+2?"), (1, "Name a colour.")]
  with pytest.raises(data.DataError, match=r"pairs\.jsonl: row 0 field 'chosen' is not a .*transcript; .*"
                     r"data\.format=instruction and data\.field=<field>"):
    instructions.load_instructions({"path": str(path), "format": "hh_rlhf"})
  hh = tmp_path / "hh.jsonl"  # a real transcript still reads as HH-RLHF, even beside a prompt field
  hh.write_text(json.dumps({"prompt": "x", "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello"}) + "\n")
  assert instructions.load_instructions({"path": str(hh)}) == [(0, "Hi there")]
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps({"q": "a", "chosen": "b"}) + "\n")
  with pytest.raises(data.DataError, match=r"other\.jsonl: data\.format=auto cannot tell .*fields chosen, q.*"
                     r"data\.field="):
    instructions.load_instructions({"path": str(other)})
