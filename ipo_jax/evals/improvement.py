"""The readers of the self-improvement loop: the models it holds (`Models`), the labels of its samples under
each arm, a reward model's scores, greedy answers to held-out prompts, their win rate against a baseline's as
judged by an IPO classifier or a reward model, and the per-round table."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from ipo_jax import runtime
from ipo_jax.evals import ipo_rows, judge, report, rewardbench
from ipo_jax.ipo import prompts as prompts_lib
from ipo_jax.model import chat
from ipo_jax.ipo import readings
from ipo_jax.ipo import scorer as scorer_lib
from ipo_jax.sample import engine
from ipo_jax.sample import instructions as instructions_lib

ARMS = ("ipo", "self_reward", "reward_model", "random")


class Models:
  """The initial model, the evaluation judge, the reward model, the policies of finished rounds, and the readers
  of each: an IPO scorer per model (compiled once) with the instructions of `config.scoring`, the 5-point judge's
  settings, the reward model's scores and the RewardBench slice."""

  def __init__(self, config: Any, initial: Any = None):
    self.config = config
    self.initial = initial or runtime.load_model_from_config(config)
    self.mesh = self.initial.mesh
    judge_path = config.evaluation.judge
    self.judge = self.initial if not judge_path else self.load(judge_path)
    self.scoring = scorer_lib.Settings.from_config(config.scoring)
    self.prompt_set = prompts_lib.prompts_from_config(config.scoring.get("prompts_file", ""))
    self.judge_settings = judge.JudgeSettings.from_config(config.self_reward, config.self_reward.sampling)
    self._scorers: dict[int, tuple[Any, scorer_lib.Scorer]] = {}  # id(model) -> (model, its scorer)

  @functools.cached_property
  def reward_model(self) -> Any:
    if not self.config.reward_model.path:
      raise ValueError("label.arm='reward_model' needs reward_model.path (a *ForSequenceClassification directory)")
    return self.load(self.config.reward_model.path)

  def rewards(self, model: Any, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    r = self.config.reward_model
    return reward_scores(model, prompts, responses, chat_template=bool(r.chat_template), max_length=int(r.max_length),
                         batch_size=int(r.batch_size))

  @functools.cached_property
  def rewardbench_pairs(self) -> list[dict[str, Any]]:
    section = self.config.evaluation.rewardbench
    return list(rewardbench.load_pairs(section)) if section.path else []

  def scorer(self, model: Any) -> scorer_lib.Scorer:
    if id(model) not in self._scorers:  # the model is kept with its scorer, so its id stays its own
      self._scorers[id(model)] = (model, scorer_lib.Scorer(model, self.scoring))
    return self._scorers[id(model)][1]

  def load(self, path: str) -> Any:
    from ipo_jax.model.loading import load_model  # pylint: disable=import-outside-toplevel
    return load_model(path, dtype=self.config.model.get("dtype", "float32"), mesh=self.mesh)

  def rewardbench_score(self, model: Any) -> dict[str, Any]:
    """RewardBench score of `model` as an IPO classifier on the `evaluation.rewardbench` slice ({} when off)."""
    pairs = self.rewardbench_pairs
    if not pairs:
      return {}
    scorer = self.scorer(model)
    evaluator = rewardbench.Evaluator(pairs, lambda todo: ipo_rows.score_rewardbench_pairs(scorer, todo,
                                                                                            self.prompt_set))
    metrics = dict(evaluator.run())
    return {"rewardbench": metrics["score"], "rewardbench_pairs": len(pairs),
            "rewardbench_sections": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("sections/")}}


def label_samples(models: "Models", policy: Any, arm: str, rows: Sequence[dict[str, Any]],
                  categories: dict[int, str], *, seed: int, round_index: int) -> np.ndarray:
  """Scores of the generation rows under the labelling arm, read from `policy` (ipo, self_reward) or the reward
  model."""
  prompts = [r["instruction"] for r in rows]
  texts = [r["text"] for r in rows]
  if arm == "ipo":
    return readings.ipo_scores(models.scorer(policy), models.prompt_set, prompts, texts, [categories[r["index"]] for r in rows])
  if arm == "self_reward":
    key = jax.random.fold_in(jax.random.key(seed), round_index)
    return judge.judge_scores(policy, prompts, texts, models.judge_settings, key, progress=False)
  if arm == "reward_model":
    return models.rewards(models.reward_model, prompts, texts)
  if arm == "random":
    return np.asarray([np.random.default_rng([seed, round_index, r["index"], r["sample"]]).random()
                       for r in rows], np.float32)
  raise ValueError(f"label.arm={arm!r} is not one of {ARMS}")


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
    texts = [chat.user_turn(tok, p, response=r) for p, r in zip(prompts, responses)]
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


def greedy_answers(model: Any, prompts: Sequence[dict[str, Any]], config: Any) -> list[dict[str, Any]]:
  """One greedy answer per held-out prompt (text and token count)."""
  sampling = dataclasses.replace(engine.SamplingConfig.from_config(config.sampling), temperature=0.0,
                                 num_samples=1, max_new_tokens=int(config.evaluation.max_new_tokens))
  chat = bool(config.prompts.get("chat_template", True))
  texts = [instructions_lib.format_prompt(model.tokenizer, p["instruction"], chat) for p in prompts]
  gens = engine.generate(model, texts, sampling, 0, batch_size=int(config.sampling.batch_size), progress=False)
  return [{"index": p["index"], "text": g[0].text, "num_tokens": len(g[0].token_ids)} for p, g in zip(prompts, gens)]


def evaluate_answers(models: Any, prompts: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                     baseline: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Win rate of `answers` over `baseline` (ties count half), the judge's mean score (an IPO judge's P(Yes), a
  reward model's reward) and the mean length."""
  instructions = [p["instruction"] for p in prompts]
  new, old = [a["text"] for a in answers], [a["text"] for a in baseline]
  if models.judge.config.num_labels:
    scores = models.rewards(models.judge, instructions, new)
    pref = scorer_lib.sigmoid(scores - models.rewards(models.judge, instructions, old))
  else:
    scorer = models.scorer(models.judge)
    pref = readings.pairwise_preference(scorer, instructions, new, old)
    scores = readings.ipo_scores(scorer, models.prompt_set, instructions, new, [p["category"] for p in prompts])
  tie = np.asarray([a == b for a, b in zip(new, old)])
  pref = np.where(tie, 0.5, pref)
  wins = np.where(tie, 0.5, (pref > 0.5).astype(np.float32))
  return {"win_rate": float(wins.mean()), "mean_preference": float(pref.mean()), "ties": int(tie.sum()),
          "judge_score": float(scores.mean()), "mean_length": float(np.mean([a["num_tokens"] for a in answers])),
          "prompts": len(prompts)}


def round_table(arm: str, initial_row: dict[str, Any], states: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per round (0: the initial model): win rate vs the initial model, judge score, length, RewardBench,
  pairs."""
  rows = [{"round": 0, "arm": arm, **initial_row}]
  for r, state in enumerate(states, start=1):
    rows.append({"round": r, "arm": arm, **state["eval"], "pairs": state["label"]["pairs"],
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
  plt = report.pyplot()
  keys = [k for k in ("win_rate", "judge_score", "mean_length", "rewardbench") if all(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
  for ax, key in zip(axes, keys):
    ax.plot([r["round"] for r in rows], [r[key] for r in rows], "o-")
    ax.set_title(key)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  report.save(fig, png_path)
