#!/usr/bin/env bash
# The `cache` stage against Hugging Face transformers on this CPU: the same random ~100M-parameter
# Llama-3-shaped base/chat pair (scripts/make_bench_llama.py), the same documents, the same work
# (tokenize, context 1024, windows of 8 micro-batches sorted by length, right padding + mask, base
# then chat per micro-batch, stop after block LAYER, gather the non-padding rows, append (n, 2, d)
# f32 to disk). pipe: `pipe run` of a one-stage pipeline on a fresh datastore; transformers:
# bench/cache_hf.py. Run alternately, ROUNDS times each, under /usr/bin/time -v (wall, peak RSS);
# then a check that both stored the same tokens and the same activations, and a markdown table.
#
#   bash bench/cache.sh
#
# Needs: cargo, GNU time at /usr/bin/time (apt-get install -y time), a Python with torch,
# transformers, tokenizers, numpy and safetensors (PY, default /work/.venv-parity/bin/python).
# Knobs: ROUNDS (3), DOCS (128 documents, each 1-2 random documents of
# pipelines/tiny/data/web.jsonl joined), LAYER (6), BATCH (8), THREADS (2: torch threads; pipe's
# candle uses all cores, 2 here), PIPE (a pipe binary; default: build target/release/pipe here),
# plus BENCH_DIR, BENCH_WAIT, BENCH_KEEP of bench/lib.sh.

source "$(dirname "$0")/lib.sh"
PY="${PY:-/work/.venv-parity/bin/python}"
need python3 "$PY"
[[ -x /usr/bin/time ]] || { echo "missing /usr/bin/time (apt-get install -y time)" >&2; exit 2; }
ROUNDS="${ROUNDS:-3}"
DOCS="${DOCS:-128}"
LAYER="${LAYER:-6}"
BATCH="${BATCH:-8}"
THREADS="${THREADS:-2}"
unset DATASTORE

if [[ -z "${PIPE:-}" ]]; then
    (cd "$REPO" && cargo build --release --bin pipe >&2)
    PIPE="$REPO/target/release/pipe"
fi
[[ -x "$PIPE" ]] || { echo "no pipe binary at $PIPE" >&2; exit 2; }

W="$BENCH_DIR/cache"
rm -rf "$W"
mkdir -p "$W"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$W"' EXIT
cd "$W" || exit

say "generating the model pair and $DOCS documents in $W"
"$PY" "$REPO/scripts/make_bench_llama.py" "$W/models" 2>&1 | grep -v 'Writing model shards'
python3 - "$REPO/pipelines/tiny/data/web.jsonl" "$W/data.jsonl" "$DOCS" <<'EOF'
import json, random, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = [json.loads(l)["text"] for l in open(src) if l.strip()]
rng = random.Random(0)
with open(dst, "w") as f:
    for i in range(n):
        text = " ".join(rng.choice(docs) for _ in range(rng.randint(1, 2)))
        f.write(json.dumps({"id": f"bench-{i:04d}", "text": text}) + "\n")
EOF
cat > "$W/cache.toml" <<EOF
[pipeline]
name = "cache-bench"

[stages.cache]
kind = "cache"
base = "models/base"
chat = "models/chat"
data = "data.jsonl"
layer = $LAYER
batch_size = $BATCH
dtype = "f32"
EOF

run_pipe() {  # $1 = round
    rm -rf "$W/ds"
    /usr/bin/time -v -o "$W/pipe-$1.time" "$PIPE" -q run "$W/cache.toml" --datastore "$W/ds" > "$W/pipe-$1.log" 2>&1
    "$PIPE" -q show "$W/cache.toml" cache --datastore "$W/ds" --json > "$W/pipe-$1.json"
}
run_hf() {
    rm -rf "$W/hf"
    mkdir -p "$W/hf"
    /usr/bin/time -v -o "$W/hf-$1.time" "$PY" "$REPO/bench/cache_hf.py" --base models/base --chat models/chat \
        --data data.jsonl --out "$W/hf" --layer "$LAYER" --batch-size "$BATCH" --threads "$THREADS" \
        > "$W/hf-$1.log" 2>&1
    cp "$W/hf/summary.json" "$W/hf-$1.json"
}

wait_quiet
machine
echo "python:    $("$PY" -c 'import sys, torch, transformers, tokenizers, numpy; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "numpy", numpy.__version__, "torch threads", torch.get_num_threads())')"
echo "rustc:     $(rustc --version)"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order="pipe hf"; else order="hf pipe"; fi
    for who in $order; do
        say "round $r: $who"
        "run_$who" "$r"
        grep -E 'Elapsed \(wall|Maximum resident' "$W/$who-$r.time" | sed 's/^\s*/  /'
    done
done
busiest

say "agreement of the last round's outputs (pipe's shards vs cache_hf.py's file)"
"$PY" - "$W" <<'EOF'
import glob, json, sys
import numpy as np
from safetensors.numpy import load_file
w = sys.argv[1]
shards = [load_file(f) for f in sorted(glob.glob(f"{w}/ds/results/cache-bench/cache/shards/*.safetensors"))]
a = np.concatenate([s["activations"] for s in shards])
tp = np.concatenate([s["tokens"] for s in shards])
d = a.shape[2]
b = np.fromfile(f"{w}/hf/activations.f32", dtype=np.float32).reshape(-1, 2, d)
th = np.fromfile(f"{w}/hf/tokens.u32", dtype=np.uint32)
print(f"pipe: {a.shape} in {len(shards)} shard(s); transformers: {b.shape}")
assert a.shape == b.shape, "different token counts"
assert (tp == th).all(), "different token ids"
print("token ids: identical")
for m, name in enumerate(["base", "chat"]):
    x, y = a[:, m].astype(np.float64), b[:, m].astype(np.float64)
    diff = np.abs(x - y)
    row = np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)
    print(f"{name}: max |pipe - hf| = {diff.max():.3g} (max |hf| = {np.abs(y).max():.3g}, "
          f"relative to it {diff.max() / np.abs(y).max():.3g}); "
          f"per-row ||pipe - hf|| / ||hf||: max {row.max():.3g}, median {np.median(row):.3g}")
EOF

say "results"
python3 - "$W" "$ROUNDS" <<'EOF'
import json, re, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
def gnu_time(path):
    t = open(path).read()
    h, m, s = ([0, 0] + re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1).split(":"))[-3:]
    wall = int(h) * 3600 + int(m) * 60 + float(s)
    return wall, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) * 1024
rows = {}
for who in ("pipe", "hf"):
    for r in range(1, rounds + 1):
        wall, rss = gnu_time(f"{w}/{who}-{r}.time")
        j = json.load(open(f"{w}/{who}-{r}.json"))
        if who == "pipe":
            m = j.get("metrics") or j["outputs"]["metrics"]
            tokens, inner = m["tokens"], m["tokens_per_s"]
        else:
            tokens, inner = j["tokens"], j["tokens_per_s"]
        rows.setdefault(who, []).append((tokens, wall, tokens / wall, inner, rss))
names = {"pipe": "pipe `cache` stage (candle)", "hf": "transformers (`bench/cache_hf.py`)"}
print("| implementation | tokens | wall (s) | tokens/s (wall) | tokens/s (in stage) | peak RSS (MB) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
med = {}
for who, rs in rows.items():
    assert len({x[0] for x in rs}) == 1, f"{who}: token counts differ between rounds"
    med[who] = [statistics.median(x[i] for x in rs) for i in range(5)]
    t, wall, tps, inner, rss = med[who]
    each = lambda i, f: ", ".join(f.format(x[i]) for x in rs)
    print(f"| {names[who]} | {t:,.0f} | {wall:.1f} ({each(1, '{:.1f}')}) | {tps:.0f} ({each(2, '{:.0f}')}) "
          f"| {inner:.0f} ({each(3, '{:.0f}')}) | {rss / 1e6:.0f} ({', '.join(f'{x[4] / 1e6:.0f}' for x in rs)}) |")
p, h = med["pipe"], med["hf"]
print()
print("medians; each round in parentheses, in round order")
print(f"pipe / transformers: tokens/s (wall) {p[2] / h[2]:.2f}x, tokens/s (in stage) {p[3] / h[3]:.2f}x, "
      f"wall {p[1] / h[1]:.2f}x, peak RSS {p[4] / h[4]:.2f}x")
EOF
