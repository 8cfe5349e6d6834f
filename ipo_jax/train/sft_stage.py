"""SFT as the first stage of a longer run (the self-improvement loop's optional stage "sft", `config.sft`).

The stage fine-tunes the loaded model on `config.sft.data` with the SFT trainer (ipo_jax/train/loop.py `run_task`,
objective SFT) in the run directory `<output_dir>/sft/` (a rerun resumes it from its latest checkpoint), exports the
policy to `<output_dir>/sft/policy/` and records the stage in the parent run directory. The examples are read
before the parent run directory opens, so bad data is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections

from ipo_jax.rundir import RunDir
from ipo_jax.train import guards, loop

STAGE = "sft"


def enabled(config: Any) -> bool:
  """Whether `config` has an `sft` section that is on."""
  return bool((config.get("sft") or {}).get("enabled", False))


def trainer_config(config: Any, output_dir: str) -> ml_collections.ConfigDict:
  """The SFT trainer's config: `config.sft` with the stage's output directory and the run's seed, mesh and model."""
  c = ml_collections.ConfigDict(config.sft.to_dict())
  c.output_dir, c.seed, c.mesh, c.model = output_dir, int(config.seed), config.mesh, config.model
  return c


def examples(model: Any, config: Any, done: Callable[[], bool]) -> tuple[Any, Any] | None:
  """The stage's (train, held-out) examples tokenized for `model`; None when the stage is off or `done()`."""
  if not enabled(config) or done():
    return None
  guards.check_settings(config.sft)
  return loop.load_splits(trainer_config(config, ""), model.tokenizer, loop.SFT)


def run(model: Any, run_dir: RunDir, config: Any, sets: tuple[Any, Any] | None) -> Any:
  """Stage "sft" of `run_dir`: fine-tunes `model` on `sets` and exports the policy, unless finished; returns the
  policy loaded from its export (the same weights on a first run and a rerun), named "<model> + SFT"."""
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel
  policy_dir = run_dir.file(os.path.join(STAGE, "policy"))
  if not run_dir.done(STAGE):
    c = trainer_config(config, run_dir.file(STAGE))
    c.export.update(enabled=True, dir=policy_dir)
    summary = loop.run_task(c, loop.SFT, model, sets)
    if not summary["complete"]:
      raise RuntimeError(f"SFT stopped at step {summary['step']} of {summary['total_steps']}; rerun to continue")
    run_dir.finish_stage(STAGE, policy=policy_dir, data=c.data.path, steps=summary["step"],
                         examples=summary["train_examples"], eval_examples=summary["eval_examples"],
                         loss_before=summary["eval_initial"].get("loss"), loss_after=summary["eval"].get("loss"),
                         train_loss=summary["train"].get("loss"), seconds=round(summary["train_s"], 2))
  policy = loading.load_model(policy_dir, dtype=config.model.get("dtype", "float32"), mesh=model.mesh)
  return dataclasses.replace(policy, tokenizer=model.tokenizer, name=f"{model.name} + SFT")
