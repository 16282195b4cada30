#!/usr/bin/env bash
# One r1jax process per host (multi-GPU hosts). Run the same command on every host:
#
#   COORDINATOR=10.0.0.1:8476 NUM_HOSTS=4 HOST_ID=<0..3> launch/multihost.sh sft configs/x.yaml ...
#
# Each process sees all GPUs of its host; the mesh in the config spans every GPU of every host.
# Under SLURM, r1jax finds the coordinator, host count and id itself (see slurm.sbatch), so the
# three variables may be left unset there.
set -euo pipefail
if [[ -n "${COORDINATOR:-}" ]]; then
  export R1JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export R1JAX_NUM_PROCESSES="${NUM_HOSTS:?set NUM_HOSTS}"
  export R1JAX_PROCESS_ID="${HOST_ID:?set HOST_ID}"
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/r1jax" "$@"
