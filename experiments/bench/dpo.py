"""DPO step time and peak RSS: ipo_jax vs TRL's DPOTrainer on the embedded SmolLM2-135M-Instruct.

Both train every weight in float32 on the CPU, on the same token sequences (single-token words, so prompt and
responses have exact lengths and every sequence is exactly `--seq` tokens, nothing padded), with the same number
of pairs per step, a precomputed reference, no activation checkpointing, and AdamW at the same learning rate and
clipping. TRL loads the same GGUF file through transformers' GGUF support. Each side runs in its own subprocess,
one after the other in one invocation, so each peak RSS is its own:

  python experiments/bench/dpo.py --batch 2 --seq 128 --warmup 2 --steps 5 --out runs/bench_dpo.json

Step time is the median wall time of whole loop iterations (batch preparation, forward and backward of chosen and
rejected, optimizer update) after `--warmup` iterations; ipo_jax compiles in its first one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _words(tokenizer, count: int) -> list[str]:
  """Words that are one token each with their leading space (so lengths in tokens are exact)."""
  words = []
  for token_id in range(1000, len(tokenizer)):
    text = tokenizer.decode([token_id])
    if text.startswith(" ") and text[1:].isalpha() and len(text) > 3 and len(tokenizer(text)["input_ids"]) == 1:
      words.append(text)
      if len(words) == count:
        return words
  raise RuntimeError("not enough single-token words in the vocabulary")


def pairs(tokenizer, num: int, seq: int, seed: int = 0) -> list[dict[str, str]]:
  """`num` plain-text pairs: a prompt of seq // 2 words, responses of seq - seq // 2 - 1 words (+ EOS)."""
  import random
  rng = random.Random(seed)
  vocab = _words(tokenizer, 400)
  prompt_len, response_len = seq // 2, seq - seq // 2 - 1
  text = lambda n: "".join(rng.choice(vocab) for _ in range(n))
  return [{"prompt": text(prompt_len), "chosen": text(response_len), "rejected": text(response_len)}
          for _ in range(num)]


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args) -> dict:
  from ipo_jax.train import loop, metrics, pairs as pairs_lib  # pylint: disable=import-outside-toplevel
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel
  from ipo_jax import main as cli  # pylint: disable=import-outside-toplevel

  t0 = time.time()
  model = loading.load_model("embedded", dtype="float32")
  load_s, load_rss = time.time() - t0, _peak_rss_mb()
  rows = pairs(model.tokenizer, args.batch * (args.warmup + args.steps), args.seq)
  pset, _ = pairs_lib.tokenize_rows(rows, model.tokenizer, source="bench", chat_template=False)
  lengths = {len(p) + len(c) for p, c in zip(pset.prompt_ids, pset.chosen_ids)}
  lengths |= {len(p) + len(r) for p, r in zip(pset.prompt_ids, pset.rejected_ids)}
  c = cli.load_config(os.path.join(ROOT, "configs", "dpo.py"))
  c.output_dir = tempfile.mkdtemp()
  c.data.update(max_length=args.seq, max_prompt_length=args.seq - 1)
  c.optim.update(learning_rate=5e-5, warmup_ratio=0.0, schedule="constant", max_grad_norm=1.0)
  c.train.update(batch_size=args.batch, max_steps=args.warmup + args.steps, compute_dtype=args.compute_dtype,
                 remat=False)
  c.eval.update(batch_size=args.batch)
  c.checkpoint.update(every=0)
  c.log.update(every=1, tensorboard=False, tqdm=False, plot=False)
  t0 = time.time()
  _, summary = loop.train_dpo(model, pset, c, release_base=True)  # as the dpo task, which loads its own model
  total_s = time.time() - t0
  rows = [r for r in metrics.read_metrics(os.path.join(c.output_dir, metrics.METRICS_FILE)) if r["split"] == "train"]
  times = [r["step_time_s"] for r in rows]
  return {"framework": "ipo_jax", "step_times_s": times, "median_step_s": statistics.median(times[args.warmup:]),
          "first_step_s": times[0], "reference_s": summary["reference_s"], "train_s": total_s, "load_s": load_s,
          "seq_lengths": sorted(lengths), "peak_rss_after_load_mb": load_rss, "peak_rss_mb": _peak_rss_mb(),
          "final_loss": rows[-1]["loss"]}


def run_trl(args) -> dict:
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  from ipo_jax.model import loading  # pylint: disable=import-outside-toplevel

  path = loading.embedded_model_path()
  directory, name = os.path.dirname(path), os.path.basename(path)
  t0 = time.time()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(  # float32 weights, as ours
      directory, gguf_file=name, dtype=torch.float32,
      quantization_config=transformers.GgufConfig(gguf_file=name, dequantize=True))
  load_s, load_rss = time.time() - t0, _peak_rss_mb()
  ends = []

  class Timer(transformers.TrainerCallback):
    def on_step_end(self, *_, **__):
      ends.append(time.perf_counter())

    def on_train_begin(self, *_, **__):
      ends.append(time.perf_counter())

  rows = pairs(tokenizer, args.batch * (args.warmup + args.steps), args.seq)
  config = trl.DPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
      learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
      gradient_checkpointing=False, bf16=args.compute_dtype == "bfloat16", use_cpu=True, precompute_ref_log_probs=True,
      precompute_ref_batch_size=args.batch, max_length=args.seq, beta=0.1, report_to=[], logging_steps=1,
      save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
  trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer, callbacks=[Timer()])
  data = trainer.train_dataset
  lengths = sorted({len(p) + len(x) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
                    for x in (c, r)})
  t0 = time.time()
  trainer.train()
  total_s = time.time() - t0
  times = [b - a for a, b in zip(ends, ends[1:])]  # the first includes the reference pass
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
  return {"framework": f"trl {trl.__version__} (torch {torch.__version__})", "step_times_s": times,
          "median_step_s": statistics.median(times[args.warmup:]), "first_step_s": times[0], "train_s": total_s,
          "load_s": load_s, "seq_lengths": lengths, "peak_rss_after_load_mb": load_rss, "peak_rss_mb": _peak_rss_mb(),
          "final_loss": losses[-1] if losses else None}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
  parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt + response)")
  parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the median")
  parser.add_argument("--steps", type=int, default=5, help="iterations measured")
  parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the forward's dtype: fp32 weights and optimizer either way; bfloat16 is TRL's bf16=True "
                           "(autocast) against ipo_jax's train.compute_dtype=bfloat16")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    result = run_ours(args) if args.worker == "ours" else run_trl(args)
    with open(args.worker_out, "w", encoding="utf-8") as f:
      json.dump(result, f)
    return

  results = {}
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  for worker in ("ours", "trl"):
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--worker-out", tmp.name,
             "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps",
             str(args.steps), "--compute-dtype", args.compute_dtype]
      subprocess.run(cmd, env=env, check=True)
      results[worker] = json.load(open(tmp.name, encoding="utf-8"))
  ours, theirs = results["ours"], results["trl"]
  summary = {"settings": {"batch_pairs": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
                          "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)",
                          "precision": args.compute_dtype, "device": "cpu", "cores": os.cpu_count()},
             "ipo_jax": ours, "trl": theirs, "speedup": theirs["median_step_s"] / ours["median_step_s"],
             "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
  print(f"{'':10s} {'median step':>12s} {'first step':>11s} {'RSS after load':>15s} {'peak RSS':>10s}  lengths")
  for label, r in (("ipo_jax", ours), ("TRL", theirs)):
    print(f"{label:10s} {r['median_step_s']:11.3f}s {r['first_step_s']:10.2f}s {r['peak_rss_after_load_mb']:13.0f}MB "
          f"{r['peak_rss_mb']:8.0f}MB  {r['seq_lengths']}")
  print(f"speed-up (TRL step / ipo_jax step): {summary['speedup']:.2f}x; RSS ratio: {summary['rss_ratio']:.2f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
