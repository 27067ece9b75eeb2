#!/usr/bin/env bash
# One GPU call for the Triton SISO kernels: the GPU tests of tests/test_triton_siso.py in three
# parallel pytest processes and the model-level ones (tests/test_triton_model_gpu.py) in a
# fourth (Triton compilation is CPU-bound; one process takes ~6 minutes), then the benchmark.
# Results land in ${OUT:-.}/siso_check/ (test logs, mamba3_siso.{json,md}).
#
#   bash benchmarks/siso_gpu_check.sh            # tests + benchmark
#   NOBENCH=1 bash benchmarks/siso_gpu_check.sh  # tests only
#   NOTEST=1 SHAPES=0,1 bash benchmarks/siso_gpu_check.sh
#
# Environment knobs of the kernels (HYBRIDKIT_MAMBA3_*) pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
dir="${OUT:-.}/siso_check"
mkdir -p "$dir"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${NOTEST:-0}" != 1 ]; then
  t=tests/test_triton_siso.py
  c="$t::test_triton_siso_matches_reference_gpu"
  groups=(
    "$c[n128_p64_init] $c[n64_p32_g2_split] $c[n32_p64_c32_gate_split] $c[len1]"
    "$c[varlen_n64_p64] $c[bf16_n128_p64_init] $c[bf16_varlen_gate]"
    "$c[bf16_n64_p32_c128_g2] $c[bf16_n64_p64_c64] $t::test_torch_compile_fullgraph_two_lengths $t::test_auto_dispatch_uses_triton_on_gpu"
    "tests/test_triton_model_gpu.py"
  )
  for i in 0 1 2 3; do
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-330}" python -m pytest -q -m gpu -p no:cacheprovider -s ${groups[$i]} \
      > "$dir/test$i.log" 2>&1 &
  done
  wait
  for i in 0 1 2 3; do
    echo "== test group $i"
    grep -E "passed|failed|Error|: y=" "$dir/test$i.log" | tail -8
  done
fi
if [ "${NOBENCH:-0}" != 1 ]; then
  python benchmarks/mamba3_siso.py --out "$dir/mamba3_siso" --no-chunked --profile \
    ${SHAPES:+--shapes "$SHAPES"} 2>&1 | grep -v '^\[{' | tail -20
fi
