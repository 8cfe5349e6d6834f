"""Model presets: the published configs parse, match the published parameter counts, and load with random weights."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipo_jax import sharding
from ipo_jax.model import loading, presets
from ipo_jax.model.architecture import FULL, SLIDING, ModelConfig
from ipo_jax.tasks import model_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published total parameter counts: the "Model size" (safetensors parameter count) of each Hugging Face repository
# (meta-llama/Llama-3.2-1B: 1.24B, Llama-3.2-3B: 3.21B, Llama-3.1-8B: 8.03B, Llama-3.1-70B: 70.55B (70,553,706,496);
# mistralai/Mistral-7B-Instruct-v0.1/v0.2: 7.24B; Qwen/Qwen2.5-0.5B: 494M; google/gemma-2-2b: 2.61B,
# gemma-2-9b: 9.24B, gemma-2-27b: 27.2B) and the Qwen2.5 model cards ("Number of Parameters": 1.54B, 7.61B, 72.7B).
PUBLISHED_TOTAL = {
    "llama-3.2-1b-instruct": 1.24e9, "llama-3.2-3b-instruct": 3.21e9,
    "llama-3.1-8b-instruct": 8.03e9, "llama-3.1-70b-instruct": 70.55e9,
    "mistral-7b-instruct-v0.1": 7.24e9, "mistral-7b-instruct-v0.2": 7.24e9,
    "qwen2.5-0.5b-instruct": 0.494e9, "qwen2.5-1.5b-instruct": 1.54e9,
    "qwen2.5-7b-instruct": 7.61e9, "qwen2.5-72b-instruct": 72.7e9,
    "gemma-2-2b-it": 2.61e9, "gemma-2-9b-it": 9.24e9, "gemma-2-27b-it": 27.2e9,
    # Gemma 3 Technical Report, Table 1: 1B = 302M embedding + 698M non-embedding parameters.
    "gemma-3-1b-it": 1.0e9,
}
# Gemma 3 Technical Report, Table 1, non-embedding parameters (the 4B/27B totals also count the 417M vision encoder,
# which the text-only presets leave out).
PUBLISHED_NON_EMBEDDING = {"gemma-3-4b-it": 3209e6, "gemma-3-27b-it": 25600e6}


def test_every_preset_parses_and_names_its_source():
  assert len(presets.names()) >= 30
  for name in presets.names():
    cfg = presets.model_config(name)
    assert isinstance(cfg, ModelConfig)
    fields = presets.fields(name)
    assert fields["_source"].split("/")[0] in ("meta-llama", "mistralai", "Qwen", "google")
    assert presets.hf_config(name).model_type == fields["model_type"] == cfg.model_type
    assert cfg.vocab_size == fields["vocab_size"] and cfg.num_layers == fields["num_hidden_layers"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_parameter_count_matches_the_published_total(name):
  count = presets.num_params(presets.model_config(name))
  assert abs(count - PUBLISHED_TOTAL[name]) / PUBLISHED_TOTAL[name] < 0.005, (name, count)


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_gemma3_non_embedding_count_matches_the_report(name):
  cfg = presets.model_config(name)
  non_embedding = presets.num_params(cfg) - cfg.vocab_size * cfg.hidden_size  # tied: one embedding table
  assert abs(non_embedding - PUBLISHED_NON_EMBEDDING[name]) / PUBLISHED_NON_EMBEDDING[name] < 0.005


def test_exact_counts_of_the_embedded_layout():
  # Hand count for Llama-3.1-8B: 32 x (4096*(4096+2*1024+4096) + 3*4096*14336 + 2*4096) + 2*128256*4096 + 4096.
  layer = 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
  assert presets.num_params(presets.model_config("llama-3.1-8b")) == 32 * layer + 2 * 128256 * 4096 + 4096
  assert presets.num_params(presets.model_config("llama-3.1-8b")) == 8_030_261_248


def test_llama_fields():
  cfg = presets.model_config("llama-3.1-8b-instruct")
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (4096, 14336, 128256)
  rope = cfg.rope_full
  assert (rope.rope_type, rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
          rope.original_max_position_embeddings) == ("llama3", 500000.0, 8.0, 1.0, 4.0, 8192)
  assert not cfg.tie_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 131072
  assert cfg.eos_token_ids == (128001, 128008, 128009)
  assert presets.model_config("llama-3.1-8b").eos_token_ids == (128001,)
  assert presets.source("llama-3.1-8b") == "meta-llama/Llama-3.1-8B"
  small = presets.model_config("llama-3.2-1b")
  assert small.tie_embeddings and small.head_dim == 64 and small.rope_full.factor == 32.0
  big = presets.model_config("llama-3.1-70b")
  assert (big.num_layers, big.num_heads, big.num_kv_heads, big.intermediate_size) == (80, 64, 8, 28672)


def test_gemma2_fields():
  cfg = presets.model_config("gemma-2-9b-it")
  assert (cfg.num_layers, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads) == (42, 256, 16, 8)
  assert presets.fields("gemma-2-9b-it")["query_pre_attn_scalar"] == 256 and cfg.attn_scale == 256**-0.5
  assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window) == (50.0, 30.0, 4096)
  assert cfg.layer_types == tuple(SLIDING if i % 2 == 0 else FULL for i in range(42))
  assert cfg.hidden_act == "gelu_tanh" and cfg.norm_offset == 1.0 and cfg.tie_embeddings and cfg.post_norms
  assert presets.model_config("gemma-2-27b-it").attn_scale == 144**-0.5
  assert presets.model_config("gemma-2-2b-it").eos_token_ids == (1, 107)


def test_gemma3_sliding_pattern_and_rope():
  cfg = presets.model_config("gemma-3-1b-it")
  assert cfg.layer_types == tuple(FULL if i % 6 == 5 else SLIDING for i in range(26))
  assert cfg.sliding_window == 512 and cfg.qk_norm and cfg.attn_softcap is None and cfg.final_softcap is None
  assert (cfg.rope_full.theta, cfg.rope_sliding.theta, cfg.rope_full.rope_type) == (1e6, 1e4, "default")
  big = presets.model_config("gemma-3-27b-it")
  assert (big.num_layers, big.hidden_size, big.head_dim, big.vocab_size) == (62, 5376, 128, 262208)
  assert big.attn_scale == 168**-0.5 and big.sliding_window == 1024
  assert (big.rope_full.rope_type, big.rope_full.factor, big.rope_sliding.rope_type) == ("linear", 8.0, "default")
  assert sum(t == FULL for t in big.layer_types) == 10
  assert presets.hf_config("gemma-3-4b-it").model_type == "gemma3_text"


def test_qwen_and_mistral_fields():
  for name in ("qwen2.5-0.5b", "qwen2.5-7b-instruct", "qwen2.5-72b"):
    cfg = presets.model_config(name)
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None and cfg.rope_full.theta == 1e6
  assert presets.model_config("qwen2.5-7b-instruct").num_kv_heads == 4
  assert presets.model_config("qwen2.5-72b").rms_norm_eps == 1e-5
  assert presets.model_config("qwen2.5-72b-instruct").rms_norm_eps == 1e-6
  assert presets.model_config("qwen2.5-0.5b-instruct").eos_token_ids == (151645,)
  v1, v2 = presets.model_config("mistral-7b-instruct-v0.1"), presets.model_config("mistral-7b-instruct-v0.2")
  assert v1.sliding_window == 4096 and v1.layer_types == (SLIDING,) * 32 and v1.rope_full.theta == 1e4
  assert v2.sliding_window is None and v2.layer_types == (FULL,) * 32 and v2.rope_full.theta == 1e6


def test_unknown_preset_is_one_line_naming_the_valid_ones():
  for call in (lambda: presets.model_config("llama-9"), lambda: loading.check_model_path("preset:llama-9"),
               lambda: loading.load_model("preset:llama-9")):
    with pytest.raises(ValueError) as e:
      call()
    message = str(e.value)
    assert "\n" not in message and "'llama-9'" in message and "llama-3.1-8b-instruct, llama-3.2-1b" in message
  loading.check_model_path("preset:gemma-2-2b")  # a known preset passes
  with pytest.raises(ValueError, match="is a preset"):
    loading.resolve_model_path("preset:gemma-2-2b")


def test_random_params_are_seeded_and_start_at_identity_norms():
  tiny = presets.fields("gemma-3-1b-it")
  tiny.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256, head_dim=16)
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.AutoConfig.for_model("gemma3_text", **{k: v for k, v in tiny.items()
                                                           if not k.startswith("_") and k != "model_type"})
  cfg = ModelConfig.from_hf(hf)
  mesh = sharding.make_mesh()
  a, b = presets.random_params(cfg, mesh), presets.random_params(cfg, mesh)
  c = presets.random_params(cfg, mesh, seed=1)
  np.testing.assert_array_equal(np.asarray(a["layers"]["q"]), np.asarray(b["layers"]["q"]))
  assert not np.array_equal(np.asarray(a["layers"]["q"]), np.asarray(c["layers"]["q"]))
  assert not np.array_equal(np.asarray(a["layers"]["q"][0]), np.asarray(a["layers"]["q"][1]))  # per-layer draws
  assert abs(float(np.std(np.asarray(a["embed"]))) - 0.02) < 0.002
  assert np.all(np.asarray(a["layers"]["attn_norm"]) == 0.0)  # Gemma norms scale by 1 + w: identity at w = 0


def test_load_preset_gives_random_weights_on_the_mesh_and_no_tokenizer():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = loading.load_model("preset:qwen2.5-0.5b", "float32", mesh)
  assert model.tokenizer is None and model.name == "preset:qwen2.5-0.5b"
  assert model.params["layers"]["q_bias"].shape == (24, 896) and model.params["embed"].dtype == jnp.float32
  assert model.params["layers"]["gate"].sharding.mesh == mesh
  logits = np.asarray(model.logits(np.array([[151643, 9707, 11, 1879]])))
  assert logits.shape == (1, 4, 151936) and np.isfinite(logits).all() and logits.std() > 0
  with pytest.raises(ValueError) as e:
    loading.require_tokenizer(model)
  assert str(e.value) == ("model.path=preset:qwen2.5-0.5b has shapes and random weights only, no tokenizer; "
                          "use it for aot sizing and benchmarks")


def test_a_task_that_reads_text_refuses_a_preset_before_making_weights():
  from configs import generate as generate_config  # pylint: disable=import-outside-toplevel
  from ipo_jax import runtime  # pylint: disable=import-outside-toplevel
  config = generate_config.get_config()
  config.model.path = "preset:llama-3.1-70b-instruct"  # 70B of random fp32 weights would not fit: refused first
  with pytest.raises(ValueError) as e:
    runtime.load_model_from_config(config)
  assert str(e.value) == ("model.path=preset:llama-3.1-70b-instruct has shapes and random weights only, no "
                          "tokenizer; use it for aot sizing and benchmarks (task 'generate' reads text)")


def test_model_info_prints_a_preset_without_weights(capsys):
  from configs import model_info as model_info_config  # pylint: disable=import-outside-toplevel
  config = model_info_config.get_config()
  config.model.path, config.model.dtype = "preset:llama-3.1-70b-instruct", "bfloat16"
  info = model_info.run(config)
  out = capsys.readouterr().out
  assert info["num_parameters"] == 70_553_706_496 and info["top_next_tokens"] == []
  assert "70,553,706,496 (bfloat16)" in out and "80 layers, d=8192, 64/8 heads x 128" in out
  assert "meta-llama/Llama-3.1-70B-Instruct" in out and "rope theta 500000 (llama3 x8)" in out
  assert "no tokenizer; use it for aot sizing and benchmarks" in out


_SHARDED_INIT = """
import jax, jax.numpy as jnp, json
from ipo_jax import sharding
from ipo_jax.model import presets
mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
cfg = presets.model_config("llama-3.1-8b")
m = presets.init_fn(cfg, mesh, jnp.bfloat16).lower(jax.random.key(0)).compile().memory_analysis()
print(json.dumps({"out": m.output_size_in_bytes, "temp": m.temp_size_in_bytes, "total": 2 * presets.num_params(cfg)}))
"""


def test_random_8b_weights_are_drawn_sharded_never_whole_on_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _SHARDED_INIT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True)
  mem = json.loads(out.stdout.strip().splitlines()[-1])
  # Each of the 8 devices holds 1/8 of the 16 GB of bf16 weights (plus a full copy of the 0.5 MB of norms).
  assert mem["total"] // 8 < mem["out"] < mem["total"] // 8 + 600_000
  assert mem["temp"] < mem["out"]  # and draws them one layer slice at a time


def test_presets_ship_with_the_package():
  with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
    assert '"ipo_jax.model" = ["presets/*.json"]' in f.read()
  assert sorted(p.stem for p in presets.PRESET_DIR.glob("*.json")) == sorted(
      set(presets.names()) - set(presets.ALIASES))
