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

from ipo_jax import runtime
from ipo_jax.rundir import RunDir
from ipo_jax.train import guards, loop, pairs as pairs_lib, steps


def load_splits(config: Any, tokenizer: Any) -> tuple[pairs_lib.PreferenceSet, pairs_lib.PreferenceSet | None]:
  """The training pairs of `config.data` and the held-out ones (`eval_path`, else an `eval_fraction` split)."""
  d = config.data
  if not d.path:
    raise ValueError("data.path is required: a preference .jsonl/.parquet file or a hub dataset id")
  kwargs = dict(chat_template=d.chat_template, skip_invalid=d.skip_invalid)
  pset, skipped = pairs_lib.load(d.path, tokenizer, split=d.split, name=d.get("name") or None, limit=d.limit,
                                 **kwargs)
  if skipped:
    runtime.log(f"{d.path}: skipped {skipped} invalid rows")
  if d.eval_path:
    eval_set, _ = pairs_lib.load(d.eval_path, tokenizer, split=d.eval_split, name=d.get("name") or None, **kwargs)
    return pset, eval_set
  return pairs_lib.split_train_eval(pset, float(d.eval_fraction), int(config.seed))


def run(config: Any) -> dict[str, Any]:
  """Loads the model and pairs, opens the run directory, trains, and exports the policy to `<output_dir>/hf`."""
  from ipo_jax.model import export  # pylint: disable=import-outside-toplevel
  if not config.get("output_dir"):
    raise ValueError("output_dir is required for task dpo")
  guards.check_settings(config)
  mesh = runtime.mesh_from_config(config)
  model = runtime.load_model_from_config(config, mesh)
  train_set, eval_set = load_splits(config, model.tokenizer)
  guards.check_pairs(train_set, config.data)
  loop.check_batching(config, len(train_set), mesh)
  model_id = {"path": config.model.path, "dtype": config.model.get("dtype", "float32")}
  run_dir = RunDir.open(config.output_dir, loop.TASK, loop.identity(config, model_id, train_set, eval_set),
                        overwrite=bool(config.get("overwrite", False)))
  run_dir.write_json("config.json", config.to_dict())
  runtime.log(f"dpo: {model.name}, {len(train_set)} train / {len(eval_set) if eval_set else 0} eval pairs, "
              f"{'LoRA r=' + str(config.lora.rank) if config.lora.rank else 'full fine-tuning'}")
  params, summary = loop.train_dpo(model, train_set, config, eval_pairs=eval_set, run=run_dir)
  if summary["complete"] and config.export.enabled:
    out = config.export.dir or run_dir.file("hf")
    if not float(steps.all_finite(params)):
      raise guards.TrainingDiverged(f"the trained policy has non-finite weights; not exported to {out}")
    summary["export_dir"] = export.export_hf(params, model.config, out, hf_config=model.hf_config,
                                             tokenizer=model.tokenizer, dtype=config.export.dtype)
    runtime.log(f"exported the policy to {out}")
  run_dir.finish(summary)
  return summary
