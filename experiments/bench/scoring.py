"""RewardBench scoring throughput: the paper's PyTorch procedure, tuned PyTorch, and ipo_jax, on the same pairs.

  python experiments/bench/scoring.py                          # 2 pairs per subset (46 pairs, 92 sequences)
  python experiments/bench/scoring.py --per-subset 1 --model embedded
  python experiments/bench/scoring.py --bf16      # adds tuned HF and ipo_jax in bfloat16 (fp32 accumulation)

  (a) paper:  transformers fp32 on CPU, one sequence at a time, logits at every position (as the authors' code).
  (b) tuned:  transformers fp32, sequences sorted by length, left-padded batches, `logits_to_keep=1`.
  (c) ipo_jax: `ipo_jax.ipo.scorer` (the planner's choice of packed rows, length buckets or shared prefixes;
      block-causal attention; two LM-head rows at the scored positions).

All three read the same token ids (paper layout, the authors' prompts, right truncation at 1024) and compute
P(Yes); each runs in its own process (so its peak RSS is its own). "Useful" FLOPs are the same number for all
three: the forward pass over every real token with causal attention, plus the LM head at the one scored
position; ipo_jax is timed including its compilations (first pass) and again warm (second pass). The GEMM peak is
the best matmul rate of torch and XLA measured in this run, in the row's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


RUNS = ("paper", "tuned", "jax", "tuned_bf16", "jax_bf16")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sequences(tokenizer, per_subset: int, max_length: int) -> tuple[list[list[int]], list[str]]:
  """Token ids of every (chosen, rejected) of the slice, laid out exactly as the paper's code does."""
  from ipo_jax.evals import rewardbench
  from ipo_jax.ipo import layout as layout_lib
  from ipo_jax.ipo import prompts, scorer
  pairs = rewardbench.load_pairs({"path": rewardbench.DEFAULT_HUB_ID, "max_per_subset": per_subset})
  paper = prompts.load_prompts("paper:rewardbench_prompts")
  layout = layout_lib.make_layout(scorer.Settings())
  examples = [(paper.instruction(p["subset"]), p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]
  encoded = layout_lib.encode_examples(tokenizer, layout, examples, max_length, truncation="paper")
  return [ids for ids, _ in encoded], [p["subset"] for p in pairs]


def _useful_flops(cfg, seqs) -> float:
  from ipo_jax.ipo import planner
  n = np.array([len(s) for s in seqs])
  return float(planner.flops(cfg, n, (n + 1) / 2).sum() + planner.head_flops(cfg) * len(n))


def _answers(tokenizer) -> tuple[int, int]:
  from ipo_jax.ipo import layout, scorer
  return layout.answer_ids(tokenizer, layout.make_layout(scorer.Settings()))


def run_hf(args, tuned: bool, dtype: str = "float32") -> dict:
  import torch
  import transformers
  from ipo_jax.ipo import scorer
  from ipo_jax.model import loading, tokenizer as tokenizer_lib
  from ipo_jax.model.architecture import ModelConfig
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  path = loading.resolve_model_path(args.model)
  kwargs = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
  directory = os.path.dirname(path) if path.endswith(".gguf") else path
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), **kwargs).eval()
  tokenizer = tokenizer_lib.load_tokenizer(path)
  seqs, _ = _sequences(tokenizer, args.per_subset, args.max_length)
  yes, no = _answers(tokenizer)
  batch_tokens = scorer.Settings(batch_tokens=args.batch_tokens).tokens_per_batch()  # the same as ipo_jax's
  p_yes = np.zeros(len(seqs))
  start = time.perf_counter()
  with torch.no_grad():
    if not tuned:
      for i, ids in enumerate(seqs):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # the model computes logits at every position
        probs = torch.softmax(logits.double(), -1)
        p_yes[i] = float(probs[yes] / (probs[yes] + probs[no]))
    else:
      batches, current = [], []
      for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])):
        if current and (len(current) + 1) * len(seqs[i]) > batch_tokens:
          batches.append(current)
          current = []
        current.append(i)
      for idx in batches + [current]:
        width = len(seqs[idx[-1]])
        ids = torch.full((len(idx), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
          ids[r, width - len(seqs[i]):] = torch.tensor(seqs[i])
          mask[r, width - len(seqs[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        pair = logits[:, [yes, no]].double()
        p_yes[idx] = torch.sigmoid(pair[:, 0] - pair[:, 1]).numpy()
  seconds = time.perf_counter() - start
  cfg = ModelConfig.from_hf(model.config)
  return {"pairs": len(seqs) // 2, "seconds": seconds, "useful_flops": _useful_flops(cfg, seqs),
          "p_yes": p_yes.tolist(), "peak_rss_gb": _peak_rss_gb(), "threads": torch.get_num_threads()}


def run_jax(args, dtype: str = "float32") -> dict:
  from ipo_jax.ipo import scorer as scorer_lib
  from ipo_jax.model import loading
  model = loading.load_model(args.model, dtype=dtype)
  seqs, _ = _sequences(model.tokenizer, args.per_subset, args.max_length)
  pairs = [(seqs[2 * i], seqs[2 * i + 1]) for i in range(len(seqs) // 2)]
  settings = scorer_lib.Settings(batch_tokens=args.batch_tokens, max_programs=args.max_programs,
                                 shared_prefix=not args.no_shared_prefix, packing=args.packing, progress=False)
  out = {}
  for name in ("cold", "warm"):
    scorer = scorer_lib.Scorer(model, settings)
    compiled = scorer_lib.num_compilations()
    values = np.zeros((len(seqs), 2))
    start = time.perf_counter()
    for idx, v in scorer.score_pairs(pairs):
      values[idx] = v
    seconds = time.perf_counter() - start
    out[name] = {"seconds": seconds, "compilations": scorer_lib.num_compilations() - compiled, **scorer.stats,
                 **scorer_lib.flop_rate(scorer.stats, seconds)}
  plan = scorer.last_plan
  return {"pairs": len(pairs), "seconds": out["cold"]["seconds"], "warm_seconds": out["warm"]["seconds"],
          "useful_flops": out["cold"]["useful_flops"], "executed_flops": out["cold"]["executed_flops"],
          "slots_per_token": out["cold"]["slots_per_token"], "compilations": out["cold"]["compilations"],
          "plan": {"packed": bool(plan.packed), "prefix": plan.prefix, "buckets": list(plan.buckets),
                   "rows": list(plan.rows)},
          "p_yes": scorer_lib.sigmoid(values[:, 0]).tolist(), "peak_rss_gb": _peak_rss_gb()}


def gemm_peak(dtype: str, n: int = 2048, repeats: int = 5) -> dict:
  """Best GEMM GFLOP/s of torch and XLA on this machine right now (inputs in `dtype`, fp32 accumulation)."""
  import jax
  import jax.numpy as jnp
  import torch
  out = {}
  a = torch.randn(n, n, dtype=getattr(torch, dtype))
  a @ a
  start = time.perf_counter()
  for _ in range(repeats):
    a @ a
  out["torch"] = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(x).block_until_ready()
  out["xla"] = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="embedded")
  parser.add_argument("--per-subset", type=int, default=2)
  parser.add_argument("--max-length", type=int, default=1024)
  parser.add_argument("--batch-tokens", type=int, default=0, help="(b) and (c); 0: ipo_jax's default for the backend")
  parser.add_argument("--max-programs", type=int, default=8)
  parser.add_argument("--no-shared-prefix", action="store_true")
  parser.add_argument("--packing", default="auto", choices=["auto", "always", "never"])
  parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  parser.add_argument("--bf16", action="store_true", help="also (b) and (c) in bfloat16")
  parser.add_argument("--only", choices=RUNS, help=argparse.SUPPRESS)  # one child process
  args = parser.parse_args()
  if args.only:
    dtype = "bfloat16" if args.only.endswith("_bf16") else "float32"
    kind = args.only.removesuffix("_bf16")
    result = run_jax(args, dtype) if kind == "jax" else run_hf(args, tuned=kind == "tuned", dtype=dtype)
    print("RESULT " + json.dumps(result))
    return

  names = RUNS if args.bf16 else RUNS[:3]
  peaks = {dtype: gemm_peak(dtype) for dtype in ("float32", "bfloat16")[:1 + args.bf16]}
  results = {}
  for name in names:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name] + sys.argv[1:]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
      sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    results[name] = json.loads(lines[-1][len("RESULT "):])
  for dtype, peak in peaks.items():
    print(f"GEMM peak ({dtype}, 2048^3): torch {peak['torch']:.0f} GFLOP/s, XLA {peak['xla']:.0f} GFLOP/s")
  a, b = results["paper"], results["tuned"]
  print(f"{a['pairs']} pairs ({args.per_subset} per subset), model {args.model}\n")
  print(f"{'':30}{'pairs/s':>9}{'useful GFLOP/s':>16}{'% of peak':>11}{'peak RSS GB':>13}")
  rows = [("(a) paper, HF torch", "paper", "seconds"), ("(b) tuned HF torch", "tuned", "seconds"),
          ("(c) ipo_jax (cold)", "jax", "seconds"), ("(c) ipo_jax (warm)", "jax", "warm_seconds"),
          ("(b) tuned HF torch, bf16", "tuned_bf16", "seconds"),
          ("(c) ipo_jax, bf16 (warm)", "jax_bf16", "warm_seconds")]
  for label, name, timing in rows:
    if name in results:
      r = results[name]
      useful = r["useful_flops"] / r[timing] / 1e9
      peak = max(peaks["bfloat16" if name.endswith("_bf16") else "float32"].values())
      print(f"{label:30}{r['pairs'] / r[timing]:9.3f}{useful:16.1f}{100 * useful / peak:10.0f}%"
            f"{r['peak_rss_gb']:13.2f}")
  c = results["jax"]
  print(f"\nspeed-up of (c) cold / warm: {a['seconds'] / c['seconds']:.2f}x / {a['seconds'] / c['warm_seconds']:.2f}x "
        f"over (a), {b['seconds'] / c['seconds']:.2f}x / {b['seconds'] / c['warm_seconds']:.2f}x over (b); "
        f"(b) over (a): {a['seconds'] / b['seconds']:.2f}x")
  if args.bf16:
    cb, bb = results["jax_bf16"], results["tuned_bf16"]
    print(f"bf16, warm: (c) {a['seconds'] / cb['warm_seconds']:.2f}x over (a), "
          f"{bb['seconds'] / cb['warm_seconds']:.2f}x over (b) in bf16, "
          f"{c['warm_seconds'] / cb['warm_seconds']:.2f}x over (c) in fp32")
  print(f"(c): {c['compilations']} XLA compilations, plan {c['plan']}, {c['slots_per_token']:.2f} slots "
        f"processed per sequence token, executed {c['executed_flops'] / c['warm_seconds'] / 1e9:.1f} GFLOP/s warm "
        f"({c['executed_flops'] / c['useful_flops']:.2f}x the useful FLOPs)")
  p_yes = {name: np.array(r["p_yes"]) for name, r in results.items()}
  print("max |P(Yes) - (a)|: " + ", ".join(f"{name} {np.abs(p - p_yes['paper']).max():.2e}"
                                           for name, p in p_yes.items() if name != "paper"))
  agree = {name: float(np.mean((p[0::2] > p[1::2]) == (p_yes["paper"][0::2] > p_yes["paper"][1::2])))
           for name, p in p_yes.items() if name != "paper"}
  print("pairs decided as (a) decides them: " + ", ".join(f"{name} {100 * v:.0f}%" for name, v in agree.items()))


if __name__ == "__main__":
  main()
