#!/usr/bin/env bash
# One full GPU call: kernel measurements first, on a quiet GPU, then study shares for the rest of
# the call (studies leave the GPU mostly idle but would disturb any timing beside them).
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && CALL_S=570 bash benchmarks/gpu_session.sh
# (gpu_env.sh sources whichever .gpu/*/env.sh the call carried, or on a warm machine the packages
# an earlier call installed)
# KERNELS=1 (default) runs, each under its own timeout, results under $OUT:
#   1. the GPU tests of the scan kernels (tests/test_triton_mimo.py, tests/test_triton_siso.py)
#      -> $OUT/kernel_tests.txt;
#   2. benchmarks/mamba3_mimo.py (MIMO R 4 against SISO at the issue's shapes)
#      -> $OUT/mimo.{json,md,txt};
#   3. PROBE=1: benchmarks/mimo_probe.py --focus (per-kernel profile of the MIMO forward +
#      backward at backward warps 4, 8, and 4 with the x kernel at 8) -> $OUT/mimo_probe.txt;
#   4. CHECK=1: benchmarks/siso_launch_check.py (every launch candidate of the tuned kernels
#      against the reference: the tuner keeps the fastest, so a candidate that miscompiles must
#      be found) -> $OUT/launch_check.txt.
#   5. DETERMINISM=1: benchmarks/determinism_check.sh (two GPU runs bitwise equal under
#      train.deterministic, and the mode's cost) -> $OUT/determinism_tests.txt, det_*; when it
#      fails, the studies of this call and of later calls on the same warm machine run with
#      --set train.deterministic=false (the verdict is kept in /tmp).
#   6. DECODE=1: the GPU tests of the few-row linears and the fused add + norm -> $OUT/linear_tests.txt,
#      benchmarks/skinny_linear.py (it against cuBLAS at the decode shapes) -> $OUT/skinny_linear.*,
#      then benchmarks/decode.py (layer step and 400M model) and `bench decode --profile`
#      (kernels per token by category) on main's kernels and with
#      skinny_linear=1,fused_add_norm=1 -> $OUT/decode_*.*, $OUT/profile_*.*
#   6b. DECODE2=1: the GPU tests of the fused attention step, PDL, the decode step (Triton; CuTe
#      where staged) and generation -> $OUT/decode2_tests.txt,
#      then decode.py and `bench decode --profile` with attention_step=1 on top of the two
#      settings above, and with pdl=1 as well -> $OUT/{decode,profile}_{attention_step,pdl}.*
#      (~7.5 min)
#   6c. DECODE3=1: the fused Mamba-3 step's GPU tests at batch 128 and split over programs
#      (step_split) -> $OUT/step_tests.txt, then the layer benchmark alone (decode.py
#      --skip-model) under today's launch (split 4) and the other split candidates ->
#      $OUT/decode_step_*.*, and the 400M model alone at batch 1 / 16: today's defaults (the add
#      + norm folded at one row), no fold (norm_linear=0) and the fold up to 16 rows
#      (norm_linear=16), fp32 state -> $OUT/decode_model_*.* (~8 min: run it alone in a call).
#      The decode settings' defaults changed on 2026-12-05 (skinny_linear, fused_add_norm,
#      attention_step on; step_split 4 and norm_linear 1 after the H100 timings), so DECODE's
#      first variant turns them all off.
#   6d. NCU=1: Nsight Compute on one decode step of the 400M model at batch 1 and 16
#      (benchmarks/decode_ncu.py: every kernel once, grouped by kernel and grid) ->
#      $OUT/decode_ncu_b{1,16}.md (and the raw CSV); needs a runtime where ncu reads the
#      counters (device/H200.md: Firecracker yes, gVisor no; the log says which).
#      After DECODE / DECODE2 / DECODE3, benchmarks/decode_compare.py tables every decode.py result of
#      the warm machine's calls (kept in /tmp/gpu_decode) -> $OUT/decode_compare.{md,json}
#   7. TRAIN=1: `hybridkit bench train` of the 400M hybrid, SISO and MIMO rank 4, compiled, 4 x
#      4,096 tokens, with the per-kind breakdown (the profiler no longer double-counts): where
#      MIMO's extra time goes at model level (#15's 0.6x target) -> $OUT/train_{siso,mimo}.*
# STUDIES: space-separated STUDY:JOBS[:SELECTION] shares for benchmarks/study_call.sh, each
# given what is left of CALL_S (e.g. "state_tracking:6 lengthgen_niah:8"); MQAR_PROBE=1 also runs
# benchmarks/mqar_probe.sh beside them. The device tool brings back at most 8 files, so at the
# end everything is packed into $OUT/session.tar.gz (the studies' weights are dropped: each run's
# result.json holds what the report needs). Here: tar -xzf FILES_AT/session.tar.gz -C .gpu/session,
# then each STUDY.tar.gz in it: tar -xzf .gpu/session/STUDY.tar.gz -C benchmarks/results.
set -u
OUT=${OUT:-/tmp/gpu_session}
CALL=${CALL_S:-570}
START=$(date +%s)
mkdir -p "$OUT"
left() { echo $(( CALL - ($(date +%s) - START) )); }
# a result's table rows, or the tail of its log when the table was never written
show() { if grep -q "^| " "$1" 2>/dev/null; then grep "^| " "$1" | head -14; else tail -5 "$2"; fi; }
# one set of kernel settings (HYBRIDKIT_KERNELS=$2): the layer step (d_model 2048) and the 400M
# model (decode.py; $3 tokens of bf16-state drift, default none), then, unless $3 is given, the
# model's kernels per token by category (bench decode --profile), so the launch counts can be
# checked too -> $OUT/decode_$1.*, $OUT/profile_$1.*
decode_variant() {
  HYBRIDKIT_KERNELS=$2 timeout -k 5 180 python benchmarks/decode.py \
    --out "$OUT/decode_$1" --new 96 --drift-tokens "${3:-0}" > "$OUT/decode_$1.txt" 2>&1
  show "$OUT/decode_$1.md" "$OUT/decode_$1.txt"
  [ -n "${3:-}" ] && return
  HYBRIDKIT_KERNELS=$2 timeout -k 5 120 python -m hybridkit bench decode \
    benchmarks/recipes/hybrid_400m.yaml --batch 1,16 --prompt 128 --new 64 --profile \
    --out "$OUT/profile_$1" > "$OUT/profile_$1.txt" 2>&1
  show "$OUT/profile_$1.md" "$OUT/profile_$1.txt"
}
if [ "${KERNELS:-1}" = 1 ]; then
  timeout -k 5 200 python -m pytest -q -m gpu -n 8 tests/test_triton_mimo.py \
    tests/test_triton_siso.py -p no:cacheprovider -rfE 2>&1 \
    | grep -v Warning | tail -40 > "$OUT/kernel_tests.txt"
  tail -3 "$OUT/kernel_tests.txt"
  timeout -k 5 330 python benchmarks/mamba3_mimo.py --out "$OUT/mimo" --reps 100 \
    > "$OUT/mimo.txt" 2>&1
  cat "$OUT/mimo.md" 2>/dev/null || tail -20 "$OUT/mimo.txt"
fi
if [ "${CHECK:-0}" = 1 ]; then
  timeout -k 5 150 python benchmarks/siso_launch_check.py > "$OUT/launch_check.txt" 2>&1
  tail -8 "$OUT/launch_check.txt"
fi
if [ "${PROBE:-0}" = 1 ]; then
  timeout -k 5 240 python benchmarks/mimo_probe.py --focus > "$OUT/mimo_probe.txt" 2>&1
  tail -6 "$OUT/mimo_probe.txt"
fi
if [ "${DECODE:-0}" = 1 ]; then
  timeout -k 5 90 python -m pytest -q -m gpu tests/test_linear_kernels.py -k "bf16_kernel or add_norm" \
    tests/test_norm_kernels.py -p no:cacheprovider \
    -rfE 2>&1 | grep -v Warning | tail -15 > "$OUT/linear_tests.txt"
  tail -2 "$OUT/linear_tests.txt"
  timeout -k 5 120 python benchmarks/skinny_linear.py --out "$OUT/skinny_linear" \
    > "$OUT/skinny_linear.txt" 2>&1
  show "$OUT/skinny_linear.md" "$OUT/skinny_linear.txt"
  # main's kernels, then the few-row linears and the fused add + norm
  # the issue's 1,000-token drift of a bf16 state; no profile
  decode_variant none skinny_linear=0,fused_add_norm=0,attention_step=0,norm_linear=0,step_split=1 1000
  decode_variant skinny_linear_1_fused_add_norm_1 skinny_linear=1,fused_add_norm=1
fi
if [ "${DECODE2:-0}" = 1 ]; then
  # on top of the two settings above: the fused attention step, then also programmatic
  # dependent launch; the GPU tests first: theirs (tokens equal the eager / non-PDL ones), the
  # decode step's (Triton, and CuTe where staged) and generation's (graph equals eager)
  timeout -k 5 240 python -m pytest -q -m gpu tests/test_pdl.py tests/test_attention_step.py \
    tests/test_mamba3_step.py tests/test_generation.py -p no:cacheprovider -rfE 2>&1 \
    | grep -v Warning | tail -12 > "$OUT/decode2_tests.txt"
  tail -2 "$OUT/decode2_tests.txt"
  decode_variant attention_step skinny_linear=1,fused_add_norm=1,attention_step=1
  decode_variant pdl skinny_linear=1,fused_add_norm=1,attention_step=1,pdl=1
fi
if [ "${DECODE3:-0}" = 1 ]; then
  timeout -k 5 200 python -m pytest -q -m gpu tests/test_mamba3_step.py -k "split or b128 or bf16 or norm_linear" \
    tests/test_linear_kernels.py -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -8 \
    > "$OUT/step_tests.txt"
  tail -2 "$OUT/step_tests.txt"
  for launch in "" step_split=1 step_split=2 step_split=8; do
    name=$(echo "step_${launch:-default}" | tr '=,' '__')
    HYBRIDKIT_KERNELS=$launch timeout -k 5 120 python benchmarks/decode.py --skip-model \
      --out "$OUT/decode_$name" > "$OUT/decode_$name.txt" 2>&1
    show "$OUT/decode_$name.md" "$OUT/decode_$name.txt"
  done
  for launch in "" norm_linear=0 norm_linear=16; do
    name=$(echo "model_${launch:-default}" | tr '=,' '__')
    HYBRIDKIT_KERNELS=$launch timeout -k 5 120 python benchmarks/decode.py --skip-layer \
      --batch 1,16 --new 96 --states fp32 --out "$OUT/decode_$name" \
      > "$OUT/decode_$name.txt" 2>&1
    show "$OUT/decode_$name.md" "$OUT/decode_$name.txt"
  done
fi
if [ "${NCU:-0}" = 1 ]; then
  for b in 1 16; do
    timeout -k 5 240 ncu --clock-control none --profile-from-start off --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --csv --page raw python benchmarks/decode_ncu.py --batch $b > "$OUT/decode_ncu_b$b.csv" \
      2> "$OUT/decode_ncu_b$b.txt"
    python benchmarks/decode_ncu.py --summarize "$OUT/decode_ncu_b$b.csv" \
      > "$OUT/decode_ncu_b$b.md" 2>> "$OUT/decode_ncu_b$b.txt"
    show "$OUT/decode_ncu_b$b.md" "$OUT/decode_ncu_b$b.txt"
  done
fi
# every decode.py result of this warm machine's calls (kept in /tmp), side by side, main's
# kernels first -> $OUT/decode_compare.{md,json}
if ls "$OUT"/decode_*.json >/dev/null 2>&1; then
  mkdir -p /tmp/gpu_decode && cp "$OUT"/decode_*.json /tmp/gpu_decode/
  # the baselines first (each table compares against the first file that has it)
  base="none step_default model_default"
  files=$(for b in $base; do ls /tmp/gpu_decode/decode_$b.json 2>/dev/null; done
    ls /tmp/gpu_decode/decode_*.json | grep -v -e decode_none.json -e decode_step_default.json \
      -e decode_model_default.json)
  python benchmarks/decode_compare.py $files --out "$OUT/decode_compare" > /dev/null 2>&1 \
    && grep "^| " "$OUT/decode_compare.md" | head -40
fi
if [ "${TRAIN:-0}" = 1 ]; then
  for v in siso mimo; do
    recipe=benchmarks/recipes/hybrid_400m.yaml
    [ $v = mimo ] && recipe=benchmarks/recipes/hybrid_400m_mimo.yaml
    timeout -k 5 200 python -m hybridkit bench train "$recipe" --batch 4 --seq-len 4096 \
      --compile --steps 10 --out "$OUT/train_$v" > "$OUT/train_$v.txt" 2>&1
    show "$OUT/train_$v.md" "$OUT/train_$v.txt"
  done
fi
STUDY_SET=""
VERDICT=/tmp/hk_determinism_ok  # kept by a warm machine for the next calls
if [ "${DETERMINISM:-0}" = 1 ]; then
  OUT="$OUT" bash benchmarks/determinism_check.sh > "$OUT/determinism.txt" 2>&1
  tail -8 "$OUT/determinism.txt"
  if grep -q "DETERMINISM_OK=1" "$OUT/determinism.txt"; then echo 1 > $VERDICT; else echo 0 > $VERDICT; fi
fi
# studies run train.deterministic (their recipes set it) unless this machine's check failed
[ "$(cat $VERDICT 2>/dev/null)" = 0 ] && STUDY_SET="--set train.deterministic=false"
if [ "${MQAR_PROBE:-0}" = 1 ]; then
  LIMIT_S=$(( $(left) - 20 )) bash benchmarks/mqar_probe.sh > "$OUT/mqar_probe.txt" 2>&1 &
fi
for share in ${STUDIES:-}; do
  IFS=: read -r study jobs selection <<< "$share"
  bash benchmarks/study_call.sh "$study" "${selection:-} $STUDY_SET" "$(( $(left) - 15 ))" "$jobs" \
    > /dev/null 2>&1 &
done
wait
echo "call used $(( $(date +%s) - START )) s" | tee "$OUT/session.txt"
rm -f "$OUT"/*_weights.tar.gz
(cd "$OUT" && find . -maxdepth 1 -type f ! -name session.tar.gz -print0 \
  | tar -czf session.tar.gz --null -T - --remove-files)
ls -la "$OUT"
