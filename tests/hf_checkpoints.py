"""Tiny random Hugging Face checkpoints of every supported family, written with `save_pretrained` (tests only)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=500000.0, tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_theta=10000.0, num_key_value_heads=4)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=8, head_dim=16, rope_theta=1e6)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24, tie_word_embeddings=False)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, num_hidden_layers=4)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=16, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def make_checkpoint(family: str, directory: str, *, seed: int = 0, legacy_config: bool = False,
                    dtype: torch.dtype = torch.float32, shard: bool = False, overrides: dict | None = None):
  """Writes a random tiny checkpoint; returns the HF model (fp32, eval, eager attention) loaded back from disk."""
  config_cls, model_cls, extra = FAMILIES[family]
  kwargs = {**COMMON, **extra, **(overrides or {})}
  if family.startswith("gemma") and "rope_parameters" not in kwargs:
    kwargs.setdefault("rope_theta", 10000.0)
  torch.manual_seed(seed)
  config = config_cls(**kwargs)
  model = model_cls(config)
  with torch.no_grad():  # norms away from their init so a wrong convention shows
    for name, param in model.named_parameters():
      if "norm" in name:
        param.copy_(torch.randn_like(param) * 0.3 + (0.0 if family.startswith("gemma") else 1.0))
  model.to(dtype).save_pretrained(directory, max_shard_size="40KB" if shard else "5GB")
  if legacy_config:
    _write_legacy_config(directory)
  return model_cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def _write_legacy_config(directory: str) -> None:
  """Rewrites config.json in the pre-`rope_parameters` format (`rope_theta` + `rope_scaling`) hub checkpoints ship."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  rope = cfg.pop("rope_parameters")
  if "full_attention" in rope:
    full, local = rope["full_attention"], rope["sliding_attention"]
    cfg["rope_local_base_freq"] = local["rope_theta"]
  else:
    full = rope
  cfg["rope_theta"] = full["rope_theta"]
  scaling = {k: v for k, v in full.items() if k != "rope_theta"}
  cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
  with open(path, "w") as f:
    json.dump(cfg, f)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """HF logits with positions derived from the mask (the convention for left padding)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, left: bool, seed: int = 0):
  rng = np.random.RandomState(seed)
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    sl = slice(total - n, total) if left else slice(0, n)
    ids[row, sl] = rng.randint(1, vocab, n)
    mask[row, sl] = 1
  return ids, mask
