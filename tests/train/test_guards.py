"""The trainer's guards: a non-finite loss, gradients or weights and a diverging loss stop a run at once with one
line (the last good checkpoint kept, nothing exported); pairs with chosen == rejected are counted, a set of nothing
else refused; zero or negative sizes are refused naming the key before anything is written."""

import math
import os
import re

import numpy as np
import pytest

from ipo_jax.data import DataError
from ipo_jax.train import guards, loop, metrics, pairs as pairs_lib
from tests.conftest import file_hashes
from tests.train.test_loop import _task_setup, _toy_model, synthetic_pairs, train_config


def _stopped(call, pattern):
  """Runs `call`, which must raise TrainingDiverged matching `pattern` in one line; returns the message."""
  with pytest.raises(guards.TrainingDiverged, match=pattern) as info:
    call()
  assert "\n" not in str(info.value)
  return str(info.value)


def test_a_nan_learning_rate_stops_the_task_at_step_1_and_exports_nothing(tmp_path):
  from ipo_jax import main

  _, _, _, config = _task_setup(tmp_path)
  config.optim.learning_rate = float("nan")
  config.train.stop_after_steps = 0
  _stopped(lambda: main.run_task(config),
           r"^training stopped at step 1: non-finite weights after the update with optim\.learning_rate=nan; use a "
           r"lower \(finite\) optim\.learning_rate .*; no checkpoint of this run was written$")
  out = config.output_dir
  assert not os.path.exists(os.path.join(out, "hf")) and not os.path.exists(os.path.join(out, "summary.json"))
  assert not os.listdir(os.path.join(out, "checkpoints"))  # checkpoint.every=1: step 1 was not saved


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path):
  out = str(tmp_path / "run")
  config = train_config(out, 24)
  config.optim.learning_rate = 1e10
  config.checkpoint.update(every=1, keep=10)
  config.eval.every = 0
  train = lambda: loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), config)
  message = _stopped(train, r"^training stopped at step \d+: non-finite (loss|gradients|weights)")
  bad = int(re.match(r"training stopped at step (\d+)", message).group(1))
  assert 1 < bad <= 4  # within a few steps (step 1 runs at the warmup's learning rate 0)
  assert message.endswith(f"the last good checkpoint, step {bad - 1}, is kept in {out}/checkpoints")
  assert "optim.learning_rate=10000000000.0; use a lower" in message
  assert sorted(os.listdir(os.path.join(out, "checkpoints")), key=int) == [str(s) for s in range(1, bad)]
  kept = {k: v for k, v in file_hashes(out).items() if k.startswith("checkpoints") or k == metrics.METRICS_FILE}
  # The same settings resume from the last good step and stop at the same step again, touching nothing kept.
  assert _stopped(train, "^training stopped") == message
  assert {k: v for k, v in file_hashes(out).items() if k in kept or k.startswith("checkpoints")} == kept
  assert not os.path.exists(os.path.join(out, "summary.json"))


def test_a_diverging_loss_stops_the_run_and_a_rerun_without_the_guard_resumes(tmp_path):
  out = str(tmp_path / "run")
  config = train_config(out, 8)
  config.optim.learning_rate = 100.0  # the loss jumps from ln 2 to ~500 and more, but stays finite
  config.checkpoint.update(every=1, keep=10)
  config.eval.every = 0
  _stopped(lambda: loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), config),
           r"^training stopped at step 4: the loss \S+ exceeds train\.divergence_factor=10 x 0\.6931 \(the "
           r"median of the 3 losses so far, or the zero-margin loss 0\.6931 if larger\): the run is diverging; lower "
           r"optim\.learning_rate \(or set train\.divergence_factor=0 to turn this check off\); the last good "
           r"checkpoint, step 3, is kept in ")
  config.train.divergence_factor = 0.0  # not part of the run's identity: the rerun resumes from step 3
  _, summary = loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), config)
  assert summary["complete"] and summary["step"] == 8
  losses = [r["loss"] for r in metrics.read_metrics(os.path.join(out, metrics.METRICS_FILE)) if r["split"] == "train"]
  assert len(losses) == 8 and max(losses) > 100 and all(map(math.isfinite, losses))


def test_the_divergence_reference_is_the_running_median_floored_at_the_zero_margin_loss():
  config = train_config("", 1)
  guard = guards.Guard(config, history=[0.69, 0.3, 0.01] + [0.001] * 20)  # e.g. a resumed run, late in training
  guard.check(24, 0.05, 1.0, True)  # 50x the median, but an ordinary noisy batch: far below 10 x ln 2
  with pytest.raises(guards.TrainingDiverged, match=r"step 25: the loss 7 exceeds .*=10 x 0\.6931 \(the median of "
                                                    r"the 24 losses"):
    guard.check(25, 7.0, 1.0, True)
  with pytest.raises(guards.TrainingDiverged, match=r"step 26: non-finite gradients \(grad_norm=inf\)"):
    guard.check(26, 0.5, math.inf, True)
  config.dpo.update(loss_type="ipo", beta=0.1)
  assert guards.zero_margin_loss(config) == pytest.approx(25.0)  # (1 / (2 beta))^2
  config.dpo.update(loss_type="hinge")
  assert guards.zero_margin_loss(config) == pytest.approx(1.0)
  config.train.divergence_factor = 0.0
  guards.Guard(config, history=[0.7] * 5).check(6, 1e6, 1.0, True)  # off
  rng = np.random.default_rng(0)
  values = rng.exponential(size=101)
  running = guards.RunningMedian()
  for i, v in enumerate(values):
    running.add(v)
    assert running.median() == pytest.approx(np.median(values[:i + 1]))


def test_identical_pairs_are_counted_and_a_set_of_only_those_is_refused(tmp_path, capsys):
  pset = synthetic_pairs(16, seed=0)
  for i in (0, 5, 9):
    pset.rejected_ids[i] = pset.chosen_ids[i].copy()
  _, summary = loop.train_dpo(_toy_model(), pset, train_config("", 2))
  assert summary["pairs_identical"] == 3 and summary["complete"]
  assert "warning: 3 of 16 training pairs (synthetic-0) have chosen == rejected" in capsys.readouterr().out
  same = pairs_lib.PreferenceSet(pset.prompt_ids, pset.chosen_ids, pset.chosen_ids, source="same.jsonl")
  out = tmp_path / "run"
  with pytest.raises(DataError, match=r"^same\.jsonl: all 16 training pairs have chosen == rejected \(as tokenized, "
                                      r"within data\.max_length=16\); nothing to learn"):
    loop.train_dpo(_toy_model(), same, train_config(str(out), 2))
  assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("key,value", [
    ("train.batch_size", 0), ("train.grad_accum", 0), ("train.grad_accum", -2), ("train.epochs", -1),
    ("train.max_steps", -3), ("eval.batch_size", 0), ("data.max_length", 0), ("data.max_prompt_length", -1),
    ("log.every", 0), ("train.stop_after_steps", -1), ("checkpoint.every", -5), ("train.divergence_factor", -1.0),
])
def test_zero_or_negative_sizes_are_refused_naming_the_key(tmp_path, key, value):
  out = tmp_path / "run"
  config = train_config(str(out), 2)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=rf"^{re.escape(key)}={re.escape(repr(value))} must be a (positive|non-negative) "
                                       rf"number \(--config\.{re.escape(key)}=<n>\)$"):
    loop.train_dpo(_toy_model(), synthetic_pairs(16, seed=0), config)
  assert not out.exists()


def test_sizes_that_leave_nothing_to_train_are_refused(tmp_path):
  config = train_config(str(tmp_path / "a"), 2)
  config.train.update(epochs=0, max_steps=0)
  with pytest.raises(ValueError, match=r"^train\.epochs=0 and train\.max_steps=0 train no step"):
    loop.train_dpo(_toy_model(), synthetic_pairs(16, seed=0), config)
  config = train_config(str(tmp_path / "b"), 2)
  config.data.update(max_length=8, max_prompt_length=8)
  with pytest.raises(ValueError, match=r"^data\.max_prompt_length=8 must be smaller than data\.max_length=8"):
    loop.train_dpo(_toy_model(), synthetic_pairs(16, seed=0), config)
  assert not os.listdir(tmp_path)


def test_the_task_refuses_a_zero_batch_size_before_loading_anything(tmp_path):
  from configs import dpo as dpo_config
  from ipo_jax import main

  config = dpo_config.get_config()
  config.output_dir = str(tmp_path / "run")
  config.model.path = str(tmp_path / "no-such-model")  # never loaded: the settings are checked first
  config.train.batch_size = 0  # was a ZeroDivisionError
  with pytest.raises(ValueError, match=r"^train\.batch_size=0 must be a positive number"):
    main.run_task(config)
  assert not os.listdir(tmp_path)
