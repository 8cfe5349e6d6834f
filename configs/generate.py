"""Sample responses to instructions into `generations.jsonl` (see ipo_jax/generation.py).

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

import ml_collections

from ipo_jax import defaults

VARIANTS = ("greedy", "local", "mt_bench", "hh_rlhf", "raw")


def get_config(arg=None):
  variants = defaults.parse_variants(arg, VARIANTS)

  # Row (prompt i, sample s) samples with fold_in(fold_in(key(config.seed), i), s).
  config = defaults.base("generate", output_dir="runs/generate")

  # Instructions: a hub id (with split and configuration), a source name, or a local .jsonl/.json/.parquet;
  # AlpacaEval, MT-Bench and HH-RLHF resolve through ipo_jax/sources.py (cache, remote, offline copy).
  config.data = ml_collections.ConfigDict()
  config.data.path = "tatsu-lab/alpaca_eval"
  config.data.split = "eval"  # hub data sets only
  config.data.name = "alpaca_eval"  # hub data set configuration (or data directory)
  config.data.format = "auto"  # auto | instruction | mt_bench (first of `turns`) | hh_rlhf (first human turn)
  config.data.field = ""  # empty: the format's field (instruction, turns, chosen)
  config.data.start = 0  # rows [start, start + limit) of the file; limit 0: to the end
  config.data.limit = 0
  config.data.skip_invalid = False  # skip (and count) rows without a prompt instead of failing
  config.data.chat_template = True  # one user turn in the model's chat template; False: the raw instruction
  config.data.system_prompt = ""  # a system turn before it (chat) or a first paragraph (raw)

  # Sampling: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off (applied in this order).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.num_samples = 4  # per instruction; they share one prefilled prompt
  config.sampling.max_new_tokens = 256
  config.sampling.temperature = 0.7
  config.sampling.top_k = 0
  config.sampling.top_p = 1.0
  config.sampling.min_p = 0.0
  config.sampling.stop_token_ids = ()  # besides EOS and the chat template's end-of-turn
  # Speed: instructions per compiled batch (rows = batch_size x num_samples); longer prompts keep their end.
  config.sampling.batch_size = 16
  config.sampling.max_prompt_tokens = 1024

  if "greedy" in variants:
    config.sampling.temperature = 0.0
    config.sampling.num_samples = 1
    config.output_dir = "runs/generate_greedy"
  if "mt_bench" in variants:
    config.data.update(path="fastchat:mt_bench_questions", split="", name="")
    config.output_dir = "runs/generate_mt_bench"
  if "hh_rlhf" in variants:
    config.data.update(path="Anthropic/hh-rlhf", split="test", name="harmless-base")
    config.output_dir = "runs/generate_hh_rlhf"
  if "raw" in variants:
    config.data.chat_template = False
    config.output_dir += "_raw"
  if "local" in variants:
    config.data.limit = 8
    config.sampling.num_samples = min(config.sampling.num_samples, 2)
    config.sampling.max_new_tokens = 32
    config.sampling.batch_size = 8
    config.output_dir = config.output_dir.replace("runs/", "runs/local_")
  return config
