"""DPO training: optax AdamW, a sharded jitted train step with gradient accumulation, LoRA or full fine-tuning,
orbax checkpoints with exact resumption, periodic evaluation, JSONL/TensorBoard metrics and curves.

Library use: `train_dpo(model, pairs, config) -> (params, summary)` with `model` a `loading.Model` (or anything with
`config`, `params`, `mesh`, `tokenizer`) and `pairs` a `preference_data.PreferenceSet` or TRL-style rows. CLI use:
`run(config)` for task `dpo` (see configs/dpo.py), which also exports the policy as a Hugging Face directory.

Dtype policy: trainable params (full weights or adapters) and the optimizer state are fp32; the forward runs in
`train.compute_dtype` ("auto": bfloat16 on accelerators, float32 on CPU). The reference is the initial policy:
precomputed once over the data (default; cached in the output directory and reused across epochs and restarts)
or computed on the fly from frozen params; with LoRA it is the base with adapters off, without a second copy.

Data order is a fixed function of the seed: epoch e visits the pairs in `np.random.default_rng([seed, e])` order,
`train.batch_size` pairs per optimizer step (the last partial batch of an epoch is dropped), so step s always sees
the same pairs and a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from ipo_jax import checkpoint as checkpoint_lib
from ipo_jax import dpo, lora as lora_lib, modeling, preference_data, runtime, sharding
from ipo_jax.config import ModelConfig
from ipo_jax.data import append_jsonl, iter_jsonl, write_json

METRICS_FILE = "metrics.jsonl"
REFERENCE_FILE = "reference_logps.npz"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static (compile-time) part of a DPO run."""

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  reference: str = "precomputed"  # precomputed | on_the_fly
  compute_dtype: str = "float32"
  remat: bool = False
  vocab_chunk: int = 8192
  lora: lora_lib.LoraConfig | None = None

  @classmethod
  def from_config(cls, config: Any) -> "Settings":
    d, t = config.dpo, config.train
    if d.reference not in ("precomputed", "on_the_fly"):
      raise ValueError(f"dpo.reference must be 'precomputed' or 'on_the_fly', got {d.reference!r}")
    if d.loss_type not in dpo.LOSS_TYPES:
      raise ValueError(f"dpo.loss_type {d.loss_type!r} is not one of {dpo.LOSS_TYPES}")
    return cls(beta=float(d.beta), loss_type=d.loss_type, label_smoothing=float(d.label_smoothing),
               reference=d.reference, compute_dtype=resolve_compute_dtype(t.compute_dtype), remat=bool(t.remat),
               vocab_chunk=int(t.vocab_chunk), lora=lora_lib.config_from(config.get("lora")))


def resolve_compute_dtype(name: str) -> str:
  """"auto" is bfloat16 on accelerators and float32 on CPU."""
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype must be auto, float32 or bfloat16, got {name!r}")
  return name


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_ratio` of the steps, then cosine or linear decay to zero (HF/TRL semantics)."""
  warmup = int(math.ceil(optim.warmup_ratio * total_steps))
  peak = float(optim.learning_rate)
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  elif optim.schedule == "linear":
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {optim.schedule!r}")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: everything but norms and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not sharding.path_str(p).endswith(("norm", "bias")), params)


def make_optimizer(optim: Any, total_steps: int, params: Any) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(float(optim.max_grad_norm)) if optim.max_grad_norm else optax.identity(),
      optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask(params)))


# ---------------------------------------------------------------------------------------------------------------
# Loss and steps


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def policy_params(trainable: Any, frozen: Any, s: Settings, dropout_key: jax.Array | None = None) -> Any:
  """The params the policy forward uses, in the compute dtype; with LoRA, `trainable=None` is the bare base."""
  dtype = jnp.dtype(s.compute_dtype)
  if s.lora is None:
    return _cast(trainable, dtype)
  base = _cast(frozen, dtype)
  return base if trainable is None else lora_lib.merge(base, trainable, s.lora, dropout_key)


def loss_fn(trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array, *, s: Settings,
            cfg: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DPO loss of one micro-batch of pairs."""
  logps = dpo.pair_logps(policy_params(trainable, frozen, s, key), cfg, batch, vocab_chunk=s.vocab_chunk,
                         remat=s.remat)
  if "ref_logps" in batch:
    ref = batch["ref_logps"]
  else:  # on the fly: the base (LoRA) or the frozen initial policy
    ref_params = policy_params(None, frozen, s) if s.lora else _cast(frozen, jnp.dtype(s.compute_dtype))
    ref = jax.lax.stop_gradient(dpo.pair_logps(ref_params, cfg, batch, vocab_chunk=s.vocab_chunk))
  lengths = dpo.response_lengths(batch)
  return dpo.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=s.beta, loss_type=s.loss_type,
                      label_smoothing=s.label_smoothing, chosen_lengths=lengths[:, 0],
                      rejected_lengths=lengths[:, 1])


def train_step(state: dict[str, Any], frozen: Any, batch: dict[str, jax.Array], *, tx: optax.GradientTransformation,
               schedule: optax.Schedule, s: Settings, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
  """One optimizer step over `batch` [accum, micro, ...]: gradients averaged over the micro-batches."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, s=s, cfg=cfg), has_aux=True)

  def micro_grads(mb, i):
    (_, m), g = grad_fn(state["params"], frozen, mb, jax.random.fold_in(step_key, i))
    return g, m

  accum = jax.tree.leaves(batch)[0].shape[0]
  if accum == 1:  # no accumulation buffer
    grads, metrics = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
  else:
    def micro(carry, xs):
      return jax.tree.map(jnp.add, carry, micro_grads(*xs)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(micro_grads, jax.tree.map(lambda x: x[0], batch), 0))
    (grads, metrics), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: m / accum, metrics)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
  return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def logps_step(trainable: Any, frozen: Any, batch: dict[str, jax.Array], *, s: Settings, cfg: ModelConfig
               ) -> jax.Array:
  """[B, 2] log-probs of the policy (`trainable`, `frozen`) without dropout; `trainable=None` with LoRA is the base."""
  return dpo.pair_logps(policy_params(trainable, frozen, s), cfg, batch, vocab_chunk=s.vocab_chunk)


class Steps(NamedTuple):
  train: Any  # (state, frozen, batch [A, B, ...]) -> (state, metrics)
  policy_logps: Any  # (trainable, frozen, batch [B, ...]) -> [B, 2]
  base_logps: Any  # LoRA only: (frozen, batch) -> [B, 2] with adapters off
  state_shardings: Any


def compile_steps(cfg: ModelConfig, s: Settings, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  state_shapes: Any, frozen: Any, mesh: jax.sharding.Mesh) -> Steps:
  """The jitted steps with explicit shardings: params by `PARTITION_RULES`, optimizer state like its params,
  batches split over BATCH, metrics and log-probs replicated."""
  param_shards = sharding.param_shardings(state_shapes["params"], mesh)
  rep = sharding.replicated(mesh)
  state_shards = {
      "step": rep, "rng": rep, "params": param_shards,
      "opt_state": optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, state_shapes["opt_state"], param_shards,
                                                    transform_non_params=lambda _: rep),
  }
  frozen_shards = None if frozen is None else sharding.param_shardings(frozen, mesh)
  batch_shards = NamedSharding(mesh, P(sharding.BATCH))
  train = jax.jit(functools.partial(train_step, tx=tx, schedule=schedule, s=s, cfg=cfg),
                  in_shardings=(state_shards, frozen_shards, NamedSharding(mesh, P(None, sharding.BATCH))),
                  out_shardings=(state_shards, rep), donate_argnums=(0,))
  policy = jax.jit(functools.partial(logps_step, s=s, cfg=cfg),
                   in_shardings=(param_shards, frozen_shards, batch_shards), out_shardings=rep)
  base = None
  if s.lora is not None:
    base = jax.jit(lambda frozen, batch: logps_step(None, frozen, batch, s=s, cfg=cfg),
                   in_shardings=(frozen_shards, batch_shards), out_shardings=rep)
  return Steps(train, policy, base, state_shards)


# ---------------------------------------------------------------------------------------------------------------
# Data


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def step_indices(num_pairs: int, batch_size: int, seed: int, step: int) -> tuple[np.ndarray, int]:
  """The pairs of optimizer step `step` (0-based) and its epoch."""
  per_epoch = num_pairs // batch_size
  epoch, k = divmod(step, per_epoch)
  return epoch_order(num_pairs, seed, epoch)[k * batch_size:(k + 1) * batch_size], epoch


def split_train_eval(pset: preference_data.PreferenceSet, fraction: float, seed: int
                     ) -> tuple[preference_data.PreferenceSet, preference_data.PreferenceSet | None]:
  """A held-out `fraction` of the pairs, drawn with the seed."""
  if fraction <= 0:
    return pset, None
  order = np.random.default_rng([seed, 1 << 20]).permutation(len(pset))
  n_eval = max(1, int(round(fraction * len(pset))))
  if n_eval >= len(pset):
    raise ValueError(f"data.eval_fraction={fraction} leaves no training pairs out of {len(pset)}")
  return pset.subset(np.sort(order[n_eval:])), pset.subset(np.sort(order[:n_eval]))


def _batches(pset: preference_data.PreferenceSet, batch_size: int, data: Any, pad_id: int):
  """Every pair once in order, in [batch_size] batches (the last one filled with pair 0); yields (batch, count)."""
  for start in range(0, len(pset), batch_size):
    idx = list(range(start, min(start + batch_size, len(pset))))
    count = len(idx)
    idx += [0] * (batch_size - count)
    yield preference_data.collate(pset, idx, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                                  pad_id=pad_id), count


def all_logps(fn: Any, pset: preference_data.PreferenceSet, batch_size: int, data: Any, pad_id: int,
              mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """[N, 2] log-probs of every pair under `fn(batch)` (one pass, fixed batch size, bucketed lengths) and [N, 2]
  response token counts."""
  logps, lengths = [], []
  shard = NamedSharding(mesh, P(sharding.BATCH))
  for batch, count in _batches(pset, batch_size, data, pad_id):
    with jax.set_mesh(mesh):
      out = fn({k: sharding.to_global(v, shard) for k, v in batch.items()})
    logps.append(np.asarray(out)[:count])
    lengths.append(batch["loss_mask"][:count, :, 1:].sum(-1))
  return np.concatenate(logps).astype(np.float32), np.concatenate(lengths).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
  """Metrics rows to `metrics.jsonl` (fsynced) and TensorBoard, on process 0."""

  def __init__(self, output_dir: str | None, tensorboard: bool):
    self.path = os.path.join(output_dir, METRICS_FILE) if output_dir and runtime.is_main_process() else None
    self._writer = None
    if self.path and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

  def write(self, split: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self.path:
      append_jsonl(self.path, [row])
    if self._writer:
      for k, v in metrics.items():
        self._writer.add_scalar(f"{split}/{k}", float(v), int(step))
      self._writer.flush()
    return row

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics file; for a (split, step) written twice (a resumed run) the last one wins."""
  rows = {(r["split"], r["step"]): r for r in iter_jsonl(path)}
  return sorted(rows.values(), key=lambda r: (r["split"], r["step"]))


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Loss, reward accuracy, reward margin and learning rate against the step, train and eval."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = read_metrics(metrics_path)
  keys = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
  for ax, key in zip(axes, keys):
    for split, style in (("train", "-"), ("eval", "o-")):
      pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
      if pts:
        ax.plot(*zip(*pts), style, label=split, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Training


def _as_set(pairs: Any, tokenizer: Any, data: Any, source: str) -> preference_data.PreferenceSet | None:
  if pairs is None or isinstance(pairs, preference_data.PreferenceSet):
    return pairs
  if tokenizer is None:
    raise ValueError("rows of text need a model with a tokenizer (or pass a tokenized PreferenceSet)")
  return preference_data.tokenize_rows(list(pairs), tokenizer, source=source, chat_template=data.chat_template,
                                       skip_invalid=data.skip_invalid)[0]


def _checksum(params: Any) -> float:
  """A cheap fingerprint of the initial weights (keys the reference cache)."""
  return float(jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)))(params))


def _reference(steps: Steps, state: dict[str, Any], frozen: Any, s: Settings, sets: dict[str, Any],
               config: Any, mesh: jax.sharding.Mesh, pad_id: int, reference_params: Any = None
               ) -> dict[str, np.ndarray]:
  """Reference log-probs [N, 2] of each set, loaded from the output directory when the cache matches.

  The reference is `reference_params` when given (e.g. an earlier policy), else the initial policy.
  """
  if reference_params is not None:
    weights = reference_params
    fn = (functools.partial(steps.base_logps, reference_params) if s.lora is not None
          else functools.partial(steps.policy_logps, reference_params, None))
  elif s.lora is not None:
    weights = frozen
    fn = functools.partial(steps.base_logps, frozen)
  else:  # the initial policy: the trainable params before any step, or the frozen copy kept for on-the-fly
    weights = frozen if frozen is not None else state["params"]
    fn = functools.partial(steps.policy_logps, weights, None)
  data = config.data
  key = json.dumps({name: pset.fingerprint() for name, pset in sets.items()} | {
      "weights": _checksum(weights), "dtype": s.compute_dtype,
      "lora": s.lora is not None, "max_length": data.max_length, "max_prompt_length": data.max_prompt_length})
  path = os.path.join(config.output_dir, REFERENCE_FILE) if config.get("output_dir") else None
  if path and os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["key"]) == key:
        return {name: cached[name] for name in sets}
  out = {name: all_logps(fn, pset, config.eval.batch_size, data, pad_id, mesh)[0] for name, pset in sets.items()}
  if path and runtime.is_main_process():
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=np.asarray(key), **out)
    os.replace(tmp, path)
  return out


def evaluate(steps: Steps, state: dict[str, Any], frozen: Any, s: Settings, eval_set: preference_data.PreferenceSet,
             ref: np.ndarray, config: Any, mesh: jax.sharding.Mesh, pad_id: int) -> dict[str, float]:
  """DPO metrics over the whole held-out set (no dropout)."""
  logps, lengths = all_logps(functools.partial(steps.policy_logps, state["params"], frozen), eval_set,
                             config.eval.batch_size, config.data, pad_id, mesh)
  _, metrics = dpo.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=s.beta, loss_type=s.loss_type,
                            label_smoothing=s.label_smoothing, chosen_lengths=lengths[:, 0],
                            rejected_lengths=lengths[:, 1])
  return {k: float(v) for k, v in metrics.items()}


def init_state(params: Any, *, tx: optax.GradientTransformation, key: jax.Array) -> dict[str, Any]:
  """The train state: step, RNG key data (dropout keys are folded from it per step), params, optimizer state."""
  return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(key), "params": params,
          "opt_state": tx.init(params)}


def _spec(tree: Any) -> Any:
  """A hashable description (structure, shapes, dtypes) of a pytree of arrays."""
  if tree is None:
    return None
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ModelConfig, s: Settings, optim_items: tuple, total: int, trainable_spec: Any, frozen_spec: Any,
              mesh: jax.sharding.Mesh) -> tuple[optax.GradientTransformation, Steps, Any]:
  """Optimizer, jitted steps and state shapes, cached: repeated runs with the same settings and number of steps
  compile once."""
  unspec = lambda spec: None if spec is None else jax.tree.unflatten(
      spec[0], [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in spec[1]])
  trainable, frozen = unspec(trainable_spec), unspec(frozen_spec)
  optim = types.SimpleNamespace(**dict(optim_items))
  tx, schedule = make_optimizer(optim, total, trainable), learning_rate_schedule(optim, total)
  state_shapes = jax.eval_shape(functools.partial(init_state, tx=tx, key=jax.random.key(0)), trainable)
  return tx, compile_steps(cfg, s, tx, schedule, state_shapes, frozen, mesh), state_shapes


def _pad_id(tokenizer: Any) -> int:
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if isinstance(value, int):
      return value
  return 0


def _check_batching(config: Any, num_pairs: int, mesh: jax.sharding.Mesh) -> tuple[int, int, int]:
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


def train_dpo(model: Any, pairs: Any, config: Any, *, eval_pairs: Any = None,
              reference_params: Any = None) -> tuple[modeling.Params, dict]:
  """Trains `model` with DPO on `pairs`; returns the final policy params (LoRA merged, fp32) and a summary.

  The reference is `model` itself unless `reference_params` (same architecture and mesh, e.g. the initial policy of
  a multi-round run) is given; that needs the precomputed reference.

  `config` is a configs/dpo.py ConfigDict (sections data, dpo, lora, optim, train, eval, checkpoint, log, plus
  output_dir and seed). With an `output_dir`, the run writes metrics, checkpoints and curves there and resumes
  from its latest checkpoint. `model.params` is not modified.
  """
  cfg: ModelConfig = model.config
  mesh = getattr(model, "mesh", None) or runtime.mesh_from_config(config)
  s = Settings.from_config(config)
  if reference_params is not None and s.reference != "precomputed":
    raise ValueError("reference_params needs dpo.reference='precomputed'")
  data, t = config.data, config.train
  tokenizer = getattr(model, "tokenizer", None)
  train_set = _as_set(pairs, tokenizer, data, "train pairs")
  eval_set = _as_set(eval_pairs, tokenizer, data, "eval pairs")
  pad_id = _pad_id(tokenizer)
  micro, per_epoch, total = _check_batching(config, len(train_set), mesh)
  out_dir = config.get("output_dir") or None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  key = jax.random.key(int(config.seed))

  base = model.params
  with jax.set_mesh(mesh):
    if s.lora is not None:
      shards = sharding.param_shardings(lora_lib.adapter_shapes(base, s.lora), mesh)
      trainable = jax.jit(lambda b, k: lora_lib.init_adapters(b, s.lora, k), out_shardings=shards)(
          base, jax.random.fold_in(key, 1))
      frozen = base
    else:
      trainable = jax.jit(lambda b: _cast(b, jnp.float32), out_shardings=sharding.param_shardings(base, mesh))(base)
      frozen = base if s.reference == "on_the_fly" else None
  tx, steps, state_shapes = _compiled(cfg, s, tuple(sorted(config.optim.items())), total, _spec(trainable),
                                      _spec(frozen), mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(functools.partial(init_state, tx=tx, key=key), out_shardings=steps.state_shardings,
                    donate_argnums=0)(trainable)
  del trainable

  sets = {"eval": eval_set} if eval_set is not None else {}
  if s.reference == "precomputed":
    sets = {"train": train_set, **sets}
  t0 = time.time()
  ref = _reference(steps, state, frozen, s, sets, config, mesh, pad_id, reference_params) if sets else {}
  reference_s = time.time() - t0

  ckpt, start = None, 0
  if out_dir and config.checkpoint.every > 0:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), every=config.checkpoint.every,
                                       keep=config.checkpoint.keep)
    latest = ckpt.latest_step()
    if latest is not None:
      state, meta = ckpt.restore(latest, checkpoint_lib.abstract_like(state_shapes, steps.state_shardings))
      if meta["data_fingerprint"] != train_set.fingerprint() or meta["total_steps"] != total:
        raise ValueError(f"{out_dir}: the checkpoint at step {latest} belongs to other data or another schedule "
                         "(data fingerprint or total steps differ); use a new output_dir")
      start = latest
      runtime.log(f"resumed from step {latest} ({out_dir}/checkpoints)")

  log = MetricsLog(out_dir, bool(config.log.tensorboard))
  bar = tqdm.tqdm(total=total, initial=start, desc="dpo",
                  disable=not (runtime.is_main_process() and config.log.tqdm))
  stop = min(total, start + int(t.stop_after_steps)) if t.stop_after_steps else total
  accum_shard = NamedSharding(mesh, P(None, sharding.BATCH))
  window, tokens, tic, train_row, eval_row = [], 0, time.time(), {}, {}
  run_start = time.time()

  def run_eval(step: int) -> dict[str, Any]:
    metrics = evaluate(steps, state, frozen, s, eval_set, ref["eval"], config, mesh, pad_id)
    return log.write("eval", step, metrics)

  def meta(step: int) -> dict[str, Any]:
    epoch, k = divmod(step, per_epoch)
    return {"step": step, "epoch": epoch, "batch_in_epoch": k, "pairs_seen": step * t.batch_size,
            "data_fingerprint": train_set.fingerprint(), "total_steps": total, "seed": int(config.seed)}

  for step in range(start, stop):
    idx, epoch = step_indices(len(train_set), t.batch_size, int(config.seed), step)
    batch = preference_data.collate(train_set, idx, max_length=data.max_length,
                                    max_prompt_length=data.max_prompt_length, pad_id=pad_id)
    tokens += int(batch["attention_mask"].sum())
    if "train" in ref:
      batch["ref_logps"] = ref["train"][idx]
    batch = {k: v.reshape((t.grad_accum, micro) + v.shape[1:]) for k, v in batch.items()}
    with jax.set_mesh(mesh):
      state, metrics = steps.train(state, frozen, {k: sharding.to_global(v, accum_shard) for k, v in batch.items()})
    window.append(metrics)
    done = step + 1
    if done % config.log.every == 0 or done == stop:
      host = jax.device_get(window)
      elapsed = time.time() - tic
      avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      avg.update(epoch=done / per_epoch, step_time_s=elapsed / len(host), tokens_per_s=tokens / elapsed)
      train_row = log.write("train", done, avg)
      bar.set_postfix(loss=f"{avg['loss']:.4f}", acc=f"{avg['rewards/accuracies']:.2f}")
      window, tokens, tic = [], 0, time.time()
    if eval_set is not None and config.eval.every and done % config.eval.every == 0 and done != total:
      eval_row = run_eval(done)
    if ckpt is not None:
      ckpt.save(done, state, meta(done), force=done == stop)
    bar.update(1)
  bar.close()
  complete = stop == total
  if eval_set is not None and complete:
    eval_row = run_eval(total)
  if ckpt is not None:
    ckpt.close()
  log.close()
  if out_dir and config.log.plot and runtime.is_main_process() and os.path.exists(log.path or ""):
    plot_curves(log.path, os.path.join(out_dir, "curves.png"))

  with jax.set_mesh(mesh):
    if s.lora is not None:
      params = jax.jit(lambda a, b: lora_lib.merge(_cast(b, jnp.float32), a, s.lora),
                       out_shardings=sharding.param_shardings(base, mesh))(state["params"], base)
    else:
      params = state["params"]
  summary = {"complete": complete, "step": stop, "total_steps": total, "steps_per_epoch": per_epoch,
             "train_pairs": len(train_set), "eval_pairs": len(eval_set) if eval_set is not None else 0,
             "reference_s": reference_s, "train_s": time.time() - run_start, "train": train_row, "eval": eval_row}
  return params, summary


def load_splits(config: Any, tokenizer: Any) -> tuple[preference_data.PreferenceSet,
                                                      preference_data.PreferenceSet | None]:
  """The training pairs of `config.data` and the held-out ones (`eval_path`, else an `eval_fraction` split)."""
  d = config.data
  if not d.path:
    raise ValueError("data.path is required: a preference .jsonl/.parquet file or a hub dataset id")
  kwargs = dict(chat_template=d.chat_template, skip_invalid=d.skip_invalid)
  pset, skipped = preference_data.load(d.path, tokenizer, split=d.split, name=d.get("name") or None,
                                       limit=d.limit, **kwargs)
  if skipped:
    runtime.log(f"{d.path}: skipped {skipped} invalid rows")
  if d.eval_path:
    eval_set, _ = preference_data.load(d.eval_path, tokenizer, split=d.eval_split, name=d.get("name") or None,
                                       **kwargs)
    return pset, eval_set
  return split_train_eval(pset, float(d.eval_fraction), int(config.seed))


def run(config: Any) -> dict[str, Any]:
  """Task `dpo`: load the model and pairs, train, and export the policy to `<output_dir>/hf`."""
  from ipo_jax import export  # pylint: disable=import-outside-toplevel
  if not config.get("output_dir"):
    raise ValueError("output_dir is required for task dpo")
  os.makedirs(config.output_dir, exist_ok=True)
  if runtime.is_main_process():
    write_json(os.path.join(config.output_dir, "config.json"), config.to_dict())
  mesh = runtime.mesh_from_config(config)
  model = runtime.load_model_from_config(config, mesh)
  train_set, eval_set = load_splits(config, model.tokenizer)
  runtime.log(f"dpo: {model.name}, {len(train_set)} train / {len(eval_set) if eval_set else 0} eval pairs, "
              f"{'LoRA r=' + str(config.lora.rank) if config.lora.rank else 'full fine-tuning'}")
  params, summary = train_dpo(model, train_set, config, eval_pairs=eval_set)
  if summary["complete"] and config.export.enabled:
    out = config.export.dir or os.path.join(config.output_dir, "hf")
    summary["export_dir"] = export.export_hf(params, model.config, out, hf_config=model.hf_config,
                                             tokenizer=model.tokenizer, dtype=config.export.dtype)
    runtime.log(f"exported the policy to {out}")
  if runtime.is_main_process():
    write_json(os.path.join(config.output_dir, "summary.json"), summary)
  return summary
