"""RewardBench result rows from the IPO classifier: each pair under its subset's instructions, ensembles combined.

A row holds P(Yes) of both responses (`score_*`, combined over the instructions with `scoring.ensemble`), the mean
log-odds and Yes+No mass, `correct` (chosen strictly above rejected; ties are wrong and flagged), truncation
flags, token counts, and with several instructions each candidate's log-odds. `yes_no_mass` summarises a run's
Yes+No mass and flags one too low for the instruction to be a yes/no question.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from ipo_jax.ipo import scorer as scorer_lib

# Below this geometric mean of the Yes+No probability mass the model is not answering yes or no: the instruction
# is probably not a yes/no question (or the answers do not match the layout), and P(Yes) renormalised over two
# unlikely tokens is noise. Measured with SmolLM2-135M on one pair per RewardBench subset (geometric mean, mean):
# chat layout 0.18, 0.22; paper layout with the project's or the authors' questions 5.5e-4, 1.7e-3 and 6.9e-4,
# 3.4e-3; a template without a question 6.5e-6, 5.6e-4. The arithmetic mean is carried by a few outliers (the
# no-question run's is within 3x of the paper layout's), so the geometric mean decides.
LOW_YES_NO_MASS = 1e-4


def combine(log_odds: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
  """(P(Yes), comparison key) of K scores along the last axis: mean P(Yes) or mean log-odds."""
  if method == "mean_log_odds":
    key = log_odds.mean(-1)
    return scorer_lib.sigmoid(key), key
  prob = scorer_lib.sigmoid(log_odds).mean(-1)
  return prob, prob


def score_rewardbench_pairs(scorer: scorer_lib.Scorer, rows: Sequence[dict[str, Any]],
                            prompt_set: Any) -> Iterator[list[dict[str, Any]]]:
  """Scores (prompt, chosen, rejected, subset) rows under their instructions; yields rows as they finish.

  Each row is scored under every instruction `prompt_set` gives its subset (an ensemble when several, combined
  with `scoring.ensemble`). All rows share one plan, so the compiled programs stay within `scoring.max_programs`.
  """
  pairs, pair_row = [], []
  for r, row in enumerate(rows):
    for instruction in prompt_set.instructions(row["subset"]):
      pairs.append((instruction, row["prompt"], row["chosen"], row["rejected"]))
      pair_row.append(r)
  method = scorer.settings.ensemble
  return score_grouped_pairs(scorer, pairs, pair_row, len(rows), lambda r, values, encoded, items: _pair_result(
      rows[r], method, values, encoded, items))


def score_grouped_pairs(scorer: scorer_lib.Scorer, pairs: Sequence[tuple[str, str, str, str]],
                        pair_row: Sequence[int], num_rows: int, finish: Any) -> Iterator[list[Any]]:
  """Scores (instruction, prompt, chosen, rejected) `pairs` in one plan (each pair's shared start once), pair i
  belonging to result row `pair_row[i]`; yields `finish(r, values, encoded, items)` for the rows whose pairs have
  all finished (`values` [2 x pairs, 2]: log-odds and log Yes+No mass of sequence 2i (chosen) and 2i + 1
  (rejected); `items`: row r's pair indices)."""
  encoded = scorer.encode([(ins, prompt, response) for ins, prompt, chosen, rejected in pairs
                           for response in (chosen, rejected)])
  row_items: list[list[int]] = [[] for _ in range(num_rows)]
  for i, r in enumerate(pair_row):
    row_items[r].append(i)
  remaining = np.array([2 * len(x) for x in row_items])
  values = np.zeros((len(encoded), 2))
  for idx, out in scorer.score_pairs([(encoded[2 * i][0], encoded[2 * i + 1][0]) for i in range(len(pair_row))]):
    values[idx] = out
    finished = []
    for seq in idx:
      r = pair_row[seq // 2]
      remaining[r] -= 1
      if remaining[r] == 0:
        finished.append(finish(r, values, encoded, row_items[r]))
    if finished:
      yield finished


def _pair_result(row, method, values, encoded, item_idx) -> dict[str, Any]:
  """The result row of `row` from the scores `values` of its instructions' sequences (`item_idx`)."""
  seq = np.array([[2 * j, 2 * j + 1] for j in item_idx])  # [K, 2]
  log_odds, log_mass = values[seq, 0], values[seq, 1]
  prob, key = combine(log_odds.T, method)
  result = {
      "subset": row["subset"], "id": row["id"],
      "score_chosen": float(prob[0]), "score_rejected": float(prob[1]),
      "log_odds_chosen": float(log_odds[:, 0].mean()), "log_odds_rejected": float(log_odds[:, 1].mean()),
      "yes_no_mass_chosen": float(np.exp(log_mass[:, 0]).mean()),
      "yes_no_mass_rejected": float(np.exp(log_mass[:, 1]).mean()),
      "correct": bool(key[0] > key[1]), "tie": bool(key[0] == key[1]),
      "truncated_chosen": any(encoded[s][1] for s in seq[:, 0]),
      "truncated_rejected": any(encoded[s][1] for s in seq[:, 1]),
      "tokens_chosen": max(len(encoded[s][0]) for s in seq[:, 0]),
      "tokens_rejected": max(len(encoded[s][0]) for s in seq[:, 1]),
  }
  if len(item_idx) > 1:
    result["candidates"] = {"log_odds_chosen": log_odds[:, 0].tolist(), "log_odds_rejected": log_odds[:, 1].tolist()}
  return result


def yes_no_mass(rows: Sequence[dict[str, Any]], threshold: float = LOW_YES_NO_MASS) -> dict[str, Any]:
  """summary.json's `yes_no_mass` over both responses of every row: mean, geometric mean and min, and `low` when
  the geometric mean is below `threshold` (see LOW_YES_NO_MASS)."""
  values = np.array([r[k] for r in rows for k in ("yes_no_mass_chosen", "yes_no_mass_rejected")
                     if r.get(k) is not None], np.float64)
  if not values.size:
    return {"mean": None, "geometric_mean": None, "min": None, "threshold": threshold, "low": False}
  geometric = float(np.exp(np.log(np.maximum(values, 1e-300)).mean()))
  return {"mean": float(values.mean()), "geometric_mean": geometric, "min": float(values.min()),
          "threshold": threshold, "low": geometric < threshold}
