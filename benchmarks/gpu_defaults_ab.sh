#!/usr/bin/env bash
# One GPU call: the launch defaults adopted on 2026-12-06 from kernel-level sweeps, timed in the
# model against the former ones in the same call (each side in its own process, the former
# through `--launch`), so the end-to-end effect is measured and not only inferred:
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_defaults_ab.sh
# Here: mkdir -p .gpu/ab && tar -xzf FILES_AT/session.tar.gz -C .gpu/ab
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz:
#   1. the few-row linear, norm and MIMO output GPU tests at the defaults -> tests.txt;
#   2. decoding (#16): benchmarks/decode.py, the 400M hybrid at batch 1 and 16, fp32 state, with
#      the few-row linears' former launch (one row 8 columns; 16 rows 4 warps) and the new one
#      (4 columns; 2 warps: 880 vs 923 us of step matmuls in skinny_linear_h100.md)
#      -> decode_{former,new}.{json,md,txt};
#   3. eager training (#17): train_throughput.py hybrid_eager (norms through our kernels) with
#      the norms' former backward launch (2,048 / 8 warps / 4 per SM) and the new one (512 / 1 /
#      16: 1.23x at kernel level) -> eager_{former,new}/train_throughput.{json,md};
#   4. the compiled 400M MIMO hybrid (#15) with the MIMO output backward at 2 warps (former) and
#      1 (new) -> mimo_{former,new}/train_throughput.{json,md}.
# All four take about 11 minutes, more than one call: STEPS (default "tests decode eager mimo")
# picks some, e.g. STEPS="tests decode eager" in one call and STEPS=mimo in the next.
set -u
STEPS=" ${STEPS:-tests decode eager mimo} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
WORK=/tmp/hk_defaults_ab
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
step tests && budgeted 150 60 python -m pytest -q -m gpu -n 8 tests/test_linear_kernels.py \
  tests/test_norm_kernels.py tests/test_mimo_output.py -k "not compiled" -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -20 > "$WORK/tests.txt"
step tests && { tail -2 "$WORK/tests.txt"; pack; }
FORMER_LINEAR="linear:GEMV_BLOCK_N=8,WARPS=4"
for side in former new; do
  step decode || break
  launch=()
  [ "$side" = former ] && launch=(--launch "$FORMER_LINEAR")
  budgeted 150 90 python benchmarks/decode.py --skip-layer --batch 1,16 --states fp32 \
    --out "$WORK/decode_$side" "${launch[@]}" > "$WORK/decode_$side.txt" 2>&1
  show "$WORK/decode_$side.md" "$WORK/decode_$side.txt" 12; pack
done
# train_ab NAME CASE FORMER MOST NEED: train_throughput.py's CASE with the FORMER launch, then
# with the defaults -> NAME_{former,new}/
train_ab() {
  local side launch
  for side in former new; do
    launch=()
    [ "$side" = former ] && launch=(--launch "$3")
    budgeted "$4" "$5" python benchmarks/train_throughput.py --out "$WORK/$1_$side" --no-profile \
      --steps 8 --cases "$2" "${launch[@]}" > "$WORK/$1_$side.txt" 2>&1
    show "$WORK/$1_$side/train_throughput.md" "$WORK/$1_$side.txt" 8; pack
  done
}
step eager && train_ab eager hybrid_eager \
  norm:BWD_TILE_ELEMENTS=2048,BWD_WARPS=8,BWD_PROGRAMS_PER_SM=4 120 80
step mimo && train_ab mimo hybrid_mimo_compiled mimo_output:BWD_WARPS=2 180 120
