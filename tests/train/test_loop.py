"""The DPO trainer: real optimisation on a small preference set, outputs, exact resumption, 8 devices = 1 device,
and the CLI task on a preference file (trains, checkpoints, resumes, exports a directory transformers loads)."""

import copy
import json
import math
import os
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import dpo as dpo_config
from ipo_jax import sharding
from ipo_jax.train import checkpoint, loop, lora, metrics, optimizer, pairs as pairs_lib, steps
from ipo_jax.model import transformer
from ipo_jax.model.architecture import ModelConfig
from tests.conftest import file_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, attn_scale=8**-0.5, bos_token_id=0,
                     eos_token_ids=(1,))


def synthetic_pairs(n: int, seed: int) -> pairs_lib.PreferenceSet:
  """Random prompts; the chosen response uses even token ids, the rejected one odd ids (a learnable rule)."""
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(n):
    prompts.append(rng.integers(2, 48, rng.integers(3, 7)).astype(np.int32))
    chosen.append(np.append(2 * rng.integers(1, 24, rng.integers(2, 6)), 1).astype(np.int32))
    rejected.append(np.append(2 * rng.integers(1, 24, rng.integers(2, 6)) + 1, 1).astype(np.int32))
  return pairs_lib.PreferenceSet(prompts, chosen, rejected, source=f"synthetic-{seed}")


def train_config(output_dir: str, steps: int):
  c = dpo_config.get_config()
  c.output_dir = output_dir
  c.data.update(max_length=16, max_prompt_length=8)
  c.optim.update(learning_rate=5e-3, warmup_ratio=0.1, max_grad_norm=1.0)
  c.train.update(batch_size=8, max_steps=steps)
  c.eval.update(every=8, batch_size=8)
  c.checkpoint.update(every=8, keep=2)
  c.log.update(tqdm=False)
  return c


def _toy_model(mesh=None):
  cfg = tiny_config()
  return types.SimpleNamespace(config=cfg, params=transformer.init_params(cfg, jax.random.key(0)),
                               mesh=mesh or sharding.make_mesh(), tokenizer=None)


STEPS = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("dpo"))
  model = _toy_model()
  params, summary = loop.train_dpo(model, synthetic_pairs(64, seed=0), train_config(out, STEPS),
                                      eval_pairs=synthetic_pairs(16, seed=1))
  return types.SimpleNamespace(model=model, params=params, summary=summary, out=out)


def test_real_optimisation_moves_held_out_rewards(trained):
  rows = metrics.read_metrics(os.path.join(trained.out, metrics.METRICS_FILE))
  evals = [r for r in rows if r["split"] == "eval"]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in evals] == [8, 16, 24] and len(train) == STEPS
  assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
  assert train[0]["rewards/accuracies"] == 0.0  # ties are not accurate
  assert evals[-1]["rewards/accuracies"] >= 0.9  # chance is 0.5
  assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"] > 0
  assert evals[-1]["loss"] < math.log(2) - 0.1
  assert trained.summary["eval"]["rewards/accuracies"] == evals[-1]["rewards/accuracies"]
  assert trained.summary["complete"] and trained.summary["step"] == STEPS


def _tensorboard_scalars(directory):
  """(tag, step, value) of every scalar in the TFRecord event files."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_metrics_tensorboard_curves_and_reference_are_written(trained):
  rows = metrics.read_metrics(os.path.join(trained.out, metrics.METRICS_FILE))
  last = [r for r in rows if r["split"] == "train"][-1]
  for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "step_time_s", "tokens_per_s"):
    assert key in last
  assert last["learning_rate"] == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 20 / 21)), rel=1e-5)
  scalars = _tensorboard_scalars(os.path.join(trained.out, "tensorboard"))
  assert ("train/loss", STEPS, pytest.approx(last["loss"])) in scalars
  assert any(tag == "eval/rewards/accuracies" for tag, _, _ in scalars)
  with open(os.path.join(trained.out, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with np.load(os.path.join(trained.out, loop.REFERENCE_FILE)) as ref:
    assert ref["train"].shape == (64, 2) and ref["eval"].shape == (16, 2)
    assert np.all(ref["train"] < 0)


def test_reference_params_replace_the_initial_policy(trained, tmp_path):
  pairs = synthetic_pairs(64, seed=0)
  other = loop.train_dpo(_toy_model(), pairs, train_config(str(tmp_path / "a"), 1),
                            reference_params=trained.params)
  own = types.SimpleNamespace(**{**vars(_toy_model()), "params": trained.params})
  loop.train_dpo(own, pairs, train_config(str(tmp_path / "b"), 1))
  with np.load(tmp_path / "a" / loop.REFERENCE_FILE) as a, np.load(tmp_path / "b" / loop.REFERENCE_FILE) as b, \
       np.load(os.path.join(trained.out, loop.REFERENCE_FILE)) as initial:
    np.testing.assert_allclose(a["train"], b["train"], atol=1e-6)
    assert np.abs(a["train"] - initial["train"]).max() > 0.1
  assert other[1]["step"] == 1
  config = train_config(str(tmp_path / "c"), 1)
  config.dpo.reference = "on_the_fly"
  with pytest.raises(ValueError, match="reference_params needs dpo.reference='precomputed'"):
    loop.train_dpo(_toy_model(), pairs, config, reference_params=trained.params)


def test_released_base_and_separate_rows_train_the_same_policy(trained, tmp_path):
  """`release_base` (the dpo task's own model) trains in the base's buffers and frees them; `dpo.shared_prompt=False`
  (chosen and rejected as separate rows) trains the same policy as the default shared-prompt rows."""
  model = _toy_model()
  params, _ = loop.train_dpo(model, synthetic_pairs(64, seed=0), train_config(str(tmp_path / "released"), STEPS),
                             eval_pairs=synthetic_pairs(16, seed=1), release_base=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(model.params))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  separate = train_config(str(tmp_path / "separate"), STEPS)
  separate.dpo.shared_prompt = False
  params, summary = loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), separate,
                                   eval_pairs=synthetic_pairs(16, seed=1))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
  assert math.isclose(summary["eval"]["loss"], trained.summary["eval"]["loss"], abs_tol=1e-4)


def test_stop_and_resume_equals_uninterrupted(trained, tmp_path):
  out = str(tmp_path / "resumed")
  interrupted = train_config(out, STEPS)
  interrupted.train.stop_after_steps = 10
  model = _toy_model()
  _, first = loop.train_dpo(model, synthetic_pairs(64, seed=0), interrupted, eval_pairs=synthetic_pairs(16, 1))
  assert not first["complete"] and first["step"] == 10
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["10", "8"]
  ref_mtime = os.path.getmtime(os.path.join(out, loop.REFERENCE_FILE))
  params, second = loop.train_dpo(model, synthetic_pairs(64, seed=0), train_config(out, STEPS),
                                     eval_pairs=synthetic_pairs(16, 1))
  assert second["complete"] and second["step"] == STEPS
  assert os.path.getmtime(os.path.join(out, loop.REFERENCE_FILE)) == ref_mtime  # the cached pass is reused
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  resumed_rows = metrics.read_metrics(os.path.join(out, metrics.METRICS_FILE))
  assert [r["step"] for r in resumed_rows if r["split"] == "train"] == list(range(1, STEPS + 1))
  other = train_config(out, STEPS)
  with pytest.raises(ValueError, match=r"other settings \(.*data_fingerprint\.train"):
    loop.train_dpo(model, synthetic_pairs(64, seed=5), other)


def test_an_unreadable_latest_checkpoint_resumes_from_the_previous_one(trained, tmp_path, capsys):
  out = str(tmp_path / "resumed")
  interrupted = train_config(out, STEPS)
  interrupted.train.stop_after_steps = 10
  loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), interrupted, eval_pairs=synthetic_pairs(16, 1))
  latest = os.path.join(out, "checkpoints", "10")
  for root, _, files in os.walk(latest):  # every file of step 10 truncated to half
    for name in files:
      os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)
  capsys.readouterr()
  params, summary = loop.train_dpo(_toy_model(), synthetic_pairs(64, seed=0), train_config(out, STEPS),
                                   eval_pairs=synthetic_pairs(16, 1))
  log = capsys.readouterr().out.splitlines()
  reports = [line for line in log if " is unreadable (" in line]
  assert len(reports) == 1 and reports[0].startswith(f"checkpoint {latest} is unreadable (")
  assert f"resumed from step 8 ({out}/checkpoints)" in log
  assert summary["complete"] and summary["step"] == STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert os.listdir(os.path.join(out, "checkpoints.unreadable")) == ["10"]  # kept aside, not deleted


def test_data_order_schedule_and_decay_mask():
  a, epoch = pairs_lib.step_indices(20, 8, seed=3, step=1)
  b, _ = pairs_lib.step_indices(20, 8, seed=3, step=1)
  np.testing.assert_array_equal(a, b)
  assert epoch == 0 and len(set(a)) == 8
  first_epoch = np.concatenate([pairs_lib.step_indices(20, 8, 3, s)[0] for s in (0, 1)])
  assert len(set(first_epoch)) == 16  # no pair twice within an epoch
  assert pairs_lib.step_indices(20, 8, 3, 2)[1] == 1
  optim = types.SimpleNamespace(learning_rate=1.0, warmup_ratio=0.1, schedule="cosine")
  schedule = optimizer.learning_rate_schedule(optim, 100)
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0)]:
    assert float(schedule(step)) == pytest.approx(want, abs=1e-6)
  linear = optimizer.learning_rate_schedule(types.SimpleNamespace(**{**vars(optim), "schedule": "linear"}), 100)
  assert float(linear(55)) == pytest.approx(0.5, abs=1e-6)
  mask = optimizer.decay_mask({"embed": 0, "final_norm": 0, "layers": {"q": 0, "q_bias": 0, "attn_norm": 0}})
  assert mask == {"embed": True, "final_norm": False, "layers": {"q": True, "q_bias": False, "attn_norm": False}}


def test_batching_errors_name_the_setting(trained):
  config = train_config("", STEPS)
  config.train.grad_accum = 3
  with pytest.raises(ValueError, match="train.batch_size=8 must be a multiple of train.grad_accum=3"):
    loop.train_dpo(trained.model, synthetic_pairs(16, 0), config)
  config = train_config("", STEPS)
  with pytest.raises(ValueError, match="fewer than train.batch_size"):
    loop.train_dpo(trained.model, synthetic_pairs(4, 0), config)


def _multidevice_worker(out_path: str) -> None:
  """One step on 1 device (no accumulation), on fsdp=4 × tensor=2 (2 micro-batches) and on fsdp=8 with micro-batches
  of 2 pairs (4 micro-batches: fewer rows than devices, so the batch splits over its sequence); params to
  `out_path`."""
  devices = jax.devices()
  assert len(devices) == 8, devices
  results, specs = {}, {}
  for name, mesh, accum in (("one", sharding.make_mesh(None, devices[:1]), 1),
                            ("eight", sharding.make_mesh({"fsdp": 4, "tensor": 2}), 2),
                            ("sequence", sharding.make_mesh({"fsdp": 8}), 4)):
    model = _toy_model(mesh)
    model.params = jax.device_put(model.params, sharding.param_shardings(model.params, mesh))
    config = train_config("", steps=2)
    config.dpo.reference = "on_the_fly"
    config.optim.warmup_ratio = 0.0
    config.train.grad_accum = accum
    params, summary = loop.train_dpo(model, synthetic_pairs(16, seed=0), config)
    results[name] = {sharding.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    results[name]["loss"] = np.asarray(summary["train"]["loss"])
    specs[name] = list(params["layers"]["q"].sharding.spec)
    if name == "sequence":  # what a micro-batch of 2 pairs is placed as
      specs["sequence_batch"] = {k: list(v.spec) for k, v in steps.batch_shardings(
          mesh, {"input_ids": (4, 2, 2, 64), "ref_logps": (4, 2, 2)}).items()}
  np.savez(out_path, **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()})
  print(json.dumps(specs))


def test_eight_devices_equal_one_device(tmp_path):
  out = str(tmp_path / "params.npz")
  # Both meshes run in the subprocess, under the same flags (O0 codegen only shortens the compilations).
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-m", "tests.train.test_loop", out], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  specs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert specs["eight"] == [None, "fsdp", "tensor"]  # really sharded
  assert specs["sequence_batch"] == {"input_ids": [None, None, None, ["data", "fsdp"]], "ref_logps": [None, None, None]}
  with np.load(out) as f:
    names = [k[len("one/"):] for k in f.files if k.startswith("one/")]
    assert len(names) > 10
    for mesh in ("eight", "sequence"):
      for k in names:
        np.testing.assert_allclose(f[f"{mesh}/{k}"], f[f"one/{k}"], atol=1e-5, rtol=0, err_msg=f"{mesh}: {k}")


def _task_setup(tmp_path):
  """A tiny HF checkpoint with the embedded tokenizer, a preference file (plain and conversational rows) and a
  LoRA config of task dpo on them: (tokenizer, checkpoint directory, rows, config)."""
  from ipo_jax.model import loading, tokenizer as tokenizer_lib
  from tests import hf_checkpoints

  tok = tokenizer_lib.load_tokenizer(loading.embedded_model_path())
  ckpt = str(tmp_path / "policy")
  hf_checkpoints.make_checkpoint("llama_tied", ckpt, overrides={"vocab_size": len(tok), "num_hidden_layers": 2})
  tok.save_pretrained(ckpt)
  words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music"]
  rows = [{"prompt": f"Say a word like {words[i % 8]}.", "chosen": words[(i + 1) % 8], "rejected": "no"}
          for i in range(12)]
  rows[5] = {"prompt": [{"role": "user", "content": "Name a colour."}],
             "chosen": [{"role": "assistant", "content": "green"}], "rejected": [{"role": "assistant", "content": "x"}]}
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))

  config = dpo_config.get_config()
  config.model.path = ckpt
  config.output_dir = str(tmp_path / "run")
  config.data.update(path=str(data), eval_fraction=0.25, max_length=64, max_prompt_length=48)
  config.lora.update(rank=4, alpha=8.0)
  config.optim.update(learning_rate=1e-2)
  config.train.update(batch_size=3, max_steps=4, stop_after_steps=2)
  config.eval.update(batch_size=3)
  config.checkpoint.update(every=1)
  config.log.update(tqdm=False)
  return tok, ckpt, rows, config


def test_cli_task_trains_checkpoints_resumes_and_exports(tmp_path):
  import torch
  import transformers

  from ipo_jax import main
  from ipo_jax.model import loading
  from ipo_jax.data import DataError

  tok, ckpt, rows, config = _task_setup(tmp_path)
  first = main.run_task(config)
  assert not first["complete"] and "export_dir" not in first
  assert sorted(os.listdir(os.path.join(config.output_dir, "checkpoints"))) == ["1", "2"]
  config.train.stop_after_steps = 0
  summary = main.run_task(config)
  assert summary["complete"] and summary["step"] == 4 and summary["eval_pairs"] == 3
  assert json.load(open(os.path.join(config.output_dir, "summary.json")))["step"] == 4

  # LoRA: the checkpoint holds the adapters only, B was trained away from zero, and the export is the untouched
  # base plus the merged update.
  saved = checkpoint.Checkpointer(os.path.join(config.output_dir, "checkpoints"), every=1)
  state, _ = saved.restore(4)
  saved.close()
  adapters = jax.tree.map(np.asarray, state["params"])
  assert sorted(adapters["layers"]) == sorted(lora.TARGETS)
  assert all(np.abs(adapters["layers"][n]["lora_b"]).max() > 1e-4 for n in lora.TARGETS)
  exported = loading.load_model(summary["export_dir"])
  start = loading.load_model(ckpt)
  want = lora.merge(start.params, adapters, steps.Settings.from_config(config).lora)
  for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  hf = transformers.AutoModelForCausalLM.from_pretrained(summary["export_dir"], dtype=torch.float32)
  ids = np.asarray(tok(["Say a word like stone."])["input_ids"])
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(exported.logits(ids)), want, atol=1e-4, rtol=0)

  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
  config.data.path = str(bad)
  config.output_dir = str(tmp_path / "bad_run")
  with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'rejected' is missing or empty"):
    main.run_task(config)


def test_task_rerun_with_other_settings_is_refused_and_the_same_settings_resume(tmp_path):
  from ipo_jax import data, main, rundir

  _, _, _, config = _task_setup(tmp_path)
  config.train.update(max_steps=2, stop_after_steps=0)
  finished = main.run_task(config)
  assert finished["complete"] and finished["step"] == 2
  before = file_hashes(config.output_dir)
  assert {"run.json", "config.json", "summary.json", loop.REFERENCE_FILE, metrics.METRICS_FILE} <= set(before)

  changed = copy.deepcopy(config)
  changed.optim.learning_rate = 5e-3
  with pytest.raises(rundir.IdentityMismatch, match=r"other settings \(optim\.learning_rate differ\)"):
    main.run_task(changed)
  assert file_hashes(config.output_dir) == before  # nothing of the finished run was touched

  resumed = main.run_task(config)  # the same settings: resumes from the last checkpoint, trains no step again
  assert resumed["complete"] and resumed["step"] == 2
  train_steps = [r["step"] for r in data.iter_jsonl(os.path.join(config.output_dir, metrics.METRICS_FILE))
                 if r["split"] == "train"]
  assert train_steps == [1, 2]
  assert sorted(os.listdir(os.path.join(config.output_dir, "checkpoints"))) == ["1", "2"]
  assert resumed["train"] == finished["train"]  # the last logged row, read back
  assert resumed["eval"]["loss"] == pytest.approx(finished["eval"]["loss"], abs=1e-6)


if __name__ == "__main__":
  _multidevice_worker(sys.argv[1])
