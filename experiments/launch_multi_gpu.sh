#!/usr/bin/env bash
# Runs one ipo_jax task on GPUs: one process per host, each driving all of its local GPUs, one global mesh.
#
# Single host (all local GPUs, no jax.distributed needed):
#   experiments/launch_multi_gpu.sh --config configs/self_improve.py:paper --config.model.path=<model> \
#       --config.output_dir=runs/self_improve_paper
#
# Several hosts, by hand: run the same command on every host with the coordinator (host 0) address, the number
# of hosts and this host's rank; --config.distributed.* are set from these variables:
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 experiments/launch_multi_gpu.sh --config ...   # host 0
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=1 experiments/launch_multi_gpu.sh --config ...   # host 1
#
# Several hosts under SLURM (jax.distributed reads the coordinator, count and rank from SLURM's variables):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 experiments/launch_multi_gpu.sh --config ...
#
# Every host must see the same code, data and output directory (a shared filesystem); only process 0 writes.
# Mesh: the default (data=1, fsdp=-1, tensor=1) shards parameters over all GPUs; e.g. --config.mesh.shape.data=2
# for two data-parallel replicas. Install once per host: pip install -r requirements.txt "jax[cuda13]".
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: [COORDINATOR=host:port NUM_PROCESSES=n PROCESS_ID=i] $0 --config configs/<file>.py[:variant] ..." >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
dist=()
if [[ -n "${COORDINATOR:-}" ]]; then
  : "${NUM_PROCESSES:?set NUM_PROCESSES with COORDINATOR}"
  : "${PROCESS_ID:?set PROCESS_ID with COORDINATOR}"
  dist=(--config.distributed.enabled=True "--config.distributed.coordinator_address=${COORDINATOR}"
        "--config.distributed.num_processes=${NUM_PROCESSES}" "--config.distributed.process_id=${PROCESS_ID}")
elif [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  dist=(--config.distributed.enabled=True)
fi
# Let XLA use most of each GPU's memory (the default pre-allocates 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec "${PYTHON}" -m ipo_jax.main "$@" "${dist[@]}"
