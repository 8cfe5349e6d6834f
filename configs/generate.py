"""Sample responses to instructions into `generations.jsonl` (engine: ipo_jax/sample/engine.py).

  python -m ipo_jax.main --config configs/generate.py --config.output_dir=runs/generate
      4 samples x 256 tokens at temperature 0.7 for each of the 805 AlpacaEval instructions.
  python -m ipo_jax.main --config configs/generate.py:local --config.output_dir=runs/generate_local
      embedded SmolLM2-135M-Instruct, 8 AlpacaEval instructions x 2 samples x 32 tokens: about 20 s on a 2-core
      CPU (model load and compilation included).
  python -m ipo_jax.main --config configs/generate.py:greedy --config.model.path=<gguf or HF dir> \
      --config.data.path=<instructions.jsonl> --config.sampling.max_new_tokens=48 --config.output_dir=<dir>
      one greedy answer per instruction (temperature 0).

Variants (combine with commas): `greedy`, `local`, `mt_bench` (first turns of the 80 MT-Bench questions),
`hh_rlhf` (first human turns of the HH-RLHF harmless test transcripts), `raw` (no chat template, as the IPO
paper's code). Rerunning a command resumes: prompts whose samples are all in generations.jsonl are skipped; other
settings than the first run's are an error.

Throughput for SmolLM2-135M on a 2-core CPU: see experiments/bench/generation.py.
"""

from configs import common

VARIANTS = ("greedy", "local", "mt_bench", "hh_rlhf", "raw")


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  # Row (prompt i, sample s) samples with fold_in(fold_in(key(config.seed), i), s).
  config = common.base("generate", output_dir="runs/generate")

  # Instructions (AlpacaEval, MT-Bench and HH-RLHF resolve through ipo_jax/sources.py: cache, remote, offline copy).
  config.data = common.instructions()
  config.data.start = 0  # rows [start, start + limit) of the file; limit 0: to the end
  config.data.limit = 0
  config.data.system_prompt = ""  # a system turn before it (chat) or a first paragraph (raw)
  config.sampling = common.sampling()

  if v.greedy:
    config.sampling.temperature = 0.0
    config.sampling.num_samples = 1
    config.output_dir = "runs/generate_greedy"
  if v.mt_bench:
    config.data.update(path="fastchat:mt_bench_questions", split="", name="")
    config.output_dir = "runs/generate_mt_bench"
  if v.hh_rlhf:
    config.data.update(path="Anthropic/hh-rlhf", split="test", name="harmless-base")
    config.output_dir = "runs/generate_hh_rlhf"
  if v.raw:
    config.data.chat_template = False
    config.output_dir += "_raw"
  if v.local:
    config.data.limit = 8
    config.sampling.num_samples = min(config.sampling.num_samples, 2)
    config.sampling.max_new_tokens = 32
    config.sampling.batch_size = 8
    config.output_dir = config.output_dir.replace("runs/", "runs/local_")
  return config
