#!/usr/bin/env bash
# How many steps does MQAR at N 256 need before each arm learns (issue #18)? The capacity study's
# first GPU run (2,000 steps, NoPE attention) left every arm at 1/D -- guessing among the
# context's values (benchmarks/results/mqar_capacity/NOTES.md). On the CPU at (N, D) = (64, 4)
# RoPE attention learned by step ~1,500 while NoPE attention stayed at 1/D for 3,000 steps, so
# mqar_m.yaml's attention now uses RoPE. This trains the study's base (2 layers, d_model 128, no
# MLPs) for up to 12,000 steps with an evaluation every 500 (ex_match and tok_acc in
# metrics.jsonl), several arms at once on one GPU, each cut at LIMIT_S (default 300) seconds:
# attention, Mamba-3 and the Mamba-3 -> attention hybrid at lr 3e-3 and 1e-2 (Zoology's LR grid
# reaches 1e-2; on the CPU Mamba-3 arms at 3e-3 stayed at 1/D), at D 8 and D 32.
#   source .gpu/base/env.sh && LIMIT_S=300 bash benchmarks/mqar_probe.sh   -> $OUT/mqar_probe.tar.gz
# SET=attention (2026-12-06): what lets two RoPE attention layers leave the 1/D plateau at V 8,192?
# Under the study's training mixture attention stayed at 1/D for 6,000 steps at every D, D 8
# included, which it had learned on the cell alone (mqar_capacity/NOTES.md). Twelve runs, each
# as the study trains (compiled, deterministic): the cell alone against the mixture, lr 1e-3
# against 3e-3, at D 8 and 16, seeds 0 and 1 for the mixture at 3e-3, up to 20,000 steps,
# evaluated every 1,000; give it LIMIT_S=540 in a call of its own. (CPU replays of the study's
# runs since found lr 1e-3 enough at D 8 and 16, NOTES.md: run this only if the study's 1e-3
# runs still stay at 1/D.)
# SET=hybrid (2026-12-06): the study's hybrid (`m a`) escaped the 1/D plateau in 1 of 9 runs
# (D 32 only) at its chosen LRs, where attention learned every cell at 1e-3 and Mamba-3 most at
# 3e-3 / 1e-2. Eight hybrid runs as the study trains them (compiled, deterministic, the mixture)
# but for 12,000 steps, evaluated every 1,000: D 8 and 16 at lr 5e-4, 1e-3 and 2e-3 (seed 0), and
# D 16 at 1e-3 and 2e-3 with seed 1; LIMIT_S=330 held all eight on an H100
# (benchmarks/results/mqar_capacity/hybrid_probe_h100.md).
set -u
SET=${SET:-capacity}
OUT=${OUT:-/tmp/mqar_probe}
LIMIT=${LIMIT_S:-300}
# the runs live outside $OUT (the device tool would try to bring back every file under it)
WORK=${MQAR_WORK:-/tmp/mqar_work}
R=$WORK/mqar_probe
mkdir -p "$R" "$OUT"
base=(python -m hybridkit train hybridkit/recipes/mqar_m.yaml --no-progress
  --set task.eval_lengths=[256] --set train.steps=12000 --set train.eval_every=500
  --set train.checkpoint_every=100000 --set eval.examples=500)
probe() {  # name, then overrides
  local name=$1
  shift
  timeout "$LIMIT" "${base[@]}" -o "$R/$name" "$@" > "$R/$name.log" 2>&1 &
}
if [ "$SET" = attention ]; then
  base+=(--set train.steps=20000 --set train.eval_every=1000 --set train.compile=true
    --set train.deterministic=true --set "model.layout=a a")
  mix=(--set "task.kv_pairs_by_length={64: 4, 128: 8}"
    --set "task.length_mixture=[{length: 64, weight: 1}, {length: 128, weight: 1}, {length: 256, weight: 2}]")
  for d in 8 16; do
    for lr in 1e-3 3e-3; do
      probe "cell_lr${lr}_d$d" --set task.num_kv_pairs=$d --set train.lr=$lr
      probe "mix_lr${lr}_d$d" --set task.num_kv_pairs=$d --set train.lr=$lr "${mix[@]}"
    done
    probe "mix_lr3e-3_seed1_d$d" --set task.num_kv_pairs=$d --set train.lr=3e-3 --set seed=1 "${mix[@]}"
    probe "cell_lr3e-3_seed1_d$d" --set task.num_kv_pairs=$d --set train.lr=3e-3 --set seed=1
  done
elif [ "$SET" = hybrid ]; then
  base+=(--set train.eval_every=1000 --set train.compile=true --set train.deterministic=true
    --set "model.layout=m a")
  mix=(--set "task.kv_pairs_by_length={64: 4, 128: 8}"
    --set "task.length_mixture=[{length: 64, weight: 1}, {length: 128, weight: 1}, {length: 256, weight: 2}]")
  for d in 8 16; do
    for lr in 5e-4 1e-3 2e-3; do
      probe "d${d}_lr$lr" --set task.num_kv_pairs=$d --set train.lr=$lr "${mix[@]}"
    done
  done
  for lr in 1e-3 2e-3; do
    probe "d16_lr${lr}_s1" --set task.num_kv_pairs=16 --set train.lr=$lr --set seed=1 "${mix[@]}"
  done
else
  for d in 8 32; do
    probe "attention_d$d" --set "model.layout=a a" --set task.num_kv_pairs=$d
    probe "mamba3_d$d" --set "model.layout=m m" --set task.num_kv_pairs=$d
    probe "mamba3_lr1e-2_d$d" --set "model.layout=m m" --set task.num_kv_pairs=$d --set train.lr=1e-2
    probe "hybrid_d$d" --set task.num_kv_pairs=$d
    probe "hybrid_lr1e-2_d$d" --set task.num_kv_pairs=$d --set train.lr=1e-2
  done
fi
wait
for d in "$R"/*/; do
  echo "$(basename "$d"): $(grep -h '"eval"' "$d/metrics.jsonl" | tr '\n' ' ')"
done
tar -czf "$OUT/mqar_probe.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude=checkpoints mqar_probe
