"""RewardBench with a classifier reward model (a `*ForSequenceClassification` checkpoint): the authors' baseline.

  python -m ipo_jax.main --config configs/rewardbench_reward_model.py --config.model.path=<HF reward model dir> \
      --config.output_dir=runs/rb_reward_model
      the authors' procedure (their reward_model.py): each response read as "Instruction: {prompt}\\nResponse:
      {response}" with the tokenizer's special tokens, cut on the right at 1024 tokens, the head's logit as the
      reward, a pair correct when the chosen reward is strictly higher (ties wrong).
  python -m ipo_jax.main --config configs/rewardbench_reward_model.py:chat,demo --config.model.path=<dir>
      the pair as a user and an assistant turn of the reward model's chat template (how most hub reward models
      were trained); `demo` / `local`: 2 pairs per subset.

Variants (combine with commas): `chat`, `demo` / `local`. model.path is required (a local directory with
config.json, *.safetensors and the tokenizer, or `hf:owner/name`); a causal LM is refused. The authors' scripts
read RewardBench's raw split (`--config.data.split=raw`, from the hub); the default is the filtered split that
the IPO task scores, so the tables compare the same pairs. No classifier reward model ships with this project (a
random tiny one, 3 layers of width 64, scored 69 pairs in 8 s on a 2-core CPU: one forward pass per response).
experiments/rewardbench_baselines.py puts it next to IPO and the two judges.
"""

from configs import common

VARIANTS = ("chat", "demo", "local")


def reward_model() -> common.ConfigDict:
  """The reward model's reading and batching (ipo_jax/evals/reward_model.py)."""
  return common.ConfigDict({
      "format": "paper",  # paper: "Instruction: {prompt}\nResponse: {response}" | chat: the model's chat template
      "max_length": 1024,
      "truncation": "right",  # right: keep the first max_length tokens (the authors') | left: keep the last
      "label": 0,  # the head's logit read as the reward (0 for a scalar head)
      # Speed: tokens per batch (0: 4096 on CPU, 16384 on an accelerator), at most max_batch rows, at most
      # max_programs length buckets (compiled shapes), bucket lengths multiples of length_multiple.
      "batch_tokens": 0,
      "max_batch": 32,
      "max_programs": 4,
      "length_multiple": 32,
      "progress": True,
  })


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  config = common.base("rewardbench_reward_model", output_dir="runs/rewardbench_reward_model")
  config.model.path = ""  # required: a *ForSequenceClassification checkpoint
  config.data = common.rewardbench_data()
  config.reward_model = reward_model()
  if v.chat:
    config.reward_model.format = "chat"
    config.output_dir = "runs/rewardbench_reward_model_chat"
  if v.demo or v.local:
    config.data.max_per_subset = 2
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
