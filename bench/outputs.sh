#!/usr/bin/env bash
# `pipe status` and a no-op `pipe run` as one stage's output grows in number of files: one `emit`
# stage of 1, 10,000 and 100,000 files of 16 bytes (files spread over 100 sub-folders). Shows what
# reading the stage's manifest.json (one entry per output file) costs a no-op.
#
#   bash bench/outputs.sh
#
# Needs: hyperfine, cargo. Knobs: SIZES ("1 10000 100000"), RUNS (20), plus those of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
need hyperfine
SIZES="${SIZES:-1 10000 100000}"
RUNS="${RUNS:-20}"
unset DATASTORE

pipe_bin
W="$BENCH_DIR/outputs"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit

say "populating"
cmds=()
for n in $SIZES; do
    printf '[pipeline]\nname = "out%s"\ndatastore = "ds"\n\n[stages.s]\nkind = "emit"\nchunks = %s\nchunk_bytes = 16\nfiles = 100\n' \
        "$n" "$n" > "out$n.toml"
    "$PIPE" -q run "out$n.toml" > /dev/null 2>&1
    m=$(ls ds/objects/emit/*/manifest.json -t | head -1)
    echo "$n files: manifest.json $(stat -c %s "$m") bytes"
    cmds+=(-n "pipe status, $n output files" "$PIPE -q status out$n.toml")
done
for n in $SIZES; do cmds+=(-n "pipe run (no-op), $n output files" "$PIPE -q run out$n.toml"); done
sync
wait_quiet
machine

hyperfine -N --style basic --warmup 3 --runs "$RUNS" --export-json "$W/out.json" "${cmds[@]}"
busiest
say "results"
python3 - "$W/out.json" <<'EOF'
import json, sys
print(f"| {'command':<40} | {'mean ± σ (ms)':>18} | {'min (ms)':>9} | {'runs':>4} |")
print(f"|{'-'*42}|{'-'*19}:|{'-'*10}:|{'-'*5}:|")
for x in json.load(open(sys.argv[1]))["results"]:
    print(f"| {x['command']:<40} | {x['mean']*1e3:>8.1f} ± {x['stddev']*1e3:<7.1f} | {x['min']*1e3:>9.1f} | {len(x['times']):>4} |")
EOF
