"""RewardBench with the pairwise judge: the model reads both responses and names the better one, in both orders.

  python -m ipo_jax.main --config configs/rewardbench_pairwise.py:demo
      embedded SmolLM2-135M-Instruct, 1 pair per subset of allenai/reward-bench (filtered) (23 pairs, 46 verdicts
      of at most 48 tokens). For scale: 69 pairs (3 per subset, prompts cut at 1024 tokens) took 6.5 minutes on a
      busy 2-core AMD EPYC CPU (experiments/rewardbench_baselines.py). SmolLM2-135M writes the verdict line in
      about one judgement in six, and then always names Response 1.
  python -m ipo_jax.main --config configs/rewardbench_pairwise.py:paper --config.model.path=<gguf or HF dir> \
      --config.output_dir=runs/rb_pairwise_paper
      the authors' procedure (their binary_gpt.py): their prompt (source paper:pairwise_judge_prompt) as one user
      turn, temperature 0.1, at most 200 new tokens, their verdict pattern; the chosen response shown first.

Variants (combine with commas): `paper` (temperature 0.1 as the authors; default: greedy), `raw` (the prompt as
raw text, not a chat turn), `lenient` (also read "**Better response:** [Response 1]"; default: the authors'
pattern), `demo` / `local`. Every run judges each pair in both orders and reports the chosen-first order (the
authors'), the swapped order, both together and how often they agree, with unparsable verdicts scored 0 (the
authors') and 0.5 (RewardBench's generative scoring); the headline `correct` is the authors' reading. A rerun
resumes from scores.jsonl; the parser can change without judging again.

Cost: two generations per pair whose prompts hold both responses (up to 2048 tokens): the full filtered split is
5970 generations, many hours for SmolLM2-135M on a 2-core CPU; use an accelerator.
"""

from configs import common

VARIANTS = ("paper", "raw", "lenient", "demo", "local")


def pairwise() -> common.ConfigDict:
  """The pairwise judge (ipo_jax/evals/pairwise.py); its decoding is the config's sampling section."""
  return common.ConfigDict({
      "prompt_file": "paper:pairwise_judge_prompt",  # {instruction}, {response1}, {response2}; "": the project's
      "chat_template": True,  # the prompt as one user turn of the chat template; False: raw text
      "max_prompt_tokens": 2048,  # longer prompts lose the ends of the responses (the longer first)
      "parser": "paper",  # paper: `Better response:\s*(Response\s*[12])` | lenient: also markdown and brackets
      "batch_size": 8,  # prompts per compiled batch
      "progress": True,
  })


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  config = common.base("rewardbench_pairwise", output_dir="runs/rewardbench_pairwise")
  config.data = common.rewardbench_data()
  config.pairwise = pairwise()
  # The verdicts' decoding (its batch_size and max_prompt_tokens are unused: pairwise.* set those).
  config.sampling = common.sampling(num_samples=1, max_new_tokens=200, temperature=0.0, batch_size=8)
  if v.paper:
    config.sampling.temperature = 0.1
    config.output_dir = "runs/rewardbench_pairwise_paper"
  if v.raw:
    config.pairwise.chat_template = False
  if v.lenient:
    config.pairwise.parser = "lenient"
  if v.demo or v.local:
    config.data.max_per_subset = 1
    config.sampling.max_new_tokens = 48
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
