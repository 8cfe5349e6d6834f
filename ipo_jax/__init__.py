"""ipo_jax: IPO — a language model as its own preference classifier — in JAX: scoring, generation, DPO."""

from ipo_jax.dpo import dpo_loss  # noqa: F401  (public API)
from ipo_jax.loading import load_model  # noqa: F401  (public API)
