#!/usr/bin/env bash
# One GPU call that re-checks everything not yet confirmed on the H200 (see
# benchmarks/results/gpu_tests_h200.md), writing each part under $OUT as it finishes:
#   source .gpu/cute2/env.sh && bash benchmarks/gpu_verify.sh [CANDIDATE.patch]
# 1. the whole GPU suite (fuzz, 2^31, FA4 and CuTe tests included) with failures named;
# 2. with a patch (a kernel change not yet on main, `git diff main BRANCH -- hybridkit`): the
#    MIMO and SISO GPU tests on a patched copy of the tree (a candidate lands only after this);
# 3. the decode benchmark's one-layer step (Triton and CuTe kernels) and bf16-state drift, and
#    the whole model with the attention decode through FA4 (fa4_decode=1).
# Each part has its own timeout so a slow one cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/gpu_verify}
PATCH=${1:-}
mkdir -p "$OUT"
timeout -k 5 270 python -m pytest -q -m gpu -n 14 --dist loadgroup tests -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -80 > "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
if [ -n "$PATCH" ]; then
  source benchmarks/candidate.sh
  rm -rf /tmp/candidate
  make_candidate "$PATCH" || echo "patch did not apply" > "$OUT/candidate_tests.txt"
  in_candidate timeout -k 5 100 python -m pytest -q -m gpu -n 12 tests/test_triton_mimo.py \
    tests/test_triton_siso.py -p no:cacheprovider -rfE 2>&1 | grep -v Warning | tail -40 \
    >> "$OUT/candidate_tests.txt"
  tail -3 "$OUT/candidate_tests.txt"
  # the benchmark call that follows on this warm machine (gpu_bench.sh) reads this verdict
  if grep -q " passed" "$OUT/candidate_tests.txt" && ! grep -q -E "[0-9]+ (failed|error)" \
    "$OUT/candidate_tests.txt"; then touch /tmp/candidate/PASSED; fi
fi
timeout -k 5 120 python benchmarks/decode.py --out "$OUT/decode" --new 96 --drift-tokens 1000 > "$OUT/decode.txt" 2>&1
# the attention layers' static step through FA4 (kernel setting fa4_decode, off by default until
# the suite above has passed its GPU tests): the same model, fp32 state, next to the table above
HYBRIDKIT_KERNELS=fa4_decode=1 timeout -k 5 60 python -m hybridkit bench decode \
  benchmarks/recipes/hybrid_400m.yaml --batch 1,16,128 --prompt 128 --new 96 \
  --out "$OUT/decode_fa4" > "$OUT/decode_fa4.txt" 2>&1
ls "$OUT"
