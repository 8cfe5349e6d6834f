"""Crash drills: each task is killed with SIGKILL at seeded points of its progress, three times, then rerun to
completion; its results must equal an uninterrupted run's (no row lost or duplicated, the same scores).

A tiny random Llama with the embedded model's tokenizer (and chat template) keeps every run short; the data are
written by the tests. Progress is read from the files a run writes, so each kill lands while work is under way.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ipo_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A 2-layer Llama (hidden 32) over SmolLM2's vocabulary, with its tokenizer, as a Hugging Face directory."""
  import torch
  import transformers
  from ipo_jax.model import loading, tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_gguf_tokenizer(loading.embedded_model_path())
  directory = str(tmp_path_factory.mktemp("tiny_llama"))
  config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                    tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  tok.save_pretrained(directory)
  return directory


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    return f.read().count(b"\n")


def _files(directory):
  return sum(len(files) for _, _, files in os.walk(directory)) if os.path.isdir(directory) else 0


def _main(args, **kwargs):
  return [sys.executable, "-m", "ipo_jax.main", *args]


def _run(args):
  done = subprocess.run(_main(args), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]


def _drill(args, progress, seed):
  """Kills `python -m ipo_jax.main *args` with SIGKILL KILLS times, each once `progress()` has grown by a seeded
  1-3 steps since that start, then lets it finish. Returns the progress at each kill (mid-run kills only)."""
  rng = random.Random(seed)
  killed = []
  for _ in range(KILLS):
    proc = subprocess.Popen(_main(args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target, deadline = progress() + rng.randint(1, 3), time.time() + 300
    while proc.poll() is None and progress() < target and time.time() < deadline:
      time.sleep(0.002)
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      killed.append(progress())
  _run(args)
  return killed


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _words(rng, n):
  return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "code", "math", "safe", "yes", "no", "why"])
                  for _ in range(n))


@pytest.mark.slow
def test_rewardbench_survives_kills(tiny_model, tmp_path):
  rng = random.Random(0)
  pairs = [{"prompt": _words(rng, 8), "chosen": _words(rng, 12), "rejected": _words(rng, 10), "subset": s, "id": i}
           for s in ("hep-go", "alpacaeval-easy", "math-prm", "donotanswer") for i in range(12)]
  path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)

  def args(out):
    return ["--config", "configs/rewardbench.py:demo", f"--config.model.path={tiny_model}",
            f"--config.data.path={path}",
            f"--config.output_dir={out}", "--config.data.max_per_subset=0", "--config.scoring.max_batch=2",
            "--config.scoring.batch_tokens=256",
            "--config.scoring.packing=never", "--config.scoring.shared_prefix=False", "--config.scoring.progress=False"]

  _run(args(tmp_path / "whole"))
  scores = tmp_path / "killed" / "scores.jsonl"
  killed = _drill(args(tmp_path / "killed"), lambda: _lines(scores), seed=1)
  assert killed and any(0 < k < len(pairs) for k in killed)
  whole = list(data.iter_jsonl(tmp_path / "whole" / "scores.jsonl"))
  rows = list(data.iter_jsonl(scores))
  keys = [(r["subset"], r["id"]) for r in rows]
  assert len(keys) == len(set(keys)) == len(pairs)  # no row lost or duplicated
  by_key = {(r["subset"], r["id"]): r for r in whole}
  for r in rows:
    assert r["correct"] == by_key[(r["subset"], r["id"])]["correct"]
    assert r["score_chosen"] == pytest.approx(by_key[(r["subset"], r["id"])]["score_chosen"], abs=1e-6)
  summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert summary["score"] == pytest.approx(json.loads((tmp_path / "whole" / "summary.json").read_text())["score"])


@pytest.mark.slow
def test_generate_survives_kills(tiny_model, tmp_path):
  rng = random.Random(1)
  path = _write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": _words(rng, 6)} for _ in range(10)])

  def args(out):
    return ["--config", "configs/generate.py", f"--config.model.path={tiny_model}", f"--config.data.path={path}",
            "--config.data.split=", "--config.data.name=", f"--config.output_dir={out}",
            "--config.sampling.num_samples=2", "--config.sampling.max_new_tokens=12", "--config.sampling.batch_size=1"]

  _run(args(tmp_path / "whole"))
  gens = tmp_path / "killed" / "generations.jsonl"
  killed = _drill(args(tmp_path / "killed"), lambda: _lines(gens), seed=2)
  assert killed and any(0 < k < 20 for k in killed)
  key = lambda r: (r["index"], r["sample"])
  whole = {key(r): r["token_ids"] for r in data.iter_jsonl(tmp_path / "whole" / "generations.jsonl")}
  rows = list(data.iter_jsonl(gens))
  assert sorted(key(r) for r in rows) == sorted(whole)  # every (prompt, sample) once
  assert all(r["token_ids"] == whole[key(r)] for r in rows)  # seeded per row: the same tokens


@pytest.mark.slow
def test_dpo_survives_kills(tiny_model, tmp_path):
  rng = random.Random(2)
  pairs = [{"prompt": _words(rng, 6), "chosen": _words(rng, 8), "rejected": _words(rng, 7)} for _ in range(24)]
  path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)

  def args(out):
    return ["--config", "configs/dpo.py", f"--config.model.path={tiny_model}", f"--config.data.path={path}",
            f"--config.output_dir={out}", "--config.data.max_length=64", "--config.data.max_prompt_length=32",
            "--config.train.batch_size=2", "--config.train.max_steps=10", "--config.optim.learning_rate=1e-3",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=3", "--config.eval.batch_size=2",
            "--config.log.tensorboard=False", "--config.log.tqdm=False", "--config.log.plot=False",
            "--config.export.enabled=False"]

  _run(args(tmp_path / "whole"))
  metrics = tmp_path / "killed" / "metrics.jsonl"
  killed = _drill(args(tmp_path / "killed"), lambda: _lines(metrics), seed=3)
  assert killed and any(0 < k < 10 for k in killed)
  whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
  resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert resumed["complete"] and resumed["step"] == whole["step"] == 10
  assert resumed["train"]["loss"] == pytest.approx(whole["train"]["loss"], abs=1e-6)
  assert resumed["eval"]["loss"] == pytest.approx(whole["eval"]["loss"], abs=1e-6)
  steps = [r["step"] for r in data.iter_jsonl(metrics) if r["split"] == "train"]
  assert sorted(set(steps)) == list(range(1, 11))  # every step logged (a step redone after a kill logs again)


@pytest.mark.slow
def test_self_improvement_round_survives_kills(tiny_model, tmp_path):
  rng = random.Random(3)
  path = _write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": _words(rng, 6)} for _ in range(12)])

  def args(out):
    return ["--config", "configs/self_improve.py:local,random", f"--config.model.path={tiny_model}",
            f"--config.prompts.path={path}", "--config.prompts.split=", "--config.prompts.name=",
            f"--config.output_dir={out}", "--config.prompts.train_limit=4", "--config.prompts.heldout_limit=2",
            "--config.category.mode=fixed", "--config.sampling.num_samples=2", "--config.sampling.max_new_tokens=8",
            "--config.sampling.batch_size=2", "--config.training.train.batch_size=2",
            "--config.training.train.max_steps=2", "--config.training.checkpoint.every=1",
            "--config.evaluation.max_new_tokens=6", "--config.evaluation.rewardbench.path=",
            "--config.scoring.max_length=256", "--config.scoring.max_batch=4"]

  _run(args(tmp_path / "whole"))
  out = tmp_path / "killed"
  killed = _drill(args(out), lambda: _files(out), seed=4)
  assert killed
  timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
  whole = timeless(json.loads((tmp_path / "whole" / "rounds.json").read_text())["rounds"])
  resumed = timeless(json.loads((out / "rounds.json").read_text())["rounds"])
  assert [r["round"] for r in resumed] == [0, 1]
  for a, b in zip(resumed, whole):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == (pytest.approx(b[k], abs=1e-5) if isinstance(b[k], float) else b[k]), k
  gens = list(data.iter_jsonl(out / "round_1" / "generations.jsonl"))
  assert len({(g["index"], g["sample"]) for g in gens}) == len(gens) == 8
  whole_gens = data.iter_jsonl(tmp_path / "whole" / "round_1" / "generations.jsonl")
  np.testing.assert_equal(sorted(g["text"] for g in gens), sorted(g["text"] for g in whole_gens))
