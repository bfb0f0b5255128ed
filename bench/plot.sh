#!/usr/bin/env bash
# The plot stage's drawing against the same figures in matplotlib (bench/plot_matplotlib.py, as
# the original's notebooks draw them) on this CPU, at the paper's size: a latent table of N
# latents (default 131,072 = Llama 3.1 8B's 32 × 4096) with the columns `scale` writes, and a
# metrics.jsonl of STEPS training steps (default 100,000, a line every 50). Both read the same
# parquet table and write the same 8 figures as PNG and SVG at the same pixel sizes. Run
# alternately, ROUNDS times each; a Markdown table at the end; the data is deleted.
#
#   bash bench/plot.sh
#
# Needs: cargo, a Python with matplotlib, pandas and pyarrow (PY, default /work/.venv-plot/bin/python).
# Knobs: ROUNDS (3), N (131072), STEPS (100000), plus BENCH_DIR, BENCH_WAIT, BENCH_KEEP of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
PY="${PY:-/work/.venv-plot/bin/python}"
need "$PY"
ROUNDS="${ROUNDS:-3}"
N="${N:-131072}"
STEPS="${STEPS:-100000}"

(cd "$REPO" && cargo build --release -p pipe-stages --example plot_bench >&2)
BIN="$REPO/target/release/examples/plot_bench"
PIPE="$BIN"  # for machine() of lib.sh

W="$BENCH_DIR/plot"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT

say "generating a table of $N latents and $STEPS steps of metrics in $W/data"
"$BIN" gen "$W/data" "$N" "$STEPS"

wait_quiet
machine
echo "python:    $("$PY" -c 'import sys, matplotlib, pandas, pyarrow; print(sys.version.split()[0], "matplotlib", matplotlib.__version__, "pandas", pandas.__version__, "pyarrow", pyarrow.__version__)')"
echo "rustc:     $(rustc --version)"

: > "$W/results.jsonl"
run_pipe() { rm -rf "$W/out_pipe"; "$BIN" draw "$W/data" "$W/out_pipe" | sed 's/^{/{"impl":"pipe",/' | tee -a "$W/results.jsonl"; }
run_mpl() { rm -rf "$W/out_mpl"; "$PY" "$REPO/bench/plot_matplotlib.py" "$W/data" "$W/out_mpl" | sed 's/^{/{"impl":"mpl",/' | tee -a "$W/results.jsonl"; }
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order="pipe mpl"; else order="mpl pipe"; fi
    for who in $order; do
        say "round $r: $who, load $(cut -d' ' -f1-3 /proc/loadavg)"
        "run_$who"
    done
done
busiest
du -sh "$W/out_pipe" "$W/out_mpl"

say "results"
python3 - "$W" <<'PYEOF'
import json, statistics, sys
w = sys.argv[1]
rows = [json.loads(l) for l in open(f"{w}/results.jsonl")]
name = {"pipe": "pipe (`plot_bench draw`: the stage's `draw_figures`)", "mpl": "matplotlib (`bench/plot_matplotlib.py`)"}
med = {k: statistics.median(r["seconds"] for r in rows if r["impl"] == k) for k in name}
print("| implementation | latents | figures (files) | seconds: median (each round) | matplotlib / pipe | peak RSS (MB) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for k in name:
    rs = [r for r in rows if r["impl"] == k]
    each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
    ratio = f"**{med['mpl'] / med['pipe']:.2f}×**" if k == "pipe" else ""
    print(f"| {name[k]} | {rs[0]['latents']:,} | {rs[0]['figures']} ({rs[0]['files']}) | {med[k]:.2f} ({each}) | {ratio} | {max(r['vm_hwm_mb'] for r in rs):,.0f} |")
PYEOF
