#!/usr/bin/env bash
# No-op `pipe status` / `pipe run` vs `dvc status` / `dvc repro` on equivalent projects holding
# ~10,000 output files (~3 GB), plus `pipe status` on the small demo pipeline.
#
#   bash bench/noop.sh
#
# Needs: hyperfine (apt-get install -y hyperfine), dvc (pip install dvc), git, python3, cargo.
# Knobs (environment): SRC_STAGES (10), FILES_PER_STAGE (1000), FILE_BYTES (300000),
# INPUT_BYTES (1048576, one external input file per source stage), RUNS (20 for pipe, DVC_RUNS 10),
# plus those of bench/lib.sh (BENCH_DIR, PIPE_TESTKIT, BENCH_WAIT, BENCH_KEEP).
#
# Both projects have the same stages and edges:
#   src0..src{N-1}  source, one external input file each, FILES_PER_STAGE files of FILE_BYTES in
#                   10 sub-folders (pipe: `emit` with files = 10; DVC: a python cmd with one
#                   directory output)
#   index           small source: one 4 KiB data.bin
#   mix  <- index   combine
#   final <- index, mix
# (The `combine` kind reads its upstreams' data.bin, which a many-file `emit` does not write; so the
# edges hang off the small `index` source.)

source "$(dirname "$0")/lib.sh"
need hyperfine dvc git python3
SRC_STAGES="${SRC_STAGES:-10}"
FILES_PER_STAGE="${FILES_PER_STAGE:-1000}"
FILE_BYTES="${FILE_BYTES:-300000}"
INPUT_BYTES="${INPUT_BYTES:-1048576}"
RUNS="${RUNS:-20}"
DVC_RUNS="${DVC_RUNS:-10}"
unset DATASTORE

pipe_bin
W="$BENCH_DIR/noop"
rm -rf "$W"
mkdir -p "$W/pipe/inputs" "$W/dvc/inputs" "$W/demo"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
export DVC_SITE_CACHE_DIR="$W/dvc-site-cache"   # DVC's state db goes away with $W

say "generating the projects in $W"
for ((i = 0; i < SRC_STAGES; i++)); do
    head -c "$INPUT_BYTES" /dev/urandom > "$W/pipe/inputs/src$i.bin"
    cp "$W/pipe/inputs/src$i.bin" "$W/dvc/inputs/src$i.bin"
done

# --- pipe project
{
    echo '[pipeline]'
    echo 'name = "noop-bench"'
    echo 'datastore = "datastore"'
    for ((i = 0; i < SRC_STAGES; i++)); do
        printf '\n[stages.src%d]\nkind = "emit"\nchunks = %d\nchunk_bytes = %d\nfiles = 10\nseed = %d\ndata = "inputs/src%d.bin"\n' \
            "$i" "$FILES_PER_STAGE" "$FILE_BYTES" "$i" "$i"
    done
    printf '\n[stages.index]\nkind = "emit"\nchunks = 4\nchunk_bytes = 1024\nseed = 100\n'
    printf '\n[stages.mix]\nkind = "combine"\nparts = ["index"]\n'
    printf '\n[stages.final]\nkind = "combine"\nparts = ["index", "mix"]\nsalt = "final"\n'
} > "$W/pipe/pipeline.toml"

# --- DVC project
cp "$REPO/bench/dvc_stage.py" "$W/dvc/"
{
    echo 'stages:'
    for ((i = 0; i < SRC_STAGES; i++)); do
        cat <<EOF
  src$i:
    cmd: python3 dvc_stage.py emit out/src$i --chunks $FILES_PER_STAGE --chunk-bytes $FILE_BYTES --files 10 --seed $i --data inputs/src$i.bin
    deps: [inputs/src$i.bin]
    outs: [out/src$i]
EOF
    done
    cat <<EOF
  index:
    cmd: python3 dvc_stage.py emit out/index --chunks 4 --chunk-bytes 1024 --seed 100
    outs: [out/index]
  mix:
    cmd: python3 dvc_stage.py combine out/mix out/index
    deps: [out/index]
    outs: [out/mix]
  final:
    cmd: python3 dvc_stage.py combine out/final out/index out/mix --salt final
    deps: [out/index, out/mix]
    outs: [out/final]
EOF
} > "$W/dvc/dvc.yaml"

say "populating: pipe run"
(cd "$W/pipe" && /usr/bin/time -f "pipe run (populate): %e s" "$PIPE" -q run pipeline.toml --jobs "$(nproc)")
say "populating: dvc repro"
(
    cd "$W/dvc" || exit
    git init -q .
    dvc init -q
    dvc config core.analytics false      # no network: no usage reports ...
    dvc config core.check_update false   # ... and no update check
    git add -A >/dev/null && git -c user.name=bench -c user.email=bench@localhost commit -qm init
    /usr/bin/time -f "dvc repro (populate): %e s" dvc repro -q
)

say "what each side holds"
for d in "$W/pipe/datastore/objects" "$W/dvc/out"; do
    echo "$d: $(find "$d" -type f -name 'chunk-*' | wc -l) chunk files, $(du -sh "$d" | cut -f1)"
done
echo "dvc cache: $(du -sh "$W/dvc/.dvc/cache" | cut -f1)"

say "sanity: both are no-ops"
(cd "$W/pipe" && "$PIPE" -q status pipeline.toml --json | python3 -c '
import json, sys
s = json.load(sys.stdin)["stages"]
states = {x["state"] for x in s}
print(f"pipe status: {len(s)} stages, states {sorted(states)}")
assert states == {"cached"}, states')
(cd "$W/pipe" && "$PIPE" -q plan pipeline.toml --json | python3 -c '
import json, sys
p = json.load(sys.stdin)
print("pipe plan: actions", sorted({x["action"] for x in p["stages"]}), "hashed", p["hashed"])
assert {x["action"] for x in p["stages"]} == {"skip"}')
(cd "$W/dvc" && dvc status && dvc repro 2>&1 | tail -3)

# Small pipeline: the engine demo, run once.
cp "$REPO/tests/testkit/demo.toml" "$W/demo/demo.toml"
(cd "$W/demo" && "$PIPE" -q --datastore ds run demo.toml --jobs 2)

# Write back the GBs just produced, so that the timed runs' fsyncs do not queue behind them.
sync
wait_quiet
machine dvc git python3

say "timings"
H=(hyperfine -N --style basic)
(cd "$W/pipe" && "${H[@]}" --warmup 3 --runs "$RUNS" --export-json "$W/pipe-status.json" \
    -n "pipe status (${SRC_STAGES}x${FILES_PER_STAGE} files)" "$PIPE -q status pipeline.toml")
(cd "$W/dvc" && "${H[@]}" --warmup 1 --runs "$DVC_RUNS" --export-json "$W/dvc-status.json" \
    -n "dvc status (${SRC_STAGES}x${FILES_PER_STAGE} files)" "dvc status -q")
(cd "$W/pipe" && "${H[@]}" --warmup 3 --runs "$RUNS" --export-json "$W/pipe-run.json" \
    -n "pipe run, no-op (${SRC_STAGES}x${FILES_PER_STAGE} files)" "$PIPE -q run pipeline.toml")
(cd "$W/dvc" && "${H[@]}" --warmup 1 --runs "$DVC_RUNS" --export-json "$W/dvc-repro.json" \
    -n "dvc repro, no-op (${SRC_STAGES}x${FILES_PER_STAGE} files)" "dvc repro -q")
(cd "$W/demo" && "${H[@]}" --warmup 3 --runs "$RUNS" --export-json "$W/demo-status.json" \
    -n "pipe status (demo.toml, 4 stages)" "$PIPE -q --datastore ds status demo.toml")

say "results"
python3 - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
r = {n: json.load(open(f"{w}/{n}.json"))["results"][0] for n in
     ["pipe-status", "dvc-status", "pipe-run", "dvc-repro", "demo-status"]}
print(f"| {'command':<48} | {'mean ± σ (ms)':>20} | {'min (ms)':>9} | {'runs':>4} |")
print(f"|{'-'*50}|{'-'*21}:|{'-'*10}:|{'-'*5}:|")
for x in r.values():
    print(f"| {x['command']:<48} | {x['mean']*1e3:>10.1f} ± {x['stddev']*1e3:<7.1f} | {x['min']*1e3:>9.1f} | {len(x['times']):>4} |")
print()
for a, b, what in [("dvc-status", "pipe-status", "status"), ("dvc-repro", "pipe-run", "no-op run")]:
    ratio = r[a]["mean"] / r[b]["mean"]
    print(f"{what}: dvc / pipe = {ratio:.0f}x  (target >= 50x: {'met' if ratio >= 50 else 'MISSED'})")
d = r["demo-status"]["mean"] * 1e3
print(f"pipe status on demo.toml: {d:.1f} ms  (target < 100 ms: {'met' if d < 100 else 'MISSED'})")
EOF
echo "pipe run records after the timings: $(ls "$W/pipe/datastore/runs/noop-bench" | wc -l)"
busiest
