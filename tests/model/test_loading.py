"""Logits parity of `load_model` against HF transformers PyTorch (fp32) for every family and checkpoint format."""

import os

import numpy as np
import pytest
import torch
import transformers

from ipo_jax.model import loading
from tests import hf_checkpoints

TOL = 1e-4


@pytest.mark.parametrize("family", sorted(hf_checkpoints.FAMILIES))
@pytest.mark.parametrize("legacy_config", [False, True], ids=["rope_parameters", "legacy"])
def test_family_parity(tmp_path, family, legacy_config):
  hf = hf_checkpoints.make_checkpoint(family, str(tmp_path), legacy_config=legacy_config)
  model = loading.load_model(str(tmp_path))
  vocab = hf.config.vocab_size
  for left in (False, True):  # 20 tokens > every sliding window used
    ids, mask = hf_checkpoints.padded_batch(vocab, [20, 13, 7], 20, left=left, seed=int(left))
    ours = np.asarray(model.logits(ids, mask))
    ref = hf_checkpoints.hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), TOL)


def test_config_formats_agree(tmp_path):
  hf_checkpoints.make_checkpoint("gemma3", str(tmp_path / "new"))
  hf_checkpoints.make_checkpoint("gemma3", str(tmp_path / "old"), legacy_config=True)
  new = loading.load_model(str(tmp_path / "new")).config
  old = loading.load_model(str(tmp_path / "old")).config
  assert new == old
  assert new.rope_full.rope_type == "linear" and new.rope_full.factor == 4.0 and new.rope_sliding.theta == 1e4


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_bf16_weights_and_sharded_index(tmp_path, family):
  hf_checkpoints.make_checkpoint(family, str(tmp_path), dtype=torch.bfloat16, shard=True)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  model = loading.load_model(str(tmp_path), dtype="float32")
  ids, mask = hf_checkpoints.padded_batch(hf.config.vocab_size, [11, 16], 16, left=False)
  ours = np.asarray(model.logits(ids, mask))
  ref = hf_checkpoints.hf_logits(hf, ids, mask)
  np.testing.assert_array_less(np.abs(ours - ref)[mask.astype(bool)].max(), TOL)


def test_bf16_compute_close_to_fp32(tmp_path):
  hf_checkpoints.make_checkpoint("llama3", str(tmp_path))
  ids, mask = hf_checkpoints.padded_batch(96, [16, 9], 16, left=True)
  fp32 = np.asarray(loading.load_model(str(tmp_path), dtype="float32").logits(ids, mask))
  bf16 = np.asarray(loading.load_model(str(tmp_path), dtype="bfloat16").logits(ids, mask))
  real = mask.astype(bool)
  # bf16 params and matmuls (fp32 norms/softmax/logits): relative error bounded by a few bf16 ulps.
  assert np.abs(bf16 - fp32)[real].max() <= 0.05 * np.abs(fp32[real]).max()
  assert (bf16.argmax(-1) == fp32.argmax(-1))[real].mean() >= 0.9


def test_missing_tensor_is_named(tmp_path):
  hf_checkpoints.make_checkpoint("llama_tied", str(tmp_path))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    loading.load_model(str(tmp_path))


def test_damaged_safetensors_and_bad_settings_are_named(tmp_path):
  """Random bytes, a file cut short and a tensor of the wrong shape each name the file and tensor; an unknown
  dtype lists the valid ones."""
  hf_checkpoints.make_checkpoint("llama_tied", str(tmp_path))
  weights = tmp_path / "model.safetensors"
  whole = weights.read_bytes()
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(weights))
  tensors["model.layers.2.self_attn.o_proj.weight"] = np.zeros((64, 60), np.float32)
  save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.2\.self_attn\.o_proj\.weight' "
                     r"has shape \[64, 60\], but config\.json implies \[64, 64\]"):
    loading.load_model(str(tmp_path))
  weights.write_bytes(whole[:-100])
  with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the weights: the file is cut short: tensor "
                     r"'[\w.]+' is incomplete"):
    loading.load_model(str(tmp_path))
  weights.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the weights: it is not a safetensors file"):
    loading.load_model(str(tmp_path))
  with pytest.raises(ValueError, match=r"model\.dtype='float64' is not supported; valid: float32, bfloat16, float16"):
    loading.load_model(str(tmp_path), dtype="float64")
  (tmp_path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    loading.load_model(str(tmp_path))


def test_missing_local_looking_path_never_reaches_the_hub(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no such local model directory or file 'runs/policy' \('runs' exists "
                     r"here\).*model\.path=hf:runs/policy or set model\.allow_hub=True"):
    loading.load_model("runs/policy")
  with pytest.raises(FileNotFoundError, match="hub"):  # allowed: it goes to the hub (offline here, or no such repo)
    loading.resolve_model_path("runs/policy-no-such-repo-xyz", allow_hub=True)


def test_unknown_path_and_hub_error():
  with pytest.raises(FileNotFoundError, match="not found"):
    loading.load_model("./no/such/model.gguf")
  with pytest.raises(FileNotFoundError, match="hub"):
    loading.resolve_model_path("no-such-org/no-such-model-xyz")


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


def _hf_gguf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def test_embedded_smollm2_matches_transformers_gguf(smollm):
  tok = smollm.tokenizer
  text = tok.apply_chat_template([{"role": "user", "content": "Is the sky blue? Answer Yes or No."}],
                                 tokenize=False, add_generation_prompt=True)
  ids = np.asarray([tok(text)["input_ids"]])
  ref = hf_checkpoints.hf_logits(_hf_gguf(loading.embedded_model_path()), ids, np.ones_like(ids))
  ours = np.asarray(smollm.logits(ids))
  assert smollm.config.num_layers == 30 and smollm.config.hidden_size == 576 and smollm.config.tie_embeddings
  np.testing.assert_array_less(np.abs(ours - ref).max(), 2e-4)


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(tmp_path_factory):
  path = loading.gemma3_270m_path(str(tmp_path_factory.mktemp("gemma")))
  model = loading.load_model(path)
  assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 512
  tok = model.tokenizer
  ids = np.asarray([tok("The capital of France is Paris. The capital of Italy is")["input_ids"]])
  ref = hf_checkpoints.hf_logits(_hf_gguf(path), ids, np.ones_like(ids))
  ours = np.asarray(model.logits(ids))
  np.testing.assert_array_less(np.abs(ours - ref).max(), 2e-4 * max(1.0, np.abs(ref).max() / 30))


@pytest.mark.parametrize("family", ["llama_tied", "qwen2", "gemma2"])
def test_sequence_classifier_scores_match_transformers(tmp_path, family):
  config_cls, _, extra = hf_checkpoints.FAMILIES[family]
  config = config_cls(**{**hf_checkpoints.COMMON, **extra, "num_labels": 1, "pad_token_id": 0})
  torch.manual_seed(0)
  cls = getattr(transformers, config_cls.__name__.replace("Config", "ForSequenceClassification")
                .replace("TextForSequence", "ForSequence"))
  cls(config).save_pretrained(str(tmp_path))
  hf = cls.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  model = loading.load_model(str(tmp_path))
  assert model.config.num_labels == 1 and "score" in model.params and "lm_head" not in model.params
  ids, mask = hf_checkpoints.padded_batch(config.vocab_size, [12, 7, 3], 12, left=False)
  with torch.no_grad():  # HF pools the last non-pad token of right-padded rows
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.scores(ids, mask)), ref, atol=TOL)
  with pytest.raises(ValueError, match="sequence classifier"):
    model.logits(ids, mask)
