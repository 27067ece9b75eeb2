#!/usr/bin/env bash
# Why does the GPU state-tracking study's parity stay at chance (issue #18)? One GPU call,
# Triton only (carry .gpu/base), every run of parity_gpu.yaml in parallel (each is host-bound),
# the small files back in one archive:
#   source .gpu/base/env.sh && bash benchmarks/parity_probe.sh
# The study's parity arm (headdim 32, bf16 autocast, 1,200 steps) ended at chance on the H200,
# while the same recipe in fp32 on the CPU reached 64.5 % at 160 bits
# (benchmarks/results/state_tracking_cpu/gpu_recipe_check.md). Suspects: bf16 (the rotation's
# error adds up over the bits), too few steps (the paper runs 10^4 per stage), the seed.
set -u
OUT=${OUT:-/tmp/parity_probe}
mkdir -p "$OUT/runs"
# the recipe now has LONG (1,200 steps per stage); SHORT is what it had when the probe ran
LONG='task.curriculum=[{steps: 1200, min_len: 3, max_len: 40}, {steps: 1200, min_len: 3, max_len: 80}, {steps: 1200, min_len: 3, max_len: 120}, {steps: 1200, min_len: 3, max_len: 160}]'
SHORT='task.curriculum=[{steps: 300, min_len: 3, max_len: 40}, {steps: 300, min_len: 3, max_len: 80}, {steps: 300, min_len: 3, max_len: 120}, {steps: 300, min_len: 3, max_len: 160}]'
run() {  # NAME, then --set overrides
  local name=$1; shift
  local args=(--set model.blocks.m.mixer.headdim=32 --set "task.eval_lengths=[160, 320, 640]")
  for s in "$@"; do args+=(--set "$s"); done
  timeout -k 5 "${LIMIT:-300}" python -m hybridkit train hybridkit/recipes/parity_gpu.yaml \
    -o "$OUT/runs/$name" --no-progress "${args[@]}" > "$OUT/runs/$name.log" 2>&1
}
run bf16_1200 train.precision=bf16 "$SHORT" train.steps=1200 &
run fp32_1200 train.precision=fp32 "$SHORT" train.steps=1200 &
run fp32_1200_seed1 train.precision=fp32 seed=1 "$SHORT" train.steps=1200 &
run bf16_4800 train.precision=bf16 "$LONG" train.steps=4800 &
run fp32_4800 train.precision=fp32 "$LONG" train.steps=4800 &
run fp32_4800_lr1e-3 train.precision=fp32 "$LONG" train.steps=4800 train.lr=1e-3 &
wait
shopt -s nullglob
for f in "$OUT"/runs/*/final.json; do
  python - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name = sys.argv[1].split("/")[-2]
ev = {e["length"]: round(100 * e["ex_match"], 1) for e in r.get("final_eval", [])}
print(f"{name:20s} loss {r['loss']:.3f} ex_match {ev} wall {r.get('wall_time_s', 0):.0f} s")
PY
done | tee "$OUT/summary.txt"
(cd "$OUT/runs" && find . -type f -size -2M -not -path "*/checkpoints/*" -not -name "*.safetensors" \
  -print0 | tar -czf "$OUT/parity_probe.tar.gz" --null -T -) && rm -rf "$OUT/runs"
