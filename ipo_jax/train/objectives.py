"""What a training run optimises: the objective handed to the one trainer (ipo_jax/train/loop.py).

An objective holds what differs between DPO and SFT: its step settings, how rows become a tokenized set, the rows
of a batch and what a step's batch carries besides them, the pass before the first step (DPO's reference log-probs;
SFT's held-out loss of the initial model), the held-out metrics, its identity section, the guard's loss floor and
its summary fields. Everything else (the jitted steps, data order, checkpoints and resume, metrics, guards, the
final params) is the trainer's, the same for both.

Methods take the trainer's `Job` (config, mesh, steps, sets, pad id, run directory).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ipo_jax import runtime, sharding
from ipo_jax.train import guards, loss as loss_lib, pairs as pairs_lib, sft as sft_lib
from ipo_jax.train.steps import Settings

REFERENCE_FILE = "reference_logps.npz"


def all_logps(fn: Any, dataset: Any, job: Any) -> tuple[np.ndarray, np.ndarray]:
  """Log-probs of every row of `dataset` under `fn(batch)` (one pass in eval.batch_size batches, bucketed lengths;
  [N, 2] for pairs, [N] for examples) and the response token counts of the same shape."""
  logps, lengths = [], []
  shard = NamedSharding(job.mesh, P(sharding.BATCH))
  for batch, count in job.objective.in_order(job, dataset):
    with jax.set_mesh(job.mesh):
      out = fn({k: sharding.to_global(v, shard) for k, v in batch.items()})
    logps.append(np.asarray(out)[:count])
    lengths.append(np.asarray(loss_lib.response_lengths(batch))[:count])
  return np.concatenate(logps).astype(np.float32), np.concatenate(lengths).astype(np.float32)


def initial_policy(job: Any) -> tuple[Any, Any]:
  """(weights, batch -> log-probs) of the initial policy (the LoRA base; for full fine-tuning the base weights, which
  the fp32 trainable copy equals in the compute dtype), or of DPO's `job.reference_params` when given."""
  weights = job.reference_params if job.reference_params is not None else job.base
  if job.s.lora is not None:
    return weights, functools.partial(job.steps.base_logps, weights)
  return weights, functools.partial(job.steps.policy_logps, weights, None)


class Objective:
  """What both objectives share: reading rows of text into their tokenized set (`reader`: the data module)."""

  reader: Any

  def text_settings(self, data: Any) -> dict[str, Any]:
    """The `data` settings that decide how rows become tokens."""
    return {"chat_template": data.chat_template, "skip_invalid": data.skip_invalid}

  def as_set(self, rows: Any, tokenizer: Any, data: Any, source: str) -> Any:
    """A tokenized set as is, or rows of text tokenized with `data`'s settings (None stays None)."""
    if rows is None or hasattr(rows, "fingerprint"):  # a PreferenceSet, an ExampleSet
      return rows
    if tokenizer is None:
      raise ValueError("rows of text need a model with a tokenizer (or pass a tokenized set)")
    return self.reader.tokenize_rows(list(rows), tokenizer, source=source, **self.text_settings(data))[0]

  def for_training(self, train_set: Any, config: Any) -> Any:
    """The set the trainer steps over (the tokenized set itself; SFT may pack it)."""
    del config
    return train_set

  def load(self, path: str, tokenizer: Any, data: Any, *, split: str, limit: int = 0) -> tuple[Any, int]:
    """The tokenized set of a file, registered source or hub id and the number of rows skipped as invalid."""
    return self.reader.load(path, tokenizer, split=split, name=data.get("name") or None, limit=limit,
                          **self.text_settings(data))


class DPO(Objective):
  """Preference pairs (ipo_jax/train/pairs.py) and the DPO losses against a reference (ipo_jax/train/loss.py)."""

  task, unit, section = "dpo", "pairs", "dpo"
  postfix = {"loss": "loss", "acc": "rewards/accuracies"}  # progress-bar label: metric
  has_reference = True  # DPO's reference ("policy" or "given") is part of a run's identity

  reader = pairs_lib  # its tokenize_rows and load read TRL-style rows into a PreferenceSet

  def settings(self, config: Any) -> Settings:
    return Settings.from_config(config)

  def check(self, train_set: pairs_lib.PreferenceSet, config: Any) -> dict[str, Any]:
    """{"pairs_identical": n} (pairs with chosen == rejected, logged), or a DataError when every pair is so."""
    identical = guards.check_pairs(train_set, config.data)
    if identical:
      runtime.log(f"warning: {identical} of {len(train_set)} training pairs ({train_set.source}) have chosen == "
                  "rejected and carry no preference (summary: pairs_identical)")
    return {"pairs_identical": identical}

  def _shared_prompt(self, job: Any) -> bool:
    return bool(job.config.dpo.get("shared_prompt", True))

  def _layout(self, job: Any) -> Any:
    """`dpo.shared_prompt`: one row per pair, the prompt once (`pairs.collate_shared`); else [B, 2, T]."""
    return pairs_lib.collate_shared if self._shared_prompt(job) else pairs_lib.collate

  def collate(self, job: Any, dataset: pairs_lib.PreferenceSet, indices: Any) -> dict[str, np.ndarray]:
    d = job.config.data
    return self._layout(job)(dataset, indices, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                             pad_id=job.pad_id)

  def in_order(self, job: Any, dataset: pairs_lib.PreferenceSet):
    d = job.config.data
    return pairs_lib.in_order(dataset, job.config.eval.batch_size, max_length=d.max_length,
                              max_prompt_length=d.max_prompt_length, pad_id=job.pad_id, layout=self._layout(job))

  def add_to_batch(self, job: Any, batch: dict[str, np.ndarray], indices: Any, prepared: dict[str, Any]) -> None:
    if prepared.get("train") is not None:
      batch["ref_logps"] = prepared["train"][indices]

  def floor(self, config: Any) -> float:
    """The loss at zero margin (a policy equal to its reference)."""
    return guards.zero_margin_loss(config)

  def prepare(self, job: Any) -> dict[str, Any]:
    """Stage "reference": log-probs [N, 2] of each set that needs them (train when precomputed, eval), kept in
    reference_logps.npz and reused while its key (data, weights, lengths) matches."""
    sets = {"eval": job.eval_set} if job.eval_set is not None else {}
    if job.s.reference == "precomputed":
      sets = {"train": job.train_set, **sets}
    if not sets:
      return {}
    weights, fn = initial_policy(job)
    data = job.config.data
    with jax.set_mesh(job.mesh):
      weights_sum = float(job.steps.checksum(weights))
    key = json.dumps({name: pset.fingerprint() for name, pset in sets.items()} | {
        "weights": weights_sum, "dtype": job.s.compute_dtype, "lora": job.s.lora is not None,
        "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
        "shared_prompt": self._shared_prompt(job)})
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

  def evaluate(self, job: Any, trainable: Any, prepared: dict[str, Any]) -> dict[str, float]:
    """DPO metrics of the policy `trainable` over the whole held-out set (no dropout)."""
    logps, lengths = all_logps(functools.partial(job.steps.policy_logps, trainable, job.frozen), job.eval_set, job)
    ref, s = prepared["eval"], job.s
    _, metrics = loss_lib.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=s.beta,
                                   loss_type=s.loss_type, label_smoothing=s.label_smoothing,
                                   chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    return {k: float(v) for k, v in metrics.items()}

  def summary(self, prepared_s: float, prepared: dict[str, Any]) -> dict[str, Any]:
    return {"reference_s": prepared_s}


class SFT(Objective):
  """(instruction, response) examples (ipo_jax/train/sft.py) and the completion-only loss."""

  task, unit, section = "sft", "examples", "sft"
  postfix = {"loss": "loss"}
  has_reference = False

  reader = sft_lib  # its tokenize_rows and load read (instruction, response) rows into an ExampleSet

  def settings(self, config: Any) -> Settings:
    return Settings.for_sft(config)

  def text_settings(self, data: Any) -> dict[str, Any]:
    return {**super().text_settings(data), "columns": data.get("columns")}

  def for_training(self, train_set: sft_lib.ExampleSet, config: Any) -> Any:
    """With `sft.packing`, the examples packed into rows of data.max_length tokens (`sft.pack`): train.batch_size
    then counts packed rows."""
    if not (config.get("sft") or {}).get("packing", False) or isinstance(train_set, sft_lib.PackedSet):
      return train_set
    return sft_lib.pack(train_set, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length)

  def check(self, train_set: Any, config: Any) -> dict[str, Any]:
    """The packing's rows and fill (summary: packed_rows, packed_fill) when packed."""
    if not isinstance(train_set, sft_lib.PackedSet):
      return {}
    fill = train_set.fill()
    runtime.log(f"sft: {len(train_set.examples)} examples packed into {len(train_set)} rows of {train_set.length} "
                f"tokens ({fill:.0%} of the slots hold a token)")
    return {"packed_rows": len(train_set), "packed_fill": round(fill, 4)}

  def _completion_only(self, job: Any) -> bool:
    return bool((job.config.get("sft") or {}).get("completion_only", True))

  def collate(self, job: Any, dataset: Any, indices: Any) -> dict[str, np.ndarray]:
    if isinstance(dataset, sft_lib.PackedSet):
      return sft_lib.collate_packed(dataset, indices, pad_id=job.pad_id, completion_only=self._completion_only(job))
    d = job.config.data
    return sft_lib.collate(dataset, indices, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                           pad_id=job.pad_id, completion_only=self._completion_only(job))

  def in_order(self, job: Any, dataset: sft_lib.ExampleSet):
    d = job.config.data
    return sft_lib.in_order(dataset, job.config.eval.batch_size, max_length=d.max_length,
                            max_prompt_length=d.max_prompt_length, pad_id=job.pad_id,
                            completion_only=self._completion_only(job))

  def add_to_batch(self, job: Any, batch: dict[str, np.ndarray], indices: Any, prepared: dict[str, Any]) -> None:
    batch["weight"] = sft_lib.step_weights(batch, int(job.config.train.grad_accum))

  def floor(self, config: Any) -> float:
    """One nat per token: ten times that is a worse guess than uniform over 22,000 tokens."""
    return 1.0

  def prepare(self, job: Any) -> dict[str, Any]:
    """The held-out loss of the initial model (reported as `eval_initial`)."""
    if job.eval_set is None:
      return {}
    return {"eval_initial": sft_lib.mean_nll(*all_logps(initial_policy(job)[1], job.eval_set, job))}

  def evaluate(self, job: Any, trainable: Any, prepared: dict[str, Any]) -> dict[str, float]:
    """The token-mean loss and perplexity of the policy `trainable` over the whole held-out set."""
    fn = functools.partial(job.steps.policy_logps, trainable, job.frozen)
    return sft_lib.mean_nll(*all_logps(fn, job.eval_set, job))

  def summary(self, prepared_s: float, prepared: dict[str, Any]) -> dict[str, Any]:
    return {"eval_initial": prepared.get("eval_initial", {}), "eval_initial_s": prepared_s}
