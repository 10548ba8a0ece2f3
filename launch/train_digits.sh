#!/usr/bin/env bash
# Rebuild the embedded digits model (var_jax/assets/digits) from scratch, offline:
#   1. the multi-scale VQVAE   (var-jax train-vqvae --config configs/digits_vqvae.py)
#   2. the class-conditional VAR on its tokens (var-jax train --config configs/digits_var.py)
#   3. measure it (benchmarks/eval_digits.py) and install it in the package.
#
#   bash launch/train_digits.sh [WORKDIR]        # default WORKDIR: /tmp/var_jax_digits
#
# Fixed seeds and a fixed train/test split make the run repeatable on one machine
# (floating-point results can differ across CPU types and XLA versions).
# Timings and figures of the shipped run: README.md ("The embedded digits model").
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/var_jax_digits}"
PY="${PYTHON:-python}"
VARJAX="${VARJAX:-var-jax}"
ASSET=var_jax/assets/digits
mkdir -p "$WORK"

t0=$(date +%s)
"$VARJAX" train-vqvae --config configs/digits_vqvae.py --workdir "$WORK/vqvae"
t1=$(date +%s)
"$VARJAX" train --config configs/digits_var.py --workdir "$WORK/var" \
    --config.vae.checkpoint="$WORK/vqvae/export"
t2=$(date +%s)

rm -rf "$ASSET.new" && cp -r "$WORK/var/export" "$ASSET.new"
"$PY" benchmarks/eval_digits.py --checkpoint "$ASSET.new" --write --cfg 2.0 --top-k 0 --top-p 0 --seed 0 \
    --note "train-vqvae $((t1 - t0))s, train (VAR) $((t2 - t1))s on $(nproc) CPU core(s)"
rm -rf "$ASSET" && mv "$ASSET.new" "$ASSET"
echo "installed $ASSET (vqvae $((t1 - t0))s, var $((t2 - t1))s); try: var-jax demo --out /tmp/demo"
