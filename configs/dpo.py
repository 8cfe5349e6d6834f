"""DPO training of a policy on preference pairs (TRL's prompt/chosen/rejected convention).

Local smoke run on Anthropic HH-RLHF harmless-base test pairs (embedded SmolLM2-135M-Instruct, LoRA r=16, 20 steps
of 2 pairs, up to 192 tokens, eval on 12 held-out pairs): 15 minutes of wall time (7.5 CPU-minutes) on 2 CPU cores
shared with other jobs, a third of it the reference pass:

  python -m ipo_jax.main --config configs/dpo.py:local --config.output_dir=runs/dpo_local

The paper's recipe (their code: TRL DPOTrainer, QLoRA r=256, alpha=128 on all linear layers, lr 5e-5, 1 epoch,
cosine schedule, warmup 0.1, max grad norm 0.3, beta 0.1), on self-labelled pairs from the self-improvement loop:

  python -m ipo_jax.main --config configs/dpo.py:paper --config.model.path=<model> \\
      --config.data.path=<pairs.jsonl> --config.output_dir=runs/dpo_paper

A run writes to output_dir: metrics.jsonl, tensorboard/, curves.png, checkpoints/ (rerunning the same command
resumes from the latest), reference_logps.npz (the reference pass, reused on resume), summary.json and hf/ (the
policy as a Hugging Face directory, LoRA merged).
"""

import ml_collections

from ipo_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = defaults.base("dpo", output_dir="runs/dpo")

  # Pairs: a hub id or a local .jsonl/.parquet; eval from `eval_path` or a held-out `eval_fraction`.
  c.data = dict(path="", split="train", name="", eval_path="", eval_split="test", eval_fraction=0.05,
                chat_template=True,  # plain-text prompts go through the chat template as one user turn
                skip_invalid=False, limit=0, max_length=1024, max_prompt_length=512)

  # The loss: sigmoid | hinge | ipo | ipo_norm; the reference precomputed once or on the fly.
  c.dpo = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="precomputed")

  # LoRA on the named linear layers; rank 0 trains every weight.
  c.lora = dict(rank=0, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"))

  # AdamW (no decay on norms and biases), warmup then cosine/linear/constant, global-norm clipping.
  c.optim = dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                 eps=1e-8, max_grad_norm=1.0)

  # batch_size pairs per optimizer step, in grad_accum micro-batches; max_steps 0 means `epochs` epochs.
  # stop_after_steps > 0 ends the process after that many steps (with a checkpoint): for time-limited jobs.
  c.train = dict(batch_size=8, grad_accum=1, epochs=1, max_steps=0, stop_after_steps=0, compute_dtype="auto",
                 remat=False, vocab_chunk=8192)

  c.eval = dict(every=0, batch_size=8)  # every 0: only at the end
  c.checkpoint = dict(every=100, keep=2)  # every 0: no checkpoints
  c.log = dict(every=1, tensorboard=True, tqdm=True, plot=True)
  c.export = dict(enabled=True, dir="", dtype="float32")  # dir "": <output_dir>/hf

  if arg == "local":
    c.output_dir = "runs/dpo_local"
    c.data.update(path="Anthropic/hh-rlhf", name="harmless-base", split="test", chat_template=False, limit=120,
                  skip_invalid=True,  # a few transcripts end in an empty assistant turn
                  eval_fraction=0.1, max_length=192, max_prompt_length=128)
    c.lora.update(rank=16, alpha=32.0)
    c.optim.update(learning_rate=5e-4, max_grad_norm=0.3)
    c.train.update(batch_size=2, max_steps=20)
    c.eval.update(every=10, batch_size=4)
    c.checkpoint.update(every=10)
  elif arg == "paper":
    c.lora.update(rank=256, alpha=128.0, dropout=0.05)
    c.optim.update(learning_rate=5e-5, schedule="cosine", warmup_ratio=0.1, max_grad_norm=0.3)
    c.train.update(epochs=1, remat=True)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use configs/dpo.py, configs/dpo.py:local or configs/dpo.py:paper")
  return c
