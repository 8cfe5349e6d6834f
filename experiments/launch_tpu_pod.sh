#!/usr/bin/env bash
# Runs one ipo_jax task on every host of a Cloud TPU pod slice (one process per host, all chips in one mesh).
#
# jax.distributed initialises from the TPU metadata (coordinator, process count and id are auto-detected) when
# the config asks for it: this script passes --config.distributed.enabled=True. Every host must see the same
# code, data and output directory (a shared filesystem or a gs:// bucket for output_dir); only process 0 writes.
#
# Usage (from a machine with gcloud):
#   TPU_NAME=my-pod ZONE=us-central2-b experiments/launch_tpu_pod.sh setup      # copy the repo, install deps
#   TPU_NAME=my-pod ZONE=us-central2-b experiments/launch_tpu_pod.sh run \
#       --config configs/self_improve.py:paper --config.model.path=<model> \
#       --config.output_dir=/mnt/shared/runs/self_improve_paper
#   TPU_NAME=my-pod ZONE=us-central2-b experiments/launch_tpu_pod.sh run \
#       --config configs/rewardbench.py:paper --config.model.path=<model> --config.output_dir=<shared dir>
#
# Mesh: the default (data=1, fsdp=-1, tensor=1) shards parameters over every chip of the pod; for bigger models
# add e.g. --config.mesh.shape.tensor=4. Environment: REPO_DIR (default ~/ipo_jax on the hosts), PYTHON
# (default python3), JAX_EXTRA (default tpu).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/ipo_jax}"
PYTHON="${PYTHON:-python3}"
JAX_EXTRA="${JAX_EXTRA:-tpu}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "$1"
}

case "${1:-}" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse "${HERE}" "${TPU_NAME}:${REPO_DIR}" --zone "${ZONE}" --worker=all
    on_all_hosts "cd ${REPO_DIR} && ${PYTHON} -m pip install -q -r requirements.txt 'jax[${JAX_EXTRA}]'"
    ;;
  run)
    shift
    args="$(printf ' %q' "$@")"
    on_all_hosts "cd ${REPO_DIR} && ${PYTHON} -m ipo_jax.main${args} --config.distributed.enabled=True"
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 setup | run --config configs/<file>.py[:variant] [--config.x=y ...]" >&2
    exit 2
    ;;
esac
