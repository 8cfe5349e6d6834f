"""The tasks `python -m ipo_jax.main` runs: each a short `run(config)` around the engines. No task imports another."""
