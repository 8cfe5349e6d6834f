"""The experiment scripts' wiring: launch commands and the configs they build (no model runs here)."""

import importlib.util
import math
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


rewardbench_ensemble = _script("rewardbench_ensemble")
rewardbench_ipo_vs_self_reward = _script("rewardbench_ipo_vs_self_reward")
self_improvement = _script("self_improvement")


def _run(script, args, **env):
  return subprocess.run(["bash", str(REPO / "experiments" / script), *args], capture_output=True, text=True,
                        env={**os.environ, **env}, check=False)


def test_multi_gpu_launch_sets_distributed_flags():
  out = _run("launch_multi_gpu.sh", ["--config", "configs/self_improve.py:paper"], PYTHON="echo",
             COORDINATOR="10.0.0.1:1234", NUM_PROCESSES="2", PROCESS_ID="1")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["-m", "ipo_jax.main", "--config", "configs/self_improve.py:paper",
                                "--config.distributed.enabled=True",
                                "--config.distributed.coordinator_address=10.0.0.1:1234",
                                "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
  single = _run("launch_multi_gpu.sh", ["--config", "c.py"], PYTHON="echo", COORDINATOR="", SLURM_JOB_ID="")
  assert single.stdout.split() == ["-m", "ipo_jax.main", "--config", "c.py"]
  assert _run("launch_multi_gpu.sh", []).returncode == 2


def test_tpu_pod_launch_runs_on_every_worker(tmp_path):
  gcloud = tmp_path / "gcloud"
  gcloud.write_text('#!/usr/bin/env bash\necho "$@"\n')
  gcloud.chmod(0o755)
  out = _run("launch_tpu_pod.sh", ["run", "--config", "configs/rewardbench.py:paper", "--config.output_dir=a b"],
             PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="z")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("compute tpus tpu-vm ssh pod --zone z --worker=all --command ")
  assert out.stdout.rstrip().endswith("-m ipo_jax.main --config configs/rewardbench.py:paper "
                                      "--config.output_dir=a\\ b --config.distributed.enabled=True")
  assert _run("launch_tpu_pod.sh", ["run"], TPU_NAME="", ZONE="z").returncode != 0


def test_rewardbench_comparison_scores_the_same_pairs(tmp_path):
  ipo, self_reward = rewardbench_ipo_vs_self_reward.method_configs("gemma3-270m", str(tmp_path), 3, 64)
  assert ipo.data.to_dict() == self_reward.data.to_dict() and ipo.data.max_per_subset == 3
  assert ipo.model.path == self_reward.model.path == "gemma3-270m"
  assert ipo.task == "rewardbench" and self_reward.task == "rewardbench_self_reward"
  assert ipo.scoring.truncation == "paper" and self_reward.sampling.max_new_tokens == 64
  assert ipo.output_dir != self_reward.output_dir


def test_ensemble_comparison_differs_only_in_the_instructions(tmp_path):
  single, ensemble = rewardbench_ensemble.run_configs("embedded", str(tmp_path), 0, 5)
  assert single.scoring.prompts_file == "paper:rewardbench_prompts"
  assert ensemble.scoring.prompts_file == "paper:candidate_prompts"
  assert (single.data.max_per_subset, ensemble.data.max_per_subset) == (0, 5)
  strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("scoring", "data", "output_dir")}
  assert strip(single) == strip(ensemble)
  assert {k: v for k, v in single.scoring.items() if k != "prompts_file"} == {
      k: v for k, v in ensemble.scoring.items() if k != "prompts_file"}
  assert single.scoring.truncation == "paper" and single.output_dir != ensemble.output_dir


def test_ensemble_recombined_by_mean_log_odds():
  # Two candidates on which the combinations disagree.
  row = {"subset": "s", "id": 0, "correct": True, "tie": False,
         "candidates": {"log_odds_chosen": [2.0, 2.0], "log_odds_rejected": [-1.0, 8.0]}}
  sig = lambda x: 1 / (1 + math.exp(-x))
  assert sig(2.0) > (sig(-1.0) + sig(8.0)) / 2  # mean P(Yes): 0.881 vs 0.634, chosen wins
  (out,) = rewardbench_ensemble.recombine([row], "mean_log_odds")
  assert out["correct"] is False and out["tie"] is False  # mean log-odds: 2 vs 3.5, rejected wins
  (same,) = rewardbench_ensemble.recombine([row], "mean_prob")
  assert same["correct"] is True
  single = {"subset": "s", "id": 1, "correct": True, "tie": False}  # one instruction: nothing to recombine
  assert rewardbench_ensemble.recombine([single], "mean_log_odds") == [single]


@pytest.mark.parametrize("arm", ["ipo", "reward_model"])
def test_arm_configs_differ_only_in_the_labels(arm, tmp_path):
  config = self_improvement.arm_config("local", arm, str(tmp_path), "m", 2, "rm_dir")
  base = self_improvement.arm_config("local", "random", str(tmp_path), "m", 2, "rm_dir")
  assert config.label.arm == arm and config.rounds == 2 and config.reward_model.path == "rm_dir"
  assert config.output_dir == str(tmp_path / arm)
  strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("label", "output_dir")}
  assert strip(config) == strip(base)
