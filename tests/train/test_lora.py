"""LoRA: adapters as their own pytree, merge math, dropout, merged export = adapter forward.

Training with LoRA (base frozen, adapters trained, merged export) runs through the CLI in tests/train/test_loop.py.
"""

import types

import jax
import numpy as np
import pytest
import torch
import transformers

from ipo_jax import sharding
from ipo_jax.train import lora, steps
from ipo_jax.model import export, transformer
from ipo_jax.model.architecture import ModelConfig
from tests import hf_checkpoints

CFG = ModelConfig(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, attn_scale=8**-0.5, bos_token_id=0, eos_token_ids=(1,))


@pytest.fixture(scope="module")
def base():
  return jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(0))


def _merge(base, adapters, cfg_lora, key=None):
  return jax.jit(lambda b, a, k: lora.merge(b, a, cfg_lora, k))(base, adapters, key)


def _random_adapters(base, cfg_lora, seed=0):
  adapters = lora.init_adapters(base, cfg_lora, jax.random.key(seed))
  return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapters)


def test_fresh_adapters_leave_the_model_unchanged(base):
  cfg_lora = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_adapters(base, cfg_lora, jax.random.key(1))
  assert adapters["layers"]["q"]["lora_a"].shape == (2, 32, 4)
  assert adapters["layers"]["down"]["lora_b"].shape == (2, 4, 32)
  merged = _merge(base, adapters, cfg_lora)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)


def test_merge_adds_the_scaled_low_rank_update_to_targets_only(base):
  cfg_lora = lora.LoraConfig(rank=4, alpha=2.0, targets=("q", "down"))
  adapters = _random_adapters(base, cfg_lora)
  merged = _merge(base, adapters, cfg_lora)
  for name in ("q", "down"):
    a, b = (np.asarray(adapters["layers"][name][k], np.float64) for k in ("lora_a", "lora_b"))
    want = np.asarray(base["layers"][name], np.float64) + 0.5 * np.einsum("lir,lro->lio", a, b)
    np.testing.assert_allclose(merged["layers"][name], want, atol=1e-6)
  for name in ("k", "v", "o", "gate", "up", "attn_norm"):
    np.testing.assert_array_equal(merged["layers"][name], base["layers"][name])
  assert lora.adapter_shapes(base, cfg_lora)["layers"]["q"]["lora_a"].shape == (2, 32, 4)
  # Adapter leaves follow the lora_a / lora_b partition rules.
  mesh = sharding.make_mesh()
  assert sharding.param_shardings(adapters, mesh)["layers"]["q"]["lora_a"].spec == jax.sharding.PartitionSpec(
      None, None, None)


def test_dropout_masks_adapter_input_features(base):
  cfg_lora = lora.LoraConfig(rank=4, alpha=4.0, dropout=0.5, targets=("up",))
  adapters = _random_adapters(base, cfg_lora)
  full = _merge(base, adapters, cfg_lora)["layers"]["up"] - base["layers"]["up"]
  dropped = _merge(base, adapters, cfg_lora, jax.random.key(7))["layers"]["up"] - base["layers"]["up"]
  row_zero = np.all(np.abs(np.asarray(dropped)) < 1e-7, axis=-1)  # [L, in]: dropped input features
  assert 0.2 < row_zero.mean() < 0.8
  np.testing.assert_allclose(np.asarray(dropped)[~row_zero], 2.0 * np.asarray(full)[~row_zero], rtol=1e-4,
                             atol=1e-6)
  again = _merge(base, adapters, cfg_lora, jax.random.key(7))["layers"]["up"] - base["layers"]["up"]
  np.testing.assert_array_equal(again, dropped)


def test_lora_config_is_validated():
  with pytest.raises(ValueError, match="targets"):
    lora.LoraConfig(targets=("lm_head",))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0)
  assert lora.config_from(types.SimpleNamespace(get=lambda k, d=None: {"rank": 0}.get(k, d))) is None


def test_merged_export_equals_the_adapter_forward(base, tmp_path):
  cfg_lora = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = _random_adapters(base, cfg_lora)
  settings = steps.Settings(lora=cfg_lora)
  ids, mask = hf_checkpoints.padded_batch(CFG.vocab_size, [12, 7], 12, left=False)
  adapter_logits = np.asarray(transformer.full_logits(steps.policy_params(adapters, base, settings), CFG, ids, mask))
  base_logits = np.asarray(transformer.full_logits(base, CFG, ids, mask))
  assert np.abs(adapter_logits - base_logits).max() > 1e-2  # the adapters matter
  out = export.export_hf(_merge(base, adapters, cfg_lora), CFG, tmp_path / "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
  want = hf_checkpoints.hf_logits(hf.eval(), ids, mask)
  np.testing.assert_allclose(adapter_logits[mask == 1], want[mask == 1], atol=1e-4, rtol=0)
