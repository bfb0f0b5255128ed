#!/usr/bin/env bash
# `pipe status` as run records pile up: every `pipe run`, even a no-op, adds one record under
# runs/<pipeline>/, and planning looks up the latest record of each stage. This times `pipe status`
# and a no-op `pipe run` on the demo pipeline after 1 run and after RECORDS real no-op runs.
#
#   bash bench/records.sh
#
# Needs: hyperfine, python3, cargo. Knobs: RECORDS (1000), RUNS (20), plus those of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
need hyperfine
RECORDS="${RECORDS:-1000}"
RUNS="${RUNS:-20}"
unset DATASTORE

pipe_bin
W="$BENCH_DIR/records"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit
cp "$REPO/tests/testkit/demo.toml" .
"$PIPE" -q --datastore ds run demo.toml --jobs 2 2>/dev/null

wait_quiet
machine

H=(hyperfine -N --style basic --warmup 3 --runs "$RUNS")
say "1 run record"
"${H[@]}" --export-json one.json -n "pipe status, 1 run record" "$PIPE -q --datastore ds status demo.toml"
say "adding $RECORDS run records with real no-op runs"
t0=$(date +%s%N)
for ((i = 0; i < RECORDS; i++)); do "$PIPE" -q --datastore ds run demo.toml 2>/dev/null; done
t1=$(date +%s%N)
n=$(ls ds/runs/engine-demo | wc -l)
echo "$RECORDS no-op runs took $(( (t1 - t0) / 1000000 )) ms; runs/engine-demo holds $n records ($(du -sh ds/runs | cut -f1))"
"${H[@]}" --export-json many.json -n "pipe status, $n run records" "$PIPE -q --datastore ds status demo.toml" \
    -n "pipe run (no-op), $n+ run records" "$PIPE -q --datastore ds run demo.toml"
busiest

say "results"
python3 - <<'EOF'
import json
r = [x for f in ["one.json", "many.json"] for x in json.load(open(f))["results"]]
print(f"| {'command':<40} | {'mean ± σ (ms)':>18} | {'min (ms)':>9} | {'runs':>4} |")
print(f"|{'-'*42}|{'-'*19}:|{'-'*10}:|{'-'*5}:|")
for x in r:
    print(f"| {x['command']:<40} | {x['mean']*1e3:>8.1f} ± {x['stddev']*1e3:<7.1f} | {x['min']*1e3:>9.1f} | {len(x['times']):>4} |")
EOF
