"""What stops a DPO run early, with one clear line: bad sizes in the config (before anything is written), data with
nothing to learn, and a run that goes wrong (a non-finite loss, gradients or weights; a diverging loss).

The run guards read each step's loss, gradient norm and whether the updated weights are finite, and raise
`TrainingDiverged` (a ValueError) before that step's state is checkpointed, so the newest checkpoint is the last
good one. Divergence (`train.divergence_factor` k, 0: off; default 10): after `train.divergence_warmup` steps, a
step whose loss exceeds k × max(the median of the losses so far, the loss at zero margin — ln 2 for `sigmoid`,
1 for `hinge`, 1/(4β²) for `ipo`) stops the run. The zero-margin floor keeps a healthy run whose loss has fallen near
zero from stopping on an ordinary noisy batch: a healthy DPO run does not average 10× the loss of a policy that
equals its reference.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Iterable

import numpy as np

from ipo_jax.data import DataError
from ipo_jax.train import loss as loss_lib, pairs as pairs_lib

# Settings that must be >= 1 and >= 0, as (section, field).
POSITIVE = (("train", "batch_size"), ("train", "grad_accum"), ("train", "vocab_chunk"), ("eval", "batch_size"),
            ("data", "max_length"), ("data", "max_prompt_length"), ("log", "every"), ("checkpoint", "keep"))
NON_NEGATIVE = (("train", "epochs"), ("train", "max_steps"), ("train", "stop_after_steps"), ("eval", "every"),
                ("checkpoint", "every"), ("train", "divergence_factor"), ("train", "divergence_warmup"))


class TrainingDiverged(ValueError):
  """A run stopped by a guard: a non-finite loss, gradients or weights, or a diverging loss."""


def check_settings(config: Any) -> None:
  """A ValueError naming the key for a size that is zero or negative (or not a number); called where the settings
  are read, before anything is written."""
  for kind, keys, low in (("a positive", POSITIVE, 1), ("a non-negative", NON_NEGATIVE, 0)):
    for section, field in keys:
      value = (config.get(section) or {}).get(field)
      if value is None and field.startswith("divergence_"):
        continue  # a config built before these fields existed: the defaults apply
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{section}.{field}={value!r} must be {kind} number "
                         f"(--config.{section}.{field}=<n>)")
  t, d = config.train, config.data
  if not int(t.max_steps) and not int(t.epochs):
    raise ValueError("train.epochs=0 and train.max_steps=0 train no step; set train.epochs or train.max_steps > 0")
  if d.max_prompt_length >= d.max_length:
    raise ValueError(f"data.max_prompt_length={d.max_prompt_length} must be smaller than "
                     f"data.max_length={d.max_length} (room is left for the responses)")


def check_pairs(pset: pairs_lib.PreferenceSet, data: Any) -> int:
  """The number of training pairs whose chosen and rejected responses are the same tokens (within the
  `data.max_length` budget), or a DataError when every pair is so: then there is nothing to learn."""
  same = pairs_lib.identical_pairs(pset, max_length=int(data.max_length),
                                   max_prompt_length=int(data.max_prompt_length))
  if same and same == len(pset):
    raise DataError(f"{pset.source or 'training pairs'}: all {same} training pairs have chosen == rejected (as "
                    f"tokenized, within data.max_length={data.max_length}); nothing to learn: fix the data's "
                    "'chosen'/'rejected' fields")
  return same


def zero_margin_loss(config: Any) -> float:
  """The loss of a policy equal to its reference (z = 0) under the config's loss type."""
  z, ones = np.zeros(1, np.float32), np.ones(1, np.float32)
  d = config.dpo
  loss, _ = loss_lib.dpo_loss(z, z, z, z, beta=float(d.beta), loss_type=d.loss_type,
                              label_smoothing=float(d.label_smoothing), chosen_lengths=ones, rejected_lengths=ones)
  return float(loss)


class RunningMedian:
  """The median of a growing sequence (two heaps: O(log n) per value)."""

  def __init__(self, values: Iterable[float] = ()):
    self._low: list[float] = []  # max-heap (negated) of the smaller half
    self._high: list[float] = []  # min-heap of the larger half
    for v in values:
      self.add(v)

  def __len__(self) -> int:
    return len(self._low) + len(self._high)

  def add(self, value: float) -> None:
    heapq.heappush(self._low, -float(value))
    heapq.heappush(self._high, -heapq.heappop(self._low))
    if len(self._high) > len(self._low):
      heapq.heappush(self._low, -heapq.heappop(self._high))

  def median(self) -> float:
    if len(self._low) > len(self._high):
      return -self._low[0]
    return (-self._low[0] + self._high[0]) / 2


class Guard:
  """Checks each step's loss, gradient norm and weights (see the module docstring); `history`: the losses of the
  steps before the first one checked (a resumed run's logged losses)."""

  def __init__(self, config: Any, history: Iterable[float] = (), checkpoints: str = ""):
    t = config.train
    self.factor = float(t.get("divergence_factor", 10.0))
    self.warmup = int(t.get("divergence_warmup", 3))
    self.learning_rate = config.optim.learning_rate
    self.floor = zero_margin_loss(config) if self.factor > 0 else 0.0
    self.losses = RunningMedian(v for v in history if math.isfinite(v))
    self.checkpoints = checkpoints  # where the last good checkpoint is (for the message)
    self.last_good: int | None = None

  def _kept(self) -> str:
    if self.last_good is None:
      return "no checkpoint of this run was written"
    return f"the last good checkpoint, step {self.last_good}, is kept in {self.checkpoints}"

  def check(self, step: int, loss: float, grad_norm: float, weights_finite: bool) -> None:
    """Raises TrainingDiverged when optimizer step `step` (1-based) went wrong; else records its loss."""
    bad = None
    if not math.isfinite(loss):
      bad = f"non-finite loss ({loss})"
    elif not math.isfinite(grad_norm):
      bad = f"non-finite gradients (grad_norm={grad_norm})"
    elif not weights_finite:
      bad = "non-finite weights after the update"
    if bad:
      raise TrainingDiverged(
          f"training stopped at step {step}: {bad} with optim.learning_rate={self.learning_rate}; use a lower "
          f"(finite) optim.learning_rate or set optim.max_grad_norm, in a new output_dir or with "
          f"--config.overwrite=True; {self._kept()}")
    if self.factor > 0 and len(self.losses) >= self.warmup:
      reference = max(self.losses.median(), self.floor)
      if loss > self.factor * reference:
        raise TrainingDiverged(
            f"training stopped at step {step}: the loss {loss:.4g} exceeds train.divergence_factor={self.factor:g} "
            f"x {reference:.4g} (the median of the {len(self.losses)} losses so far, or the zero-margin loss "
            f"{self.floor:.4g} if larger): the run is diverging; lower optim.learning_rate (or set train.divergence_factor=0 "
            f"to turn this check off); {self._kept()}")
    self.losses.add(loss)

  def saved(self, step: int) -> None:
    """Step `step` was checkpointed (it passed the checks)."""
    self.last_good = step
