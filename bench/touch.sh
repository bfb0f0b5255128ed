#!/usr/bin/env bash
# The memo at work: in a pipeline with several large external inputs, `touch` one input and
# `pipe plan --json` re-reads that one file only (hashed.files == 1, hashed.bytes == its size);
# the keys do not change, so nothing reruns. Then a real 8-byte change of another input (same size).
#
#   bash bench/touch.sh
#
# Needs: python3, cargo. Knobs: INPUTS (4), INPUT_MIB (1024), plus those of bench/lib.sh
# (BENCH_DIR, PIPE_TESTKIT, BENCH_KEEP).

source "$(dirname "$0")/lib.sh"
need python3
INPUTS="${INPUTS:-4}"
INPUT_MIB="${INPUT_MIB:-1024}"
(( INPUTS >= 2 )) || { echo "INPUTS must be at least 2" >&2; exit 2; }
unset DATASTORE

pipe_bin
W="$BENCH_DIR/touch"
rm -rf "$W"
mkdir -p "$W/inputs"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit

say "writing $INPUTS inputs of $INPUT_MIB MiB"
parts=()
{
    printf '[pipeline]\nname = "touch-bench"\ndatastore = "ds"\n'
    for ((i = 0; i < INPUTS; i++)); do
        head -c "${INPUT_MIB}M" /dev/urandom > "inputs/in$i.bin"
        printf '\n[stages.src%d]\nkind = "emit"\nchunks = 1\nchunk_bytes = 1024\nseed = %d\ndata = "inputs/in%d.bin"\n' "$i" "$i" "$i"
        parts+=("\"src$i\"")
    done
    printf '\n[stages.all]\nkind = "combine"\nparts = [%s]\n' "$(IFS=,; echo "${parts[*]}")"
} > touch.toml
ls -l inputs
machine

# One `pipe plan --json`: prints hashed files / bytes, the actions, and the wall time.
step() {
    local what="$1" t0 t1
    t0=$(date +%s%N)
    "$PIPE" -q plan touch.toml --json > plan.json
    t1=$(date +%s%N)
    python3 - "$what" $(( (t1 - t0) / 1000000 )) <<'EOF'
import json, sys
from collections import Counter
p = json.load(open("plan.json"))
acts = Counter(s["action"] for s in p["stages"])
run = [s["name"] for s in p["stages"] if s["action"] != "skip"]
h = p["hashed"]
print(f"| {sys.argv[1]:<48} | {h['files']:>5} | {h['bytes']:>13,} | {sys.argv[2]:>7} | "
      f"{', '.join(f'{k} {v}' for k, v in sorted(acts.items())):<14} | {', '.join(run) or '-'} |")
EOF
}

say "plans"
echo "| step                                             | files | bytes hashed  | ms      | actions        | not skipped |"
echo "|--------------------------------------------------|------:|--------------:|--------:|----------------|-------------|"
step "1. first plan (empty memo)"
"$PIPE" -q run touch.toml --jobs 2 2>/dev/null
step "2. after \`pipe run\` (memo filled)"
touch inputs/in1.bin
step "3. after \`touch inputs/in1.bin\`"
step "4. plan again"
last="inputs/in$((INPUTS - 1)).bin"
printf 'CHANGED!' | dd of="$last" bs=1 seek=12345 conv=notrunc status=none
step "5. after overwriting 8 bytes of $last"
echo
echo "one input is $((INPUT_MIB * 1048576)) bytes"
