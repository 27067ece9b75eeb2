#!/usr/bin/env bash
# The short form of gpu_mimo_output.sh for a call of about three minutes (a warm machine after a
# study call): the MIMO output kernels' GPU tests at the model's shapes, then the launch sweep at
# the first benchmark shape only (ours vs the torch formula eager and under Inductor).
#   source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_mimo_output_short.sh
# Here: mkdir -p .gpu/mos && tar -xzf FILES_AT/session.tar.gz -C .gpu/mos
set -u
OUT=${OUT:-/tmp/gpu_mimo_output_short}
WORK=/tmp/hk_mimo_output_short
mkdir -p "$OUT" "$WORK"
pack() { tar -czf "$OUT/session.tar.gz" -C "$WORK" . ; }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$WORK/device.txt"
par=""; python -c "import xdist" 2>/dev/null && par="-n 4"
timeout -k 5 80 python -m pytest -q -m gpu $par tests/test_mimo_output.py -p no:cacheprovider \
  -k "not compiled" -rfE 2>&1 | grep -v Warning | tail -30 > "$WORK/mimo_output_tests.txt"
tail -4 "$WORK/mimo_output_tests.txt"; pack
timeout -k 5 "${BENCH_S:-100}" python benchmarks/mimo_output.py --cases 1 --out "$WORK/mimo_output" \
  > "$WORK/mimo_output.txt" 2>&1
grep "^| \|^Ours at\|^The forward" "$WORK/mimo_output.md" 2>/dev/null || tail -5 "$WORK/mimo_output.txt"
pack
