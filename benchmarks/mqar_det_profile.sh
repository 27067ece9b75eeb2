#!/usr/bin/env bash
# One GPU call (#18), after benchmarks/mqar_step_time.sh found train.deterministic costing an
# MQAR step 2.7-4.4x: `hybridkit bench train` (eager, with the profiled top kernels) of the
# study's arms at D 8, deterministic on and off -> $OUT/det_{ARM}_{on,off}.{json,md}.
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/mqar_det_profile.sh
set -u
OUT=${OUT:-/tmp/mqar_det_profile}
mkdir -p "$OUT"
for arm in "attention:a a" "mamba3:m m"; do
  for det in on off; do
    flag=false; [ "$det" = on ] && flag=true
    timeout -k 5 100 python -m hybridkit bench train hybridkit/recipes/mqar_m.yaml \
      --set "model.layout=${arm#*:}" --set "train.deterministic=$flag" \
      --set task.num_kv_pairs=8 --steps 20 --warmup 5 --out "$OUT/det_${arm%%:*}_$det" \
      > "$OUT/det_${arm%%:*}_$det.txt" 2>&1
    grep -m1 "step ms\|^| " "$OUT/det_${arm%%:*}_$det.md" 2>/dev/null | head -3
    grep "^| " "$OUT/det_${arm%%:*}_$det.md" 2>/dev/null | sed -n 3,4p
    tail -n 2 "$OUT/det_${arm%%:*}_$det.txt"
  done
done
