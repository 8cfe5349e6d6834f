"""The fused attention paths against XLA's on CPU: splash attention through the Pallas interpreter (the kernel the
TPU runs), the cuDNN call's arguments through `jax.nn.dot_product_attention`'s XLA path, and which path each call
takes."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipo_jax import sharding
from ipo_jax.model import attention, transformer
from ipo_jax.model.architecture import FULL, SLIDING, ModelConfig, RopeSpec

# Gemma-2-like (soft-capped logits, sliding layers between full ones) and Llama-like (grouped queries, no window).
GEMMA = ModelConfig(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8, attn_scale=0.3, attn_softcap=20.0, final_softcap=15.0,
                    sliding_window=100, layer_types=(SLIDING, FULL, SLIDING), post_norms=True, norm_offset=1.0,
                    embed_scale=32**0.5, hidden_act="gelu_tanh", rope_sliding=RopeSpec(theta=100.0))
LLAMA = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=1, head_dim=8, attn_scale=8**-0.5)
T = 256  # two splash blocks of 128
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(seed=0):
  """Two rows of T tokens: one left-padded by 37, one right-padded (ends 60 before T)."""
  ids = np.random.default_rng(seed).integers(1, 64, size=(2, T))
  mask = np.ones((2, T), np.int32)
  mask[0, :37] = 0
  mask[1, T - 60:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _hidden(cfg, params, **kwargs):
  return np.asarray(transformer.forward(params, cfg, **kwargs)[0])


@pytest.mark.parametrize("cfg", [GEMMA, LLAMA], ids=["gemma2", "llama"])
def test_splash_equals_xla_on_padded_rows(cfg):
  params = transformer.init_params(cfg, jax.random.key(1), scale=0.3)
  ids, mask = _rows()
  ref = _hidden(dataclasses.replace(cfg, attention="xla"), params, input_ids=ids, attention_mask=mask)
  out = _hidden(dataclasses.replace(cfg, attention="splash"), params, input_ids=ids, attention_mask=mask)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5, rtol=2e-5)


def test_splash_equals_xla_on_packed_segments_and_in_gradients():
  cfg = GEMMA
  params = transformer.init_params(cfg, jax.random.key(2), scale=0.3)
  ids, _ = _rows(1)
  segments = np.zeros((2, T), np.int32)
  segments[0, :90], segments[0, 90:200], segments[1, :T - 10] = 1, 2, 1  # two sequences, then padding
  segments = jnp.asarray(segments)

  probe = jnp.asarray(np.random.default_rng(5).normal(size=(2, T, cfg.hidden_size)), jnp.float32)

  def loss(p, c):  # a random projection of the valid positions' hidden states (a sum of squares would be
    h, _ = transformer.forward(p, c, ids, segment_ids=segments, remat="minimal")  # constant under the final norm)
    return jnp.sum(jnp.where(segments[:, :, None] > 0, h, 0.0) * probe)

  ref_loss, ref_grad = jax.value_and_grad(loss)(params, dataclasses.replace(cfg, attention="xla"))
  out_loss, out_grad = jax.value_and_grad(loss)(params, dataclasses.replace(cfg, attention="splash"))
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out_grad)[0], jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), err_msg=jax.tree_util.keystr(path))


def test_cudnn_arguments_equal_xla_attention():
  """The cuDNN call's layout (grouped heads, the mask as given, the scale) through the same function's XLA path."""
  cfg = LLAMA
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 1, 16, 8)), jnp.float32) for _ in range(2))
  mask = np.tril(np.ones((16, 16), bool))[None].repeat(2, 0)
  mask[1, :, 10:] = False  # a right-padded row
  ref = transformer._attention(cfg, q, k, v, jnp.asarray(mask))  # pylint: disable=protected-access
  out = attention.cudnn(cfg, q, k, v, jnp.asarray(mask), implementation_="xla")
  np.testing.assert_allclose(np.asarray(out)[1, :10], np.asarray(ref)[1, :10], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[0], np.asarray(ref)[0], atol=1e-5)


def test_which_path_a_call_takes(monkeypatch):
  auto = LLAMA
  assert attention.implementation(auto, jnp.float32, 256, True, True) == "xla"  # CPU: XLA's attention
  monkeypatch.setattr(attention, "platform", lambda: "tpu")
  assert attention.implementation(auto, jnp.bfloat16, 256, True, True) == "splash"
  assert attention.implementation(auto, jnp.bfloat16, 200, True, True) == "xla"  # not a multiple of 128
  assert attention.implementation(auto, jnp.bfloat16, 256, True, False) == "xla"  # branches
  assert attention.implementation(auto, jnp.bfloat16, 256, False, True) == "xla"  # a call with a KV cache
  assert attention.implementation(dataclasses.replace(auto, attention="xla"), jnp.bfloat16, 256, True, True) == "xla"
  assert attention.splash_block(768) == 256 and attention.splash_block(1024) == 512
  monkeypatch.setattr(attention, "platform", lambda: "gpu")
  assert attention.implementation(auto, jnp.bfloat16, 200, True, False) == "cudnn"
  assert attention.implementation(auto, jnp.float32, 200, True, False) == "xla"
  assert attention.implementation(GEMMA, jnp.bfloat16, 200, True, False) == "xla"  # soft-capped logits
  with pytest.raises(ValueError, match=r"model.attention='cudnn': .*float32"):
    attention.implementation(dataclasses.replace(auto, attention="cudnn"), jnp.float32, 200, True, False)
  with pytest.raises(ValueError, match="model.attention='flash'"):
    dataclasses.replace(auto, attention="flash")


def _eight_device_case():
  cfg = dataclasses.replace(LLAMA, num_kv_heads=2, attention="splash")
  params = transformer.init_params(cfg, jax.random.key(4), scale=0.3)
  ids, mask = _rows(2)
  return cfg, params, jnp.tile(ids, (2, 1)), jnp.tile(mask, (2, 1))


def test_splash_under_an_eight_device_mesh_equals_one_device(tmp_path):
  """Rows over (data, fsdp) and heads over tensor: the kernel runs per device inside `shard_map`."""
  out = tmp_path / "hidden.npy"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=ROOT, check=True, timeout=300)
  cfg, params, ids, mask = _eight_device_case()
  ref = _hidden(dataclasses.replace(cfg, attention="xla"), params, input_ids=ids, attention_mask=mask)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.load(out)[valid], ref[valid], atol=2e-5, rtol=2e-5)


if __name__ == "__main__":  # the 8-device half of the test above
  cfg_, params_, ids_, mask_ = _eight_device_case()
  with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    hidden = jax.jit(lambda p, i, m: transformer.forward(p, cfg_, i, m)[0])(params_, ids_, mask_)
  np.save(sys.argv[1], np.asarray(hidden))
