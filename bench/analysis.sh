#!/usr/bin/env bash
# The analysis passes against the same computations in plain PyTorch (bench/analysis_numpy.py) on
# this CPU: Latent Scaling (stages::scale::Accumulators over every token of both caches, then
# betas) and `collect` (stages::collect::collect), via stages/examples/analysis_bench.rs. Both read
# the same two synthetic caches (TOKENS pairs each, f32, d = D) and the same random BatchTopK
# crosscoder (F latents, inference threshold set for ~K active latents per token), batches of
# 4,096 tokens. Run alternately, ROUNDS times each; agreement checked on every PyTorch run
# against the last pipe run's output. Markdown tables at the end; the data is deleted.
#
#   bash bench/analysis.sh
#
# Needs: cargo, a Python with torch and safetensors (PY, default /work/.venv-parity/bin/python).
# Knobs: ROUNDS (3), TOKENS (30000), D (256), F (4096), K (32), THREADS (2: torch threads; pipe
# uses all cores via rayon/gemm), plus BENCH_DIR, BENCH_WAIT, BENCH_KEEP of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
PY="${PY:-/work/.venv-parity/bin/python}"
need "$PY"
ROUNDS="${ROUNDS:-3}"
TOKENS="${TOKENS:-30000}"
D="${D:-256}"
F="${F:-4096}"
K="${K:-32}"
THREADS="${THREADS:-2}"

(cd "$REPO" && cargo build --release -p pipe-stages --example analysis_bench >&2)
BIN="$REPO/target/release/examples/analysis_bench"
PIPE="$BIN"  # for machine() of lib.sh

W="$BENCH_DIR/analysis"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT

say "generating 2 × $TOKENS pairs (d = $D, f32) and a crosscoder (F = $F, k = $K) in $W/data"
"$BIN" gen "$W/data" "$TOKENS" "$D" "$F" "$K"

wait_quiet
machine
echo "python:    $("$PY" -c 'import sys, torch, safetensors, numpy; print(sys.version.split()[0], "torch", torch.__version__, "safetensors", safetensors.__version__, "numpy", numpy.__version__, "cpu", torch.backends.cpu.get_cpu_capability())')"
echo "rustc:     $(rustc --version)"

run_pipe() {  # $1 = scale | collect
    "$BIN" "$1" "$W/data" | tee -a "$W/results.jsonl"
}
run_torch() {
    "$PY" "$REPO/bench/analysis_numpy.py" --data "$W/data" --what "$1" --threads "$THREADS" --check \
        | tee -a "$W/results.jsonl"
}
: > "$W/results.jsonl"
for ((r = 1; r <= ROUNDS; r++)); do
    for what in scale collect; do
        # pipe first in odd rounds; in round 1 pipe must run first: PyTorch checks its output.
        if ((r % 2)); then order="pipe torch"; else order="torch pipe"; fi
        for who in $order; do
            say "round $r: $who $what, load $(cut -d' ' -f1-3 /proc/loadavg)"
            "run_$who" "$what"
        done
    done
done
busiest

say "results"
python3 - "$W" <<'EOF'
import json, statistics, sys
w = sys.argv[1]
rows = [json.loads(l) for l in open(f"{w}/results.jsonl")]
mb = lambda b: f"{b / 1e6:,.0f}"
name = {"pipe": "pipe (`analysis_bench`, candle)", "torch": "PyTorch (`bench/analysis_numpy.py`)"}
print("| pass | implementation | tokens | seconds: median (each round) | tokens/s: median | pipe / torch | peak RSS (MB) | nonzero codes |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for what in ("scale", "collect"):
    med = {}
    for who in ("pipe", "torch"):
        rs = [r for r in rows if r["what"] == what and r["impl"] == who]
        med[who] = statistics.median(r["tokens_per_s"] for r in rs)
    for who in ("pipe", "torch"):
        rs = [r for r in rows if r["what"] == what and r["impl"] == who]
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        ratio = f"**{med['pipe'] / med['torch']:.2f}×**" if who == "pipe" else ""
        print(f"| {what} | {name[who]} | {rs[0]['tokens']:,} | {secs:.1f} ({each}) | {med[who]:,.0f} | {ratio} "
              f"| {mb(max(r['vm_hwm'] for r in rs))} | {rs[-1]['nonzero']:,} |")
print()
for what in ("scale", "collect"):
    c = [r for r in rows if r["what"] == what and r["impl"] == "torch"][-1]["check"]
    print(f"{what} agreement: {json.dumps(c)}")
EOF
