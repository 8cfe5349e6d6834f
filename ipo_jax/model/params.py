"""The parameter layout: one table that gives every parameter its logical axes (hence its shape and sharding), its
Hugging Face name and its GGUF name. Loading reads HF/safetensors/GGUF tensors into this layout through it; export
writes the layout back to HF names through it.

Layout (layers stacked on a leading `layers` axis and run with `lax.scan`):

  embed [V, D]; final_norm [D]; lm_head [V, D] (untied only); score [num_labels, D] (classifiers only)
  layers: attn_norm [L, D]; q [L, D, H*Dh]; k, v [L, D, Hkv*Dh]; o [L, H*Dh, D];
          mlp_norm [L, D]; gate, up [L, D, F]; down [L, F, D]
          optional: q_bias, k_bias, v_bias, o_bias; q_norm, k_norm [L, Dh]; attn_post_norm, mlp_post_norm [L, D]

Matrices are [in, out] (HF keeps [out, in]: `transposed`). Norm weights keep the HF convention (Gemma's are applied
as 1 + w). Paths are "/"-joined keys: "embed", "layers/q"; LoRA adapters ("layers/q/lora_a") have their own axes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from ipo_jax.model.architecture import ModelConfig


def _always(cfg: ModelConfig) -> bool:
  del cfg
  return True


class Weight(NamedTuple):
  """One parameter: what its dimensions are and where checkpoints keep it."""

  axes: tuple[str, ...]  # logical axes (see `axis_sizes`; sharded by ipo_jax.sharding.LOGICAL_RULES), per layer
  hf: str  # HF name; layer weights under "<prefix>layers.{i}.", "{prefix}" (usually "model.") at the top level
  gguf: str | None  # GGUF name; layer weights under "blk.{i}."
  transposed: bool = False  # HF stores the transpose ([out, in])
  present: Callable[[ModelConfig], bool] = _always  # whether a model of this config has it


TOP: dict[str, Weight] = {
    "embed": Weight(("vocab", "embed"), "{prefix}embed_tokens.weight", "token_embd.weight"),
    "final_norm": Weight(("norm",), "{prefix}norm.weight", "output_norm.weight"),
    "lm_head": Weight(("head_vocab", "embed"), "lm_head.weight", "output.weight",
                      present=lambda c: not c.num_labels and not c.tie_embeddings),
    "score": Weight(("labels", "embed"), "score.weight", None, present=lambda c: c.num_labels > 0),
}
_QKV_BIAS, _O_BIAS = (lambda c: c.qkv_bias), (lambda c: c.o_bias)
_QK_NORM, _POST_NORMS = (lambda c: c.qk_norm), (lambda c: c.post_norms)
LAYER: dict[str, Weight] = {
    "attn_norm": Weight(("norm",), "input_layernorm.weight", "attn_norm.weight"),
    "q": Weight(("embed", "heads"), "self_attn.q_proj.weight", "attn_q.weight", True),
    "k": Weight(("embed", "kv_heads"), "self_attn.k_proj.weight", "attn_k.weight", True),
    "v": Weight(("embed", "kv_heads"), "self_attn.v_proj.weight", "attn_v.weight", True),
    "o": Weight(("heads", "embed"), "self_attn.o_proj.weight", "attn_output.weight", True),
    "mlp_norm": Weight(("norm",), "post_attention_layernorm.weight", "ffn_norm.weight"),  # Gemma: see GEMMA_HF
    "gate": Weight(("embed", "mlp"), "mlp.gate_proj.weight", "ffn_gate.weight", True),
    "up": Weight(("embed", "mlp"), "mlp.up_proj.weight", "ffn_up.weight", True),
    "down": Weight(("mlp", "embed"), "mlp.down_proj.weight", "ffn_down.weight", True),
    "q_bias": Weight(("heads",), "self_attn.q_proj.bias", "attn_q.bias", present=_QKV_BIAS),
    "k_bias": Weight(("kv_heads",), "self_attn.k_proj.bias", "attn_k.bias", present=_QKV_BIAS),
    "v_bias": Weight(("kv_heads",), "self_attn.v_proj.bias", "attn_v.bias", present=_QKV_BIAS),
    "o_bias": Weight(("norm",), "self_attn.o_proj.bias", "attn_output.bias", present=_O_BIAS),
    "q_norm": Weight(("head_dim",), "self_attn.q_norm.weight", "attn_q_norm.weight", present=_QK_NORM),
    "k_norm": Weight(("head_dim",), "self_attn.k_norm.weight", "attn_k_norm.weight", present=_QK_NORM),
    "attn_post_norm": Weight(("norm",), "post_attention_layernorm.weight", "post_attention_norm.weight",
                             present=_POST_NORMS),
    "mlp_post_norm": Weight(("norm",), "post_feedforward_layernorm.weight", "post_ffw_norm.weight",
                            present=_POST_NORMS),
}
GEMMA_HF = {"mlp_norm": "pre_feedforward_layernorm.weight"}  # Gemma's HF names where they differ
# LoRA adapters of a layer matrix [L, in, out]: lora_a [L, in, r], lora_b [L, r, out].
ADAPTER_AXES = {"lora_a": ("lora_in", "lora_rank"), "lora_b": ("lora_rank", "lora_out")}


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
  """The size of each logical axis of a parameter (`heads`/`kv_heads` hold heads × head_dim features)."""
  return {"vocab": cfg.vocab_size, "head_vocab": cfg.vocab_size, "embed": cfg.hidden_size, "norm": cfg.hidden_size,
          "heads": cfg.num_heads * cfg.head_dim, "kv_heads": cfg.num_kv_heads * cfg.head_dim,
          "mlp": cfg.intermediate_size, "head_dim": cfg.head_dim, "labels": cfg.num_labels, "layers": cfg.num_layers}


def _gemma(model_type: str) -> bool:
  return model_type.startswith("gemma")


def weights(cfg: ModelConfig) -> dict[str, Weight]:
  """The parameters of a model of `cfg` by path ("embed", "layers/q", ...), HF names for its family."""
  out = {name: w for name, w in TOP.items() if w.present(cfg)}
  for name, w in LAYER.items():
    if w.present(cfg):
      hf = GEMMA_HF.get(name, w.hf) if _gemma(cfg.model_type) else w.hf
      out[f"layers/{name}"] = w._replace(axes=("layers", *w.axes), hf=hf)
  return out


def flat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter by path."""
  sizes = axis_sizes(cfg)
  return {path: tuple(sizes[a] for a in w.axes) for path, w in weights(cfg).items()}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{"embed": x, "layers/q": y} -> {"embed": x, "layers": {"q": y}}."""
  out: dict[str, Any] = {"layers": {}}
  for path, value in flat.items():
    if path.startswith("layers/"):
      out["layers"][path.split("/", 1)[1]] = value
    else:
      out[path] = value
  return out


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """Shapes of every parameter, as the params pytree (see the module docstring)."""
  return unflatten(flat_shapes(cfg))


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter (or LoRA adapter) at `path` with `ndim` dims: a leading stacked dim is `layers`.

  The parameter is named by the last key of its path, so optimizer states shaped like their parameters match too."""
  name = path.rsplit("/", 1)[-1]
  known = ADAPTER_AXES.get(name) or (TOP[name].axes if name in TOP else LAYER[name].axes if name in LAYER else None)
  if known is None:
    raise ValueError(f"no logical axes for parameter {path!r}")
  lead = ndim - len(known)
  if lead not in (0, 1):
    raise ValueError(f"parameter {path!r} has {ndim} dims; its layout has {len(known)} (+1 when stacked)")
  return ("layers",) * lead + known


def hf_weight_names(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, with `{i}` for the layer; whether HF stores it transposed)."""
  out = {}
  for path, w in weights(cfg).items():
    name = f"{prefix}layers.{{i}}.{w.hf}" if path.startswith("layers/") else w.hf.format(prefix=prefix)
    out[path] = (name, w.transposed)
  return out


def _gguf_to_hf_tables(gemma: bool) -> tuple[dict[str, str], dict[str, str]]:
  top = {w.gguf: w.hf.format(prefix="model.") for w in TOP.values() if w.gguf}
  layer = {w.gguf: (GEMMA_HF.get(name, w.hf) if gemma else w.hf) for name, w in LAYER.items()}
  return top, layer


_GGUF_TO_HF = {gemma: _gguf_to_hf_tables(gemma) for gemma in (False, True)}


def hf_name_of_gguf(name: str, architecture: str) -> str | None:
  """The HF name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"); None for
  tensors the layout does not use. `architecture` is the GGUF one (llama, gemma3, ...)."""
  top, layer = _GGUF_TO_HF[_gemma(architecture)]
  parts = name.split(".", 2)
  if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
    hf = layer.get(parts[2])
    return None if hf is None else f"model.layers.{parts[1]}.{hf}"
  return top.get(name)
