"""The optimizer's pieces: global-norm clipping against optax's, the weights' finiteness check."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ipo_jax.train import optimizer, steps


def _grads(scale):
  keys = jax.random.split(jax.random.key(0), 3)
  return {"embed": scale * jax.random.normal(keys[0], (7, 5)),
          "layers": {"q": scale * jax.random.normal(keys[1], (2, 5, 5)), "norm": scale * jax.random.normal(keys[2], (5,))}}


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["below", "above"])
def test_clipping_equals_optax_and_keeps_its_state(scale):
  grads = _grads(scale)
  ours, theirs = optimizer.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  state = ours.init(grads)
  assert jax.tree.structure(state) == jax.tree.structure(theirs.init(grads))  # checkpoints stay compatible
  got, _ = jax.jit(ours.update)(grads, state)
  want, _ = theirs.update(grads, theirs.init(grads))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  norm = float(optax.global_norm(got))
  assert norm == pytest.approx(min(float(optax.global_norm(grads)), 1.0), rel=1e-6)


def test_all_finite_flags_any_nan_or_infinity_in_any_leaf():
  tree = _grads(1.0)
  assert float(jax.jit(steps.all_finite)(tree)) == 1.0
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    broken = jax.tree.map(lambda x: x, tree)
    broken["layers"]["q"] = tree["layers"]["q"].at[1, 2, 3].set(bad)
    assert float(jax.jit(steps.all_finite)(broken)) == 0.0
  assert float(steps.all_finite({"w": jnp.full((3,), 3e38, jnp.float32)})) == 1.0  # large but finite
  assert float(steps.all_finite({"w": jnp.ones((4,), jnp.bfloat16).at[0].set(jnp.nan)})) == 0.0
  assert float(steps.all_finite({"empty": jnp.zeros((0, 4)), "w": jnp.ones((3,))})) == 1.0  # as isfinite's all()
