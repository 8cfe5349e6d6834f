"""`ModelConfig.from_hf`: family switches and clear errors for what is not supported."""

import pytest
import transformers

from ipo_jax.model.architecture import FULL, SLIDING, ModelConfig


def test_family_switches():
  gemma2 = ModelConfig.from_hf(transformers.Gemma2Config(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=64))
  assert gemma2.layer_types == (SLIDING, FULL, SLIDING, FULL) and gemma2.post_norms and gemma2.norm_offset == 1.0
  assert gemma2.attn_scale == 64**-0.5 and gemma2.final_softcap == 30.0 and gemma2.attn_softcap == 50.0
  assert gemma2.embed_scale == gemma2.hidden_size**0.5 and gemma2.hidden_act == "gelu_tanh"
  qwen2 = ModelConfig.from_hf(transformers.Qwen2Config(num_hidden_layers=2, sliding_window=64))
  assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None  # use_sliding_window=False
  qwen3 = ModelConfig.from_hf(transformers.Qwen3Config(num_hidden_layers=2))
  assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.norm_offset == 0.0
  mistral = ModelConfig.from_hf(transformers.MistralConfig(num_hidden_layers=2, sliding_window=16))
  assert mistral.layer_types == (SLIDING, SLIDING) and mistral.sliding_window == 16
  gemma3 = ModelConfig.from_hf(transformers.Gemma3TextConfig(num_hidden_layers=6))
  assert gemma3.layer_types == (SLIDING,) * 5 + (FULL,)
  assert gemma3.rope_full.theta == 1e6 and gemma3.rope_sliding.theta == 1e4


@pytest.mark.parametrize("kwargs, message", [
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
])
def test_unsupported_features_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_hf(transformers.LlamaConfig(num_hidden_layers=2, **kwargs))


def test_unknown_model_type():
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama"):
    ModelConfig.from_hf(transformers.GPT2Config())
