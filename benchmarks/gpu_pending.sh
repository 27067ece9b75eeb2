#!/usr/bin/env bash
# GPU calls for what the CPU sessions of 2026-12-06 built but no GPU ran yet:
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_pending.sh [PART]
# Here: mkdir -p .gpu/pending && tar -xzf FILES_AT/session.tar.gz -C .gpu/pending
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz.
# PART "split" (default) ran once, at commit d10595e (benchmarks/results/qk_split_h200.md); the
#   qk_split / qk_maxnreg settings and tests/test_qk_split.py were removed after it, so re-run it
#   from that commit:
#   1. the GPU tests of the q / k kernels' pair split (tests/test_qk_split.py) -> split_tests.txt;
#   2. only if they pass, benchmarks/mamba3_mimo.py at (8, 4096, 32, 64, 128) under each kernel
#      setting of SETTINGS (unsplit first; qk_split 2 / 4, with and without a 168-register cap
#      on the q / k kernels; the x kernel at 8 warps, which until 2026-12-06 never reached the
#      kernel) -> split_<setting>/ (MIMO R 4 and SISO forward + backward in each process);
#   3. the q / k kernels' registers and spills with this Triton (sm_90, SISO and R 4, split 1 /
#      2 / 4) -> regs_r*.txt.
# PART "train": the compiled 400M SISO and MIMO (R 4) hybrids at 4 x 4,096 tokens
#   (train_throughput.py hybrid_compiled, hybrid_mimo_compiled; 6 timed steps, no profile)
#   unsplit and under HYBRIDKIT_KERNELS=$SETTING (default qk_split=2), each in its own
#   process -> train_default/, train_setting/.
# PART "fused" ran once, at commit 0c4a4f8 (benchmarks/results/fused_pass_h100.md); the
#   fused_pass / fused_bwd_pass settings and tests/test_fused_pass.py were removed after it, so
#   re-run it from that commit:
#   1. the GPU tests of the fused state + pass kernels (tests/test_fused_pass.py) -> fused_tests.txt;
#   2. only if they pass, benchmarks/mamba3_mimo.py at SHAPES (default 0,1: (8, 4096) and
#      (1, 16384)) under each of SETTINGS (two launches, the fused forward, the fused backward,
#      both), each in its own process -> fused_<setting>/.
# PART "chunk": the SISO scan's chunk width, 32 against 64 (the default), for #17 (run once with
#   ROWS="" RUNS="c32 c64" at commit 3038247: benchmarks/results/chunk32_train_h100.md):
#   1. benchmarks/mamba3_mimo.py --shapes 0 at 32 and 64 rows per chunk -> chunk_rows<N>/;
#   2. the compiled 400M hybrid at 4 x 4,096 tokens with its Mamba-3 layers at chunk_size 32, then
#      at the default, then the Transformer (train_throughput.py, 6 timed steps, no profile),
#      each in its own process -> train_c32/, train_c64/, train_transformer/.
#   ROWS (default "32 64"; empty: no scan step) and RUNS (default "c32 c64 transformer") choose.
# PART "decode": the 400M model's generation (hybridkit bench decode, batch 1 / 16 / 128, prompt
#   128, 64 new tokens) at the defaults and under each of SETTINGS (default: step_split 1, which
#   has no finish launch, step_split 8, pdl), each in its own process -> decode_<setting>/.
# PART "tall" ran once, at commit 3038247 (benchmarks/results/skinny_linear_tall_h100.md); the tall
#   tile was removed after it (slower than cuBLAS), so re-run it from that commit:
#   1. its GPU tests (tests/test_linear_kernels.py -m gpu, 128 rows included) -> tall_tests.txt;
#   2. only if they pass, benchmarks/skinny_linear.py --rows 128 --sweep (against cuBLAS, then
#      the tall launches) -> tall/skinny_linear;
#   3. the 400M model's generation at batch 16 / 128 at the defaults, with skinny_rows 128 and
#      with norm_linear 128 too, one process each -> tall_decode_<setting>/ (TALL_SETTINGS and
#      BATCH choose).
# PART "steplaunch" (#16: the state kernel at batch 128 is 1.27x its byte floor on the H200, 1.6x
#   with a bf16 state; the split step's launch, 2 warps a program at step_split 4, was never
#   swept): under each of SETTINGS, the step's GPU tests at batch 128 (tests/test_mamba3_step.py
#   -k b128) and, only if they pass, the one-layer step benchmark (benchmarks/decode.py
#   --skip-model: kernel and layer at batch 1 / 16 / 128, fp32 and bf16 state) ->
#   step_<setting>/, each in its own process.
# PART "rest":
#   1. the eval decode subset through the captured graph under bf16 autocast (graph == eager),
#      and the other generation GPU tests -> tests.txt;
#   2. benchmarks/mamba3_mimo.py at its three shapes with its rate columns (TFLOP/s and GB/s of
#      forward and forward + backward, as shares of the matmul rate and copy bandwidth measured
#      in the same run) -> mimo/.
set -u
WORK=/tmp/hk_pending
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
# a pytest summary with passes and no failure or error
all_passed() { grep -q " passed" "$1" && ! grep -qE "[0-9]+ (failed|error)" "$1"; }
if [ "${1:-split}" = split ]; then
  budgeted 200 60 python -m pytest -q -m gpu -n 8 tests/test_qk_split.py -p no:cacheprovider \
    -rfE 2>&1 | grep -v Warning | tail -25 > "$WORK/split_tests.txt"
  tail -3 "$WORK/split_tests.txt"; pack
  if all_passed "$WORK/split_tests.txt"; then
    for setting in ${SETTINGS:-qk_split=1 qk_split=2 qk_split=4 qk_split=2,qk_maxnreg=168 \
      qk_split=4,qk_maxnreg=168 bwd_x_warps=8}; do
      mkdir -p "$WORK/split_$setting"
      HYBRIDKIT_KERNELS=$setting budgeted 120 60 python benchmarks/mamba3_mimo.py --shapes 0 \
        --reps 60 --out "$WORK/split_$setting/mamba3_mimo" > "$WORK/split_$setting.txt" 2>&1
      echo "$setting"; show "$WORK/split_$setting/mamba3_mimo.md" "$WORK/split_$setting.txt" 4
      pack
    done
  fi
  for r in 1 4; do
    for js in 1 2 4; do
      budgeted 40 20 python benchmarks/siso_sm90_report.py --top 0 --rank "$r" --qk-split "$js" \
        _bwd_q _bwd_k 2>&1 | grep -v "^ \|Warning\|warn" >> "$WORK/regs_r$r.txt"
    done
    cat "$WORK/regs_r$r.txt"; pack
  done
elif [ "$1" = fused ]; then
  budgeted 150 60 python -m pytest -q -m gpu -n 8 tests/test_fused_pass.py -p no:cacheprovider \
    -rfE 2>&1 | grep -v Warning | tail -25 > "$WORK/fused_tests.txt"
  tail -3 "$WORK/fused_tests.txt"; pack
  if all_passed "$WORK/fused_tests.txt"; then
    for setting in ${SETTINGS:-fused_pass=0 fused_pass=1 fused_bwd_pass=1 \
      fused_pass=1,fused_bwd_pass=1}; do
      mkdir -p "$WORK/fused_$setting"
      HYBRIDKIT_KERNELS=$setting budgeted 110 60 python benchmarks/mamba3_mimo.py \
        --shapes "${SHAPES:-0,1}" --reps 60 --out "$WORK/fused_$setting/mamba3_mimo" \
        > "$WORK/fused_$setting.txt" 2>&1
      echo "$setting"; show "$WORK/fused_$setting/mamba3_mimo.md" "$WORK/fused_$setting.txt" 6
      pack
    done
  fi
elif [ "$1" = chunk ]; then
  for rows in ${ROWS-32 64}; do
    mkdir -p "$WORK/chunk_rows$rows"
    budgeted 90 40 python benchmarks/mamba3_mimo.py --shapes 0 --reps 60 --chunk-rows $rows \
      --out "$WORK/chunk_rows$rows/mamba3_mimo" > "$WORK/chunk_rows$rows.txt" 2>&1
    echo "rows $rows"; show "$WORK/chunk_rows$rows/mamba3_mimo.md" "$WORK/chunk_rows$rows.txt" 4
    pack
  done
  for run in ${RUNS:-c32 c64 transformer}; do
    case $run in
      c32) args=(--cases hybrid_compiled --set model.blocks.m.mixer.chunk_size=32) ;;
      c64) args=(--cases hybrid_compiled) ;;
      *) args=(--cases transformer_compiled) ;;
    esac
    mkdir -p "$WORK/train_$run"
    budgeted 150 80 python benchmarks/train_throughput.py --out "$WORK/train_$run" --no-profile \
      --steps 6 "${args[@]}" > "$WORK/train_$run.txt" 2>&1
    echo "$run"; show "$WORK/train_$run/train_throughput.md" "$WORK/train_$run.txt" 4; pack
  done
elif [ "$1" = decode ]; then
  for setting in defaults ${SETTINGS:-step_split=1 step_split=8 pdl=1}; do
    kernels=$setting
    [ "$setting" = defaults ] && kernels=""
    mkdir -p "$WORK/decode_$setting"
    HYBRIDKIT_KERNELS=$kernels budgeted 120 45 python -m hybridkit bench decode \
      benchmarks/recipes/hybrid_400m.yaml --batch 1,16,128 --prompt 128 --new 64 \
      --out "$WORK/decode_$setting/decode" > "$WORK/decode_$setting.txt" 2>&1
    echo "$setting"; show "$WORK/decode_$setting/decode.md" "$WORK/decode_$setting.txt" 5; pack
  done
elif [ "$1" = tall ]; then
  budgeted 150 60 python -m pytest -q -m gpu -n 4 tests/test_linear_kernels.py -k "${TESTS_K:-}" \
    -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -25 > "$WORK/tall_tests.txt"
  tail -3 "$WORK/tall_tests.txt"; pack
  if all_passed "$WORK/tall_tests.txt"; then
    mkdir -p "$WORK/tall"
    budgeted 200 60 python benchmarks/skinny_linear.py --rows 128 --sweep \
      --out "$WORK/tall/skinny_linear" > "$WORK/tall.txt" 2>&1
    show "$WORK/tall/skinny_linear.md" "$WORK/tall.txt" 40; pack
    for setting in ${TALL_SETTINGS:-defaults skinny_rows=128 skinny_rows=128,norm_linear=128}; do
      kernels=$setting
      [ "$setting" = defaults ] && kernels=""
      mkdir -p "$WORK/tall_decode_$setting"
      HYBRIDKIT_KERNELS=$kernels budgeted 100 45 python -m hybridkit bench decode \
        benchmarks/recipes/hybrid_400m.yaml --batch "${BATCH:-16,128}" --prompt 128 --new 64 \
        --out "$WORK/tall_decode_$setting/decode" > "$WORK/tall_decode_$setting.txt" 2>&1
      echo "$setting"
      show "$WORK/tall_decode_$setting/decode.md" "$WORK/tall_decode_$setting.txt" 4; pack
    done
  fi
elif [ "$1" = steplaunch ]; then
  for setting in ${SETTINGS:-defaults step_warps=1 step_warps=4 step_warps=8 step_maxnreg=64 \
    step_split=2,step_warps=4}; do
    kernels=$setting
    [ "$setting" = defaults ] && kernels=""
    mkdir -p "$WORK/step_$setting"
    HYBRIDKIT_KERNELS=$kernels budgeted 70 40 python -m pytest -q -m gpu tests/test_mamba3_step.py \
      -k b128 -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -8 \
      > "$WORK/step_$setting/tests.txt"
    echo "$setting"; tail -1 "$WORK/step_$setting/tests.txt"
    if all_passed "$WORK/step_$setting/tests.txt"; then
      HYBRIDKIT_KERNELS=$kernels budgeted 90 40 python benchmarks/decode.py --skip-model \
        --out "$WORK/step_$setting/decode" > "$WORK/step_$setting.txt" 2>&1
      show "$WORK/step_$setting/decode.md" "$WORK/step_$setting.txt" 9
    fi
    pack
  done
elif [ "$1" = train ]; then
  for case in hybrid_compiled hybrid_mimo_compiled; do
    for side in default setting; do
      kernels=""
      [ "$side" = setting ] && kernels=${SETTING:-qk_split=2}
      mkdir -p "$WORK/train_$side/$case"
      HYBRIDKIT_KERNELS=$kernels budgeted 150 90 python benchmarks/train_throughput.py \
        --out "$WORK/train_$side/$case" --no-profile --steps 6 --cases "$case" \
        > "$WORK/train_${side}_$case.txt" 2>&1
      echo "$side $kernels"
      show "$WORK/train_$side/$case/train_throughput.md" "$WORK/train_${side}_$case.txt" 4; pack
    done
  done
else
  budgeted 150 60 python -m pytest -q -m gpu tests/test_generation.py -p no:cacheprovider -rfE \
    2>&1 | grep -v Warning | tail -15 > "$WORK/tests.txt"
  tail -3 "$WORK/tests.txt"; pack
  mkdir -p "$WORK/mimo"
  budgeted 300 120 python benchmarks/mamba3_mimo.py --out "$WORK/mimo/mamba3_mimo" --reps 100 \
    > "$WORK/mimo.txt" 2>&1
  show "$WORK/mimo/mamba3_mimo.md" "$WORK/mimo.txt" 12; pack
fi
