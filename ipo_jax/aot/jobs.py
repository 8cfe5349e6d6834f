"""The paper's jobs as programs for a target: what the `aot` task compiles, and the FLOPs each one is worth.

A `Job` is one program (IPO scoring, sampling, a DPO step full or with LoRA, an SFT step) with its batch, built on a mesh by
the engines' own builders (`ipo_jax.ipo.programs.lowerable`, `ipo_jax.sample.engine.lowerable`,
`ipo_jax.train.steps.train_lowerable`): the program compiled here is the program the task runs there. Model
FLOPs (for MFU) count the matmuls and causal attention a step needs, not what the compiled program executes
(rematerialisation, padding and the skipped attention blocks are not model FLOPs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from ipo_jax import sharding
from ipo_jax.evals import reward_model
from ipo_jax.ipo import planner, programs
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.sample import engine
from ipo_jax.train import lora as lora_lib, optimizer, steps

PROGRAMS = ("score", "reward", "generate", "dpo", "dpo_lora", "sft")
TRAIN_PROGRAMS = ("dpo", "dpo_lora", "sft")  # an optimizer step: remat and micro-batches apply
PAPER_LORA = dict(rank=256, alpha=128.0, dropout=0.05, targets=("q", "k", "v", "o", "gate", "up", "down"))


@dataclasses.dataclass(frozen=True)
class Job:
  """One program to compile: `program` on a (data, fsdp, tensor) `mesh_shape`, with its batch and variant."""

  program: str
  mesh_shape: tuple[int, int, int]
  rows: int  # score, reward: sequences; generate: prompts; dpo: pairs per optimizer step
  length: int  # tokens per sequence (generate: the prompt)
  remat: bool = False
  remat_policy: str = "full"  # with remat (transformer.REMAT_POLICIES)
  grad_accum: int = 1
  new_tokens: int = 0  # generate: max_new_tokens
  samples: int = 1  # generate: num_samples

  @property
  def key(self) -> str:
    d, f, t = self.mesh_shape
    extra = f",remat={self.remat_label},accum={self.grad_accum}" if self.program in TRAIN_PROGRAMS else ""
    return f"{self.program}[{d}x{f}x{t}{extra},rows={self.rows}]"

  @classmethod
  def from_row(cls, job: dict[str, Any]) -> "Job":
    """The job of a programs.jsonl row (rows written before a field existed take its default)."""
    return cls(**{**job, "mesh_shape": tuple(job["mesh_shape"])})

  @property
  def remat_label(self) -> str:
    return self.remat_policy if self.remat else "off"

  @property
  def tokens(self) -> int:
    """Tokens a step processes (generate: prompt tokens plus generated ones; dpo: both members of each pair; sft:
    the examples)."""
    if self.program == "generate":
      return self.rows * (self.length + self.samples * self.new_tokens)
    return self.rows * self.length * (2 if self.program.startswith("dpo") else 1)


def _forward_flops(cfg: ModelConfig, tokens: float, context: float) -> float:
  return float(planner.flops(cfg, 1, context)) * tokens


def model_flops(cfg: ModelConfig, job: Job, on_the_fly_reference: bool = False) -> float:
  """FLOPs of one step of `job` in the usual MFU convention: 2 per parameter per token, causal attention over half
  the context on average, the LM head where its logits are needed; backward twice the forward (weights and
  activations), once with LoRA (the base gets no weight gradients); an on-the-fly reference one more forward."""
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  if job.program == "score":
    return job.rows * (_forward_flops(cfg, job.length, job.length / 2) + head)
  if job.program == "reward":  # the classifier head at one position per row
    score_head = 2.0 * cfg.hidden_size * reward_config(cfg).num_labels
    return job.rows * (_forward_flops(cfg, job.length, job.length / 2) + score_head)
  if job.program == "generate":
    prefill = job.rows * (_forward_flops(cfg, job.length, job.length / 2) + head)
    steps_ = job.rows * job.samples * job.new_tokens
    return prefill + steps_ * (_forward_flops(cfg, 1, job.length + job.new_tokens / 2) + head)
  members = 1 if job.program == "sft" else 2
  forward = job.rows * members * (_forward_flops(cfg, job.length, job.length / 2) + job.length * head)
  passes = (2.0 if job.program == "dpo_lora" else 3.0) + (1.0 if on_the_fly_reference else 0.0)
  return passes * forward


def reward_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` as a reward model: itself for a classifier, else the same network with a one-label head (sizing a
  reward model of a causal LM's architecture)."""
  return cfg if cfg.num_labels else dataclasses.replace(cfg, num_labels=1)


def mesh_for(job: Job, devices: list[Any], slice_axis: str = "data") -> jax.sharding.Mesh:
  return sharding.make_mesh(dict(zip(sharding.AXES, job.mesh_shape)), devices, slice_axis=slice_axis)


def round_rows(rows: int, mesh_shape: tuple[int, int, int], grad_accum: int = 1, sequence_split: bool = False
               ) -> int:
  """`rows` rounded up so each micro-batch splits over the batch axes (data x fsdp). `sequence_split` (a training
  step): a micro-batch of fewer rows than data x fsdp stays that small (it splits over its sequence instead)."""
  batch_devices = mesh_shape[0] * mesh_shape[1]
  micro = -(-rows // grad_accum)
  if sequence_split and micro < batch_devices:
    return micro * grad_accum
  multiple = batch_devices * grad_accum
  return -(-rows // multiple) * multiple


def dpo_settings(config: Any, job: Job, platform: str) -> steps.Settings:
  """The train step's settings for `platform`: DPO's (`dpo_lora`: the paper's LoRA), or SFT's for `sft`."""
  s = steps.Settings.for_sft(config, platform) if job.program == "sft" else steps.Settings.from_config(config, platform)
  lora = lora_lib.config_from(ml_collections.ConfigDict(PAPER_LORA)) if job.program == "dpo_lora" else s.lora
  return dataclasses.replace(s, remat=job.remat, remat_policy=job.remat_policy, lora=lora)


def lowerable(config: Any, cfg: ModelConfig, job: Job, mesh: jax.sharding.Mesh) -> sharding.Lowerable:
  """The job's program on `mesh`, from the engines' builders, with abstract arguments."""
  dtype = config.model.dtype
  if job.program == "score":
    return programs.lowerable(cfg, mesh, dtype, config.aot.score_program, job.rows, job.length,
                              sequences=max(1, config.aot.packed_sequences))
  if job.program == "reward":
    return reward_model.lowerable(reward_config(cfg), mesh, dtype, job.rows, job.length)
  if job.program == "generate":
    sampling = engine.SamplingConfig.from_config(config.sampling)
    return engine.lowerable(cfg, mesh, dtype, sampling, job.rows, job.length)
  s = dpo_settings(config, job, sharding.platform(mesh))
  opt = optimizer.OptimSpec.from_config(config.optim, total_steps=1000)
  return steps.train_lowerable(cfg, s, opt, mesh, dtype, grad_accum=job.grad_accum,
                               micro_batch=job.rows // job.grad_accum, length=job.length)


def base_job(config: Any, program: str, mesh_shape: tuple[int, int, int]) -> Job:
  """The job of `program` as the config sets it, its batch rounded up to split over the mesh."""
  a = config.aot
  if program == "score":
    return Job(program, mesh_shape, round_rows(a.score_rows, mesh_shape), config.scoring.max_length)
  if program == "reward":
    return Job(program, mesh_shape, round_rows(a.reward_rows, mesh_shape), config.reward_model.max_length)
  if program == "generate":
    return Job(program, mesh_shape, round_rows(config.sampling.batch_size, mesh_shape), a.prompt_length,
               new_tokens=config.sampling.max_new_tokens, samples=config.sampling.num_samples)
  if program not in PROGRAMS:
    raise ValueError(f"aot.programs: unknown program {program!r}; choose from {', '.join(PROGRAMS)}")
  t = config.train
  return Job(program, mesh_shape, round_rows(t.batch_size, mesh_shape, t.grad_accum, sequence_split=True),
             config.data.max_length,
             remat=bool(t.remat), remat_policy=str(t.get("remat_policy", "full")), grad_accum=int(t.grad_accum))


def candidate_meshes(num_devices: int, cfg: ModelConfig, limit: int = 8) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) shapes worth compiling for `num_devices`: tensor over 1, 2, 4 or 8 devices where it divides
  the query heads, data 1 or 2 (the rest fsdp); at most `limit`, the most fsdp first."""
  out = []
  for tensor in (1, 2, 4, 8):
    for data in (1, 2):
      fsdp, rest = divmod(num_devices, data * tensor)
      if not rest and fsdp >= 1 and cfg.num_heads % tensor == 0 and (data, fsdp, tensor) not in out:
        out.append((data, fsdp, tensor))
  return out[:limit]


def escalations(job: Job, max_accum: int = 8) -> Iterator[Job]:
  """A training job as configured, then with remat keeping the projections' outputs ("minimal"), then keeping only
  each layer's inputs ("full"), then with the optimizer step in 2, 4, ... micro-batches (full remat): the settings
  tried in order, each recomputing more (slower) than the one before, until one fits. Other programs: the job
  alone."""
  yield job
  if job.program not in TRAIN_PROGRAMS:
    return
  ladder = ("dots", "minimal", "full")  # transformer.REMAT_POLICIES by how much they recompute
  start = ladder.index(job.remat_policy) if job.remat else -1
  for policy in ladder[max(start + 1, 1):]:  # ("dots" keeps attention scores: no help where memory is short)
    job = dataclasses.replace(job, remat=True, remat_policy=policy)
    yield job
  accum = job.grad_accum * 2
  while accum <= max_accum and job.rows % accum == 0:  # a micro-batch of fewer rows than data x fsdp splits over
    yield dataclasses.replace(job, grad_accum=accum)  # its sequence (`sharding.rows_spec`)
    accum *= 2


def cost_per_row(fits: bool, step_seconds: float | None, rows: int) -> float:
  """What the best mesh or setting minimises: the estimated step time per row (sequence, prompt or pair); infinite
  for a program that does not fit or has no estimate."""
  return step_seconds / max(rows, 1) if fits and step_seconds else math.inf


def tokens_per_second(job: Job, seconds: float, num_devices: int) -> float:
  return job.tokens / seconds / num_devices if seconds and math.isfinite(seconds) else float("nan")


def parameter_count(cfg: ModelConfig) -> int:
  from ipo_jax.model import params as params_lib  # pylint: disable=import-outside-toplevel
  shapes = jax.tree.leaves(params_lib.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  return int(sum(np.prod(s) for s in shapes))


def largest_fitting(fits: Callable[[int], bool], multiple: int, cap: int) -> int:
  """The largest multiple of `multiple` up to `cap` for which `fits(rows)` holds, by doubling then bisection
  (about 2 log2(cap / multiple) compiles; 0 when even `multiple` rows do not fit). Assumes memory grows with rows."""
  if not fits(multiple):
    return 0
  lo, hi = 1, None  # in units of `multiple`: lo fits, hi does not
  while hi is None:
    if (2 * lo) * multiple > cap:
      hi = cap // multiple + 1
      break
    if fits(2 * lo * multiple):
      lo *= 2
    else:
      hi = 2 * lo
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if mid * multiple <= cap and fits(mid * multiple):
      lo = mid
    else:
      hi = mid
  return lo * multiple
