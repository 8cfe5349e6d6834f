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
  python -m ipo_jax.main --config configs/rewardbench.py:paper,deranged --config.scoring.derangement_seed=3 \
      --config.output_dir=runs/rb_deranged_3
      the paper's prompts dealt to other sections' subsets (a prompt ablation; all four ablations side by side on
      the same pairs: experiments/rewardbench_prompt_ablation.py).

Variants (combine with commas, e.g. `:ensemble,demo`): `paper` (the authors' prompts and truncation), `chat`
(the content as one user turn of the chat template), `ensemble` (10 candidate instructions per subset, mean
P(Yes), plus the per-candidate prompt search), `demo` / `local` (a small slice on the embedded model). Data and the paper's prompt files resolve through
ipo_jax/sources.py: the cache, then their real sources, then the offline copy ($IPO_JAX_DATA).
Prompt ablations (with `paper`: the authors' truncation): `same` (the authors' one generic instruction for every
subset, paper:rewardbench_prompts_same), `shuffled` (the authors' fixed table of mismatched instructions,
paper:rewardbench_prompts_shuffled), `deranged` (the paper's prompts with `paper`, each subset given the
instructions of a subset of another section under a seeded derangement of the four sections, ipo_jax/ipo/ablations.py;
its field `scoring.derangement_seed`, default 0, is part of the run's identity). On 5 pairs per subset (115 pairs,
max_length 1024) the four prompt sets took 11 minutes on a busy 2-core AMD EPYC CPU (4.5 CPU-minutes).
No variant: paper layout with the project's own instructions, truncation that keeps the question. A subset outside
RewardBench's taxonomy needs its own entry in the prompts file, or `--config.scoring.fallback_instruction=True`.

The full filtered split (2985 pairs, 1.7M tokens with the paper layout) takes about 54 minutes for SmolLM2-135M
in fp32 on a 2-core CPU (one compiled program: packed rows, each pair's shared start once); bfloat16
(`--config.model.dtype=bfloat16`) took 22.5 minutes on CPUs with AMX. An ensemble of K instructions takes about
K times as long (experiments/rewardbench_ensemble.py compares the two).
"""

from configs import common

VARIANTS = ("paper", "chat", "ensemble", "same", "shuffled", "deranged", "demo", "local")
PROMPT_FILES = {"ensemble": "paper:candidate_prompts", "same": "paper:rewardbench_prompts_same",
                "shuffled": "paper:rewardbench_prompts_shuffled"}


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  chosen = [name for name in PROMPT_FILES if v[name]]
  if len(chosen) > 1:
    raise ValueError(f"variants {' and '.join(chosen)} each choose the prompts file; pick one")
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
  for name in ("same", "shuffled"):
    if v[name]:
      config.scoring.prompts_file = PROMPT_FILES[name]
      config.output_dir += f"_{name}"
  if v.deranged:
    config.scoring.derangement_seed = 0  # ipo/prompts.py prompts_from_scoring; -1: off
    config.output_dir += "_deranged"
  if v.demo or v.local:
    config.data.max_per_subset = 2
    config.scoring.max_length = 512
    config.scoring.max_programs = 4
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
