"""Two processes × 2 CPU devices (gloo collectives on 127.0.0.1) give the same logits as one process."""

import socket

import numpy as np

from tests import hf_checkpoints
from tests.test_sharding import run_worker


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  hf_checkpoints.make_checkpoint("llama3", str(tmp_path / "ckpt"))
  ckpt = str(tmp_path / "ckpt")
  single = run_worker([ckpt, str(tmp_path / "single.npy"), "1,1,1"], devices=1)
  port = str(free_port())
  workers = [run_worker([ckpt, str(tmp_path / "multi.npy"), "2,1,2", str(i), "2", port], devices=2)
             for i in range(2)]
  for proc in [single, *workers]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
  np.testing.assert_allclose(np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy"), atol=1e-5, rtol=0)
