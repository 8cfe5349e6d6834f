"""The trainer: `train(model, data, config, objective)` as init / restore-or-init / fit / finalize, for DPO
(`train_dpo`, objectives.DPO) and SFT (`train_sft`, objectives.SFT) alike.

Library use: `train_dpo(model, pairs, config, *, eval_pairs=None, reference_params=None, run=None)` and
`train_sft(model, examples, config, *, eval_examples=None, run=None)` -> (params, summary); `model` a
`loading.Model` (or anything with `config`, `params`, `mesh`, `tokenizer`, `name`), the data a tokenized set
(`pairs.PreferenceSet`, `sft.ExampleSet`) or rows of text. The outputs go to a run directory (ipo_jax/rundir.py):
`run`, one the caller opened (e.g. a self-improvement round's child), else `config.output_dir` opened here with
`identity(...)` (refused, before anything is written, when it holds a run of other settings); without either the
run keeps nothing on disk. In it: run.json, checkpoints/ (a rerun resumes from the latest), metrics.jsonl,
tensorboard/, curves.png, summary.json (stage "train" once complete), and DPO's reference_logps.npz (stage
"reference"). `run_task` is a task's whole run (tasks/dpo.py, tasks/sft.py): the above plus config.json and the
policy exported as a Hugging Face directory.

The objective (ipo_jax/train/objectives.py) decides the batches, the loss, the pass before the first step and the
held-out metrics; the rest is one code path. DPO's reference is the initial policy unless `reference_params` are
given: precomputed once over the data (default) or computed on the fly from frozen params; with LoRA it is the base
with adapters off, without a second copy. The data order is a fixed function of the seed (`pairs.step_indices`), so
a resumed run equals an uninterrupted one.

Guards (ipo_jax/train/guards.py): sizes are checked before anything is written; DPO's training pairs with chosen ==
rejected are counted (`pairs_identical` in the summary, and logged), and a set of nothing else is refused; a step
with a non-finite loss, gradients or weights, or a diverging loss (`train.divergence_factor`, above the objective's
floor), raises `TrainingDiverged` before its state is checkpointed; an unreadable latest checkpoint is reported and
the run resumes from the newest intact one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import tqdm

from ipo_jax import host_memory, runtime, sharding
from ipo_jax.model import chat, transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.rundir import RunDir
from ipo_jax.train import checkpoint as checkpoint_lib, guards, objectives, pairs as pairs_lib, steps as steps_lib
from ipo_jax.train.metrics import CURVES_FILE, METRICS_FILE, MetricsLog, last_rows, plot_curves, read_metrics
from ipo_jax.train.objectives import REFERENCE_FILE  # pylint: disable=unused-import  # DPO's, named here too
from ipo_jax.train.optimizer import OptimSpec
from ipo_jax.train.steps import Settings, Steps, TrainState, all_finite, build_steps

DPO, SFT = objectives.DPO(), objectives.SFT()
TASK = DPO.task  # the task of a DPO run directory
CHECKPOINT_DIR = "checkpoints"
NOT_IDENTITY = ("stop_after_steps", "divergence_factor", "divergence_warmup")  # train settings that change no result


def identity(config: Any, model: Mapping[str, Any], train_set: Any, eval_set: Any, reference: str | None = "policy",
             objective: Any = DPO) -> dict[str, Any]:
  """What a run's results depend on: the model (`model`, e.g. its path and dtype), the data settings and the
  fingerprints of the tokenized sets, the objective's section (dpo, sft), the lora, optim and train settings (the
  resolved compute dtype; not train.stop_after_steps, which only splits a run, nor the divergence guard's settings,
  which only stop one), the seed, and DPO's reference (`policy` or `given`; None for SFT)."""
  section = lambda name: dict(config.get(name) or {})
  lora = section("lora") if int(section("lora").get("rank") or 0) else {"rank": 0}
  train = {k: v for k, v in section("train").items() if k not in NOT_IDENTITY}
  train["compute_dtype"] = objective.settings(config).compute_dtype
  out = {"model": dict(model), "data": section("data"),
         "data_fingerprint": {"train": train_set.fingerprint(),
                              "eval": eval_set.fingerprint() if eval_set is not None else None},
         objective.section: section(objective.section), "lora": lora, "optim": section("optim"), "train": train,
         "seed": int(config.seed)}
  if reference is not None:
    out["reference"] = reference
  return out


@dataclasses.dataclass
class Job:
  """What a run holds fixed: objective, settings, data, mesh, jitted steps, the base params and its run directory."""

  config: Any
  objective: Any  # objectives.DPO or objectives.SFT
  cfg: ModelConfig
  s: Settings
  mesh: jax.sharding.Mesh
  steps: Steps
  train_set: Any
  eval_set: Any
  pad_id: int
  micro: int  # rows per micro-batch
  per_epoch: int  # optimizer steps per epoch
  total: int  # optimizer steps of the whole run
  base: transformer.Params  # the model's params (never modified)
  frozen: transformer.Params | None  # what the steps take as frozen params: the base (LoRA, on the fly) or None
  reference_params: transformer.Params | None
  run: RunDir | None
  checked: dict[str, Any] = dataclasses.field(default_factory=dict)  # the objective's data checks (summary)
  release_base: bool = False  # the base params may be freed once the state holds its own copy (`init`)


@dataclasses.dataclass
class Progress:
  """Where a run is: the state, the steps it started and stopped at, what the objective prepared (DPO's reference
  log-probs), open writers, rows."""

  state: TrainState
  start: int
  prepared: dict[str, Any]
  prepared_s: float
  ckpt: checkpoint_lib.Checkpointer | None
  log: MetricsLog
  guard: guards.Guard
  stop: int = 0
  rows: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {"train": {}, "eval": {}})
  started: float = dataclasses.field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def check_batching(config: Any, num_rows: int, mesh: jax.sharding.Mesh, unit: str = "pairs") -> tuple[int, int, int]:
  """(micro-batch size, steps per epoch, total steps), or a ValueError naming the setting."""
  t = config.train
  multiple = sharding.batch_multiple(mesh)
  if t.batch_size % t.grad_accum:
    raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum}")
  micro = t.batch_size // t.grad_accum
  if config.eval.batch_size % multiple:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} must be a multiple of {multiple}")
  per_epoch = num_rows // t.batch_size
  if per_epoch == 0:
    raise ValueError(f"{num_rows} training {unit} are fewer than train.batch_size={t.batch_size}")
  return micro, per_epoch, int(t.max_steps) or int(t.epochs) * per_epoch


def load_splits(config: Any, tokenizer: Any, objective: Any = DPO) -> tuple[Any, Any]:
  """The training set of `config.data` and the held-out one (`eval_path`, else an `eval_fraction` split)."""
  d = config.data
  if not d.path:
    raise ValueError(f"data.path is required: a .jsonl/.parquet file of {objective.unit} or a hub dataset id")
  train_set, skipped = objective.load(d.path, tokenizer, d, split=d.split, limit=int(d.limit))
  if skipped:
    runtime.log(f"{d.path}: skipped {skipped} invalid rows")
  if d.eval_path:
    return train_set, objective.load(d.eval_path, tokenizer, d, split=d.eval_split)[0]
  return pairs_lib.split_train_eval(train_set, float(d.eval_fraction), int(config.seed))


def _train_batch(job: Job, step: int, prepared: dict[str, Any]) -> tuple[dict[str, jax.Array], int]:
  """The global [grad_accum, micro, ...] batch of optimizer step `step` and its count of real tokens."""
  t = job.config.train
  idx, _ = pairs_lib.step_indices(len(job.train_set), t.batch_size, int(job.config.seed), step)
  batch = job.objective.collate(job, job.train_set, idx)
  tokens = int(batch["attention_mask"].sum())
  job.objective.add_to_batch(job, batch, idx, prepared)
  multiple = sharding.batch_multiple(job.mesh)
  if job.micro % multiple:  # fewer (or other) rows than data x fsdp: the micro-batch splits over its sequence
    batch = steps_lib.pad_sequences(batch, multiple, job.pad_id)
  shapes = {k: (t.grad_accum, job.micro) + v.shape[1:] for k, v in batch.items()}
  places = steps_lib.batch_shardings(job.mesh, shapes)
  return {k: sharding.to_global(v.reshape(shapes[k]), places[k]) for k, v in batch.items()}, tokens


def _checkpoint_meta(job: Job, step: int) -> dict[str, Any]:
  epoch, k = divmod(step, job.per_epoch)
  return {"step": step, "epoch": epoch, "batch_in_epoch": k,
          f"{job.objective.unit}_seen": step * job.config.train.batch_size,
          "data_fingerprint": job.train_set.fingerprint(), "total_steps": job.total, "seed": int(job.config.seed)}


def _guard(job: Job, history: list[float], checkpoints: str) -> guards.Guard:
  """The run guards, with the objective's loss floor for the divergence check (`guards.Guard` computes DPO's)."""
  t = job.config.train
  view = ml_collections.ConfigDict({"train": {**t.to_dict(), "divergence_factor": 0.0}, "optim": job.config.optim})
  guard = guards.Guard(view, history, checkpoints=checkpoints)
  guard.factor = float(t.get("divergence_factor", 10.0))
  guard.floor = job.objective.floor(job.config) if guard.factor > 0 else 0.0
  return guard


# ---------------------------------------------------------------------------------------------------------------
# The four phases


def init(model: Any, data: Any, config: Any, objective: Any = DPO, *, eval_data: Any = None,
         reference_params: Any = None, run: RunDir | None = None, model_id: Mapping[str, Any] | None = None,
         release_base: bool = False) -> Job:
  """Settings, data, batching and the run directory (checked before anything is written), then the steps.
  `model_id`: the model in the run's identity (default: its name). `release_base`: the caller will not use
  `model.params` again; full fine-tuning with a precomputed reference then trains in their buffers (donated to the
  first state, or deleted on resume) instead of keeping them beside the trained copy."""
  guards.check_settings(config)
  host_memory.release_memory_after_compiles()  # the peak memory is the run's, not its compilations' leftovers
  mesh = getattr(model, "mesh", None) or runtime.mesh_from_config(config)
  s = objective.settings(config)
  if reference_params is not None and s.reference != "precomputed":
    raise ValueError("reference_params needs dpo.reference='precomputed'")
  tokenizer = getattr(model, "tokenizer", None)
  train_set = objective.for_training(objective.as_set(data, tokenizer, config.data, f"train {objective.unit}"), config)
  eval_set = objective.as_set(eval_data, tokenizer, config.data, f"eval {objective.unit}")
  micro, per_epoch, total = check_batching(config, len(train_set), mesh,
                                           "packed rows" if hasattr(train_set, "rows") else objective.unit)
  checked = objective.check(train_set, config)
  opt = OptimSpec.from_config(config.optim, total)
  if run is None and config.get("output_dir"):
    reference = None if not objective.has_reference else "given" if reference_params is not None else "policy"
    run = RunDir.open(config.output_dir, objective.task,
                      identity(config, model_id or {"name": getattr(model, "name", None)}, train_set, eval_set,
                               reference, objective), overwrite=bool(config.get("overwrite", False)))
  frozen = model.params if s.lora is not None or s.reference == "on_the_fly" else None
  steps = build_steps(model.config, s, opt, model.params, frozen is not None, mesh)
  return Job(config=config, objective=objective, cfg=model.config, s=s, mesh=mesh, steps=steps, train_set=train_set,
             eval_set=eval_set, pad_id=chat.pad_id(tokenizer), micro=micro, per_epoch=per_epoch, total=total,
             base=model.params, frozen=frozen, reference_params=reference_params, run=run, checked=checked,
             release_base=release_base and frozen is None)  # frozen: LoRA or the on-the-fly reference


def restore_or_init(job: Job) -> Progress:
  """The objective's preparation (DPO's reference log-probs), then the state of the latest checkpoint in the run
  directory, else step 0."""
  t0 = time.time()
  prepared = job.objective.prepare(job)
  prepared_s = time.time() - t0
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
    init_state = job.steps.init_donating if job.release_base else job.steps.init
    with jax.set_mesh(job.mesh):
      state = init_state(job.base, jax.random.key_data(jax.random.key(int(job.config.seed))))
  if job.release_base:  # the reference pass is done and nothing else reads the base: free it
    for x in jax.tree.leaves(job.base):
      if not x.is_deleted():
        x.delete()
    job.base = None
  log = MetricsLog(job.run.path if job.run else None, bool(job.config.log.tensorboard))
  if latest is None and prepared.get("eval_initial"):  # the held-out metrics before training (SFT)
    log.write("eval", 0, prepared["eval_initial"])
  guard = _guard(job, history, ckpt.directory if ckpt is not None else "")
  guard.last_good = latest
  p = Progress(state=state, start=latest or 0, prepared=prepared, prepared_s=prepared_s, ckpt=ckpt, log=log,
               guard=guard)
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
  bar = tqdm.tqdm(total=job.total, initial=p.start, desc=job.objective.task,
                  disable=not (runtime.is_main_process() and config.log.tqdm))
  window, tokens, tic = [], 0, time.time()
  for step in range(p.start, p.stop):
    batch, n = _train_batch(job, step, p.prepared)
    with jax.set_mesh(job.mesh):
      p.state, metrics = job.steps.train(p.state, job.frozen, batch)
    done = step + 1
    _check_step(p, done, metrics)
    window.append(metrics)
    tokens += n
    if done % config.log.every == 0 or done == p.stop:
      p.rows["train"] = _log_window(job, p, done, window, tokens, tic)
      bar.set_postfix({label: f"{p.rows['train'][k]:.4f}" for label, k in job.objective.postfix.items()})
      window, tokens, tic = [], 0, time.time()
    if job.eval_set is not None and config.eval.every and done % config.eval.every == 0 and done != job.total:
      p.rows["eval"] = p.log.write("eval", done, job.objective.evaluate(job, p.state.params, p.prepared))
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
    p.rows["eval"] = p.log.write("eval", job.total, job.objective.evaluate(job, p.state.params, p.prepared))
  if p.ckpt is not None:
    p.ckpt.close()
  p.log.close()
  if job.run and job.config.log.plot and runtime.is_main_process() and p.log.path and os.path.exists(p.log.path):
    plot_curves(p.log.path, job.run.file(CURVES_FILE))
  if job.s.lora is None:
    params = p.state.params
  else:
    with jax.set_mesh(job.mesh):
      params = job.steps.final(p.state.params, job.base)
  unit = job.objective.unit
  summary = {"complete": complete, "step": p.stop, "total_steps": job.total, "steps_per_epoch": job.per_epoch,
             f"train_{unit}": len(getattr(job.train_set, "examples", job.train_set)), **job.checked,
             f"eval_{unit}": len(job.eval_set) if job.eval_set is not None else 0,
             **job.objective.summary(p.prepared_s, p.prepared), "train_s": time.time() - p.started,
             "train": p.rows["train"], "eval": p.rows["eval"]}
  if job.run is not None:
    if complete:
      job.run.finish_stage("train", step=p.stop, total_steps=job.total)
    job.run.finish(summary)
  return params, summary


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def train(model: Any, data: Any, config: Any, objective: Any = DPO, *, eval_data: Any = None,
          reference_params: Any = None, run: RunDir | None = None, release_base: bool = False
          ) -> tuple[transformer.Params, dict[str, Any]]:
  """Trains `model` on `data` under `objective`; returns the final policy params (LoRA merged, fp32) and a
  summary. `model.params` is not modified, unless `release_base` (see `init`): then it may be freed."""
  job = init(model, data, config, objective, eval_data=eval_data, reference_params=reference_params, run=run,
             release_base=release_base)
  return finalize(job, fit(job, restore_or_init(job)))


def train_dpo(model: Any, pairs: Any, config: Any, *, eval_pairs: Any = None, reference_params: Any = None,
              run: RunDir | None = None, release_base: bool = False) -> tuple[transformer.Params, dict[str, Any]]:
  """Trains `model` with DPO on `pairs`; returns the final policy params (LoRA merged, fp32) and a summary.

  The reference is `model` itself unless `reference_params` (same architecture and mesh, e.g. the initial policy of
  a multi-round run) is given; that needs the precomputed reference. `config` is a configs/dpo.py ConfigDict
  (sections data, dpo, lora, optim, train, eval, checkpoint, log, plus output_dir, overwrite and seed). The outputs
  go to `run`, else to `config.output_dir` (see the module docstring).
  """
  return train(model, pairs, config, DPO, eval_data=eval_pairs, reference_params=reference_params, run=run,
               release_base=release_base)


def train_sft(model: Any, examples: Any, config: Any, *, eval_examples: Any = None, run: RunDir | None = None
              ) -> tuple[transformer.Params, dict[str, Any]]:
  """Fine-tunes `model` on (instruction, response) `examples` with the completion-only loss; `config` is a
  configs/sft.py ConfigDict (sections data, sft, lora, optim, train, eval, checkpoint, log, ...)."""
  return train(model, examples, config, SFT, eval_data=eval_examples, run=run)


def run_task(config: Any, objective: Any, model: Any = None, sets: tuple[Any, Any] | None = None
             ) -> dict[str, Any]:
  """A task's run (tasks/dpo.py, tasks/sft.py): the model (`model`, else `config.model` loaded on `config.mesh`)
  and the (train, held-out) `sets` (else `load_splits`), the run directory `config.output_dir` (identity: the
  model's path and dtype, see `identity`; refused before anything is written), config.json, training, and once
  complete the policy exported as a Hugging Face directory (`export.dir`, else <output_dir>/hf), never with a
  non-finite weight."""
  from ipo_jax.model import export  # pylint: disable=import-outside-toplevel
  if not config.get("output_dir"):
    raise ValueError(f"output_dir is required for task {objective.task}")
  guards.check_settings(config)
  own_model = model is None  # loaded here: its weights are the trainer's to free once trained in place
  model = model or runtime.load_model_from_config(config, runtime.mesh_from_config(config))
  train_set, eval_set = sets or load_splits(config, model.tokenizer, objective)
  model_id = {"path": config.model.path, "dtype": config.model.get("dtype", "float32")}
  job = init(model, train_set, config, objective, eval_data=eval_set, model_id=model_id, release_base=own_model)
  job.run.write_json("config.json", config.to_dict())
  runtime.log(f"{objective.task}: {model.name}, {len(train_set)} train / {len(eval_set) if eval_set else 0} eval "
              f"{objective.unit}, {'LoRA r=' + str(config.lora.rank) if config.lora.rank else 'full fine-tuning'}")
  params, summary = finalize(job, fit(job, restore_or_init(job)))
  if summary["complete"] and config.export.enabled:
    out = config.export.dir or job.run.file("hf")
    if not float(all_finite(params)):
      raise guards.TrainingDiverged(f"the trained policy has non-finite weights; not exported to {out}")
    summary["export_dir"] = export.export_hf(params, model.config, out, hf_config=model.hf_config,
                                             tokenizer=model.tokenizer, dtype=config.export.dtype)
    runtime.log(f"exported the policy to {out}")
  job.run.finish(summary)
  return summary
