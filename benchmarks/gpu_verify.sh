#!/usr/bin/env bash
# One GPU call that re-checks everything not yet confirmed on the H200 (see
# benchmarks/results/gpu_tests_h200.md, run 5), writing each part under $OUT as it finishes:
#   source .gpu/base/env.sh && bash benchmarks/gpu_verify.sh
# 1. the whole GPU suite (fuzz and 2^31 tests included) with failures named;
# 2. the decode benchmark's one-layer step and bf16-state drift (never run);
# 3. the training-throughput cases that decide #15 / #17 (same process: ratios are valid).
# Each part has its own timeout so a slow one cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/gpu_verify}
mkdir -p "$OUT"
timeout -k 5 300 python -m pytest -q -m gpu -n 14 --dist loadgroup tests -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -80 > "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
timeout -k 5 130 python benchmarks/decode.py --out "$OUT/decode" --new 96 --drift-tokens 500 > "$OUT/decode.txt" 2>&1
timeout -k 5 140 python benchmarks/train_throughput.py --out "$OUT/tt" --no-profile --steps 6 \
  --cases hybrid_compiled,hybrid_mimo_compiled,transformer_compiled > "$OUT/tt.txt" 2>&1
ls "$OUT"
