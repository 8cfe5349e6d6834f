"""Training checkpoints with orbax: the train state (params or adapters, optimizer state, step, RNG) and a JSON
record of the data position, every `every` steps, keeping the last `keep`.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint directory that
exists is whole; an interrupted save leaves nothing that `latest_step` would pick up. Files damaged afterwards
(truncated, overwritten) are caught on restore: orbax fails to read them, or the state's checksum (`state_checksum`,
an exact bit-level sum stored in the meta at save time) differs. `restore_latest` then reports the step's path in one
line, moves it aside (to `<directory>.unreadable/`, never deleted) and falls back to the newest intact step.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKSUM_KEY = "state_checksum"


class CorruptCheckpoint(ValueError):
  """A checkpoint whose files do not read back as what was saved."""


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
    self.every = max(int(every), 1)
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved. The arrays are copied
    to the host before this returns (so they may be donated next); the files are written in the background."""
    if not force and step % self.every:
      return False
    meta = {**meta, CHECKSUM_KEY: checksum(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings), and its meta.

    Without `abstract_state` the arrays come back as saved, in plain containers (for inspection). A state whose
    checksum differs from the one saved with it is a CorruptCheckpoint."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    state, meta = restored["state"], dict(restored["meta"])
    want = meta.pop(CHECKSUM_KEY, None)
    if want is not None and checksum(state) != want:
      raise CorruptCheckpoint(f"the state's checksum {checksum(state)} differs from the saved {want}")
    return state, meta

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that reads back intact, or None when there is none. Each
    unreadable newer one is reported (`log`, one line with its path) and moved aside, so later saves of the run
    do not meet it."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # orbax: JSON, TensorStore, KeyError, ... on bad files
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        moved = self._set_aside(step)
        log(f"checkpoint {self.step_path(step)} is unreadable ({type(e).__name__}: {reason}); moved to {moved}, "
            "falling back to the previous checkpoint")
        continue
      return step, state, meta
    return None

  def _set_aside(self, step: int) -> str:
    """Moves step `step` to `<directory>.unreadable/<step>[-<time>]` (process 0) and rereads the step list."""
    target = os.path.join(self.directory + ".unreadable", str(step))
    if os.path.exists(target):
      target += f"-{int(time.time())}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_path(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (64-bit values as two words; narrower ones widened)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksum(leaves: list[jax.Array]) -> jax.Array:
  total = jnp.zeros((), jnp.uint32)
  for x in leaves:
    w = _words(x).reshape(-1)
    total += jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return total


def checksum(tree: Any) -> int:
  """An exact bit-level checksum of the arrays of `tree` (position-weighted word sums, modulo 2^32; independent of
  the containers and the order of the leaves, and of how the arrays are sharded)."""
  return int(_checksum([x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
