"""The self-improvement loop: the model labels its own samples and learns from them with DPO.

A round with policy π (round 1: the initial model; round r + 1: the policy of round r):

0. `sft` (optional, once, `sft.enabled`): supervised fine-tuning of the model on `sft.data` (instruction, response)
   examples with the completion-only loss (the trainer's run directory `sft/`, the policy exported to
   `sft/policy/`); the SFT'd model is then the initial model: round 0's policy, round 1's starting policy and DPO
   reference, the baseline of the held-out evaluation and (unless `evaluation.judge` names another) its judge.

1. `generate`: N samples per training prompt from π (`round_<r>/generations.jsonl`, resumable row by row).
2. `label`: each sample scored by the labelling arm (`ipo`: π's P(Yes) under the instruction of the prompt's
   category, read by the IPO scorer; `self_reward`: π's 1-5 grade from the 5-point judge; `random`: a seeded
   control; `reward_model`: the scalar score of an external sequence-classification model, `config.reward_model`),
   best vs worst sample per prompt (`round_<r>/labels.jsonl`, `round_<r>/pairs.jsonl` with TRL's
   prompt/chosen/rejected fields plus scores).
3. `train`: DPO on the pairs with π as the reference (`round_<r>/dpo/` with the trainer's checkpoints and
   metrics; the policy exported as a Hugging Face directory to `round_<r>/policy/`).
4. `eval`: greedy answers to held-out prompts from the new policy against the initial model's, judged pairwise in
   both orders by the judge's P(Yes) (default: the frozen initial model; `evaluation.judge` loads another; a
   reward model judges by its scores, P(new better) = sigmoid(r_new - r_old)); the judge's mean score of the
   answers, their length (answers in `round_<r>/eval_answers.jsonl`); the RewardBench score of the new policy as an
   IPO classifier on a slice (`evaluation.rewardbench`; does self-training keep its judging ability?).

`output_dir` is a run directory (ipo_jax/rundir.py) whose identity is every result-determining setting (a rerun
with other `sampling`, `label`, `category`, ... settings is refused, naming them; `rounds` may grow); each round is
a child run directory whose `run.json` records its finished stages with their summaries; a rerun skips finished
stages and resumes the others.
Prompts are split once into training and held-out halves by a seeded rule and get a category (chat / code / math /
safety): a fixed one, a data column, or the model's own yes/no answer per category (`prompts.json`). The per-round
table goes to `rounds.json`, `rounds.md` and `rounds.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from ipo_jax import data as data_lib
from ipo_jax import runtime, sharding
from ipo_jax.train import guards, loop as trainer, sft_stage
from ipo_jax.evals import improvement
from ipo_jax.evals.taxonomy import CATEGORIES
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.ipo import readings
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.model import export
from ipo_jax.rundir import RUN_FILE, RunDir
from ipo_jax.sample import engine
from ipo_jax.sample import instructions as instructions_lib

ARMS = improvement.ARMS
REFERENCES = ("previous", "initial")  # the DPO reference of a round: the policy it starts from, or the initial one
STAGES = ("generate", "label", "train", "eval")
PROMPTS_FILE = "prompts.json"
LABELS_FILE, PAIRS_FILE = "labels.jsonl", "pairs.jsonl"
# Settings that do not change results (or that a rerun may extend) and so are not part of a run's identity.
NOT_IDENTITY = ("task", "output_dir", "overwrite", "rounds", "mesh", "distributed")


def identity(config: Any) -> dict[str, Any]:
  """Every result-determining setting: the config without NOT_IDENTITY, progress bars, logging and the trainer's
  guards (`trainer.NOT_IDENTITY`); the `sft` section only when the stage is on."""
  out = {k: v for k, v in config.to_dict().items() if k not in NOT_IDENTITY}
  for section in ("scoring", "self_reward"):
    out[section] = {k: v for k, v in out[section].items() if k not in ("progress", "fallback_instruction")}
  sft = out.pop("sft", None) or {}
  for section, trained in (("training", out["training"]), ("sft", sft if sft.get("enabled") else None)):
    if trained is not None:
      out[section] = {k: v for k, v in trained.items() if k != "log"}
      out[section]["train"] = {k: v for k, v in trained["train"].items() if k not in trainer.NOT_IDENTITY}
  return out


# ----------------------------------------------------------------------------------------------------------------
# Prompts.


def split_prompts(items: Sequence[tuple[int, str]], heldout_fraction: float, seed: int
                  ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """(train, held-out): a seeded permutation of the rows, its first `heldout_fraction` held out; each half in
  row order."""
  order = np.random.default_rng([seed, 7]).permutation(len(items))
  n_heldout = int(round(heldout_fraction * len(items)))
  heldout = set(order[:n_heldout].tolist())
  return ([x for i, x in enumerate(items) if i not in heldout], [x for i, x in enumerate(items) if i in heldout])


def assign_categories(scorer: scorer_lib.Scorer, rows: list[tuple[int, str]], section: Any,
                      raw: list[dict[str, Any]] | None) -> list[str]:
  """Categories of `rows` by `section.mode`: fixed, column (from the data) or self (the model's own reading)."""
  mode = section.mode
  if mode == "fixed":
    if section.fixed not in CATEGORIES:
      raise ValueError(f"category.fixed={section.fixed!r} is not one of {CATEGORIES}")
    return [section.fixed] * len(rows)
  if mode == "column":
    out = []
    for index, _ in rows:
      value = raw[index].get(section.column)
      if value not in CATEGORIES:
        raise data_lib.DataError(f"{section.source}: row {index} field {section.column!r} is {value!r}, not one "
                                 f"of {CATEGORIES}")
      out.append(value)
    return out
  if mode == "self":
    return readings.classify_categories(scorer, [text for _, text in rows])
  raise ValueError(f"category.mode={mode!r} is not one of fixed, column, self")


def prepare_prompts(models: "improvement.Models", run_dir: RunDir, config: Any) -> dict[str, Any]:
  """Train/held-out prompts with categories, written once to `prompts.json` (stage `prompts`) and read back."""
  if run_dir.done("prompts"):
    return run_dir.read_json(PROMPTS_FILE)
  p = config.prompts
  items = instructions_lib.load_instructions(p)
  train, heldout = split_prompts(items, float(p.heldout_fraction), int(config.seed))
  train = train[:p.train_limit or None]
  heldout = heldout[:p.heldout_limit or None]
  if not train or not heldout:
    raise ValueError(f"{p.path}: {len(items)} prompts leave {len(train)} train / {len(heldout)} held-out prompts")
  raw = None
  if config.category.mode == "column":
    raw = data_lib.read_records(p.path, p.get("split") or None, p.get("name") or None)
  section = ml_collections.ConfigDict(dict(config.category, source=p.path))
  out = {}
  for name, rows in (("train", train), ("heldout", heldout)):
    cats = assign_categories(models.scorer(models.initial), rows, section, raw)
    out[name] = [{"index": i, "instruction": text, "category": c} for (i, text), c in zip(rows, cats)]
  out["category_counts"] = {name: {c: sum(r["category"] == c for r in out[name]) for c in CATEGORIES}
                            for name in ("train", "heldout")}
  run_dir.write_json(PROMPTS_FILE, out)
  run_dir.finish_stage("prompts", train=len(train), heldout=len(heldout))
  runtime.log(f"self_improve: {len(train)} train / {len(heldout)} held-out prompts; categories "
              f"{out['category_counts']}")
  return out


# ----------------------------------------------------------------------------------------------------------------
# Pairs.


def make_pairs(prompts: Sequence[dict[str, Any]], samples: dict[int, list[dict[str, Any]]], min_margin: float = 0.0
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Best vs worst scored sample per prompt, and how many prompts were dropped and why.

  A prompt is dropped when fewer than two of its non-empty samples differ (`identical`), or when the best score
  exceeds the worst by no more than `min_margin` (`margin`). Every prompt is a pair or a drop.
  """
  pairs, counts = [], {"pairs": 0, "identical": 0, "margin": 0}
  for p in prompts:
    rows = [s for s in samples.get(p["index"], []) if s["text"].strip()]
    if len({s["text"] for s in rows}) < 2:
      counts["identical"] += 1
      continue
    best = max(rows, key=lambda s: s["score"])
    worst = min((s for s in rows if s["text"] != best["text"]), key=lambda s: s["score"])
    if best["score"] - worst["score"] <= min_margin:
      counts["margin"] += 1
      continue
    pairs.append({"prompt": p["instruction"], "chosen": best["text"], "rejected": worst["text"],
                  "index": p["index"], "category": p["category"], "chosen_score": float(best["score"]),
                  "rejected_score": float(worst["score"])})
  counts["pairs"] = len(pairs)
  return pairs, counts




# ----------------------------------------------------------------------------------------------------------------
# Round stages.


def _round_stages(output_dir: str, index: int) -> dict[str, Any]:
  """The finished stages of round `index` (with their summaries), read without opening the round."""
  return _stages(os.path.join(output_dir, f"round_{index}"))


def _stages(directory: str) -> dict[str, Any]:
  """The finished stages of the run directory `directory` (with their summaries), read without opening it."""
  path = os.path.join(directory, RUN_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("stages", {})


@dataclasses.dataclass
class Round:
  """A round: its run directory (a child of the loop's) and its index."""

  run: RunDir
  index: int

  def path(self, name: str) -> str:
    return self.run.file(name)

  @property
  def state(self) -> dict[str, Any]:
    return {stage: self.run.stage_info(stage) for stage in STAGES if self.run.done(stage)}

  def finish(self, stage: str, summary: dict[str, Any]) -> None:
    self.run.finish_stage(stage, **summary)


def stage_generate(policy: Any, rnd: Round, prompts: list[dict[str, Any]], config: Any) -> dict[str, Any]:
  """N samples per training prompt appended to `generations.jsonl`; rows already there are kept."""
  path = rnd.path(engine.GENERATIONS_FILE)
  done = {(r["index"], r["sample"]) for r in data_lib.iter_jsonl(path)} if os.path.exists(path) else set()
  sampling = engine.SamplingConfig.from_config(config.sampling)
  todo = [p for p in prompts if any((p["index"], s) not in done for s in range(sampling.num_samples))]
  chat = bool(config.prompts.get("chat_template", True))
  texts = [instructions_lib.format_prompt(policy.tokenizer, p["instruction"], chat) for p in todo]
  start = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(int(config.seed)), rnd.index)
  for pos, gens in engine.stream(policy, texts, sampling, key, indices=[p["index"] for p in todo],
                                     batch_size=int(config.sampling.batch_size), progress=False):
    p = todo[pos]
    rows = [{"index": p["index"], "instruction": p["instruction"], "sample": s, "text": g.text,
             "finish_reason": g.finish_reason, "num_tokens": len(g.token_ids)}
            for s, g in enumerate(gens) if (p["index"], s) not in done]
    if runtime.is_main_process():
      data_lib.append_jsonl(path, rows)
  return {"policy": policy.name, "samples": len(prompts) * sampling.num_samples, "resumed": len(done),
          "seconds": round(time.perf_counter() - start, 2)}


def stage_label(models: "improvement.Models", policy: Any, rnd: Round, prompts: list[dict[str, Any]], config: Any
                ) -> dict[str, Any]:
  """Scores every sample (`labels.jsonl`) and writes the best-vs-worst pairs (`pairs.jsonl`)."""
  start = time.perf_counter()
  rows = sorted(data_lib.iter_jsonl(rnd.path(engine.GENERATIONS_FILE)), key=lambda r: (r["index"], r["sample"]))
  categories = {p["index"]: p["category"] for p in prompts}
  scores = improvement.label_samples(models, policy, config.label.arm, rows, categories, seed=int(config.seed),
                         round_index=rnd.index)
  labelled = [{**r, "score": float(s)} for r, s in zip(rows, scores)]
  by_prompt: dict[int, list[dict[str, Any]]] = {}
  for r in labelled:
    by_prompt.setdefault(r["index"], []).append(r)
  pairs, counts = make_pairs(prompts, by_prompt, float(config.label.min_margin))
  if runtime.is_main_process():
    data_lib.write_jsonl(rnd.path(LABELS_FILE), labelled)
    data_lib.write_jsonl(rnd.path(PAIRS_FILE), pairs)
  runtime.log(f"round {rnd.index}: {counts['pairs']} pairs from {len(prompts)} prompts ({counts})")
  return {"policy": policy.name, "arm": config.label.arm, "prompts": len(prompts), **counts,
          "mean_margin": float(np.mean([p["chosen_score"] - p["rejected_score"] for p in pairs])) if pairs else 0.0,
          "seconds": round(time.perf_counter() - start, 2)}


def training_config(config: Any, output_dir: str, num_pairs: int, multiple: int) -> ml_collections.ConfigDict:
  """The DPO trainer's config: `config.training` with the round's output directory and a batch size that fits
  the pairs (at most `training.train.batch_size`, a multiple of the mesh's batch split)."""
  c = ml_collections.ConfigDict(config.training.to_dict())
  c.output_dir, c.seed, c.mesh = output_dir, int(config.seed), config.mesh
  fit = (min(int(c.train.batch_size), num_pairs) // (multiple * c.train.grad_accum)) * multiple * c.train.grad_accum
  if fit < 1:
    raise ValueError(f"{num_pairs} pairs are too few for one DPO step (a batch needs a multiple of "
                     f"{multiple * c.train.grad_accum} pairs); use more prompts or samples")
  c.train.batch_size = fit
  c.eval.batch_size = -(-int(c.eval.batch_size) // multiple) * multiple
  return c


def stage_train(policy: Any, rnd: Round, config: Any, reference_params: Any = None, initial_name: str = ""
                ) -> tuple[Any, dict[str, Any]]:
  """DPO of `policy` on the round's pairs (reference: `reference_params`, else the policy); exports the new one.
  Without pairs the round keeps its starting policy (`kept_policy` in the summary)."""
  pairs = list(data_lib.iter_jsonl(rnd.path(PAIRS_FILE)))
  if not pairs:  # a result, not an error: e.g. a judge too weak to tell its samples apart
    runtime.log(f"round {rnd.index}: no pairs (every prompt was dropped); the policy stays {policy.name}")
    return policy, {"steps": 0, "pairs": 0, "kept_policy": True, "train": {}}
  tc = training_config(config, rnd.path("dpo"), len(pairs), sharding.batch_multiple(policy.mesh))
  rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
  params, summary = trainer.train_dpo(policy, rows, tc, reference_params=reference_params)
  export_start = time.perf_counter()
  if not summary["complete"]:
    raise RuntimeError(f"round {rnd.index}: DPO stopped at step {summary['step']} of {summary['total_steps']}; "
                       "rerun to continue")
  export.export_hf(params, policy.config, rnd.path("policy"), hf_config=policy.hf_config, tokenizer=policy.tokenizer,
                   dtype=config.training.export.dtype)
  new_policy = dataclasses.replace(policy, params=params, name=policy_name(initial_name or policy.name, rnd.index))
  return new_policy, {"steps": summary["step"], "pairs": summary["train_pairs"], "train": summary["train"],
                      "seconds": round(summary["train_s"] + summary["reference_s"], 2),
                      "export_seconds": round(time.perf_counter() - export_start, 2)}


# ----------------------------------------------------------------------------------------------------------------
# The loop.


def policy_name(initial_name: str, round_index: int) -> str:
  """The display name of round `round_index`'s policy."""
  return f"{initial_name} + round {round_index}"


def policy_after(models: "improvement.Models", config: Any, round_index: int) -> Any:
  """The policy that round `round_index` + 1 starts from (0: the initial model)."""
  if round_index == 0:
    return models.initial
  if _round_stages(config.output_dir, round_index).get("train", {}).get("kept_policy"):  # no pairs that round
    return policy_after(models, config, round_index - 1)
  policy = models.load(os.path.join(config.output_dir, f"round_{round_index}", "policy"))
  return dataclasses.replace(policy, tokenizer=models.initial.tokenizer,
                             name=policy_name(models.initial.name, round_index))


def run_round(models: improvement.Models, rnd: Round, prompts: dict[str, Any], config: Any, baseline: list[dict[str, Any]],
              policy: Any = None) -> tuple[Any, dict[str, Any]]:
  """Runs the stages of round `rnd` that are not finished. `policy`: the round's starting policy when already in
  memory (else loaded when a stage needs it). Returns the new policy (None when no stage needed it) and the state."""
  state, new_policy = rnd.state, None
  for stage in STAGES:
    if stage in state:
      continue
    if policy is None and stage != "eval":
      policy = policy_after(models, config, rnd.index - 1)
    runtime.log(f"round {rnd.index}: {stage}")
    stage_start = time.perf_counter()
    if stage == "generate":
      summary = stage_generate(policy, rnd, prompts["train"], config)
    elif stage == "label":
      summary = stage_label(models, policy, rnd, prompts["train"], config)
    elif stage == "train":
      reference = models.initial.params if config.reference == "initial" and rnd.index > 1 else None
      new_policy, summary = stage_train(policy, rnd, config, reference, models.initial.name)
    else:
      new_policy = new_policy or policy_after(models, config, rnd.index)
      answers = improvement.greedy_answers(new_policy, prompts["heldout"], config)
      if runtime.is_main_process():
        data_lib.write_jsonl(rnd.path("eval_answers.jsonl"), answers)
      summary = {"policy": new_policy.name,
                 **improvement.evaluate_answers(models, prompts["heldout"], answers, baseline),
                 **models.rewardbench_score(new_policy), "seconds": round(time.perf_counter() - stage_start, 2)}
    rnd.finish(stage, summary)
    state = rnd.state
  return new_policy, state


def _initial(models: improvement.Models, run_dir: RunDir, prompts: dict[str, Any], config: Any
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """The initial model's greedy answers to the held-out prompts (the baseline) and its evaluation row."""
  if run_dir.done("initial_answers"):
    baseline = list(data_lib.iter_jsonl(run_dir.file("initial_answers.jsonl")))
  else:
    baseline = improvement.greedy_answers(models.initial, prompts["heldout"], config)
    if runtime.is_main_process():
      data_lib.write_jsonl(run_dir.file("initial_answers.jsonl"), baseline)
    run_dir.finish_stage("initial_answers", answers=len(baseline))
  if run_dir.done("initial_eval"):
    initial_row = run_dir.read_json("initial_eval.json")
  else:
    initial_row = {**improvement.evaluate_answers(models, prompts["heldout"], baseline, baseline),
                   **models.rewardbench_score(models.initial)}
    run_dir.write_json("initial_eval.json", initial_row)
    run_dir.finish_stage("initial_eval")
  return baseline, initial_row


def run(config: Any, model: Any = None) -> dict[str, Any]:
  """Task `self_improve`: `config.rounds` rounds of generate, label, train and evaluate (see the module doc).

  `model`: the initial model when already loaded (else `config.model` is loaded onto `config.mesh`).
  """
  if config.label.arm not in ARMS:
    raise ValueError(f"label.arm={config.label.arm!r} is not one of {ARMS}")
  if config.reference not in REFERENCES:
    raise ValueError(f"reference={config.reference!r} is not one of {REFERENCES}")
  guards.check_settings(config.training)  # training sizes, before anything is written
  models = improvement.Models(config, model)
  prompts_lib.check_subsets(models.prompt_set, {p["subset"] for p in models.rewardbench_pairs},
                            config.scoring.get("prompts_file", ""), config.scoring.get("fallback_instruction", False))
  examples = sft_stage.examples(models.initial, config,
                                done=lambda: sft_stage.STAGE in _stages(config.get("output_dir") or "."))
  run_dir = RunDir.open(config.get("output_dir", ""), "self_improve", identity(config),
                        overwrite=config.get("overwrite", False))
  start = time.perf_counter()
  if sft_stage.enabled(config):  # the SFT'd model is the initial model from here on
    models = improvement.Models(config, sft_stage.run(models.initial, run_dir, config, examples))
  prompts = prepare_prompts(models, run_dir, config)
  baseline, initial_row = _initial(models, run_dir, prompts, config)

  policy, states = models.initial, []
  for r in range(1, int(config.rounds) + 1):
    rnd = Round(run_dir.child(f"round_{r}", "self_improve_round", {"round": r}), r)
    policy, state = run_round(models, rnd, prompts, config, baseline, policy)
    states.append(state)

  rows = improvement.round_table(config.label.arm, initial_row, states)
  summary = {"rounds": rows, "category_counts": prompts["category_counts"],
             "seconds": round(time.perf_counter() - start, 2), "output_dir": run_dir.path}
  report = improvement.markdown_table(rows)
  if sft_stage.enabled(config):
    summary["sft"] = sft = run_dir.stage_info("sft")
    loss = lambda key: "n/a" if sft.get(key) is None else f"{sft[key]:.3f}"
    report += (f"\nRound 0 is {models.initial.name}: SFT on {sft['examples']} examples of {sft['data']}, "
               f"{sft['steps']} steps, held-out loss {loss('loss_before')} -> {loss('loss_after')}.\n")
  run_dir.write_json("rounds.json", summary)
  run_dir.write_text("rounds.md", report)
  improvement.plot_rounds(rows, run_dir.file("rounds.png"))
  runtime.log(improvement.markdown_table(rows))
  return summary
