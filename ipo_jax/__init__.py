"""ipo_jax: IPO — a language model as its own preference classifier — in JAX: scoring, generation, DPO."""

from ipo_jax.train.loss import dpo_loss  # noqa: F401  (public API)
from ipo_jax.model.loading import load_model  # noqa: F401  (public API)
