"""experiments/bench/pod.py (one small case through the `aot` task to its table row: goal, verdict, cause) and
experiments/bench/gpu.py (the task programs measured on this host's device, fed random arguments)."""

import importlib.util
import pathlib
import sys

import jax
import pytest

from ipo_jax import sharding
from ipo_jax.aot import jobs, targets
from ipo_jax.model.architecture import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU_SKIP = targets.libtpu_missing()


def _script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # (its dataclasses look their module up)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))
def test_a_case_becomes_a_row_with_its_verdict_and_cause(tmp_path):
  pod = _script("pod")
  case = pod.Case("small", "preset:qwen2.5-0.5b", "tpu:v5e:2x2", "score", 0.55)
  result = pod.run_case(case, str(tmp_path))
  best = result["best"]
  assert best["fits"] and list(best["job"]["mesh_shape"]) == [1, 4, 1] and best["top_kernels"]
  shares = [k["share"] for k in best["top_kernels"] if k["kernel"] != "all matmuls"]
  assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
  row = pod.table([(case, result)]).splitlines()[2]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:5] == ["qwen2.5-0.5b", "tpu:v5e:2x2", "IPO scoring, 64 × 1024 tokens", "fits, ≥ 55% MFU", "1×4×1"]
  mfu = best["mfu"]
  assert cells[10] == (f"met ({100 * mfu:.0f}%)" if mfu >= 0.55 else f"gap: {100 * mfu:.0f}% of 55%")
  assert "of peak" in cells[11]
  assert pod.run_case(case, str(tmp_path))["best"]["key"] == best["key"]  # resumed from the run directory
  skipped = pod.Case("gpu", "preset:qwen2.5-0.5b", "gpu:h100x8", "score", None)
  if targets.parse(skipped.target).unavailable():
    assert "not run" in pod.table([(skipped, pod.run_case(skipped, str(tmp_path)))])


def test_gpu_check_runs_the_task_programs_with_random_arguments():
  """The score program and a DPO step (its donated state fed back each call) of a 2-layer model, on one CPU
  device: timed, and formatted with the PyTorch side's time as a ratio (no MFU or estimate off GPU)."""
  gpu = _script("gpu")
  from configs import aot as aot_config  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=256)
  devices = jax.local_devices()[:1]
  mesh = sharding.make_mesh({"fsdp": 1}, devices)
  assert gpu.target_of(devices[0]) is None
  config = aot_config.get_config()
  for job in (jobs.Job("score", (1, 1, 1), 2, 32), jobs.Job("dpo", (1, 1, 1), 2, 32)):
    out = gpu.measure_jax(config, cfg, job, mesh, None, warmup=1, iters=2)
    assert out["seconds"] > 0 and "estimate_ms" not in out
  row = {"model": "m", "program": "dpo", "rows": 2, "seq": 32, "ipo_jax": {"seconds": 0.5, "mfu": 0.4},
         "torch": {"seconds": 1.0}}
  assert gpu.line(row) == "m dpo 2 x 32 x 2: ipo_jax 500.0 ms (MFU 40%); torch 1000.0 ms; 2.00x PyTorch"
  assert gpu.line(dict(row, attention="xla")).startswith("m dpo 2 x 32 x 2 (attention xla): ipo_jax 500.0 ms")
