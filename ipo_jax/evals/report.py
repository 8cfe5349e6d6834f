"""Reports and figures: the RewardBench tables, report.md text, and one matplotlib set-up for every plot."""

from __future__ import annotations

from typing import Any, Mapping

from ipo_jax import runtime
from ipo_jax.evals.taxonomy import SUBSET_MAPPING


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (the one set-up every figure uses)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig: Any, path: str, dpi: int = 110) -> str:
  """Saves a figure on process 0 and closes it."""
  if runtime.is_main_process():
    fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


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


def _scored(x: Any) -> bool:
  return x is not None and x == x


def notes(summary: Mapping[str, Any]) -> list[str]:
  """What a reader must know about a run's numbers: no official section scored, pairs scored under a fallback
  instruction, a low Yes+No mass. Also logged by the tasks."""
  out = []
  if not _scored(summary.get("score")):
    out.append("no official RewardBench section was scored (subsets: " + ", ".join(summary["subsets"])
               + "): the score is undefined (null in summary.json); only the per-subset accuracies mean anything")
  fallback = summary.get("instructions") or {}
  if fallback.get("fallback_pairs"):
    unknown = fallback.get("unknown_subsets") or []
    out.append(f"fallback instruction: {fallback['fallback_pairs_total']} pairs were scored under the fallback "
               f"{fallback['fallback']!r} of {fallback['prompts_file']}, having no instruction of their own ("
               + ", ".join(f"{k}: {v}" for k, v in fallback["fallback_pairs"].items()) + ")"
               + (f"; not RewardBench subsets: {', '.join(unknown)} (scoring.fallback_instruction=True)"
                  if unknown else ""))
  mass = summary.get("yes_no_mass") or {}
  if mass.get("low"):
    out.append(f"warning: the Yes+No probability mass is low (geometric mean {mass['geometric_mean']:.3g}, below "
               f"{mass['threshold']:g}; mean {mass['mean']:.3g}): the instruction is probably not a yes/no question "
               "(or scoring.yes/no do not match the layout), so P(Yes) is read from two unlikely tokens")
  return out


def report_text(summary: Mapping[str, Any], title: str = "RewardBench") -> str:
  """report.md of a RewardBench run: what was run, the tables, counts and (for an ensemble) the prompt search."""
  c = summary["counts"]
  parts = [f"# {title}", ""]
  for key in ("model", "method", "data", "wall_time_s"):
    if key in summary:
      parts.append(f"- **{key}**: {summary[key]}")
  parts += [f"- **pairs**: {c['pairs']} ({c['ties']} ties counted wrong, {c['truncated']} truncated)"]
  parts += [f"- {note}" for note in notes(summary)]
  parts += ["", format_table(summary)]
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
  return "\n".join(parts) + "\n"


def plot_rewardbench(path: str, summary: Mapping[str, Any], title: str = "RewardBench") -> str:
  """The RewardBench figure: accuracy per subset (coloured by section) and per section, with the chance line."""
  plt = pyplot()
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
  bars = {**sections, **({"Score": summary["score"]} if _scored(summary["score"]) else {})}
  ax2.bar(range(len(bars)), [100 * v for v in bars.values()], color=[colors.get(s, "k") for s in bars])
  ax2.set_xticks(range(len(bars)), list(bars), rotation=45, ha="right", fontsize=8)
  ax2.set_title("sections")
  for ax in (ax1, ax2):
    ax.axhline(50, color="gray", ls="--", lw=0.8)
    ax.set_ylim(0, 100)
  fig.tight_layout()
  return save(fig, path)
