"""Inspect a checkpoint: architecture, parameter count, dtype, mesh, sharding and the top-5 next tokens.

  python -m ipo_jax.main --config configs/model_info.py
  python -m ipo_jax.main --config configs/model_info.py --config.model.path=/path/to/hf_dir \
      --config.info.chat_template=False --config.info.prompt="The capital of France is"

About 15 s on a 2-core CPU for the embedded SmolLM2-135M-Instruct (most of it GGUF dequantisation and compile).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  config = common.base("model_info")

  # What to ask the model.
  config.info = ml_collections.ConfigDict()
  config.info.prompt = "Is Paris the capital of France? Answer Yes or No."
  config.info.chat_template = True
  config.info.top_k = 5
  return config
