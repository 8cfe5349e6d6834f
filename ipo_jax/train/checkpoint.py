"""Training checkpoints with orbax: the train state (params or adapters, optimizer state, step, RNG) and a JSON
record of the data position, every `every` steps, keeping the last `keep`.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint directory that
exists is whole; an interrupted save leaves nothing that `latest_step` would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
    self.every = max(int(every), 1)
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
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings), and its meta.

    Without `abstract_state` the arrays come back as saved, in plain containers (for inspection)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
