"""Loop trip counts: from the condition `counter < N` (hand-written HLO and compiled programs), an upper bound for
`counter < N and not done`, unknown loops counted once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.aot import hlo_module, targets
from ipo_jax.aot.targets import Target

TPU_SKIP, GPU_SKIP = targets.libtpu_missing(), targets.cuda_plugin_missing()


def test_trip_count_from_condition_text():
  text = """HloModule m, num_partitions=1

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] copy(%i)
  %two = s32[] constant(2)
  %next = s32[] add(%c, %two)
  %m = f32[4,4] get-tuple-element(%p), index=1
  %d = f32[4,4] dot(%m, %m), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]) tuple(%next, %d)
}

%cond (q: (s32[], f32[4,4])) -> pred[] {
  %q = (s32[], f32[4,4]) parameter(0)
  %n = s32[] constant(11)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%n, %j), direction=GT
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4] parameter(0)
  %zero = s32[] constant(1)
  %init = (s32[], f32[4,4]) tuple(%zero, %a)
  %w = (s32[], f32[4,4]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4,4] get-tuple-element(%w), index=1
}
"""
  module = hlo_module.parse_module(text)
  assert module.loops == [("w", 5, "condition")]  # i = 1, 3, 5, 7, 9
  assert hlo_module.flops(module) == 5 * 2 * 4 * 4 * 4
  unknown = hlo_module.parse_module(text.replace("direction=GT", "direction=NE"))
  assert unknown.unknown_loops == ["w"] and hlo_module.flops(unknown) == 2 * 4 * 4 * 4


def early_stopping_loop(w, x):
  def cond(carry):
    i, _, done = carry
    return (i < 12) & jnp.any(~done)

  def body(carry):
    i, h, done = carry
    h = jnp.tanh(h @ w)
    return i + 1, h, done | (h[:, 0] > 0.99)

  return jax.lax.while_loop(cond, body, (0, x, jnp.zeros(x.shape[0], bool)))[1]


@pytest.mark.parametrize("name,skip", [("tpu:v5e:2x2", TPU_SKIP), ("gpu:h100x1", GPU_SKIP)])
def test_early_stopping_loop_counts_its_bound(name, skip):
  if skip:
    pytest.skip(skip)
  s = NamedSharding(Mesh(np.asarray(Target(name).devices()[:1]), ("x",)), P())
  w, x = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((256, 256), (128, 256)))
  module = hlo_module.parse_module(jax.jit(early_stopping_loop).lower(w, x).compile().as_text())
  assert [(trip, how) for _, trip, how in module.loops] == [(12, "condition bound")]
  assert hlo_module.flops(module) == 12 * 2 * 128 * 256 * 256
