"""While-loop trip counts from an optimized HLO module: XLA's `known_trip_count` (GPU), else the condition
`counter < N` (or `counter < N and ...`, an upper bound), the counter's initial constant and the body's
`counter + step` (TPU), followed through copies, bitcasts and fusions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from ipo_jax.aot.hlo_module import Computation, Instruction, Module


def trip_count(comp: Computation, loop: Instruction, module: Module) -> tuple[int | None, str]:
  known = loop.attr(r'"known_trip_count":\{"n":"(\d+)"')
  if known is not None:
    return int(known), "known_trip_count"
  cond = module.computations.get(loop.attr(r"condition=%([\w.\-]+)") or "")
  body = module.computations.get(loop.attr(r"body=%([\w.\-]+)") or "")
  for frame, compare, alone in _compares(cond, module) if cond and body else []:
    try:
      index, limit, direction = _condition(frame, compare)
      start = _constant((comp, None), _tuple_operand(comp, loop.operands[0], index))
      step = _step(body, index, module)
    except (LookupError, TypeError, ValueError, StopIteration, AttributeError):
      continue
    span = limit - start + (1 if direction == "LE" else 0)
    # `counter < N and more`: N - start is the most the loop can run (a decode loop that stops when all rows end)
    return max(0, -(-span // step)), "condition" if alone else "condition bound"
  return None, "unknown"


# A frame: a computation, and where it is fused (the caller and the fusion instruction) so that its parameters can be
# followed out to the fusion's operands.
Frame = tuple["Computation", "tuple[Computation, Instruction] | None"]


def _fused_frame(frame: Frame, inst: Instruction, module: Module) -> tuple[Frame, Instruction]:
  """Inside a fusion: the fused computation's frame and its root (anything else: unchanged)."""
  if inst.opcode != "fusion":
    return frame, inst
  fused = module.computations[inst.attr(r"calls=%([\w.\-]+)")]
  return (fused, (frame[0], inst)), fused.root


def _compares(cond: Computation, module: Module) -> list[tuple[Frame, Instruction, bool]]:
  """The counter comparisons a loop condition could be: its root, or the operands of a root `and` (also inside a
  fusion); with whether the comparison is the whole condition."""
  frame, root = _fused_frame((cond, None), cond.root, module)
  if root.opcode == "and":
    found = [_resolve(frame, name) for name in root.operands]
    return [(f, inst, False) for f, inst in found if inst.opcode == "compare"]
  return [(frame, root, True)]


def _resolve(frame: Frame, name: str) -> tuple[Frame, Instruction]:
  """Follow copies, bitcasts and converts, and a fused computation's parameters out to the fusion's operands."""
  comp, caller = frame
  inst = comp.instructions[name]
  while inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
    inst = comp.instructions[inst.operands[0]]
  if inst.opcode == "parameter" and caller is not None:
    return _resolve((caller[0], None), caller[1].operands[int(inst.args.strip())])
  return (comp, caller), inst


def _constant(frame: Frame, name: str) -> int:
  _, inst = _resolve(frame, name)
  if inst.opcode != "constant":
    raise ValueError(name)
  return int(inst.args.strip())


def _gte_index(frame: Frame, name: str) -> int:
  _, inst = _resolve(frame, name)
  if inst.opcode != "get-tuple-element":
    raise ValueError(name)
  return int(inst.attr(r"index=(\d+)"))


def _tuple_operand(comp: Computation, name: str, index: int) -> str:
  _, inst = _resolve((comp, None), name)
  if inst.opcode != "tuple":
    raise ValueError(name)
  return inst.operands[index]


def _condition(frame: Frame, compare: Instruction) -> tuple[int, int, str]:
  """(counter tuple index, limit, LT|LE) of a comparison `counter < limit` (either operand order)."""
  if compare.opcode != "compare":
    raise ValueError(compare.name)
  direction = compare.attr(r"direction=(\w+)")
  lhs, rhs = compare.operands
  flip = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}
  try:
    index, limit = _gte_index(frame, lhs), _constant(frame, rhs)
  except ValueError:
    index, limit, direction = _gte_index(frame, rhs), _constant(frame, lhs), flip.get(direction, direction)
  if direction not in ("LT", "LE"):
    raise ValueError(direction)
  return index, limit, direction


def _step(body: Computation, index: int, module: Module) -> int:
  """The constant the body adds to the counter at tuple `index`."""
  frame, update = _resolve((body, None), _tuple_operand(body, body.root.name, index))
  frame, update = _fused_frame(frame, update, module)
  if update.opcode != "add":
    raise ValueError(update.name)
  for a, b in (update.operands, update.operands[::-1]):
    try:
      if _gte_index(frame, a) == index and _constant(frame, b) > 0:
        return _constant(frame, b)
    except ValueError:
      continue
  raise ValueError(update.name)
