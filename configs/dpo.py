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

from configs import common

VARIANTS = ("local", "paper")


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, valid=VARIANTS)
  c = common.base("dpo", output_dir="runs/dpo")
  c.update(common.training())  # data, dpo, lora, optim, train, eval, checkpoint, log, export (configs/common.py)

  if v.local:
    c.output_dir = "runs/dpo_local"
    c.data.update(path="Anthropic/hh-rlhf", name="harmless-base", split="test", chat_template=False, limit=120,
                  skip_invalid=True,  # a few transcripts end in an empty assistant turn
                  eval_fraction=0.1, max_length=192, max_prompt_length=128)
    c.lora.update(rank=16, alpha=32.0)
    c.optim.update(learning_rate=5e-4, max_grad_norm=0.3)
    c.train.update(batch_size=2, max_steps=20)
    c.eval.update(every=10, batch_size=4)
    c.checkpoint.update(every=10)
  if v.paper:
    c.lora.update(rank=256, alpha=128.0, dropout=0.05)
    c.optim.update(learning_rate=5e-5, schedule="cosine", warmup_ratio=0.1, max_grad_norm=0.3)
    c.train.update(epochs=1, remat=True)
  return c
