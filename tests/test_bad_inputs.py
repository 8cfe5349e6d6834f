"""Bad input through the real command line: exit status 2, one last line `error: ...` naming the file, row, tensor
or config key (and no traceback), and results already written are left byte-identical.

Most cases run `ipo_jax.main.main([...])` in this process (the same code path as `python -m ipo_jax.main`, without
a 3 s interpreter start per case); a few run as real subprocesses, in parallel.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ipo_jax import main as main_lib
from ipo_jax.model import loading
from tests.conftest import file_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RB_ROW = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 1}
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
                  intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def _tiny_checkpoint(directory, shapes_override=None):
  """A random tiny Llama HF directory (config.json + model.safetensors), written with numpy only."""
  import transformers
  from safetensors.numpy import save_file
  from ipo_jax.model import params as params_lib
  from ipo_jax.model.architecture import ModelConfig
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(TINY_LLAMA, f)
  cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(directory))
  shapes, rng, tensors = params_lib.flat_shapes(cfg), np.random.default_rng(0), {}
  for path, (name, transposed) in params_lib.hf_weight_names(cfg).items():
    shape = shapes[path][1:] if path.startswith("layers/") else shapes[path]
    shape = tuple(reversed(shape)) if transposed else tuple(shape)
    for i in range(cfg.num_layers if path.startswith("layers/") else 1):
      tensors[name.format(i=i)] = rng.normal(size=shape).astype(np.float32)
  tensors.update({k: np.zeros(v, np.float32) for k, v in (shapes_override or {}).items()})
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Every bad input file, and a finished-looking generate run directory."""
  d = tmp_path_factory.mktemp("bad")
  f = {}

  def write(name, payload):
    (d / name).write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    f[name] = str(d / name)

  write("latin1.jsonl", b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n')
  write("latin1.json", b'[{"instruction": "ok"},\n {"instruction": "caf\xe9"}]')
  write("broken.jsonl", '{"instruction": "ok"}\n{"instruction": \n')
  write("cut.jsonl.gz", gzip.compress(b'{"instruction": "ok"}\n' * 200)[:40])
  write("random.parquet", os.urandom(300))
  write("nofields.jsonl", '{"q": "a", "chosen": "b"}\n')
  write("pairs.jsonl", json.dumps(RB_ROW) + "\n")
  renamed = {"question": RB_ROW["prompt"], "good": "4", "bad": "5", "subset": "math-prm", "id": 1}
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist([renamed]), str(d / "renamed.parquet"))
  f["renamed.parquet"] = str(d / "renamed.parquet")
  gguf = open(loading.embedded_model_path(), "rb").read()
  write("cut.gguf", gguf[:len(gguf) // 2])
  good = _tiny_checkpoint(str(d / "tiny"))
  f["tiny"] = good
  data = open(os.path.join(good, "model.safetensors"), "rb").read()
  for name, payload in (("random_st", os.urandom(4096)), ("cut_st", data[:len(data) - 3000])):
    os.makedirs(d / name)
    (d / name / "config.json").write_text(json.dumps(TINY_LLAMA))
    (d / name / "model.safetensors").write_bytes(payload)
    f[name] = str(d / name)
  f["shape_st"] = _tiny_checkpoint(str(d / "shape_st"), {"model.layers.1.mlp.up_proj.weight": (100, 64)})
  os.makedirs(d / "noconfig")
  f["noconfig"] = str(d / "noconfig")
  write("a_file", "not a directory")
  f["run"] = _finished_generate_run(str(d / "run"), f["pairs.jsonl"])
  return f


def _finished_generate_run(output_dir, data_path):
  """A generate run directory as a finished run leaves it (run.json with its identity, rows, summary)."""
  from configs import generate
  from ipo_jax import data
  from ipo_jax.rundir import RunDir
  from ipo_jax.tasks import generate as generate_task
  config = generate.get_config("greedy")
  config.output_dir, config.data.path = output_dir, data_path
  run = RunDir.open(output_dir, "generate", generate_task.identity(config))
  data.append_jsonl(run.file("generations.jsonl"), [{"index": 0, "instruction": RB_ROW["prompt"], "sample": 0,
                                                     "text": "4", "token_ids": [1], "finish_reason": "eos"}])
  run.finish({"prompts": 1})
  return output_dir


def _run_in_process(argv, capsys):
  """(exit code, stderr) of `python -m ipo_jax.main <argv>`, run in this process."""
  capsys.readouterr()
  try:
    main_lib.main(["ipo_jax.main", *argv])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def _generate(*overrides, run_dir=None):
  return ["--config", f"{CONFIGS}/generate.py:greedy", "--config.data.limit=1",
          f"--config.output_dir={run_dir}" if run_dir else "--config.output_dir=", *overrides]


# (config, overrides, what the error line must contain); "{name}" is a path from the `files` fixture. Cases marked
# with "run" use the finished run directory as output_dir: its files must stay byte-identical.
CASES = [
    ("generate", ["--config.model.dtype=float64"], ["model.dtype='float64'", "float32, bfloat16, float16"]),
    ("generate", ["--config.model.dtype=int8"], ["model.dtype='int8'"]),
    ("generate", ["--config.model.attention=flash"], ["model.attention='flash'", "auto, xla, splash, cudnn"]),
    ("generate", ["--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=1"],
     ["needs 2 devices", "mesh.shape.data=2", "there is 1 cpu device"]),
    ("generate", ["--config.mesh.shape.tensor=0"], ["mesh.shape.tensor=0"]),
    ("generate", ["--config.sampling.batch_size=0"], ["sampling.batch_size=0"]),
    ("generate", ["--config.sampling.num_samples=0"], ["sampling.num_samples=0"]),
    ("generate", ["--config.sampling.max_new_tokens=-5"], ["sampling.max_new_tokens=-5"]),
    ("generate", ["--config.sampling.top_p=0.0"], ["sampling.top_p=0.0"]),
    ("generate", ["--config.sampling.max_prompt_tokens=-1"], ["sampling.max_prompt_tokens=-1"]),
    ("self_improve", ["--config.self_reward.sampling.temperature=-1.0"], ["self_reward.sampling.temperature"]),
    ("rewardbench", ["--config.scoring.max_batch=0"], ["scoring.max_batch=0"]),
    ("rewardbench", ["--config.scoring.layout=nope"], ["scoring.layout must be one of"]),
    ("rewardbench", ["--config.scoring.truncation=nope"], ["scoring.truncation must be one of"]),
    ("rewardbench", ["--config.data.split=nope"], ["data.split must be one of"]),
    ("rewardbench", ["--config.scoring.prompts_file={a_file}.json"], ["prompts file not found", "a_file.json"]),
    ("generate", ["--config.output_dir={a_file}/sub"], ["output_dir", "a_file", "is a file"]),
    ("generate", ["--config.output_dir=/proc/ipo_jax_test/out"], ["output_dir /proc/ipo_jax_test/out", "writable"]),
    ("generate", ["--config.model.path=./no/such/model"], ["no such local model directory", "./no/such/model"]),
    ("generate", ["--config.model.path=configs/no_such_model"],
     ["no such local model directory", "configs/no_such_model", "model.allow_hub=True", "hf:configs/no_such_model"]),
    ("generate", ["--config.model.path=missing.gguf"], ["missing.gguf"]),
    ("generate", ["--config.data.path={latin1.jsonl}"], ["latin1.jsonl: line 2 is not UTF-8"]),
    ("generate", ["--config.data.path={latin1.json}"], ["latin1.json: line 2 is not UTF-8"]),
    ("generate", ["--config.data.path={broken.jsonl}"], ["broken.jsonl: line 2 is not valid JSON"]),
    ("generate", ["--config.data.path={cut.jsonl.gz}"], ["cut.jsonl.gz", "cut short"]),
    ("generate", ["--config.data.path={a_file}.jsonl"], ["data file not found", "a_file.jsonl"]),
    ("generate", ["--config.data.path={nofields.jsonl}"], ["nofields.jsonl", "data.field="]),
    ("generate", ["--config.data.path={pairs.jsonl}", "--config.data.format=nope"], ["data.format='nope'"]),
    ("generate", ["--config.data.path={pairs.jsonl}", "--config.data.format=hh_rlhf"],
     ["pairs.jsonl: row 0 field 'chosen' is not a", "data.field="]),
    ("generate", ["--config.data.path={pairs.jsonl}", "--config.data.field=question"],
     ["pairs.jsonl", "'question'", "data.field=<column>"]),
    ("rewardbench", ["--config.data.path={random.parquet}"], ["random.parquet: not a readable parquet file"]),
    ("rewardbench", ["--config.data.path={renamed.parquet}"],
     ["renamed.parquet: row 0", "'prompt'", "data.columns.prompt=<column>"]),
    ("rewardbench", ["--config.data.path={pairs.jsonl}", "--config.data.subsets=nope"], ["data.subsets"]),
    ("model_info", ["--config.model.path={cut.gguf}"], ["cut.gguf: the file is cut short: tensor 'blk."]),
    ("model_info", ["--config.model.path={random_st}"], ["random_st/model.safetensors", "not a safetensors file"]),
    ("model_info", ["--config.model.path={cut_st}"], ["cut_st/model.safetensors", "cut short: tensor 'model."]),
    ("model_info", ["--config.model.path={shape_st}"],
     ["shape_st/model.safetensors", "'model.layers.1.mlp.up_proj.weight' has shape [100, 64]", "[112, 64]"]),
    ("model_info", ["--config.model.path={noconfig}"], ["noconfig has no config.json"]),
    ("generate", ["--config.task=nope"], ["unknown task 'nope'"]),
    ("generate", ["--config.sampling.batchsize=1"],
     ["invalid --config override --config.sampling.batchsize", "batch_size"]),
    # An existing run directory: refused before anything is written.
    ("run", ["--config.sampling.temperature=0.5"], ["other settings", "sampling.temperature"]),
    ("run", ["--config.data.path={latin1.jsonl}"], ["latin1.jsonl: line 2 is not UTF-8"]),
    ("run", ["--config.model.dtype=float64"], ["model.dtype"]),
    ("run", ["--config.data.path={pairs.jsonl}", "--config.data.format=hh_rlhf"], ["row 0 field 'chosen'"]),
]


def _fill(text, files):
  for name, path in files.items():
    text = text.replace("{" + name + "}", path)
  return text


def _argv(config, overrides, files):
  overrides = [_fill(o, files) for o in overrides]
  if config == "run":
    return _generate(f"--config.data.path={files['pairs.jsonl']}", *overrides, run_dir=files["run"])
  base = {"generate": _generate(), "model_info": ["--config", f"{CONFIGS}/model_info.py"],
          "rewardbench": ["--config", f"{CONFIGS}/rewardbench.py", "--config.output_dir="],
          "self_improve": ["--config", f"{CONFIGS}/self_improve.py:local", "--config.output_dir="]}[config]
  return base + overrides


def _check(code, err, expected, argv):
  lines = err.strip().splitlines()
  assert code == 2, (argv, code, err[-2000:])
  assert "Traceback" not in err, err[-2000:]
  assert lines and lines[-1].startswith("error: "), err[-2000:]
  for text in expected:
    assert text in lines[-1], (text, lines[-1])


@pytest.mark.parametrize("config, overrides, expected", CASES, ids=[
    f"{i:02d}-{c}-{o[-1].split('=')[0].removeprefix('--config.')}" for i, (c, o, _) in enumerate(CASES)])
def test_bad_input_in_process(files, capsys, config, overrides, expected):
  before = file_hashes(files["run"])
  argv = _argv(config, overrides, files)
  code, err = _run_in_process(argv, capsys)
  _check(code, err, expected, argv)
  assert file_hashes(files["run"]) == before


def test_bad_inputs_as_subprocesses(files):
  """The real `python -m ipo_jax.main`: the same one-line errors and exit status 2 (cases run in parallel)."""
  picked = [CASES[0], CASES[2], CASES[12], CASES[16], CASES[-3]]
  before = file_hashes(files["run"])
  procs = []
  for config, overrides, expected in picked:
    argv = _argv(config, overrides, files)
    procs.append((argv, expected, subprocess.Popen([sys.executable, "-m", "ipo_jax.main", *argv], cwd=ROOT,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for argv, expected, proc in procs:
    _, err = proc.communicate(timeout=300)
    _check(proc.returncode, err, expected, argv)
  assert file_hashes(files["run"]) == before


def test_traceback_flag_and_environment_show_the_stack(files, capsys, monkeypatch):
  argv = _generate("--config.model.dtype=float64")
  with pytest.raises(ValueError, match="model.dtype='float64'"):
    main_lib.main(["ipo_jax.main", "--traceback", *argv])
  monkeypatch.setenv("IPO_JAX_TRACEBACK", "1")
  with pytest.raises(ValueError, match="model.dtype='float64'"):
    main_lib.main(["ipo_jax.main", *argv])
  monkeypatch.delenv("IPO_JAX_TRACEBACK")
  code, err = _run_in_process(argv, capsys)  # the flag does not stick to the next run
  assert code == 2 and err.startswith("error: ")


def test_other_exceptions_keep_their_traceback(capsys, monkeypatch):
  def broken(config):
    raise RuntimeError("a bug, not bad input")

  monkeypatch.setattr(main_lib, "run_task", broken)
  with pytest.raises(RuntimeError, match="a bug"):
    main_lib.main(["ipo_jax.main", *_generate()])


def test_source_unavailable_exits_2(capsys, monkeypatch, tmp_path):
  """No copy of a data set anywhere (offline, empty cache and offline copy): one line, exit 2 (was exit 1)."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("IPO_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("IPO_JAX_DATA", str(tmp_path / "no_offline_copy"))
  code, err = _run_in_process(_generate("--config.data.path=no-such-org/no-such-dataset"), capsys)
  assert code == 2 and "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith("error: ") and "no-such-org/no-such-dataset" in err


def test_data_columns_override_from_the_command_line(files, capsys):
  """--config.data.columns.<field>=<column> is accepted and maps the file's columns ("" keeps the name)."""
  from ipo_jax.evals import rewardbench
  main_lib.parse_flags(["ipo_jax.main", "--config", f"{CONFIGS}/rewardbench.py",
                        f"--config.data.path={files['renamed.parquet']}", "--config.data.columns.prompt=question",
                        "--config.data.columns.chosen=good", "--config.data.columns.rejected=bad"])
  config = main_lib._CONFIG.value  # pylint: disable=protected-access
  assert dict(config.data.columns) == {"prompt": "question", "chosen": "good", "rejected": "bad", "subset": "",
                                       "id": ""}
  pairs = rewardbench.load_pairs(config.data)
  assert [dict(p) for p in pairs] == [RB_ROW]


def test_generate_reads_a_rewardbench_file_from_its_prompts(files):
  """A RewardBench pairs file given to generate (format auto): the instructions are its `prompt` field."""
  from ipo_jax.sample import instructions
  assert instructions.load_instructions({"path": files["pairs.jsonl"]}) == [(0, RB_ROW["prompt"])]


def test_hub_safety(files, monkeypatch):
  """A missing path that reads as local never reaches the hub; `allow_hub` or `hf:` sends a hub id there."""
  calls = []
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or files["tiny"])
  for path in ("./x/y", "~/no_such_model_dir", "/no/such/dir", "configs/no_such_model", "m.safetensors", "a/b/c"):
    with pytest.raises(FileNotFoundError, match="no such local model directory"):
      loading.resolve_model_path(path)
  assert not calls
  assert loading.resolve_model_path("configs/no_such_model", allow_hub=True) == files["tiny"]
  assert loading.resolve_model_path("hf:configs/no_such_model") == files["tiny"]
  assert loading.resolve_model_path("no-such-org-xyz/model") == files["tiny"]  # an ordinary hub id
  assert calls == ["configs/no_such_model"] * 2 + ["no-such-org-xyz/model"]
  model = loading.load_model(files["tiny"])  # the good tiny checkpoint loads
  assert model.config.num_layers == 2
