"""Partition rules, and logits on an 8-device (data × fsdp × tensor) CPU mesh equal to one device."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ipo_jax import sharding
from ipo_jax.model import params as params_lib, transformer
from ipo_jax.model.architecture import ModelConfig
from tests import hf_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(args, devices, extra_env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT,
             **(extra_env or {}))
  return subprocess.Popen([sys.executable, "-m", "tests.multidevice_worker", *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_rules_shard_every_parameter_kind():
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.AXES)
  cfg = ModelConfig(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, post_norms=True, qkv_bias=True)
  shapes = params_lib.param_shapes(cfg)
  specs = {sharding.path_str(p): sharding.spec_for(sharding.path_str(p), s, mesh) for p, s in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
  assert specs["embed"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert specs["layers/q"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert specs["layers/o"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert specs["layers/down"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert specs["layers/q_bias"] == jax.sharding.PartitionSpec(None, "tensor")
  assert specs["layers/attn_norm"] == jax.sharding.PartitionSpec(None, None)
  # A dimension the axis does not divide stays whole: 3 heads × 8 = 24 is not divisible by fsdp=4... but 32 is.
  assert sharding.spec_for("layers/k", (2, 30, 16), mesh) == jax.sharding.PartitionSpec(None, None, "tensor")


def test_logical_axes_of_activations_and_cache():
  """Activations keep the residual width whole (the batch holds fsdp); the KV cache splits rows and KV heads."""
  P = jax.sharding.PartitionSpec
  assert sharding.logical_spec(transformer.HIDDEN) == P(("data", "fsdp"), None, None)
  assert sharding.logical_spec(transformer.QUERIES) == P(("data", "fsdp"), None, "tensor", None)
  assert sharding.logical_spec(transformer.MLP_HIDDEN) == P(("data", "fsdp"), None, "tensor")
  assert sharding.logical_spec(transformer.CACHE_AXES["k"]) == P(None, ("data", "fsdp"), "tensor", None, None)
  assert sharding.logical_spec(("vocab", None)) == P("tensor", None)
  with pytest.raises(ValueError, match="unknown logical axes"):
    sharding.logical_spec(("batch", "hidden"))


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 1})
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh({"fsdp": 4})


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_eight_devices_equal_one(tmp_path, family):
  hf_checkpoints.make_checkpoint(family, str(tmp_path / "ckpt"),
                                 overrides={"num_attention_heads": 4, "num_key_value_heads": 2})
  one = run_worker([str(tmp_path / "ckpt"), str(tmp_path / "one.npy"), "1,1,1"], devices=1)
  eight = run_worker([str(tmp_path / "ckpt"), str(tmp_path / "eight.npy"), "2,2,2"], devices=8)
  for proc in (one, eight):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in out and "q P(None, 'fsdp', 'tensor')" in out
  np.testing.assert_allclose(np.load(tmp_path / "eight.npy"), np.load(tmp_path / "one.npy"), atol=1e-5, rtol=0)


def test_mesh_follows_the_chip_network():
  """On a TPU v5e 4x4 (abstract devices, compiled for from this host) a (1, 4, 4) mesh puts each tensor group on
  one row of the torus, and a 2-slice pod spans the slices with the data axis only."""
  from ipo_jax.aot import targets  # pylint: disable=import-outside-toplevel
  devices = targets.parse("tpu:v5e:4x4").devices()
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 4}, devices)
  for group in mesh.devices.reshape(4, 4):
    assert len({d.coords[1] for d in group}) == 1  # one row of chips
  pod = targets.parse("tpu:v5e:2x2:slices=2").devices()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, pod)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  with pytest.raises(ValueError, match="slices"):
    sharding.make_mesh({"data": 1, "fsdp": 8}, pod)
  assert {d.slice_index for d in sharding.make_mesh({"fsdp": 8}, pod, slice_axis="fsdp").devices.flat} == {0, 1}
