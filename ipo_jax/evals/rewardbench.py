"""RewardBench: its pairs, the official score arithmetic, and an evaluator for any pair scorer.

Every RewardBench scorer (the IPO classifier, the self-rewarding judge, a policy evaluated inside the
self-improvement loop) runs through `Evaluator`: pairs in, one result row per pair out (appended to a run
directory's scores.jsonl as they finish, resumed from it), metrics from `run()` and the summary from `summary()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ipo_jax import data
from ipo_jax.evals.taxonomy import EXAMPLE_COUNTS, PAPER_CATEGORIES, PRIOR_SETS, SUBSET_MAPPING

DEFAULT_HUB_ID = "allenai/reward-bench"
SPLITS = ("filtered", "raw")
FIELDS = ("prompt", "chosen", "rejected", "subset", "id")
TEXT_FIELDS = ("prompt", "chosen", "rejected", "subset")

SCORES_FILE = "scores.jsonl"

# ----------------------------------------------------------------------------------------------------------------
# Data.


class Pairs(list):
  """Pair rows (prompt, chosen, rejected, subset, id) with their source, the number of invalid rows skipped, and
  the fingerprint of every valid row of the source (before subsets are selected: a rerun may select more)."""

  def __init__(self, rows: Iterable[dict[str, Any]], source: str, skipped: int = 0, fingerprint: str = ""):
    super().__init__(rows)
    self.source, self.skipped, self.fingerprint = source, skipped, fingerprint


def pair_key(row: Mapping[str, Any]) -> tuple[str, str]:
  """Rows are keyed by (subset, id): RewardBench ids repeat across subsets."""
  return str(row["subset"]), str(row["id"])


def item_index(pair: Mapping[str, Any], part: str) -> int:
  """A stable sampling index for one part of a pair (a side or an order a judge reads it in), independent of
  which pairs are selected: generative judges seed each generation with it."""
  digest = hashlib.sha256(f"{pair['subset']}/{pair['id']}/{part}".encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1


def _read(data_cfg: Any) -> tuple[list[dict[str, Any]], str]:
  path, split = data_cfg.get("path", "") or DEFAULT_HUB_ID, data_cfg.get("split", "filtered")
  if split not in SPLITS:
    raise ValueError(f"data.split must be one of {SPLITS}, got {split!r}")
  if os.path.exists(path) and not path.endswith(data.LOCAL_SUFFIXES):
    raise data.DataError(f"{path}: unknown format; expected one of {', '.join(data.LOCAL_SUFFIXES)}")
  local = data.local_file(path, split=split)
  return data.read_local(local), (local if local == path else f"{path}:{split} ({local})")


def load_pairs(data_cfg: Any) -> Pairs:
  """RewardBench pairs from `data_cfg` (path, split, subsets, max_per_subset, skip_invalid, columns).

  `path`: a local .jsonl / .jsonl.gz / .json / .parquet file or a hub id (empty: `allenai/reward-bench`);
  `split` filtered or raw. The hub's filtered split resolves through `ipo_jax.sources` (cache, hub, offline copy). `columns` renames file
  columns to ours ({"prompt": "question", ...}). Missing or empty fields are an error naming the row and field,
  or, with `skip_invalid`, are skipped and counted. Duplicate (subset, id) keys are an error.
  """
  rows, source = _read(data_cfg)
  columns = {k: v for k, v in dict(data_cfg.get("columns", None) or {}).items() if v}  # "": same name
  unknown = set(columns) - set(FIELDS)
  if unknown:
    raise ValueError(f"data.columns renames unknown fields {sorted(unknown)}; ours are {FIELDS}")
  if columns:
    rows = [{**r, **{ours: r.get(theirs) for ours, theirs in columns.items()}} for r in rows]
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise data.DataError(f"{source}: row {i} is not an object")
  skip = bool(data_cfg.get("skip_invalid", False))
  rows, skipped = data.require_fields(rows, FIELDS, source, skip_invalid=skip)
  checked = []
  for row in rows:
    bad = next((f for f in TEXT_FIELDS if not isinstance(row[f], str) or not row[f].strip()), None)
    if bad is None:
      checked.append({f: row[f] for f in FIELDS})
    elif skip:
      skipped += 1
    else:
      raise data.DataError(f"{source}: row (subset={row.get('subset')!r}, id={row.get('id')!r}) has a "
                           f"{'blank' if isinstance(row[bad], str) else 'non-text'} field {bad!r} "
                           "(set data.skip_invalid=True to skip such rows)")
  seen = set()
  for row in checked:
    key = pair_key(row)
    if key in seen:
      raise data.DataError(f"{source}: (subset, id) = {key} appears twice")
    seen.add(key)
  return Pairs(select(checked, data_cfg.get("subsets", None), data_cfg.get("max_per_subset", 0)), source, skipped,
               fingerprint(checked))


def fingerprint(obj: Any) -> str:
  """A short content hash of JSON-able data (the same rows hash the same whichever file they came from)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select(rows: Sequence[dict[str, Any]], subsets: Any = None, max_per_subset: int = 0) -> list[dict[str, Any]]:
  """Rows of the named subsets (a list or a comma-separated string; empty: all), at most `max_per_subset` each."""
  if isinstance(subsets, str):
    subsets = [s.strip() for s in subsets.split(",") if s.strip()]
  if subsets:
    present = {r["subset"] for r in rows}
    missing = [s for s in subsets if s not in present]
    if missing:
      raise ValueError(f"data.subsets names {missing}, not in the data; it has {sorted(present)}")
    rows = [r for r in rows if r["subset"] in set(subsets)]
  if max_per_subset:
    taken: dict[str, int] = {}
    kept = []
    for r in rows:
      if taken.get(r["subset"], 0) < max_per_subset:
        taken[r["subset"]] = taken.get(r["subset"], 0) + 1
        kept.append(r)
    rows = kept
  return list(rows)


# ----------------------------------------------------------------------------------------------------------------
# Scores.


def subset_results(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per subset: accuracy (ties count as wrong), count, correct, ties, truncated pairs."""
  out: dict[str, dict[str, Any]] = {}
  for r in rows:
    s = out.setdefault(r["subset"], {"count": 0, "correct": 0, "ties": 0, "truncated": 0})
    s["count"] += 1
    s["correct"] += int(bool(r["correct"]))
    s["ties"] += int(bool(r.get("tie", False)))
    s["truncated"] += int(bool(r.get("truncated_chosen", False) or r.get("truncated_rejected", False)))
  for s in out.values():
    s["accuracy"] = s["correct"] / s["count"]
  return dict(sorted(out.items()))


def section_scores(per_subset_accuracy: Mapping[str, float]) -> dict[str, float]:
  """The four official sections: means of the subsets present, weighted by RewardBench's example counts."""
  sections = {}
  for section, subsets in SUBSET_MAPPING.items():
    present = [s for s in subsets if s in per_subset_accuracy]
    if present:
      weights = np.array([EXAMPLE_COUNTS[s] for s in present], np.float64)
      values = np.array([per_subset_accuracy[s] for s in present], np.float64)
      sections[section] = float(weights @ values / weights.sum())
  return sections


def overall_score(sections: Mapping[str, float], per_subset_accuracy: Mapping[str, float] | None = None) -> float:
  """The mean of the sections present; with prior-set subsets present, the leaderboard's 2:1 weighting."""
  prior = [per_subset_accuracy[s] for s in PRIOR_SETS if s in (per_subset_accuracy or {})]
  values = list(sections.values()) + ([float(np.mean(prior))] if prior else [])
  weights = [2.0] * len(sections) + ([1.0] if prior else [])
  return float(np.average(values, weights=weights)) if values else float("nan")


def paper_scores(per_subset_accuracy: Mapping[str, float]) -> dict[str, float]:
  """The paper's view: Chat (+ Chat Hard), Code, Math, Safety (count-weighted within each) and their plain mean."""
  out = {}
  for name, subsets in PAPER_CATEGORIES.items():
    present = [s for s in subsets if s in per_subset_accuracy]
    if present:
      weights = [EXAMPLE_COUNTS[s] for s in present]
      out[name] = float(np.average([per_subset_accuracy[s] for s in present], weights=weights))
  if out:
    out["mean"] = float(np.mean(list(out.values())))
  return out


def candidate_accuracies(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
  """Prompt search: per subset, the accuracy each candidate instruction of an ensemble gets on its own."""
  per: dict[str, list[np.ndarray]] = {}
  for r in rows:
    cand = r.get("candidates")
    if cand:
      per.setdefault(r["subset"], []).append(
          np.asarray(cand["log_odds_chosen"]) > np.asarray(cand["log_odds_rejected"]))
  return {s: np.mean(np.stack(v), axis=0).tolist() for s, v in sorted(per.items())}


def summarize(rows: Sequence[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
  """Subsets, sections, overall score, paper categories, counts (and the prompt search of an ensemble)."""
  subsets = subset_results(rows)
  accuracy = {s: v["accuracy"] for s, v in subsets.items()}
  sections = section_scores(accuracy)
  summary = {
      "score": overall_score(sections, accuracy),
      "sections": sections,
      "paper": paper_scores(accuracy),
      "subsets": subsets,
      "counts": {
          "pairs": len(rows),
          "correct": sum(v["correct"] for v in subsets.values()),
          "ties": sum(v["ties"] for v in subsets.values()),
          "truncated": sum(v["truncated"] for v in subsets.values()),
          "other_subsets": sorted(set(subsets) - set(EXAMPLE_COUNTS) - set(PRIOR_SETS)),
      },
  }
  search = candidate_accuracies(rows)
  if search:
    summary["prompt_search"] = {
        s: {"accuracy": acc, "best": int(np.argmax(acc)), "best_accuracy": max(acc)} for s, acc in search.items()}
    selected = {**accuracy, **{s: max(acc) for s, acc in search.items()}}  # best candidate per subset
    selected_sections = section_scores(selected)
    summary["prompt_search_selected"] = {"sections": selected_sections,
                                         "score": overall_score(selected_sections, selected)}
  summary.update(extra)
  return summary


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """A Markdown table with one column per RewardBench summary: score, sections, paper categories, ties."""
  names = list(summaries)
  rows = [("Score", lambda s: s["score"])]
  for section in SUBSET_MAPPING:
    rows.append((section, lambda s, k=section: s["sections"].get(k)))
  for category in list(PAPER_CATEGORIES) + ["mean"]:
    rows.append((f"paper: {category}", lambda s, k=category: s.get("paper", {}).get(k)))
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for label, get in rows:
    values = [get(summaries[n]) for n in names]
    lines.append(f"| {label} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in values) + " |")
  lines.append("| pairs (ties) | " + " | ".join(
      f"{summaries[n]['counts']['pairs']} ({summaries[n]['counts']['ties']})" for n in names) + " |")
  return "\n".join(lines)


def read_scores(output_dir: str, keys: set[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
  """The rows of a run's scores.jsonl (only those whose (subset, id) is in `keys`, when given)."""
  rows = data.iter_jsonl(os.path.join(output_dir, SCORES_FILE))
  return [r for r in rows if keys is None or pair_key(r) in keys]


# ----------------------------------------------------------------------------------------------------------------
# The evaluator.

ScoreFn = Callable[[list[dict[str, Any]]], Iterable[list[dict[str, Any]]]]


class Evaluator:
  """RewardBench accuracy of a pair scorer, resumable in a run directory.

  `score(pairs)` yields lists of result rows (subset, id, correct, tie, ...) as pairs finish; it is called only
  with the pairs not yet in `run`'s scores.jsonl (so a scorer that loads a model can do it lazily). `run()` yields
  (name, value) metrics: the score, the sections and the paper's categories.
  """

  def __init__(self, pairs: Pairs, score: ScoreFn, run: Any = None, rows_file: str = SCORES_FILE):
    self.pairs, self._score, self._run, self._rows_file = pairs, score, run, rows_file
    self.finished: dict[tuple[str, str], dict[str, Any]] = {}
    self.scored = 0

  def todo(self) -> list[dict[str, Any]]:
    if self._run is not None and not self.finished:
      self.finished = {pair_key(r): r for r in self._run.rows(self._rows_file)}
    return [p for p in self.pairs if pair_key(p) not in self.finished]

  def run(self) -> Iterator[tuple[str, float]]:
    todo = self.todo()
    if self._run is not None:
      self._run.agree(len(todo), "finished pairs")
    if todo:
      for done in self._score(todo):
        if self._run is not None:
          self._run.append(self._rows_file, done)
        self.finished.update((pair_key(r), r) for r in done)
        self.scored += len(done)
    summary = summarize(self.rows())
    yield "score", summary["score"]
    for name, value in summary["sections"].items():
      yield f"sections/{name}", value
    for name, value in summary["paper"].items():
      yield f"paper/{name}", value

  def describe(self, task: str, verb: str = "scored") -> str:
    """A log line: how many pairs from where, how many skipped as invalid, how many already finished."""
    done = len(self.pairs) - len(self.todo())
    return (f"{task}: {len(self.pairs)} pairs from {self.pairs.source}"
            + (f" ({self.pairs.skipped} invalid rows skipped)" if self.pairs.skipped else "")
            + (f"; {done} already {verb} in {self._run.path}" if done else ""))

  def rows(self) -> list[dict[str, Any]]:
    """The result rows of every pair, in the pairs' order."""
    return [self.finished[pair_key(p)] for p in self.pairs]


def run_generative(pairs: Pairs, run: Any, task: str, load_model: Callable[[], Any],
                   judge: Callable[[Any, list[dict[str, Any]]], Iterable[dict[str, Any]]]
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """A generative judge over the pairs not yet in `run`: `judge(model, todo)` yields one raw row per pair, the model
  loaded (`load_model()`) only when there is something to judge. Returns the raw rows of every pair and the
  judging's statistics (pairs judged now, seconds, compilations)."""
  from ipo_jax import runtime  # pylint: disable=import-outside-toplevel  # jax-heavy
  from ipo_jax.sample import engine  # pylint: disable=import-outside-toplevel

  def score(todo):
    model = load_model()
    for row in judge(model, todo):
      yield [row]

  evaluator = Evaluator(pairs, score, run)
  runtime.log(evaluator.describe(task, "judged"))
  compiles, started = engine.num_compilations(), time.time()
  dict(evaluator.run())
  return evaluator.rows(), {"pairs_judged": evaluator.scored, "seconds": round(time.time() - started, 2),
                            "compilations": engine.num_compilations() - compiles}
