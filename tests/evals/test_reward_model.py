"""The classifier reward model: parity with transformers (padding both ways, the authors' pipeline), buckets, rows."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from ipo_jax import sharding
from ipo_jax.evals import reward_model
from ipo_jax.model import export, loading, tokenizer as tokenizer_lib, transformer
from tests import hf_checkpoints

TOL = 1e-4
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification)}


@pytest.fixture(scope="module")
def tokenizer():
  """SmolLM2's tokenizer (from the embedded GGUF; the weights are not read)."""
  return tokenizer_lib.load_tokenizer(loading.embedded_model_path())


def classifier_checkpoint(directory, family, tokenizer, **extra):
  """A tiny random *ForSequenceClassification (scalar head) with `tokenizer` saved beside it; returns the HF model."""
  config_cls, model_cls = FAMILIES[family]
  config = config_cls(**{**hf_checkpoints.COMMON, "vocab_size": len(tokenizer), "num_labels": 1,
                         "pad_token_id": tokenizer.pad_token_id, **extra})
  torch.manual_seed(0)
  model_cls(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return model_cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def classifier(request, tokenizer, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  hf = classifier_checkpoint(directory, request.param, tokenizer)
  return directory, hf, loading.load_model(directory)


def _hf_alone(hf, seqs):
  """HF logits of each sequence on its own (no padding): the reference."""
  with torch.no_grad():
    return np.array([hf(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs])


def test_scores_match_transformers_left_and_right_padded(classifier):
  _, hf, model = classifier
  rng = np.random.RandomState(1)
  pad = hf.config.pad_token_id
  seqs = [list(rng.randint(pad + 1, 1000, n)) for n in (12, 7, 3, 9)]  # never the pad id
  ref = _hf_alone(hf, seqs)
  program = reward_model.build(model.config, model.mesh, model.params)
  batch = sharding.batch_sharding(model.mesh, 2)
  for left in (False, True):
    ids, mask = reward_model.pad_rows(seqs, 4, 16, pad, left=left)
    with torch.no_grad():  # HF itself pools the last non-pad token of padded rows either way
      positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
      hf_padded = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
    np.testing.assert_allclose(hf_padded, ref, atol=TOL)
    ours = np.asarray(program(model.config, model.params, sharding.to_global(ids, batch),
                              sharding.to_global(mask, batch)))
    np.testing.assert_allclose(ours, ref, atol=TOL)
    np.testing.assert_allclose(np.asarray(model.scores(ids, mask)), ref, atol=TOL)


def test_rewards_equal_the_authors_pipeline(classifier):
  """The authors' reward_model.py: pipeline("text-classification", truncation=True, max_length=...) on
  "Instruction: {prompt}\\nResponse: " + response; it reports sigmoid(logit) of a scalar head."""
  directory, _, model = classifier
  settings = reward_model.RewardSettings(max_length=40, length_multiple=8, max_programs=2, progress=False)
  scorer = reward_model.RewardScorer(model, settings)
  prompts = ["What is 2 + 2?", "Name a colour.", "Write {braces} back.", "Explain gravity."]
  responses = ["4", "Blue, like the sky on a clear day.", "{braces}", "Mass attracts mass. " * 12]
  rewards = scorer.rewards(prompts, responses)
  pipe = transformers.pipeline("text-classification", model=directory, truncation=True, max_length=40,
                               dtype=torch.float32)
  texts = [f"Instruction: {p}\nResponse: " + r for p, r in zip(prompts, responses)]
  assert [scorer.text(p, r) for p, r in zip(prompts, responses)] == texts
  expected = np.array([out["score"] for out in pipe(texts)])
  np.testing.assert_allclose(1 / (1 + np.exp(-rewards)), expected, atol=1e-5)
  encoded = scorer.encode(prompts, responses)
  assert [t for _, t in encoded] == [False, False, False, True] and len(encoded[3][0]) == 40
  assert encoded[3][0][:20] == scorer.tokenizer(texts[3])["input_ids"][:20]  # right truncation keeps the start
  assert len({length for _, length in scorer.shapes}) <= 2  # at most max_programs bucket lengths
  assert scorer.settings.batch_tokens == 4096  # the default for the model's mesh (CPU), fixed when built
  assert [settings.tokens_per_batch(p) for p in ("cpu", "gpu", "tpu")] == [4096, 16384, 16384]
  left = reward_model.RewardScorer(model, reward_model.RewardSettings(max_length=40, truncation="left"))
  assert left.encode(prompts[3:], responses[3:])[0][0] == scorer.tokenizer(texts[3])["input_ids"][-40:]


def test_pair_rows_are_the_ipo_rows(classifier):
  _, _, model = classifier
  scorer = reward_model.RewardScorer(model, reward_model.RewardSettings(max_length=256, progress=False))
  pairs = [{"subset": "hep-go", "id": 1, "prompt": "Sum?", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"},
           {"subset": "hep-go", "id": 2, "prompt": "Same?", "chosen": "yes", "rejected": "yes"},  # a tie
           {"subset": "donotanswer", "id": 1, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
  rows = [r for batch in reward_model.score_rewardbench_pairs(scorer, pairs) for r in batch]
  assert sorted((r["subset"], r["id"]) for r in rows) == sorted((p["subset"], p["id"]) for p in pairs)
  by_id = {(r["subset"], r["id"]): r for r in rows}
  for p in pairs:
    r = by_id[(p["subset"], p["id"])]
    chosen, rejected = scorer.rewards([p["prompt"]] * 2, [p["chosen"], p["rejected"]])
    np.testing.assert_allclose([r["score_chosen"], r["score_rejected"]], [chosen, rejected], atol=1e-5)
    assert r["correct"] == (r["score_chosen"] > r["score_rejected"])
    assert r["tokens_chosen"] == len(scorer.encode([p["prompt"]], [p["chosen"]])[0][0])
  tie = by_id[("hep-go", 2)]
  assert tie["tie"] and not tie["correct"]  # ties count wrong, as the authors' strict `>`


def test_an_exported_classifier_loads_as_one_with_the_same_scores(classifier, tmp_path):
  """A params tree with a `score` head exports as *ForSequenceClassification with its labels: transformers and the
  loader both read it back as a classifier giving our scores."""
  directory, hf, model = classifier
  params = jax.tree.map(lambda x: x * 1.01, model.params)  # moved away from the checkpoint's
  out = export.export_hf(params, model.config, tmp_path / "out", hf_config=model.hf_config,
                         tokenizer=model.tokenizer)
  config = json.load(open(tmp_path / "out" / "config.json"))
  assert config["architectures"] == [type(hf).__name__] and len(config["id2label"]) == 1
  back = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  seqs = [[5, 9, 300, 41, 7], [8, 12, 30]]  # never the pad id (2), which HF would pool before
  want = _hf_alone(back, seqs)
  ours = loading.load_model(out)
  assert ours.config.num_labels == 1
  for s, w in zip(seqs, want):
    ids = np.array([s])
    np.testing.assert_allclose(np.asarray(ours.scores(ids)), [w], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(transformer.classifier_scores(params, model.config, ids, np.ones_like(ids))),
                               [w], atol=TOL, rtol=0)


def test_bad_settings_and_models_are_refused(classifier, tokenizer):
  _, _, model = classifier
  with pytest.raises(ValueError, match="reward_model.format must be one of"):
    reward_model.RewardSettings(format="html")
  with pytest.raises(ValueError, match="reward_model.truncation must be one of"):
    reward_model.RewardSettings(truncation="middle")
  with pytest.raises(ValueError, match="reward_model.label=1 but .* has 1 label"):
    reward_model.RewardScorer(model, reward_model.RewardSettings(label=1))
  with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
    reward_model.RewardScorer(model, reward_model.RewardSettings(max_length=1024))

  class CausalLM:
    config, name, tokenizer = dataclasses.replace(model.config, num_labels=0), "lm", tokenizer

  with pytest.raises(ValueError, match="lm is a causal LM, not a reward model"):
    reward_model.RewardScorer(CausalLM(), reward_model.RewardSettings())
