"""Chat conventions: one user turn, the end-of-turn token and the pad id (SmolLM2's ChatML template)."""

import types

import pytest

from ipo_jax.model import chat, loading, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer(loading.embedded_model_path())


def test_user_turn_is_the_template_with_the_assistant_header(tok):
  text = chat.user_turn(tok, "Is 7 prime?")
  assert text == tok.apply_chat_template([{"role": "user", "content": "Is 7 prime?"}], tokenize=False,
                                         add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  with_system = chat.user_turn(tok, "Is 7 prime?", system_prompt="Be brief.")
  assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>") and with_system.endswith(text[-40:])
  exchange = chat.user_turn(tok, "Is 7 prime?", response="Yes.")
  assert exchange.startswith(text) and exchange[len(text):].startswith("Yes.<|im_end|>")


def test_user_turn_without_a_template_names_the_hint():
  with pytest.raises(ValueError, match="no chat template; set x=False"):
    chat.user_turn(types.SimpleNamespace(chat_template=None), "hi", hint="set x=False")


def test_end_of_turn_and_pad_ids(tok):
  assert chat.end_of_turn_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)
  assert chat.end_of_turn_ids(None) == () and chat.end_of_turn_ids(types.SimpleNamespace(chat_template=None)) == ()
  assert chat.pad_id(tok) == tok.pad_token_id
  assert chat.pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
  assert chat.pad_id(None) == 0
