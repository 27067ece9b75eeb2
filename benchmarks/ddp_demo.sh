#!/usr/bin/env bash
# Data-parallel training on 2 GPUs (NCCL): the same short NIAH run on one GPU, with DDP on two
# and with FSDP2 on two, at the same global batch; prints each run's losses and the largest
# relative difference from the one-GPU run. Metrics land in ${OUT:-.}/ddp_demo/<mode>/.
#
#   bash benchmarks/ddp_demo.sh            # needs 2 GPUs (kind nvidia-h200-x2)
#   STEPS=100 BACKEND=triton bash benchmarks/ddp_demo.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/ddp_demo"
runs="$(mktemp -d)"
mkdir -p "$out"
nvidia-smi -L
common=(
  --no-progress
  --set "train.steps=${STEPS:-60}" --set train.log_every=10 --set train.checkpoint_every=0
  --set "task.eval_lengths=[256,512]" --set task.eval_examples=200 --set eval.decode_examples=4
  --set "model.blocks.m.mixer.backend=${BACKEND:-chunked}"
)
recipe=hybridkit/recipes/niah_s.yaml
for mode in single ddp fsdp; do
  t0=$(date +%s)
  case $mode in
    single) CUDA_VISIBLE_DEVICES=0 timeout 300 python -m hybridkit train "$recipe" -o "$runs/$mode" "${common[@]}" ;;
    ddp) timeout 300 torchrun --nproc-per-node 2 -m hybridkit train "$recipe" -o "$runs/$mode" "${common[@]}" ;;
    fsdp) timeout 300 torchrun --nproc-per-node 2 -m hybridkit train "$recipe" -o "$runs/$mode" "${common[@]}" --set train.parallel=fsdp ;;
  esac > "$out/$mode.log" 2>&1
  echo "$mode: rc=$? in $(( $(date +%s) - t0 )) s"
  mkdir -p "$out/$mode"
  cp "$runs/$mode"/{metrics.jsonl,final.json,recipe.yaml} "$out/$mode/" 2>/dev/null
done
python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
loss = {}
for mode in ("single", "ddp", "fsdp"):
    f = out / mode / "metrics.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    loss[mode] = {r["step"]: r["loss"] for r in recs if "loss" in r}
    evals = [r["eval"] for r in recs if "eval" in r]
    print(mode, {s: round(v, 4) for s, v in loss[mode].items()}, "eval:", evals[-1:] or "-")
for mode in ("ddp", "fsdp"):
    common = sorted(set(loss[mode]) & set(loss["single"]))
    if common:
        rel = max(abs(loss[mode][s] / loss["single"][s] - 1) for s in common)
        print(f"{mode} vs single: {len(common)} logged steps, max relative loss difference {rel:.2e}")
    else:
        print(f"{mode} vs single: no common logged steps (see {out}/{mode}.log)")
EOF
