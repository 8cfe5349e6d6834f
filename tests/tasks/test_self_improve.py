"""The self-improvement loop on the embedded model: real samples, labels, DPO steps and evaluation, kept tiny.

One round runs once per module (`first_run`); resume, the second round and the other arms start from copies of it.
"""

import json
import shutil

import numpy as np
import pytest

from configs import self_improve as self_improve_config
from ipo_jax import data as data_lib
from ipo_jax import rundir
from ipo_jax.evals import improvement
from ipo_jax.ipo import readings
from ipo_jax.tasks import self_improve
from ipo_jax.train import loop as trainer


def _config_module():
  return self_improve_config


def _record(directory):
  return json.loads((directory / rundir.RUN_FILE).read_text())


def _stages(out, r=1):
  """The finished stages of round r with their summaries (the round's run.json)."""
  return _record(out / f"round_{r}")["stages"]


def _set_stages(out, stages, r=1):
  record = _record(out / f"round_{r}")
  data_lib.write_json(out / f"round_{r}" / rundir.RUN_FILE, {**record, "stages": stages})


def _adopt(out, config):
  """Marks a copied run directory as started with `config`'s settings (reusing its prompts and initial eval)."""
  record = _record(out)
  data_lib.write_json(out / rundir.RUN_FILE, {**record, "identity": rundir._plain(self_improve.identity(config))})


def _round(out, r=1):
  return self_improve.Round(rundir.RunDir.open(str(out / f"round_{r}"), "self_improve_round", {"round": r}), r)


def tiny_config(output_dir, arm="ipo", rounds=1, reward_model=""):
  c = _config_module().get_config("local," + arm)
  c.output_dir = str(output_dir)
  c.rounds = rounds
  c.prompts.update(train_limit=3, heldout_limit=2)
  c.category.update(mode="fixed", fixed="chat")
  c.sampling.update(num_samples=2, max_new_tokens=10, batch_size=4)
  c.training.train.update(batch_size=2, max_steps=1)
  c.training.data.update(max_length=96, max_prompt_length=64)
  c.training.optim.update(warmup_ratio=0.0, learning_rate=1e-4)
  c.training.eval.update(batch_size=2)
  c.training.log.update(plot=False)
  c.training.checkpoint.update(every=0)
  c.evaluation.update(max_new_tokens=6)
  c.evaluation.rewardbench.update(subsets=RB_SUBSETS, max_per_subset=1)
  c.scoring.update(**SCORING)
  c.reward_model.update(path=reward_model, max_length=128, batch_size=4)
  return c


RB_SUBSETS = "alpacaeval-easy,refusals-dangerous"
# Fixed buckets, no shared prefix: every reading in this module reuses the same few compiled programs.
SCORING = dict(max_length=256, max_batch=4, buckets=(128, 256), shared_prefix=False)


@pytest.fixture(scope="module")
def model():
  from ipo_jax.model import loading
  return loading.load_model("embedded")


@pytest.fixture(scope="module")
def reward_model_dir(model, tmp_path_factory):
  """A tiny random LlamaForSequenceClassification (scalar head) sharing the embedded model's vocabulary and
  tokenizer; returns (directory, the HF PyTorch model)."""
  import torch
  import transformers
  directory = str(tmp_path_factory.mktemp("reward_model"))
  config = transformers.LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, num_labels=1, pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForSequenceClassification(config).save_pretrained(directory)
  model.tokenizer.save_pretrained(directory)
  hf = transformers.LlamaForSequenceClassification.from_pretrained(directory, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
  return directory, hf


def hf_rewards(hf, tokenizer, prompts, responses):
  """Reference rewards: each (prompt, response) chat alone through the HF PyTorch model (last token pooled)."""
  import torch
  out = []
  for p, r in zip(prompts, responses):
    text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
      out.append(float(hf(input_ids=ids).logits[0, 0]))
  return np.asarray(out)


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
  out = tmp_path_factory.mktemp("si") / "ipo"
  summary = self_improve.run(tiny_config(out), model)
  return out, summary


def test_make_pairs_invariants():
  prompts = [{"index": i, "instruction": f"p{i}", "category": "chat"} for i in range(4)]
  samples = {
      0: [{"text": "a", "score": 0.2}, {"text": "b", "score": 0.9}, {"text": "c", "score": 0.5}],
      1: [{"text": "same", "score": 0.1}, {"text": "same", "score": 0.8}],
      2: [{"text": "x", "score": 0.50}, {"text": "y", "score": 0.52}],
      3: [{"text": "best", "score": 0.9}, {"text": "best", "score": 0.9}, {"text": "z", "score": 0.1}],
  }
  pairs, counts = self_improve.make_pairs(prompts, samples, min_margin=0.05)
  assert counts == {"pairs": 2, "identical": 1, "margin": 1}
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("best", "z")]
  assert pairs[0]["chosen_score"] == 0.9 and pairs[0]["rejected_score"] == 0.2


def test_split_prompts_is_seeded_and_disjoint():
  items = [(i, f"p{i}") for i in range(10)]
  train, heldout = self_improve.split_prompts(items, 0.5, 0)
  assert (train, heldout) == self_improve.split_prompts(items, 0.5, 0)
  assert len(train) == len(heldout) == 5
  assert sorted(train + heldout) == items
  assert self_improve.split_prompts(items, 0.5, 1) != (train, heldout)


@pytest.fixture(scope="module")
def scorer(model):
  from ipo_jax.ipo import scorer as scorer_lib
  return scorer_lib.Scorer(model, scorer_lib.Settings(**SCORING, progress=False))


def test_ipo_scores_read_yes_no(model, scorer):
  """P(Yes) is the softmax of the " Yes"/" No" logits after the paper's layout with the category's instruction."""
  from ipo_jax.ipo import prompts
  questions, responses = ["What is 2+2?", "What is 2+2?", "Write hello in Python."], ["4.", "It is 17.", "print(1)"]
  cats = ["math", "math", "code"]
  prompt_set = prompts.default_prompts()
  scores = readings.ipo_scores(scorer, prompt_set, questions, responses, cats)
  yes, no = (model.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))
  seqs = [model.tokenizer.encode(prompt_set.instruction(c) + f"\n    User : {q}\n    Response : {r}\n    ")
          for q, r, c in zip(questions, responses, cats)]
  ids, mask = np.zeros((3, 128), np.int32), np.zeros((3, 128), np.int32)  # one right-padded batch
  for i, seq in enumerate(seqs):
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
  logits = np.asarray(model.logits(ids, mask))
  for i, (seq, score) in enumerate(zip(seqs, scores)):
    last = logits[i, len(seq) - 1]
    np.testing.assert_allclose(score, 1.0 / (1.0 + np.exp(last[no] - last[yes])), atol=1e-4)


def test_classify_categories_and_pairwise_symmetry(scorer):
  cats = readings.classify_categories(scorer, ["Write a Python function that reverses a list.",
                                                   "Tell me about your favourite holiday."])
  assert all(c in self_improve.CATEGORIES for c in cats)
  pref = readings.pairwise_preference(scorer, ["Say hi."] * 2, ["Hello!", "Go away."], ["Go away.", "Hello!"])
  np.testing.assert_allclose(pref[0] + pref[1], 1.0, atol=1e-5)  # both orders averaged: swapping flips it
  assert 0.0 < pref[0] < 1.0


def test_round_artifacts(first_run):
  out, summary = first_run
  prompts = json.loads((out / "prompts.json").read_text())
  train = {p["index"] for p in prompts["train"]}
  assert len(train) == 3 and len(prompts["heldout"]) == 2
  assert prompts["category_counts"]["train"] == {"chat": 3, "code": 0, "math": 0, "safety": 0}
  gens = list(data_lib.iter_jsonl(out / "round_1" / "generations.jsonl"))
  assert sorted((g["index"], g["sample"]) for g in gens) == sorted((i, s) for i in train for s in range(2))
  labels = list(data_lib.iter_jsonl(out / "round_1" / "labels.jsonl"))
  assert all(0.0 <= r["score"] <= 1.0 for r in labels)
  pairs = list(data_lib.iter_jsonl(out / "round_1" / "pairs.jsonl"))
  state = _stages(out)
  label = state["label"]
  assert label["pairs"] + label["identical"] + label["margin"] == 3  # every prompt accounted for
  assert label["pairs"] == len(pairs) >= 2
  by_text = {(r["index"], r["text"]): r["score"] for r in labels}
  for p in pairs:
    assert set(p) >= {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"]
    assert p["chosen_score"] >= p["rejected_score"]
    assert by_text[(p["index"], p["chosen"])] == p["chosen_score"]
    assert p["chosen_score"] == max(s for (i, _), s in by_text.items() if i == p["index"])
  assert state["train"]["steps"] == 1
  assert (out / "round_1" / "policy" / "config.json").exists()
  evaluation = state["eval"]
  assert 0.0 <= evaluation["win_rate"] <= 1.0 and evaluation["prompts"] == 2
  rows = summary["rounds"]
  assert [r["round"] for r in rows] == [0, 1]
  assert rows[0]["win_rate"] == 0.5 and rows[0]["ties"] == 2  # the initial model against itself
  assert (out / "rounds.md").read_text().count("\n") == 4 and (out / "rounds.png").exists()
  assert "| rewardbench |" in (out / "rounds.md").read_text()


def test_rewardbench_per_round(model, first_run, scorer):
  """Each row's RewardBench score is the policy's IPO accuracy on the slice (round 0: the initial model)."""
  from ipo_jax.evals import ipo_rows, rewardbench
  from ipo_jax.ipo import prompts
  _, summary = first_run
  pairs = rewardbench.load_pairs(tiny_config("unused").evaluation.rewardbench)
  assert sorted(p["subset"] for p in pairs) == sorted(RB_SUBSETS.split(","))
  rows = [r for done in ipo_rows.score_rewardbench_pairs(scorer, pairs, prompts.default_prompts()) for r in done]
  initial, first = summary["rounds"]
  assert initial["rewardbench"] == pytest.approx(rewardbench.summarize(rows)["score"])
  assert initial["rewardbench_pairs"] == first["rewardbench_pairs"] == 2
  assert 0.0 <= first["rewardbench"] <= 1.0


def test_resume_each_stage(model, first_run, tmp_path):
  """Dropping stages from the record reruns exactly those; finished artifacts are reused untouched."""
  src, _ = first_run
  out = tmp_path / "resume"
  shutil.copytree(src, out)
  gens = out / "round_1" / "generations.jsonl"
  lines = gens.read_text().splitlines(keepends=True)
  gens.write_text("".join(lines[:-1]))  # an interrupted generation stage: one sample missing
  shutil.rmtree(out / "round_1" / "policy")
  _set_stages(out, {})
  summary = self_improve.run(tiny_config(out), model)
  assert gens.read_text().splitlines(keepends=True)[:-1] == lines[:-1]
  new_state = _stages(out)
  assert new_state["generate"]["resumed"] == len(lines) - 1
  assert new_state["train"]["steps"] == 1 and (out / "round_1" / "policy" / "config.json").exists()
  assert summary["rounds"][0] == json.loads((src / "rounds.json").read_text())["rounds"][0]

  mtimes = {p: p.stat().st_mtime for p in (out / "round_1").glob("*.jsonl")}
  _set_stages(out, {k: v for k, v in new_state.items() if k != "eval"})
  self_improve.run(tiny_config(out), model)
  assert (out / "round_1" / "generations.jsonl").stat().st_mtime == mtimes[gens]
  assert (out / "round_1" / "pairs.jsonl").stat().st_mtime == mtimes[out / "round_1" / "pairs.jsonl"]
  timeless = lambda d: {k: v for k, v in d.items() if k != "seconds"}
  # greedy decoding of the policy reloaded from its export: the same answers, the same verdict
  assert timeless(_stages(out)["eval"]) == timeless(new_state["eval"])


def test_second_round_uses_first_policy(model, first_run, tmp_path):
  src, _ = first_run
  out = tmp_path / "two"
  shutil.copytree(src, out)
  config = tiny_config(out, rounds=2)
  config.reference = "initial"  # round 2's DPO reference: the initial model, not round 1's policy
  _adopt(out, config)  # round 1 is the same either way (its reference is its starting policy)
  summary = self_improve.run(config, model)
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  weights = []
  for r in (1, 2):
    with np.load(out / f"round_{r}" / "dpo" / trainer.REFERENCE_FILE) as ref:
      weights.append(json.loads(str(ref["key"]))["weights"])
  assert weights[0] == weights[1]
  assert summary["rounds"][1] == json.loads((src / "rounds.json").read_text())["rounds"][1]
  state = _stages(out, 2)
  assert state["generate"]["policy"].endswith("+ round 1") and state["label"]["policy"].endswith("+ round 1")
  assert state["eval"]["policy"].endswith("+ round 2")


def test_round_without_pairs_keeps_the_policy(model, first_run, tmp_path):
  """A labeller that separates no samples (here: an unreachable margin) leaves the policy as it was; the round
  still evaluates it, and round 2 starts from it."""
  src, _ = first_run
  out = tmp_path / "no_pairs"
  shutil.copytree(src, out)
  shutil.rmtree(out / "round_1")
  config = tiny_config(out)
  config.label.min_margin = 1.0  # P(Yes) margins are below 1
  _adopt(out, config)  # the prompts and the initial evaluation do not depend on the margin
  summary = self_improve.run(config, model)
  state = _stages(out)
  assert state["label"]["pairs"] == 0 and state["label"]["margin"] == len(json.loads(
      (out / "prompts.json").read_text())["train"])
  assert state["train"] == {"steps": 0, "pairs": 0, "kept_policy": True, "train": {}}
  assert not (out / "round_1" / "policy").exists() and state["eval"]["policy"] == model.name
  assert state["eval"]["win_rate"] == 0.5 and state["eval"]["ties"] == state["eval"]["prompts"]
  assert summary["rounds"][1]["pairs"] == 0 and summary["rounds"][1]["dpo_loss"] is None
  assert self_improve.policy_after(improvement.Models(config, model), config, 1) is model


def _relabel(model, first_run, tmp_path, arm, reward_model=""):
  """The label stage of round 1 rerun on a copy of `first_run` under another arm; returns (labels, pairs)."""
  src, _ = first_run
  out = tmp_path / arm
  shutil.copytree(src, out)
  config = tiny_config(out, arm=arm, reward_model=reward_model)
  models = improvement.Models(config, model)
  prompts = json.loads((out / "prompts.json").read_text())
  rnd = _round(out)
  summary = self_improve.stage_label(models, model, rnd, prompts["train"], config)
  labels = list(data_lib.iter_jsonl(out / "round_1" / "labels.jsonl"))
  pairs = list(data_lib.iter_jsonl(out / "round_1" / "pairs.jsonl"))
  assert summary["arm"] == arm and summary["pairs"] == len(pairs)
  assert summary["pairs"] + summary["identical"] + summary["margin"] == len(prompts["train"])
  for p in pairs:
    assert p["chosen"] != p["rejected"] and p["chosen_score"] >= p["rejected_score"]
    assert p["chosen_score"] == max(r["score"] for r in labels if r["index"] == p["index"])
  return labels, pairs


def test_random_arm(model, first_run, tmp_path):
  labels, _ = _relabel(model, first_run, tmp_path, "random")
  expected = [np.random.default_rng([0, 1, r["index"], r["sample"]]).random() for r in labels]
  np.testing.assert_allclose([r["score"] for r in labels], expected, rtol=1e-6)


def test_reward_model_arm_matches_hf(model, first_run, reward_model_dir, tmp_path):
  """The reward_model arm's labels are the HF PyTorch sequence classifier's scalar scores of each chat."""
  directory, hf = reward_model_dir
  labels, _ = _relabel(model, first_run, tmp_path, "reward_model", directory)
  expected = hf_rewards(hf, model.tokenizer, [r["instruction"] for r in labels], [r["text"] for r in labels])
  np.testing.assert_allclose([r["score"] for r in labels], expected, atol=1e-4)


def test_reward_model_judge(model, reward_model_dir, tmp_path):
  """A reward model as the evaluation judge: P(new better) = sigmoid(r_new - r_old); identical answers tie."""
  directory, hf = reward_model_dir
  config = tiny_config(tmp_path, reward_model=directory)
  config.evaluation.judge = directory
  models = improvement.Models(config, model)
  prompts = [{"index": i, "instruction": q, "category": "chat"} for i, q in enumerate(["Say hi.", "Name a fruit."])]
  new = [{"text": t, "num_tokens": n} for t, n in (("Hello there!", 3), ("Apple.", 2))]
  old = [{"text": t, "num_tokens": n} for t, n in (("Go away.", 2), ("Apple.", 2))]
  result = improvement.evaluate_answers(models, prompts, new, old)
  r_new = hf_rewards(hf, model.tokenizer, ["Say hi.", "Name a fruit."], ["Hello there!", "Apple."])
  r_old = hf_rewards(hf, model.tokenizer, ["Say hi."], ["Go away."])
  pref = 1.0 / (1.0 + np.exp(r_old[0] - r_new[0]))
  assert result["ties"] == 1 and result["mean_length"] == 2.5
  np.testing.assert_allclose(result["mean_preference"], (pref + 0.5) / 2, atol=1e-4)
  assert result["win_rate"] == ((pref > 0.5) + 0.5) / 2
  np.testing.assert_allclose(result["judge_score"], r_new.mean(), atol=1e-4)


def test_reward_model_needs_a_scalar_head_and_a_path(model, tmp_path):
  models = improvement.Models(tiny_config(tmp_path), model)
  with pytest.raises(ValueError, match="reward_model.path"):
    models.reward_model  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="one label"):
    improvement.reward_scores(model, ["q"], ["a"])


def test_unknown_reference_is_refused(model, tmp_path):
  config = tiny_config(tmp_path / "ref")
  config.reference = "latest"
  with pytest.raises(ValueError, match="reference='latest' is not one of"):
    self_improve.run(config, model)
  assert not (tmp_path / "ref").exists()


def test_self_reward_arm_reads_the_judge(model):
  """The self_reward arm's labels are the 5-point judge's grades of the policy's own samples, seeded per round."""
  import types
  import jax
  from ipo_jax.sample import engine
  from ipo_jax.evals import judge
  settings = judge.JudgeSettings(sampling=engine.SamplingConfig(max_new_tokens=6, temperature=0.1))
  rows = [{"index": 4, "sample": s, "instruction": "Name a colour.", "text": t} for s, t in enumerate(["Blue.", "No."])]
  models = types.SimpleNamespace(judge_settings=settings)
  labels = improvement.label_samples(models, model, "self_reward", rows, {4: "chat"}, seed=0, round_index=2)
  expected = judge.judge_scores(model, ["Name a colour."] * 2, ["Blue.", "No."], settings,
                                jax.random.fold_in(jax.random.key(0), 2), progress=False)
  np.testing.assert_array_equal(labels, expected)
  assert all(0.0 <= x <= 5.0 for x in labels)


def test_config_variants():
  module = _config_module()
  assert module.get_config("local,random").label.arm == "random"
  assert module.get_config("paper").training.lora.rank == 256
  assert module.get_config("self_reward").label.arm == "self_reward"
  assert module.get_config("local,reward_model").output_dir.endswith("_reward_model")
  assert module.get_config("local").evaluation.rewardbench.max_per_subset == 1
  with pytest.raises(ValueError, match="unknown"):
    module.get_config("huge")


def test_a_rerun_with_other_sampling_after_the_generate_stage_is_refused(model, first_run, tmp_path):
  """Changed `sampling.num_samples` after round 1 generated: an error naming the key, not a silent reuse of the
  old samples; nothing of the finished run changes. The same settings with more rounds resume."""
  src, _ = first_run
  out = tmp_path / "changed"
  shutil.copytree(src, out)
  before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
  config = tiny_config(out)
  config.sampling.num_samples = 3
  with pytest.raises(ValueError, match=r"other settings \(sampling.num_samples differ\)"):
    self_improve.run(config, model)
  config = tiny_config(out)
  config.label.arm = "random"
  with pytest.raises(ValueError, match=r"label.arm differ"):
    self_improve.run(config, model)
  assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
  assert self_improve.run(tiny_config(out), model)["rounds"] == json.loads((src / "rounds.json").read_text())["rounds"]
