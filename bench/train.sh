#!/usr/bin/env bash
# The `train` stage's training loop (stages::train::train, via stages/examples/train_bench.rs)
# against the same crosscoder step in plain PyTorch (bench/train_torch.py) on this CPU, at small
# shapes: d = D, F = 4096, batch 512, BatchTopK k = 32 (and the L1 loss), lr 1e-4, f32. Both read
# the same two synthetic caches (TOKENS pairs each, f32); pipe reads them mmapped, PyTorch loads
# them into memory. pipe runs twice: with its CPU step and through candle's autograd
# (TRAIN_BENCH_AUTOGRAD=1, the path GPUs use). Run alternately, ROUNDS times each; then the memory
# of pipe's BatchTopK run on a store 10× larger (bf16, RSS_TOKENS and 10 × RSS_TOKENS pairs per
# cache). Markdown tables at the end.
#
#   bash bench/train.sh
#
# Needs: cargo, a Python with torch and safetensors (PY, default /work/.venv-parity/bin/python).
# Knobs: ROUNDS (3), TOKENS (200000), D (256), STEPS (60, BatchTopK), L1_STEPS (60), THREADS (2:
# torch threads; pipe uses all cores via rayon/gemm), RSS_TOKENS (200000), RSS (1: run the memory
# part), plus BENCH_DIR, BENCH_WAIT, BENCH_KEEP of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
PY="${PY:-/work/.venv-parity/bin/python}"
need "$PY"
ROUNDS="${ROUNDS:-3}"
TOKENS="${TOKENS:-200000}"
D="${D:-256}"
STEPS="${STEPS:-60}"
L1_STEPS="${L1_STEPS:-60}"
THREADS="${THREADS:-2}"
RSS_TOKENS="${RSS_TOKENS:-200000}"
RSS="${RSS:-1}"

(cd "$REPO" && cargo build --release -p pipe-stages --example train_bench >&2)
BIN="$REPO/target/release/examples/train_bench"
PIPE="$BIN"  # for machine() of lib.sh

W="$BENCH_DIR/train"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT

say "generating 2 × $TOKENS pairs (d = $D, f32) in $W/data"
"$BIN" gen "$W/data" "$TOKENS" "$D" f32

wait_quiet
machine
echo "python:    $("$PY" -c 'import sys, torch, safetensors, numpy; print(sys.version.split()[0], "torch", torch.__version__, "safetensors", safetensors.__version__, "numpy", numpy.__version__)')"
echo "rustc:     $(rustc --version)"

run_pipe() {  # $1 loss, $2 steps, $3 round
    "$BIN" run "$W/data" "$1" "$2" | tee -a "$W/results.jsonl"
}
run_autograd() {  # the same loop through candle's autograd instead of the CPU step
    TRAIN_BENCH_AUTOGRAD=1 "$BIN" run "$W/data" "$1" "$2" | tee -a "$W/results.jsonl"
}
run_torch() {
    "$PY" "$REPO/bench/train_torch.py" --data "$W/data" --loss "$1" --steps "$2" --threads "$THREADS" \
        | tee -a "$W/results.jsonl"
}
: > "$W/results.jsonl"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order="pipe torch autograd"; else order="autograd torch pipe"; fi
    for loss in batchtopk l1; do
        steps=$STEPS; [[ $loss == l1 ]] && steps=$L1_STEPS
        for who in $order; do
            say "round $r: $who $loss ($steps steps), load $(cut -d' ' -f1-3 /proc/loadavg)"
            "run_$who" "$loss" "$steps" "$r"
        done
    done
done
busiest
rm -rf "$W/data"

if [[ "$RSS" == 1 ]]; then
    : > "$W/rss.jsonl"
    for n in "$RSS_TOKENS" $((RSS_TOKENS * 10)); do
        say "memory: 2 × $n pairs (d = $D, bf16); $(df -h "$BENCH_DIR" | awk 'NR==2 {print $4" free"}')"
        "$BIN" gen "$W/rss" "$n" "$D" bf16
        du -sh "$W/rss"
        sync
        "$BIN" run "$W/rss" batchtopk "$STEPS" | tee -a "$W/rss.jsonl"
        rm -rf "$W/rss"
    done
    busiest
fi

say "results"
python3 - "$W" "$D" <<'EOF'
import json, statistics, sys
w, dim = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{w}/results.jsonl")]
mb = lambda b: f"{b / 1e6:,.0f}"
print("| loss | implementation | steps | steps/s: median (each round) | pipe / torch | peak RSS (MB) | pipe RssAnon peak (MB) | final loss |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for loss in ("batchtopk", "l1"):
    med = {}
    names = {"pipe": "pipe `train` loop (CPU step)", "pipe-autograd": "pipe `train` loop (candle autograd)",
             "torch": "PyTorch (`bench/train_torch.py`)"}
    whos = [w for w in names if any(r["loss"] == loss and r["impl"] == w for r in rows)]
    for who in whos:
        rs = [r for r in rows if r["loss"] == loss and r["impl"] == who]
        med[who] = statistics.median(r["steps_per_s"] for r in rs)
    for who in whos:
        rs = [r for r in rows if r["loss"] == loss and r["impl"] == who]
        each = ", ".join(f"{r['steps_per_s']:.2f}" for r in rs)
        ratio = f"**{med[who] / med['torch']:.2f}×**" if who != "torch" else ""
        anon = mb(max(r["peak_rss_anon"] for r in rs)) if who != "torch" else "–"
        print(f"| {loss} | {names[who]} "
              f"| {rs[0]['steps']} | {med[who]:.2f} ({each}) | {ratio} | {mb(max(r['vm_hwm'] for r in rs))} | {anon} "
              f"| {rs[-1].get('final_loss', float('nan')):.4f} |")
try:
    rss = [json.loads(l) for l in open(f"{w}/rss.jsonl")]
except FileNotFoundError:
    rss = []
if rss:
    print()
    print("| pairs per cache (bf16) | store on disk (MB) | steps | steps/s | VmHWM (MB) | RssAnon peak (MB) | RssFile peak (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rss:
        n = r["tokens_in_store"] // 2
        print(f"| {n:,} | {mb(r['tokens_in_store'] * 2 * dim * 2)} | {r['steps']} | {r['steps_per_s']:.2f} "
              f"| {mb(r['vm_hwm'])} | {mb(r['peak_rss_anon'])} | {mb(r['peak_rss_file'])} |")
    a, b = rss[0], rss[-1]
    print(f"\n10× store: VmHWM {b['vm_hwm'] / a['vm_hwm']:.2f}×, RssAnon peak {b['peak_rss_anon'] / a['peak_rss_anon']:.2f}×")
EOF
