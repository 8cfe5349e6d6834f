"""The generate task: the embedded SmolLM2 against transformers' `generate`, resuming, and refusing other settings."""

import numpy as np
import pytest
import torch
import transformers

from configs import generate
from ipo_jax import data
from ipo_jax.model import loading, params as params_lib
from ipo_jax.rundir import IdentityMismatch
from ipo_jax.sample import engine, instructions
from ipo_jax.tasks import generate as generate_task


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


@pytest.fixture(scope="module")
def hf_smollm(smollm):
  """transformers' Llama with the same weights (their GGUF loading is checked against ours in test_loading)."""
  state = {}
  for path, (name, transposed) in params_lib.hf_weight_names(smollm.config).items():
    value = np.asarray(smollm.params["layers"][path[7:]] if path.startswith("layers/") else smollm.params[path])
    for i, w in enumerate(value) if path.startswith("layers/") else [(0, value)]:
      state[name.format(i=i)] = torch.tensor(w.T if transposed else w)
  model = transformers.LlamaForCausalLM(smollm.hf_config).to(torch.float32).eval()
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head
  model.tie_weights()
  return model


def _generate_config(output_dir, **sampling):
  config = generate.get_config("greedy")
  config.output_dir = str(output_dir)
  config.data.start, config.data.limit = 801, 4  # held-out AlpacaEval instructions
  config.sampling.update(sampling)
  return config


def test_generate_task_greedy_matches_transformers_and_resumes(smollm, hf_smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(generate_task.runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  config = _generate_config(tmp_path, max_new_tokens=64)
  summary = generate_task.run(config)
  path = tmp_path / engine.GENERATIONS_FILE
  rows = sorted(data.iter_jsonl(path), key=lambda r: r["index"])
  assert [r["index"] for r in rows] == [801, 802, 803, 804] and summary["generated"] == 4
  torch.set_num_threads(1)
  for row in rows:
    ids = torch.tensor([instructions.encode_prompt(smollm.tokenizer,
                                                   instructions.format_prompt(smollm.tokenizer, row["instruction"]))])
    with torch.no_grad():
      ref = hf_smollm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
    expected = ref.sequences[0, ids.shape[1]:].tolist()
    got = row["token_ids"]
    diverge = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if diverge is None:
      assert got == expected
      assert row["finish_reason"] == ("eos" if expected[-1] == 2 else "length")
      assert row["num_tokens"] == len(got)
      assert row["text"] == smollm.tokenizer.decode(got[:-1] if expected[-1] == 2 else got,
                                                     skip_special_tokens=True)
    else:  # only after a near-tie of transformers' top two logits
      top2 = torch.topk(ref.scores[diverge][0], 2).values
      assert float(top2[0] - top2[1]) < 1e-4, (row["index"], diverge)

  # Resume: lose three rows (the longest prompts: the same compiled shapes) and leave a torn line.
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(lines[-1] + lines[0][:25])
  again = generate_task.run(config)
  assert again["generated"] == 3 and again["resumed"] == 1 and again["compilations"] == 0
  assert sorted(data.iter_jsonl(path), key=lambda r: r["index"]) == rows
  with pytest.raises(ValueError, match="sampling"):
    generate_task.run(_generate_config(tmp_path, max_new_tokens=32))


def _files(directory):
  """{relative path: bytes} of every file under `directory`."""
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_generate_task_refuses_other_sampling_settings_and_resumes_the_same(smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(generate_task.runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  config = _generate_config(tmp_path, max_new_tokens=4)
  config.data.limit = 2
  first = generate_task.run(config)
  assert first["generated"] == 2 and (tmp_path / "run.json").exists() and (tmp_path / "summary.json").exists()
  finished = _files(tmp_path)
  hotter = _generate_config(tmp_path, max_new_tokens=4, temperature=0.5)
  hotter.data.limit = 2
  with pytest.raises(IdentityMismatch, match=r"sampling\.temperature") as err:
    generate_task.run(hotter)
  assert "sampling.max_new_tokens" not in str(err.value)
  assert _files(tmp_path) == finished  # refused before anything was written
  again = generate_task.run(config)  # the same settings resume: nothing left to do
  assert again["generated"] == 0 and again["resumed"] == 2
  assert (tmp_path / engine.GENERATIONS_FILE).read_bytes() == finished[engine.GENERATIONS_FILE]


def test_bad_data_and_sizes_fail_before_the_run_directory_opens(tmp_path):
  """Bad prompt data or a zero batch size stops before output_dir is created, so fixing it and rerunning is not
  refused as "other settings" (no model is loaded)."""
  bad = tmp_path / "latin1.jsonl"
  bad.write_bytes(b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n')
  config = _generate_config(tmp_path / "out")
  config.data.path, config.data.limit = str(bad), 0
  with pytest.raises(data.DataError, match=r"latin1\.jsonl: line 2 is not UTF-8"):
    generate_task.run(config)
  config = _generate_config(tmp_path / "out")
  config.sampling.batch_size = 0
  with pytest.raises(ValueError, match=r"sampling\.batch_size=0"):
    generate_task.run(config)
  assert not (tmp_path / "out").exists()
