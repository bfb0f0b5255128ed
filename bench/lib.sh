# shellcheck shell=bash
# Shared helpers of the benchmark scripts in bench/ (sourced, not run).
#
# Environment:
#   BENCH_DIR     scratch folder for data and datastores (default /tmp/bench); big files go here
#   PIPE_TESTKIT  a pipe-testkit binary to measure (default: build target/release/pipe-testkit here)
#   BENCH_WAIT    1 (default): before timing, wait up to 30 min for fuzzers and cargo builds to end
#   BENCH_KEEP    1: keep the generated data after the script ends (default: delete it)

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/tmp/bench}"
mkdir -p "$BENCH_DIR"
export DVC_NO_ANALYTICS=1

say() { printf '\n== %s\n' "$*"; }

need() {
    for t in "$@"; do
        command -v "$t" >/dev/null || { echo "missing tool: $t (see the header of this script)" >&2; exit 2; }
    done
}

# Builds (or takes from $PIPE_TESTKIT) the pipe-testkit binary and exports PIPE.
pipe_bin() {
    if [[ -n "${PIPE_TESTKIT:-}" ]]; then
        PIPE="$PIPE_TESTKIT"
    else
        (cd "$REPO" && cargo build --release --features testkit --bin pipe-testkit >&2)
        PIPE="$REPO/target/release/pipe-testkit"
    fi
    [[ -x "$PIPE" ]] || { echo "no pipe-testkit binary at $PIPE" >&2; exit 2; }
    export PIPE
}

# Prints the machine and tool versions (for BENCHMARKS.md).
machine() {
    say "machine"
    echo "date:      $(date -u +%FT%TZ)"
    echo "nproc:     $(nproc)"
    echo "cpu:       $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "ram:       $(free -h | awk '/^Mem:/ {print $2}')"
    echo "disk:      $(df -h "$BENCH_DIR" | awk 'NR==2 {print $1, $2" size,", $4" free,", "mounted on", $6}')"
    echo "kernel:    $(uname -r)"
    local head; head="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [[ -n "${PIPE_TESTKIT:-}" ]]; then
        echo "pipe:      $PIPE (from PIPE_TESTKIT${PIPE_COMMIT:+, built from commit $PIPE_COMMIT}); repo HEAD $head"
    else
        echo "pipe:      $PIPE built from $head$(git -C "$REPO" diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes')"
    fi
    echo "hyperfine: $(hyperfine --version 2>/dev/null || echo none)"
    for t in "$@"; do
        echo "$t: $("$t" --version 2>/dev/null | head -1 || echo none)"
    done
    echo "load:      $(cat /proc/loadavg)"
    busiest
}

# Waits until no fuzzer and no cargo build runs (polls every 60 s, 30 min at most), so that the
# timings do not share the cores with them. Says whether it measured on a quiet machine.
wait_quiet() {
    [[ "${BENCH_WAIT:-1}" == 1 ]] || { echo "BENCH_WAIT=0: not waiting for a quiet machine"; return; }
    local waited=0
    # A libFuzzer target runs as e.g. `target/x86_64-unknown-linux-gnu/release/config
    # -artifact_prefix=.../fuzz/artifacts/...` under `cargo-fuzz`: neither name says libfuzzer.
    local fuzz='libfuzzer|fuzz/target|cargo-fuzz|-artifact_prefix=|-max_total_time='
    while pgrep -f -- "$fuzz" >/dev/null || pgrep -x 'cargo|rustc' >/dev/null; do
        if (( waited >= 1800 )); then
            echo "WARNING: a fuzzer or cargo build still runs after 30 min; measuring anyway:"
            pgrep -af -- "$fuzz" | cut -c1-160 || true
            pgrep -ax 'cargo|rustc' | cut -c1-160 || true
            return
        fi
        echo "waiting for a fuzzer / cargo build to end ($waited s so far)..." >&2
        sleep 60
        waited=$((waited + 60))
    done
    echo "quiet machine: no fuzzer, no cargo build running (waited $waited s)"
}

# The busiest processes right now (to show what else shared the cores during a measurement).
busiest() {
    echo "busiest processes at $(date -u +%T) (load $(cut -d' ' -f1-3 /proc/loadavg)):"
    ps -eo pcpu,etime,args --sort=-pcpu | sed -n 2,4p | cut -c1-140 | sed 's/^/  /'
}

# `hyperfine_table NAME...` prints mean ± σ (ms) of each command of the last hyperfine JSON export.
hyperfine_table() {
    python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print(f"| {'command':<58} | {'mean ± σ (ms)':>18} | {'min (ms)':>9} | {'runs':>4} |")
print(f"|{'-'*60}|{'-'*20}:|{'-'*10}:|{'-'*5}:|")
for x in r:
    print(f"| {x['command']:<58} | {x['mean']*1e3:>9.1f} ± {x['stddev']*1e3:<6.1f} | {x['min']*1e3:>9.1f} | {len(x['times']):>4} |")
EOF
}
