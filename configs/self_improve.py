"""The self-improvement loop: sample, self-label, DPO, evaluate (see ipo_jax/self_improve.py).

Local run (embedded SmolLM2-135M-Instruct, 8 AlpacaEval training prompts x 4 samples of 48 tokens, IPO labels,
full fine-tuning for 2 DPO steps, 8 held-out prompts, RewardBench on one pair per subset; a few minutes on 2 CPU
cores):

  python -m ipo_jax.main --config configs/self_improve.py:local --config.output_dir=runs/self_improve_local

Variants pick the labelling arm: `ipo` (default), `self_reward`, `reward_model` (set `reward_model.path` to a
`*ForSequenceClassification` directory), `random`; `local` and `paper` set the size, e.g.
`configs/self_improve.py:local,random`. The paper's sizes (4 samples at temperature 0.7, 256 new tokens,
DPO with beta 0.1, lr 5e-5, 1 epoch, cosine, warmup 0.1, max grad norm 0.3, LoRA r=256 alpha=128 on all linear
layers), on an accelerator:

  python -m ipo_jax.main --config configs/self_improve.py:paper --config.model.path=<model> \\
      --config.output_dir=runs/self_improve_paper

A run writes to output_dir: prompts.json (split and categories), initial_answers.jsonl, initial_eval.json, per
round round_<r>/{generations,labels,pairs,eval_answers}.jsonl, round_<r>/dpo/, round_<r>/policy/ (HF directory),
round_<r>/state.json; rounds.json, rounds.md and rounds.png (win rate, judge score, length, RewardBench per
round); with `sft.enabled`, sft/ (the SFT trainer's run, sft/policy/ the SFT'd model, round 0's policy). Rerunning
the same command resumes.
"""

from configs import common

ARMS_ONLY = ("ipo", "self_reward", "reward_model", "random")  # the labelling arms (tasks/self_improve.ARMS)


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, valid=("local", "paper") + ARMS_ONLY)
  c = common.base("self_improve", output_dir="runs/self_improve")
  c.rounds = 1  # round r + 1 samples, labels and starts from the policy of round r
  c.reference = "previous"  # DPO reference of each round: the policy it starts from

  # Prompts, split into train / held-out by a seeded rule; limits 0 = all.
  c.prompts = common.instructions()
  c.prompts.update(heldout_fraction=0.5, train_limit=0, heldout_limit=0)

  # Category of each prompt (picks the IPO question): self (the model answers one yes/no question per
  # category), column (a field of the data), fixed.
  c.category = dict(mode="self", column="category", fixed="chat")

  # N samples per prompt.
  c.sampling = common.sampling()

  # Labelling arm: ipo | self_reward | reward_model | random; pairs need best - worst > min_margin.
  c.label = dict(arm="ipo", min_margin=0.0)

  # The IPO reading (labels of the `ipo` arm, categories, the evaluation judge).
  c.scoring = common.scoring()
  c.scoring.progress = False

  # The 5-point judge of the `self_reward` arm, with its decoding.
  c.self_reward = common.judge()
  c.self_reward.sampling = common.judge_sampling()

  # The external reward model (arm `reward_model`, or a judge that is one): a *ForSequenceClassification HF
  # directory with its tokenizer; (prompt, response) as a chat of its template, cut to the last max_length tokens.
  c.reward_model = dict(path="", chat_template=True, max_length=1024, batch_size=8)

  # DPO (the trainer's sections, as configs/dpo.py); train.batch_size shrinks to fit few pairs.
  c.training = common.training()
  c.training.lora.alpha = 128.0
  c.training.optim.update(learning_rate=5e-5, max_grad_norm=0.3)
  c.training.checkpoint.keep = 1
  c.training.log.update(tensorboard=False, tqdm=False)

  # Optional first stage: SFT of the model on (instruction, response) examples (the trainer's sections, as
  # configs/sft.py); the SFT'd model is then round 0's policy. E.g. --config.sft.enabled=True
  # --config.sft.data.path=databricks/databricks-dolly-15k (or a local file with --config.sft.data.columns.*).
  c.sft = common.sft_training()
  c.sft.enabled = False
  c.sft.data.update(path="databricks/databricks-dolly-15k", split="train", name="")
  c.sft.log.update(tensorboard=False, tqdm=False)

  # Held-out evaluation: greedy answers vs the initial model's, judged by `judge` ("": the initial model; a path
  # loads another model or a reward model); the policy's RewardBench score as an IPO classifier on the pairs of
  # `rewardbench` (path "" skips it).
  c.evaluation = dict(max_new_tokens=256, judge="", rewardbench=common.rewardbench_data())

  if v.local:
    c.output_dir = "runs/self_improve_local"
    c.prompts.update(train_limit=8, heldout_limit=8)
    c.sampling.update(max_new_tokens=48, batch_size=8)
    c.training.data.update(max_length=256, max_prompt_length=128)
    c.training.train.update(batch_size=4, max_steps=2)
    c.training.eval.update(batch_size=4)
    c.evaluation.update(max_new_tokens=48)
    c.scoring.update(max_length=512)
    c.self_reward.sampling.update(max_new_tokens=32, temperature=0.1)
    c.evaluation.rewardbench.update(max_per_subset=1)
    c.sft.data.update(limit=64, max_length=256, max_prompt_length=128)
    c.sft.train.update(batch_size=4, max_steps=4)
    c.sft.eval.update(batch_size=4)
  if v.paper:
    c.training.lora.update(rank=256, alpha=128.0, dropout=0.05)
    c.training.train.update(remat=True)
  arms = [a for a in ARMS_ONLY if v[a]]
  if len(arms) > 1:
    raise ValueError(f"variant {arg!r} names several arms {arms}; choose one of {ARMS_ONLY}")
  if v.local and v.paper:
    raise ValueError(f"variant {arg!r}: choose one size, local or paper")
  if arms:
    c.label.arm = arms[0]
    c.output_dir += f"_{arms[0]}"
  return c
