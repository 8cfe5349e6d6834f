"""The command line: task dispatch, config overrides and clear errors; the model_info task."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
  return subprocess.run([sys.executable, "-m", "ipo_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def test_unknown_field_names_it_and_suggests():
  out = cli("--config", "configs/model_info.py", "--config.info.promt=x")
  assert out.returncode != 0
  assert "invalid --config override" in out.stderr and 'Did you mean "prompt"' in out.stderr


def test_bad_value_and_unknown_task():
  out = cli("--config", "configs/model_info.py", "--config.info.top_k=abc")
  assert out.returncode != 0 and "top_k" in out.stderr
  out = cli("--config", "configs/model_info.py", "--config.task=nope")
  assert out.returncode != 0
  assert "unknown task 'nope'; valid tasks: aot, dpo, generate, model_info, rewardbench, " in out.stderr
  assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr


def test_model_info_with_overrides():
  out = cli("--config", "configs/model_info.py", "--config.info.chat_template=False", "--config.info.top_k=3",
            "--config.info.prompt=The capital of France is")
  assert out.returncode == 0, out.stderr
  assert "134,515,008" in out.stdout and "30 layers, d=576, 9/3 heads" in out.stdout
  assert "prompt       'The capital of France is'" in out.stdout
  probs = [float(line.split()[0]) for line in out.stdout.splitlines() if line.startswith("    0.")]
  assert len(probs) == 3 and probs == sorted(probs, reverse=True)
  assert "' Paris'" in out.stdout.split("prompt")[-1]


def test_configs_load_from_any_working_directory(tmp_path):
  """configs/*.py import `configs.common`: the folder holding configs/ is importable wherever the command runs."""
  out = subprocess.run([sys.executable, "-m", "ipo_jax.main", "--config",
                        os.path.join(ROOT, "configs", "rewardbench.py") + ":demo,chat", "--config.task=nope"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0 and "unknown task 'nope'" in out.stderr
