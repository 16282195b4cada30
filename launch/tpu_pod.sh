#!/usr/bin/env bash
# Run r1jax on every worker of a Cloud TPU pod slice (same command on all workers).
#
#   TPU=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh sft configs/x.yaml checkpoint.dir=gs://bucket/runs/x
#
# Copies this checkout to every worker, sets up .venv there with `python3 dev.py` on first use
# (jax[tpu] is installed by JAX_EXTRA), and starts the command on all workers at once. JAX finds
# the pod's coordinator and worker ids itself (r1jax.distributed.initialize). A preempted slice
# gets SIGTERM: r1jax saves a checkpoint at the current step; rerun this command to resume.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="~/r1jax"
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" $PROJECT_FLAG \
  "$here/r1jax" "$here/configs" "$here/launch" "$here/pyproject.toml" "$here/dev.py" "$here/README.md" "$TPU:$dest"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -e; cd $dest
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'; fi
  .venv/bin/r1jax$args"
