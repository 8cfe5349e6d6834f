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


def test_an_unreadable_or_altered_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
  import shutil

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every=1, keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.close()
  # Step 3: truncated files (orbax fails to read them). Step 2: arrays that read back fine but are not the ones
  # saved (step 3's state under step 2's meta): only the checksum saved with them tells.
  shutil.copytree(tmp_path / "ckpt" / "3" / "state", tmp_path / "state3")
  for root, _, files in os.walk(tmp_path / "ckpt" / "3"):
    for name in files:
      os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)
  shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
  shutil.copytree(tmp_path / "state3", tmp_path / "ckpt" / "2" / "state")
  mesh = sharding.make_mesh()
  abstract = checkpoint.abstract_like(_state(1), jax.tree.map(lambda _: sharding.replicated(mesh), _state(1)))
  lines = []
  reopened = checkpoint.Checkpointer(tmp_path / "ckpt", every=1)
  step, state, meta = reopened.restore_latest(abstract, lines.append)
  assert step == 1 and meta == {"step": 1}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1))):
    np.testing.assert_array_equal(a, b)
  assert len(lines) == 2
  for line, bad in zip(lines, (3, 2)):
    assert line.startswith(f"checkpoint {tmp_path / 'ckpt' / str(bad)} is unreadable (")
    assert line.endswith(f"moved to {tmp_path / 'ckpt.unreadable' / str(bad)}, falling back to the previous checkpoint")
  assert "(CorruptCheckpoint: the state's checksum" in lines[1]
  assert reopened.all_steps() == [1] and sorted(os.listdir(tmp_path / "ckpt.unreadable")) == ["2", "3"]
  reopened.save(2, _state(2), {"step": 2})  # the run goes on saving where the unreadable steps were
  reopened.close()
  assert checkpoint.Checkpointer(tmp_path / "ckpt", every=1).restore(2, abstract)[1] == {"step": 2}
