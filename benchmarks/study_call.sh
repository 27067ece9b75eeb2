#!/usr/bin/env bash
# One GPU call's share of a study (issue #18): train what fits, bring back the small files.
#   carry [".gpu/base"], then
#   source .gpu/base/env.sh && bash benchmarks/study_call.sh STUDY "SELECTION" [BUDGET_S] [JOBS]
# e.g. bash benchmarks/study_call.sh state_tracking "--only seed=0" 540 6
# STUDY names hybridkit/recipes/studies/STUDY.yaml; SELECTION is passed to `hybridkit study`
# (--only / --shard); BUDGET_S (default 480), less 30 s for the imports, is the --time-budget: no
# run starts that would not finish in it, and a run whose first steps project it past the budget
# stops early with a checkpoint; the study is also killed at BUDGET_S, so the archive
# below is always written. JOBS (default 1) runs that many at once (`hybridkit study --jobs`):
# the study models leave the GPU mostly idle. Several studies can share one call (each
# study_call.sh in the background, then `wait`): each writes its own $OUT/STUDY.txt and archive.
#
# The study folder is benchmarks/results/STUDY, the committed one: each finished run's
# result.json is tracked there (.gitignore keeps the rest of a run folder out of git), so the
# tree every call sends already holds the finished runs and the study skips them -- nothing to
# carry, and nothing is lost when a session ends (git-ignored folders such as .gpu/ do not
# outlive a session). On a machine kept warm between calls the ignored files stay there too, so a
# run cut off by the call's end resumes from its checkpoint in the next call.
# Every file under 2 MB of the study folder except checkpoints and weights (result.json,
# eval.json, heldout.json, final.json, metrics.jsonl, the run's recipe, the report) comes back as
# one archive, $OUT/STUDY.tar.gz, the weights as $OUT/STUDY_weights.tar.gz (the device tool
# returns at most 8 files, at most two folders down, so a run tree cannot come back file by
# file). Here:
#   tar -xzf FILES_AT/STUDY.tar.gz -C benchmarks/results
#   hybridkit study hybridkit/recipes/studies/STUDY.yaml -o benchmarks/results/STUDY --report
# then commit benchmarks/results/STUDY (the new result.json files and the report).
set -u
STUDY=$1
SELECTION=${2:-}
BUDGET=${3:-480}
JOBS=${4:-1}
OUT=${OUT:-/tmp/study_call}
# STUDY_ROOT (default benchmarks/results) holds the study folders.
ROOT=${STUDY_ROOT:-benchmarks/results}
DIR=$ROOT/$STUDY
mkdir -p "$DIR" "$OUT"
# shellcheck disable=SC2086  # SELECTION is several flags on purpose
# STUDY_DEFER=0 starts runs even when they cannot finish in this call: on a machine kept warm
# for the next call they resume from their last checkpoint there, so no
# worker sits idle at the end of a call; on a machine that goes cold the part-run is lost.
DEFER=(--time-budget "$(( BUDGET > 60 ? BUDGET - 30 : BUDGET ))")
[ "${STUDY_DEFER:-1}" = 0 ] && DEFER=()
timeout -k 5 "$BUDGET" python -m hybridkit study "hybridkit/recipes/studies/$STUDY.yaml" -o "$DIR" \
  $SELECTION \
  ${DEFER[@]+"${DEFER[@]}"} --jobs "$JOBS" --no-progress 2>&1 | grep -v Warning | tail -60 | tee "$OUT/$STUDY.txt"
# The weights go in a second archive, dropped when it would pass the device tool's 16 MiB a file
# (a whole state-tracking study's weights did once, and the results went with them).
(cd "$ROOT" && find "$STUDY" -type f -size -2048k -not -path "*/checkpoints/*" -not -name "*.safetensors" \
  -print0 | tar -czf "$OUT/$STUDY.tar.gz" --null -T -)
(cd "$ROOT" && find "$STUDY" -type f -size -2048k -not -path "*/checkpoints/*" -name "*.safetensors" \
  -print0 | tar -czf "$OUT/${STUDY}_weights.tar.gz" --null -T -)
[ "$(stat -c %s "$OUT/${STUDY}_weights.tar.gz")" -lt 16000000 ] \
  || { rm -f "$OUT/${STUDY}_weights.tar.gz"; echo "weights archive over 16 MB: not brought back"; }
tar -tzf "$OUT/$STUDY.tar.gz" | grep -c "/result.json$" | xargs echo "result files coming back:"
