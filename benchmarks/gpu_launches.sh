#!/usr/bin/env bash
# One GPU call for the launch candidates that CPU work prepared and no GPU has checked yet, most
# important first, each step under its own timeout and what is left of the call (CALL_S), skipped
# when too little is left; results are archived after every step into
# $OUT/session.tar.gz (the only file under $OUT), so a call cut short still brings back what
# finished. About 7-9 minutes.
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && OUT=$OUT bash benchmarks/gpu_launches.sh
#   1. the few-row linear kernels' GPU tests, at the defaults and at the sweep's other launches
#      (tests/test_linear_kernels.py -m gpu) -> linear_tests.txt
#   2. benchmarks/skinny_linear.py --sweep: ours against cuBLAS at the decode shapes, then every
#      launch of the one-row and 16-row kernels, each checked first, scored by the 400M decode
#      step's matmul time it implies -> skinny_linear.{json,md,txt}
#   3. the norms' and the MIMO output kernels' GPU tests at the other launches, now with the
#      backward candidates of the 2026-12-06 sweeps (norms 512 elements / 1 warp / 16 per SM,
#      MIMO output 256 / 1 warp / 6 per SM) -> norm_launch_tests.txt
#   4. Nsight Compute on the MIMO R 4 scan kernels at (8, 4096, 32, 64, 128), chunk 16: the
#      profile evidence issue #15 asks for where its targets are missed (SISO's is in
#      benchmarks/results/mamba3_siso_ncu.md) -> mimo_ncu.{csv,md,txt}; needs a runtime where
#      ncu reads the counters (the H100s so far: Firecracker)
#   5. the compiled 400M SISO hybrid with the torch formula for its norms and SwiGLU (what
#      Inductor fuses; the dispatch's choice under compile) and with our Triton kernels forced
#      (`benchmarks/train_throughput.py`'s A/B case, never run): at kernel level ours beat
#      Inductor's fusion (gated norm forward + backward 0.308 vs 0.465 ms on the H100,
#      benchmarks/results/norm_launch_h100.md) -> train_ab/train_throughput.{json,md}, train_ab.txt
# Here: mkdir -p .gpu/launches && tar -xzf FILES_AT/session.tar.gz -C .gpu/launches
set -u
WORK=/tmp/hk_launches
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
budgeted 120 60 python -m pytest -q -m gpu tests/test_linear_kernels.py -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -20 > "$WORK/linear_tests.txt"
tail -2 "$WORK/linear_tests.txt"; pack
budgeted 300 60 python benchmarks/skinny_linear.py --sweep --out "$WORK/skinny_linear" \
  > "$WORK/skinny_linear.txt" 2>&1
show "$WORK/skinny_linear.md" "$WORK/skinny_linear.txt"
pack
budgeted 120 60 python -m pytest -q -m gpu tests/test_norm_kernels.py tests/test_mimo_output.py \
  -k launch -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -12 > "$WORK/norm_launch_tests.txt"
tail -2 "$WORK/norm_launch_tests.txt"; pack
budgeted 200 60 ncu --clock-control none --profile-from-start off \
  --kernel-name regex:'_(fwd|bwd)_[a-z]+_kernel' --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section SchedulerStats --csv --page raw \
  python benchmarks/siso_ncu.py --shape 0 --rank 4 > "$WORK/mimo_ncu.csv" 2> "$WORK/mimo_ncu.txt"
python benchmarks/siso_ncu.py --summarize "$WORK/mimo_ncu.csv" > "$WORK/mimo_ncu.md" \
  2>> "$WORK/mimo_ncu.txt"
show "$WORK/mimo_ncu.md" "$WORK/mimo_ncu.txt"
pack
budgeted 280 120 python benchmarks/train_throughput.py --out "$WORK/train_ab" --no-profile \
  --steps 8 --cases hybrid_compiled,hybrid_compiled_triton_elementwise > "$WORK/train_ab.txt" 2>&1
show "$WORK/train_ab/train_throughput.md" "$WORK/train_ab.txt"
pack
