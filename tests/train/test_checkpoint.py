"""Orbax checkpoints: round trip of a train state with optimizer state, interval and retention, atomicity."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipo_jax import sharding
from ipo_jax.train import checkpoint


def _state(step):
  params = {"w": jnp.arange(12.0).reshape(3, 4) + step, "layers": {"attn_norm": jnp.ones((2, 4)) * step}}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  opt_state = jax.tree.map(lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
  return {"step": jnp.asarray(step, jnp.int32), "rng": jax.random.key_data(jax.random.key(step)),
          "params": params, "opt_state": opt_state}


def test_round_trip_interval_and_retention(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=2, keep=2)
  saved = [step for step in range(1, 6) if ckpt.save(step, _state(step), {"step": step, "epoch": 0},
                                                      force=step == 5)]
  ckpt.wait()
  assert saved == [2, 4, 5]
  assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
  mesh = sharding.make_mesh()
  want = _state(5)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), want)
  state, meta = ckpt.restore(5, checkpoint.abstract_like(want, shardings))
  ckpt.close()
  assert meta == {"step": 5, "epoch": 0}
  assert jax.tree.structure(state) == jax.tree.structure(want)  # optax named tuples come back as such
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == sharding.replicated(mesh)


def test_an_interrupted_save_is_not_a_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1)
  ckpt.save(3, _state(3), {"step": 3})
  ckpt.close()
  # What a save killed half-way leaves: orbax's temporary directory, never renamed to "4".
  os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234567" / "state")
  reopened = checkpoint.Checkpointer(tmp_path / "ckpt", every=1)
  assert reopened.latest_step() == 3
  reopened.close()
