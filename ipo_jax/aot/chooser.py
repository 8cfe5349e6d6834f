"""The mesh chooser of `mesh.auto=True`: a task's main program compiled for candidate (data, fsdp, tensor) meshes of
the devices it runs on, the fastest estimated one that fits kept.

The program is the one the task runs most (`PROGRAMS`: IPO scoring, sampling, a DPO or SFT step), with the task's
own batch settings, built by the engines' builders (`ipo_jax.aot.jobs.lowerable`) and analysed by the `aot`
instrument (`ipo_jax.aot.hlo`: the compiler's memory; on TPU its estimated cycles, on GPU the roofline) against the
device's published figures (`ipo_jax.aot.targets`). Compiling does not run anything, so choosing costs one compile
per candidate (`mesh.candidates`, the most fsdp first). CPU devices have no compiler estimates: every device stays
on fsdp. The choice and every candidate's estimate are logged; a task whose settings are the same chooses the same
mesh (each choice is kept for the process).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import jax
import ml_collections

from ipo_jax import sharding
from ipo_jax.aot import hlo, jobs, targets
from ipo_jax.evals import reward_model
from ipo_jax.ipo import scorer

# The program each task runs most (RM-Bench scores like RewardBench).
PROGRAMS = {"rewardbench": "score", "rmbench": "score", "rewardbench_reward_model": "reward",
            "generate": "generate", "rewardbench_self_reward": "generate", "rewardbench_pairwise": "generate",
            "dpo": "dpo", "self_improve": "dpo", "sft": "sft"}
_CHOSEN: dict[str, tuple[int, int, int]] = {}


def local_target(devices: list[Any]) -> targets.Target | None:
  """The published figures of `devices` as an `aot` target (their count and chip), or None for a chip without
  figures (and for CPUs)."""
  kind = str(getattr(devices[0], "device_kind", ""))
  chip = next((name for name, c in targets.CHIPS.items() if c.device_kind.lower() == kind.lower()), None)
  if chip is None:
    chip = next((name for name in ("h200", "h100") if name in kind.lower()), None)
  if chip is None:
    return None
  n = len(devices)
  if targets.CHIPS[chip].platform == "gpu":
    hosts = max(1, len({d.process_index for d in devices}))
    return targets.parse(f"gpu:{chip}x{n // hosts}" + (f"x{hosts}" if hosts > 1 else ""))
  dims = targets.CHIPS[chip].dims
  return targets.parse(f"tpu:{chip}:" + "x".join(["1"] * (dims - 1) + [str(n)]))


def job_config(config: Any) -> ml_collections.ConfigDict:
  """The task's config with what `jobs.base_job` reads besides: scoring and reward-model rows from their
  `batch_tokens` (the accelerator default when 0), the sampled prompts' length from `sampling.max_prompt_tokens`."""
  c = ml_collections.ConfigDict(config.to_dict())
  scoring, sampling, reward = c.get("scoring"), c.get("sampling"), c.get("reward_model")

  def rows(section, default_tokens):
    if section is None:
      return 8
    tokens = int(section.get("batch_tokens", 0) or default_tokens)
    return max(1, min(int(section.get("max_batch", 64)), tokens // int(section.get("max_length", 1024))))

  c.aot = {"score_rows": rows(scoring, scorer.Settings.ACCELERATOR_BATCH_TOKENS), "score_program": "plain",
           "packed_sequences": 1, "reward_rows": rows(reward, reward_model.RewardSettings.ACCELERATOR_BATCH_TOKENS),
           "prompt_length": int(sampling.get("max_prompt_tokens", 512)) if sampling is not None else 512}
  return c


def choose_mesh(config: Any, devices: list[Any] | None = None, target: targets.Target | None = None,
                log: Callable[[str], None] = print) -> jax.sharding.Mesh:
  """The mesh for `config`'s task on `devices` (default: all): its main program compiled on each candidate mesh,
  the fastest estimated step per row that fits; every device on fsdp where nothing can be estimated."""
  devices = list(devices if devices is not None else jax.devices())
  slice_axis = config.mesh.get("slice_axis", "data")
  target = target or local_target(devices)
  program = PROGRAMS.get(config.get("task", ""))
  if target is None or program is None:
    why = ("no compiler estimates on this platform" if target is None else
           f"task {config.get('task')!r} has no program to compile")
    log(f"mesh.auto: {why} ({len(devices)} x {devices[0].device_kind}): every device on fsdp")
    return sharding.make_mesh(None, devices, slice_axis=slice_axis)
  from ipo_jax import runtime  # pylint: disable=import-outside-toplevel
  cfg = runtime.model_config_from_config(config)
  c = job_config(config)
  key = json.dumps([program, target.name, c.to_dict()], sort_keys=True, default=str)
  if key not in _CHOSEN:
    _CHOSEN[key] = _compile_candidates(c, cfg, program, devices, target, log)
  return sharding.make_mesh(dict(zip(sharding.AXES, _CHOSEN[key])), devices, slice_axis=slice_axis)


def _compile_candidates(config, cfg, program, devices, target, log) -> tuple[int, int, int]:
  limit = int(config.mesh.get("candidates", 4))
  best, best_cost = None, math.inf
  for shape in jobs.candidate_meshes(len(devices), cfg, limit):
    job = jobs.base_job(config, program, shape)
    mesh = jobs.mesh_for(job, devices, config.mesh.get("slice_axis", "data"))
    analysis = hlo.compile_and_analyze(jobs.lowerable(config, cfg, job, mesh).lower(), target, devices)
    cost = jobs.cost_per_row(analysis.fits, analysis.step_seconds, job.rows)
    log(f"mesh.auto: {job.key}: {analysis.needed_bytes / 2**30:.2f} GiB/device, "
        + (f"est. {1e3 * analysis.step_seconds:.1f} ms" if analysis.fits else "does not fit"))
    if cost < best_cost:
      best, best_cost = shape, cost
  if best is None:
    best = (1, len(devices), 1)
    log(f"mesh.auto: no candidate fits {program}; every device on fsdp")
  else:
    log(f"mesh.auto: chose data={best[0]} fsdp={best[1]} tensor={best[2]} for {program} on {target.name}")
  return best
