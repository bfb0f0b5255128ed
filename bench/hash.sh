#!/usr/bin/env bash
# Hashing throughput of a new multi-GB external input: `pipe plan` on a one-stage pipeline whose
# `data` input is that file, with an empty memo so that it must be read, on one core
# (RAYON_NUM_THREADS=1) and on all cores; b3sum and sha256sum on the same file, in the same run.
# Warm (file in the page cache) and, where `echo 3 > /proc/sys/vm/drop_caches` works, cold.
#
#   bash bench/hash.sh
#
# Needs: hyperfine, b3sum (both: apt-get install -y hyperfine b3sum), coreutils, util-linux
# (fincore), python3, cargo. Knobs: FILE_MIB (4096), RUNS (5), COLD_RUNS (3), SHA_RUNS (3), plus those of
# bench/lib.sh (BENCH_DIR, PIPE_TESTKIT, BENCH_WAIT, BENCH_KEEP).

source "$(dirname "$0")/lib.sh"
need hyperfine b3sum sha256sum fincore python3
FILE_MIB="${FILE_MIB:-4096}"
RUNS="${RUNS:-5}"
COLD_RUNS="${COLD_RUNS:-3}"
SHA_RUNS="${SHA_RUNS:-3}"
unset DATASTORE RAYON_NUM_THREADS

pipe_bin
W="$BENCH_DIR/hash"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit

say "writing a new ${FILE_MIB} MiB file from /dev/urandom"
/usr/bin/time -f "written in %e s" head -c "${FILE_MIB}M" /dev/urandom > big.bin
BYTES=$(stat -c %s big.bin)
printf '[pipeline]\nname = "hash-bench"\ndatastore = "ds"\n\n[stages.src]\nkind = "emit"\ndata = "big.bin"\n' > hash.toml

say "sanity: an empty memo reads the whole file, a filled one reads nothing"
rm -rf ds/memo
"$PIPE" -q plan hash.toml --json | python3 -c "
import json, sys; h = json.load(sys.stdin)['hashed']; print('fresh memo: hashed', h); assert h == {'files': 1, 'bytes': $BYTES}, h"
"$PIPE" -q plan hash.toml --json | python3 -c "
import json, sys; h = json.load(sys.stdin)['hashed']; print('filled memo: hashed', h); assert h['files'] == 0, h"

# Can this session drop the page cache?
COLD=0
if sync && (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; then
    resident=$(fincore -nb -o RES big.bin | tr -d ' ')
    if [[ "$resident" == 0 ]]; then COLD=1; fi
    echo "drop_caches works; big.bin resident after dropping: $resident bytes"
else
    echo "drop_caches is not writable here: no cold-cache figures"
fi
cat big.bin > /dev/null   # back into the page cache for the warm runs

sync
wait_quiet
machine b3sum sha256sum

say "warm: page cache holds $(fincore -nb -o RES big.bin | tr -d ' ') of $BYTES bytes of big.bin; RAM $(free -h | awk '/^Mem:/ {print $2}')"
H=(hyperfine -N --style basic)
PREP="rm -rf $W/ds/memo"
"${H[@]}" --warmup 1 --runs "$RUNS" --export-json "$W/warm.json" \
    --prepare "$PREP" -n "pipe plan, 1 thread" "env RAYON_NUM_THREADS=1 $PIPE -q plan hash.toml" \
    --prepare "$PREP" -n "pipe plan, all cores" "$PIPE -q plan hash.toml" \
    --prepare true -n "b3sum, 1 thread" "b3sum --num-threads 1 big.bin" \
    --prepare true -n "b3sum, all cores" "b3sum big.bin"
# sha256sum is an order of magnitude slower: fewer runs (the file is already in the page cache).
"${H[@]}" --runs "$SHA_RUNS" --export-json "$W/warm-sha.json" -n "sha256sum" "sha256sum big.bin"
fincore -b big.bin

if [[ "$COLD" == 1 ]]; then
    say "cold: page cache dropped before every run"
    DROP="sync; echo 3 > /proc/sys/vm/drop_caches"
    "${H[@]}" --runs "$COLD_RUNS" --export-json "$W/cold.json" \
        --prepare "bash -c '$PREP; $DROP'" -n "pipe plan, 1 thread (cold)" "env RAYON_NUM_THREADS=1 $PIPE -q plan hash.toml" \
        --prepare "bash -c '$PREP; $DROP'" -n "pipe plan, all cores (cold)" "$PIPE -q plan hash.toml" \
        --prepare "bash -c '$DROP'" -n "b3sum, 1 thread (cold)" "b3sum --num-threads 1 big.bin" \
        --prepare "bash -c '$DROP'" -n "b3sum, all cores (cold)" "b3sum big.bin"
    "${H[@]}" --runs 1 --export-json "$W/cold-sha.json" \
        --prepare "bash -c '$DROP'" -n "sha256sum (cold)" "sha256sum big.bin"
fi

busiest
say "results ($BYTES bytes; GB = 1e9 bytes)"
python3 - "$W" "$BYTES" "$COLD" <<'EOF'
import json, sys
w, n, cold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def table(*names):
    r = {x["command"]: x for name in names for x in json.load(open(f"{w}/{name}.json"))["results"]}
    print(f"| {'command':<28} | {'mean ± σ (s)':>16} | {'GB/s (from mean)':>16} | {'runs':>4} |")
    print(f"|{'-'*30}|{'-'*17}:|{'-'*17}:|{'-'*5}:|")
    for c, x in r.items():
        sd = x["stddev"] or 0.0  # None for a single run
        print(f"| {c:<28} | {x['mean']:>7.3f} ± {sd:<6.3f} | {n / x['mean'] / 1e9:>16.2f} | {len(x['times']):>4} |")
    return {c: n / x["mean"] / 1e9 for c, x in r.items()}
print("warm (file in the page cache):")
g = table("warm", "warm-sha")
print()
for a, b in [("pipe plan, 1 thread", "b3sum, 1 thread"), ("pipe plan, all cores", "b3sum, all cores"),
             ("pipe plan, 1 thread", "sha256sum"), ("pipe plan, all cores", "sha256sum")]:
    print(f"{a} / {b}: {g[a] / g[b]:.2f}x throughput")
per_core = g["pipe plan, 1 thread"]
print(f"pipe per core: {per_core:.2f} GB/s (target >= 1 GB/s: {'met' if per_core >= 1 else 'MISSED'})")
if cold:
    print("\ncold (page cache dropped before each run):")
    c = table("cold", "cold-sha")
    print()
    print(f"pipe plan 1 thread (cold) / b3sum 1 thread (cold): {c['pipe plan, 1 thread (cold)'] / c['b3sum, 1 thread (cold)']:.2f}x")
    print(f"pipe plan all cores (cold) / b3sum all cores (cold): {c['pipe plan, all cores (cold)'] / c['b3sum, all cores (cold)']:.2f}x")
    print(f"pipe plan all cores (cold) / sha256sum (cold): {c['pipe plan, all cores (cold)'] / c['sha256sum (cold)']:.2f}x")
EOF
