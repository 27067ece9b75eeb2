#!/usr/bin/env bash
# Why did every arm of the MQAR capacity study sit at 1/D (guessing among the context's values)?
# (issue #18; benchmarks/results/mqar_capacity/report.md). Trains the easiest cell, N 256 / D 8,
# with the study's base (mqar_m.yaml: 2 layers, d_model 128, no MLPs, lr 1e-3 as chosen there)
# for up to 8,000 steps with an evaluation every 500 (ex_match and tok_acc), six runs at once on
# one GPU: NoPE attention (the study's), RoPE attention, pure Mamba-3, the Mamba-3 -> attention
# hybrid, and RoPE attention and Mamba-3 at lr 3e-4.
# Each run is cut at LIMIT_S (default 200) seconds; metrics.jsonl keeps the evaluations so far.
#   source .gpu/base/env.sh && bash benchmarks/mqar_probe.sh   -> $OUT/mqar_probe.tar.gz
set -u
OUT=${OUT:-/tmp/mqar_probe}
LIMIT=${LIMIT_S:-200}
R=$OUT/mqar_probe
mkdir -p "$R"
base=(python -m hybridkit train hybridkit/recipes/mqar_m.yaml --no-progress
  --set task.num_kv_pairs=8 --set task.eval_lengths=[256] --set train.steps=8000
  --set train.eval_every=500 --set train.checkpoint_every=100000)
timeout "$LIMIT" "${base[@]}" -o "$R/attention_nope" --set "model.layout=a a" > "$R/attention_nope.log" 2>&1 &
timeout "$LIMIT" "${base[@]}" -o "$R/attention_rope" --set "model.layout=a a" \
  --set model.blocks.a.mixer.position=rope > "$R/attention_rope.log" 2>&1 &
timeout "$LIMIT" "${base[@]}" -o "$R/mamba3" --set "model.layout=m m" > "$R/mamba3.log" 2>&1 &
timeout "$LIMIT" "${base[@]}" -o "$R/hybrid" > "$R/hybrid.log" 2>&1 &
# and the two models most likely to learn, at a third of the learning rate
timeout "$LIMIT" "${base[@]}" -o "$R/mamba3_lr3e-4" --set "model.layout=m m" --set train.lr=3e-4 \
  > "$R/mamba3_lr3e-4.log" 2>&1 &
timeout "$LIMIT" "${base[@]}" -o "$R/attention_rope_lr3e-4" --set "model.layout=a a" \
  --set model.blocks.a.mixer.position=rope --set train.lr=3e-4 > "$R/attention_rope_lr3e-4.log" 2>&1 &
wait
for d in "$R"/*/; do echo "$(basename "$d"): $(grep -h '"eval"' "$d/metrics.jsonl" | tr '\n' ' ')"; done
tar -czf "$OUT/mqar_probe.tar.gz" -C "$OUT" --exclude='*.safetensors' --exclude=checkpoints mqar_probe
