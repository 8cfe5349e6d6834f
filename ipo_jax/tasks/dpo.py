"""Task `dpo` (configs/dpo.py): DPO training of a model on preference pairs, exported as a Hugging Face directory.

The run directory's identity is the model (path, dtype), the data settings and the fingerprints of the tokenized
pairs, and every result-determining setting (see `train.loop.identity`); it is checked before anything is written,
so a rerun with other settings is refused and one with the same settings resumes from the latest checkpoint.
Besides the trainer's files (train/loop.py), the directory holds config.json, hf/ (the policy, LoRA merged, unless
`export.dir` names another place) and summary.json (with `export_dir`). Sizes and the pairs are checked before
the run directory is opened (train/guards.py); a run stopped by a guard (non-finite or diverging) raises and exports
nothing, and a policy with a non-finite weight is never exported.
"""

from __future__ import annotations

from typing import Any

from ipo_jax.train import loop


def run(config: Any) -> dict[str, Any]:
  """Loads the model and pairs, opens the run directory, trains, and exports the policy to `<output_dir>/hf`."""
  return loop.run_task(config, loop.DPO)
