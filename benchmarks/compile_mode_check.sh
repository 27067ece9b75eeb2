#!/usr/bin/env bash
# The first GPU call of the next study session (issue #18): is train.compile_mode reduce-overhead
# (CUDA graphs) worth using for the NIAH study's remaining runs, and do this session's GPU fixes
# hold? ~3-4 minutes on an H200, after `source .gpu/base/env.sh` (or cute2/env.sh for FA4).
#   1. the new GPU tests: FA4 with a float32 KV cache under bf16 autocast; reduce-overhead trains
#      like default compile;
#   2. `hybridkit bench train` of niah_m (the NIAH study's base) compiled in both modes: step time
#      (median of 20 after 3 untimed), tokens/s, memory.
# Everything lands in $OUT/compile_mode_check.tar.gz (the device tool returns few, shallow files).
set -u
OUT=${OUT:-/tmp/compile_mode_check}
R=$OUT/compile_mode_check
mkdir -p "$R"
timeout 150 python -m pytest -q -m gpu tests/test_attention_backends.py tests/test_triton_model_gpu.py \
  -k "float32_model_decodes or cuda_graph_compile_mode or mixed_dtype" 2>&1 | tail -6 | tee "$R/tests.txt"
for mode in default reduce-overhead; do
  timeout 150 python -m hybridkit bench train hybridkit/recipes/niah_m.yaml --batch 64 --seq-len 256 \
    --steps 20 --no-profile --compile --set "train.compile_mode=$mode" --out "$R/niah_m_$mode" 2>&1 \
    | grep -v Warning | tail -8 | tee "$R/niah_m_$mode.txt"
done
tar -czf "$OUT/compile_mode_check.tar.gz" -C "$OUT" compile_mode_check && rm -rf "$R"
