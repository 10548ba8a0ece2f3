#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one run: var-jax's training and sampling
# benchmarks and, when VAR_DIR names a checkout of the reference (FoundationVision/VAR),
# the reference's on the same machine right after, the same settings.
#
#   [VAR_DIR=path/to/VAR] [REF_BENCH=../shared/bench] [PARTS='train sample ...'] \
#       bash benchmarks/gpu_side_by_side.sh OUT_DIR
#
# PARTS picks the jobs (default all: train train_xla sample sample_xla ref); a device call
# limited to 10 minutes runs them as separate calls, e.g. PARTS=train, then
# PARTS='train_xla sample_xla', then PARTS='sample ref', then PARTS=profile, each with
# its own OUT_DIR.
#
# OUT_DIR must not exist yet (nothing is overwritten). It receives one log per job
# (train.txt, train_xla.txt, sample.txt, sample_xla.txt, ref_train.txt, ref_sample.txt), the training rows as JSON lines
# (train.jsonl) and environment.txt (GPU, versions, commit). About 20 minutes on one H100
# (compiles included: training ~20-40 s per row, more unrolled, sampling ~40-50 s per row).
# Part `profile` (not in the default set) writes jax.profiler traces of the default
# training row under OUT_DIR/trace_train and of the same with unrolled blocks under
# OUT_DIR/trace_train_unrolled (read them with
# ../shared/bench/kernel_breakdown.py OUT_DIR/trace_train --calls 3).
set -euo pipefail
out=$(realpath -m "${1:?usage: bash benchmarks/gpu_side_by_side.sh OUT_DIR}")   # before the cd below
parts=" ${PARTS:-train train_xla sample sample_xla ref} "
for p in $parts; do
  case $p in
    train|train_xla|sample|sample_xla|ref|profile) ;;
    *) echo "gpu_side_by_side.sh: unknown part '$p' (train train_xla sample sample_xla ref profile)" >&2
       exit 2 ;;
  esac
done
if [ -e "$out" ]; then
  echo "gpu_side_by_side.sh: $out exists; give a new folder (nothing is overwritten)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$out"
ref_bench=${REF_BENCH:-../shared/bench}

{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' || true
} > "$out/environment.txt" 2>&1

# Training, d16 batch 64: the release configs' default remat against dots_saveable, from
# pre-tokenised data and with the tokenizer in the step; then unrolled blocks
# (model.scan_blocks=false: no stacked activation/gradient buffers).
if [[ $parts == *' train '* ]]; then
  variants='remat=dots_saveable,data=tokens;remat=dots_attention_saveable,data=tokens;'
  variants+='remat=dots_saveable,data=images;remat=dots_attention_saveable,data=images;'
  variants+='remat=dots_attention_saveable,data=tokens,scan=false;'
  variants+='remat=dots_attention_saveable,data=images,scan=false;'
  variants+='remat=dots_inputs_attention_saveable,data=tokens;remat=block,data=tokens'
  python3 benchmarks/train_bench.py --config configs/var_d16.py --batch 64 --steps 5 --sweep \
      --variants "$variants" --json "$out/train.jsonl" 2>&1 | tee "$out/train.txt"
fi
if [[ $parts == *' profile '* ]]; then
  python3 benchmarks/train_bench.py --config configs/var_d16.py --batch 64 --steps 5 \
      --remat dots_attention_saveable --data tokens --profile "$out/trace_train" \
      2>&1 | tee "$out/train_profile.txt"
  python3 benchmarks/train_bench.py --config configs/var_d16.py --batch 64 --steps 5 \
      --remat dots_attention_saveable --data tokens --scan false \
      --profile "$out/trace_train_unrolled" 2>&1 | tee "$out/train_profile_unrolled.txt"
fi

# Sampling: d16 b64, d16 b1, d30 b64, d36 at 512 px b16 (bfloat16, cfg 1.5, top_k 900, top_p 0.96).
if [[ $parts == *' sample '* ]]; then
  python3 benchmarks/sample_bench.py --sweep --dtype bfloat16 2>&1 | tee "$out/sample.txt"
fi

# XLA flags for the scanned programs, each in its own process (an XLA that does not know
# a flag fails only that run). Dynamic-slice fusion lets a cuBLAS GEMM inside a while loop
# read its operand from, and write its result into, a slice of a stacked buffer (the
# block weights at each sampling step; the kept activations of each training block)
# instead of copying it; command buffers with WHILE/CONDITIONAL record whole loops as CUDA
# graphs (the batch-1 sampler's 160 loop iterations each wait for the host otherwise);
# autotune level 0 shows how much of the sampler's compile time is GEMM/conv autotuning.
flag_sets=('--xla_gpu_enable_dynamic_slice_fusion=true'
           '--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1'
           '--xla_gpu_autotune_level=0')
if [[ $parts == *' train_xla '* ]]; then
  XLA_FLAGS="${XLA_FLAGS:-} ${flag_sets[0]}" python3 benchmarks/train_bench.py \
      --config configs/var_d16.py --batch 64 --steps 5 --sweep \
      --variants 'remat=dots_attention_saveable,data=tokens;remat=dots_saveable,data=tokens' \
      --json "$out/train_xla.jsonl" 2>&1 | tee "$out/train_xla.txt" || true
fi
if [[ $parts == *' sample_xla '* ]]; then
  for flags in "${flag_sets[@]}"; do
    XLA_FLAGS="${XLA_FLAGS:-} $flags" python3 benchmarks/sample_bench.py --sweep \
        --sweep-configs 'd16:64,d16:1' --dtype bfloat16 2>&1 | tee -a "$out/sample_xla.txt" || true
  done
fi

if [[ $parts != *' ref '* ]]; then
  :
elif [ -n "${VAR_DIR:-}" ]; then
  VAR_DIR=$VAR_DIR python3 "$ref_bench/ref_train_bench.py" --depth 16 --batch 64 --steps 10 \
      2>&1 | tee "$out/ref_train.txt"
  for args in '--depth 16 --batch 64' '--depth 16 --batch 1' '--depth 30 --batch 64'; do
    # shellcheck disable=SC2086
    VAR_DIR=$VAR_DIR python3 "$ref_bench/ref_sample_bench.py" $args --dtype fp16 \
        2>&1 | tee -a "$out/ref_sample.txt"
  done
else
  echo "VAR_DIR not set: the reference's rows skipped" | tee "$out/ref_skipped.txt"
fi
echo "logs in $out"
