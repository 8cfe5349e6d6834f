"""Task `aot`: size the paper's jobs for hardware this host does not have, by compiling them ahead of time.

For each program (IPO scoring, sampling, a DPO step full or with the paper's LoRA, an SFT step) it builds the task's own jitted
program (the engines' builders, on a mesh of the target's abstract devices, every platform decision the target's),
compiles it for the target and records: per-device memory against the device's, whether it fits (the bytes needed
when not), FLOPs counted through loops, the estimated compute and collective time, estimated MFU and tokens/s per
chip, and the collectives by kind (`ipo_jax.aot.hlo`). `mesh.auto=True` compiles candidate meshes (and for DPO
remat, then more micro-batches, until it fits) and reports the best that fits. Rows are appended to the run
directory as each compile finishes (a rerun resumes); aot.json and report.md hold the table.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from ipo_jax import runtime
from ipo_jax.aot import hlo, jobs, targets
from ipo_jax.rundir import RunDir

ROWS_FILE = "programs.jsonl"
GIB = 2.0**30


def identity(config: Any) -> dict[str, Any]:
  """Everything a row depends on: the model's shapes, the target and the sections the programs read."""
  return {"model": config.model.path, "dtype": config.model.dtype, "attention": config.model.get("attention", "auto"),
          "target": config.target, "programs": config.programs,
          "mesh": dict(config.mesh.shape), "mesh_auto": bool(config.mesh.auto),
          "mesh_candidates": config.mesh.candidates, "slice_axis": config.mesh.slice_axis, "aot": config.aot.to_dict(),
          "scoring.max_length": config.scoring.max_length, "sampling": config.sampling.to_dict(),
          "data.max_length": config.data.max_length, "train": config.train.to_dict(), "dpo": config.dpo.to_dict(),
          "lora": config.lora.to_dict()}


def programs_of(config: Any) -> list[str]:
  names = [p.strip() for p in str(config.programs).split(",") if p.strip()]
  unknown = [p for p in names if p not in jobs.PROGRAMS]
  if unknown or not names:
    raise ValueError(f"programs={config.programs!r}: choose a comma-separated list of "
                     f"{', '.join(jobs.PROGRAMS)}")
  return names


def explicit_mesh(config: Any, num_devices: int) -> tuple[int, int, int]:
  shape = dict(config.mesh.shape)
  sizes = [int(shape.get(a, 1)) for a in ("data", "fsdp", "tensor")]
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = num_devices // max(known, 1)
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh.shape {shape} has {math.prod(sizes)} devices but the target has {num_devices}; "
                     "set --config.mesh.shape.<axis>=<n> or --config.mesh.auto=True")
  return tuple(sizes)


def compile_job(config: Any, cfg: Any, job: jobs.Job, target: Any, devices: list[Any]) -> dict[str, Any]:
  """Compiles one job for the target and returns its row."""
  tic = time.time()
  mesh = jobs.mesh_for(job, devices, config.mesh.slice_axis)
  lowered = jobs.lowerable(config, cfg, job, mesh).lower()
  analysis = hlo.compile_and_analyze(lowered, target).to_dict()
  on_the_fly = job.program == "dpo" and config.dpo.reference == "on_the_fly"  # (LoRA's reference: the base, inside)
  flops = jobs.model_flops(cfg, job, on_the_fly_reference=on_the_fly)
  seconds = analysis.get("step_seconds")
  peak = target.peak_flops * target.num_devices
  row = {"key": job.key, "job": dataclasses.asdict(job), "model_flops": flops,
         "mfu": flops / (seconds * peak) if seconds else None,
         "tokens_per_s_per_chip": jobs.tokens_per_second(job, seconds, target.num_devices),
         "compile_s": round(time.time() - tic, 1), **analysis}
  runtime.log(f"  {job.key}: {format_row(row)}")
  return row


def _row(config, cfg, job, target, devices, done, run) -> dict[str, Any]:
  """The row of `job`: from the run directory when a previous run compiled it, else compiled now and appended."""
  row = done.get(job.key)
  if row is None:
    row = compile_job(config, cfg, job, target, devices)
    run.append(ROWS_FILE, [row])
    done[job.key] = row
  return row


def largest_batch(config, cfg, row, target, devices, done, run) -> int:
  """The most rows (prompts, sequences or pairs per step) the job of `row` fits with, on its mesh and settings."""
  job = jobs.Job.from_row(row["job"])
  fits = lambda rows: bool(_row(config, cfg, dataclasses.replace(job, rows=rows), target, devices, done, run)["fits"])
  return jobs.largest_fitting(fits, jobs.round_rows(1, job.mesh_shape, job.grad_accum),
                              int(config.aot.largest_batch_cap))


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  cost = lambda r: jobs.cost_per_row(bool(r.get("fits")), r.get("step_seconds"), r["job"]["rows"])
  return min((r for r in rows if math.isfinite(cost(r))), key=cost, default=None)


def plan_program(config: Any, cfg: Any, program: str, target: Any, devices: list[Any], done: dict[str, Any],
                 run: RunDir) -> list[dict[str, Any]]:
  """The rows of one program: the configured mesh, or (mesh.auto) each candidate mesh; a training step escalates
  remat (minimal, full) then micro-batches until it fits (`jobs.escalations`)."""
  shapes = (jobs.candidate_meshes(target.num_devices, cfg, config.mesh.candidates) if config.mesh.auto
            else [explicit_mesh(config, target.num_devices)])
  rows = []
  for shape in shapes:
    for job in jobs.escalations(jobs.base_job(config, program, shape)) if config.aot.escalate else [
        jobs.base_job(config, program, shape)]:
      row = _row(config, cfg, job, target, devices, done, run)
      rows.append(row)
      if row.get("fits"):
        break
  return rows


ROOFLINE_NOTE = ("* roofline: every matmul at the device's peak FLOP/s (no compiler cycle estimates on this "
                 "platform), so the step time is a lower bound and the MFU an upper bound.")


def _roofline(r: dict[str, Any]) -> bool:
  return str(r.get("compute_method", "")).startswith("roofline")


def _mfu(r: dict[str, Any]) -> str:
  return f"{100 * r['mfu']:.0f}%" + ("*" if _roofline(r) else "") if r.get("mfu") else "-"


def format_row(r: dict[str, Any]) -> str:
  fits = "fits" if r.get("fits") else f"does NOT fit (needs {r.get('needed_bytes', 0) / GIB:.2f} GiB)"
  return (f"{r.get('needed_bytes', 0) / GIB:.2f} GiB/device, {fits}, est. step {_ms(r.get('step_seconds'))}, "
          f"MFU {_mfu(r)}")


def _ms(seconds: Any) -> str:
  return f"{1000 * seconds:.1f} ms" if seconds else "-"


def report_table(target: Any, cfg_name: str, rows: list[dict[str, Any]], best: dict[str, str]) -> str:
  head = ("| program | mesh d×f×t | remat / accum | batch | per-device GiB (args + temp + out) | fits | "
          "TFLOP/device | est. compute | est. collectives | est. step | est. MFU | tok/s/chip | collectives | "
          "where the estimated compute goes |")
  lines = [f"Target {target.name} ({target.num_devices} × {target.device_kind}, "
           f"{target.hbm_bytes / GIB:.2f} GiB each), model {cfg_name}.", "", head,
           "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    j, mem = r["job"], r.get("memory", {})
    d, f, t = j["mesh_shape"]
    dpo = j["program"] in jobs.TRAIN_PROGRAMS
    colls = ", ".join(f"{k} {v['count']:.0f}× {v['bytes'] / GIB:.2f} GiB" for k, v in r.get("collectives", {}).items()
                      if v.get("count"))
    lines.append("| " + " | ".join([
        j["program"] + (" (best)" if best.get(j["program"]) == r["key"] else ""), f"{d}×{f}×{t}",
        f"{jobs.Job.from_row(j).remat_label} / {j['grad_accum']}" if dpo else "",
        f"{j['rows']} × {j['length']}"
        + (f" + {j['samples']}×{j['new_tokens']}" if j["program"] == "generate" else ""),
        f"{r.get('needed_bytes', 0) / GIB:.2f}" + (f" ({mem.get('argument', 0) / GIB:.2f} + "
        f"{mem.get('temp', 0) / GIB:.2f} + {mem.get('output', 0) / GIB:.2f})" if "argument" in mem else ""),
        "yes" if r.get("fits") else "no", f"{(r.get('flops') or 0) / 1e12:.1f}", _ms(r.get("compute_seconds")),
        _ms(r.get("collective_seconds")), _ms(r.get("step_seconds")),
        _mfu(r),
        f"{r['tokens_per_s_per_chip']:.0f}" if r.get("tokens_per_s_per_chip") == r.get(
            "tokens_per_s_per_chip") and r.get("tokens_per_s_per_chip") else "-", colls or "none",
        hlo.describe_top_kernels(r.get("top_kernels", [])) or "-"]) + " |")
  if any(_roofline(r) and r.get("mfu") for r in rows):
    lines += ["", ROOFLINE_NOTE]
  return "\n".join(lines)


def run(config: Any) -> dict[str, Any]:
  target = targets.parse(config.target)
  cfg = runtime.model_config_from_config(config)
  names = programs_of(config)
  if not config.mesh.auto:
    explicit_mesh(config, target.num_devices)  # refused before the run directory is opened
  why = target.unavailable()
  if why:
    raise ValueError(f"target={config.target}: {why}")
  run_dir = RunDir.open(config.output_dir, "aot", identity(config), overwrite=bool(config.get("overwrite", False)))
  devices = target.devices()
  done = {r["key"]: r for r in run_dir.rows(ROWS_FILE)}
  runtime.log(f"aot: {config.model.path} ({jobs.parameter_count(cfg) / 1e9:.2f}B parameters, "
              f"{config.model.dtype}) on {target.name}: {', '.join(names)}")
  rows, best, largest = [], {}, {}
  for name in names:
    program_rows = plan_program(config, cfg, name, target, devices, done, run_dir)
    rows += program_rows
    chosen = _best(program_rows)
    if chosen:
      best[name] = chosen["key"]
      if config.aot.largest_batch:
        largest[name] = largest_batch(config, cfg, chosen, target, devices, done, run_dir)
        runtime.log(f"  {name}: at most {largest[name]} rows fit on {chosen['key']}")
  table = report_table(target, config.model.path, rows, best)
  if largest:
    table += "\n\nLargest batch that fits (the best row's mesh and settings): " + ", ".join(
        f"{k} {v} rows" for k, v in largest.items())
  runtime.log(table)
  summary = {"target": target.to_dict(), "model": config.model.path, "parameters": jobs.parameter_count(cfg),
             "best": best, "largest_batch": largest, "programs": rows, "method": hlo.METHOD}
  run_dir.write_json("aot.json", summary)
  run_dir.finish({k: v for k, v in summary.items() if k != "programs"} | {"programs": len(rows)},
                 report=f"# Ahead-of-time sizing\n\n{table}\n\n{hlo.METHOD}\n")
  return summary
