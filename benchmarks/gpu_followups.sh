#!/usr/bin/env bash
# One GPU call, right after a short call that carried .gpu/base + .gpu/cute1 (the CuTe DSL wheel's
# first half; see .gpu/base/env.sh), for what the open issues still lack, each part under its own
# timeout and everything back in at most 8 files (the device tool's limit):
#   carry [".gpu/cute2", ...]; source .gpu/cute2/env.sh && bash benchmarks/gpu_followups.sh [STUDY "SELECTION" [JOBS]]
# 1. #16: the FA4 decode op's GPU tests (`-k fa4_decode`), then the 400M model's decode with the
#    attention step through FA4 (fa4_decode=1), through masked SDPA, and compiled, each with the
#    per-token kernel profile, same call;
# 2. #17: 1 x 16,384 tokens with activation checkpointing (compiled); (the 300-step loss curves
#    this script also ran are in benchmarks/results/loss_curve_h200.md);
# 3. #18, with what is left of the call: a study share through benchmarks/study_call.sh.
set -u
OUT=${OUT:-/tmp/gpu_followups}
mkdir -p "$OUT/decode"
START=$SECONDS
# every part's timeout is cut to what is left of a 560 s call, and the results so far are
# archived after each part, so a call cut off at its limit still brings back what it measured
lim() { local left=$((560 - (SECONDS - START))); echo $(( $1 < left ? $1 : left )); }
pack() { tar -czf "$OUT/followups.tar.gz" -C "$OUT" decode $(ls -d "$OUT"/ckpt16k 2>/dev/null | xargs -r -n1 basename) 2>/dev/null; }
timeout -k 5 "$(lim 120)" python -m pytest -q -m gpu -n 4 -k fa4_decode \
  tests/test_attention_backends.py tests/test_generation.py -p no:cacheprovider -rfE 2>&1 \
  | grep -v Warning | tail -30 > "$OUT/fa4_decode_tests.txt"
tail -2 "$OUT/fa4_decode_tests.txt"
# fa4_decode on and off, then the step compiled (Inductor fuses the element-wise ops), each
# with the per-token kernel profile (--profile)
for variant in fa4-1 fa4-0 fa4-0-compiled; do
  fa4=$(echo $variant | cut -d- -f2); flags=--profile; limit=90
  [ $variant = fa4-0-compiled ] && flags="--profile --compile" && limit=200
  [ "$(lim $limit)" -gt 20 ] || break
  HYBRIDKIT_KERNELS=fa4_decode=$fa4 timeout -k 5 "$(lim $limit)" python -m hybridkit bench \
    decode benchmarks/recipes/hybrid_400m.yaml --batch 1,16,128 --prompt 128 --new 96 $flags \
    --out "$OUT/decode/$variant" > "$OUT/decode/$variant.txt" 2>&1 \
    || echo "$variant failed: $(tail -1 "$OUT/decode/$variant.txt")"
  grep "^| [0-9]" "$OUT/decode/$variant.md" 2>/dev/null | sed "s/^/$variant /"
  pack
done
if [ "$(lim 240)" -gt 60 ]; then
  timeout -k 5 "$(lim 240)" python benchmarks/train_throughput.py --out "$OUT/ckpt16k" \
    --cases hybrid_16k_ckpt > "$OUT/ckpt16k.txt" 2>&1 || echo "16k: $(tail -1 "$OUT/ckpt16k.txt")"
  grep "hybrid_16k" "$OUT/ckpt16k/train_throughput.md" 2>/dev/null | head -2
  pack
fi
if [ -n "${1:-}" ] && [ "$(lim 600)" -gt 60 ]; then
  bash benchmarks/study_call.sh "$1" "${2:-}" "$(lim 600)" "${3:-1}"
fi
pack && rm -rf "$OUT/decode" "$OUT/ckpt16k"
ls "$OUT"
