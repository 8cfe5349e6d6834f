"""HLO text: FLOPs through while loops (exact, against hand counts and XLA's cost analysis on loop-free code), trip
counts, HBM traffic, compiled for abstract TPU v5e / H100 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.aot import hlo_module, targets
from ipo_jax.aot.targets import Target

TPU_SKIP, GPU_SKIP = targets.libtpu_missing(), targets.cuda_plugin_missing()
needs_tpu = pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))
needs_gpu = pytest.mark.skipif(bool(GPU_SKIP), reason=str(GPU_SKIP))
MATMUL = 2 * 128 * 256 * 256  # one [128,256] @ [256,256]


def one_device(name):
  return NamedSharding(Mesh(np.asarray(Target(name).devices()[:1]), ("x",)), P())


def scan8(w, x):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


def compiled_scan8(name):
  s = one_device(name)
  return jax.jit(scan8).lower(jax.ShapeDtypeStruct((8, 256, 256), jnp.bfloat16, sharding=s),
                              jax.ShapeDtypeStruct((128, 256), jnp.bfloat16, sharding=s)).compile()


@needs_tpu
def test_scan_flops_counted_per_iteration_tpu():
  compiled = compiled_scan8("tpu:v5e:2x2")
  module = hlo_module.parse_module(compiled.as_text())
  assert hlo_module.flops(module) == 8 * MATMUL
  assert [(trip, how) for _, trip, how in module.loops] == [(8, "condition")]
  reported = compiled.cost_analysis()["flops"]  # the loop body once, plus the tanh
  assert MATMUL <= reported < 1.01 * MATMUL
  cycles, kernels = hlo_module.estimated_cycles(module)
  assert kernels >= 1 and cycles > 8 * MATMUL / (4 * 128 * 128 * 2)  # at least the MXU-bound cycles
  layer, rows = 256 * 256 * 2, 128 * 256 * 2  # each iteration reads its layer's slice, not the whole stack
  assert 8 * layer + 2 * rows <= hlo_module.hbm_bytes(module) <= 8 * layer + 2 * rows + 1024


@needs_gpu
def test_scan_flops_counted_per_iteration_gpu():
  module = hlo_module.parse_module(compiled_scan8("gpu:h100x8").as_text())
  assert hlo_module.flops(module) == 8 * MATMUL
  assert [(trip, how) for _, trip, how in module.loops] == [(8, "known_trip_count")]
  assert hlo_module.hbm_bytes(module) > 8 * 256 * 256 * 2  # each layer's weights once, the split-K partials more


@needs_gpu
def test_matmul_hbm_traffic_gpu():
  s = one_device("gpu:h100x8")
  a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=s)
  module = hlo_module.parse_module(jax.jit(jnp.matmul).lower(a, a).compile().as_text())
  assert hlo_module.hbm_bytes(module) == 3 * 4096 * 4096 * 2 and hlo_module.flops(module) == 2 * 4096**3


@needs_tpu
def test_loop_free_flops_equal_cost_analysis():
  s = one_device("tpu:v5e:2x2")
  shapes = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((256, 512), (512, 384), (384, 128))]
  compiled = jax.jit(lambda a, b, c: (a @ b) @ c).lower(*shapes).compile()
  expected = 2 * 256 * 512 * 384 + 2 * 256 * 384 * 128
  assert hlo_module.flops(hlo_module.parse_module(compiled.as_text())) == compiled.cost_analysis()["flops"] == expected


@needs_tpu
def test_nested_loops_and_kernels_counted():
  """An outer scan of 5 around an inner scan of 3 of attention-like einsums (the TPU compiler turns them into a
  kernel that states its FLOPs) and a projection."""
  s = one_device("tpu:v5e:2x2")

  def f(q, k, w):
    def outer(h, wi):
      def inner(h2, _):
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", h2, k), -1).astype(h2.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", p, k) @ wi, None
      return jax.lax.scan(inner, h, None, length=3)[0], None
    return jax.lax.scan(outer, q, w)[0]

  shapes = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((2, 4, 128, 64),) * 2 + ((5, 64, 64),)]
  module = hlo_module.parse_module(jax.jit(f).lower(*shapes).compile().as_text())
  per_inner = 2 * (2 * 2 * 4 * 128 * 128 * 64) + 2 * 2 * 4 * 128 * 64 * 64
  assert hlo_module.flops(module) == 15 * per_inner
  assert sorted(trip for _, trip, _ in module.loops) == [3, 5]


CONVOLUTIONS = """HloModule windowed, num_partitions=16

ENTRY %main (x: bf16[1024,2,256], w: bf16[2,256,14336], y: bf16[1024,14336,1], v: bf16[14336,2,256]) -> bf16[1024,2,256] {
  %x = bf16[1024,2,256]{2,1,0} parameter(0)
  %w = bf16[2,256,14336]{2,1,0} parameter(1)
  %y = bf16[1024,14336,1]{2,1,0} parameter(2)
  %v = bf16[14336,2,256]{2,1,0} parameter(3)
  %up = bf16[1024,14336,1]{2,1,0} convolution(%x, %w), window={size=2}, dim_labels=b0f_0io->bf0
  ROOT %down = bf16[1024,2,256]{2,0,1} convolution(%y, %v), window={size=2 pad=1_1 rhs_reversal=1}, dim_labels=bf0_i0o->b0f
}
"""


def test_convolution_flops_skip_the_padded_window():
  """A windowed einsum's dots over two weight shards, as the TPU partitioner writes them: contracting the two shards
  (a window of 2 over 2 positions), and batching them (a window of 2 padded by 1 each side: each output position
  meets one real input position, so it is a [1024, 14336] @ [14336, 256] dot per shard, not twice that)."""
  module = hlo_module.parse_module(CONVOLUTIONS)
  comp = next(c for c in module.computations.values() if c.entry)
  up, down = comp.instructions["up"], comp.instructions["down"]
  assert hlo_module.instruction_flops(module, comp, up) == 2 * 1024 * 14336 * (2 * 256)
  assert hlo_module.instruction_flops(module, comp, down) == 2 * 1024 * 14336 * 256 * 2


def test_an_instruction_over_several_lines_is_one_instruction():
  """A Pallas kernel's metadata spans lines (one starting with "}"); the computation goes on after it."""
  text = "\n".join([
      "HloModule m, num_partitions=1",
      "%body (p: f32[4]) -> f32[4] {",
      "  %p = f32[4]{0} parameter(0)",
      '  %k = f32[4]{0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={meta={',
      '"xprof":"{\\"block_q\\": 128}"',
      '}}, metadata={op_name="a/b"}',
      "  ROOT %n = f32[4]{0} negate(%k)",
      "}",
  ])
  body = hlo_module.parse_module(text).computations["body"]
  assert list(body.instructions) == ["p", "k", "n"]
  assert body.instructions["k"].attr(r'op_name="([^"]+)"') == "a/b" and body.root.name == "n"
