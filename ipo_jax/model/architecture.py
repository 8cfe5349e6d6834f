"""`ModelConfig`: the static description of a decoder, read from a Hugging Face config.

One frozen (hashable) dataclass drives every family — Llama 1/2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and
Gemma 3 text — through switches, so `jax.jit` can take it as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
# How cache-less calls attend (`ModelConfig.attention`, the `model.attention` setting; ipo_jax/model/attention.py).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")


def check_attention(name: str) -> None:
  """A ValueError naming `model.attention` and its choices unless `name` is one of them."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
                     "(--config.model.attention=<name>)")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding of one layer type (HF `rope_parameters` semantics)."""

  theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @classmethod
  def from_dict(cls, d: dict[str, Any] | None, theta: float | None = None) -> "RopeSpec":
    d = dict(d or {})
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
    return cls(
        theta=float(d.get("rope_theta", theta if theta is not None else 10000.0)),
        rope_type=rope_type,
        factor=float(d.get("factor", 1.0)),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the forward pass needs to know about an architecture."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"  # silu | gelu_tanh
  norm_offset: float = 0.0  # Gemma norms scale by (1 + w)
  embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP
  attn_scale: float = 1.0
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  rope_full: RopeSpec = RopeSpec()
  rope_sliding: RopeSpec = RopeSpec()
  tie_embeddings: bool = False
  num_labels: int = 0  # > 0: a sequence-classification model (a `score` head [num_labels, D], no LM head)
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS: a run setting, not read from the HF config

  def __post_init__(self):
    check_attention(self.attention)
    if not self.layer_types:
      object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

  @property
  def num_params_per_token(self) -> int:
    """Matmul parameters touched per token (for FLOP counts): layers, not the embedding lookup."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    return self.num_layers * (attn + 3 * d * f)

  @classmethod
  def from_hf(cls, hf: Any) -> "ModelConfig":
    """Builds the config from a `transformers.PretrainedConfig` (legacy or `rope_parameters` format)."""
    hf = getattr(hf, "text_config", None) or hf
    model_type = hf.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    gemma = model_type.startswith("gemma")
    if getattr(hf, "mlp_bias", False):
      raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    if getattr(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
      raise ValueError(f"{model_type}: partial_rotary_factor != 1 is not supported")
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    num_layers = hf.num_hidden_layers
    sliding_window, layer_types = _attention_windows(hf, model_type, num_layers)
    rope_full, rope_sliding = _rope_specs(hf, model_type)
    if gemma:
      attn_scale = float(getattr(hf, "query_pre_attn_scalar", None) or head_dim) ** -0.5
    else:
      attn_scale = head_dim**-0.5
    eos = hf.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    attention_bias = bool(getattr(hf, "attention_bias", False))
    classifier = any(a.endswith("ForSequenceClassification") for a in (getattr(hf, "architectures", None) or []))
    return cls(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
        hidden_act=_activation(hf),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=math.sqrt(hf.hidden_size) if gemma else 1.0,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text", "gemma3"),
        post_norms=gemma,
        attn_scale=attn_scale,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope_full=rope_full,
        rope_sliding=rope_sliding,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)) and not classifier,
        num_labels=int(hf.num_labels) if classifier else 0,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 8192)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos,
    )


def _attention_windows(hf: Any, model_type: str, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
  """The sliding window (None: none) and each layer's attention type."""
  sliding_window = getattr(hf, "sliding_window", None)
  if model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
    sliding_window = None
  layer_types = tuple(getattr(hf, "layer_types", None) or ())
  if not layer_types:
    if model_type == "gemma2":
      layer_types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))
    else:
      layer_types = (SLIDING if sliding_window else FULL,) * num_layers
  if sliding_window is None:
    layer_types = (FULL,) * num_layers
  return sliding_window, layer_types


def _activation(hf: Any) -> str:
  """silu or gelu_tanh, from `hidden_activation` (Gemma) or `hidden_act`."""
  act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
  if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
    return "gelu_tanh"
  if act not in ("silu", "swish"):
    raise ValueError(f"activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
  return "silu"


def _rope_specs(hf: Any, model_type: str) -> tuple[RopeSpec, RopeSpec]:
  """Reads rotary settings from `rope_parameters` (new) or `rope_theta`/`rope_scaling` (legacy)."""
  params = getattr(hf, "rope_parameters", None)
  if params:
    if FULL in params or SLIDING in params:  # per layer type (Gemma 3)
      full = RopeSpec.from_dict(params.get(FULL))
      return full, RopeSpec.from_dict(params.get(SLIDING)) if SLIDING in params else full
    spec = RopeSpec.from_dict(params)
    local = getattr(hf, "rope_local_base_freq", None)
    return spec, RopeSpec(theta=float(local)) if local else spec
  theta = getattr(hf, "rope_theta", 10000.0)
  spec = RopeSpec.from_dict(getattr(hf, "rope_scaling", None), theta=theta)
  local = getattr(hf, "rope_local_base_freq", None)
  return spec, RopeSpec(theta=float(local)) if local else spec
