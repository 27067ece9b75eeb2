# A/B of one train_throughput.py case between this tree and an older commit's, for changes that
# have no kernel setting to switch them off. Two steps:
#
#   bash benchmarks/ab_tree.sh prepare COMMIT     # here: COMMIT's package and benchmark into _ab_old/
#   bash benchmarks/ab_tree.sh run                # on the GPU machine (a call's command)
#
# `prepare` writes an untracked folder, which a device call sends with the tree (the GPU
# machine's git metadata can be stale, so the old tree cannot be checked out there); delete it
# after. `run` alternates new / old / new / old (RUNS, default "1 2 3 4"; odd runs are this
# tree), one process each, CASE (default hybrid_eager) with STEPS timed steps (default 8), within
# TOTAL seconds (default 400), writing $OUT/<new|old><i>/train_throughput.{json,md}.
# Used for benchmarks/results/train_eager_copies_h100.md (COMMIT fb5045e).
set -u
case "${1:-}" in
  prepare)
    [ -n "${2:-}" ] || { echo "usage: bash benchmarks/ab_tree.sh prepare COMMIT" >&2; exit 2; }
    rm -rf _ab_old && mkdir _ab_old
    git archive "$2" hybridkit benchmarks/train_throughput.py benchmarks/launch_sweep.py \
      benchmarks/recipes pyproject.toml | tar -x -C _ab_old
    echo "_ab_old/ holds $2's package and benchmark ($(du -sh _ab_old | cut -f1))"
    ;;
  run)
    [ -d _ab_old ] || { echo "no _ab_old/: run 'prepare COMMIT' here first" >&2; exit 2; }
    # shellcheck source=benchmarks/gpu_env.sh
    source benchmarks/gpu_env.sh
    start=$(date +%s)
    nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
    for i in ${RUNS:-1 2 3 4}; do
      if [ $((i % 2)) = 1 ]; then tree=new; dir=.; else tree=old; dir=_ab_old; fi
      left=$((${TOTAL:-400} - ($(date +%s) - start)))
      [ "$left" -lt 50 ] && { echo "skipped $tree$i ($left s left)"; continue; }
      mkdir -p "$OUT/$tree$i"
      (cd "$dir" && PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout $((left < 90 ? left : 90)) python \
        benchmarks/train_throughput.py --out "$OUT/$tree$i" --no-profile --steps "${STEPS:-8}" \
        --cases "${CASE:-hybrid_eager}" > "$OUT/$tree$i.txt" 2>&1)
      echo "$tree$i: $(grep "^| ${CASE:-hybrid_eager} " "$OUT/$tree$i/train_throughput.md" \
        2>/dev/null || tail -2 "$OUT/$tree$i.txt")"
    done
    ;;
  *)
    echo "usage: bash benchmarks/ab_tree.sh prepare COMMIT | run" >&2
    exit 2
    ;;
esac
