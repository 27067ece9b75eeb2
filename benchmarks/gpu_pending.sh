#!/usr/bin/env bash
# One GPU call for what the CPU sessions of 2026-12-06 built but no GPU ran yet:
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_pending.sh
# Here: mkdir -p .gpu/pending && tar -xzf FILES_AT/session.tar.gz -C .gpu/pending
# Steps, each only if the call (CALL_S, default 570 s) has time left for it; results under $WORK,
# archived after each into $OUT/session.tar.gz:
#   1. the eval decode subset through the captured graph under bf16 autocast (graph == eager),
#      and the other generation GPU tests -> tests.txt;
#   2. benchmarks/mamba3_mimo.py with its rate columns (TFLOP/s and GB/s of forward and forward +
#      backward, as shares of the matmul rate and copy bandwidth measured in the same run) -> mimo/;
#   3. the backward q / k kernels' registers and spills with this Triton (sm_90, SISO and R 4),
#      the baseline for the pair split (``bwd_qk_split``) -> regs_*.txt.
set -u
WORK=/tmp/hk_pending
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
budgeted 150 60 python -m pytest -q -m gpu tests/test_generation.py -p no:cacheprovider -rfE \
  2>&1 | grep -v Warning | tail -15 > "$WORK/tests.txt"
tail -3 "$WORK/tests.txt"; pack
budgeted 300 120 python benchmarks/mamba3_mimo.py --out "$WORK/mimo/mamba3_mimo" --reps 100 \
  > "$WORK/mimo.txt" 2>&1
show "$WORK/mimo/mamba3_mimo.md" "$WORK/mimo.txt" 12; pack
for r in 1 4; do
  budgeted 60 30 python benchmarks/siso_sm90_report.py --top 0 --rank "$r" _bwd_q _bwd_k _bwd_x \
    2>&1 | grep -v "^ \|Warning\|warn" > "$WORK/regs_r$r.txt"
  cat "$WORK/regs_r$r.txt"; pack
done
