"""Preference rows (TRL convention) → token ids through the chat template → [B, 2, T] batches; bad rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipo_jax.train import pairs
from ipo_jax.model import loading, tokenizer as tokenizer_lib
from ipo_jax.data import DataError
from tests.conftest import source_path

CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer(loading.embedded_model_path())


def _decode(tok, ids):
  return tok.decode(ids, skip_special_tokens=False)


def test_plain_rows_go_through_the_chat_template(tok):
  rows = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}]
  pset, skipped = pairs.tokenize_rows(rows, tok, source="mem")
  assert skipped == 0
  assert _decode(tok, pset.prompt_ids[0]) == (
      CHATML_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  assert _decode(tok, pset.chosen_ids[0]) == "4.<|im_end|>\n"
  assert _decode(tok, pset.rejected_ids[0]) == "5.<|im_end|>\n"


def test_conversational_rows_equal_their_plain_form(tok):
  conv = [{"prompt": [{"role": "user", "content": "What is 2+2?"}],
           "chosen": [{"role": "assistant", "content": "4."}],
           "rejected": [{"role": "assistant", "content": "5."}]}]
  plain = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}]
  a, _ = pairs.tokenize_rows(conv, tok, source="mem")
  b, _ = pairs.tokenize_rows(plain, tok, source="mem")
  assert a.fingerprint() == b.fingerprint()
  multi = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "22"}]}]
  m, _ = pairs.tokenize_rows(multi, tok, source="mem")
  assert _decode(tok, m.prompt_ids[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  assert _decode(tok, m.prompt_ids[0]).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
  assert _decode(tok, m.rejected_ids[0]) == "22<|im_end|>\n"


def test_plain_rows_without_template_and_implicit_prompts(tok):
  rows = [{"chosen": "\n\nHuman: Hi?\n\nAssistant: I'm glad to help.",
           "rejected": "\n\nHuman: Hi?\n\nAssistant: I won't."}]
  pset, _ = pairs.tokenize_rows(rows, tok, source="mem", chat_template=False)
  assert _decode(tok, pset.prompt_ids[0]) == "\n\nHuman: Hi?\n\nAssistant:"  # cut at the last shared whitespace
  assert _decode(tok, pset.chosen_ids[0]) == " I'm glad to help.<|im_end|>"  # + EOS
  assert _decode(tok, pset.rejected_ids[0]) == " I won't.<|im_end|>"
  conv = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}]
  c, _ = pairs.tokenize_rows(conv, tok, source="mem")
  assert _decode(tok, c.chosen_ids[0]) == "Hello<|im_end|>\n"


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "rejected": "r"}, "row 0: field 'chosen' is missing or empty"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "row 0: field 'chosen' is missing or empty"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "row 0: field 'prompt' must be a string or a list"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]},
     "row 0: field 'chosen', message 0 needs string 'role' and 'content'"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "x"}]},
     "row 0: fields 'chosen' and 'rejected' must both be strings or both be message lists"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"},
     "row 0: field 'prompt' must be of the same kind"),
    ({"chosen": "same text", "rejected": "same text"}, "row 0: field 'chosen' has an empty response"),
    ({"chosen": "abc", "rejected": "xyz"}, "row 0: field 'prompt' is missing"),
])
def test_bad_rows_name_row_and_field(tok, row, message):
  with pytest.raises(DataError, match=message.replace("(", r"\(").replace("+", r"\+")):
    pairs.tokenize_rows([row], tok, source="prefs.jsonl")


def test_skip_invalid_counts_and_keeps_the_rest(tok):
  rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": None, "rejected": "c"},
          {"prompt": "d", "chosen": "e", "rejected": "f"}]
  with pytest.raises(DataError, match="prefs.jsonl: row 1: field 'chosen'.*skip_invalid"):
    pairs.tokenize_rows(rows, tok, source="prefs.jsonl")
  pset, skipped = pairs.tokenize_rows(rows, tok, source="prefs.jsonl", skip_invalid=True)
  assert (len(pset), skipped) == (2, 1)
  with pytest.raises(DataError, match=r"^prefs.jsonl: all 2 rows were skipped as invalid .*nothing to learn"):
    pairs.tokenize_rows([rows[1], rows[1]], tok, source="prefs.jsonl", skip_invalid=True)


def test_identical_pairs_are_counted_within_the_token_budget():
  pset = pairs.PreferenceSet(prompt_ids=[np.arange(1, 4)] * 3,
                             chosen_ids=[np.array([4, 5]), np.array([4, 5, 6, 7]), np.array([4])],
                             rejected_ids=[np.array([4, 5]), np.array([4, 5, 6, 8]), np.array([5])])
  assert pairs.identical_pairs(pset, max_length=16, max_prompt_length=8) == 1
  # Within 6 tokens (3 prompt + 3 response) row 1's responses are the same too.
  assert pairs.identical_pairs(pset, max_length=6, max_prompt_length=3) == 2


def test_jsonl_and_parquet_files_load_the_same(tok, tmp_path):
  rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
  with open(tmp_path / "p.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
  a, _ = pairs.load(str(tmp_path / "p.jsonl"), tok)
  b, _ = pairs.load(str(tmp_path / "p.parquet"), tok, limit=3)
  assert len(a) == 5 and len(b) == 3
  assert a.subset([0, 1, 2]).fingerprint() == b.fingerprint()
  assert a.fingerprint() != a.subset([1, 0, 2, 3, 4]).fingerprint()


def test_hh_rlhf_pairs_split_at_the_assistant_turn(tok):
  pset, _ = pairs.load(source_path("Anthropic/hh-rlhf", split="test", name="harmless-base"), tok,
                                 chat_template=False, limit=20)
  assert len(pset) == 20
  for i in range(20):
    assert "\n\nAssistant:" in _decode(tok, pset.prompt_ids[i])
    assert len(pset.chosen_ids[i]) > 0 and len(pset.rejected_ids[i]) > 0


def test_collate_pads_truncates_and_masks():
  pset = pairs.PreferenceSet(
      prompt_ids=[np.arange(1, 4), np.arange(10, 20)], chosen_ids=[np.array([4, 5]), np.arange(30, 50)],
      rejected_ids=[np.array([6]), np.array([7, 8])])
  batch = pairs.collate(pset, [0, 1], max_length=16, max_prompt_length=6, pad_id=0)
  assert batch["input_ids"].shape == (2, 2, 16)
  np.testing.assert_array_equal(batch["input_ids"][0, 0, :6], [1, 2, 3, 4, 5, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0, 0, :6], [0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(batch["attention_mask"][0, 1, :5], [1, 1, 1, 1, 0])
  # Row 1: the prompt keeps its last 6 tokens, the chosen response is cut at max_length.
  np.testing.assert_array_equal(batch["input_ids"][1, 0], list(range(14, 20)) + list(range(30, 40)))
  assert batch["loss_mask"][1, 0].sum() == 10 and batch["loss_mask"][1, 1].sum() == 2
  short = pairs.collate(pset, [0], max_length=64, max_prompt_length=8)
  assert short["input_ids"].shape == (1, 2, 16)  # the smallest bucket
  assert [pairs.bucket_length(n, 512) for n in (1, 17, 64, 65, 500)] == [16, 32, 64, 128, 512]
  with pytest.raises(ValueError, match="max_prompt_length"):
    pairs.collate(pset, [0], max_length=8, max_prompt_length=8)


def test_collate_shared_lays_out_one_row_per_pair_with_the_loss_positions():
  pset = pairs.PreferenceSet(
      prompt_ids=[np.arange(1, 4), np.arange(10, 20)], chosen_ids=[np.array([4, 5]), np.arange(30, 50)],
      rejected_ids=[np.array([6]), np.array([7, 8])])
  batch = pairs.collate_shared(pset, [0, 1], max_length=16, max_prompt_length=6, pad_id=0)
  # Row 1: prompt 14..19 (its last 6), chosen cut to 10 tokens, rejected 2: 18 tokens -> bucket 24; 12 targets -> 16 (the smallest bucket).
  assert batch["input_ids"].shape == (2, 24) and batch["target_pos"].shape == (2, 16)
  np.testing.assert_array_equal(batch["input_ids"][0, :7], [1, 2, 3, 4, 5, 6, 0])
  np.testing.assert_array_equal(batch["branch_ids"][0, :7], [0, 0, 0, 1, 1, 2, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0, :7], [1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(batch["attention_mask"][0, :7], [1, 1, 1, 1, 1, 1, 0])
  # chosen 4 <- slot 2 (the prompt's last), 5 <- slot 3; rejected 6 <- slot 2 again
  np.testing.assert_array_equal(batch["target_pos"][0, :4], [2, 3, 2, 0])
  np.testing.assert_array_equal(batch["target_ids"][0, :4], [4, 5, 6, 0])
  np.testing.assert_array_equal(batch["target_member"][0, :4], [1, 1, 2, 0])
  np.testing.assert_array_equal(batch["input_ids"][1, :18], list(range(14, 20)) + list(range(30, 40)) + [7, 8])
  np.testing.assert_array_equal(batch["target_pos"][1, 9:12], [14, 5, 16])
  assert (batch["target_member"][1] == 1).sum() == 10 and (batch["target_member"][1] == 2).sum() == 2
  assert [pairs.bucket_length(n, 512, fine=True) for n in (1, 17, 24, 25, 33, 48, 49, 500)] == \
      [16, 24, 24, 32, 48, 48, 64, 512]
  with pytest.raises(ValueError, match="max_prompt_length"):
    pairs.collate_shared(pset, [0], max_length=8, max_prompt_length=8)
