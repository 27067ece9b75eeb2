#!/usr/bin/env bash
# One GPU call for the two compile-path changes of 2026-12-06 that were made on the CPU:
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_compile_ops.sh
# Here: mkdir -p .gpu/co && tar -xzf FILES_AT/session.tar.gz -C .gpu/co
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz:
#   1. the GPU tests of the embedding lookup and the fused loss (the compiled loss at the 400M
#      head keeps eager's peak memory) -> tests.txt;
#   2. the compiled 400M SISO hybrid (train_throughput.py hybrid_compiled, 4 x 4,096 tokens)
#      with the fused loss as the traced Function (HYBRIDKIT_KERNELS=loss_op=0, the default)
#      and as the op pair (loss_op=1): step time and peak memory (H100, 2026-12-06: 135.1 vs
#      148.6 ms, 27.6 vs 27.3 GB; benchmarks/results/compile_ops_h100.md); the op side with the
#      per-kernel profile -> loss_{traced,op}/;
#   3. #17's long-context case: the same model at 1 x 16,384 tokens with per-block activation
#      checkpointing, compiled (hybrid_16k_ckpt; H100 2026-12-06 with loss_op=1: 198.4 ms, 26.0 %
#      MFU, 8.1 GB) -> ckpt16k/.
# The embedding change's timing is benchmarks/mqar_step_time.sh (compiled deterministic MQAR
# steps: 24 / 30 ms before, 12.5 / 15.0 ms after, H100).
set -u
WORK=/tmp/hk_compile_ops
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
budgeted 150 60 python -m pytest -q -m gpu tests/test_embedding_lookup.py tests/test_loss.py \
  -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -12 > "$WORK/tests.txt"
tail -2 "$WORK/tests.txt"; pack
for side in traced op; do
  setting=loss_op=1 profile=()
  # the default side also profiles one step: the compiled SISO step's per-kernel list, with
  # Inductor's element-wise kernels by name (18 % of the step, never listed so far)
  [ "$side" = traced ] && setting=loss_op=0 profile=(--no-profile)
  HYBRIDKIT_KERNELS=$setting budgeted 150 100 python benchmarks/train_throughput.py \
    --out "$WORK/loss_$side" "${profile[@]}" --steps 8 --cases hybrid_compiled \
    > "$WORK/loss_$side.txt" 2>&1
  show "$WORK/loss_$side/train_throughput.md" "$WORK/loss_$side.txt" 8; pack
done
budgeted 180 120 python benchmarks/train_throughput.py --out "$WORK/ckpt16k" --no-profile \
  --steps 6 --cases hybrid_16k_ckpt > "$WORK/ckpt16k.txt" 2>&1
show "$WORK/ckpt16k/train_throughput.md" "$WORK/ckpt16k.txt" 8; pack
