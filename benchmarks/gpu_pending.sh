#!/usr/bin/env bash
# GPU calls for what the CPU sessions of 2026-12-06 built but no GPU ran yet:
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_pending.sh [PART]
# Here: mkdir -p .gpu/pending && tar -xzf FILES_AT/session.tar.gz -C .gpu/pending
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz.
# Parts that ran once and whose code was removed with what they timed (run them from the commit
# named, where this script still has them): "split" (the q / k pair split, d10595e:
# benchmarks/results/qk_split_h200.md), "fused" (the fused state kernel and pass, 0c4a4f8:
# fused_pass_h100.md), "tall" (the few-row linears' tall tile, 3038247: skinny_linear_tall_h100.md),
# "prefetch" (the scan chunk kernels' L2 prefetch, 469bba6: scan_prefetch_h100.md),
# "modes" (train.compile_mode on the 400M models, e3ec666:
# compile_modes_h100.md), "trainprof" (every kernel of the compiled step: train_kernels_h100.md),
# "pdl" (the 16-row kernel's head of K before the PDL wait, FINISH_PDL, the defaults at batch
# 1 / 16 / 128, e2fb5e8: decode_rows_preload_h100.md).
# PART "train": the compiled 400M SISO and MIMO (R 4) hybrids at 4 x 4,096 tokens
#   (train_throughput.py hybrid_compiled, hybrid_mimo_compiled; 6 timed steps, no profile)
#   at the defaults and under HYBRIDKIT_KERNELS=$SETTING (required), each in its own process ->
#   train_default/, train_setting/.
# PART "chunk": the SISO scan's chunk width, 32 against 64 (the default), for #17 (run once with
#   ROWS="" RUNS="c32 c64" at commit 3038247: benchmarks/results/chunk32_train_h100.md):
#   1. benchmarks/mamba3_mimo.py --shapes 0 at 32 and 64 rows per chunk -> chunk_rows<N>/;
#   2. the compiled 400M hybrid at 4 x 4,096 tokens with its Mamba-3 layers at chunk_size 32, then
#      at the default, then the Transformer (train_throughput.py, 6 timed steps, no profile),
#      each in its own process -> train_c32/, train_c64/, train_transformer/.
#   ROWS (default "32 64"; empty: no scan step) and RUNS (default "c32 c64 transformer") choose.
# PART "decode": the 400M model's generation (hybridkit bench decode, batch 1 / 16 / 128, prompt
#   128, 64 new tokens) at the defaults and under each of SETTINGS (default: step_split 8, pdl
#   off (on by default since 2026-12-07);
#   step_split 1 ran on 2026-12-07, decode_step_launch_h100.md), each in its own process ->
#   decode_<setting>/.
# PART "steplaunch" (#16: the state kernel at batch 128 is 1.27x its byte floor on the H200, 1.6x
#   with a bf16 state; 4 warps at step_split 4 and 2 were slower, decode_step_launch_h100.md;
#   step_warps=1 / 8 and step_maxnreg=64 ran on 2026-12-07, decode_step_warps_h100.md: the
#   default SETTINGS are the defaults alone): under each of SETTINGS, the step's GPU tests at
#   batch 128 (tests/test_mamba3_step.py
#   -k b128) and, only if they pass, the one-layer step benchmark (benchmarks/decode.py
#   --skip-model: kernel and layer at batch 1 / 16 / 128, fp32 and bf16 state) ->
#   step_<setting>/, each in its own process.
# PART "rows128" (#15: MIMO R 4 at 32-token chunks, 128 rows, forced past the tile rule, with
#   the backward chunk kernels at 8 warps, where a thread holds what it holds at 64 rows and 4
#   warps; the probes' "8 warps" rows of 2026-12-03/04 ran 4 warps, so this was never timed):
#   benchmarks/mamba3_mimo.py --shapes SHAPES (default 0,1) at the defaults, then with
#   --chunk-rows 128 --siso-rows 64 --force-rows (which first checks the forced chunk's outputs
#   and gradients against the default's) under each of SETTINGS (default bwd_warps=8) ->
#   rows_<setting>/. A setting siso:K runs SISO at 128-token chunks (--rank 1) under K instead.
#   Ran on an H100 on 2026-12-07 (benchmarks/results/mamba3_mimo_rows128_h100.md): slower.
# PART "ratio" (#17): the compiled 400M hybrid, the Transformer of its depth and width
#   (transformer_400m.yaml, 303M) and the one of its parameter count
#   (transformer_400m_matched.yaml, 382M) in one process (train_throughput.py, 5 timed steps, no
#   profile) -> ratio/. On an H100 on 2026-12-07 only the hybrid and the matched one ran
#   (train_throughput_matched_h100.md: 1.112x).
# PART "ab" (a decode launch constant against its default; ran as "early" for EARLY_STATE on
#   2026-12-07 with TESTS="tests/test_pdl.py tests/test_mamba3_step.py"
#   LAUNCH=step:EARLY_STATE=0 LAYER=1, decode_early_state_h100.md): 1. the GPU tests of TESTS
#   -> ab_tests.txt; 2. only if they pass, the 400M model's decoding at batch 1 / 16 / 128 (fp32
#   state, prompt 128, 64 new tokens; benchmarks/decode.py --skip-layer) at the defaults, with
#   --launch LAUNCH (required), at the defaults again, each in its own process ->
#   ab_<on|off><i>/; 3. with LAYER=1, the one-layer step benchmark at the defaults
#   (benchmarks/decode.py --skip-model) -> ab_layer/.
# PART "measure" (the defaults' numbers for #15 and #17 on whatever GPU the call got): 1.
#   benchmarks/mamba3_mimo.py at its three shapes -> mimo/; 2. the compiled 400M SISO and MIMO
#   (R 4) hybrids at 4 x 4,096 tokens in one process (train_throughput.py hybrid_compiled,
#   hybrid_mimo_compiled; 6 timed steps, no profile) -> train/.
# PART "fold" (#17: fold_norm_weight and the SwiGLU kernels under compile, both 2026-12-07): 1.
#   the GPU tests of tests/test_fold_norm_weight.py and tests/test_swiglu_kernels.py ->
#   fold_tests.txt; 2. only if they pass, the compiled 400M SISO hybrid at 4 x 4,096 tokens
#   (train_throughput.py, 8 timed steps, no profile) for each of RUNS (default "on swiglu on"):
#   on the defaults, off under fold_norm_weight=0, swiglu as hybrid_compiled_torch_swiglu
#   (Inductor's SwiGLU), each in its own process -> fold_<run><i>/. Ran first with RUNS "on off
#   swiglu on" when the swiglu run was the kernels against Inductor's default then
#   (benchmarks/results/train_fold_swiglu_h100.md).
# PART "split" (#16: the 16-row linear kernel's split over K, SPLIT_K_MAX, new 2026-12-07): 1.
#   the GPU tests of tests/test_linear_kernels.py and tests/test_pdl.py -> split_tests.txt; 2.
#   only if they pass, benchmarks/skinny_linear.py at 16 rows -> split_linear/; 3. the 400M
#   model's decoding at BATCHES (default 16; fp32 state, prompt 128, 64 new tokens;
#   benchmarks/decode.py --skip-layer) at the defaults (cuBLAS at 16 rows), with every linear on
#   the 16-row kernel (skinny_rows=16), the same without the split (--launch
#   linear:SPLIT_K_MAX=1), and at the defaults again, each in its own process -> split_<run><i>/.
#   RUNS chooses the runs (defaults, rows16, nosplit, normlin16: norm_linear=16, each block's
#   add + norm folded into its 16-row projections); it ran with the default RUNS at commit
#   dff34ef (decode_split_k_h100.md), when skinny_rows was still 1.
# PART "targets" (every issue's target numbers at the defaults, for the next H200 call; no H200
#   was lent on 2026-12-07): 1. benchmarks/decode.py (the 400M model at batch 1 / 16 / 128 with
#   fp32 and bf16 states, 128 new tokens, the bf16 state's drift over 1,000 tokens, and the
#   one-layer step) -> decode/; 2. then what PART "measure" does (MIMO scan -> mimo/, the
#   compiled SISO and MIMO models -> train/). About 6 minutes in all.
# PART "loss" (#17: the fused cross-entropy's chunk kernels, loss_kernels, new 2026-12-07 evening):
#   1. the GPU tests of tests/test_loss_kernels.py and tests/test_loss.py -> loss_tests.txt; 2.
#   only if they pass, benchmarks/loss.py (chunk level and whole loss) -> loss/; 3. the eager
#   400M hybrid (train_throughput.py hybrid_eager, 6 timed steps, no profile) with the kernels
#   (the default), with loss_kernels=0, with the kernels again, each in its own process ->
#   loss_eager_<run><i>/; 4. the compiled one (hybrid_compiled) at the default (the traced
#   Function) and with loss_op=1 (the custom op, now running the kernels) -> loss_compiled_<run>/
#   (COMPILED_RUNS, default "traced ops", chooses).
#   Ran at commit 75dfc5a (benchmarks/results/loss_kernels_h100.md), then again when the forward
#   began to form the gradients (no recomputed head matmul).
# PART "norms" (#17, eager training: train_norms, on by default since its first run,
#   benchmarks/results/train_norms_h100.md): 1. the GPU tests of tests/test_norm_kernels.py,
#   tests/test_loss_kernels.py and tests/test_loss.py -> norms_tests.txt;
#   2. only if they pass, the eager 400M hybrid (hybrid_eager, 6 timed steps, no profile) under
#   each of SETTINGS (default: the defaults, train_norms=0, the defaults), each in its own
#   process -> norms_eager<i>/; 3. the compiled one under each of COMPILED (default: the
#   defaults; set it empty for none) -> norms_compiled<i>/; 4. one table of them all
#   (train_throughput.py --compare) -> norms_compare/.
# PART "eagerprof" (#17, eager training at the defaults): the GPU tests of tests/test_layers.py and
#   tests/test_triton_model_gpu.py (the model's gradients), the eager 400M step (hybrid_eager,
#   6 timed steps, its own process) -> eager/, then one profiled step (`bench train
#   --top-kernels 60`) -> eagerprof/, with its copy and cat kernels listed (in_proj's gradient
#   cat: strided `CatArrayBatchedCopy` before 9bb45bb, vectorized expected after).
# PART "rest" (the default):
#   1. the eval decode subset through the captured graph under bf16 autocast (graph == eager),
#      and the other generation GPU tests -> tests.txt;
#   2. benchmarks/mamba3_mimo.py at its three shapes with its rate columns (TFLOP/s and GB/s of
#      forward and forward + backward, as shares of the matmul rate and copy bandwidth measured
#      in the same run) -> mimo/.
set -u
case "${1:-rest}" in
  chunk | decode | steplaunch | train | rows128 | ratio | ab | measure | fold | split | targets \
    | loss | norms | eagerprof | rest) ;;
  *) echo "unknown part $1: allowed chunk, decode, steplaunch, train, rows128, ratio, ab," \
    "measure, fold, split, targets, loss, norms, eagerprof, rest" >&2
    exit 2 ;;
esac
WORK=/tmp/hk_pending
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
# a pytest summary with passes and no failure or error
all_passed() { grep -q " passed" "$1" && ! grep -qE "[0-9]+ (failed|error)" "$1"; }
# the MIMO scan benchmark at its three shapes, at most $1 seconds -> mimo/
mimo_bench() {
  mkdir -p "$WORK/mimo"
  budgeted "$1" 120 python benchmarks/mamba3_mimo.py --out "$WORK/mimo/mamba3_mimo" --reps 100 \
    > "$WORK/mimo.txt" 2>&1
  show "$WORK/mimo/mamba3_mimo.md" "$WORK/mimo.txt" 12; pack
}
# the GPU tests of the files $2... -> $WORK/$1 (the summary's last lines), shown and packed; at
# most TESTS_S seconds (default 150)
gpu_tests() {
  local out=$WORK/$1
  shift
  budgeted "${TESTS_S:-150}" 60 python -m pytest -q -m gpu "$@" -p no:cacheprovider -rfE 2>&1 \
    | grep -v Warning | tail -10 > "$out"
  tail -3 "$out"; pack
}
# one process of train_throughput.py (no profile): $1 the run's folder under $WORK, $2 its
# HYBRIDKIT_KERNELS, $3 the case, $4 timed steps, $5 the seconds it needs left
train_case() {
  mkdir -p "$WORK/$1"
  HYBRIDKIT_KERNELS=$2 budgeted 150 "$5" python benchmarks/train_throughput.py \
    --out "$WORK/$1" --no-profile --steps "$4" --cases "$3" > "$WORK/$1.txt" 2>&1
  show "$WORK/$1/train_throughput.md" "$WORK/$1.txt" 4; pack
}
# HYBRIDKIT_KERNELS for a setting name ("defaults": none)
kernels_of() { [ "$1" = defaults ] || echo "$1"; }
if [ "${1:-rest}" = chunk ]; then
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
  for setting in defaults ${SETTINGS:-step_split=8 pdl=0}; do
    kernels=$(kernels_of "$setting")
    mkdir -p "$WORK/decode_$setting"
    HYBRIDKIT_KERNELS=$kernels budgeted 120 45 python -m hybridkit bench decode \
      benchmarks/recipes/hybrid_400m.yaml --batch 1,16,128 --prompt 128 --new 64 \
      --out "$WORK/decode_$setting/decode" > "$WORK/decode_$setting.txt" 2>&1
    echo "$setting"; show "$WORK/decode_$setting/decode.md" "$WORK/decode_$setting.txt" 5; pack
  done
elif [ "$1" = steplaunch ]; then
  for setting in ${SETTINGS:-defaults}; do
    kernels=$(kernels_of "$setting")
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
elif [ "$1" = rows128 ]; then
  for setting in base ${SETTINGS:-bwd_warps=8 siso:bwd_warps=8}; do
    args=(--chunk-rows 128 --siso-rows 64 --force-rows)
    kernels=$setting
    [ "$setting" = base ] && args=() && kernels=""
    # siso:K: SISO at 128-token chunks (the "MIMO" column, --rank 1) under K
    case $setting in siso:*) kernels=${setting#siso:}; args+=(--rank 1) ;; esac
    mkdir -p "$WORK/rows_$setting"
    HYBRIDKIT_KERNELS=$kernels budgeted 200 60 python benchmarks/mamba3_mimo.py \
      --shapes "${SHAPES:-0,1}" --reps 60 "${args[@]}" --out "$WORK/rows_$setting/mamba3_mimo" \
      > "$WORK/rows_$setting.txt" 2>&1
    echo "$setting"; grep "relative error" "$WORK/rows_$setting.txt" | tr '\n' ';' | head -c 900
    echo; show "$WORK/rows_$setting/mamba3_mimo.md" "$WORK/rows_$setting.txt" 8; pack
  done
elif [ "$1" = ratio ]; then
  mkdir -p "$WORK/ratio"
  budgeted 400 200 python benchmarks/train_throughput.py --out "$WORK/ratio" --no-profile \
    --steps 5 --warmup 2 \
    --cases hybrid_compiled,transformer_compiled,transformer_matched_compiled \
    > "$WORK/ratio.txt" 2>&1
  show "$WORK/ratio/train_throughput.md" "$WORK/ratio.txt" 14; pack
elif [ "$1" = train ]; then
  : "${SETTING:?set SETTING, the HYBRIDKIT_KERNELS value to compare with the defaults}"
  for case in hybrid_compiled hybrid_mimo_compiled; do
    for side in default setting; do
      kernels=""
      [ "$side" = setting ] && kernels=$SETTING
      echo "$side $kernels"
      train_case "train_$side/$case" "$kernels" "$case" 6 90
    done
  done
elif [ "$1" = ab ]; then
  : "${LAUNCH:?set LAUNCH, the --launch spec to time against the defaults}"
  # shellcheck disable=SC2086  # TESTS is a list of files
  gpu_tests ab_tests.txt ${TESTS:?set TESTS, the GPU test files}
  if all_passed "$WORK/ab_tests.txt"; then
    i=0
    for side in on off on; do
      i=$((i + 1))
      launch=()
      [ "$side" = off ] && launch=(--launch "$LAUNCH")
      mkdir -p "$WORK/ab_$side$i"
      budgeted 110 45 python benchmarks/decode.py --skip-layer --states fp32 --batch 1,16,128 \
        --prompt 128 --new 64 "${launch[@]}" --out "$WORK/ab_$side$i/decode" \
        > "$WORK/ab_$side$i.txt" 2>&1
      echo "$side ($i) ${launch[*]}"; show "$WORK/ab_$side$i/decode.md" "$WORK/ab_$side$i.txt" 6
      pack
    done
  fi
  if [ "${LAYER:-0}" = 1 ]; then
    mkdir -p "$WORK/ab_layer"
    budgeted 120 50 python benchmarks/decode.py --skip-model --out "$WORK/ab_layer/decode" \
      > "$WORK/ab_layer.txt" 2>&1
    show "$WORK/ab_layer/decode.md" "$WORK/ab_layer.txt" 16; pack
  fi
elif [ "$1" = measure ] || [ "$1" = targets ]; then
  if [ "$1" = targets ]; then
    mkdir -p "$WORK/decode"
    budgeted 200 90 python benchmarks/decode.py --new 128 --out "$WORK/decode/decode" \
      > "$WORK/decode.txt" 2>&1
    show "$WORK/decode/decode.md" "$WORK/decode.txt" 20; pack
  fi
  mimo_bench 200
  mkdir -p "$WORK/train"
  budgeted 400 120 python benchmarks/train_throughput.py --out "$WORK/train" --no-profile \
    --steps 6 --cases hybrid_compiled,hybrid_mimo_compiled > "$WORK/train.txt" 2>&1
  show "$WORK/train/train_throughput.md" "$WORK/train.txt" 14; pack
elif [ "$1" = fold ]; then
  gpu_tests fold_tests.txt tests/test_fold_norm_weight.py tests/test_swiglu_kernels.py
  if all_passed "$WORK/fold_tests.txt"; then
    i=0
    for run in ${RUNS:-on swiglu on}; do
      i=$((i + 1))
      kernels="" cases=hybrid_compiled
      [ "$run" = off ] && kernels=fold_norm_weight=0
      [ "$run" = swiglu ] && cases=hybrid_compiled_torch_swiglu
      echo "$run ($i) $kernels $cases"
      train_case "fold_$run$i" "$kernels" "$cases" 8 80
    done
  fi
elif [ "$1" = split ]; then
  gpu_tests split_tests.txt tests/test_linear_kernels.py tests/test_pdl.py
  if all_passed "$WORK/split_tests.txt"; then
    mkdir -p "$WORK/split_linear"
    budgeted 90 40 python benchmarks/skinny_linear.py --rows 16 \
      --out "$WORK/split_linear/skinny_linear" > "$WORK/split_linear.txt" 2>&1
    show "$WORK/split_linear/skinny_linear.md" "$WORK/split_linear.txt" 14; pack
    i=0
    for run in ${RUNS:-defaults rows16 nosplit defaults}; do
      i=$((i + 1))
      kernels="" launch=()
      case $run in
        rows16) kernels=skinny_rows=16 ;;
        nosplit) kernels=skinny_rows=16 launch=(--launch linear:SPLIT_K_MAX=1) ;;
        normlin16) kernels=norm_linear=16 ;;
      esac
      mkdir -p "$WORK/split_$run$i"
      HYBRIDKIT_KERNELS=$kernels budgeted 90 40 python benchmarks/decode.py --skip-layer \
        --states fp32 --batch "${BATCHES:-16}" --prompt 128 --new 64 "${launch[@]}" \
        --out "$WORK/split_$run$i/decode" > "$WORK/split_$run$i.txt" 2>&1
      echo "$run ($i) $kernels ${launch[*]}"
      show "$WORK/split_$run$i/decode.md" "$WORK/split_$run$i.txt" 6; pack
    done
  fi
elif [ "$1" = loss ]; then
  gpu_tests loss_tests.txt tests/test_loss_kernels.py tests/test_loss.py
  if all_passed "$WORK/loss_tests.txt"; then
    mkdir -p "$WORK/loss"
    budgeted 120 60 python benchmarks/loss.py --out "$WORK/loss/loss" > "$WORK/loss.txt" 2>&1
    show "$WORK/loss/loss.md" "$WORK/loss.txt" 24; pack
    i=0
    for run in ${RUNS:-on off on}; do
      i=$((i + 1))
      kernels=""
      [ "$run" = off ] && kernels=loss_kernels=0
      echo "eager $run ($i) $kernels"
      train_case "loss_eager_$run$i" "$kernels" hybrid_eager 6 70
    done
    for run in ${COMPILED_RUNS-traced ops}; do
      kernels=""
      [ "$run" = ops ] && kernels=loss_op=1
      echo "compiled $run $kernels"
      train_case "loss_compiled_$run" "$kernels" hybrid_compiled 6 80
    done
  fi
elif [ "$1" = eagerprof ]; then
  # (150 s ran out after 4 passes on an H100 on 2026-12-08)
  TESTS_S=260 gpu_tests eagerprof_tests.txt tests/test_layers.py tests/test_triton_model_gpu.py \
    -k "not cuda_graph_compile"
  train_case eager "" hybrid_eager 6 70
  mkdir -p "$WORK/eagerprof"
  budgeted 150 40 python -m hybridkit bench train benchmarks/recipes/hybrid_400m.yaml --batch 4 \
    --seq-len 4096 --steps 6 --top-kernels 60 --out "$WORK/eagerprof/eager_profile" \
    > "$WORK/eagerprof.txt" 2>&1
  python - "$WORK/eagerprof/eager_profile.json" <<'EOF' | tee -a "$WORK/eagerprof.txt"
import json, sys
run = json.load(open(sys.argv[1]))["rank0"]
print("timed steps (ms):", [round(t, 1) for t in run["step_ms_all"]])
print("host time to issue them (ms):", [round(t, 1) for t in run.get("host_ms_all") or []])
for k in run["top_kernels"]:
    if "cat" in k["name"].lower() or "copy" in k["name"].lower():
        print(f"{k['ms']:.3f} ms {k['count']} launches {k['name'][:100]}")
EOF
  pack
elif [ "$1" = norms ]; then
  gpu_tests norms_tests.txt tests/test_norm_kernels.py tests/test_loss_kernels.py tests/test_loss.py
  if all_passed "$WORK/norms_tests.txt"; then
    i=0
    for setting in ${SETTINGS:-defaults train_norms=0 defaults}; do
      i=$((i + 1))
      echo "eager ($i) $setting"
      train_case "norms_eager$i" "$(kernels_of "$setting")" hybrid_eager 6 70
    done
    i=0
    for setting in ${COMPILED-defaults}; do
      i=$((i + 1))
      echo "compiled ($i) $setting"
      train_case "norms_compiled$i" "$(kernels_of "$setting")" hybrid_compiled 6 80
    done
    # one table of every run, each row with the settings it recorded (no GPU needed)
    # shellcheck disable=SC2046  # one argument per run's file (paths without spaces)
    python benchmarks/train_throughput.py --compare $(ls "$WORK"/norms_eager*/train_throughput.json \
      "$WORK"/norms_compiled*/train_throughput.json 2>/dev/null) --out "$WORK/norms_compare" \
      > "$WORK/norms_compare.txt" 2>&1
    show "$WORK/norms_compare/train_compare.md" "$WORK/norms_compare.txt" 14; pack
  fi
else
  budgeted 150 60 python -m pytest -q -m gpu tests/test_generation.py -p no:cacheprovider -rfE \
    2>&1 | grep -v Warning | tail -15 > "$WORK/tests.txt"
  tail -3 "$WORK/tests.txt"; pack
  mimo_bench 300
fi
