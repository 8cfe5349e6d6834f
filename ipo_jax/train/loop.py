"""DPO training: `train_dpo(model, pairs, config)` as init / restore-or-init / fit / finalize.

Library use: `train_dpo(model, pairs, config, *, eval_pairs=None, reference_params=None, run=None)
-> (params, summary)`, `model` a `loading.Model` (or anything with `config`, `params`, `mesh`, `tokenizer`, `name`),
`pairs` a `pairs.PreferenceSet` or TRL-style rows. The outputs go to a run directory (ipo_jax/rundir.py): `run`, one
the caller opened (task `dpo`, a self-improvement round's child), else `config.output_dir` opened here with
`identity(...)` (refused, before anything is written, when it holds a run of other settings); without either the
run keeps nothing on disk. In it: run.json, reference_logps.npz (stage "reference"), checkpoints/ (a rerun resumes
from the latest), metrics.jsonl, tensorboard/, curves.png, summary.json (stage "train" once complete).

The reference is the initial policy unless `reference_params` are given: precomputed once over the data (default)
or computed on the fly from frozen params; with LoRA it is the base with adapters off, without a second copy.
The data order is a fixed function of the seed (`pairs.step_indices`), so a resumed run equals an uninterrupted one.

Guards (ipo_jax/train/guards.py): sizes are checked before anything is written; training pairs with chosen ==
rejected are counted (`pairs_identical` in the summary, and logged), and a set of nothing else is refused; a step with
a non-finite loss, gradients or weights, or a diverging loss (`train.divergence_factor`), raises `TrainingDiverged`
before its state is checkpointed; an unreadable latest checkpoint is reported and the run resumes from the newest
intact one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from ipo_jax import runtime, sharding
from ipo_jax.model import chat, transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.rundir import RunDir
from ipo_jax.train import checkpoint as checkpoint_lib, guards, loss as loss_lib, pairs as pairs_lib
from ipo_jax.train.metrics import CURVES_FILE, METRICS_FILE, MetricsLog, last_rows, plot_curves, read_metrics
from ipo_jax.train.optimizer import OptimSpec
from ipo_jax.train.steps import Settings, Steps, TrainState, build_steps

TASK = "dpo"
REFERENCE_FILE = "reference_logps.npz"
CHECKPOINT_DIR = "checkpoints"
NOT_IDENTITY = ("stop_after_steps", "divergence_factor", "divergence_warmup")  # train settings that change no result


def identity(config: Any, model: Mapping[str, Any], train_set: pairs_lib.PreferenceSet,
             eval_set: pairs_lib.PreferenceSet | None, reference: str = "policy") -> dict[str, Any]:
  """What a run's results depend on: the model (`model`, e.g. its path and dtype), the data settings and the
  fingerprints of the tokenized pairs, the dpo, lora, optim and train settings (the resolved compute dtype; not
  train.stop_after_steps, which only splits a run, nor the divergence guard's settings, which only stop one), the
  seed, and the reference (`policy` or `given`)."""
  section = lambda name: dict(config.get(name) or {})
  lora = section("lora") if int(section("lora").get("rank") or 0) else {"rank": 0}
  train = {k: v for k, v in section("train").items() if k not in NOT_IDENTITY}
  train["compute_dtype"] = Settings.from_config(config).compute_dtype
  return {"model": dict(model), "data": section("data"),
          "data_fingerprint": {"train": train_set.fingerprint(),
                               "eval": eval_set.fingerprint() if eval_set is not None else None},
          "dpo": section("dpo"), "lora": lora, "optim": section("optim"), "train": train,
          "seed": int(config.seed), "reference": reference}


@dataclasses.dataclass
class Job:
  """What a run holds fixed: settings, data, mesh, jitted steps, the base params and its run directory."""

  config: Any
  cfg: ModelConfig
  s: Settings
  mesh: jax.sharding.Mesh
  steps: Steps
  train_set: pairs_lib.PreferenceSet
  eval_set: pairs_lib.PreferenceSet | None
  pad_id: int
  micro: int  # pairs per micro-batch
  per_epoch: int  # optimizer steps per epoch
  total: int  # optimizer steps of the whole run
  base: transformer.Params  # the model's params (never modified)
  frozen: transformer.Params | None  # what the steps take as frozen params: the base (LoRA, on the fly) or None
  reference_params: transformer.Params | None
  run: RunDir | None
  identical: int = 0  # training pairs with chosen == rejected


@dataclasses.dataclass
class Progress:
  """Where a run is: the state, the steps it started and stopped at, reference log-probs, open writers, rows."""

  state: TrainState
  start: int
  ref: dict[str, np.ndarray]
  reference_s: float
  ckpt: checkpoint_lib.Checkpointer | None
  log: MetricsLog
  guard: guards.Guard
  stop: int = 0
  rows: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {"train": {}, "eval": {}})
  started: float = dataclasses.field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def as_set(pairs: Any, tokenizer: Any, data: Any, source: str) -> pairs_lib.PreferenceSet | None:
  """A tokenized set from a PreferenceSet (as is) or TRL-style rows (tokenized with `data`'s settings)."""
  if pairs is None or isinstance(pairs, pairs_lib.PreferenceSet):
    return pairs
  if tokenizer is None:
    raise ValueError("rows of text need a model with a tokenizer (or pass a tokenized PreferenceSet)")
  return pairs_lib.tokenize_rows(list(pairs), tokenizer, source=source, chat_template=data.chat_template,
                                 skip_invalid=data.skip_invalid)[0]


def check_batching(config: Any, num_pairs: int, mesh: jax.sharding.Mesh) -> tuple[int, int, int]:
  """(micro-batch size, steps per epoch, total steps), or a ValueError naming the setting."""
  t = config.train
  multiple = sharding.batch_multiple(mesh)
  if t.batch_size % t.grad_accum:
    raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum}")
  micro = t.batch_size // t.grad_accum
  if micro % multiple:
    raise ValueError(f"the micro-batch (train.batch_size / train.grad_accum = {micro}) must be a multiple of "
                     f"{multiple}, the data x fsdp mesh size")
  if config.eval.batch_size % multiple:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} must be a multiple of {multiple}")
  per_epoch = num_pairs // t.batch_size
  if per_epoch == 0:
    raise ValueError(f"{num_pairs} training pairs are fewer than train.batch_size={t.batch_size}")
  return micro, per_epoch, int(t.max_steps) or int(t.epochs) * per_epoch


def all_logps(fn: Any, pset: pairs_lib.PreferenceSet, job: Job) -> tuple[np.ndarray, np.ndarray]:
  """[N, 2] log-probs of every pair under `fn(batch)` (one pass in eval.batch_size batches, bucketed lengths)
  and [N, 2] response token counts."""
  logps, lengths = [], []
  shard = NamedSharding(job.mesh, P(sharding.BATCH))
  data = job.config.data
  for batch, count in pairs_lib.in_order(pset, job.config.eval.batch_size, max_length=data.max_length,
                                         max_prompt_length=data.max_prompt_length, pad_id=job.pad_id):
    with jax.set_mesh(job.mesh):
      out = fn({k: sharding.to_global(v, shard) for k, v in batch.items()})
    logps.append(np.asarray(out)[:count])
    lengths.append(batch["loss_mask"][:count, :, 1:].sum(-1))
  return np.concatenate(logps).astype(np.float32), np.concatenate(lengths).astype(np.float32)


def evaluate(job: Job, trainable: Any, ref: np.ndarray) -> dict[str, float]:
  """DPO metrics of the policy `trainable` over the whole held-out set (no dropout)."""
  logps, lengths = all_logps(functools.partial(job.steps.policy_logps, trainable, job.frozen), job.eval_set, job)
  s = job.s
  _, metrics = loss_lib.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=s.beta, loss_type=s.loss_type,
                                 label_smoothing=s.label_smoothing, chosen_lengths=lengths[:, 0],
                                 rejected_lengths=lengths[:, 1])
  return {k: float(v) for k, v in metrics.items()}


def _reference_fn(job: Job) -> tuple[Any, Any]:
  """(weights, batch -> [B, 2] log-probs) of the reference: `reference_params`, else the initial policy (the LoRA
  base; for full fine-tuning the base weights, which the fp32 trainable copy equals in the compute dtype)."""
  weights = job.reference_params if job.reference_params is not None else job.base
  if job.s.lora is not None:
    return weights, functools.partial(job.steps.base_logps, weights)
  return weights, functools.partial(job.steps.policy_logps, weights, None)


def reference_logps(job: Job) -> dict[str, np.ndarray]:
  """Stage "reference": log-probs [N, 2] of each set that needs them (train when precomputed, eval), kept in
  reference_logps.npz and reused while its key (data, weights, lengths) matches."""
  sets = {"eval": job.eval_set} if job.eval_set is not None else {}
  if job.s.reference == "precomputed":
    sets = {"train": job.train_set, **sets}
  if not sets:
    return {}
  weights, fn = _reference_fn(job)
  data = job.config.data
  with jax.set_mesh(job.mesh):
    weights_sum = float(job.steps.checksum(weights))
  key = json.dumps({name: pset.fingerprint() for name, pset in sets.items()} | {
      "weights": weights_sum, "dtype": job.s.compute_dtype, "lora": job.s.lora is not None,
      "max_length": data.max_length, "max_prompt_length": data.max_prompt_length})
  path = job.run.file(REFERENCE_FILE) if job.run else None
  if path and job.run.done("reference") and os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["key"]) == key:
        return {name: cached[name] for name in sets}
  out = {name: all_logps(fn, pset, job)[0] for name, pset in sets.items()}
  if path:
    if runtime.is_main_process():
      tmp = path + ".tmp.npz"
      np.savez(tmp, key=np.asarray(key), **out)
      os.replace(tmp, path)
    job.run.finish_stage("reference", file=REFERENCE_FILE, sets={k: len(v) for k, v in out.items()})
  return out


def _train_batch(job: Job, step: int, ref_train: np.ndarray | None) -> tuple[dict[str, jax.Array], int]:
  """The global [grad_accum, micro, ...] batch of optimizer step `step` and its count of real tokens."""
  t, data = job.config.train, job.config.data
  idx, _ = pairs_lib.step_indices(len(job.train_set), t.batch_size, int(job.config.seed), step)
  batch = pairs_lib.collate(job.train_set, idx, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                            pad_id=job.pad_id)
  tokens = int(batch["attention_mask"].sum())
  if ref_train is not None:
    batch["ref_logps"] = ref_train[idx]
  accum_shard = NamedSharding(job.mesh, P(None, sharding.BATCH))
  return {k: sharding.to_global(v.reshape((t.grad_accum, job.micro) + v.shape[1:]), accum_shard)
          for k, v in batch.items()}, tokens


def _checkpoint_meta(job: Job, step: int) -> dict[str, Any]:
  epoch, k = divmod(step, job.per_epoch)
  return {"step": step, "epoch": epoch, "batch_in_epoch": k, "pairs_seen": step * job.config.train.batch_size,
          "data_fingerprint": job.train_set.fingerprint(), "total_steps": job.total, "seed": int(job.config.seed)}


# ---------------------------------------------------------------------------------------------------------------
# The four phases


def init(model: Any, pairs: Any, config: Any, *, eval_pairs: Any = None, reference_params: Any = None,
         run: RunDir | None = None) -> Job:
  """Settings, data, batching and the run directory (checked before anything is written), then the steps."""
  guards.check_settings(config)
  mesh = getattr(model, "mesh", None) or runtime.mesh_from_config(config)
  s = Settings.from_config(config)
  if reference_params is not None and s.reference != "precomputed":
    raise ValueError("reference_params needs dpo.reference='precomputed'")
  tokenizer = getattr(model, "tokenizer", None)
  train_set = as_set(pairs, tokenizer, config.data, "train pairs")
  eval_set = as_set(eval_pairs, tokenizer, config.data, "eval pairs")
  micro, per_epoch, total = check_batching(config, len(train_set), mesh)
  identical = guards.check_pairs(train_set, config.data)
  if identical:
    runtime.log(f"warning: {identical} of {len(train_set)} training pairs ({train_set.source}) have chosen == "
                "rejected and carry no preference (summary: pairs_identical)")
  opt = OptimSpec.from_config(config.optim, total)
  if run is None and config.get("output_dir"):
    reference = "given" if reference_params is not None else "policy"
    run = RunDir.open(config.output_dir, TASK, identity(config, {"name": getattr(model, "name", None)}, train_set,
                                                        eval_set, reference),
                      overwrite=bool(config.get("overwrite", False)))
  frozen = model.params if s.lora is not None or s.reference == "on_the_fly" else None
  steps = build_steps(model.config, s, opt, model.params, frozen is not None, mesh)
  return Job(config=config, cfg=model.config, s=s, mesh=mesh, steps=steps, train_set=train_set, eval_set=eval_set,
             pad_id=chat.pad_id(tokenizer), micro=micro, per_epoch=per_epoch, total=total, base=model.params,
             frozen=frozen, reference_params=reference_params, run=run, identical=identical)


def restore_or_init(job: Job) -> Progress:
  """The reference log-probs, then the state of the latest checkpoint in the run directory, else step 0."""
  t0 = time.time()
  ref = reference_logps(job)
  reference_s = time.time() - t0
  ckpt = None
  if job.run is not None and job.config.checkpoint.every > 0:
    ckpt = checkpoint_lib.Checkpointer(job.run.file(CHECKPOINT_DIR), every=job.config.checkpoint.every,
                                       keep=job.config.checkpoint.keep)
  abstract = checkpoint_lib.abstract_like(job.steps.state_shapes, job.steps.state_shardings)
  restored = ckpt.restore_latest(abstract, runtime.log) if ckpt is not None else None
  latest, history = None, []
  if restored is not None:
    latest, state, _ = restored
    runtime.log(f"resumed from step {latest} ({job.run.file(CHECKPOINT_DIR)})")
    history = [r["loss"] for r in read_metrics(job.run.file(METRICS_FILE))
               if r["split"] == "train" and r["step"] <= latest and "loss" in r]
  else:
    with jax.set_mesh(job.mesh):
      state = job.steps.init(job.base, jax.random.key_data(jax.random.key(int(job.config.seed))))
  log = MetricsLog(job.run.path if job.run else None, bool(job.config.log.tensorboard))
  guard = guards.Guard(job.config, history, checkpoints=ckpt.directory if ckpt is not None else "")
  guard.last_good = latest
  p = Progress(state=state, start=latest or 0, ref=ref, reference_s=reference_s, ckpt=ckpt, log=log, guard=guard)
  if latest is not None:
    p.rows = last_rows(job.run.file(METRICS_FILE), latest)
  return p


def _log_window(job: Job, p: Progress, done: int, window: list, tokens: int, tic: float) -> dict[str, Any]:
  """One train row: the mean of the window's step metrics, epoch, step time and throughput (the window began at
  `tic`; its steps have finished once their metrics are on the host)."""
  host = jax.device_get(window)
  elapsed = time.time() - tic
  avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  avg.update(epoch=done / job.per_epoch, step_time_s=elapsed / len(host), tokens_per_s=tokens / elapsed)
  return p.log.write("train", done, avg)


def _check_step(p: Progress, done: int, metrics: dict[str, Any]) -> None:
  """The guards on step `done`'s loss, gradient norm and weights (`weights_finite` leaves the metrics); when they
  stop the run, the checkpoints already saved are finished and nothing newer is written."""
  loss, grad_norm, finite = jax.device_get((metrics["loss"], metrics["grad_norm"], metrics.pop("weights_finite")))
  try:
    p.guard.check(done, float(loss), float(grad_norm), bool(finite))
  except guards.TrainingDiverged:
    if p.ckpt is not None:
      p.ckpt.close()
    p.log.close()
    raise


def fit(job: Job, p: Progress) -> Progress:
  """Optimizer steps from `p.start` to the end (or `train.stop_after_steps` later), with periodic metrics,
  evaluation and checkpoints; `p.state` and `p.rows` follow."""
  config = job.config
  stop_after = int(config.train.stop_after_steps)
  p.stop = min(job.total, p.start + stop_after) if stop_after else job.total
  bar = tqdm.tqdm(total=job.total, initial=p.start, desc="dpo",
                  disable=not (runtime.is_main_process() and config.log.tqdm))
  window, tokens, tic = [], 0, time.time()
  for step in range(p.start, p.stop):
    batch, n = _train_batch(job, step, p.ref.get("train"))
    with jax.set_mesh(job.mesh):
      p.state, metrics = job.steps.train(p.state, job.frozen, batch)
    done = step + 1
    _check_step(p, done, metrics)
    window.append(metrics)
    tokens += n
    if done % config.log.every == 0 or done == p.stop:
      p.rows["train"] = _log_window(job, p, done, window, tokens, tic)
      bar.set_postfix(loss=f"{p.rows['train']['loss']:.4f}", acc=f"{p.rows['train']['rewards/accuracies']:.2f}")
      window, tokens, tic = [], 0, time.time()
    if job.eval_set is not None and config.eval.every and done % config.eval.every == 0 and done != job.total:
      p.rows["eval"] = p.log.write("eval", done, evaluate(job, p.state.params, p.ref["eval"]))
    if p.ckpt is not None and p.ckpt.save(done, p.state, _checkpoint_meta(job, done), force=done == p.stop):
      p.guard.saved(done)
    bar.update(1)
  bar.close()
  return p


def finalize(job: Job, p: Progress) -> tuple[transformer.Params, dict[str, Any]]:
  """The final evaluation (when complete), curves, the policy params (LoRA merged, fp32) and the summary
  (summary.json; stage "train" once complete)."""
  complete = p.stop == job.total
  if job.eval_set is not None and complete:
    p.rows["eval"] = p.log.write("eval", job.total, evaluate(job, p.state.params, p.ref["eval"]))
  if p.ckpt is not None:
    p.ckpt.close()
  p.log.close()
  if job.run and job.config.log.plot and runtime.is_main_process() and os.path.exists(p.log.path or ""):
    plot_curves(p.log.path, job.run.file(CURVES_FILE))
  if job.s.lora is None:
    params = p.state.params
  else:
    with jax.set_mesh(job.mesh):
      params = job.steps.final(p.state.params, job.base)
  summary = {"complete": complete, "step": p.stop, "total_steps": job.total, "steps_per_epoch": job.per_epoch,
             "train_pairs": len(job.train_set), "pairs_identical": job.identical, "eval_pairs": len(job.eval_set) if job.eval_set is not None else 0,
             "reference_s": p.reference_s, "train_s": time.time() - p.started, "train": p.rows["train"],
             "eval": p.rows["eval"]}
  if job.run is not None:
    if complete:
      job.run.finish_stage("train", step=p.stop, total_steps=job.total)
    job.run.finish(summary)
  return params, summary


def train_dpo(model: Any, pairs: Any, config: Any, *, eval_pairs: Any = None, reference_params: Any = None,
              run: RunDir | None = None) -> tuple[transformer.Params, dict[str, Any]]:
  """Trains `model` with DPO on `pairs`; returns the final policy params (LoRA merged, fp32) and a summary.

  The reference is `model` itself unless `reference_params` (same architecture and mesh, e.g. the initial policy of
  a multi-round run) is given; that needs the precomputed reference. `config` is a configs/dpo.py ConfigDict
  (sections data, dpo, lora, optim, train, eval, checkpoint, log, plus output_dir, overwrite and seed). The outputs
  go to `run`, else to `config.output_dir` (see the module docstring). `model.params` is not modified.
  """
  job = init(model, pairs, config, eval_pairs=eval_pairs, reference_params=reference_params, run=run)
  return finalize(job, fit(job, restore_or_init(job)))
