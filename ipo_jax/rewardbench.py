"""Task `rewardbench`: the IPO classifier on RewardBench, with the official section scores.

The data, score arithmetic, output files and resume logic here are shared by every RewardBench scorer (the
self-rewarding judge reuses them); what is specific to IPO lives in `ipo_jax.scoring`.

Outputs in `output_dir`: `scores.jsonl` (one row per pair, appended as pairs finish), `summary.json`,
`report.md`, `rewardbench.png` and `settings.json` (what a resumed run must match). A rerun with the same
output_dir scores only the pairs not yet in scores.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from ipo_jax import data, runtime

DEFAULT_HUB_ID = "allenai/reward-bench"
SPLITS = ("filtered", "raw")
FIELDS = ("prompt", "chosen", "rejected", "subset", "id")
TEXT_FIELDS = ("prompt", "chosen", "rejected", "subset")

SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "rewardbench.png"
SETTINGS_FILE = "settings.json"

# RewardBench's section weights (rewardbench/constants.py): math-prm counts 984 (= 6 x 164) so that math and code
# weigh the same in Reasoning, though it has 447 pairs.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# The leaderboard's "Prior Sets (0.5 weight)": the mean of these, weighted 1 against 2 for each section.
PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
# The IPO paper's table: Chat (Chat + Chat Hard), Code (hep-*), Math (math-prm), Safety; overall a plain mean.
PAPER_CATEGORIES = {
    "Chat": SUBSET_MAPPING["Chat"] + SUBSET_MAPPING["Chat Hard"],
    "Code": SUBSET_MAPPING["Reasoning"][1:],
    "Math": ("math-prm",),
    "Safety": SUBSET_MAPPING["Safety"],
}


# ----------------------------------------------------------------------------------------------------------------
# Data.


class Pairs(list):
  """Pair rows (prompt, chosen, rejected, subset, id) with their source and the number of invalid rows skipped."""

  def __init__(self, rows: Iterable[dict[str, Any]], source: str, skipped: int = 0):
    super().__init__(rows)
    self.source, self.skipped = source, skipped


def pair_key(row: Mapping[str, Any]) -> tuple[str, str]:
  """Rows are keyed by (subset, id): RewardBench ids repeat across subsets."""
  return str(row["subset"]), str(row["id"])


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
  columns = dict(data_cfg.get("columns", None) or {})
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
  return Pairs(select(checked, data_cfg.get("subsets", None), data_cfg.get("max_per_subset", 0)), source, skipped)


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
# Resume.


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume(output_dir: str, settings: Mapping[str, Any], scores_file: str = SCORES_FILE
           ) -> dict[tuple[str, str], dict[str, Any]]:
  """Finished rows of an earlier run in `output_dir`, keyed by (subset, id); {} for a fresh directory.

  The first run writes `settings` (what determines a score: model, layout, prompts, ...) to settings.json; a
  rerun with different settings is an error naming the fields, so results never mix. A torn last line (an
  interrupted write) is dropped from the file so appending continues cleanly.
  """
  os.makedirs(output_dir, exist_ok=True)
  settings = json.loads(json.dumps(settings, default=str))
  path = os.path.join(output_dir, SETTINGS_FILE)
  scores = os.path.join(output_dir, scores_file)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
      raise ValueError(f"{output_dir} holds results of a run with other settings ({', '.join(changed)} differ); "
                       "use another output_dir, or delete it to start over")
  elif runtime.is_main_process():
    if os.path.exists(scores):
      raise ValueError(f"{scores} exists without {SETTINGS_FILE}; cannot tell which settings produced it")
    data.write_json(path, settings)
  if runtime.is_main_process():
    data.drop_torn_tail(scores)
  rows = list(data.iter_jsonl(scores))
  return {pair_key(r): r for r in rows}


# ----------------------------------------------------------------------------------------------------------------
# Report and plot.


def _pct(x: float | None) -> str:
  return "" if x is None or x != x else f"{100 * x:.1f}"


def format_table(summary: Mapping[str, Any]) -> str:
  """Sections, paper categories and subsets as Markdown tables."""
  lines = ["| Score | " + " | ".join(summary["sections"]) + " |",
           "|---:|" + "---:|" * len(summary["sections"]),
           f"| **{_pct(summary['score'])}** | " + " | ".join(_pct(v) for v in summary["sections"].values()) + " |"]
  paper = summary.get("paper") or {}
  if paper:
    lines += ["", "Paper's view (Chat includes Chat Hard; mean of the four):", "",
              "| " + " | ".join(paper) + " |", "|" + "---:|" * len(paper),
              "| " + " | ".join(_pct(v) for v in paper.values()) + " |"]
  lines += ["", "| subset | section | pairs | accuracy | ties | truncated |", "|---|---|---:|---:|---:|---:|"]
  section_of = {s: sec for sec, subs in SUBSET_MAPPING.items() for s in subs}
  for name, s in summary["subsets"].items():
    lines.append(f"| {name} | {section_of.get(name, '')} | {s['count']} | {_pct(s['accuracy'])} | {s['ties']} | "
                 f"{s['truncated']} |")
  return "\n".join(lines)


def write_report(output_dir: str, summary: Mapping[str, Any], title: str = "RewardBench") -> str:
  """report.md: what was run, the tables, counts and (for an ensemble) the prompt search."""
  c = summary["counts"]
  parts = [f"# {title}", ""]
  for key in ("model", "method", "data", "wall_time_s"):
    if key in summary:
      parts.append(f"- **{key}**: {summary[key]}")
  parts += [f"- **pairs**: {c['pairs']} ({c['ties']} ties counted wrong, {c['truncated']} truncated)", "",
            format_table(summary)]
  search = summary.get("prompt_search")
  if search:
    k = max(len(v["accuracy"]) for v in search.values())
    parts += ["", "## Prompt search: accuracy of each candidate instruction alone", "",
              "| subset | " + " | ".join(f"#{i}" for i in range(k)) + " | best |", "|---|" + "---:|" * (k + 1)]
    for name, v in search.items():
      cells = [_pct(a) for a in v["accuracy"]] + [""] * (k - len(v["accuracy"]))
      parts.append(f"| {name} | " + " | ".join(cells) + f" | #{v['best']} |")
    chosen = summary["prompt_search_selected"]
    parts += ["", f"With the best candidate of each subset: score {_pct(chosen['score'])} ("
              + ", ".join(f"{k} {_pct(v)}" for k, v in chosen["sections"].items()) + "). That choice is made on the "
              "test pairs themselves (as the paper's prompt search did); the ensemble above is not."]
  text = "\n".join(parts) + "\n"
  if runtime.is_main_process():
    with open(os.path.join(output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
      f.write(text)
  return text


def plot(output_dir: str, summary: Mapping[str, Any], title: str = "RewardBench") -> str:
  """rewardbench.png: accuracy per subset (coloured by section) and per section, with the 50% chance line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  path = os.path.join(output_dir, PLOT_FILE)
  section_of = {s: sec for sec, subs in SUBSET_MAPPING.items() for s in subs}
  colors = dict(zip(list(SUBSET_MAPPING) + [""], ["C0", "C1", "C2", "C3", "C7"]))
  names = sorted(summary["subsets"], key=lambda s: (list(colors).index(section_of.get(s, "")), s))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [4, 1]})
  ax1.bar(range(len(names)), [100 * summary["subsets"][s]["accuracy"] for s in names],
          color=[colors[section_of.get(s, "")] for s in names])
  ax1.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=8)
  ax1.set_ylabel("accuracy (%)")
  ax1.set_title(f"{title}: per subset")
  sections = summary["sections"]
  ax2.bar(range(len(sections) + 1), [100 * v for v in sections.values()] + [100 * summary["score"]],
          color=[colors[s] for s in sections] + ["k"])
  ax2.set_xticks(range(len(sections) + 1), list(sections) + ["Score"], rotation=45, ha="right", fontsize=8)
  ax2.set_title("sections")
  for ax in (ax1, ax2):
    ax.axhline(50, color="gray", ls="--", lw=0.8)
    ax.set_ylim(0, 100)
  fig.tight_layout()
  if runtime.is_main_process():
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------------------------
# The task.


def run(config: Any) -> dict[str, Any]:
  """Scores RewardBench pairs with the IPO classifier; writes and returns the summary (see module docstring)."""
  from ipo_jax import prompts, scoring  # pylint: disable=import-outside-toplevel
  start = time.time()
  settings = scoring.Settings.from_config(config.scoring)
  prompt_set = prompts.prompts_from_config(config.scoring.get("prompts_file", ""))
  pairs = load_pairs(config.data)
  if not pairs:
    raise ValueError(f"{pairs.source}: no pairs selected")
  output_dir = config.output_dir or os.path.join("runs", "rewardbench")
  run_settings = {
      "model": config.model.path, "dtype": config.model.get("dtype", "float32"),
      "layout": settings.layout, "template": settings.template, "yes": settings.yes, "no": settings.no,
      "max_length": settings.max_length, "truncation": settings.truncation, "ensemble": settings.ensemble,
      "prompts": settings_fingerprint({k: list(v) for k, v in prompt_set.prompts.items()} | {
          "fallback": prompt_set.fallback}),
  }
  finished = resume(output_dir, run_settings)
  todo = [p for p in pairs if pair_key(p) not in finished]
  if jax.process_count() > 1:  # every process must run the same batches
    multihost_utils.assert_equal(np.array([len(todo)]), f"processes see different results in {output_dir}; it "
                                 "must be on a filesystem they share")
  runtime.log(f"rewardbench: {len(pairs)} pairs from {pairs.source}"
              + (f" ({pairs.skipped} invalid rows skipped)" if pairs.skipped else "")
              + (f"; {len(pairs) - len(todo)} already scored in {output_dir}" if len(todo) < len(pairs) else ""))
  model = runtime.load_model_from_config(config)
  scorer = scoring.Scorer(model, settings)
  scores_path = os.path.join(output_dir, SCORES_FILE)
  scoring_start, compiled = time.time(), scoring.num_compilations()
  for done in scoring.score_rewardbench_pairs(scorer, todo, prompt_set):
    if runtime.is_main_process():
      data.append_jsonl(scores_path, done)
    finished.update((pair_key(r), r) for r in done)
  scoring_time, compiled = time.time() - scoring_start, scoring.num_compilations() - compiled
  rows = [finished[pair_key(p)] for p in pairs]
  plan = getattr(scorer, "last_plan", None)
  summary = summarize(
      rows, model=model.name, data=pairs.source, method=f"IPO P(Yes), {settings.layout} layout",
      wall_time_s=round(time.time() - start, 1),
      scoring={"pairs_scored": len(todo), "seconds": round(scoring_time, 2),
               "pairs_per_s": round(len(todo) / scoring_time, 3) if todo else None,
               "compilations": compiled,
               "packed": bool(plan.packed) if plan else None, "prefix": plan.prefix if plan else None,
               "buckets": list(plan.buckets) if plan else None,
               **scorer.stats, **scoring.flop_rate(scorer.stats, scoring_time)},
      skipped_invalid=pairs.skipped, settings=run_settings, config=json.loads(config.to_json_best_effort()))
  if runtime.is_main_process():
    data.write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
  write_report(output_dir, summary)
  plot(output_dir, summary)
  runtime.log("\n" + format_table(summary))
  runtime.log(f"\n{len(rows)} pairs, {summary['counts']['ties']} ties, {summary['counts']['truncated']} truncated; "
              f"{compiled} compilations; {summary['wall_time_s']} s; results in {output_dir}")
  return summary
