# Sourced by the GPU call scripts: a patched copy of the tree for a kernel change not yet on main.
#   make_candidate PATCH   -> /tmp/candidate holds hybridkit/, tests/, benchmarks/ with PATCH applied
#                             (`git diff main BRANCH -- hybridkit > PATCH` on your machine); kept
#                             while the machine stays warm, so a following call reuses it
#   in_candidate CMD...    -> run CMD in /tmp/candidate with its hybridkit first on PYTHONPATH
make_candidate() {
  local root=$PWD
  [ -d /tmp/candidate ] && return 0
  mkdir -p /tmp/candidate && cp -r hybridkit tests benchmarks pyproject.toml /tmp/candidate/
  (cd /tmp/candidate && { git apply "$root/$1" 2>/dev/null || patch -p1 < "$root/$1"; }) \
    || { echo "candidate: $1 did not apply" >&2; rm -rf /tmp/candidate; return 1; }
}
in_candidate() {
  (cd /tmp/candidate && PYTHONPATH="/tmp/candidate:$PYTHONPATH" "$@")
}
