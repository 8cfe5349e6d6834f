"""Tasks `rewardbench_reward_model` (a tiny random classifier) and `rewardbench_pairwise` (the embedded model):
outputs, rows, resume, refusal of other settings, the command line."""

import json

import numpy as np
import pytest
import torch

from configs import rewardbench_pairwise as pairwise_config
from configs import rewardbench_reward_model as reward_model_config
from ipo_jax import data, main, runtime
from ipo_jax.evals import pairwise, reward_model, rewardbench
from ipo_jax.model import loading
from ipo_jax.rundir import REPORT_FILE, RUN_FILE, SUMMARY_FILE
from ipo_jax.tasks import rewardbench_pairwise, rewardbench_reward_model
from tests import hf_checkpoints
from tests.conftest import file_hashes
from tests.evals.test_reward_model import classifier_checkpoint

SUBSETS = "alpacaeval-easy,hep-python,donotanswer"


@pytest.fixture(scope="module")
def smollm():
  return loading.load_model("embedded")


@pytest.fixture(scope="module")
def classifier(smollm, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("rm"))
  return directory, classifier_checkpoint(directory, "llama", smollm.tokenizer)


def _rm_config(output_dir, path, **section):
  config = reward_model_config.get_config("demo")
  config.model.path, config.output_dir = path, str(output_dir)
  config.data.subsets = SUBSETS
  config.reward_model.update(dict(max_length=256, progress=False, **section))
  return config


def test_reward_model_task(classifier, smollm, tmp_path, monkeypatch):
  directory, hf = classifier
  out = tmp_path / "rm"
  score = reward_model.score_rewardbench_pairs

  def interrupted(*args):
    for chunk in score(*args):
      yield chunk
      raise KeyboardInterrupt  # after the first finished batch was written

  monkeypatch.setattr(reward_model, "score_rewardbench_pairs", interrupted)
  with pytest.raises(KeyboardInterrupt):
    rewardbench_reward_model.run(_rm_config(out, directory))
  done = len((out / rewardbench.SCORES_FILE).read_text().splitlines())
  assert 1 <= done < 6
  monkeypatch.setattr(reward_model, "score_rewardbench_pairs", score)
  summary = rewardbench_reward_model.run(_rm_config(out, directory))
  assert summary["reward_model"]["pairs_scored"] == 6 - done and summary["counts"]["pairs"] == 6

  rows = list(data.iter_jsonl(out / rewardbench.SCORES_FILE))
  pairs = {rewardbench.pair_key(p): p for p in rewardbench.load_pairs(_rm_config(out, directory).data)}
  tok = smollm.tokenizer
  for r in rows:  # each reward = HF's logit of the authors' text alone, cut on the right at 256 tokens
    p = pairs[rewardbench.pair_key(r)]
    for side in ("chosen", "rejected"):
      ids = tok(f"Instruction: {p['prompt']}\nResponse: " + p[side], truncation=True, max_length=256)["input_ids"]
      with torch.no_grad():
        ref = float(hf(input_ids=torch.tensor([ids])).logits[0, 0])
      np.testing.assert_allclose(r[f"score_{side}"], ref, atol=1e-4)
      assert r[f"tokens_{side}"] == len(ids)
    assert r["correct"] == (r["score_chosen"] > r["score_rejected"])
  assert summary["counts"]["truncated"] == sum(r["truncated_chosen"] or r["truncated_rejected"] for r in rows) > 0
  assert summary["subsets"]["hep-python"]["accuracy"] == np.mean([r["correct"] for r in rows
                                                                  if r["subset"] == "hep-python"])
  assert "classifier reward model (paper text" in (out / REPORT_FILE).read_text()
  assert (out / rewardbench_reward_model.PLOT_FILE).exists()

  before = file_hashes(out)
  again = rewardbench_reward_model.run(_rm_config(out, directory))
  assert again["reward_model"]["pairs_scored"] == 0 and again["score"] == summary["score"]
  with pytest.raises(ValueError, match=r"other settings \(format differ\)"):
    rewardbench_reward_model.run(_rm_config(out, directory, format="chat"))
  assert file_hashes(out)["scores.jsonl"] == before["scores.jsonl"]
  with pytest.raises(ValueError, match="model.path is empty"):
    rewardbench_reward_model.run(_rm_config(tmp_path / "none", ""))
  with pytest.raises(ValueError, match="'embedded' is a causal LM, not a reward model"):
    rewardbench_reward_model.run(_rm_config(tmp_path / "none", "embedded"))
  causal = tmp_path / "causal"
  hf_checkpoints.make_checkpoint("qwen2", str(causal))
  with pytest.raises(ValueError, match=r"architectures \['Qwen2ForCausalLM'\] name no \*ForSequenceClassification"):
    rewardbench_reward_model.run(_rm_config(tmp_path / "none", str(causal)))
  assert not (tmp_path / "none").exists()  # refused before anything was written


def _pw_config(output_dir, **overrides):
  config = pairwise_config.get_config("demo")
  config.output_dir = str(output_dir)
  config.data.subsets = "alpacaeval-easy,hep-python"
  config.pairwise.update(dict(max_prompt_tokens=384, progress=False))
  config.sampling.max_new_tokens = 24
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_pairwise_task(smollm, tmp_path, monkeypatch):
  monkeypatch.setattr(runtime, "load_model_from_config", lambda config, mesh=None: smollm)
  out = tmp_path / "pw"
  summary = rewardbench_pairwise.run(_pw_config(out))
  rows = list(data.iter_jsonl(out / rewardbench.SCORES_FILE))
  assert sorted(r["subset"] for r in rows) == ["alpacaeval-easy", "hep-python"]
  settings = pairwise.PairwiseSettings.from_config(_pw_config(out).pairwise)
  pairs = {rewardbench.pair_key(p): p for p in rewardbench.load_pairs(_pw_config(out).data)}
  for r in rows:
    p = pairs[rewardbench.pair_key(r)]
    first = pairwise.encode(smollm.tokenizer, settings, p["prompt"], p["chosen"], p["rejected"])
    swapped = pairwise.encode(smollm.tokenizer, settings, p["prompt"], p["rejected"], p["chosen"])
    assert (r["tokens_chosen_first"], r["tokens_swapped"]) == (len(first[0]), len(swapped[0]))
    assert max(r["tokens_chosen_first"], r["tokens_swapped"]) <= 384
    for order in pairwise.ORDERS:
      assert r[f"verdict_{order}"] == pairwise.parse_verdict(r[f"judgement_{order}"])
    assert r["correct"] == (r["verdict_chosen_first"] == 1)
  views = summary["pairwise"]["views"]
  assert set(views) == {"chosen_first", "swapped", "both"} and set(views["both"]) == {"0.0", "0.5"}
  assert summary["score"] == pytest.approx(views["chosen_first"]["0.0"]["score"])
  unparsable = summary["pairwise"]["unparsable"]
  assert unparsable["chosen_first"] == sum(r["verdict_chosen_first"] is None for r in rows)
  report = (out / REPORT_FILE).read_text()
  assert "## Every view" in report and "chosen first, unparsable = 0.5" in report
  assert f"Unparsable verdicts: {unparsable['chosen_first']} (chosen first)" in report

  # Another parser re-reads the stored judgements without judging; other decoding is refused.
  again = rewardbench_pairwise.run(_pw_config(out, **{"pairwise.parser": "lenient"}))
  assert again["pairwise"]["pairs_judged"] == 0 and again["pairwise"]["parser"] == "lenient"
  before = file_hashes(out)
  with pytest.raises(ValueError, match=r"other settings \(sampling.temperature differ\)"):
    rewardbench_pairwise.run(_pw_config(out, **{"sampling.temperature": 0.1}))
  assert file_hashes(out) == before
  assert json.loads((out / RUN_FILE).read_text())["identity"]["method"] == "pairwise"


def test_command_line(classifier, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(main, "TASKS", main.TASKS + ("rewardbench_reward_model", "rewardbench_pairwise"))
  directory, _ = classifier
  out = tmp_path / "cli"
  main.main(["main", "--config", "configs/rewardbench_reward_model.py:demo", f"--config.model.path={directory}",
             f"--config.output_dir={out}", "--config.data.subsets=hep-go", "--config.reward_model.max_length=256",
             "--config.reward_model.progress=False"])
  assert json.loads((out / SUMMARY_FILE).read_text())["counts"]["pairs"] == 2
  with pytest.raises(SystemExit) as exit_info:
    main.main(["main", "--config", "configs/rewardbench_pairwise.py:demo", "--config.pairwise.parser=regex",
               f"--config.output_dir={tmp_path / 'bad'}"])
  assert exit_info.value.code == 2 and "pairwise.parser must be one of" in capsys.readouterr().err
