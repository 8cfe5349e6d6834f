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
round). Rerunning the same command resumes.
"""

import ml_collections

from ipo_jax import defaults

ARMS_ONLY = ("ipo", "self_reward", "reward_model", "random")  # the labelling arms (self_improve.ARMS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = defaults.base("self_improve", output_dir="runs/self_improve")
  c.rounds = 1  # round r + 1 samples, labels and starts from the policy of round r
  c.reference = "previous"  # DPO reference of each round: the policy it starts from

  # Prompts (generation.load_instructions fields), split into train / held-out by a seeded rule; limits 0 = all.
  c.prompts = dict(path="tatsu-lab/alpaca_eval", split="eval", name="alpaca_eval", format="auto", field="",
                   skip_invalid=False, chat_template=True, heldout_fraction=0.5, train_limit=0, heldout_limit=0)

  # Category of each prompt (picks the IPO question): self (the model answers one yes/no question per
  # category), column (a field of the data), fixed.
  c.category = dict(mode="self", column="category", fixed="chat")

  # N samples per prompt.
  c.sampling = dict(num_samples=4, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=256, batch_size=16)

  # Labelling arm: ipo | self_reward | reward_model | random; pairs need best - worst > min_margin.
  c.label = dict(arm="ipo", min_margin=0.0)

  # The IPO reading (labels of the `ipo` arm, categories, the evaluation judge); fields as in configs/rewardbench.py.
  c.scoring = dict(layout="paper", template="", prompts_file="", yes="", no="", max_length=1024,
                   truncation="keep_question", batch_tokens=0, max_batch=64, max_programs=8, progress=False)

  # The 5-point judge of the `self_reward` arm (fields as in configs/rewardbench_self_reward.py).
  c.self_reward = dict(prompt_file="", chat_template=True, max_prompt_tokens=2048, truncation="keep_question",
                       unparsable_score=0.0, batch_size=16, sampling=dict(max_new_tokens=200, temperature=0.1))

  # The external reward model (arm `reward_model`, or a judge that is one): a *ForSequenceClassification HF
  # directory with its tokenizer; (prompt, response) as a chat of its template, cut to the last max_length tokens.
  c.reward_model = dict(path="", chat_template=True, max_length=1024, batch_size=8)

  # DPO (the trainer's sections, see configs/dpo.py); train.batch_size shrinks to fit few pairs.
  c.training = dict(
      data=dict(chat_template=True, skip_invalid=False, max_length=1024, max_prompt_length=512),
      dpo=dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference="precomputed"),
      lora=dict(rank=0, alpha=128.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down")),
      optim=dict(learning_rate=5e-5, schedule="cosine", warmup_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                 eps=1e-8, max_grad_norm=0.3),
      train=dict(batch_size=8, grad_accum=1, epochs=1, max_steps=0, stop_after_steps=0, compute_dtype="auto",
                 remat=False, vocab_chunk=8192),
      eval=dict(every=0, batch_size=8),
      checkpoint=dict(every=100, keep=1),
      log=dict(every=1, tensorboard=False, tqdm=False, plot=True),
      export=dict(dtype="float32"),
  )

  # Held-out evaluation: greedy answers vs the initial model's, judged by `judge` ("": the initial model; a path
  # loads another model or a reward model); the policy's RewardBench score as an IPO classifier on the pairs of
  # `rewardbench` (fields of configs/rewardbench.py's data section; path "" skips it).
  c.evaluation = dict(max_new_tokens=256, judge="", rewardbench=dict(
      path="allenai/reward-bench", split="filtered", subsets="", max_per_subset=0,
      skip_invalid=False, columns={}))

  size, _, arm = (arg or "").partition(",")
  if size in ARMS_ONLY:
    size, arm = "", size
  if size == "local":
    c.output_dir = "runs/self_improve_local"
    c.prompts.update(train_limit=8, heldout_limit=8)
    c.sampling.update(max_new_tokens=48, batch_size=8)
    c.training.data.update(max_length=256, max_prompt_length=128)
    c.training.train.update(batch_size=4, max_steps=2)
    c.training.eval.update(batch_size=4)
    c.evaluation.update(max_new_tokens=48)
    c.scoring.update(max_length=512)
    c.self_reward.update(sampling=dict(max_new_tokens=32, temperature=0.1))
    c.evaluation.rewardbench.update(max_per_subset=1)
  elif size == "paper":
    c.training.lora.update(rank=256, alpha=128.0, dropout=0.05)
    c.training.train.update(remat=True)
  elif size:
    raise ValueError(f"unknown variant {arg!r}: use [local|paper][,ipo|self_reward|reward_model|random]")
  if arm:
    if arm not in ARMS_ONLY:
      raise ValueError(f"unknown arm {arm!r} in variant {arg!r}: use one of {ARMS_ONLY}")
    c.label.arm = arm
    c.output_dir += f"_{arm}"
  return c

