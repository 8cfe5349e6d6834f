"""Worker for tests/test_sharding.py and tests/test_distributed.py: logits of a checkpoint on a given mesh.

Usage: python -m tests.multidevice_worker CHECKPOINT OUT.npy DATA,FSDP,TENSOR [PROCESS_ID NUM_PROCESSES PORT]
Writes the logits of a fixed padded batch (gathered to every process; process 0 writes).
"""

import sys

import jax
import numpy as np


def main(argv):
  checkpoint, out, mesh_shape = argv[1], argv[2], [int(x) for x in argv[3].split(",")]
  if len(argv) > 4:
    process_id, num_processes, port = int(argv[4]), int(argv[5]), argv[6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
  from jax.experimental import multihost_utils

  from ipo_jax import sharding
  from ipo_jax.model import loading
  from tests import hf_checkpoints

  mesh = sharding.make_mesh(mesh_shape)
  model = loading.load_model(checkpoint, mesh=mesh)
  ids, mask = hf_checkpoints.padded_batch(model.config.vocab_size, [20, 13, 7, 18], 20, left=True)
  logits = model.logits(ids, mask)
  q_spec = model.params["layers"]["q"].sharding.spec
  full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
  if jax.process_index() == 0:
    np.save(out, full)
    print("devices", jax.device_count(), "local", jax.local_device_count(), "mesh", dict(mesh.shape), "q", q_spec)


if __name__ == "__main__":
  main(sys.argv)
