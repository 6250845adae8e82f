#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install this checkout on every worker, run a command everywhere.
#
#   NAME=holocine ZONE=us-east5-a ACCELERATOR=v5p-16 launch/tpu_vm.sh create
#   NAME=holocine ZONE=us-east5-a launch/tpu_vm.sh install
#   NAME=holocine ZONE=us-east5-a launch/tpu_vm.sh run holocine-jax demo --workdir /tmp/demo
#   NAME=holocine ZONE=us-east5-a launch/tpu_vm.sh delete
#
# ACCELERATOR: v5litepod-N (v5e) or v5p-N; RUNTIME defaults to the matching TPU VM image.
# Multi-host slices run the same command on all workers (--worker=all) with
# HOLOCINE_DISTRIBUTED=1, so the CLI calls jax.distributed.initialize() (peers from the TPU
# metadata server). Keep data and checkpoints on gs:// paths.
set -euo pipefail
: "${NAME:?set NAME (the TPU VM name)}" "${ZONE:?set ZONE (e.g. us-east5-a)}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
case "$ACCELERATOR" in
  v5litepod-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
  *) RUNTIME=${RUNTIME:-v2-alpha-tpuv5} ;;
esac
REMOTE_DIR=${REMOTE_DIR:-holocine-jax}
tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

cmd=${1:?usage: tpu_vm.sh create|install|run CMD...|delete}
shift
case "$cmd" in
  create) tpu create "$NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ;;
  install)
    tpu scp --recurse --worker=all "$(git rev-parse --show-toplevel)" "$NAME:~/$REMOTE_DIR"
    tpu ssh "$NAME" --worker=all --command "cd ~/$REMOTE_DIR && pip install -e '.[tpu]'" ;;
  run) tpu ssh "$NAME" --worker=all --command "cd ~/$REMOTE_DIR && HOLOCINE_DISTRIBUTED=1 $(printf '%q ' "$@")" ;;
  delete) tpu delete "$NAME" --quiet ;;
  *) echo "unknown command $cmd (create|install|run|delete)" >&2; exit 2 ;;
esac
