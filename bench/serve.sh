#!/usr/bin/env bash
# pipe serve at the paper's table size: the tiny pipeline with 131,072 latents (expansion factor
# 2048 on d = 64), then latent-table queries over HTTP against pandas on the same parquet, the
# cold first request, a latent page with its examples, and steering tokens/s.
# Usage: bench/serve.sh  (needs target/release/pipe and python3 with pandas + pyarrow)
set -euo pipefail
cd "$(dirname "$0")/.."
PIPE=${PIPE:-target/release/pipe}
PY=${PY:-python3}
DS=${DS:-/tmp/pipe-bench-serve}
export DATASTORE=$DS
SET=(--set stages.train.expansion_factor=2048 --set stages.train.epochs=1
     --set stages.train.threshold_start_step=5 --set stages.train.warmup_steps=5
     --set stages.train.validate_every=1000)
[ -e "$DS/results/tiny/scale/latents.parquet" ] || "$PIPE" -q run pipelines/tiny.toml "${SET[@]}" --only scale

start() {
  "$PIPE" -q serve --port 0 > "$DS/serve.out" 2>/dev/null &
  SERVER=$!
  for _ in $(seq 100); do grep -q serving "$DS/serve.out" 2>/dev/null && break; sleep 0.05; done
  URL=$(sed -n 's#^serving \(http://[^/]*\)/.*#\1#p' "$DS/serve.out")
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }

echo "== cold: the first table request after a start (parses latents.parquet)"
for i in 1 2 3; do
  start
  curl -s -o /dev/null -w "cold request $i: %{time_total} s\n" "$URL/api/p/tiny/t/scale/latents?sort=nu_error&limit=100"
  stop
done

start
trap stop EXIT
echo "== warm queries, side by side with pandas"
"$PY" bench/serve_bench.py "$URL" "$DS/results/tiny/scale/latents.parquet" 20

