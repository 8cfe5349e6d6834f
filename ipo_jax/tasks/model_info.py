"""Task `model_info`: what a checkpoint is, where its parameters live, and what it predicts next.

Useful before a long run: architecture, parameter count, dtype, mesh, per-parameter sharding, and the top next
tokens for a prompt with the chat template on or off. For `model.path=preset:<name>` (a published architecture,
no weights) it reports the same from the shapes alone, without creating any weights, and no next tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ipo_jax import runtime, sharding
from ipo_jax.model import chat, loading, params as params_lib, presets


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


def describe_preset(path: str, cfg: Any, dtype: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """`describe` for `preset:<name>` (architecture `cfg`) from the shapes alone: the sharding each parameter would
  get on `mesh`."""
  dtype_name = np.dtype(dtype).name
  params = {p: {"shape": list(shape), "dtype": dtype_name, "spec": str(sharding.spec_for(p, shape, mesh))}
            for p, shape in params_lib.flat_shapes(cfg).items()}
  return {
      "name": path,
      "source": presets.source(presets.preset_name(path)),
      "architecture": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "layer_types"},
      "layer_types": list(cfg.layer_types),
      "num_parameters": presets.num_params(cfg),
      "mesh": dict(mesh.shape),
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform} ({jax.process_count()} process(es))",
      "parameters": params,
  }


def _attention_summary(cfg: Any) -> str:
  """Windows, rotary settings and soft-caps in one line."""
  sliding = sum(t == "sliding_attention" for t in cfg.layer_types)
  window = f"sliding window {cfg.sliding_window} on {sliding}/{cfg.num_layers} layers" if sliding else "full"
  full = cfg.rope_full
  rope = f"rope theta {full.theta:g} ({full.rope_type}" + (f" x{full.factor:g})" if full.rope_type != "default" else ")")
  if sliding and cfg.rope_sliding != full:
    rope += f", sliding layers theta {cfg.rope_sliding.theta:g}"
  caps = f", softcap {cfg.attn_softcap:g}/{cfg.final_softcap:g}" if cfg.attn_softcap and cfg.final_softcap else ""
  return f"{window}, {rope}, scale {cfg.attn_scale:.6g}{caps}"


def _log_description(info: dict[str, Any], cfg: Any, dtype: Any) -> None:
  log = runtime.log
  log(f"model        {info['name']}" + (f" (config of {info['source']}, random weights)" if "source" in info else ""))
  log(f"type         {cfg.model_type}: {cfg.num_layers} layers, d={cfg.hidden_size}, "
      f"{cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}, ffn {cfg.intermediate_size}, "
      f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings")
  log(f"attention    {_attention_summary(cfg)}")
  log(f"parameters   {info['num_parameters']:,} ({np.dtype(dtype).name})")
  log(f"mesh         {info['mesh']} on {info['devices']}")
  for name, p in info["parameters"].items():
    log(f"  {name:<24} {str(p['shape']):<18} {p['dtype']:<9} {p['spec']}")


def run(config) -> dict[str, Any]:
  if presets.is_preset(config.model.path):
    dtype = loading.DTYPES[config.model.get("dtype", "float32")]
    cfg = presets.model_config(config.model.path)
    info = describe_preset(config.model.path, cfg, dtype, runtime.mesh_from_config(config))
    _log_description(info, cfg, dtype)
    runtime.log(f"next tokens  none: {presets.no_tokenizer_message(config.model.path)}")
    info["top_next_tokens"] = []
    return info
  model = runtime.load_model_from_config(config)
  info = describe(model)
  _log_description(info, model.config, model.dtype)
  log = runtime.log
  prompt = format_prompt(loading.require_tokenizer(model), config.info.prompt, config.info.chat_template)
  top = top_next_tokens(model, prompt, config.info.top_k)
  info["top_next_tokens"] = top
  log(f"prompt       {prompt!r}")
  for token, prob in top:
    log(f"  {prob:8.4f}  {token!r}")
  return info
