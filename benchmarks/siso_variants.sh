#!/usr/bin/env bash
# Time several versions of the Triton SISO kernels in one GPU call (the device carries only the
# working tree, not the git history).
#
#   bash benchmarks/siso_variants.sh stage main wip/siso-bwd-pair-blocks   # here: git archive
#                                         # each ref's hybridkit/ into .gpu/variants/<name>/
#   # GPU call, carry [".gpu/base", ".gpu/variants"]:
#   source .gpu/base/env.sh && SHAPES=0,1 bash benchmarks/siso_variants.sh run
#
# ``run`` benchmarks every staged variant with this tree's benchmark script, the variant's
# package first on PYTHONPATH; results land in ${OUT:-.}/variants/<name>.{json,md}, and the
# summary lines (shape, fwd ms, f+b ms) are printed per variant; each run's whole log is kept
# next to its results (the tail is printed when a variant fails). Tests are not run: run
# benchmarks/siso_gpu_check.sh on the branch you keep.
set -euo pipefail
cd "$(dirname "$0")/.."
root=.gpu/variants
case "${1:-}" in
  stage)
    shift
    [ $# -gt 0 ] || { echo "stage: name at least one git ref" >&2; exit 2; }
    rm -rf "$root"
    for ref in "$@"; do
      name=$(echo "$ref" | tr '/' '_')
      mkdir -p "$root/$name"
      git archive "$ref" hybridkit | tar -x -C "$root/$name"
      echo "$ref -> $root/$name ($(git rev-parse --short "$ref"))"
    done
    ;;
  run)
    [ -d "$root" ] || { echo "run: nothing staged in $root (carry it)" >&2; exit 2; }
    out="${OUT:-.}/variants"
    mkdir -p "$out"
    for dir in "$root"/*/; do
      name=$(basename "$dir")
      echo "== $name"
      # the whole log is kept: a variant that fails to compile or run shows why there
      PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" python benchmarks/mamba3_siso.py \
        --out "$out/$name" --no-chunked --profile ${SHAPES:+--shapes "$SHAPES"} \
        > "$out/$name.log" 2>&1 || { echo "$name: failed; last lines of $out/$name.log:"; tail -15 "$out/$name.log"; }
      grep -E '^\| \(' "$out/$name.log" || true
    done
    ;;
  *)
    echo "usage: $0 stage REF... | run" >&2
    exit 2
    ;;
esac
