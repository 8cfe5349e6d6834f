"""experiments/rewardbench_baselines.py on a tiny slice: IPO, both judges and a tiny random reward model on the same
pairs, one table whose numbers are those of each method's own run."""

import importlib.util
import json
import pathlib

import pytest

from ipo_jax import runtime
from ipo_jax.evals import rewardbench
from ipo_jax.model import loading
from ipo_jax.rundir import SUMMARY_FILE
from tests.evals.test_reward_model import classifier_checkpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
SUBSETS = "alpacaeval-easy,hep-python,donotanswer"


def _script():
  spec = importlib.util.spec_from_file_location("rewardbench_baselines",
                                                REPO / "experiments" / "rewardbench_baselines.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


baselines = _script()


def test_configs_score_the_same_pairs(tmp_path):
  configs = baselines.method_configs("embedded", str(tmp_path), 3, 32, SUBSETS, "rm_dir", 512)
  assert list(configs) == ["ipo", "self_reward", "pairwise", "reward_model"]
  assert len({json.dumps(c.data.to_dict(), sort_keys=True) for c in configs.values()}) == 1
  assert [c.task for c in configs.values()] == ["rewardbench", "rewardbench_self_reward", "rewardbench_pairwise",
                                                "rewardbench_reward_model"]
  assert configs["reward_model"].model.path == "rm_dir" and configs["pairwise"].model.path == "embedded"
  assert configs["ipo"].scoring.prompts_file == "paper:rewardbench_prompts"
  assert configs["pairwise"].pairwise.prompt_file == "paper:pairwise_judge_prompt"
  assert configs["pairwise"].sampling.max_new_tokens == configs["self_reward"].sampling.max_new_tokens == 32
  assert len({c.output_dir for c in configs.values()}) == 4
  assert "reward_model" not in baselines.method_configs("embedded", str(tmp_path), 3, 32)


def test_one_table_from_every_method(tmp_path, tmp_path_factory, monkeypatch):
  smollm = loading.load_model("embedded")
  loaded = runtime.load_model_from_config
  monkeypatch.setattr(runtime, "load_model_from_config",  # the embedded model is loaded once for three methods
                      lambda config, mesh=None: smollm if config.model.path == "embedded" else loaded(config, mesh))
  rm_dir = str(tmp_path_factory.mktemp("rm"))
  classifier_checkpoint(rm_dir, "llama", smollm.tokenizer)
  configs = baselines.method_configs("embedded", str(tmp_path), 1, 16, SUBSETS, rm_dir, 384)
  configs["reward_model"].reward_model.max_length = 256  # the tiny classifier's positions
  text, summaries = baselines.compare(configs, str(tmp_path))

  assert text.splitlines()[0] == ("| | IPO | self-reward | pairwise: chosen first | pairwise: swapped | "
                                  "pairwise: both orders | reward model |")
  md = (tmp_path / "comparison.md").read_text()
  assert text in md and "3 pairs (3 subsets) scored by every method" in md
  out = json.loads((tmp_path / "comparison.json").read_text())
  for method, column in (("ipo", "IPO"), ("self_reward", "self-reward"), ("reward_model", "reward model")):
    saved = json.loads((tmp_path / method / SUMMARY_FILE).read_text())
    assert out["columns"][column][""]["subsets"] == {s: v["accuracy"] for s, v in saved["subsets"].items()}
    assert out["columns"][column][""]["score"] == pytest.approx(saved["score"])
  pairwise = json.loads((tmp_path / "pairwise" / SUMMARY_FILE).read_text())["pairwise"]
  assert out["columns"]["pairwise: swapped"] == pairwise["views"]["swapped"]
  assert out["counts"]["unparsable"] == pairwise["unparsable"]
  for label in ("alpacaeval-easy", "hep-python", "donotanswer", "**Chat**", "paper: Code", "**Score**"):
    cells = next(line for line in text.splitlines() if line.startswith(f"| {label} |")).split(" | ")[1:]
    assert len(cells) == 6 and all(" / " in c for c in cells[2:5]) and " / " not in cells[0]
  hep = next(line for line in text.splitlines() if line.startswith("| hep-python |"))
  first = pairwise["views"]["chosen_first"]
  assert f"{100 * first['0.0']['subsets']['hep-python']:.1f} / {100 * first['0.5']['subsets']['hep-python']:.1f}" in hep
  keys = {rewardbench.pair_key(r) for r in rewardbench.read_scores(str(tmp_path / "ipo"))}
  assert len(keys) == 3 and all(summaries[m]["counts"]["pairs"] == 3 for m in summaries)
