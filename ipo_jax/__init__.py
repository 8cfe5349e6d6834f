"""ipo_jax: IPO — a language model as its own preference classifier — in JAX: scoring, generation, DPO."""

import os

# transformers serves tokenizers, configs and chat templates here (the models are ours): its advice that PyTorch
# is missing does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from ipo_jax.aot.targets import quiet_plugins  # noqa: E402

# libtpu (installed for ahead-of-time compiles) and the CUDA plugin print start-up errors on hosts without their
# hardware; this names a local TPU slice for them there (never on a TPU or GPU host, never over the user's values).
quiet_plugins()

from ipo_jax.train.loss import dpo_loss  # noqa: E402,F401  (public API)
from ipo_jax.model.loading import load_model  # noqa: E402,F401  (public API)
