"""Task `sft` (configs/sft.py): supervised fine-tuning of a model on (instruction, response) examples with the
completion-only loss, exported as a Hugging Face directory.

The trainer is DPO's (ipo_jax/train/loop.py) with the SFT objective (ipo_jax/train/objectives.py): the same run
directory protocol (identity checked before anything is written; a rerun with the same settings resumes from the
latest checkpoint), checkpoints, metrics, guards and export. The directory holds config.json, metrics.jsonl,
tensorboard/, curves.png, checkpoints/, hf/ (the policy, LoRA merged, unless `export.dir` names another place) and
summary.json (with `eval_initial`, the held-out loss before training, and `export_dir`).
"""

from __future__ import annotations

from typing import Any

from ipo_jax.train import loop


def run(config: Any) -> dict[str, Any]:
  """Loads the model and examples, opens the run directory, trains, and exports the policy to `<output_dir>/hf`."""
  return loop.run_task(config, loop.SFT)
