# Source on the GPU machine at the start of a command, from the project's root:
#   source benchmarks/gpu_env.sh && bash benchmarks/gpu_session.sh
# Tracked, so it is there whatever the call carried. It sources the staged env.sh of whichever
# .gpu folder the call carried (cute2 first: it completes the CuTe DSL install; then base, cute1;
# ../shared/gpu/README.md), and on a warm machine whose call carried none of them it puts the
# packages an earlier call installed (/tmp/hk-site) on PYTHONPATH instead. (On 2026-12-05 a call
# that sourced .gpu/cute2/env.sh without carrying it failed at once and cost 118 s.)
_hk_found=""
for _hk_env in .gpu/cute2/env.sh .gpu/base/env.sh .gpu/cute1/env.sh; do
  if [ -f "$_hk_env" ]; then
    _hk_found=$_hk_env
    # shellcheck disable=SC1090  # the staged file
    source "$_hk_env"
    break
  fi
done
if [ -z "$_hk_found" ]; then
  if [ -f /tmp/hk-site/.base ]; then
    export PYTHONPATH="$PWD:/tmp/hk-site:/tmp/hk-site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    echo "gpu_env.sh: no .gpu folder carried; using the packages installed earlier on this machine" \
      "($([ -f /tmp/hk-site/.cute ] && echo 'pydantic, CuTe DSL, FA4' || echo 'pydantic only'))" >&2
  else
    echo "gpu_env.sh: nothing staged here: carry .gpu/base (and for CuTe DSL / FA4 .gpu/cute1," \
      "then .gpu/cute2 in the next call)" >&2
  fi
fi
unset _hk_env _hk_found
