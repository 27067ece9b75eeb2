#!/usr/bin/env bash
# One GPU call for the `qk_heads` kernel setting (hybridkit/kernels/config.py): the scan
# backward's q and k kernels summing dq / dk over several heads of a group per program instead of
# writing per-head rows for torch to sum (#15: at rank 4 those rows are two 537 MB buffers per
# layer of the 400M MIMO model, and their sums 7.6 ms of its step on the H100).
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_qk_heads.sh
# Here: mkdir -p .gpu/qk && tar -xzf FILES_AT/session.tar.gz -C .gpu/qk
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz:
#   1. tests/test_qk_heads.py -m gpu (SISO and MIMO grid cases at qk_heads 2 and 4 against the
#      float64 references) -> qk_tests.txt;
#   2. benchmarks/mamba3_mimo.py at its first shape (8, 4096, 32, 64, 128), MIMO R 4 and SISO,
#      under qk_heads 1 (today's default), 32 (the whole group: one program per chunk), 4 and 8
#      -> mimo_qk{N}.{json,md,txt};
#   3. `hybridkit bench train` of the compiled 400M MIMO hybrid at 4 x 4,096 tokens under the
#      setting that was fastest in step 2, then under qk_heads 1 (the baseline, same call)
#      -> train_qk{N}.{json,md,txt}.
# A setting is only a candidate for the default if step 1 passed.
set -u
WORK=/tmp/hk_qk_heads
source benchmarks/gpu_call.sh
budgeted 200 60 python -m pytest -q -m gpu -n 8 tests/test_qk_heads.py -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -25 > "$WORK/qk_tests.txt"
tail -3 "$WORK/qk_tests.txt"; pack
for qk in 1 32 4 8; do
  # keep ~230 s for the two model runs
  [ "$(left)" -lt 320 ] && { echo "no time for qk_heads=$qk"; continue; }
  HYBRIDKIT_KERNELS=qk_heads=$qk budgeted 100 60 python benchmarks/mamba3_mimo.py \
    --out "$WORK/mimo_qk$qk" --shapes 0 --reps 50 > "$WORK/mimo_qk$qk.txt" 2>&1
  show "$WORK/mimo_qk$qk.md" "$WORK/mimo_qk$qk.txt" 8; pack
done
# the setting with the fastest MIMO forward + backward (1 when none was timed)
read -r best best_ms < <(python - "$WORK" <<'PY'
import json, pathlib, sys
times = {}
for path in pathlib.Path(sys.argv[1]).glob("mimo_qk*.json"):
    try:  # a run cut off may have left no row
        times[int(path.stem[7:])] = json.loads(path.read_text())["rows"][0]["mimo"]["fwdbwd_ms"]
    except (ValueError, LookupError):
        pass
best = min(times, key=times.get, default=1)
print(best, times.get(best, "n/a"))
PY
)
echo "fastest: qk_heads=$best ($best_ms ms)" | tee "$WORK/best.txt"
for qk in $(printf '%s\n' "$best" 1 | awk '!seen[$0]++'); do
  HYBRIDKIT_KERNELS=qk_heads=$qk budgeted 170 90 python -m hybridkit bench train \
    benchmarks/recipes/hybrid_400m_mimo.yaml --batch 4 --seq-len 4096 --compile --steps 8 \
    --out "$WORK/train_qk$qk" > "$WORK/train_qk$qk.txt" 2>&1
  show "$WORK/train_qk$qk.md" "$WORK/train_qk$qk.txt" 16; pack
done
