"""Training metrics: rows of `metrics.jsonl` ({"split": "train" | "eval", "step", metric: value, ...}), the same
scalars in TensorBoard (`tensorboard/`), and `curves.png` (loss, reward accuracy and margin, learning rate)."""

from __future__ import annotations

import os
from typing import Any

from ipo_jax import data, runtime

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")


class MetricsLog:
  """Metrics rows to `<directory>/metrics.jsonl` (fsynced) and TensorBoard, on process 0; nothing without a
  directory."""

  def __init__(self, directory: str | None, tensorboard: bool):
    self.path = os.path.join(directory, METRICS_FILE) if directory and runtime.is_main_process() else None
    self._writer = None
    if self.path and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, split: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Appends one row and returns it."""
    row = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self.path:
      data.append_jsonl(self.path, [row])
    if self._writer:
      for k, v in metrics.items():
        self._writer.add_scalar(f"{split}/{k}", float(v), int(step))
      self._writer.flush()
    return row

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics file; for a (split, step) written twice (a resumed run) the last one wins."""
  rows = {(r["split"], r["step"]): r for r in data.iter_jsonl(path)}
  return sorted(rows.values(), key=lambda r: (r["split"], r["step"]))


def last_rows(path: str, upto: int) -> dict[str, dict[str, Any]]:
  """The last train and eval rows of a metrics file at or before step `upto` ({} where none): what a run resumed
  at `upto` reports until it logs rows of its own."""
  out = {"train": {}, "eval": {}}
  for row in read_metrics(path):
    if row["split"] in out and row["step"] <= upto:
      out[row["split"]] = row
  return out


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Loss, reward accuracy, reward margin and learning rate against the step, train and eval."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = read_metrics(metrics_path)
  fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4))
  for ax, key in zip(axes, CURVE_KEYS):
    for split, style in (("train", "-"), ("eval", "o-")):
      pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
      if pts:
        ax.plot(*zip(*pts), style, label=split, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
