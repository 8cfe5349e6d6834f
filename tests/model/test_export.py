"""Export to a Hugging Face directory: transformers loads it and gives our logits (≤ 1e-4)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from ipo_jax.model import export, loading, transformer
from ipo_jax.model.architecture import ModelConfig
from tests import hf_checkpoints


def _perturbed(params, seed=1):
  """Params moved away from the checkpoint's, as training would."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _assert_transformers_match(directory, params, cfg):
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
  ids, mask = hf_checkpoints.padded_batch(cfg.vocab_size, [14, 9], 14, left=False)
  want = hf_checkpoints.hf_logits(hf.eval(), ids, mask)
  got = np.asarray(transformer.full_logits(params, cfg, ids, mask))
  np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,shard", [("llama3", False), ("qwen2", True), ("gemma2", False)])
def test_export_loads_in_transformers_with_our_logits(tmp_path, family, shard):
  hf_checkpoints.make_checkpoint(family, str(tmp_path / "src"))
  model = loading.load_model(str(tmp_path / "src"))
  params = _perturbed(model.params)
  out = export.export_hf(params, model.config, tmp_path / "out", hf_config=model.hf_config,
                         max_shard_bytes=60_000 if shard else 5 * 2**30)
  files = sorted(os.listdir(out))
  if shard:
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert "model.safetensors" not in files
  else:
    assert "model.safetensors" in files
  _assert_transformers_match(out, params, model.config)
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [export.ARCHITECTURES[
      model.config.model_type]]


@pytest.mark.parametrize("family", sorted(hf_checkpoints.FAMILIES))
def test_config_of_a_toy_model_round_trips(family):
  config_cls, _, extra = hf_checkpoints.FAMILIES[family]
  kwargs = {**hf_checkpoints.COMMON, **extra}
  if family.startswith("gemma") and "rope_parameters" not in kwargs:
    kwargs["rope_theta"] = 10000.0
  cfg = ModelConfig.from_hf(config_cls(**kwargs))
  assert ModelConfig.from_hf(export.hf_config_from(cfg)) == cfg


def test_toy_model_without_hf_config_exports(tmp_path):
  config_cls, _, extra = hf_checkpoints.FAMILIES["gemma3"]
  cfg = ModelConfig.from_hf(config_cls(**{**hf_checkpoints.COMMON, **extra}))
  params = _perturbed(transformer.init_params(cfg, jax.random.key(0), scale=0.1))
  out = export.export_hf(params, cfg, tmp_path / "out")
  _assert_transformers_match(out, params, cfg)


def test_embedded_smollm2_exports_weights_and_tokenizer(tmp_path):
  model = loading.load_model("embedded")
  out = export.export_hf(model.params, model.config, tmp_path / "hf", hf_config=model.hf_config,
                         tokenizer=model.tokenizer)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  text = "<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\nSeven"
  ids = np.asarray(model.tokenizer([text])["input_ids"])
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.logits(ids)), want, atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok(text)["input_ids"] == model.tokenizer(text)["input_ids"]
  assert tok.chat_template == model.tokenizer.chat_template and tok.eos_token == "<|im_end|>"
