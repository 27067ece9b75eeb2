#!/usr/bin/env bash
# One GPU call: the compiled 400M step of the tree as carried against the same tree with patches
# applied (reverse diffs that take recent changes back out), each run in its own process, so a
# change to code (not to a kernel setting) is timed against what it replaced on the same card:
#   carry [".gpu/base", ".gpu/abp"]; source benchmarks/gpu_env.sh && \
#     RUNS="current old_scan" OUT=$OUT bash benchmarks/gpu_ab_train.sh
# Here: `git diff HEAD OLD -- FILES > .gpu/abp/NAME.diff` makes run NAME; "current" is the tree
# as carried; "transformer" the Transformer at the carried tree. Each run:
# benchmarks/train_throughput.py --cases $CASE (default hybrid_compiled), 6 timed steps, no
# profile -> $WORK/<run>/train_throughput.{json,md}, archived into $OUT/session.tar.gz after
# each (benchmarks/gpu_call.sh). TESTS (optional): pytest arguments run after the runs, with the
# time left, at the carried tree -> $WORK/tests.txt (e.g. the GPU tests of the changed code).
set -u
WORK=/tmp/hk_ab_train
# shellcheck source=benchmarks/gpu_call.sh
source benchmarks/gpu_call.sh
git rev-parse --short HEAD > "$WORK/commit.txt" 2>/dev/null || true
for run in ${RUNS:-current transformer}; do
  root=$PWD
  case=${CASE:-hybrid_compiled}
  [ "$run" = transformer ] && case=transformer_compiled
  if [ "$run" != current ] && [ "$run" != transformer ]; then
    dir=/tmp/hk_ab_$run
    if [ ! -d "$dir" ]; then
      mkdir -p "$dir" && cp -r hybridkit benchmarks pyproject.toml "$dir/"
      (cd "$dir" && patch -s -p1 < "$root/.gpu/abp/$run.diff") \
        || { echo "$run: patch did not apply" | tee "$WORK/$run.txt"; rm -rf "$dir"; continue; }
    fi
    root=$dir
  fi
  mkdir -p "$WORK/$run"
  (cd "$root" && PYTHONPATH="$root:${PYTHONPATH:-}" budgeted 200 100 python \
    benchmarks/train_throughput.py --out "$WORK/$run" --no-profile --steps 6 --cases "$case") \
    > "$WORK/$run.txt" 2>&1
  echo "$run ($case)"; show "$WORK/$run/train_throughput.md" "$WORK/$run.txt" 4; pack
done
if [ -n "${TESTS:-}" ]; then
  # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
  budgeted 300 45 python -m pytest -q -m gpu -p no:cacheprovider -rfE $TESTS 2>&1 \
    | grep -v Warning | tail -12 > "$WORK/tests.txt"
  echo "tests: $(tail -1 "$WORK/tests.txt")"; pack
fi
