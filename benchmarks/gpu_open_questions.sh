#!/usr/bin/env bash
# One GPU call (Triton only: carry .gpu/base) for the measurements the open issues wait on, each
# part under its own timeout, results under $OUT as they finish:
#   source .gpu/base/env.sh && bash benchmarks/gpu_open_questions.sh [CANDIDATE.patch]
# 1. #18: the training step of niah_m (the NIAH study's base) eager and compiled: the study is
#    host-bound eager (55-100 ms per step), so this decides whether its runs use train.compile;
# 2. #16: the one-layer decode rows at the default step launch and at the launches the sm_90
#    compile allows (16 warps at 64 registers; 8 warps capped at 96: no spills; at 80: 60 spilled
#    bytes but three programs per SM), and, with a
#    decode-step patch (e.g. `git diff main step-one-barrier -- hybridkit`), its step and
#    generation GPU tests and its rows;
# 3. #15, with what is left of the call: benchmarks/mimo_probe.py on the current MIMO kernels
#    (backward at 4 / 8 warps, 64 vs 128-row chunks, the forward + backward split by kernel).
set -u
OUT=${OUT:-/tmp/gpu_open_questions}
PATCH=${1:-}
mkdir -p "$OUT"
for mode in eager compiled; do
  flag=$([ $mode = compiled ] && echo --compile)
  timeout -k 5 90 python -m hybridkit bench train hybridkit/recipes/niah_m.yaml --batch 64 \
    --seq-len 256 --steps 30 --no-profile $flag --out "$OUT/niah_m_$mode" > "$OUT/niah_m_$mode.txt" 2>&1
  grep -A2 "step ms" "$OUT/niah_m_$mode.md" | tail -1 | sed "s/^/niah_m $mode /"
done
for launch in default step_warps=16 step_maxnreg=96 step_maxnreg=80; do
  env=$([ $launch = default ] || echo "$launch")
  name=decode_${launch//=/-}  # no '=' in names that come back
  HYBRIDKIT_KERNELS=$env timeout -k 5 30 python benchmarks/decode.py --out "$OUT/$name" \
    --skip-model > /dev/null 2>&1
  grep "^| float32" "$OUT/$name.md" | sed "s/^/$launch /"
done
if [ -n "$PATCH" ]; then
  source benchmarks/candidate.sh
  rm -rf /tmp/candidate
  if make_candidate "$PATCH"; then
    in_candidate timeout -k 5 70 python -m pytest -q -m gpu -n 8 tests/test_mamba3_step.py \
      tests/test_generation.py -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -20 \
      > "$OUT/candidate_tests.txt"
    tail -2 "$OUT/candidate_tests.txt"
    in_candidate timeout -k 5 35 python benchmarks/decode.py --out "$OUT/decode_candidate" \
      --skip-model > /dev/null 2>&1
    grep "^| float32" "$OUT/decode_candidate.md" | sed "s/^/candidate /"
  else
    echo "the patch did not apply" > "$OUT/candidate_tests.txt"
  fi
fi
# last: it takes what is left of the call (about 150 s)
timeout -k 5 150 python benchmarks/mimo_probe.py > "$OUT/mimo_probe.jsonl" 2> "$OUT/mimo_probe.err"
tail -4 "$OUT/mimo_probe.jsonl"
# the device tool brings back at most 8 files: everything in one archive
archive=$(mktemp /tmp/open_questions.XXXXXX)
(cd "$OUT" && tar -czf "$archive" . && rm -rf ./* && mv "$archive" open_questions.tar.gz)
ls "$OUT"
