"""The jitted steps of DPO training, with explicit shardings from the mesh.

Module-level step functions take every compile-time setting as a static argument (`Settings`, the `ModelConfig`,
the `OptimSpec`); `build_steps` jits them once per run with explicit in/out shardings (params by
`sharding.LOGICAL_RULES` over `model.params.logical_axes`, optimizer state like its params, batches split over BATCH, metrics and log-probs
replicated) and binds the static arguments.

Dtype policy: trainable params (full weights or adapters) and the optimizer state are fp32; the forward runs in
`Settings.compute_dtype`. With LoRA the reference is the base with the adapters off, without a second copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ipo_jax import sections, sharding
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig
from ipo_jax.train import loss as loss_lib, lora as lora_lib
from ipo_jax.train import sft as sft_lib
from ipo_jax.train.optimizer import OptimSpec, from_spec


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static (compile-time) part of a DPO run."""

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  reference: str = "precomputed"  # precomputed | on_the_fly
  compute_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "full"  # with remat: what each layer keeps (transformer.REMAT_POLICIES)
  vocab_chunk: int = 8192
  lora: lora_lib.LoraConfig | None = None
  objective: str = "dpo"  # dpo | sft: the loss `loss_fn` takes (SFT leaves the DPO fields unused)

  @classmethod
  def for_sft(cls, config: Any, platform: str | None = None) -> "Settings":
    """SFT's settings: the train and lora sections, objective "sft"."""
    t = config.train
    _check_offload(t, platform)
    return sections.from_section(cls, t, objective="sft", lora=lora_lib.config_from(config.get("lora")),
                                 compute_dtype=resolve_compute_dtype(t.compute_dtype, platform))

  @classmethod
  def from_config(cls, config: Any, platform: str | None = None) -> "Settings":
    """From the dpo, train and lora sections; `platform` (the mesh's) decides `compute_dtype="auto"`."""
    d, t = config.dpo, config.train
    if d.reference not in ("precomputed", "on_the_fly"):
      raise ValueError(f"dpo.reference must be 'precomputed' or 'on_the_fly', got {d.reference!r}")
    if d.loss_type not in loss_lib.LOSS_TYPES:
      raise ValueError(f"dpo.loss_type {d.loss_type!r} is not one of {loss_lib.LOSS_TYPES}")
    _check_offload(t, platform)
    return sections.from_section(cls, {**d, **t}, compute_dtype=resolve_compute_dtype(t.compute_dtype, platform),
                                 lora=lora_lib.config_from(config.get("lora")))

  def __post_init__(self):
    if self.remat_policy not in transformer.REMAT_POLICIES:
      raise ValueError(f"train.remat_policy {self.remat_policy!r} is not one of {tuple(transformer.REMAT_POLICIES)}")


def _check_offload(train: Any, platform: str | None) -> None:
  """Remat policy "offload" keeps activations in the host's memory, which a CPU mesh does not have apart."""
  if train.get("remat", False) and train.get("remat_policy", "full") == "offload":
    if (platform or sharding.platform()) == "cpu":
      raise ValueError("train.remat_policy='offload' keeps activations in host memory, for a TPU or GPU mesh; on "
                       "a CPU mesh use minimal or full")


def resolve_compute_dtype(name: str, platform: str | None = None) -> str:
  """"auto" is bfloat16 on accelerators and float32 on CPU; `platform` is the mesh's (default:
  `sharding.platform()`, the mesh set with `jax.set_mesh`, else the default device)."""
  if name == "auto":
    return "float32" if (platform or sharding.platform()) == "cpu" else "bfloat16"
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype must be auto, float32 or bfloat16, got {name!r}")
  return name


@flax.struct.dataclass
class TrainState:
  """step: [] int32 optimizer steps taken; rng: [2] uint32 key data (dropout keys are folded from it per step);
  params: the trainable params (fp32 full weights, or LoRA adapters); opt_state: the optax state of `params`."""

  step: jax.Array
  rng: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------------------------------------------
# Step functions. The jitted ones take their static arguments (s, cfg, opt) first, positionally.


def cast(tree: Any, dtype: Any) -> Any:
  """Floating leaves of `tree` in `dtype` (others unchanged)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def policy_params(trainable: Any, frozen: Any, s: Settings, dropout_key: jax.Array | None = None) -> Any:
  """The params the policy forward uses, in the compute dtype; with LoRA, `trainable=None` is the bare base."""
  dtype = jnp.dtype(s.compute_dtype)
  if s.lora is None:
    return cast(trainable, dtype)
  base = cast(frozen, dtype)
  return base if trainable is None else lora_lib.merge(base, trainable, s.lora, dropout_key)


def loss_fn(trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array, *, s: Settings,
            cfg: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one micro-batch: SFT's completion-only loss of [B, T] examples (`s.objective == "sft"`), else the
  DPO loss of pairs (`ref_logps` [B, 2] in the batch, else the reference on the fly)."""
  if s.objective == "sft":
    return sft_lib.sft_loss(policy_params(trainable, frozen, s, key), cfg, batch, vocab_chunk=s.vocab_chunk,
                            remat=s.remat and s.remat_policy)
  logps = loss_lib.pair_logps(policy_params(trainable, frozen, s, key), cfg, batch, vocab_chunk=s.vocab_chunk,
                              remat=s.remat and s.remat_policy)
  if "ref_logps" in batch:
    ref = batch["ref_logps"]
  else:  # on the fly: the base (LoRA) or the frozen initial policy
    ref_params = policy_params(None, frozen, s) if s.lora else cast(frozen, jnp.dtype(s.compute_dtype))
    ref = jax.lax.stop_gradient(loss_lib.pair_logps(ref_params, cfg, batch, vocab_chunk=s.vocab_chunk))
  lengths = loss_lib.response_lengths(batch)
  return loss_lib.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=s.beta, loss_type=s.loss_type,
                           label_smoothing=s.label_smoothing, chosen_lengths=lengths[:, 0],
                           rejected_lengths=lengths[:, 1])


def train_step(s: Settings, cfg: ModelConfig, opt: OptimSpec, state: TrainState, frozen: Any,
               batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over `batch` [accum, micro, ...]: gradients averaged over the micro-batches. The metrics
  include `weights_finite` (whether every updated weight is finite), which the trainer checks and does not log."""
  tx, schedule = from_spec(opt, state.params)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, s=s, cfg=cfg), has_aux=True)

  def micro_grads(mb, i):
    (_, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_key, i))
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
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step),
                 weights_finite=all_finite(params))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def all_finite(tree: Any) -> jax.Array:
  """[] float32: 1 when every value of `tree` is finite, else 0 (the trainer's guard reads it each step).

  The largest magnitude of each leaf below infinity (a NaN propagates through the max and fails the comparison):
  XLA reads each weight once, where an `isfinite` per element wrote a mask of every weight before reducing it
  (0.06 s of a 135M-weight step on a CPU)."""
  peaks = [jnp.max(jnp.abs(x), initial=0).astype(jnp.float32) for x in jax.tree.leaves(tree)]  # 0: an empty leaf
  return (jnp.stack(peaks).max() < jnp.inf).astype(jnp.float32) if peaks else jnp.float32(1.0)


def logps_step(s: Settings, cfg: ModelConfig, trainable: Any, frozen: Any, batch: dict[str, jax.Array]
               ) -> jax.Array:
  """[B, 2] log-probs of the policy (`trainable`, `frozen`) without dropout; `trainable=None` with LoRA is the base."""
  return loss_lib.pair_logps(policy_params(trainable, frozen, s), cfg, batch, vocab_chunk=s.vocab_chunk)


def base_logps_step(s: Settings, cfg: ModelConfig, frozen: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """[B, 2] log-probs of the LoRA base (adapters off)."""
  return logps_step(s, cfg, None, frozen, batch)


def init_trainable(base: transformer.Params, key_data: jax.Array, *, s: Settings) -> Any:
  """The trainable params at step 0: fresh LoRA adapters (key folded with 1), or an fp32 copy of the base."""
  if s.lora is not None:
    return lora_lib.init_adapters(base, s.lora, jax.random.fold_in(jax.random.wrap_key_data(key_data), 1))
  return cast(base, jnp.float32)


def init_state(s: Settings, opt: OptimSpec, base: transformer.Params, key_data: jax.Array) -> TrainState:
  """The train state at step 0 (`key_data`: the run's seed key, as [2] uint32)."""
  params = init_trainable(base, key_data, s=s)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=key_data, params=params,
                    opt_state=from_spec(opt, params)[0].init(params))


def final_params(s: Settings, trainable: Any, base: transformer.Params) -> transformer.Params:
  """The trained policy in fp32: the base with the adapters merged (LoRA), else the trainable params."""
  if s.lora is None:
    return trainable
  return lora_lib.merge(cast(base, jnp.float32), trainable, s.lora)


def checksum(params: Any) -> jax.Array:
  """A cheap fingerprint of weights (keys the reference cache): the sum of every value in fp32."""
  return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------------------
# The builder


class Steps(NamedTuple):
  """A run's jitted steps, static arguments bound."""

  init: Any  # (base, key_data [2]) -> TrainState
  init_donating: Any  # the same, the base's buffers donated (full fine-tuning trains in them)
  train: Any  # (state, frozen, batch [A, B, ...]) -> (state, metrics)
  policy_logps: Any  # (trainable, frozen, batch [B, ...]) -> [B, 2]
  base_logps: Any  # LoRA only: (frozen, batch) -> [B, 2] with adapters off
  final: Any  # (trainable, base) -> fp32 policy params
  checksum: Any  # (params) -> [] fp32
  state_shardings: Any  # TrainState of NamedShardings
  state_shapes: Any  # TrainState of ShapeDtypeStructs


def state_shardings(state_shapes: TrainState, opt: OptimSpec, mesh: jax.sharding.Mesh) -> TrainState:
  """Params by the partition rules, the optimizer state like its params, step and RNG replicated."""
  param_shards = sharding.param_shardings(state_shapes.params, mesh)
  rep = sharding.replicated(mesh)
  tx, _ = from_spec(opt, state_shapes.params)
  opt_shards = optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, state_shapes.opt_state, param_shards,
                                                transform_non_params=lambda _: rep)
  return TrainState(step=rep, rng=rep, params=param_shards, opt_state=opt_shards)


def build_steps(cfg: ModelConfig, s: Settings, opt: OptimSpec, base: transformer.Params, frozen: bool,
                mesh: jax.sharding.Mesh) -> Steps:
  """The jitted steps of a run on `base` (arrays or shapes); `frozen`: whether the steps take the base params as
  their frozen argument (LoRA, or the on-the-fly reference of full fine-tuning) or None.

  The module-level functions are jitted with equal static arguments and shardings in every run, so a second run
  of the same settings (a resumed run, the next self-improvement round) reuses the traced and compiled steps."""
  base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  key_shape = jax.ShapeDtypeStruct((2,), jnp.uint32)
  state_shapes = jax.eval_shape(functools.partial(init_state, s, opt), base_shapes, key_shape)
  state_shards = state_shardings(state_shapes, opt, mesh)
  base_shards = sharding.param_shardings(base_shapes, mesh)
  frozen_shards = base_shards if frozen else None
  rep = sharding.replicated(mesh)
  batch_shards = NamedSharding(mesh, P(sharding.BATCH))
  jit = functools.partial(sharding.jit, mesh=mesh)
  init = jit(init_state, in_shardings=(base_shards, rep), out_shardings=state_shards, static_argnums=(0, 1))
  init_donating = jit(init_state, in_shardings=(base_shards, rep), out_shardings=state_shards, static_argnums=(0, 1),
                      donate_argnums=(2,))
  train = jit(train_step, in_shardings=(state_shards, frozen_shards, None),  # the batch as placed: batch_shardings
              out_shardings=(state_shards, rep), static_argnums=(0, 1, 2), donate_argnums=(3,))
  policy = jit(logps_step, in_shardings=(state_shards.params, frozen_shards, batch_shards), out_shardings=rep,
               static_argnums=(0, 1))
  base_fn = None
  if s.lora is not None:
    base_fn = functools.partial(jit(base_logps_step, in_shardings=(base_shards, batch_shards), out_shardings=rep,
                                    static_argnums=(0, 1)), s, cfg)
  final = jit(final_params, in_shardings=(state_shards.params, base_shards),
              out_shardings=state_shards.params if s.lora is None else base_shards, static_argnums=(0,))
  return Steps(init=functools.partial(init, s, opt), init_donating=functools.partial(init_donating, s, opt),
               train=functools.partial(train, s, cfg, opt),
               policy_logps=functools.partial(policy, s, cfg), base_logps=base_fn, final=functools.partial(final, s),
               checksum=jit(checksum, in_shardings=(base_shards,), out_shardings=rep),
               state_shardings=state_shards, state_shapes=state_shapes)


# A train batch's arrays with a sequence (last) dim; the rest ([accum, micro] weights, targets, reference log-probs)
# are per row.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "branch_ids")


def batch_shardings(mesh: jax.sharding.Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
  """Where a train batch's [accum, micro, ...] arrays go: the micro-batch's rows over (data, fsdp), or, for a
  micro-batch of fewer rows than those devices, its sequences' tokens (`sharding.rows_spec`; the arrays without a
  sequence whole)."""
  return {k: NamedSharding(mesh, sharding.rows_spec(mesh, shape, 1, len(shape) - 1 if k in SEQUENCE_KEYS else None))
          for k, shape in shapes.items()}


def pad_sequences(batch: dict[str, np.ndarray], multiple: int, pad_id: int) -> dict[str, np.ndarray]:
  """`batch` with its sequences right-padded to a multiple of `multiple` tokens (`pad_id`, masks and ids 0: padding
  in every layout), so a micro-batch split over its sequence splits evenly."""
  extra = -batch["input_ids"].shape[-1] % multiple
  if not extra:
    return batch
  pad = lambda k, v: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, extra)], constant_values=pad_id if k == "input_ids" else 0)
  return {k: pad(k, v) if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def uses_frozen(s: Settings) -> bool:
  """Whether the steps take the base params as their frozen argument (LoRA, or the on-the-fly reference)."""
  return s.lora is not None or s.reference == "on_the_fly"


def train_lowerable(cfg: ModelConfig, s: Settings, opt: OptimSpec, mesh: jax.sharding.Mesh, dtype: Any, *,
                    grad_accum: int, micro_batch: int, length: int) -> sharding.Lowerable:
  """The train step of `build_steps` for base weights in `dtype` and an optimizer step of `grad_accum` micro-batches
  of `micro_batch` pairs (SFT: examples), each sequence `length` tokens, with abstract arguments, to compile ahead of time for `mesh`
  (any platform; `s.compute_dtype` as resolved for it)."""
  base = sharding.abstract_params(cfg, dtype, mesh)
  steps = build_steps(cfg, s, opt, base, uses_frozen(s), mesh)
  state = sharding.abstract_tree(steps.state_shapes, steps.state_shardings)
  rows = (grad_accum, micro_batch) + ((2,) if s.objective == "dpo" else ())  # SFT: one sequence per row
  shapes = {k: (rows + (length,), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
  if s.objective == "sft":
    shapes["weight"] = ((grad_accum, micro_batch), jnp.float32)
  elif s.reference == "precomputed":
    shapes["ref_logps"] = ((grad_accum, micro_batch, 2), jnp.float32)
  places = batch_shardings(mesh, {k: shape for k, (shape, _) in shapes.items()})
  batch = {k: sharding.abstract(shape, dtype_, places[k]) for k, (shape, dtype_) in shapes.items()}
  # steps.train binds (s, cfg, opt); lower the jitted function under it with the same arguments.
  return sharding.Lowerable("dpo_step", steps.train.func, steps.train.args + (
      state, base if uses_frozen(s) else None, batch), mesh)
