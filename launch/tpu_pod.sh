#!/usr/bin/env bash
# Train VAR on a Cloud TPU VM pod slice: create (or reuse) the TPU, copy this repository to
# every worker, install it, and run the same `var-jax train` on all workers (--worker=all).
# jax.distributed.initialize() picks up the pod topology by itself (var-jax train does it
# when TPU_WORKER_HOSTNAMES lists more than one host).
#
#   TPU_NAME=var-d16 ZONE=us-central2-b ACCELERATOR=v4-64 \
#   WORKDIR=/mnt/shared/var_d16 DATA=/mnt/imagenet \
#   launch/tpu_pod.sh configs/var_d16.py [--config.key=value ...]
#
# Env: TPU_NAME, ZONE, ACCELERATOR (e.g. v4-64, v5p-128), RUNTIME (TPU software version),
# PROJECT (optional), WORKDIR (a folder every worker mounts at the same path, e.g. a
# Filestore/NFS share or a gcsfuse mount of a bucket: every host writes its part of each
# checkpoint there; gs:// URLs are refused, var-jax writes through the file system),
# DATA (image folder path on every worker, or pass TFDS overrides), SPOT=1 for spot VMs,
# SETUP_ONLY=1 to only create/copy/install. The training command's exit status is this
# script's (75: stopped on a preemption notice after a checkpoint; rerun to resume).
set -euo pipefail
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG [--config.key=value ...]}; shift
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${WORKDIR:?}"
for v in WORKDIR DATA; do
  if [[ ${!v:-} =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    echo "tpu_pod.sh: $v=${!v}: give a path every worker mounts (Filestore/NFS, gcsfuse), not a URL" >&2
    exit 2
  fi
done
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GC="gcloud compute tpus tpu-vm"

if ! $GC describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  echo "[tpu_pod] creating $TPU_NAME ($ACCELERATOR, $RUNTIME) in $ZONE"
  $GC create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" $PROJECT_FLAG ${SPOT:+--spot}
else
  echo "[tpu_pod] reusing $TPU_NAME"
fi

echo "[tpu_pod] copying the code to every worker"
TGZ=$(mktemp "${TMPDIR:-/tmp}/var-jax.XXXXXX.tgz")
trap 'rm -f "$TGZ"' EXIT
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude='*.pth' -czf "$TGZ" .
$GC scp "$TGZ" "$TPU_NAME":/tmp/var-jax.tgz --worker=all --zone="$ZONE" $PROJECT_FLAG
$GC ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -e; mkdir -p ~/var-jax && tar -C ~/var-jax -xzf /tmp/var-jax.tgz && cd ~/var-jax
  python3 -m venv .venv && .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q 'jax[tpu]' -e ."
[ "${SETUP_ONLY:-0}" = 1 ] && exit 0

# The remote command line, each argument quoted for the workers' shell.
TRAIN=$(printf ' %q' .venv/bin/var-jax train --config "$CONFIG" --workdir "$WORKDIR" \
  --distributed=on ${DATA:+"--config.data.path=$DATA"} "$@")
echo "[tpu_pod] training $CONFIG -> $WORKDIR on all workers"
$GC ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -o pipefail; cd ~/var-jax && $TRAIN 2>&1 | tee -a ~/train.log"
