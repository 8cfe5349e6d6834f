"""Task `sft` on a file with Alpaca's column names (trains, checkpoints, resumes, exports a directory transformers
loads; a rerun with other settings is refused; a bad row is named), and SFT as the self-improvement loop's first
stage (round 0's policy, recorded and resumed)."""

import copy
import json
import os

import numpy as np
import pytest

from configs import common, self_improve as self_improve_config
from configs import sft as sft_config
from ipo_jax import data as data_lib, rundir
from ipo_jax.data import DataError
from ipo_jax.tasks import self_improve, sft as sft_task
from ipo_jax.train import metrics
from tests.conftest import file_hashes
from tests.test_reliability import tiny_model  # pylint: disable=unused-import  # the fixture

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]


def _examples(path, n=12):
  """Alpaca-style rows (instruction, input, output); every third has an input."""
  rows = [{"instruction": f"Repeat the word {WORDS[i % 8]}.", "input": "Twice." if i % 3 == 0 else "",
           "output": f"{WORDS[i % 8]} {WORDS[i % 8]}"} for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def task_config(model_dir, data, output_dir):
  c = sft_config.get_config()
  c.model.path = model_dir
  c.output_dir = output_dir
  c.data.update(path=data, eval_fraction=0.25, max_length=64, max_prompt_length=48)
  c.lora.update(rank=4, alpha=8.0)
  c.optim.update(learning_rate=1e-2, warmup_ratio=0.0)
  c.train.update(batch_size=3, max_steps=4, stop_after_steps=2)
  c.eval.update(batch_size=3)
  c.checkpoint.update(every=1)
  c.log.update(tqdm=False, tensorboard=False, plot=False)
  return c


def test_sft_sections_are_the_same_everywhere():
  sections = common.sft_training()
  assert "dpo" not in sections and sections.sft.completion_only
  assert {k: set(sft_config.get_config()[k]) for k in sections} == {k: set(v) for k, v in sections.items()}
  nested = self_improve_config.get_config().sft
  assert set(nested) - {"enabled"} == set(sections) and not nested.enabled
  assert sft_config.get_config("demo").data.path == "tatsu-lab/alpaca_eval"


def test_task_trains_resumes_exports_and_refuses_other_settings(tiny_model, tmp_path):
  import torch
  import transformers
  config = task_config(tiny_model, _examples(tmp_path / "alpaca.jsonl"), str(tmp_path / "run"))
  first = sft_task.run(config)
  assert not first["complete"] and "export_dir" not in first
  assert sorted(os.listdir(os.path.join(config.output_dir, "checkpoints"))) == ["1", "2"]
  config.train.stop_after_steps = 0
  summary = sft_task.run(config)
  assert summary["complete"] and summary["step"] == 4 and summary["train_examples"] == 9
  assert summary["eval_examples"] == 3 and summary["eval"]["loss"] < summary["eval_initial"]["loss"]
  steps = [r["step"] for r in data_lib.iter_jsonl(os.path.join(config.output_dir, metrics.METRICS_FILE))
           if r["split"] == "train"]
  assert steps == [1, 2, 3, 4]
  record = json.loads((tmp_path / "run" / rundir.RUN_FILE).read_text())
  assert record["task"] == "sft" and record["identity"]["sft"] == {"completion_only": True, "packing": False}
  assert record["identity"]["lora"]["rank"] == 4
  assert "dpo" not in record["identity"] and "reference" not in record["identity"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(summary["export_dir"], dtype=torch.float32)
  assert all(np.isfinite(p.detach().numpy()).all() for p in hf.parameters())

  before = file_hashes(config.output_dir)
  changed = copy.deepcopy(config)
  changed.sft.completion_only = False
  with pytest.raises(rundir.IdentityMismatch, match=r"other settings \(sft\.completion_only differ\)"):
    sft_task.run(changed)
  assert file_hashes(config.output_dir) == before

  bad = tmp_path / "bad.jsonl"
  rows = [{"instruction": "Hi.", "output": "Hello."}, {"instruction": "x"}]
  bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = task_config(tiny_model, str(bad), str(tmp_path / "bad_run"))
  with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'output' \(response\) is missing"):
    sft_task.run(config)
  assert not (tmp_path / "bad_run").exists()


def si_config(model_dir, prompts, examples, output_dir):
  """The self-improvement loop on the tiny model, one round, SFT (full fine-tuning) first."""
  c = self_improve_config.get_config("local,random")
  c.model.path = model_dir
  c.output_dir = output_dir
  c.prompts.update(path=prompts, split="", name="", train_limit=2, heldout_limit=2)
  c.category.update(mode="fixed", fixed="chat")
  c.sampling.update(num_samples=2, max_new_tokens=6, batch_size=2)
  c.training.train.update(batch_size=2, max_steps=1)
  c.training.data.update(max_length=64, max_prompt_length=48)
  c.training.checkpoint.update(every=0)
  c.training.log.update(plot=False)
  c.evaluation.update(max_new_tokens=4)
  c.evaluation.rewardbench.update(path="")
  c.scoring.update(max_length=128, max_batch=4)
  c.sft.update(enabled=True)
  c.sft.data.update(path=examples, split="", limit=0, eval_fraction=0.25, max_length=64, max_prompt_length=48)
  c.sft.train.update(batch_size=3, max_steps=2)
  c.sft.eval.update(batch_size=3)
  c.sft.optim.update(learning_rate=1e-2)
  c.sft.log.update(plot=False)
  return c


@pytest.mark.slow
def test_self_improvement_starts_from_the_sft_model(tiny_model, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"instruction": f"Name a {w}."}) + "\n" for w in WORDS))
  config = si_config(tiny_model, str(prompts), _examples(tmp_path / "alpaca.jsonl"), str(tmp_path / "si"))
  off = copy.deepcopy(config)
  off.sft.enabled = False
  assert "sft" not in self_improve.identity(off) and "sft" in self_improve.identity(config)

  summary = self_improve.run(config)
  out = tmp_path / "si"
  stage = json.loads((out / rundir.RUN_FILE).read_text())["stages"]["sft"]
  assert stage["steps"] == 2 and stage["examples"] == 9 and stage["loss_after"] < stage["loss_before"]
  assert summary["sft"] == stage and (out / "sft" / "policy" / "config.json").exists()
  round_1 = json.loads((out / "round_1" / rundir.RUN_FILE).read_text())["stages"]
  assert round_1["generate"]["policy"].endswith(" + SFT")  # round 1 samples from the SFT'd model
  assert round_1["eval"]["policy"].endswith(" + SFT + round 1")
  assert "SFT on 9 examples" in (out / "rounds.md").read_text()

  exported = (out / "sft" / "policy" / "model.safetensors").stat().st_mtime
  again = self_improve.run(config)  # finished: the stage is not run again
  assert (out / "sft" / "policy" / "model.safetensors").stat().st_mtime == exported
  assert again["rounds"] == summary["rounds"]
