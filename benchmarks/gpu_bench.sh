#!/usr/bin/env bash
# The benchmark call that follows gpu_verify.sh on the same warm machine (FA4 installed there):
#   source .gpu/cute2/env.sh && bash benchmarks/gpu_bench.sh [CANDIDATE.patch]
# 1. the MIMO scan benchmark on main's kernels and, with a patch, on the candidate's (same call,
#    so the two are comparable);
# 2. the training-throughput cases that decide #15 / #17 in one process (ratios valid): SISO,
#    MIMO and Transformer, compiled, run from the candidate's tree when its GPU tests passed in
#    gpu_verify.sh (/tmp/candidate/PASSED), else from main's.
set -u
OUT=${OUT:-/tmp/gpu_bench}
PATCH=${1:-}
mkdir -p "$OUT"
ROOT=$PWD
source benchmarks/candidate.sh
if [ -n "$PATCH" ]; then make_candidate "$PATCH" || PATCH=""; fi  # reused from gpu_verify.sh
timeout -k 5 150 python benchmarks/mamba3_mimo.py --out "$OUT/mimo_main" --reps 100 > "$OUT/mimo_main.txt" 2>&1
tail -8 "$OUT/mimo_main.txt"
TREE=$ROOT
if [ -n "$PATCH" ]; then
  in_candidate timeout -k 5 150 python benchmarks/mamba3_mimo.py --out "$OUT/mimo_candidate" \
    --reps 100 > "$OUT/mimo_candidate.txt" 2>&1
  tail -8 "$OUT/mimo_candidate.txt"
  [ -f /tmp/candidate/PASSED ] && TREE=/tmp/candidate
fi
echo "training cases from $TREE" | tee "$OUT/tt_tree.txt"
(cd "$TREE" && PYTHONPATH="$TREE:$PYTHONPATH" timeout -k 5 200 python benchmarks/train_throughput.py \
  --out "$OUT/tt" --no-profile --steps 6 \
  --cases hybrid_compiled,hybrid_mimo_compiled,transformer_compiled > "$OUT/tt.txt" 2>&1)
tail -12 "$OUT/tt.txt"
ls "$OUT"
