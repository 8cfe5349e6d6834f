"""Supervised fine-tuning (SFT) of a policy on (instruction, response) examples, completion-only loss.

Demo run on the embedded SmolLM2-135M-Instruct (32 AlpacaEval instruction/output examples for training, 8 held
out, full fine-tuning, 8 steps of 4 examples, up to 256 tokens): 96 s of training (about 2.5 minutes in all) on a
2-core Intel Xeon; the held-out loss goes from 1.650 to 1.534 nats per response token:

  python -m ipo_jax.main --config configs/sft.py:demo

The same examples packed into rows of 256 tokens (18 rows, 9 steps of 2 rows, one compiled shape): 73 s of
training, held-out loss 1.650 -> 1.514:

  python -m ipo_jax.main --config configs/sft.py:demo --config.sft.packing=True --config.train.max_steps=0 \
      --config.train.batch_size=2

Dolly (databricks/databricks-dolly-15k: instruction, context, response), from the hub:

  python -m ipo_jax.main --config configs/sft.py:dolly --config.model.path=<model> --config.output_dir=runs/sft_dolly

Any other file or hub id: `--config.data.path=<file or hub id>` with `--config.data.columns.instruction=<column>`
(and `.context`, `.response`) where its columns have other names; HH-RLHF transcripts (`chosen`) are read too, e.g.
`--config.data.path=Anthropic/hh-rlhf --config.data.name=harmless-base --config.data.split=test`.

A run writes to output_dir: metrics.jsonl, tensorboard/, curves.png, checkpoints/ (rerunning the same command
resumes from the latest), summary.json (with `eval_initial`, the held-out loss before training) and hf/ (the policy
as a Hugging Face directory, LoRA merged).
"""

from configs import common

VARIANTS = ("demo", "dolly")


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, valid=VARIANTS)
  c = common.base("sft", output_dir="runs/sft")
  c.update(common.sft_training())  # data, sft, lora, optim, train, eval, checkpoint, log, export (configs/common.py)

  if v.demo:
    c.output_dir = "runs/sft_demo"
    c.data.update(path="tatsu-lab/alpaca_eval", split="eval", name="alpaca_eval", limit=40, eval_fraction=0.2,
                  max_length=256, max_prompt_length=128)
    c.optim.update(learning_rate=5e-5, warmup_ratio=0.0, max_grad_norm=1.0)
    c.train.update(batch_size=4, max_steps=8)
    c.eval.update(batch_size=4)
    c.checkpoint.update(every=4, keep=1)
  if v.dolly:
    c.data.update(path="databricks/databricks-dolly-15k", split="train", name="", eval_fraction=0.02)
    c.optim.update(learning_rate=2e-5, schedule="cosine", warmup_ratio=0.03)
    c.train.update(batch_size=32, epochs=1, remat=True)
    c.eval.update(every=100, batch_size=16)
  return c
