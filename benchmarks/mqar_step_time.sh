#!/usr/bin/env bash
# One GPU call (#18): why an MQAR run (mqar_m.yaml: 2 layers, d_model 128, batch 128 x 256
# tokens) takes ~0.12 s per step even compiled, which makes the 48-run study cost far more
# device time than its model size suggests. Each arm trains alone on the GPU for STEPS steps
# (default 400) under the study's settings (compile, deterministic), then without deterministic
# mode, then eager; the median step time of the logged intervals after step 100 (compilation
# done) is printed per setting -> $OUT/mqar_step_time.{txt,md}; the GPU test of the embedding
# lookup (hybridkit/kernels/embedding.py) first -> $OUT/embedding_tests.txt.
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/mqar_step_time.sh
# The scored-rows A/B (2026-12-06): ROWS=det OUT=$OUT bash benchmarks/mqar_step_time.sh; then
# HYBRIDKIT_KERNELS=scored_rows=0 ROWS=det OUT=$OUT bash benchmarks/mqar_step_time.sh.
# ROWS=det runs only the study's setting (compiled, deterministic) for each arm: the two rows the
# embedding change is meant to bring down, ~2 min instead of ~5.
set -u
ROWS=${ROWS:-all}
ARMS=${ARMS:-attention mamba3}  # ARMS=attention: one arm (about half the device time)
OUT=${OUT:-/tmp/mqar_step_time}
STEPS=${STEPS:-400}
WORK=/tmp/hk_mqar_step
mkdir -p "$OUT" "$WORK"
# the embedding dispatch point's GPU test first (compiled deterministic gradient = eager, twice
# bitwise), since the deterministic rows below depend on it
timeout -k 5 120 python -m pytest -q -m gpu tests/test_embedding_lookup.py -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -5 > "$OUT/embedding_tests.txt"
tail -n 1 "$OUT/embedding_tests.txt"
# a second invocation into the same $OUT (e.g. with HYBRIDKIT_KERNELS=scored_rows=0) appends its
# rows to the same table; the kernels column tells them apart
md="$OUT/mqar_step_time.md"
if [ ! -f "$md" ]; then
  echo "| arm | compile | deterministic | kernels | median step s (steps 100+) | wall s |" > "$md"
  echo "|---|---|---|---|---|---|" >> "$md"
fi
run() {  # NAME LAYOUT COMPILE DETERMINISTIC [extra --set]
  local kernels="${HYBRIDKIT_KERNELS:-defaults}" t0 t1
  local dir="$WORK/$1-c$3-d$4-${kernels//[^a-z0-9]/_}"
  rm -rf "$dir"; t0=$(date +%s)
  timeout -k 5 "${RUN_S:-150}" python -m hybridkit train hybridkit/recipes/mqar_m.yaml -o "$dir" \
    --no-progress --set "model.layout=$2" --set "train.compile=$3" \
    --set "train.deterministic=$4" --set task.num_kv_pairs=8 --set "train.steps=$STEPS" \
    --set train.checkpoint_every=100000 --set "task.eval_lengths=[256]" \
    --set task.eval_examples=250 "${@:5}" > "$dir.txt" 2>&1
  t1=$(date +%s)
  med=$(python - "$dir/metrics.jsonl" <<'PY'
import json, statistics, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
    times = [r["step_time"] for r in rows if "step_time" in r and r.get("step", 0) > 100]
    print(f"{statistics.median(times):.4f}" if times else "none")
except OSError:
    print("no metrics")
PY
)
  echo "| $1 | $3 | $4 | $kernels | $med | $((t1 - t0)) |" | tee -a "$md"
  tail -n 3 "$dir.txt" >> "$OUT/mqar_step_time.txt"
}
case " $ARMS " in *" attention "*)
  run attention "a a" true true
  [ "$ROWS" = det ] || run attention "a a" true false
  [ "$ROWS" = det ] || run attention "a a" false false
esac
case " $ARMS " in *" mamba3 "*)
  run mamba3 "m m" true true
  [ "$ROWS" = det ] || run mamba3 "m m" true false
esac
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader >> "$md"
