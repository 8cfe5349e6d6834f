"""Ahead-of-time sizing: compile the paper's jobs for a TPU slice or GPU node from a host without one.

  python -m ipo_jax.main --config configs/aot.py --config.model.path=preset:llama-3.1-8b \
      --config.target=tpu:v5e:4x4 --config.programs=score,dpo
      IPO scoring (64 rows x 1024 tokens) and a full DPO step (16 pairs x 2 x 1024 tokens) of Llama-3.1-8B in bf16
      on a 16-chip v5e slice: per-device memory, fits or not, estimated step time, MFU, collectives.
  python -m ipo_jax.main --config configs/aot.py:paper --config.model.path=preset:llama-3.1-70b \
      --config.target=tpu:v5p:4x4x4
      the paper's four jobs (scoring, sampling 4 x 256 tokens, DPO with LoRA r=256 and full DPO) for 70B on 64 v5p
      chips.
  python -m ipo_jax.main --config configs/aot.py:paper --config.model.path=preset:llama-3.1-8b \
      --config.target=gpu:h100x8
      the same on one 8 x H100 node (needs the CUDA plugin of jax: `make setup-gpu-aot`).

Programs (`--config.programs`, comma-separated): score, reward (a classifier reward model: aot.reward_rows x
reward_model.max_length tokens; a causal LM's architecture gets a one-label head), generate, dpo, dpo_lora (the
paper's LoRA r=256 on every projection) and sft (an SFT step of train.batch_size examples of data.max_length
tokens).
Targets: `tpu:<v4|v5e|v5p|v6e>:<topology>` and `gpu:<h100|h200>x8[x<hosts>]` (ipo_jax/aot/targets.py lists the
forms, the devices' figures and their sources). The TPU compiler comes with the dev install (libtpu); the host needs
no accelerator. `--config.mesh.auto=True` compiles `mesh.candidates` (data, fsdp, tensor) meshes and reports the
best that fits; a training step that does not fit is retried with remat (policy minimal, then full), then with more
micro-batches (`aot.escalate`).
Variants: `paper` (all four programs), `tiny` (Qwen2.5-0.5B shapes with short rows on a v5e 2x2, a fast check).

Measured on a 2-core Intel Xeon host (AMX) shared with a test run: `:paper` for 8B on tpu:v5e:4x4 took 8 minutes
(scoring 26 s, sampling 32 s, a DPO step with remat 3-4 minutes; one that does not fit is refused in 4-6 s), for 70B
on tpu:v5p:4x4x4 7.4 minutes (scoring 47 s, sampling 81 s, DPO 2.5 minutes), for 8B on gpu:h100x8 65 s (9-23 s a
program). Layers are one `lax.scan`, so depth adds little compile time.
"""

from configs import common

VARIANTS = ("paper", "tiny")


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  c = common.base("aot", output_dir="runs/aot")
  c.model.path = "preset:llama-3.1-8b"
  c.model.dtype = "bfloat16"
  c.target = "tpu:v5e:4x4"
  c.programs = "score,dpo"
  c.mesh.candidates = 8  # with mesh.auto: candidate meshes per program
  c.scoring = common.scoring()
  c.sampling = common.sampling()  # num_samples x max_new_tokens per prompt, batch_size prompts per program
  c.update(common.training())  # dpo, lora, optim, train (batch_size pairs per step, grad_accum, remat), data
  c.train.batch_size = 16
  c.train.compute_dtype = "auto"  # the target's: bfloat16 on TPU and GPU
  c.reward_model = dict(max_length=1024)  # the reward program's tokens per sequence
  c.aot = dict(
      score_rows=64,  # sequences per scoring program (scoring.max_length tokens each)
      reward_rows=16,  # sequences per reward program (a classifier reward model; reward_model.max_length each)
      score_program="plain",  # plain | packed (packed_sequences scored per row)
      packed_sequences=4,
      prompt_length=512,  # sampling: prompt tokens per row
      escalate=True,  # training steps: remat (minimal, then full), then more micro-batches, until it fits
      largest_batch=False,  # also find the most rows each program fits (doubling, then bisection: ~2 log2 compiles)
      largest_batch_cap=4096,
  )
  if v.paper:
    c.programs = "score,generate,dpo_lora,dpo"
  if v.tiny:
    c.model.path = "preset:qwen2.5-0.5b"
    c.target = "tpu:v5e:2x2"
    c.scoring.max_length = 256
    c.aot.score_rows = 8
    c.reward_model.max_length = 256
    c.aot.reward_rows = 8
    c.sampling.update(batch_size=4, max_new_tokens=16)
    c.aot.prompt_length = 64
    c.data.update(max_length=256, max_prompt_length=128)
    c.train.batch_size = 4
    c.output_dir = "runs/aot_tiny"
  return c
