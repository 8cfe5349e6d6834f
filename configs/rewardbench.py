"""RewardBench with the IPO classifier: P(Yes) of each response under a yes/no question.

  python -m ipo_jax.main --config configs/rewardbench.py:demo
      embedded SmolLM2-135M-Instruct, 2 pairs per subset of allenai/reward-bench (filtered) (46 pairs, max_length 512): about a minute
      on an idle 2-core CPU after set-up (model load 20 s, one compilation), prints the table.
  python -m ipo_jax.main --config configs/rewardbench.py:paper --config.model.path=<gguf or HF dir> \
      --config.output_dir=runs/rb_paper
      the authors' procedure exactly: their per-subset prompts, paper layout, right truncation at 1024 tokens.
  python -m ipo_jax.main --config configs/rewardbench.py --config.model.path=<gguf or dir> \
      --config.data.path=<pairs.jsonl.gz> --config.scoring.prompts_file=paper:rewardbench_prompts \
      --config.output_dir=<dir>

Variants (combine with commas, e.g. `:ensemble,demo`): `paper` (the authors' prompts and truncation), `chat`
(the content as one user turn of the chat template), `ensemble` (10 candidate instructions per subset, mean
P(Yes), plus the per-candidate prompt search), `demo` / `local` (a small slice on the embedded model). Data and the paper's prompt files resolve through
ipo_jax/sources.py: the cache, then their real sources, then the offline copy ($IPO_JAX_DATA).
No variant: paper layout with the project's own instructions, truncation that keeps the question.

The full filtered split (2985 pairs, 1.7M tokens with the paper layout) takes about 54 minutes for SmolLM2-135M
in fp32 on a 2-core CPU (one compiled program: packed rows, each pair's shared start once); bfloat16
(`--config.model.dtype=bfloat16`) took 22.5 minutes on CPUs with AMX. An ensemble of K instructions takes about
K times as long (experiments/rewardbench_ensemble.py compares the two).
"""

import ml_collections

from ipo_jax import defaults

VARIANTS = ("paper", "chat", "ensemble", "demo", "local")


def get_config(arg=None):
  variants = defaults.parse_variants(arg, VARIANTS)

  config = defaults.base("rewardbench", output_dir="runs/rewardbench")

  # Pairs (see defaults.rewardbench_data).
  config.data = defaults.rewardbench_data()
  config.data.columns = ml_collections.ConfigDict()  # our field -> the file's column, e.g. prompt="question"

  # The classifier.
  config.scoring = ml_collections.ConfigDict()
  config.scoring.layout = "paper"  # paper | chat | template
  config.scoring.template = ""  # for layout=template: a string with {instruction}, {prompt}, {response}
  config.scoring.prompts_file = ""  # empty: the project's instructions (ipo_jax/prompts.py); a file or a source
  config.scoring.yes = ""  # answer strings; empty: " Yes"/" No" (paper, template) or "Yes"/"No" (chat)
  config.scoring.no = ""
  config.scoring.max_length = 1024
  config.scoring.truncation = "keep_question"  # keep_question: cut the response, then the prompt | paper: right
  config.scoring.ensemble = "mean_prob"  # how several instructions per subset combine: mean_prob | mean_log_odds
  # Speed: length buckets chosen from the data, at most max_programs compiled programs.
  config.scoring.batch_tokens = 0  # tokens per batch (rows = batch_tokens // bucket length, <= max_batch);
  # 0: 2048 on CPU (activations stay in cache), 8192 on an accelerator
  config.scoring.max_batch = 64
  config.scoring.max_programs = 8
  config.scoring.length_multiple = 32  # bucket lengths are multiples of this
  config.scoring.buckets = ()  # fixed bucket lengths instead of the chosen ones
  config.scoring.shared_prefix = True  # run the tokens a chosen/rejected pair shares once (when it saves work)
  config.scoring.prefix_length = 0  # shared-prefix slots; 0: chosen from the data
  config.scoring.window = 256  # pairs whose prefixes are cached (or sequences packed) together
  config.scoring.packing = "auto"  # several sequences per row, no padding, 1 program: auto | always | never
  config.scoring.progress = True

  if "paper" in variants:
    config.scoring.prompts_file = "paper:rewardbench_prompts"
    config.scoring.truncation = "paper"
    config.output_dir = "runs/rewardbench_paper"
  if "chat" in variants:
    config.scoring.layout = "chat"
    config.output_dir = "runs/rewardbench_chat"
  if "ensemble" in variants:
    config.scoring.prompts_file = "paper:candidate_prompts"
    config.output_dir = "runs/rewardbench_ensemble"
  if "demo" in variants or "local" in variants:
    config.data.max_per_subset = 2
    config.scoring.max_length = 512
    config.scoring.max_programs = 4
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
