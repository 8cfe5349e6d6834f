"""LoRA adapters on the stacked linear layers, as their own pytree beside the frozen base params.

Adapters: {"layers": {name: {"lora_a": [L, in, r], "lora_b": [L, r, out]}}} for each target name in
q, k, v, o, gate, up, down. The effective weight is W + (alpha / rank)·A·B; B starts at zero, so a fresh adapter
leaves the model unchanged and "adapters off" is the base itself (the DPO reference, without a second copy).

The forward runs on merged weights (one [L, in, out] add per target inside the jitted step). Dropout therefore acts
on the adapter's input features with one mask per step shared by every token, A·diag(m)/(1 - p) in place of
PEFT's per-token mask on x; its expectation is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ipo_jax.model import transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

Adapters = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale alpha / r), dropout on the adapter input, target layer names."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown or not self.targets:
      raise ValueError(f"LoRA targets {sorted(unknown) or '()'} invalid; choose from {TARGETS}")
    if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, dropout={self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def init_adapters(base: transformer.Params, lora: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> Adapters:
  """A ~ U(±1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0."""
  layers = {}
  for name, k in zip(lora.targets, jax.random.split(key, len(lora.targets))):
    num_layers, fan_in, fan_out = base["layers"][name].shape
    bound = fan_in**-0.5
    layers[name] = {
        "lora_a": jax.random.uniform(k, (num_layers, fan_in, lora.rank), dtype, -bound, bound),
        "lora_b": jnp.zeros((num_layers, lora.rank, fan_out), dtype),
    }
  return {"layers": layers}


def adapter_shapes(base_shapes: transformer.Params, lora: LoraConfig, dtype: Any = jnp.float32) -> Adapters:
  """ShapeDtypeStructs of the adapters for base params (or their shapes)."""
  layers = {}
  for name in lora.targets:
    num_layers, fan_in, fan_out = base_shapes["layers"][name].shape
    layers[name] = {"lora_a": jax.ShapeDtypeStruct((num_layers, fan_in, lora.rank), dtype),
                    "lora_b": jax.ShapeDtypeStruct((num_layers, lora.rank, fan_out), dtype)}
  return {"layers": layers}


def merge(base: transformer.Params, adapters: Adapters, lora: LoraConfig, dropout_key: jax.Array | None = None
          ) -> transformer.Params:
  """Base params with W + scale·A·B for each adapted layer, in W's dtype (the base is not modified).

  With `dropout_key` and `lora.dropout > 0`, the adapter input features are dropped (see the module docstring).
  """
  layers = dict(base["layers"])
  names = sorted(adapters["layers"])
  keys = jax.random.split(dropout_key, len(names)) if dropout_key is not None and lora.dropout > 0 else None
  for i, name in enumerate(names):
    a, b = adapters["layers"][name]["lora_a"], adapters["layers"][name]["lora_b"]
    w = layers[name]
    if keys is not None:
      keep = jax.random.bernoulli(keys[i], 1.0 - lora.dropout, a.shape[:2] + (1,))
      a = jnp.where(keep, a / (1.0 - lora.dropout), 0.0).astype(a.dtype)
    delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * lora.scale
    layers[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return {**base, "layers": layers}


def config_from(section: Any) -> LoraConfig | None:
  """The LoRA settings of a config section (`rank` 0 or a missing section means full fine-tuning)."""
  if not section or not section.get("rank"):
    return None
  return LoraConfig(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.get("dropout", 0.0)),
                    targets=tuple(section.get("targets", TARGETS)))
