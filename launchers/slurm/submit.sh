#!/bin/sh
# Submit a sweep over N nodes: an array of N shards (sweep.sbatch) and the merge job
# (merge.sbatch) that runs after all of them, however they end (--dependency=afterany).
#
#   launchers/slurm/submit.sh N [attn-harness run options...]
#   launchers/slurm/submit.sh 4 --profile exhaustive --suite models --suite edge
#
# Run it from the clone whose .venv the nodes share. Environment: ATTN_HARNESS_OUT (default
# reports/sweep), ATTN_HARNESS (default $PWD/.venv/bin/attn-harness), SWEEP_SBATCH_OPTIONS and
# MERGE_SBATCH_OPTIONS (more sbatch options for each, e.g. "--partition=mi300x --time=12:00:00").
# Prints the two job ids; the report is $ATTN_HARNESS_OUT/report.md once the merge job ends.
set -eu
if [ $# -lt 1 ] || ! [ "$1" -ge 1 ] 2>/dev/null; then
    echo "usage: launchers/slurm/submit.sh N [attn-harness run options...] (N >= 1 shards)" >&2
    exit 2
fi
shards=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
ATTN_HARNESS_OUT=${ATTN_HARNESS_OUT:-reports/sweep}
ATTN_HARNESS=${ATTN_HARNESS:-$PWD/.venv/bin/attn-harness}
export ATTN_HARNESS_OUT ATTN_HARNESS
# shellcheck disable=SC2086 # the options are words on purpose
array=$(sbatch --parsable --array="0-$((shards - 1))" ${SWEEP_SBATCH_OPTIONS:-} \
    "$here/sweep.sbatch" "$@")
array=${array%%;*}
# shellcheck disable=SC2086
merge=$(sbatch --parsable --dependency="afterany:$array" ${MERGE_SBATCH_OPTIONS:-} \
    "$here/merge.sbatch")
merge=${merge%%;*}
echo "array $array ($shards shards of $ATTN_HARNESS_OUT), merge $merge: $ATTN_HARNESS_OUT/report.md"
