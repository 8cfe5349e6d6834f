"""Task `aot`: the paper's jobs compiled for a TPU slice from this CPU host, through the command line."""

import json
import os

import pytest

from ipo_jax import main as main_lib
from ipo_jax.aot import targets
from ipo_jax.tasks import aot as aot_task
from tests import conftest

TINY = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "architectures": ["LlamaForCausalLM"]}


@pytest.fixture
def tiny_dir(tmp_path):
  """A model directory with only its config.json: the task needs shapes, not weights."""
  path = tmp_path / "tiny"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(TINY))
  return str(path)


def _argv(tiny_dir, out, *extra):
  return ["main", "--config", "configs/aot.py:tiny", f"--config.model.path={tiny_dir}", f"--config.output_dir={out}",
          "--config.programs=score,generate,dpo", "--config.train.batch_size=8", *extra]


def test_aot_task_writes_the_table_and_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
  out = str(tmp_path / "aot")
  main_lib.main(_argv(tiny_dir, out))
  printed = capsys.readouterr().out
  result = json.load(open(os.path.join(out, "aot.json")))
  rows = {r["job"]["program"]: r for r in result["programs"]}
  assert set(rows) == {"score", "generate", "dpo"}
  assert result["target"]["name"] == "tpu:v5e:2x2" and result["target"]["num_devices"] == 4
  for r in rows.values():
    assert r["fits"] and r["compiled"] and r["job"]["mesh_shape"] == [1, 4, 1]
    assert 0 < r["needed_bytes"] < r["limit_bytes"] and r["flops"] > 0 and r["step_seconds"] > 0
    assert 0 < r["mfu"] < 1
  score = rows["score"]["job"]
  job = aot_task.jobs.Job(**{**score, "mesh_shape": tuple(score["mesh_shape"])})
  assert rows["score"]["model_flops"] == pytest.approx(aot_task.jobs.model_flops(_cfg(tiny_dir), job))
  assert "| score " in printed and "tpu:v5e:2x2" in printed
  report = open(os.path.join(out, "report.md")).read()
  assert "| dpo " in report and "Time model" in report
  top = rows["score"]["top_kernels"]  # where the estimated compute goes, written in words in the table
  assert top[-1]["kernel"] == "all matmuls" and 0 < top[-1]["share"] <= 1 and 0 < top[-1]["peak_fraction"] <= 1
  assert aot_task.hlo.describe_top_kernels(top) in report
  # A rerun compiles nothing: every program's row is in the run directory.
  monkeypatch.setattr(aot_task, "compile_job", lambda *a, **k: pytest.fail("recompiled a finished program"))
  main_lib.main(_argv(tiny_dir, out))
  hashes = conftest.file_hashes(out)
  with pytest.raises(SystemExit) as e:
    main_lib.main(_argv(tiny_dir, out, "--config.target=tpu:v5e:2x4"))
  assert e.value.code == 2 and "target" in capsys.readouterr().err
  assert conftest.file_hashes(out) == hashes


def _cfg(tiny_dir):
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel
  return loading.model_config(tiny_dir)


def test_auto_mesh_compiles_candidates_and_picks_one_that_fits(tiny_dir, tmp_path, capsys):
  out = str(tmp_path / "auto")
  main_lib.main(_argv(tiny_dir, out, "--config.programs=score", "--config.mesh.auto=True"))
  result = json.load(open(os.path.join(out, "aot.json")))
  shapes = [tuple(r["job"]["mesh_shape"]) for r in result["programs"]]
  assert shapes == [(1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]
  best = min((r for r in result["programs"] if r["fits"]), key=lambda r: r["step_seconds"] / r["job"]["rows"])
  assert result["best"] == {"score": best["key"]}
  assert "(best)" in capsys.readouterr().out


def test_bad_settings_are_one_line(tiny_dir, tmp_path, capsys):
  for extra, words in ((["--config.target=tpu:v9:2x2"], "target"), (["--config.programs=score,train"], "programs"),
                       (["--config.mesh.shape.fsdp=3"], "mesh.shape")):
    with pytest.raises(SystemExit) as e:
      main_lib.main(_argv(tiny_dir, str(tmp_path / "bad"), *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_a_target_whose_compiler_is_not_installed_is_one_line_before_anything_is_written(tiny_dir, tmp_path, capsys,
                                                                                         monkeypatch):
  monkeypatch.setattr(targets, "libtpu_missing", lambda: "TPU targets need libtpu: `make setup-dev`")
  out = tmp_path / "no_libtpu"
  with pytest.raises(SystemExit) as e:
    main_lib.main(_argv(tiny_dir, str(out)))
  err = capsys.readouterr().err
  assert e.value.code == 2 and err == "error: target=tpu:v5e:2x2: TPU targets need libtpu: `make setup-dev`\n", err
  assert not out.exists() or not any(out.iterdir())
