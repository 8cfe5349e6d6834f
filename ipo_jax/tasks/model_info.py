"""Task `model_info`: what a checkpoint is, where its parameters live, and what it predicts next.

Useful before a long run: architecture, parameter count, dtype, mesh, per-parameter sharding, and the top next
tokens for a prompt with the chat template on or off.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ipo_jax import runtime, sharding
from ipo_jax.model import chat


def top_next_tokens(model, text: str, k: int = 5) -> list[tuple[str, float]]:
  """The k most likely next tokens after `text` (already formatted) with their probabilities."""
  ids = np.asarray([model.tokenizer(text)["input_ids"]])
  logits = np.asarray(model.logits(ids))[0, -1]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  top = np.argsort(-probs)[:k]
  return [(model.tokenizer.decode([int(i)]), float(probs[i])) for i in top]


def format_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
  return chat.user_turn(tokenizer, prompt, hint="set info.chat_template=False") if chat_template else prompt


def describe(model) -> dict[str, Any]:
  """Architecture, sizes and the sharding of every parameter."""
  leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
  params = {sharding.path_str(p): {"shape": list(x.shape), "dtype": str(x.dtype), "spec": str(x.sharding.spec)}
            for p, x in leaves}
  return {
      "name": model.name,
      "architecture": {k: v for k, v in dataclasses.asdict(model.config).items() if k != "layer_types"},
      "layer_types": list(model.config.layer_types),
      "num_parameters": int(sum(math.prod(x.shape) for _, x in leaves)),
      "mesh": dict(model.mesh.shape),
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform} ({jax.process_count()} process(es))",
      "parameters": params,
  }


def run(config) -> dict[str, Any]:
  model = runtime.load_model_from_config(config)
  info = describe(model)
  log = runtime.log
  log(f"model        {info['name']}")
  log(f"type         {model.config.model_type}: {model.config.num_layers} layers, d={model.config.hidden_size}, "
      f"{model.config.num_heads}/{model.config.num_kv_heads} heads x {model.config.head_dim}, "
      f"ffn {model.config.intermediate_size}, vocab {model.config.vocab_size}, "
      f"{'tied' if model.config.tie_embeddings else 'untied'} embeddings")
  log(f"parameters   {info['num_parameters']:,} ({np.dtype(model.dtype).name})")
  log(f"mesh         {info['mesh']} on {info['devices']}")
  for name, p in info["parameters"].items():
    log(f"  {name:<24} {str(p['shape']):<18} {p['dtype']:<9} {p['spec']}")
  prompt = format_prompt(model.tokenizer, config.info.prompt, config.info.chat_template)
  top = top_next_tokens(model, prompt, config.info.top_k)
  info["top_next_tokens"] = top
  log(f"prompt       {prompt!r}")
  for token, prob in top:
    log(f"  {prob:8.4f}  {token!r}")
  return info
