#!/usr/bin/env bash
# One GPU call (Triton only: carry .gpu/base) for the measurements the open issues wait on, each
# part under its own timeout, results under $OUT as they finish:
#   source .gpu/base/env.sh && bash benchmarks/gpu_open_questions.sh [CANDIDATE.patch]
# 1. #18: the training step of niah_m (the NIAH study's base) eager and compiled: the study is
#    host-bound eager (55-100 ms per step), so this decides whether its runs use train.compile;
# 2. #15: benchmarks/mimo_probe.py on the current MIMO kernels (backward at 4 / 8 warps, 64 vs
#    128-row chunks, the forward + backward split by kernel);
# 3. #16, with a decode-step patch (e.g. `git diff main step-one-barrier -- hybridkit`): its step
#    and generation GPU tests, then the one-layer decode rows of main and of the candidate.
set -u
OUT=${OUT:-/tmp/gpu_open_questions}
PATCH=${1:-}
mkdir -p "$OUT"
for mode in eager compiled; do
  flag=$([ $mode = compiled ] && echo --compile)
  timeout -k 5 90 python -m hybridkit bench train hybridkit/recipes/niah_m.yaml --batch 64 \
    --seq-len 256 --steps 30 --no-profile $flag --out "$OUT/niah_m_$mode" > "$OUT/niah_m_$mode.txt" 2>&1
  grep -i "tokens/s\|step" "$OUT/niah_m_$mode.txt" | head -4
done
timeout -k 5 170 python benchmarks/mimo_probe.py > "$OUT/mimo_probe.jsonl" 2> "$OUT/mimo_probe.err"
tail -4 "$OUT/mimo_probe.jsonl"
if [ -n "$PATCH" ]; then
  source benchmarks/candidate.sh
  rm -rf /tmp/candidate
  make_candidate "$PATCH" || exit 1
  in_candidate timeout -k 5 80 python -m pytest -q -m gpu -n 8 tests/test_mamba3_step.py \
    tests/test_generation.py -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -20 \
    > "$OUT/candidate_tests.txt"
  tail -2 "$OUT/candidate_tests.txt"
  timeout -k 5 45 python benchmarks/decode.py --out "$OUT/decode_main" --skip-model > /dev/null 2>&1
  in_candidate timeout -k 5 45 python benchmarks/decode.py --out "$OUT/decode_candidate" \
    --skip-model > /dev/null 2>&1
  grep "^| float32" "$OUT"/decode_*.md
fi
ls "$OUT"
