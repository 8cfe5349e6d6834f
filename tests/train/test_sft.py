"""SFT: the completion-only loss equals TRL's SFTTrainer on the same rows (tokens, mask, loss), training lowers the
held-out loss, a resumed run equals an uninterrupted one, gradient accumulation weighs every token alike, and rows
with other column names or bad fields."""

import os
import types

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from ipo_jax.data import DataError
from ipo_jax.train import loop, metrics, sft, steps
from tests.conftest import source_path
from tests.test_reliability import tiny_model  # pylint: disable=unused-import  # the fixture
from tests.train import test_loop
from tests.train.test_loop import _toy_model, synthetic_pairs

ROWS = [{"instruction": "Name a colour.", "response": "Green."},
        {"instruction": "What is 2 + 3?", "response": "2 + 3 = 5, since adding three to two gives five."},
        {"instruction": "Say hello in French.", "context": "Be brief.", "response": "Bonjour !"},
        {"instruction": "List three fruits.", "response": "Apple, pear and plum."}]


def _trl_loss(directory, rows, out, completion_only=True):
  """TRL 1.16's SFTTrainer on prompt/completion conversations: its tokenized rows and its loss of one batch."""
  import datasets
  import torch
  import transformers
  import trl
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  prompt = lambda r: r["instruction"] + (f"\n\n{r['context']}" if r.get("context") else "")
  data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": prompt(r)}],
                                      "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
  args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=len(rows), report_to="none", use_cpu=True,
                       max_length=512, logging_strategy="no", save_strategy="no",
                       completion_only_loss=completion_only)
  trainer = trl.SFTTrainer(model=hf, args=args, train_dataset=data, processing_class=tok)
  features = [trainer.train_dataset[i] for i in range(len(rows))]
  with torch.no_grad():
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(features))
  return features, float(loss)


def test_loss_equals_trl_sft_trainer(tiny_model, tmp_path):
  from ipo_jax.model import loading
  model = loading.load_model(tiny_model)
  features, want = _trl_loss(tiny_model, ROWS, str(tmp_path / "trl"))
  examples, skipped = sft.tokenize_rows(ROWS, model.tokenizer, source="rows")
  assert skipped == 0 and len(examples) == len(ROWS)
  for i, f in enumerate(features):  # the same tokens, the loss on the same ones (TRL: labels != -100)
    np.testing.assert_array_equal(np.concatenate([examples.prompt_ids[i], examples.response_ids[i]]), f["input_ids"])
    np.testing.assert_array_equal(np.asarray(f["labels"]) != -100,
                                  np.arange(len(f["input_ids"])) >= len(examples.prompt_ids[i]))
  assert want > 5  # a random model: the loss is real, near ln(vocab)
  for completion_only in (True, False):  # False: TRL's completion_only_loss=False, every token after the first
    if not completion_only:
      want = _trl_loss(tiny_model, ROWS, str(tmp_path / "trl_all"), completion_only=False)[1]
    batch = sft.collate(examples, range(len(ROWS)), max_length=512, max_prompt_length=256,
                        completion_only=completion_only)
    batch["weight"] = sft.step_weights(batch, 1)
    loss, _ = steps.loss_fn(model.params, None, batch, jax.random.key(0), s=steps.Settings(objective="sft"),
                            cfg=model.config)
    assert float(loss) == pytest.approx(want, abs=1e-5)


def train_config(output_dir, max_steps):
  """test_loop's DPO settings in the SFT config."""
  c, dpo = sft_config.get_config(), test_loop.train_config(output_dir, max_steps)
  for section in ("data", "optim", "train", "eval", "checkpoint", "log"):
    c[section].update(dpo[section])
  c.output_dir = output_dir
  return c


def synthetic_examples(n, seed):
  """Random prompts; responses of even token ids ending in EOS (the chosen side of test_loop's pairs)."""
  pairs = synthetic_pairs(n, seed)
  return sft.ExampleSet(pairs.prompt_ids, pairs.chosen_ids, source=f"synthetic-{seed}")


STEPS = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sft"))
  params, summary = loop.train_sft(_toy_model(), synthetic_examples(64, 0), train_config(out, STEPS),
                                   eval_examples=synthetic_examples(16, 1))
  return types.SimpleNamespace(params=params, summary=summary, out=out)


def test_training_lowers_the_held_out_loss(trained):
  rows = metrics.read_metrics(os.path.join(trained.out, metrics.METRICS_FILE))
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert len(train) == STEPS and [r["step"] for r in evals] == [0, 8, 16]
  s = trained.summary
  assert s["complete"] and s["train_examples"] == 64 and s["eval_examples"] == 16
  before, after = s["eval_initial"]["loss"], s["eval"]["loss"]
  assert before == pytest.approx(np.log(48), abs=0.5)  # a random model over 48 tokens
  # held out: responses of random even ids (at least ln 23 nats a token but for EOS)
  assert evals[0]["loss"] == before and after < before - 0.4 and evals[1]["loss"] > after
  assert s["eval"]["perplexity"] == pytest.approx(np.exp(after), rel=1e-5)
  assert train[-1]["loss"] < train[0]["loss"] - 0.4
  assert {"grad_norm", "learning_rate", "tokens_per_s"} <= set(train[-1])


def test_stop_and_resume_equals_uninterrupted(trained, tmp_path):
  out = str(tmp_path / "resumed")
  interrupted = train_config(out, STEPS)
  interrupted.train.stop_after_steps = 10
  _, first = loop.train_sft(_toy_model(), synthetic_examples(64, 0), interrupted,
                            eval_examples=synthetic_examples(16, 1))
  assert not first["complete"] and first["step"] == 10
  params, second = loop.train_sft(_toy_model(), synthetic_examples(64, 0), train_config(out, STEPS),
                                  eval_examples=synthetic_examples(16, 1))
  assert second["complete"] and second["step"] == STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert second["eval"]["loss"] == pytest.approx(trained.summary["eval"]["loss"], abs=1e-6)
  with pytest.raises(ValueError, match=r"other settings \(.*data_fingerprint\.train"):
    loop.train_sft(_toy_model(), synthetic_examples(64, 5), train_config(out, STEPS))


def test_gradient_accumulation_weighs_every_token_alike(tmp_path):
  """Two micro-batches of unequal token counts: the step is the token mean of the whole batch, as one batch."""
  out = []
  for accum in (1, 2):
    config = train_config("", 2)
    config.train.grad_accum = accum
    params, summary = loop.train_sft(_toy_model(), synthetic_examples(16, 0), config)
    out.append((params, summary["train"]["loss"]))
  assert out[0][1] == pytest.approx(out[1][1], abs=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_columns_context_and_masks():
  tok = types.SimpleNamespace()
  assert sft.resolve_columns({}, {"instruction": 1, "context": 1, "response": 1}, "dolly") == {
      "instruction": "instruction", "context": "context", "response": "response", "transcript": None}
  assert sft.resolve_columns({}, {"instruction": 1, "input": 1, "output": 1}, "alpaca") == {
      "instruction": "instruction", "context": "input", "response": "output", "transcript": None}
  assert sft.resolve_columns({"response": "answer"}, {"prompt": 1, "answer": 1}, "f") == {
      "instruction": "prompt", "context": None, "response": "answer", "transcript": None}
  with pytest.raises(DataError, match=r"f: no row has a response column .*set data.columns.response=<column>"):
    sft.resolve_columns({}, {"question": 1, "answer": 1, "prompt": 1}, "f")
  cols = {"instruction": "instruction", "context": "input", "response": "output"}
  assert sft.example_of({"instruction": "Sum.", "input": "2, 3", "output": "5"}, 0, "f", cols) == ("Sum.\n\n2, 3", "5")
  with pytest.raises(DataError, match=r"f: row 4: field 'output' \(response\) is missing, empty"):
    sft.example_of({"instruction": "Sum.", "output": ""}, 4, "f", cols)
  del tok
  examples = synthetic_examples(3, 0)
  batch = sft.collate(examples, [0, 2], max_length=16, max_prompt_length=8)
  n = len(examples.prompt_ids[2])
  assert batch["input_ids"].shape == (2, 16) and batch["loss_mask"][1, :n].sum() == 0
  assert batch["loss_mask"][1].sum() == len(examples.response_ids[2])
  every = sft.collate(examples, [0, 2], max_length=16, max_prompt_length=8, completion_only=False)
  np.testing.assert_array_equal(every["loss_mask"], every["attention_mask"])
  np.testing.assert_allclose(sft.step_weights(batch, 2), 2 / batch["loss_mask"][:, 1:].sum())


def test_bad_rows_name_the_row_and_field(tiny_model):
  from ipo_jax.model import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(tiny_model)
  rows = ROWS[:2] + [{"instruction": "Why?", "response": None}]
  with pytest.raises(DataError, match=r"rows: row 2: field 'response' \(response\) is missing.*data.skip_invalid"):
    sft.tokenize_rows(rows, tok, source="rows")
  examples, skipped = sft.tokenize_rows(rows, tok, source="rows", skip_invalid=True)
  assert skipped == 1 and len(examples) == 2


def test_hh_rlhf_transcripts_learn_their_last_assistant_turn(tiny_model):
  from ipo_jax.model import tokenizer as tokenizer_lib
  text = "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Green."
  cols = sft.resolve_columns({}, {"chosen", "rejected"}, "hh")
  assert cols == {"instruction": None, "context": None, "response": None, "transcript": "chosen"}
  prompt, response = sft.example_of({"chosen": text}, 0, "hh", cols)
  assert prompt == [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a colour."}]
  assert response == [{"role": "assistant", "content": "Green."}]
  assert sft.example_of({"chosen": text}, 0, "hh", cols, chat_template=False) == (
      "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:", " Green.")
  with pytest.raises(DataError, match=r"hh: row 3: field 'chosen' is not a .* transcript ending in a non-empty"):
    sft.example_of({"chosen": text + "\n\nHuman: And?"}, 3, "hh", cols)
  path = source_path("Anthropic/hh-rlhf", split="test", name="harmless-base")
  tok = tokenizer_lib.load_tokenizer(tiny_model)
  for chat_template in (True, False):
    examples, skipped = sft.load(path, tok, limit=40, chat_template=chat_template, skip_invalid=True)
    assert len(examples) + skipped == 40 and len(examples) >= 30
  end = tok.decode(examples.response_ids[0][-1:])
  assert end == tok.eos_token  # raw text: the answer, then EOS


def test_packing_puts_every_example_once_into_rows_that_fit():
  examples = synthetic_examples(40, 3)
  packed = sft.pack(examples, max_length=64, max_prompt_length=32)
  members = sorted(i for row in packed.rows for i in row)
  assert members == list(range(40)) and len(packed) < 40
  sizes = [sum(map(len, sft.truncate(examples, i, 64, 32))) for i in range(40)]
  assert all(sum(sizes[i] for i in row) <= 64 for row in packed.rows)
  assert sft.pack(examples, max_length=64, max_prompt_length=32).rows == packed.rows  # a fixed function of the set
  assert packed.fill() == pytest.approx(sum(sizes) / (64 * len(packed)))
  batch = sft.collate_packed(packed, [0], completion_only=False)
  seg = batch["segment_ids"][0]
  starts = np.flatnonzero((seg > 0) & (np.r_[0, seg[:-1]] != seg))
  assert len(starts) == len(packed.rows[0]) and not batch["loss_mask"][0, starts].any()  # never across segments
  assert batch["loss_mask"][0].sum() == sum(sizes[i] - 1 for i in packed.rows[0])


@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_rows_give_the_loss_of_the_unpacked_examples(tiny_model, completion_only):
  """The examples of a few packed rows, unpacked: the same token-mean loss (segments attend only to themselves,
  positions restart)."""
  from ipo_jax.model import loading
  model = loading.load_model(tiny_model)
  examples, _ = sft.tokenize_rows(ROWS * 3, model.tokenizer, source="rows")
  packed = sft.pack(examples, max_length=128, max_prompt_length=64)
  assert len(packed) < len(examples)
  rows = list(range(len(packed)))
  members = [i for r in rows for i in packed.rows[r]]
  losses = []
  for batch in (sft.collate_packed(packed, rows, completion_only=completion_only),
                sft.collate(examples, members, max_length=128, max_prompt_length=64, completion_only=completion_only)):
    batch["weight"] = sft.step_weights(batch, 1)
    loss, _ = steps.loss_fn(model.params, None, batch, jax.random.key(0), s=steps.Settings(objective="sft"),
                            cfg=model.config)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] > 5


def test_packed_training_lowers_the_held_out_loss(tmp_path):
  config = train_config(str(tmp_path / "packed"), 16)
  config.sft.packing = True
  config.train.batch_size = 2
  _, summary = loop.train_sft(_toy_model(), synthetic_examples(64, 0), config, eval_examples=synthetic_examples(16, 1))
  assert summary["complete"] and summary["train_examples"] == 64 and 0 < summary["packed_rows"] < 64
  assert 0.5 < summary["packed_fill"] <= 1
  assert summary["eval"]["loss"] < summary["eval_initial"]["loss"] - 0.2
