"""The DPO objective: preference losses and the sequence log-probabilities they compare.

A batch holds pairs in one of two layouts (ipo_jax/train/pairs.py). Separate rows: `input_ids`, `attention_mask`
and `loss_mask` of shape [B, 2, T], index 0 of the pair axis the chosen response and 1 the rejected one, each row
prompt + response (right-padded), `loss_mask` on the response tokens whose log-probabilities are summed; both members
go through one forward as 2B rows. Shared prompt (`branch_ids` in the batch): one row per pair, the prompt once and
each response a branch attending to it, and the LM head only at the [B, K] `target_pos` slots.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "ipo_norm")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The mean preference loss over a batch of pairs and TRL-named metrics.

  With the log-ratios r_c = policy_chosen - ref_chosen, r_r = policy_rejected - ref_rejected and z = r_c - r_r:

  - `sigmoid`: -[(1 - ε)·logσ(βz) + ε·logσ(-βz)] (DPO; ε > 0 is conservative DPO). ε = 0 is TRL 1.16's `sigmoid`;
    ε > 0 is the label-smoothed `sigmoid` of TRL 0.x (TRL 1.16 keeps that formula only in its `aot` loss).
  - `hinge`: max(0, 1 - βz) (SLiC), TRL 1.16's `hinge`.
  - `ipo`: (z - 1/(2β))² on summed log-probs, Azar et al. eq. 17 as written.
  - `ipo_norm`: the same on per-token averages r_c/|chosen| - r_r/|rejected| (needs `chosen_lengths` and
    `rejected_lengths`, the response token counts), TRL 1.16's `ipo`.

  Metrics (TRL 1.16 names and meaning): `rewards/chosen` = mean β·r_c, `rewards/rejected` = mean β·r_r,
  `rewards/accuracies` = fraction with β·r_c > β·r_r (strict), `rewards/margins` = mean β·(r_c - r_r),
  `logps/chosen`, `logps/rejected` = mean policy log-probs; plus `loss`.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
  chosen_logratios = policy_chosen_logps - ref_chosen_logps
  rejected_logratios = policy_rejected_logps - ref_rejected_logps
  z = chosen_logratios - rejected_logratios
  if loss_type == "sigmoid":
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z) - label_smoothing * jax.nn.log_sigmoid(-beta * z)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * z)
  else:
    if loss_type == "ipo_norm":
      if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("loss_type 'ipo_norm' needs chosen_lengths and rejected_lengths")
      z = (chosen_logratios / jnp.maximum(chosen_lengths, 1) - rejected_logratios / jnp.maximum(rejected_lengths, 1))
    losses = (z - 1.0 / (2.0 * beta)) ** 2
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
  loss = losses.mean()
  metrics = {
      "loss": loss,
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32).mean(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
      "logps/chosen": jax.lax.stop_gradient(policy_chosen_logps).mean(),
      "logps/rejected": jax.lax.stop_gradient(policy_rejected_logps).mean(),
  }
  return loss, metrics


def token_logps(params: transformer.Params, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, *,
                vocab_chunk: int = 8192) -> jax.Array:
  """log p(targets) [..., ] from `hidden` [..., D], the log-softmax taken over vocabulary chunks.

  The chunks are strided rows of the output matrix (chunk i holds rows i, i + n, i + 2n, ...), so a vocabulary
  sharded over `tensor` stays sharded within each chunk. Only [..., chunk] logits exist at a time, in the forward
  and (each chunk rematerialised) in the backward pass.
  """
  w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
  vocab, dim = w.shape
  num_chunks = -(-vocab // min(vocab_chunk, vocab))
  chunk = -(-vocab // num_chunks)
  pad = num_chunks * chunk - vocab
  if pad:
    w = jnp.concatenate([w, jnp.zeros((pad, dim), w.dtype)])
  w_chunks = w.reshape(chunk, num_chunks, dim).swapaxes(0, 1)  # [n, C, D]; row c of chunk i is vocab c * n + i
  ids = jnp.arange(chunk, dtype=jnp.int32)[None, :] * num_chunks + jnp.arange(num_chunks, dtype=jnp.int32)[:, None]

  @jax.checkpoint
  def body(carry, xs):
    running_max, running_sum, target_logit = carry
    w_chunk, chunk_ids = xs
    logits = transformer.lm_head({"embed": w_chunk, "lm_head": w_chunk}, cfg, hidden)
    logits = jnp.where(chunk_ids < vocab, logits, -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(-1))
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
    target_logit = target_logit + jnp.where(chunk_ids == targets[..., None], logits, 0.0).sum(-1)
    return (new_max, running_sum, target_logit), None

  shape = targets.shape
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
  (running_max, running_sum, target_logit), _ = jax.lax.scan(body, init, (w_chunks, ids))
  return target_logit - (running_max + jnp.log(running_sum))


def sequence_logps(params: transformer.Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   loss_mask: jax.Array, *, vocab_chunk: int = 8192, remat: bool | str = False,
                   segment_ids: jax.Array | None = None) -> jax.Array:
  """Sum of log p(token | previous tokens) over the tokens where `loss_mask` is set; inputs [..., T] -> [...].
  With `segment_ids` (packed rows, `transformer.forward`'s) they replace the attention mask."""
  lead, t = input_ids.shape[:-1], input_ids.shape[-1]
  flat = lambda x: x.reshape(-1, t)
  if segment_ids is not None:
    hidden, _ = transformer.forward(params, cfg, flat(input_ids), segment_ids=flat(segment_ids), remat=remat)
  else:
    hidden, _ = transformer.forward(params, cfg, flat(input_ids), flat(attention_mask), remat=remat)
  logps = token_logps(params, cfg, hidden[:, :-1], flat(input_ids)[:, 1:], vocab_chunk=vocab_chunk)
  mask = flat(loss_mask)[:, 1:].astype(jnp.float32)
  return (logps * mask).sum(-1).reshape(lead)


def pair_logps(params: transformer.Params, cfg: ModelConfig, batch: dict[str, Any], *, vocab_chunk: int = 8192,
               remat: bool | str = False) -> jax.Array:
  """[B, 2] summed response log-probs of (chosen, rejected): one forward of 2B rows, or of B shared-prompt rows."""
  if "branch_ids" not in batch:
    return sequence_logps(params, cfg, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                          vocab_chunk=vocab_chunk, remat=remat)
  hidden, _ = transformer.forward(params, cfg, batch["input_ids"], segment_ids=batch["segment_ids"],
                                  branch_ids=batch["branch_ids"], remat=remat)
  hidden = jnp.take_along_axis(hidden, batch["target_pos"][..., None], axis=1)  # [B, K, D]
  logps = token_logps(params, cfg, hidden, batch["target_ids"], vocab_chunk=vocab_chunk)
  member = batch["target_member"]
  return jnp.stack([jnp.where(member == j, logps, 0.0).sum(-1) for j in (1, 2)], axis=-1)


def response_lengths(batch: dict[str, Any]) -> jax.Array:
  """[B, 2] number of response tokens of (chosen, rejected), in either layout ([B] for SFT's [B, T] rows)."""
  if "target_member" in batch:
    return jnp.stack([(batch["target_member"] == j).sum(-1) for j in (1, 2)], axis=-1).astype(jnp.float32)
  return batch["loss_mask"][..., 1:].astype(jnp.float32).sum(-1)
