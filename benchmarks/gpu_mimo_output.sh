#!/usr/bin/env bash
# One GPU call for the fused MIMO output kernels (issue #15), most important first, each step
# under its own timeout; results are archived after every step into $OUT/session.tar.gz (the
# only file under $OUT), so a call cut short by the device time still brings back what finished.
#   carry [".gpu/base"]; source benchmarks/gpu_env.sh && bash benchmarks/gpu_mimo_output.sh
#   1. the kernels' GPU tests at the model's shapes (tests/test_mimo_output.py -m gpu, all but the
#      compiled model, which runs last) -> mimo_output_tests.txt
#   2. benchmarks/mimo_output.py (ours vs the torch formula eager and under Inductor)
#      -> mimo_output.{json,md,txt}
#   3. `hybridkit bench train` of the 400M MIMO rank-4 hybrid, compiled, 4 x 4,096 tokens, with
#      the kernels (mimo_output=1) and without (mimo_output=0: the torch formula, fused by Inductor)
#      -> train_{mimo,mimo_torchout}.{json,md,txt}, and the SISO 400M hybrid the same way as the
#      baseline of the 0.6x target -> train_siso.*;
#   4. the norms' GPU tests at other launches (norm_launch_tests.txt), then benchmarks/norm.py
#      --sweep (the norms against the formula, and their launches) -> norm.*;
#      then the compiled-model GPU test.
# Here: mkdir -p .gpu/mo && tar -xzf FILES_AT/session.tar.gz -C .gpu/mo
set -u
WORK=/tmp/hk_mimo_output
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
par=""; python -c "import xdist" 2>/dev/null && par="-n 4"
timeout -k 5 150 python -m pytest -q -m gpu $par tests/test_mimo_output.py -p no:cacheprovider \
  -k "not compiled" -rfE 2>&1 | grep -v Warning | tail -30 > "$WORK/mimo_output_tests.txt"
tail -4 "$WORK/mimo_output_tests.txt"; pack
timeout -k 5 240 python benchmarks/mimo_output.py --out "$WORK/mimo_output" \
  > "$WORK/mimo_output.txt" 2>&1
show "$WORK/mimo_output.md" "$WORK/mimo_output.txt" 16; grep "^Ours at" "$WORK/mimo_output.md"
pack
for v in mimo mimo_torchout siso; do
  recipe=benchmarks/recipes/hybrid_400m_mimo.yaml settings="mimo_output=1"
  [ $v = mimo_torchout ] && settings="mimo_output=0"
  # the SISO 400M hybrid on the same machine: issue #15's target is MIMO >= 0.6x its speed
  [ $v = siso ] && recipe=benchmarks/recipes/hybrid_400m.yaml settings=""
  HYBRIDKIT_KERNELS=$settings timeout -k 5 200 python -m hybridkit bench train "$recipe" \
    --batch 4 --seq-len 4096 --compile --steps 8 --out "$WORK/train_$v" > "$WORK/train_$v.txt" 2>&1
  show "$WORK/train_$v.md" "$WORK/train_$v.txt" 16; pack
done
# the norms' launch sweep (the same build as the MIMO output kernels, never swept), after the
# GPU tests of the launches it tries
timeout -k 5 90 python -m pytest -q -m gpu tests/test_norm_kernels.py -k launch -p no:cacheprovider \
  -rfE 2>&1 | grep -v Warning | tail -12 > "$WORK/norm_launch_tests.txt"
tail -2 "$WORK/norm_launch_tests.txt"
timeout -k 5 150 python benchmarks/norm.py --sweep --out "$WORK/norm" > "$WORK/norm.txt" 2>&1
show "$WORK/norm.md" "$WORK/norm.txt" 16; grep "^Ours at" "$WORK/norm.md"; pack
# -p no:logging --tb=short: on 2026-12-06 Dynamo's DEBUG records filled the tail and hid the
# failure's message
timeout -k 5 150 python -m pytest -q -m gpu tests/test_mimo_output.py -p no:cacheprovider \
  -p no:logging --tb=short -k compiled -rfE 2>&1 | grep -v Warning | tail -40 \
  > "$WORK/mimo_output_compiled_test.txt"
tail -3 "$WORK/mimo_output_compiled_test.txt"; pack
