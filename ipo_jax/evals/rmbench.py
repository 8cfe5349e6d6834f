"""RM-Bench: its rows, the IPO classifier's six scores per row, and RM-Bench's own accuracy arithmetic.

An RM-Bench row holds a prompt, three chosen and three rejected responses of increasing style (concise, detailed
plain text, detailed markdown) and a domain (chat, code, math, safety-refuse, safety-response). Two schemas are read,
told apart by their columns:

  rmbench     RM-Bench's own (hub `THU-KEG/RM-Bench`, total_dataset.json): id, prompt, chosen [3], rejected [3], domain
  per_domain  the paper authors' copies (`Ayush-Singh/RM-Bench-<domain>`): prompt, chosen_1..3, rejected_1..3; the id
              comes from an `id` column, else the row's position

A row without a `domain` column (the per-domain schema; RM-Bench's own per-domain files `<domain>_filtered.json`)
takes `data.domain`, else the domain its file or source is named after (`RM-Bench-<domain>`, `<domain>_filtered`).

Each of the six responses is scored once (P(Yes) under the domain's instruction). RM-Bench's `compute_accuracy`
(github THU-KEG/RM-Bench, scripts/utils.py) then fills a 3 x 3 matrix M per domain: M[i, j] is the fraction of rows
whose chosen response of style i scores strictly above the rejected one of style j (ties are wrong). Hard accuracy is
the mean of the upper triangle (i < j: the chosen response is plainer than the rejected one), normal the mean of the
diagonal, easy the mean of the lower triangle. RM-Bench splits its rows into four domains, chat, math, code and safety
(safety-refuse and safety-response together), each domain's score is the mean of its hard, normal and easy accuracy,
and the totals are plain means over the domains. The authors' RM_Bench/ours.py instead reports, for each of the five
data sets, the accuracy at each style level L (chosen_L against rejected_L): the diagonal (`paper` in the summary).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from ipo_jax import data
from ipo_jax.evals import ipo_rows
from ipo_jax.evals.rewardbench import fingerprint
from ipo_jax.ipo import prompts as prompts_lib

HUB_ID = "THU-KEG/RM-Bench"
STYLES = ("concise", "detailed", "markdown")  # RM-Bench's y, y^L, y^{L,M}
LEVELS = len(STYLES)
DOMAINS = ("chat", "code", "math", "safety-refuse", "safety-response")
OFFICIAL_DOMAINS = ("chat", "math", "code", "safety")  # compute_accuracy's split, in its order
SCORES_FILE = "scores.jsonl"
SCHEMAS = {
    "rmbench": ("id", "prompt", "chosen", "rejected", "domain"),
    "per_domain": ("prompt",) + tuple(f"{s}_{i}" for s in ("chosen", "rejected") for i in range(1, LEVELS + 1)),
}
_SCHEMA_TEXT = {"rmbench": "RM-Bench's schema: id, prompt, chosen [3], rejected [3], domain",
                "per_domain": "the per-domain schema: prompt, chosen_1..3, rejected_1..3"}
_DOMAIN_IN_NAME = re.compile(r"^(?:.*RM-Bench-(" + "|".join(DOMAINS) + r")|(" + "|".join(DOMAINS)
                             + r")_filtered)(?:\.[\w.]+)?$")


def official_domain(domain: str) -> str:
  """RM-Bench's domain of a row: safety-refuse and safety-response are one domain, safety."""
  return "safety" if domain.startswith("safety") else domain


def row_key(row: dict[str, Any]) -> tuple[str, str]:
  return str(row["domain"]), str(row["id"])


# ----------------------------------------------------------------------------------------------------------------
# Data.


class Rows(list):
  """Normalised rows (domain, id, prompt, chosen [3], rejected [3]) with their source and the fingerprint of every
  row read (before domains are selected: a rerun may select more)."""

  def __init__(self, rows, source: str, fingerprint_: str = ""):
    super().__init__(rows)
    self.source, self.fingerprint = source, fingerprint_


def _texts(row: dict[str, Any], fields: Sequence[str], i: int, source: str, what: str) -> list[str]:
  values = [row.get(f) for f in fields]
  for field, value in zip(fields, values):
    if not isinstance(value, str) or not value.strip():
      raise data.DataError(f"{source}: row {i} field {field!r} must be a non-empty string ({what})")
  return values


def _normalise(row: Any, i: int, schema: str, source: str, domain: str) -> dict[str, Any]:
  """One row in our form, or a one-line error naming the file, the row and the field."""
  if not isinstance(row, dict):
    raise data.DataError(f"{source}: row {i} is not an object")
  required = tuple(f for f in SCHEMAS[schema] if f != "domain") + (() if domain else ("domain",))
  missing = next((f for f in required if row.get(f) is None), None)
  if missing:
    fix = "; set data.domain=<one of " + ", ".join(DOMAINS) + ">" if missing == "domain" else ""
    raise data.DataError(f"{source}: row {i} has no field {missing!r} ({_SCHEMA_TEXT[schema]}){fix}")
  if schema == "rmbench":
    for side in ("chosen", "rejected"):
      if not isinstance(row[side], list) or len(row[side]) != LEVELS:
        raise data.DataError(f"{source}: row {i} field {side!r} must be a list of {LEVELS} responses "
                             f"({', '.join(STYLES)})")
    chosen, rejected = list(row["chosen"]), list(row["rejected"])
    for side in ("chosen", "rejected"):
      _texts({f"{side}[{k}]": v for k, v in enumerate(row[side])}, [f"{side}[{k}]" for k in range(LEVELS)], i,
             source, f"the {STYLES[0]}, {STYLES[1]} and {STYLES[2]} responses")
  else:
    chosen = _texts(row, [f"chosen_{k}" for k in range(1, LEVELS + 1)], i, source, "a response")
    rejected = _texts(row, [f"rejected_{k}" for k in range(1, LEVELS + 1)], i, source, "a response")
  row_domain, row_id = row.get("domain") or domain, row.get("id", i)  # required in RM-Bench's schema
  prompt = _texts(row, ["prompt"], i, source, "the user's question")[0]
  if row_domain not in DOMAINS:
    raise data.DataError(f"{source}: row {i} has domain {row_domain!r}; RM-Bench's domains are "
                         f"{', '.join(DOMAINS)}")
  return {"domain": row_domain, "id": row_id, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def schema_of(rows: Sequence[Any], source: str) -> str:
  """`per_domain` when the first row has chosen_1, `rmbench` when it has chosen, else a one-line error."""
  if not rows:
    raise data.DataError(f"{source}: no rows")
  keys = set(rows[0]) if isinstance(rows[0], dict) else set()
  if "chosen_1" in keys:
    return "per_domain"
  if "chosen" in keys:
    return "rmbench"
  raise data.DataError(f"{source}: row 0 has neither 'chosen' ({_SCHEMA_TEXT['rmbench']}) nor 'chosen_1' "
                       f"({_SCHEMA_TEXT['per_domain']}); its columns: {', '.join(sorted(map(str, keys)))}")


def _read_one(ref: str, split: str, domain: str) -> tuple[list[dict[str, Any]], str]:
  if os.path.exists(ref) and not ref.endswith(data.LOCAL_SUFFIXES):
    raise data.DataError(f"{ref}: unknown format; expected one of {', '.join(data.LOCAL_SUFFIXES)}")
  local = data.local_file(ref, split=split)
  source = local if local == ref else f"{ref} ({local})"
  raw = data.read_local(local)
  schema = schema_of(raw, source)
  named = _DOMAIN_IN_NAME.search(os.path.basename(ref))
  domain = domain or (named.group(1) or named.group(2) if named else "")
  return [_normalise(row, i, schema, source, domain) for i, row in enumerate(raw)], source


def load_rows(data_cfg: Any) -> Rows:
  """RM-Bench rows from `data_cfg`: path (one or several comma-separated files, source names or hub ids; default
  RM-Bench itself), split, domain (of per-domain rows without a domain column), domains (a selection),
  max_per_domain (0: all). Duplicate (domain, id) keys are an error."""
  refs = [r.strip() for r in str(data_cfg.get("path", "") or HUB_ID).split(",") if r.strip()]
  split, domain = data_cfg.get("split", "train") or "train", data_cfg.get("domain", "") or ""
  if domain and domain not in DOMAINS:
    raise ValueError(f"data.domain must be one of {DOMAINS}, got {domain!r}")
  rows, sources, seen = [], [], set()
  for ref in refs:
    found, source = _read_one(ref, split, domain)
    for row in found:
      if row_key(row) in seen:
        raise data.DataError(f"{source}: (domain, id) = {row_key(row)} appears twice")
      seen.add(row_key(row))
    rows += found
    sources.append(source)
  return Rows(select(rows, data_cfg.get("domains", ""), data_cfg.get("max_per_domain", 0)), "; ".join(sources),
              fingerprint(rows))


def select(rows: Sequence[dict[str, Any]], domains: Any = "", max_per_domain: int = 0) -> list[dict[str, Any]]:
  """Rows of the named domains (a list or comma-separated; empty: all), at most `max_per_domain` of each."""
  if isinstance(domains, str):
    domains = [d.strip() for d in domains.split(",") if d.strip()]
  if domains:
    present = sorted({r["domain"] for r in rows})
    missing = [d for d in domains if d not in present]
    if missing:
      raise ValueError(f"data.domains names {missing}, not in the data; it has {present}")
    rows = [r for r in rows if r["domain"] in set(domains)]
  taken: dict[str, int] = {}
  kept = []  # at most max_per_domain of each domain, in order
  for r in rows:
    if not max_per_domain or taken.get(r["domain"], 0) < max_per_domain:
      taken[r["domain"]] = taken.get(r["domain"], 0) + 1
      kept.append(r)
  return kept


# ----------------------------------------------------------------------------------------------------------------
# Instructions.


def load_instructions(path: str) -> tuple[prompts_lib.PromptSet, str]:
  """The instructions of `scoring.prompts_file` (empty: the project's own) and the layout the file records ("" if
  none). `paper:rmbench_prompts` keys the authors' table by `RM-Bench-<domain>` with `fallback_domain`."""
  if not path:
    return prompts_lib.default_prompts(), ""
  local = data.local_file(path, what="prompts file")
  with open(local, encoding="utf-8") as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{local}: not valid JSON ({e.msg} at line {e.lineno})") from None
  layout = ""
  if isinstance(obj, dict):
    obj = dict(obj)
    layout = obj.pop("layout", "")
    obj.pop("layout_note", None)
    if "fallback_domain" in obj:
      obj["fallback"] = obj.pop("fallback_domain")
  return prompts_lib.parse_prompts(obj, os.path.basename(local)), layout


def instruction_key(prompt_set: prompts_lib.PromptSet, domain: str) -> tuple[str, str]:
  """(key, how) of a domain's instructions: `RM-Bench-<domain>` (the authors' keys) or the domain itself ("domain"),
  its RM-Bench domain, e.g. safety ("group"), else the set's fallback ("fallback"), as the authors' `prompts.get(key,
  prompts['RM-Bench-chat'])` did."""
  for how, key in (("domain", f"RM-Bench-{domain}"), ("domain", domain), ("group", official_domain(domain))):
    if key in prompt_set.prompts:
      return key, how
  return prompt_set.fallback, "fallback"


# ----------------------------------------------------------------------------------------------------------------
# Scoring.


def score_rows(scorer: Any, rows: Sequence[dict[str, Any]], prompt_set: prompts_lib.PromptSet
               ) -> Iterator[list[dict[str, Any]]]:
  """Scores the six responses of each row under its domain's instructions; yields result rows as rows finish.

  Each style level is one (chosen, rejected) pair of the scorer, so their shared start runs once; several
  instructions for a domain are combined with `scoring.ensemble`."""
  pairs, pair_row = [], []
  keys = [instruction_key(prompt_set, row["domain"])[0] for row in rows]
  for r, row in enumerate(rows):
    for instruction in prompt_set.prompts[keys[r]]:
      for level in range(LEVELS):
        pairs.append((instruction, row["prompt"], row["chosen"][level], row["rejected"][level]))
        pair_row.append(r)
  method = scorer.settings.ensemble
  return ipo_rows.score_grouped_pairs(scorer, pairs, pair_row, len(rows), lambda r, values, encoded, items: (
      _row_result(rows[r], keys[r], method, values, encoded, items)))


def _row_result(row, key, method, values, encoded, items) -> dict[str, Any]:
  """The result row: per side, the three styles' P(Yes) (combined over the instructions), log-odds, Yes+No mass,
  truncation flags and token counts."""
  pairs = np.array(items).reshape(-1, LEVELS)  # [K instructions, 3 levels]
  result = {"domain": row["domain"], "id": row["id"], "instruction_key": key}
  for side, offset in (("chosen", 0), ("rejected", 1)):
    seq = 2 * pairs + offset
    log_odds = values[seq, 0]  # [K, 3]
    result[f"score_{side}"] = ipo_rows.combine(log_odds.T, method)[0].tolist()
    result[f"log_odds_{side}"] = log_odds.mean(0).tolist()
    result[f"yes_no_mass_{side}"] = np.exp(values[seq, 1]).mean(0).tolist()
    result[f"truncated_{side}"] = [any(encoded[s][1] for s in seq[:, level]) for level in range(LEVELS)]
    result[f"tokens_{side}"] = [max(len(encoded[s][0]) for s in seq[:, level]) for level in range(LEVELS)]
  return result


# ----------------------------------------------------------------------------------------------------------------
# RM-Bench's arithmetic.


def accuracy_matrix(rows: Sequence[dict[str, Any]]) -> np.ndarray:
  """M[i, j]: the fraction of rows whose chosen response of style i scores strictly above the rejected one of
  style j (RM-Bench's compute_accuracy; a tie is wrong)."""
  counts = np.zeros((LEVELS, LEVELS))
  for r in rows:
    counts += np.asarray(r["score_chosen"])[:, None] > np.asarray(r["score_rejected"])[None, :]
  return counts / len(rows)


def hard_normal_easy(matrix: np.ndarray) -> dict[str, float]:
  """Hard: mean of the upper triangle (chosen plainer than rejected); normal: of the diagonal; easy: of the lower
  triangle; avg: their mean (RM-Bench's per-domain score)."""
  triangle = LEVELS * (LEVELS - 1) / 2
  out = {"hard": float(np.triu(matrix, 1).sum() / triangle), "normal": float(np.diag(matrix).mean()),
         "easy": float(np.tril(matrix, -1).sum() / triangle)}
  out["avg"] = float(np.mean(list(out.values())))
  return out


def domain_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One domain: rows, the matrix, hard / normal / easy / avg, ties among its comparisons, truncated responses."""
  matrix = accuracy_matrix(rows)
  ties = sum(int((np.asarray(r["score_chosen"])[:, None] == np.asarray(r["score_rejected"])[None, :]).sum())
             for r in rows)
  truncated = sum(sum(r.get("truncated_chosen", [])) + sum(r.get("truncated_rejected", [])) for r in rows)
  return {"rows": len(rows), **hard_normal_easy(matrix), "matrix": matrix.tolist(), "ties": ties,
          "truncated_responses": int(truncated)}


def summarize(rows: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
  """RM-Bench's domains (chat, math, code, safety) and totals, the five data sets, and the paper's levels."""
  groups = {d: [r for r in rows if official_domain(r["domain"]) == d] for d in OFFICIAL_DOMAINS}
  domains = {d: domain_scores(g) for d, g in groups.items() if g}
  overall = {k: float(np.mean([v[k] for v in domains.values()])) if domains else float("nan")
             for k in ("hard", "normal", "easy", "avg")}  # avg: RM-Bench's total_avg_acc
  if domains:
    overall["matrix"] = np.mean([v["matrix"] for v in domains.values()], axis=0).tolist()
  datasets = {d: domain_scores(g) for d in DOMAINS if (g := [r for r in rows if r["domain"] == d])}
  paper = {d: {**{f"level_{k + 1}": v["matrix"][k][k] for k in range(LEVELS)}, "mean": v["normal"]}
           for d, v in datasets.items()}
  summary = {
      "score": overall["avg"], "overall": overall, "domains": domains, "datasets": datasets, "paper": paper,
      "counts": {"rows": len(rows), "responses": 2 * LEVELS * len(rows), "comparisons": LEVELS ** 2 * len(rows),
                 "ties": sum(v["ties"] for v in domains.values()),
                 "truncated_responses": sum(v["truncated_responses"] for v in domains.values())},
      "yes_no_mass": ipo_rows.yes_no_mass([
          {"yes_no_mass_chosen": c, "yes_no_mass_rejected": j}
          for r in rows for c, j in zip(r["yes_no_mass_chosen"], r["yes_no_mass_rejected"])]),
  }
  summary.update(extra)
  return summary


def instructions_summary(prompt_set: prompts_lib.PromptSet, rows: Sequence[dict[str, Any]], prompts_file: str
                         ) -> dict[str, Any]:
  """summary.json's `instructions`: the key each domain used and how, and the rows scored under the fallback."""
  used = {d: instruction_key(prompt_set, d) for d in sorted({r["domain"] for r in rows})}
  fallback = {d: sum(r["domain"] == d for r in rows) for d, (_, how) in used.items() if how == "fallback"}
  return {"prompts_file": prompts_file or "default", "fallback": prompt_set.fallback,
          "domains": {d: {"key": k, "how": how} for d, (k, how) in used.items()},
          "fallback_rows": fallback, "fallback_rows_total": sum(fallback.values())}


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _pct(x: Any) -> str:
  return "" if x is None or x != x else f"{100 * x:.1f}"


def format_table(summary: dict[str, Any]) -> str:
  """RM-Bench's table: per domain and overall, hard / normal / easy / avg (percent)."""
  rows = [(name, v["rows"], v, "") for name, v in summary["domains"].items()]
  rows.append(("**overall**", summary["counts"]["rows"], summary["overall"], "**"))
  return "\n".join(["| domain | rows | hard | normal | easy | avg |", "|---|---:|---:|---:|---:|---:|"] + [
      f"| {name} | {n} | " + " | ".join(_pct(v[k]) for k in ("hard", "normal", "easy")) + f" | {b}{_pct(v['avg'])}{b} |"
      for name, n, v, b in rows])


def report_text(summary: dict[str, Any], notes: Sequence[str] = ()) -> str:
  """report.md: what was run, RM-Bench's table, the matrices, and the paper's same-level view."""
  c = summary["counts"]
  parts = ["# RM-Bench", ""]
  parts += [f"- **{k}**: {summary[k]}" for k in ("model", "method", "data", "wall_time_s") if k in summary]
  parts += [f"- **rows**: {c['rows']} ({c['responses']} responses scored once each, {c['comparisons']} comparisons, "
            f"{c['ties']} ties counted wrong, {c['truncated_responses']} responses truncated)"]
  parts += [f"- {note}" for note in notes]
  parts += ["", "Accuracy (%) as RM-Bench's compute_accuracy defines it: hard = chosen response plainer than the "
            "rejected one, normal = same style, easy = chosen more formatted; a domain's avg is the mean of the "
            "three; overall is the plain mean over the domains (safety = safety-refuse + safety-response).", "",
            format_table(summary)]
  for name, v in [("overall (mean of the domains)", summary["overall"])] + list(summary["domains"].items()):
    if "matrix" in v:
      parts += ["", f"### {name}: accuracy matrix (%)", "", "| chosen \\ rejected | " + " | ".join(STYLES) + " |",
                "|---|" + "---:|" * LEVELS]
      parts += [f"| {STYLES[i]} | " + " | ".join(map(_pct, row)) + " |" for i, row in enumerate(v["matrix"])]
  parts += ["", "## The paper's view: the same style level", "",
            "The authors' RM_Bench/ours.py compares chosen_L with rejected_L at each level L and reports the accuracy "
            "per level for each of the five data sets: the diagonal of the matrix (its mean is RM-Bench's normal).",
            "", "| data set | rows | L1 concise | L2 detailed | L3 markdown | mean |", "|---|---:|---:|---:|---:|---:|"]
  for name, v in summary["paper"].items():
    parts.append(f"| {name} | {summary['datasets'][name]['rows']} | {_pct(v['level_1'])} | {_pct(v['level_2'])} | "
                 f"{_pct(v['level_3'])} | {_pct(v['mean'])} |")
  return "\n".join(parts) + "\n"


def notes(summary: dict[str, Any]) -> list[str]:
  """Rows scored under the fallback instruction and a low Yes+No mass (also logged by the task)."""
  out = []
  fallback = summary.get("instructions") or {}
  if fallback.get("fallback_rows"):
    out.append(f"fallback instruction: {fallback['fallback_rows_total']} rows were scored under the fallback "
               f"{fallback['fallback']!r} of {fallback['prompts_file']} ("
               + ", ".join(f"{k}: {v}" for k, v in fallback["fallback_rows"].items()) + ")")
  mass = summary.get("yes_no_mass") or {}
  if mass.get("low"):
    out.append(f"warning: the Yes+No probability mass is low (geometric mean {mass['geometric_mean']:.3g}, below "
               f"{mass['threshold']:g}): the instruction is probably not read as a yes/no question")
  return out


def plot(path: str, summary: dict[str, Any]) -> str:
  """Heat maps of the accuracy matrices: overall (mean of the domains) and each domain."""
  from ipo_jax.evals import report  # pylint: disable=import-outside-toplevel
  plt = report.pyplot()
  panels = [("overall", summary["overall"])] + list(summary["domains"].items())
  panels = [(n, v) for n, v in panels if "matrix" in v]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels) + 1, 3.2), squeeze=False, layout="constrained")
  for k, (ax, (name, v)) in enumerate(zip(axes[0], panels)):
    matrix = 100 * np.asarray(v["matrix"])
    image = ax.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=100)
    for i in range(LEVELS):
      for j in range(LEVELS):
        ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(LEVELS), STYLES, fontsize=7)
    ax.set_yticks(range(LEVELS), STYLES if k == 0 else [""] * LEVELS, fontsize=7)
    ax.set_xlabel("rejected style", fontsize=8)
    ax.set_title(f"{name}: hard {_pct(v['hard'])}, easy {_pct(v['easy'])}", fontsize=8)
  axes[0][0].set_ylabel("chosen style", fontsize=8)
  fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label="accuracy (%)")
  return report.save(fig, path)
