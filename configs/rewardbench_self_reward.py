"""RewardBench with the self-rewarding judge: the model grades each response on an additive 5-point rubric.

  python -m ipo_jax.main --config configs/rewardbench_self_reward.py:demo \
      --config.compare_with=runs/demo_rewardbench
      embedded SmolLM2-135M-Instruct, 1 pair per subset of allenai/reward-bench (filtered) (23 pairs, 46 judgements of up to 200
      tokens): about 16 min on a 2-core CPU (the longest texts fill the 2048-token bucket); report.md puts its
      table next to the IPO run's (configs/rewardbench.py:demo) on the pairs both scored. SmolLM2-135M rarely
      writes a score at all (about 90% of its judgements are unparsable).
  python -m ipo_jax.main --config configs/rewardbench_self_reward.py:paper --config.model.path=<gguf or HF dir> \
      --config.output_dir=runs/rb_self_reward_paper
      the paper's procedure: its trimmed rubric (source paper:self_reward_judge_prompt) as raw text, right
      truncation at 2048 tokens, temperature 0.1, 200 new tokens, unparsable judgements scored 0.

Variants (combine with commas): `paper`, `generative` (unparsable judgements score 0.5, as RewardBench's
generative scoring), `demo` / `local` (a small slice on the embedded model). No variant: the project's rubric
in the chat template, truncation that keeps the rubric and the question, unparsable = 0. Rerunning a command
resumes from scores.jsonl. Ties (equal grades, frequent on a 5-point scale) count as wrong and are reported.

The full filtered split (2985 pairs = 5970 judgements of up to 200 tokens) takes many hours for SmolLM2-135M on a
2-core CPU; use an accelerator.
"""

from configs import common

VARIANTS = ("paper", "generative", "demo", "local")


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  config = common.base("rewardbench_self_reward", output_dir="runs/rewardbench_self_reward")
  config.compare_with = ""  # comma-separated output dirs of other RewardBench runs, shown side by side in report.md
  config.data = common.rewardbench_data()
  config.judge = common.judge()
  config.sampling = common.judge_sampling()  # decoding of the judgement (the paper: temperature 0.1, 200 tokens)

  if v.paper:
    config.judge.prompt_file = "paper:self_reward_judge_prompt"
    config.judge.chat_template = False
    config.judge.truncation = "paper"
    config.output_dir = "runs/rewardbench_self_reward_paper"
  if v.generative:
    config.judge.unparsable_score = 0.5
  if v.demo or v.local:
    config.data.max_per_subset = 1
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
