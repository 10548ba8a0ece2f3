#!/usr/bin/env bash
# Train VAR on every GPU of one machine: one process drives all local GPUs (JAX SPMD),
# so no jax.distributed is needed. Re-running the same command resumes from WORKDIR.
#
#   WORKDIR=/ckpt/var_d16 DATA=/data/imagenet launch/gpu_single_host.sh configs/var_d16.py \
#     --config.batch_size=256 --config.optim.grad_accum=3   # 768 per update on less memory
#
# Env: WORKDIR (required), DATA (image folder root with train/ and val/), VENV (default .venv).
# Install once: python -m venv .venv && .venv/bin/pip install 'jax[cuda12]' -e .
set -euo pipefail
CONFIG=${1:?usage: launch/gpu_single_host.sh CONFIG [--config.key=value ...]}; shift
: "${WORKDIR:?set WORKDIR}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Latency-hiding scheduler overlaps the FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
nvidia-smi -L || true
exec "$VENV/bin/var-jax" train --config "$CONFIG" --workdir "$WORKDIR" --distributed=off \
  ${DATA:+"--config.data.path=$DATA"} "$@"
