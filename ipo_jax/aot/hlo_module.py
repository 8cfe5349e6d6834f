"""Reading an optimized HLO module's text (`compiled.as_text()`): computations, instructions, the call graph, and
per-device counts (matmul FLOPs, HBM traffic, the TPU compiler's estimated cycles) multiplied by how often each
computation runs.

XLA's own `cost_analysis()` counts a while body once (a 32-layer `lax.scan` shows 1/32 of its FLOPs); here every
computation carries the product of the trip counts (ipo_jax/aot/loops.py) of the loops around it; a loop whose count
cannot be read is counted once and named in `Module.unknown_loops`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

from ipo_jax.aot.loops import trip_count

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64,
         "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\](\{[^}]*\})?")
_INST = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_CONTROL_OPS = {"call", "async-start", "conditional"}  # called computations run as whole programs (their own ops)


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  memory_space: int  # 0: HBM; TPU layouts mark on-chip memories S(1) (VMEM), S(2), ...

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> int:
    bits = _BITS.get(self.dtype, 8 if self.dtype.startswith("f8") else 32)
    return (self.elements * bits + 7) // 8


@dataclasses.dataclass
class Instruction:
  name: str
  shapes: list[Array]  # one per array of the (possibly tuple) result
  opcode: str
  operands: list[str]
  args: str  # the text between the opcode's parentheses (a constant's literal)
  attrs: str  # everything after the operand list
  root: bool

  @property
  def bytes(self) -> int:
    return sum(a.bytes for a in self.shapes)

  def attr(self, pattern: str) -> str | None:
    m = re.search(pattern, self.attrs)
    return m.group(1) if m else None


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: dict[str, Instruction]

  @property
  def root(self) -> Instruction:
    return next(i for i in self.instructions.values() if i.root)


@dataclasses.dataclass
class Module:
  """A parsed module: `multiplier[c]` is how many times computation c runs per execution; `fused` the computations
  inside fusions (their instructions are not separate kernels)."""
  computations: dict[str, Computation]
  num_partitions: int
  multiplier: dict[str, float]
  fused: set[str]
  loops: list[tuple[str, int | None, str]]  # (while instruction, trip count, how it was read)

  @property
  def unknown_loops(self) -> list[str]:
    return [name for name, trip, _ in self.loops if trip is None]

  def instructions(self) -> Iterator[tuple[Computation, Instruction, float]]:
    """Every instruction of every computation that runs, with how many times it runs."""
    for comp in self.computations.values():
      mult = self.multiplier.get(comp.name, 0.0)
      if mult:
        for inst in comp.instructions.values():
          yield comp, inst, mult

  def shape_of(self, comp: Computation, name: str) -> list[Array]:
    inst = comp.instructions.get(name)
    return inst.shapes if inst else []


def parse_arrays(text: str) -> list[Array]:
  out = []
  for dtype, dims, layout in _ARRAY.findall(text):
    if dtype not in _BITS and not dtype.startswith("f8"):
      continue
    sizes = tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append(Array(dtype, sizes, int(space.group(1)) if space else 0))
  return out


def balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
  closing = set(pairs.values())
  for i in range(start, len(text)):
    if text[i] in pairs:
      depth += 1
    elif text[i] in closing:
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _instruction(line: str) -> Instruction | None:
  m = _INST.match(line)
  if not m:
    return None
  rest = m.group(3)
  end = balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape_text, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = balanced(rest, op.end() - 1)
  args = rest[op.end():close - 1]
  return Instruction(m.group(2), parse_arrays(shape_text), op.group(1), re.findall(r"%([\w.\-]+)", args), args,
                     rest[close:], bool(m.group(1)))


def _depth(text: str) -> int:
  """Open brackets minus closed ones outside double-quoted strings."""
  if '"' not in text:
    return sum(map(text.count, "({[")) - sum(map(text.count, ")}]"))
  depth, quoted, escaped = 0, False, False
  for ch in text:
    if quoted:
      quoted, escaped = (not (ch == '"' and not escaped)), (ch == "\\" and not escaped)
    elif ch == '"':
      quoted = True
    elif ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
  return depth


def _logical_lines(text: str) -> Iterator[str]:
  """The module's lines with an instruction whose attributes span several lines (a Pallas kernel's metadata) joined
  into one."""
  lines = iter(text.splitlines())
  for line in lines:
    if _INST.match(line):
      depth = _depth(line)
      while depth > 0:
        more = next(lines, None)
        if more is None:
          break
        line, depth = line + " " + more, depth + _depth(more)
    yield line


def parse_module(text: str) -> Module:
  comps: dict[str, Computation] = {}
  current = None
  for line in _logical_lines(text):
    header = _HEADER.match(line)
    if header:
      current = Computation(header.group(2), bool(header.group(1)), {})
      comps[current.name] = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      inst = _instruction(line)
      if inst:
        current.instructions[inst.name] = inst
  partitions = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
  module = Module(comps, int(partitions.group(1)) if partitions else 1, {}, set(), [])
  _propagate(module)
  return module


def _callees(comp: Computation, inst: Instruction, module: Module) -> list[tuple[str, float, bool]]:
  """(callee, runs per run of inst, fused?) of one instruction."""
  if inst.opcode == "while":
    trip, how = trip_count(comp, inst, module)
    module.loops.append((inst.name, trip, how))
    runs = float(trip if trip is not None else 1)
    return [(c, runs, False) for c in (inst.attr(r"body=%([\w.\-]+)"), inst.attr(r"condition=%([\w.\-]+)")) if c]
  if inst.opcode == "fusion":
    return [(c, 1.0, True) for c in re.findall(r"calls=%([\w.\-]+)", inst.attrs)]
  if inst.opcode in _CONTROL_OPS:
    names = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", inst.attrs)
    branches = inst.attr(r"branch_computations=\{([^}]*)\}")
    names += re.findall(r"%([\w.\-]+)", branches or "")
    return [(c, 1.0, False) for c in names]
  return []


def _propagate(module: Module) -> None:
  """Multipliers over the call graph (a DAG): callers before callees, each call adding its runs."""
  edges = {name: [] for name in module.computations}
  for comp in module.computations.values():
    for inst in comp.instructions.values():
      edges[comp.name] += [e for e in _callees(comp, inst, module) if e[0] in module.computations]
  order, seen = [], set()

  def visit(name: str) -> None:
    seen.add(name)
    for callee, _, _ in edges[name]:
      if callee not in seen:
        visit(callee)
    order.append(name)

  entries = [c.name for c in module.computations.values() if c.entry]
  for name in entries:
    visit(name)
  module.multiplier = {name: 0.0 for name in module.computations}
  for name in entries:
    module.multiplier[name] = 1.0
  for name in reversed(order):
    for callee, runs, fused in edges[name]:
      module.multiplier[callee] += module.multiplier[name] * runs
      if fused or name in module.fused:
        module.fused.add(callee)


# ---- counts -------------------------------------------------------------------------------------------------------

def instruction_flops(module: Module, comp: Computation, inst: Instruction) -> float:
  """Multiply-add FLOPs (2 per MAC) of a dot, convolution, cuBLAS gemm or a kernel that states its cost."""
  if inst.opcode == "dot":
    dims = inst.attr(r"lhs_contracting_dims=\{([\d,]*)\}")
    return 2.0 * inst.shapes[0].elements * _contracted(module, comp, inst, dims)
  if inst.opcode == "convolution":
    return _convolution_flops(module, comp, inst)
  if inst.opcode == "custom-call":
    kernel = custom_kernel_cost(module, comp, inst)
    if kernel is not None:
      return kernel[0]
    if "gemm" in (inst.attr(r'custom_call_target="([^"]+)"') or "") or "matmul" in inst.attrs[:200]:
      dims = inst.attr(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
      return 2.0 * inst.shapes[0].elements * _contracted(module, comp, inst, (dims or "").replace('"', ""))
  return 0.0


def custom_kernel_cost(module: Module, comp: Computation, inst: Instruction) -> tuple[float, float] | None:
  """(FLOPs, HBM bytes) of a custom kernel that states its cost (`cost_estimate`) or is a fused attention kernel
  (`attention_kernel_cost`); None for any other."""
  flop = inst.attr(r'"cost_estimate":\{[^}]*?"flops":"(\d+)"')
  if flop is not None:
    return float(flop), float(inst.attr(r'"bytes_accessed":"(\d+)"') or 0)
  return attention_kernel_cost(module, comp, inst)


# FLOPs of a fused attention kernel per (query element x attended key): forward 2 GEMMs (scores, values); splash's
# backward kernels recompute the scores: dq 3 GEMMs, dk/dv 4; cuDNN's one backward kernel 5.
_ATTENTION_GEMMS = {"fwd": 2, "dq": 3, "dkv": 4, "cudnn": 2, "cudnn_bwd": 5}


def attention_kernel_cost(module: Module, comp: Computation, inst: Instruction) -> tuple[float, float] | None:
  """(FLOPs, HBM bytes) of a fused attention kernel, which states no cost: splash attention (a Pallas TPU kernel,
  recognised by its op name) or cuDNN's (`__cudnn$fmha...`). Self-attention over the query length S, causal:
  splash computes the blocks on and below the diagonal (n blocks: (n + 1) / 2n of the pairs), cuDNN (S + 1) / 2S;
  a sliding window's skipped blocks are not subtracted (an upper bound). None for any other instruction."""
  target = inst.attr(r'custom_call_target="([^"]+)"') or ""
  op_name = inst.attr(r'op_name="([^"]+)"') or ""
  operands = [a for name in inst.operands for a in module.shape_of(comp, name)]
  floats = [a for a in operands if a.dtype.startswith(("f", "bf"))]
  if target.startswith("__cudnn$fmha") and operands:
    scores = inst.attr(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]')  # [B, H, T, S]
    if scores is None:
      return None
    dims = [int(d) for d in re.findall(r"\d+", scores)]
    causal = "CAUSAL" in (inst.attr(r'"mask_type":\s*"(\w+)"') or "")
    length = dims[-1]
    pairs = math.prod(dims) * operands[0].dims[-1] * ((length + 1) / (2 * length) if causal else 1.0)
    gemms = _ATTENTION_GEMMS["cudnn_bwd" if "Backward" in target else "cudnn"]
  elif target == "tpu_custom_call" and "splash" in op_name and floats:
    q = max(floats, key=lambda a: a.elements)  # [..., H, S, D] (a backward kernel's dO has its shape)
    length = q.dims[-2]
    block = int(inst.attr(r'block_q\\?": (\d+)') or length)
    n = max(1, length // block)
    pairs = q.elements * length * (n + 1) / (2 * n)
    role = re.search(r"_(fwd|dq|dkv)_", inst.name + " " + op_name)
    gemms = _ATTENTION_GEMMS[role.group(1) if role else "fwd"]
  else:
    return None
  return 2.0 * gemms * pairs, float(sum(a.bytes for a in operands) + inst.bytes)


def _convolution_flops(module: Module, comp: Computation, inst: Instruction) -> float:
  """2 x output elements x input features x the window positions that fall on the input, not its padding: the
  partitioner writes a windowed einsum's dot over two shards as a convolution whose spatial dim (the shards) is padded
  by one on each side, so half of its window positions multiply zeros."""
  lhs_labels, kernel_labels, out_labels = re.split(r"_|->", inst.attr(r"dim_labels=(\w+_\w+->\w+)") or "__")
  lhs, kernel = (module.shape_of(comp, name)[0] for name in inst.operands[:2])
  out = inst.shapes[0]
  window = _window(inst.attr(r"window=\{([^}]*)\}") or "")
  per_output = float(kernel.dims[kernel_labels.index("i")])
  for d in sorted(c for c in kernel_labels if c.isdigit()):
    size, n, o = kernel.dims[kernel_labels.index(d)], lhs.dims[lhs_labels.index(d)], out.dims[out_labels.index(d)]
    w = window[int(d)] if int(d) < len(window) else {}
    lo, stride = w.get("pad", (0, 0))[0], w.get("stride", 1)
    lhs_dilate, rhs_dilate = w.get("lhs_dilate", 1), w.get("rhs_dilate", 1)
    hits = 0
    for position in range(o):
      for tap in range(size):
        i = position * stride + tap * rhs_dilate - lo  # in the (dilated) input
        hits += 0 <= i < (n - 1) * lhs_dilate + 1 and i % lhs_dilate == 0
    per_output *= hits / max(o, 1)
  return 2.0 * out.elements * per_output


def _window(text: str) -> list[dict[str, Any]]:
  """`size=2x3 pad=1_1x0_0 stride=1x2 ...` -> one dict per spatial dim ({"size": 2, "pad": (1, 1), ...})."""
  dims: list[dict[str, Any]] = []
  for key, value in re.findall(r"(\w+)=([\d_x]+)", text):
    for j, part in enumerate(value.split("x")):
      while len(dims) <= j:
        dims.append({})
      dims[j][key] = tuple(int(v) for v in part.split("_")) if "_" in part else int(part)
  return dims


def _contracted(module: Module, comp: Computation, inst: Instruction, dims: str | None) -> int:
  lhs = module.shape_of(comp, inst.operands[0])
  if not lhs or dims is None:
    return 0
  return math.prod(lhs[0].dims[int(d)] for d in dims.split(",") if d.strip())


def flops(module: Module) -> float:
  return sum(instruction_flops(module, comp, inst) * mult for comp, inst, mult in module.instructions())


def _estimated(module: Module) -> Iterator[tuple[Computation, Instruction, float, float]]:
  """(computation, kernel, its estimated cycles, runs) of every kernel the TPU compiler gave an estimate."""
  for comp, inst, mult in module.instructions():
    cycles = None if comp.name in module.fused else inst.attr(r'"estimated_cycles":"(\d+)"')
    if cycles is not None:
      yield comp, inst, float(cycles), mult


def estimated_cycles(module: Module) -> tuple[float, int]:
  """(sum of the TPU compiler's estimated cycles x runs over the kernels, how many kernels carried an estimate)."""
  cycles = [c * runs for _, _, c, runs in _estimated(module)]
  return sum(cycles), len(cycles)


def kernel_cycles(module: Module) -> Iterator[tuple[Instruction, float, float]]:
  """(kernel, estimated cycles x runs, FLOPs x runs) of every kernel the TPU compiler estimated: a kernel's FLOPs
  are those of the instructions fused into it."""
  for comp, inst, cycles, runs in _estimated(module):
    yield inst, cycles * runs, (instruction_flops(module, comp, inst) + _fused_flops(module, inst)) * runs


def _fused_flops(module: Module, inst: Instruction) -> float:
  if inst.opcode != "fusion":
    return 0.0
  total = 0.0
  for name in re.findall(r"calls=%([\w.\-]+)", inst.attrs):
    comp = module.computations.get(name)
    for inner in comp.instructions.values() if comp else ():
      total += instruction_flops(module, comp, inner) + _fused_flops(module, inner)
  return total


_OP_NAME_NOISE = re.compile(r"^(jit\(.*\)|pjit|while|body|cond|closed_call|checkpoint|remat|rematted_computation|"
                            r"transpose\(jvp\(\)\)|jvp\(\)|vmap\(.*\)|jit)$")


def kernel_label(inst: Instruction) -> str:
  """What a kernel computes, from its source op name: the last two meaningful parts of `op_name` ("btd,df->btf
  dot_general"), "bwd" in front for the backward pass; its opcode when it has no op name."""
  op_name = inst.attr(r'op_name="([^"]+)"')
  if not op_name:
    return inst.opcode
  parts = [p for p in op_name.split("/") if p and not _OP_NAME_NOISE.match(p)]
  label = " ".join(parts[-2:]) or inst.opcode
  return ("bwd " if "transpose(" in op_name else "") + label


def stated_kernels(module: Module) -> Iterator[tuple[float, float, float]]:
  """(flops, bytes, runs) of the custom kernels that carry no estimated cycles but state a cost (or are attention
  kernels: `custom_kernel_cost`)."""
  for comp, inst, mult in module.instructions():
    if inst.opcode == "custom-call" and comp.name not in module.fused and "estimated_cycles" not in inst.attrs:
      kernel = custom_kernel_cost(module, comp, inst)
      if kernel is not None:
        yield (*kernel, mult)


_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
                "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done", "async-start", "async-update",
                "async-done", "send", "recv", "send-done", "recv-done", "add-dependency", "domain"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_COLLECTIVE_OPS = {"all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
                   "collective-permute", "collective-broadcast"}


def hbm_bytes(module: Module) -> float:
  """Bytes each kernel reads and writes in HBM x its runs (arrays in on-chip memories excluded): a fused read through
  a (dynamic-)slice counts the slice, an in-place dynamic-update-slice the update. Collectives are not included."""
  total = 0.0
  for comp, inst, mult in module.instructions():
    base = inst.opcode.rsplit("-", 1)[0] if inst.opcode.endswith(("-start", "-done")) else inst.opcode
    if comp.name in module.fused or inst.opcode in _NOT_KERNELS or base in _COLLECTIVE_OPS:
      continue
    fused = module.computations.get(inst.attr(r"calls=%([\w.\-]+)") or "") if inst.opcode == "fusion" else None
    written = _hbm(inst.shapes[:1] if inst.opcode == "copy-start" else inst.shapes)  # (destination, source, ...)
    if fused is not None and fused.root.opcode == "dynamic-update-slice":
      written = _hbm(module.shape_of(fused, fused.root.operands[1]))
    read = 0
    for k, name in enumerate(inst.operands):
      full = _hbm(module.shape_of(comp, name))
      read += min(full, _param_read(module, fused, k)) if fused is not None else full
    total += (read + written) * mult
  return total


HOST_MEMORY_SPACE = 5  # TPU layouts mark arrays in the host's (pinned) memory S(5)


def host_buffer_bytes(module: Module) -> float:
  """Bytes of the host-memory buffers a program allocates per run (remat offloading: each is written in the forward
  pass and read back in the backward)."""
  return sum(sum(a.bytes for a in inst.shapes if a.memory_space == HOST_MEMORY_SPACE) * mult
             for _, inst, mult in module.instructions()
             if inst.opcode == "custom-call" and inst.attr(r'custom_call_target="([^"]+)"') == "AllocateBuffer")


def _hbm(arrays: list[Array]) -> int:
  return sum(a.bytes for a in arrays if a.memory_space == 0)


def _param_read(module: Module, comp: Computation, index: int) -> float:
  """Bytes a fused computation reads of its parameter `index` (inf: all of it)."""
  param = next((i for i in comp.instructions.values()
                if i.opcode == "parameter" and i.args.strip() == str(index)), None)
  return _reads(module, comp, param.name) if param else math.inf


def _reads(module: Module, comp: Computation, name: str) -> float:
  if comp.root.name == name:  # passed through whole (a bitcast fusion)
    return math.inf
  total = 0.0
  for user in comp.instructions.values():
    if name not in user.operands:
      continue
    if user.opcode in _SLICING and user.operands[0] == name:
      total += user.bytes
    elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
      continue
    elif user.opcode == "bitcast":
      total += _reads(module, comp, user.name)
    elif user.opcode == "fusion" and user.attr(r"calls=%([\w.\-]+)") in module.computations:
      nested = module.computations[user.attr(r"calls=%([\w.\-]+)")]
      total += min(_param_read(module, nested, k) for k, o in enumerate(user.operands) if o == name)
    else:
      return math.inf
  return total
