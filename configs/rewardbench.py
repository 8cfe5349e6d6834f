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
No variant: paper layout with the project's own instructions, truncation that keeps the question. A subset outside
RewardBench's taxonomy needs its own entry in the prompts file, or `--config.scoring.fallback_instruction=True`.

The full filtered split (2985 pairs, 1.7M tokens with the paper layout) takes about 54 minutes for SmolLM2-135M
in fp32 on a 2-core CPU (one compiled program: packed rows, each pair's shared start once); bfloat16
(`--config.model.dtype=bfloat16`) took 22.5 minutes on CPUs with AMX. An ensemble of K instructions takes about
K times as long (experiments/rewardbench_ensemble.py compares the two).
"""

from configs import common

VARIANTS = ("paper", "chat", "ensemble", "demo", "local")


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  config = common.base("rewardbench", output_dir="runs/rewardbench")
  config.data = common.rewardbench_data()
  config.scoring = common.scoring()

  if v.paper:
    config.scoring.prompts_file = "paper:rewardbench_prompts"
    config.scoring.truncation = "paper"
    config.output_dir = "runs/rewardbench_paper"
  if v.chat:
    config.scoring.layout = "chat"
    config.output_dir = "runs/rewardbench_chat"
  if v.ensemble:
    config.scoring.prompts_file = "paper:candidate_prompts"
    config.output_dir = "runs/rewardbench_ensemble"
  if v.demo or v.local:
    config.data.max_per_subset = 2
    config.scoring.max_length = 512
    config.scoring.max_programs = 4
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
