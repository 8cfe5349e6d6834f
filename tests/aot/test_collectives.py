"""Collectives: kinds, bytes and device groups of a compiled program, and every replica-group form XLA prints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ipo_jax.aot import collectives, hlo_module, targets
from ipo_jax.aot.targets import Target

TPU_SKIP = targets.libtpu_missing()
needs_tpu = pytest.mark.skipif(bool(TPU_SKIP), reason=str(TPU_SKIP))


@needs_tpu
def test_collectives_kinds_bytes_and_groups():
  devices = Target("tpu:v5e:2x2").devices()
  mesh = Mesh(np.asarray(devices), ("i",))

  def f(x):
    return (jax.lax.psum(x, "i"), jax.lax.all_gather(x, "i", tiled=True), jax.lax.psum_scatter(x, "i", tiled=True),
            jax.lax.all_to_all(x, "i", 0, 0, tiled=True),
            jax.lax.ppermute(x, "i", [(j, (j + 1) % 4) for j in range(4)]))

  g = shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=(P(), P(), P("i"), P("i"), P("i")), check_vma=False)
  x = jax.ShapeDtypeStruct((4 * 256, 128), jnp.float32, sharding=NamedSharding(mesh, P("i")))
  module = hlo_module.parse_module(jax.jit(g).lower(x).compile().as_text())
  found = {c.kind: c for c in collectives.collectives(module)}
  assert sorted(found) == sorted(collectives.COLLECTIVES[:5])
  assert {c.bytes for c in found.values()} == {256 * 128 * 4}  # each operand: one device's shard
  assert all(found[k].groups == [[0, 1, 2, 3]] for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"))
  assert found["collective-permute"].groups == [[0, 1], [1, 2], [2, 3], [3, 0]]


def inst(attrs, opcode="all-reduce"):
  return hlo_module.Instruction("x", [], opcode, [], "", attrs, False)


@pytest.mark.parametrize("attrs,groups", [
    (", replica_groups={{0,1},{2,3}}, to_apply=%add", [[0, 1], [2, 3]]),
    (", replica_groups={}, to_apply=%add", [[0, 1, 2, 3]]),
    ("", [[0, 1, 2, 3]]),
    (", replica_groups=[2,2]<=[4], to_apply=%add", [[0, 1], [2, 3]]),
    (", replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add", [[0, 2], [1, 3]]),
    (", replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, use_global_device_ids=true", [[0, 1, 2, 3]]),
    (", replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use_global_device_ids=true", [[0, 1], [2, 3]]),
    (", replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global_device_ids=true", [[0, 2], [1, 3]]),
    (", replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=1,'axis_3'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, "
     "dimensions={1}", [[0, 1], [2, 3]]),
    (", source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
])
def test_replica_group_forms(attrs, groups):
  assert collectives.replica_groups(inst(attrs), 4) == groups
