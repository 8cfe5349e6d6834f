"""Export of a policy to a Hugging Face directory: config.json, model.safetensors (sharded past `max_shard_bytes`,
with an index) and the tokenizer files, loadable by `transformers.AutoModelForCausalLM.from_pretrained` (a
classifier, with a `score` head, by `AutoModelForSequenceClassification`).

The names and layouts are the loader's (`params.hf_weight_names`) run backwards: our stacked [L, in, out] matrices
become per-layer HF [out, in] weights; norms are stored in the HF convention already (Gemma's 1 + w included) and
are written as they are.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator

import jax
import numpy as np

from ipo_jax import sharding
from ipo_jax.model import transformer
from ipo_jax.model.architecture import FULL, SLIDING, ModelConfig
from ipo_jax.model.params import hf_weight_names

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
}


def _text_type(cfg: ModelConfig) -> str:
  return "gemma3_text" if cfg.model_type == "gemma3" else cfg.model_type


def architecture(cfg: ModelConfig) -> str:
  """The `transformers` class an export of `cfg` is: the causal LM, or its sequence classifier (a `score` head)."""
  name = ARCHITECTURES[_text_type(cfg)]
  return name.replace("ForCausalLM", "ForSequenceClassification") if cfg.num_labels else name


def _rope(spec) -> dict[str, Any]:
  out = {"rope_type": spec.rope_type, "rope_theta": spec.theta}
  if spec.rope_type == "linear":
    out["factor"] = spec.factor
  elif spec.rope_type == "llama3":
    out.update(factor=spec.factor, low_freq_factor=spec.low_freq_factor, high_freq_factor=spec.high_freq_factor,
               original_max_position_embeddings=spec.original_max_position_embeddings)
  return out


def hf_config_from(cfg: ModelConfig) -> Any:
  """A `transformers` config for a `ModelConfig` (for models built here, without a loaded HF config)."""
  import transformers
  model_type = _text_type(cfg)
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else
      (cfg.eos_token_ids[0] if cfg.eos_token_ids else None))
  act = "silu" if cfg.hidden_act == "silu" else "gelu_pytorch_tanh"
  if model_type in ("llama", "mistral", "qwen2", "qwen3"):
    common.update(hidden_act=act, rope_parameters=_rope(cfg.rope_full))
  if model_type == "llama":
    return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, **common)
  if model_type == "mistral":
    return transformers.MistralConfig(sliding_window=cfg.sliding_window, **common)
  if model_type in ("qwen2", "qwen3"):
    cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.Qwen3Config
    extra = {} if model_type == "qwen2" else {"attention_bias": cfg.qkv_bias}
    return cls(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
               layer_types=list(cfg.layer_types), **extra, **common)
  gemma = dict(hidden_activation=act, query_pre_attn_scalar=round(cfg.attn_scale**-2),
               sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
               attention_bias=cfg.o_bias)
  if model_type == "gemma2":
    return transformers.Gemma2Config(rope_parameters=_rope(cfg.rope_full), **gemma, **common)
  if model_type == "gemma3_text":
    rope = {FULL: _rope(cfg.rope_full), SLIDING: _rope(cfg.rope_sliding)}
    return transformers.Gemma3TextConfig(rope_parameters=rope, **gemma, **common)
  raise ValueError(f"no Hugging Face export for model_type {cfg.model_type!r}; supported: {sorted(ARCHITECTURES)}")


def hf_tensors(params: transformer.Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host array) for every weight, one stacked parameter gathered at a time."""
  names = hf_weight_names(cfg)
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = sharding.path_str(path)
    if key not in names:
      raise ValueError(f"parameter {key} has no Hugging Face name for model_type {cfg.model_type!r}")
    name, transposed = names[key]
    array = _host(value)
    if not key.startswith("layers/"):
      yield name, array.T if transposed else array
      continue
    for i in range(cfg.num_layers):
      yield name.format(i=i), np.ascontiguousarray(array[i].T if transposed else array[i])


def _host(x: jax.Array) -> np.ndarray:
  """The full array on the host (gathered across processes when it is not fully addressable)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def export_hf(params: transformer.Params, cfg: ModelConfig, out_dir: str | os.PathLike, *, hf_config: Any = None,
              tokenizer: Any = None, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes the HF directory (process 0 writes; every process must call, as gathering is collective)."""
  import safetensors.numpy
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  hf_config = copy.deepcopy(hf_config.get_text_config() if hf_config is not None else hf_config_from(cfg))
  model_type = _text_type(cfg)
  if model_type not in ARCHITECTURES:
    raise ValueError(f"no Hugging Face export for model_type {cfg.model_type!r}; supported: {sorted(ARCHITECTURES)}")
  hf_config.architectures = [architecture(cfg)]
  if cfg.num_labels:
    hf_config.num_labels = cfg.num_labels
  hf_config.tie_word_embeddings = cfg.tie_embeddings
  hf_config.dtype = dtype
  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
  metadata = {"format": "pt"}
  written: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes), shards flushed as they fill

  def flush(shard: dict[str, np.ndarray]) -> None:
    file = f"model-{len(written) + 1:05d}.safetensors"
    if write:
      safetensors.numpy.save_file(shard, os.path.join(out_dir, file), metadata=metadata)
    written.append((file, list(shard), sum(a.nbytes for a in shard.values())))

  shard, size = {}, 0
  for name, array in hf_tensors(params, cfg):
    array = array.astype(np_dtype)
    if shard and size + array.nbytes > max_shard_bytes:
      flush(shard)
      shard, size = {}, 0
    shard[name] = array
    size += array.nbytes
  if not written:
    if write:
      safetensors.numpy.save_file(shard, os.path.join(out_dir, "model.safetensors"), metadata=metadata)
  else:
    flush(shard)
    if write:
      _index_shards(out_dir, written)
  if write:
    hf_config.save_pretrained(out_dir)
    if tokenizer is not None:
      tokenizer.save_pretrained(out_dir)
  return str(out_dir)


def _index_shards(out_dir: str | os.PathLike, written: list[tuple[str, list[str], int]]) -> None:
  """Renames shards to HF's model-0000i-of-0000n names and writes model.safetensors.index.json."""
  weight_map, total_size = {}, 0
  for i, (file, names, nbytes) in enumerate(written):
    final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
    os.replace(os.path.join(out_dir, file), os.path.join(out_dir, final))
    total_size += nbytes
    weight_map.update({name: final for name in names})
  index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
