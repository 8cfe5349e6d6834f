"""The mesh chooser of `mesh.auto=True`: the task's main program compiled on candidate meshes, the fastest estimated
one that fits kept; every device on fsdp where nothing can be estimated."""

import types

import jax
import pytest

from configs import dpo as dpo_config, rewardbench as rewardbench_config
from configs import rewardbench_reward_model as reward_config
from ipo_jax import runtime
from ipo_jax.aot import chooser, targets

TPU_SKIP = targets.libtpu_missing()


def _config(module, **mesh):
  config = module.get_config()
  config.model.path = "preset:qwen2.5-0.5b"
  config.mesh.update(auto=True, **mesh)
  return config


@pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))
def test_scoring_mesh_chosen_by_compiling_candidates():
  target = targets.parse("tpu:v5e:2x2")
  devices = target.devices()
  config = _config(rewardbench_config, candidates=2)
  lines = []
  mesh = chooser.choose_mesh(config, devices, target, log=lines.append)
  tried = [l for l in lines if "score[" in l]
  assert len(tried) == 2 and tried[0].startswith("mesh.auto: score[1x4x1,rows=8]")  # 8192 tokens / 1024
  estimates = {l.split("score[")[1].split(",")[0]: float(l.split("est. ")[1].split(" ms")[0]) for l in tried}
  best = min(estimates, key=estimates.get)
  assert "x".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor")) == best
  assert lines[-1].startswith(f"mesh.auto: chose data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}")
  again = []
  assert chooser.choose_mesh(config, devices, target, log=again.append).shape == mesh.shape and not again


@pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))
def test_reward_model_mesh_chosen_by_compiling_its_program():
  """The classifier reward model's task compiles its own program (one-label head, reward_model's batch)."""
  target = targets.parse("tpu:v5e:2x2")
  config = _config(reward_config, candidates=2)
  config.reward_model.max_length = 512
  lines = []
  mesh = chooser.choose_mesh(config, target.devices(), target, log=lines.append)
  tried = [l for l in lines if "reward[" in l]
  assert len(tried) == 2 and tried[0].startswith("mesh.auto: reward[1x4x1,rows=32]")  # 16384 tokens / 512
  assert all("est. " in l for l in tried)
  assert lines[-1].startswith(f"mesh.auto: chose data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}")
  assert "for reward on" in lines[-1]


def test_cpu_devices_stay_on_fsdp():
  lines = []
  mesh = chooser.choose_mesh(_config(dpo_config), log=lines.append)
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
  assert lines == [f"mesh.auto: no compiler estimates on this platform ({jax.device_count()} x "
                   f"{jax.devices()[0].device_kind}): every device on fsdp"]
  assert dict(runtime.mesh_from_config(_config(dpo_config)).shape) == dict(mesh.shape)


def test_local_target_from_the_device_kind():
  dev = lambda kind, process=0: types.SimpleNamespace(device_kind=kind, process_index=process)
  v5e = chooser.local_target([dev("TPU v5 lite")] * 8)
  assert v5e.name == "tpu:v5e:1x8" and v5e.num_devices == 8 and v5e.peak_flops == 197e12
  assert chooser.local_target([dev("TPU v5")] * 4).name == "tpu:v5p:1x1x4"
  h100 = chooser.local_target([dev("NVIDIA H100 80GB HBM3", p) for p in (0, 1) for _ in range(8)])
  assert h100.name == "gpu:h100x8x2" and h100.num_devices == 16
  assert chooser.local_target([dev("cpu")]) is None
