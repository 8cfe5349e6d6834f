"""The self-improvement loop: the model labels its own samples and learns from them with DPO.

A round with policy π (round 1: the initial model; round r + 1: the policy of round r):

1. `generate`: N samples per training prompt from π (`round_<r>/generations.jsonl`, resumable row by row).
2. `label`: each sample scored by the labelling arm (`ipo`: π's P(Yes) under the instruction of the prompt's
   category, read by `scoring.Scorer`; `self_reward`: π's 1-5 grade from the `judge` module; `random`: a seeded
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

Each finished stage is recorded with its summary in `round_<r>/state.json`; a rerun skips finished stages and
resumes the others.
Prompts are split once into training and held-out halves by a seeded rule and get a category (chat / code / math /
safety): a fixed one, a data column, or the model's own yes/no answer per category (`prompts.json`). The per-round
table goes to `rounds.json`, `rounds.md` and `rounds.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from ipo_jax import data as data_lib
from ipo_jax import generation, judge as judge_lib, prompts as prompts_lib, rewardbench, runtime, scoring, sharding
from ipo_jax import trainer

CATEGORIES = ("chat", "code", "math", "safety")
ARMS = ("ipo", "self_reward", "reward_model", "random")
REFERENCES = ("previous", "initial")  # the DPO reference of a round: the policy it starts from, or the initial one
STAGES = ("generate", "label", "train", "eval")
PROMPTS_FILE = "prompts.json"
STATE_FILE = "state.json"

# The yes/no question that puts a prompt in a category (one reading per category; the most likely Yes wins).
CATEGORY_QUESTIONS = {
    "chat": "a general question or conversation",
    "code": "a programming task or a question about code",
    "math": "a math problem or a calculation",
    "safety": "a request for something harmful, dangerous, illegal or unethical",
}
PAIRWISE_INSTRUCTION = ("Below is a user's request and two responses, A and B. Is response A better than response B: "
                        "more helpful, accurate and harmless? Answer Yes or No.")


# ----------------------------------------------------------------------------------------------------------------
# Readings of the model: IPO P(Yes) (scoring.Scorer), pairwise preference, categories.


def yes_probabilities(scorer: scoring.Scorer, examples: Sequence[tuple[str, str, str]]) -> np.ndarray:
  """P(Yes) [N] of (instruction, prompt, response) examples; consecutive examples run as pairs (a shared prompt
  is read once)."""
  if not examples:
    return np.zeros((0,), np.float32)
  encoded = [ids for ids, _ in scorer.encode(examples)]
  if len(encoded) % 2:
    encoded.append(encoded[-1])
  log_odds = np.zeros(len(encoded))
  for idx, out in scorer.score_pairs(list(zip(encoded[0::2], encoded[1::2]))):
    log_odds[idx] = out[:, 0]
  return scoring.sigmoid(log_odds[:len(examples)]).astype(np.float32)


def ipo_scores(scorer: scoring.Scorer, prompt_set: prompts_lib.PromptSet, prompts: Sequence[str],
               responses: Sequence[str], categories: Sequence[str]) -> np.ndarray:
  """P(Yes) [N] of each (prompt, response) under its category's instruction."""
  return yes_probabilities(scorer, [(prompt_set.instruction(c), p, r)
                                    for p, r, c in zip(prompts, responses, categories)])


def pairwise_preference(scorer: scoring.Scorer, prompts: Sequence[str], first: Sequence[str],
                        second: Sequence[str]) -> np.ndarray:
  """P(`first` better than `second`) [N], the mean of both presentation orders (cancels position bias)."""
  def ask(a, b):
    return yes_probabilities(scorer, [(PAIRWISE_INSTRUCTION, p, f"A: {x}\n\nB: {y}") for p, x, y in zip(prompts, a, b)])
  return 0.5 * (ask(first, second) + 1.0 - ask(second, first))


def reward_scores(model: Any, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool = True,
                  max_length: int = 1024, batch_size: int = 8, length_multiple: int = 64) -> np.ndarray:
  """Scalar rewards [N] of a sequence-classification model (`num_labels` 1) for (prompt, response).

  The pair is a user and an assistant turn of the reward model's chat template (plain `prompt\n\nresponse`
  without one), cut to its last `max_length` tokens; rows run longest first in batches of `batch_size` rows
  right-padded to a multiple of `length_multiple` tokens (few compiled shapes).
  """
  if model.config.num_labels != 1:
    raise ValueError(f"{model.name}: a reward model needs one label (a scalar score head), it has "
                     f"{model.config.num_labels}")
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.name}: no tokenizer in the directory; save the tokenizer the model was trained with")
  if chat_template and tok.chat_template:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in zip(prompts, responses)]
    seqs = [tok.encode(t, add_special_tokens=False)[-max_length:] for t in texts]
  else:
    seqs = [tok.encode(f"{p}\n\n{r}")[-max_length:] for p, r in zip(prompts, responses)]
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  out = np.zeros((len(seqs),), np.float32)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = -(-len(seqs[rows[0]]) // length_multiple) * length_multiple
    ids, mask = np.zeros((batch_size, length), np.int32), np.zeros((batch_size, length), np.int32)
    for j, i in enumerate(rows):
      ids[j, :len(seqs[i])], mask[j, :len(seqs[i])] = seqs[i], 1
    mask[len(rows):, 0] = 1  # filler rows: one real token, ignored
    out[rows] = np.asarray(model.scores(ids, mask))[:len(rows), 0]
  return out


def rewardbench_score(models: "Models", model: Any) -> dict[str, Any]:
  """RewardBench score of `model` as an IPO classifier on the `evaluation.rewardbench` slice ({} when off)."""
  pairs = models.rewardbench_pairs
  if not pairs:
    return {}
  rows = [r for done in scoring.score_rewardbench_pairs(models.scorer(model), pairs, models.prompt_set) for r in done]
  summary = rewardbench.summarize(rows)
  return {"rewardbench": summary["score"], "rewardbench_pairs": len(rows), "rewardbench_sections": summary["sections"]}


def classify_categories(scorer: scoring.Scorer, prompts: Sequence[str]) -> list[str]:
  """The category whose yes/no question gets the highest P(Yes), per prompt (one reading per category)."""
  examples = [(f"Below is a user's request. Is it {CATEGORY_QUESTIONS[c]}? Answer Yes or No.", p, "")
              for p in prompts for c in CATEGORIES]
  yes = yes_probabilities(scorer, examples).reshape(len(prompts), len(CATEGORIES))
  return [CATEGORIES[i] for i in yes.argmax(axis=1)]


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


def assign_categories(scorer: scoring.Scorer, rows: list[tuple[int, str]], section: Any,
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
    return classify_categories(scorer, [text for _, text in rows])
  raise ValueError(f"category.mode={mode!r} is not one of fixed, column, self")


def prepare_prompts(models: "Models", config: Any) -> dict[str, Any]:
  """Train/held-out prompts with categories, written once to `prompts.json` and read back on later runs."""
  path = os.path.join(config.output_dir, PROMPTS_FILE)
  if os.path.exists(path):
    return _read_json(path)
  p = config.prompts
  items = generation.load_instructions(p)
  train, heldout = split_prompts(items, float(p.heldout_fraction), int(config.seed))
  train = train[:p.train_limit or None]
  heldout = heldout[:p.heldout_limit or None]
  if not train or not heldout:
    raise ValueError(f"{p.path}: {len(items)} prompts leave {len(train)} train / {len(heldout)} held-out prompts")
  raw = None
  if config.category.mode == "column":
    raw = data_lib.read_records(p.path, p.get("split", "train"), p.get("name") or None)
  section = ml_collections.ConfigDict(dict(config.category, source=p.path))
  out = {}
  for name, rows in (("train", train), ("heldout", heldout)):
    cats = assign_categories(models.scorer(models.initial), rows, section, raw)
    out[name] = [{"index": i, "instruction": text, "category": c} for (i, text), c in zip(rows, cats)]
  out["category_counts"] = {name: {c: sum(r["category"] == c for r in out[name]) for c in CATEGORIES}
                            for name in ("train", "heldout")}
  if runtime.is_main_process():
    data_lib.write_json(path, out)
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


def label_samples(models: "Models", policy: Any, arm: str, rows: Sequence[dict[str, Any]],
                  categories: dict[int, str], *, seed: int, round_index: int) -> np.ndarray:
  """Scores of the generation rows under the labelling arm, read from `policy` (ipo, self_reward) or the reward
  model."""
  prompts = [r["instruction"] for r in rows]
  texts = [r["text"] for r in rows]
  if arm == "ipo":
    return ipo_scores(models.scorer(policy), models.prompt_set, prompts, texts, [categories[r["index"]] for r in rows])
  if arm == "self_reward":
    key = jax.random.fold_in(jax.random.key(seed), round_index)
    return judge_lib.judge_scores(policy, prompts, texts, models.judge_settings, key, progress=False)
  if arm == "reward_model":
    return models.rewards(models.reward_model, prompts, texts)
  if arm == "random":
    return np.asarray([np.random.default_rng([seed, round_index, r["index"], r["sample"]]).random()
                       for r in rows], np.float32)
  raise ValueError(f"label.arm={arm!r} is not one of {ARMS}")


# ----------------------------------------------------------------------------------------------------------------
# Round stages.


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """Writes rows whole or not at all (a temporary file renamed into place)."""
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  data_lib.append_jsonl(tmp, rows)
  os.replace(tmp, path)


@dataclasses.dataclass
class Round:
  """A round's directory and its record of finished stages (with their summaries)."""

  directory: str
  index: int

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  @property
  def state(self) -> dict[str, Any]:
    path = self.path(STATE_FILE)
    return _read_json(path) if os.path.exists(path) else {}

  def finish(self, stage: str, summary: dict[str, Any]) -> None:
    if runtime.is_main_process():
      data_lib.write_json(self.path(STATE_FILE), {**self.state, stage: summary})


def _sampling(section: Any, **overrides: Any) -> generation.SamplingConfig:
  return dataclasses.replace(generation.SamplingConfig.from_config(section), **overrides)


def stage_generate(policy: Any, rnd: Round, prompts: list[dict[str, Any]], config: Any) -> dict[str, Any]:
  """N samples per training prompt appended to `generations.jsonl`; rows already there are kept."""
  path = rnd.path(generation.GENERATIONS_FILE)
  done = {(r["index"], r["sample"]) for r in data_lib.iter_jsonl(path)} if os.path.exists(path) else set()
  sampling = _sampling(config.sampling)
  todo = [p for p in prompts if any((p["index"], s) not in done for s in range(sampling.num_samples))]
  chat = bool(config.prompts.get("chat_template", True))
  texts = [generation.format_prompt(policy.tokenizer, p["instruction"], chat) for p in todo]
  start = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(int(config.seed)), rnd.index)
  for pos, gens in generation.stream(policy, texts, sampling, key, indices=[p["index"] for p in todo],
                                     batch_size=int(config.sampling.batch_size), progress=False):
    p = todo[pos]
    rows = [{"index": p["index"], "instruction": p["instruction"], "sample": s, "text": g.text,
             "finish_reason": g.finish_reason, "num_tokens": len(g.token_ids)}
            for s, g in enumerate(gens) if (p["index"], s) not in done]
    if runtime.is_main_process():
      data_lib.append_jsonl(path, rows)
  return {"policy": policy.name, "samples": len(prompts) * sampling.num_samples, "resumed": len(done),
          "seconds": round(time.perf_counter() - start, 2)}


def stage_label(models: "Models", policy: Any, rnd: Round, prompts: list[dict[str, Any]], config: Any
                ) -> dict[str, Any]:
  """Scores every sample (`labels.jsonl`) and writes the best-vs-worst pairs (`pairs.jsonl`)."""
  start = time.perf_counter()
  rows = sorted(data_lib.iter_jsonl(rnd.path(generation.GENERATIONS_FILE)), key=lambda r: (r["index"], r["sample"]))
  categories = {p["index"]: p["category"] for p in prompts}
  scores = label_samples(models, policy, config.label.arm, rows, categories, seed=int(config.seed),
                         round_index=rnd.index)
  labelled = [{**r, "score": float(s)} for r, s in zip(rows, scores)]
  by_prompt: dict[int, list[dict[str, Any]]] = {}
  for r in labelled:
    by_prompt.setdefault(r["index"], []).append(r)
  pairs, counts = make_pairs(prompts, by_prompt, float(config.label.min_margin))
  if runtime.is_main_process():
    _write_jsonl(rnd.path("labels.jsonl"), labelled)
    _write_jsonl(rnd.path("pairs.jsonl"), pairs)
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


def stage_train(policy: Any, rnd: Round, config: Any, reference_params: Any = None) -> tuple[Any, dict[str, Any]]:
  """DPO of `policy` on the round's pairs (reference: `reference_params`, else the policy); exports the new one.
  Without pairs the round keeps its starting policy (`kept_policy` in the summary)."""
  from ipo_jax import export  # pylint: disable=import-outside-toplevel
  pairs = list(data_lib.iter_jsonl(rnd.path("pairs.jsonl")))
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
  name = f"{policy.name.split(' + round')[0]} + round {rnd.index}"
  new_policy = dataclasses.replace(policy, params=params, name=name)
  return new_policy, {"steps": summary["step"], "pairs": summary["train_pairs"], "train": summary["train"],
                      "seconds": round(summary["train_s"] + summary["reference_s"], 2),
                      "export_seconds": round(time.perf_counter() - export_start, 2)}


def greedy_answers(model: Any, prompts: Sequence[dict[str, Any]], config: Any) -> list[dict[str, Any]]:
  """One greedy answer per held-out prompt (text and token count)."""
  sampling = _sampling(config.sampling, temperature=0.0, num_samples=1,
                       max_new_tokens=int(config.evaluation.max_new_tokens))
  chat = bool(config.prompts.get("chat_template", True))
  texts = [generation.format_prompt(model.tokenizer, p["instruction"], chat) for p in prompts]
  gens = generation.generate(model, texts, sampling, 0, batch_size=int(config.sampling.batch_size), progress=False)
  return [{"index": p["index"], "text": g[0].text, "num_tokens": len(g[0].token_ids)} for p, g in zip(prompts, gens)]


def evaluate_answers(models: "Models", prompts: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                     baseline: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Win rate of `answers` over `baseline` (ties count half), the judge's mean score (an IPO judge's P(Yes), a
  reward model's reward) and the mean length."""
  instructions = [p["instruction"] for p in prompts]
  new, old = [a["text"] for a in answers], [a["text"] for a in baseline]
  if models.judge.config.num_labels:
    scores = models.rewards(models.judge, instructions, new)
    pref = scoring.sigmoid(scores - models.rewards(models.judge, instructions, old))
  else:
    scorer = models.scorer(models.judge)
    pref = pairwise_preference(scorer, instructions, new, old)
    scores = ipo_scores(scorer, models.prompt_set, instructions, new, [p["category"] for p in prompts])
  tie = np.asarray([a == b for a, b in zip(new, old)])
  pref = np.where(tie, 0.5, pref)
  wins = np.where(tie, 0.5, (pref > 0.5).astype(np.float32))
  return {"win_rate": float(wins.mean()), "mean_preference": float(pref.mean()), "ties": int(tie.sum()),
          "judge_score": float(scores.mean()), "mean_length": float(np.mean([a["num_tokens"] for a in answers])),
          "prompts": len(prompts)}


# ----------------------------------------------------------------------------------------------------------------
# The loop.


class Models:
  """The initial model, the evaluation judge, the reward model, the policies of finished rounds, and the readers
  of each: an IPO scorer per model (compiled once) with the instructions of `config.scoring`, the 5-point judge's
  settings, the reward model's scores and the RewardBench slice."""

  def __init__(self, config: Any, initial: Any = None):
    self.config = config
    self.initial = initial or runtime.load_model_from_config(config)
    self.mesh = self.initial.mesh
    judge = config.evaluation.judge
    self.judge = self.initial if not judge else self._load(judge)
    self.scoring = scoring.Settings.from_config(config.scoring)
    self.prompt_set = prompts_lib.prompts_from_config(config.scoring.get("prompts_file", ""))
    self.judge_settings = judge_lib.JudgeSettings.from_config(config.self_reward, config.self_reward.sampling)
    self._scorers: dict[str, scoring.Scorer] = {}

  @functools.cached_property
  def reward_model(self) -> Any:
    if not self.config.reward_model.path:
      raise ValueError("label.arm='reward_model' needs reward_model.path (a *ForSequenceClassification directory)")
    return self._load(self.config.reward_model.path)

  def rewards(self, model: Any, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    r = self.config.reward_model
    return reward_scores(model, prompts, responses, chat_template=bool(r.chat_template), max_length=int(r.max_length),
                         batch_size=int(r.batch_size))

  @functools.cached_property
  def rewardbench_pairs(self) -> list[dict[str, Any]]:
    section = self.config.evaluation.rewardbench
    return list(rewardbench.load_pairs(section)) if section.path else []

  def scorer(self, model: Any) -> scoring.Scorer:
    if model.name not in self._scorers:
      self._scorers[model.name] = scoring.Scorer(model, self.scoring)
    return self._scorers[model.name]

  def _load(self, path: str) -> Any:
    from ipo_jax.loading import load_model  # pylint: disable=import-outside-toplevel
    return load_model(path, dtype=self.config.model.get("dtype", "float32"), mesh=self.mesh)

  def policy_after(self, round_index: int) -> Any:
    """The policy that round `round_index` + 1 starts from (0: the initial model)."""
    if round_index == 0:
      return self.initial
    state = Round(os.path.join(self.config.output_dir, f"round_{round_index}"), round_index).state
    if state.get("train", {}).get("kept_policy"):  # that round had no pairs to train on
      return self.policy_after(round_index - 1)
    policy = self._load(os.path.join(self.config.output_dir, f"round_{round_index}", "policy"))
    return dataclasses.replace(policy, tokenizer=self.initial.tokenizer,
                               name=f"{self.initial.name} + round {round_index}")


def run_round(models: Models, rnd: Round, prompts: dict[str, Any], config: Any, baseline: list[dict[str, Any]],
              policy: Any = None) -> tuple[Any, dict[str, Any]]:
  """Runs the stages of round `rnd` that are not finished. `policy`: the round's starting policy when already in
  memory (else loaded when a stage needs it). Returns the new policy (None when no stage needed it) and the state."""
  state, new_policy = rnd.state, None
  for stage in STAGES:
    if stage in state:
      continue
    if policy is None and stage != "eval":
      policy = models.policy_after(rnd.index - 1)
    runtime.log(f"round {rnd.index}: {stage}")
    stage_start = time.perf_counter()
    if stage == "generate":
      summary = stage_generate(policy, rnd, prompts["train"], config)
    elif stage == "label":
      summary = stage_label(models, policy, rnd, prompts["train"], config)
    elif stage == "train":
      reference = models.initial.params if config.reference == "initial" and rnd.index > 1 else None
      new_policy, summary = stage_train(policy, rnd, config, reference)
    else:
      new_policy = new_policy or models.policy_after(rnd.index)
      answers = greedy_answers(new_policy, prompts["heldout"], config)
      if runtime.is_main_process():
        _write_jsonl(rnd.path("eval_answers.jsonl"), answers)
      summary = {"policy": new_policy.name, **evaluate_answers(models, prompts["heldout"], answers, baseline),
                 **rewardbench_score(models, new_policy), "seconds": round(time.perf_counter() - stage_start, 2)}
    rnd.finish(stage, summary)
    state = rnd.state
  return new_policy, state


def round_table(config: Any, initial_row: dict[str, Any], states: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per round (0: the initial model): win rate vs the initial model, judge score, length, RewardBench,
  pairs."""
  rows = [{"round": 0, "arm": config.label.arm, **initial_row}]
  for r, state in enumerate(states, start=1):
    rows.append({"round": r, "arm": config.label.arm, **state["eval"], "pairs": state["label"]["pairs"],
                 "dpo_loss": state["train"]["train"].get("loss"),
                 "dpo_accuracy": state["train"]["train"].get("rewards/accuracies")})
  return rows


TABLE_COLUMNS = ("round", "arm", "win_rate", "judge_score", "mean_length", "rewardbench", "pairs", "dpo_loss",
                 "dpo_accuracy")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
  fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot_rounds(rows: Sequence[dict[str, Any]], png_path: str) -> None:
  """Win rate, judge score, answer length and RewardBench score (when measured) against the round."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = [k for k in ("win_rate", "judge_score", "mean_length", "rewardbench") if all(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
  for ax, key in zip(axes, keys):
    ax.plot([r["round"] for r in rows], [r[key] for r in rows], "o-")
    ax.set_title(key)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


def run(config: Any, model: Any = None) -> dict[str, Any]:
  """Task `self_improve`: `config.rounds` rounds of generate, label, train and evaluate (see the module doc).

  `model`: the initial model when already loaded (else `config.model` is loaded onto `config.mesh`).
  """
  if not config.get("output_dir"):
    raise ValueError("output_dir is required for task self_improve")
  if config.label.arm not in ARMS:
    raise ValueError(f"label.arm={config.label.arm!r} is not one of {ARMS}")
  if config.reference not in REFERENCES:
    raise ValueError(f"reference={config.reference!r} is not one of {REFERENCES}")
  os.makedirs(config.output_dir, exist_ok=True)
  start = time.perf_counter()
  models = Models(config, model)
  prompts = prepare_prompts(models, config)

  baseline_path = os.path.join(config.output_dir, "initial_answers.jsonl")
  if os.path.exists(baseline_path):
    baseline = list(data_lib.iter_jsonl(baseline_path))
  else:
    baseline = greedy_answers(models.initial, prompts["heldout"], config)
    if runtime.is_main_process():
      _write_jsonl(baseline_path, baseline)
  initial_path = os.path.join(config.output_dir, "initial_eval.json")
  if os.path.exists(initial_path):
    initial_row = _read_json(initial_path)
  else:
    initial_row = {**evaluate_answers(models, prompts["heldout"], baseline, baseline),
                   **rewardbench_score(models, models.initial)}
    if runtime.is_main_process():
      data_lib.write_json(initial_path, initial_row)

  policy, states = models.initial, []
  for r in range(1, int(config.rounds) + 1):
    rnd = Round(os.path.join(config.output_dir, f"round_{r}"), r)
    os.makedirs(rnd.directory, exist_ok=True)
    policy, state = run_round(models, rnd, prompts, config, baseline, policy)
    states.append(state)

  rows = round_table(config, initial_row, states)
  summary = {"rounds": rows, "category_counts": prompts["category_counts"],
             "seconds": round(time.perf_counter() - start, 2), "output_dir": config.output_dir}
  if runtime.is_main_process():
    data_lib.write_json(os.path.join(config.output_dir, "rounds.json"), summary)
    with open(os.path.join(config.output_dir, "rounds.md"), "w", encoding="utf-8") as f:
      f.write(markdown_table(rows))
    plot_rounds(rows, os.path.join(config.output_dir, "rounds.png"))
  runtime.log(markdown_table(rows))
  return summary
