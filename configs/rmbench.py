"""RM-Bench with the IPO classifier: P(Yes) of each of a row's six responses, RM-Bench's hard / normal / easy accuracy.

  python -m ipo_jax.main --config configs/rmbench.py:demo
      embedded SmolLM2-135M-Instruct, 2 rows per domain of THU-KEG/RM-Bench (60 responses, max_length 512).
  python -m ipo_jax.main --config configs/rmbench.py:paper --config.model.path=<gguf or HF dir> \
      --config.output_dir=runs/rmbench_paper
      the authors' procedure: their per-domain copies Ayush-Singh/RM-Bench-<domain>, their instructions and layout
      (the question after the response), right truncation at 1024 tokens.
  python -m ipo_jax.main --config configs/rmbench.py --config.data.path=<rows.jsonl|.json|.parquet> \
      --config.output_dir=<dir>
      a local file in either schema (RM-Bench's id/prompt/chosen[3]/rejected[3]/domain, or the per-domain
      prompt/chosen_1..3/rejected_1..3 with --config.data.domain=<domain> when it has no domain column).

Variants (combine with commas): `paper` (the authors' data copies and right truncation), `demo` (2 rows per domain,
max_length 512, the embedded model). No variant: RM-Bench itself (`THU-KEG/RM-Bench`, 1327 rows), the authors'
instructions and layout, truncation that keeps the question (the authors' right truncation cuts the question off a
long response, since it comes last). Data resolves through ipo_jax/sources.py: the cache, the hub, then the offline
copy ($IPO_JAX_DATA/rm_bench/...); none of RM-Bench is kept offline here, so without the hub pass a local file.

Measured on a 2-core AMD EPYC CPU shared with other jobs (load average 5-8), embedded model, fp32: a self-written
10-row file in RM-Bench's schema (`:demo`, 60 responses) takes 29 s end to end (model load, one compilation, 15 s of
scoring); 40 rows of RM-Bench's own chat, code and safety files (240 responses, 97k tokens, max_length 1024) took
384 s of scoring. At the idle rate of the RewardBench runs (about 520 tokens/s) all of RM-Bench (7962 responses,
about 3.2M tokens at that slice's 403 tokens per response) would take about 1.7 hours; that run was not made here.
"""

from configs import common

VARIANTS = ("paper", "demo")
PAPER_DATA = ",".join(f"Ayush-Singh/RM-Bench-{d}" for d in ("chat", "code", "math", "safety-response",
                                                             "safety-refuse"))


def data() -> common.ConfigDict:
  """RM-Bench rows: `THU-KEG/RM-Bench`, the authors' per-domain copies (comma-separated), or local files."""
  return common.ConfigDict({
      "path": "THU-KEG/RM-Bench",  # one or several comma-separated files, source names or hub ids
      "split": "train",
      "domain": "",  # the domain of per-domain rows without a domain column (chat, code, math, safety-refuse, ...)
      "domains": "",  # comma-separated selection; empty: all
      "max_per_domain": 0,  # 0: all
  })


def get_config(arg=None):
  v = common.parse_arg(arg, valid=VARIANTS)
  config = common.base("rmbench", output_dir="runs/rmbench")
  config.data = data()
  config.scoring = common.scoring()
  config.scoring.layout = "paper_rmbench"
  config.scoring.prompts_file = "paper:rmbench_prompts"

  if v.paper:
    config.data.path = PAPER_DATA
    config.scoring.truncation = "paper"
    config.output_dir = "runs/rmbench_paper"
  if v.demo:
    config.data.max_per_domain = 2
    config.scoring.max_length = 512
    config.scoring.max_programs = 4
    config.output_dir = config.output_dir.replace("runs/", "runs/demo_")
  return config
