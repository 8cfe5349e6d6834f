"""Pod-scale estimates against their targets: the `aot` task over the paper's jobs on TPU slices and a GPU node.

For each (model, target) of the grid it runs the `aot` task (configs/aot.py: the tasks' own programs compiled for
the target's abstract devices on this host, on `--candidates` meshes, a training step escalated through remat and
micro-batches until it fits) and prints one table: the best row of each program (the fastest per row that fits),
its estimated MFU against the goal, and where the estimated compute time goes (the kernel kinds the TPU compiler
spends most cycles on, with the fraction of peak they run at), so a missed goal comes with its cause.

  python experiments/bench/pod.py --out runs/bench_pod
      the whole grid: about 20 minutes of compiling on a 2-core host (the DPO steps take most); rows are kept
      in --out, so a rerun resumes.
  python experiments/bench/pod.py --only 8b-v5e-score
      one row (names: --list).

The GPU rows need the CUDA plugin (`make setup-gpu-aot`, then run this with that environment's python and
JAX_PLATFORMS=cpu) and XLA's GPU target description (fetched from its pinned source, or an offline copy under
$IPO_JAX_DATA/xla/); without the plugin the rows say so. Numbers are the `aot` task's estimates (ipo_jax/aot/hlo.py,
METHOD), not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import aot as aot_config  # noqa: E402  pylint: disable=wrong-import-position
from ipo_jax.aot import hlo, targets  # noqa: E402  pylint: disable=wrong-import-position
from ipo_jax.tasks import aot  # noqa: E402  pylint: disable=wrong-import-position

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: str
  target: str
  program: str
  goal_mfu: float | None  # None: "fits with margin", FLOPs and collective bytes reported
  pairs: int = 16  # DPO pairs per optimizer step


GRID = (
    Case("8b-v5e-score", "preset:llama-3.1-8b", "tpu:v5e:4x4", "score", 0.55),
    Case("8b-v5e-dpo", "preset:llama-3.1-8b", "tpu:v5e:4x4", "dpo", 0.50),
    Case("mistral-v5e-lora", "preset:mistral-7b-instruct-v0.2", "tpu:v5e:2x4", "dpo_lora", 0.50),
    Case("70b-v5p-score", "preset:llama-3.1-70b", "tpu:v5p:4x4x4", "score", 0.55),
    Case("70b-v5p-dpo", "preset:llama-3.1-70b", "tpu:v5p:4x4x4", "dpo", 0.50, pairs=64),
    Case("8b-h100-score", "preset:llama-3.1-8b", "gpu:h100x8", "score", None),
    Case("8b-h100-dpo", "preset:llama-3.1-8b", "gpu:h100x8", "dpo", None),
)
LABELS = {"score": "IPO scoring, 64 × 1024 tokens", "dpo": "full DPO, {pairs} pairs × 2 × 1024 tokens",
          "dpo_lora": "DPO + LoRA r=256 (all linear), {pairs} pairs × 2 × 1024 tokens"}


def config_of(case: Case, out: str, candidates: int = 1):
  """The `aot` config of `case`; with `candidates` > 1 the mesh is chosen (`mesh.auto`) among that many candidate
  (data, fsdp, tensor) shapes, the most fsdp first (`ipo_jax.aot.jobs.candidate_meshes`)."""
  config = aot_config.get_config()
  config.model.path = case.model
  config.target = case.target
  config.programs = case.program
  config.train.batch_size = case.pairs
  config.output_dir = os.path.join(out, case.name)
  config.mesh.auto = candidates > 1
  config.mesh.candidates = max(candidates, 1)
  return config


def run_case(case: Case, out: str, candidates: int = 1) -> dict:
  """The best row of the case's program (the task's summary), or {"skipped": why}."""
  why = targets.parse(case.target).unavailable()
  if why:
    return {"skipped": why}
  summary = aot.run(config_of(case, out, candidates))
  rows = summary["programs"]
  best = next((r for r in rows if r["key"] == summary["best"].get(case.program)), None)
  return {"best": best, "tried": [(r["key"], bool(r.get("fits"))) for r in rows]}


def cause(row: dict) -> str:
  """Where the estimated time goes: collective-bound, or the top kernel kinds of the compute time."""
  if row.get("collective_seconds", 0) > row.get("compute_seconds", 0):
    return (f"collective-bound: {1e3 * row['collective_seconds']:.0f} ms of collectives over "
            f"{1e3 * row['compute_seconds']:.0f} ms of compute")
  return (hlo.describe_top_kernels(row.get("top_kernels", []))
          or "compute (no kernel estimates on this platform: roofline)")


def table(results: list[tuple[Case, dict]]) -> str:
  head = ("| model | target | program | goal | mesh d×f×t | remat / accum | GiB per device (of) | est. step | "
          "est. MFU | collectives | verdict | where the estimated compute goes |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for case, res in results:
    goal = f"fits, ≥ {100 * case.goal_mfu:.0f}% MFU" if case.goal_mfu else "fits with margin"
    program = LABELS[case.program].format(pairs=case.pairs)
    model = case.model.split(":", 1)[1]
    best = res.get("best")
    if not best:
      why = res.get("skipped") or "no setting fits: " + ", ".join(k for k, _ in res.get("tried", []))
      lines.append(f"| {model} | {case.target} | {program} | {goal} | | | | | | | not run: {why} | |")
      continue
    job = best["job"]
    d, f, t = job["mesh_shape"]
    remat = (f"{job['remat_policy'] if job['remat'] else 'off'} / {job['grad_accum']}"
             if job["program"] != "score" else "")
    mfu = best.get("mfu") or 0.0
    roofline = str(best.get("compute_method", "")).startswith("roofline")
    met = (f"met ({100 * mfu:.0f}%)" if mfu >= case.goal_mfu else f"gap: {100 * mfu:.0f}% of {100 * case.goal_mfu:.0f}%"
           ) if case.goal_mfu and not roofline else ("fits" if best.get("fits") else "does not fit")
    collectives = ", ".join(f"{k} {v['bytes'] / GIB:.1f} GiB" for k, v in best.get("collectives", {}).items()
                            if v.get("count") and v["bytes"] >= 0.05 * GIB) or "< 0.05 GiB"
    lines.append(
        f"| {model} | {case.target} | {program} | {goal} | {d}×{f}×{t} | {remat} | "
        f"{best['needed_bytes'] / GIB:.2f} ({best['limit_bytes'] / GIB:.2f}) | {1e3 * best['step_seconds']:.0f} ms"
        f"{' (≥)' if roofline else ''} | {100 * mfu:.0f}%{' (≤, roofline)' if roofline else ''} | {collectives} | "
        f"{met} | {cause(best)} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join("runs", "bench_pod"))
  parser.add_argument("--only", default="", help="comma-separated case names (default: every case)")
  parser.add_argument("--candidates", type=int, default=3,
                      help="meshes compiled per program, the best that fits kept (1: all devices on fsdp)")
  parser.add_argument("--list", action="store_true")
  args = parser.parse_args()
  if args.list:
    print("\n".join(f"{c.name}: {c.model} on {c.target}, {c.program}" for c in GRID))
    return
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - {c.name for c in GRID})
  if unknown:
    parser.error(f"--only: unknown cases {unknown}; see --list")
  results = [(case, run_case(case, args.out, args.candidates)) for case in GRID if not names or case.name in names]
  text = table(results)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "pod.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "pod.json"), "w", encoding="utf-8") as f:
    json.dump([{"case": dataclasses.asdict(c), **r} for c, r in results], f, indent=1, default=str)


if __name__ == "__main__":
  main()
