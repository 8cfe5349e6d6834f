"""One-command GPU check: measured prefill (IPO scoring) and DPO-step MFU against HF PyTorch on the same GPU, with the
`aot` estimate of the same compiled program beside each measurement.

  python experiments/bench/gpu.py --out runs/bench_gpu.json
      on one H100 or H200: Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B with random bf16 weights; scoring of
      `--rows` x `--seq` tokens and a full DPO step (fp32 weights and Adam moments, bf16 compute, precomputed
      reference) of `--pairs` pairs x 2 x `--seq` tokens where it fits one GPU (8B does not: 12 bytes per parameter
      of weights and moments alone); about 6 minutes with the PyTorch side.
  python experiments/bench/gpu.py --attention auto,xla --out runs/bench_gpu.json
      the same, ipo_jax timed with cuDNN's fused attention (auto) and with XLA's (xla) beside each other.
  python experiments/bench/gpu.py --smoke
      the same code on this host's default device with 2 layers and short rows (a wiring check; no MFU off GPU).

ipo_jax runs the programs the tasks run (`ipo_jax.aot.jobs.lowerable`: the engines' builders, compiled for the
local devices with all of them on fsdp); their arguments are random arrays of the compiled shapes and shardings.
The PyTorch side is transformers' model of the same config (bf16 weights for scoring; fp32 weights under bf16
autocast with AdamW for DPO, the same precision as ipo_jax's step), SDPA attention, timed with CUDA
synchronisation. MFU is model FLOPs (`ipo_jax.aot.jobs.model_flops`, the same convention for both) over the GPU's
published dense bf16 peak (`ipo_jax/aot/targets.py`). Each time is the median of `--iters` calls after `--warmup`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from configs import aot as aot_config  # noqa: E402  pylint: disable=wrong-import-position
from ipo_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position
from ipo_jax.aot import hlo, jobs, targets  # noqa: E402  pylint: disable=wrong-import-position
from ipo_jax.model import presets  # noqa: E402  pylint: disable=wrong-import-position

MODELS = ("preset:llama-3.2-1b", "preset:llama-3.2-3b", "preset:llama-3.1-8b")


def target_of(device) -> targets.Target | None:
  """The `aot` target of the local GPUs (their published figures), or None off GPU."""
  kind = str(getattr(device, "device_kind", "")).lower()
  chip = "h200" if "h200" in kind else "h100" if "h100" in kind else None
  return targets.parse(f"gpu:{chip}x{jax.local_device_count()}") if chip and device.platform == "gpu" else None


def materialise(args, vocab: int, seed: int = 0):
  """Arrays for abstract arguments (ShapeDtypeStructs with shardings): token ids (and masks: any non-zero id is
  "on") uniform over the vocabulary, floats small normal, placed in their shardings."""
  key = [jax.random.key(seed)]

  def make(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    key[0], k = jax.random.split(key[0])
    if jnp.issubdtype(x.dtype, jnp.integer):
      fn = lambda: jax.random.randint(k, x.shape, 1, vocab, x.dtype)
    else:
      fn = lambda: (0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
    return jax.jit(fn, out_shardings=x.sharding)()

  return jax.tree.map(make, args)


def median_seconds(fn, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def measure_jax(config, cfg, job, mesh, target, warmup: int, iters: int) -> dict:
  lowerable = jobs.lowerable(config, cfg, job, mesh)
  tic = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = lowerable.lower().compile()
  out = {"compile_s": round(time.perf_counter() - tic, 1)}
  if target is not None:
    estimate = hlo.analyze(compiled, target)
    out.update(estimate_ms=1e3 * estimate.step_seconds, estimate_gib=estimate.needed_bytes / 2**30)
  static = 3 if job.program != "score" else 1  # (settings, cfg, optim) of the train step; cfg of scoring
  args = materialise(lowerable.args[static:], cfg.vocab_size)
  if job.program != "score":  # the train step donates its state: feed each call the state it returned
    state = [args[0]]

    def call():
      state[0], metrics = compiled(state[0], *args[1:])
      return metrics
  else:
    call = lambda: compiled(*args)
  out["seconds"] = median_seconds(call, warmup, iters)
  return out


def measure_torch(cfg_name: str, cfg, job, warmup: int, iters: int, layers: int | None) -> dict:
  """The same work with transformers' model on the default torch device: scoring (last-position logits of every
  row) or a DPO step's policy forward + backward of both members + AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = presets.hf_config(cfg_name)
  if layers:
    hf.num_hidden_layers = layers
  hf._attn_implementation = "sdpa"  # pylint: disable=protected-access
  score = job.program == "score"
  try:
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16 if score else torch.float32)
    model.to(device)
    rows = job.rows * (1 if score else 2)
    ids = torch.randint(1, cfg.vocab_size, (rows, job.length), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if score:
      model.eval()

      def step():
        with torch.no_grad():
          model(input_ids=ids, logits_to_keep=1).logits.float().log_softmax(-1)
    else:
      opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

      def step():
        with torch.autocast(device, dtype=torch.bfloat16):
          logits = model(input_ids=ids).logits[:, :-1]
        logps = torch.gather(logits.float().log_softmax(-1), 2, ids[:, 1:, None])[..., 0].sum(-1).view(-1, 2)
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:, 0] - logps[:, 1])).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
      step()
    sync()
    times = []
    for _ in range(iters):
      tic = time.perf_counter()
      step()
      sync()
      times.append(time.perf_counter() - tic)
    return {"seconds": statistics.median(times)}
  except torch.OutOfMemoryError as e:
    return {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--rows", type=int, default=32, help="scoring rows")
  parser.add_argument("--pairs", type=int, default=4, help="DPO pairs per step")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--attention", default="auto",
                      help="model.attention settings to time ipo_jax under, comma-separated (auto: cuDNN's fused "
                           "attention on GPU; auto,xla also times XLA's attention)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="2 layers, 64-token rows, the first model only")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  models = args.models.split(",")
  layers = None
  if args.smoke:
    models, layers, args.rows, args.pairs, args.seq, args.warmup, args.iters = models[:1], 2, 2, 1, 64, 1, 2
  devices = jax.local_devices()
  target = target_of(devices[0])
  mesh = sharding.make_mesh({"fsdp": len(devices)}, devices)
  config = aot_config.get_config()
  config.train.remat = False
  print(f"devices: {len(devices)} x {devices[0].device_kind}; peak {target.peak_flops / 1e12:.0f} TFLOP/s each"
        if target else f"devices: {len(devices)} x {devices[0].device_kind} (no published peak: no MFU)")
  results = []
  for name in models:
    cfg = presets.model_config(name)
    if layers:
      cfg = dataclasses.replace(cfg, num_layers=layers, layer_types=cfg.layer_types[:layers])
    for job in (jobs.Job("score", (1, len(devices), 1), args.rows, args.seq),
                jobs.Job("dpo", (1, len(devices), 1), args.pairs, args.seq)):
      flops = jobs.model_flops(cfg, job)
      torch_side = None if args.no_torch else measure_torch(name, cfg, job, args.warmup, args.iters, layers)
      for attention in args.attention.split(","):
        row = {"model": name, "program": job.program, "rows": job.rows, "seq": job.length, "model_flops": flops,
               "attention": attention}
        try:
          row["ipo_jax"] = measure_jax(config, dataclasses.replace(cfg, attention=attention), job, mesh, target,
                                       args.warmup, args.iters)
        except Exception as e:  # pylint: disable=broad-except  (out of memory on the device: reported, not fatal)
          row["ipo_jax"] = {"error": str(e).splitlines()[0][:300]}
        if torch_side is not None:
          row["torch"] = dict(torch_side)
        for side in ("ipo_jax", "torch"):
          seconds = row.get(side, {}).get("seconds")
          if seconds and target:
            row[side]["mfu"] = flops / (seconds * target.peak_flops * target.num_devices)
        results.append(row)
        print(line(row), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"devices": f"{len(devices)} x {devices[0].device_kind}", "rows": results}, f, indent=1)


def line(row: dict) -> str:
  def side(name):
    r = row.get(name)
    if not r:
      return f"{name} -"
    if "error" in r:
      return f"{name} {r['error']}"
    text = f"{name} {1e3 * r['seconds']:.1f} ms" + (f" (MFU {100 * r['mfu']:.0f}%)" if "mfu" in r else "")
    if "estimate_ms" in r:
      text += f", aot estimate {r['estimate_ms']:.1f} ms, {r['estimate_gib']:.1f} GiB"
    return text

  ratio = ""
  if row.get("ipo_jax", {}).get("seconds") and row.get("torch", {}).get("seconds"):
    ratio = f"; {row['torch']['seconds'] / row['ipo_jax']['seconds']:.2f}x PyTorch"
  shape = f"{row['rows']} x {row['seq']}" + (" x 2" if row["program"] == "dpo" else "")
  attention = f" (attention {row['attention']})" if "attention" in row else ""
  return f"{row['model']} {row['program']} {shape}{attention}: {side('ipo_jax')}; {side('torch')}{ratio}"


if __name__ == "__main__":
  main()
