#!/usr/bin/env bash
# The Slurm executor's overhead, side by side with the local executor in one run: the tiny
# pipeline from a cold datastore, locally and as Slurm jobs on a one-node loopback cluster
# (scripts/slurm-local.sh), alternating, N times each; then a rerun with everything cached
# (which submits nothing); then `cache_web` in small windows (several shards) as one job and as
# a job array of 2 parts.
# Usage: sudo bench/slurm.sh [N]  (needs target/release/pipe, slurm-wlm and munge; run as root)
set -euo pipefail
cd "$(dirname "$0")/.."
PIPE=${PIPE:-$PWD/target/release/pipe}
N=${1:-3}
WORK=$(mktemp -d /tmp/pipe-bench-slurm.XXXX)
trap 'scripts/slurm-local.sh stop "$WORK/c" 2>/dev/null; rm -rf "$WORK"' EXIT
eval "$(scripts/slurm-local.sh start "$WORK/c" 2>/dev/null)"
SL=(--executor slurm --gpus-per-job 0 --poll-seconds 0.5)

wall() { # prints the seconds a command took
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

echo "== the tiny pipeline from a cold datastore (s): local, slurm"
for i in $(seq "$N"); do
  l=$(wall "$PIPE" --datastore "$WORK/l$i" run pipelines/tiny.toml)
  s=$(wall "$PIPE" --datastore "$WORK/s$i" run pipelines/tiny.toml "${SL[@]}")
  echo "run $i: local $l  slurm $s  slurm/local $(echo "scale=2; $s / $l" | bc)"
done

echo "== a rerun with everything cached (s): local, slurm"
for i in $(seq "$N"); do
  l=$(wall "$PIPE" --datastore "$WORK/l1" run pipelines/tiny.toml)
  s=$(wall "$PIPE" --datastore "$WORK/s1" run pipelines/tiny.toml "${SL[@]}")
  echo "rerun $i: local $l  slurm $s"
done

echo "== cache_web in windows of 16 documents, 700-token shards (s): one job, a job array of 2"
SET=(--set stages.cache_web.batch_size=2 --set stages.cache_web.shard_tokens=700 --only cache_web)
for i in $(seq "$N"); do
  one=$(wall "$PIPE" --datastore "$WORK/a$i" run pipelines/tiny.toml "${SET[@]}" "${SL[@]}" --array-size 1)
  arr=$(wall "$PIPE" --datastore "$WORK/b$i" run pipelines/tiny.toml "${SET[@]}" "${SL[@]}" --array-size 2)
  same=$(cmp -s <(cd "$WORK/a$i/results/tiny/cache_web" && sha256sum shards/* stats.safetensors cache.json) \
                <(cd "$WORK/b$i/results/tiny/cache_web" && sha256sum shards/* stats.safetensors cache.json) && echo identical || echo DIFFERENT)
  echo "run $i: one job $one  array $arr  outputs $same"
done
