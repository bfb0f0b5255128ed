#!/usr/bin/env bash
# The GPU benchmark of issue 9: pipe's `cache` and `train` stages against transformers and PyTorch
# doing the same work, side by side in one run, on one GPU. Carry the working tree with the `cuda`
# build of scripts/build-cuda.sh (target/cuda/pipe.gz) to the GPU machine and run
#
#   bash bench/gpu/run.sh                # ≈ 8–10 min on one H100/H200 (estimated, not yet run)
#   SMOKE=1 bash bench/gpu/run.sh        # the same steps at toy sizes on the CPU (≈ 1 min), to check the script
#
# 1. Models (bench/gpu/make_models.py, the machine's PyTorch): random-weight Llama base/chat pairs of
#    SHAPES (default: llama1b = Llama-3.2-1B's shape, cut after block 8 + 1; llama8b = Llama-3.1-8B's,
#    cut after block 16 + 1: the paper's layers), bf16 safetensors + config.json + the tiny
#    tokenizer. Data: DOCS documents of ~1,024 tokens built from the tiny pipeline's corpus.
# 2. Cache: `pipe run` of a generated pipeline's `cache` stage (dtype and store_dtype bf16,
#    context 1024, micro-batch CACHE_BATCH) against bench/cache_hf.py (transformers, sdpa, bf16,
#    the same documents, batching and output). Figure: each side's own tokens/s, model loading
#    included, and the wall time of each process.
# 3. Train (on the llama8b cache, d = 4096): BatchTopK, F = TRAIN_F (131,072), batch TRAIN_BATCH
#    (2,048), k = 100, per precision in PRECISIONS (tf32, f32, bf16): pipe's `train` stage against
#    bench/train_torch.py (dictionary_learning-style dense PyTorch), each run twice, STEPS_A and
#    STEPS_B steps; steps/s = (STEPS_B − STEPS_A) / (t_B − t_A) with t each side's own timer (init,
#    steps, final write: the stage's `seconds` metric, train_torch.py's `seconds`), so init and the
#    final 8.6 GB write cancel out; the same from the processes' wall times is printed beside.
# Peak device memory of every process is sampled with nvidia-smi every 0.5 s (memory.used, so the
# CUDA context counts on both sides). Prints Markdown tables with the ratios and writes
# $WORK/results.json; outputs stay in $WORK.
#
# Knobs: PIPE_BIN (target/cuda/pipe, unpacked from its .gz; SMOKE: target/release/pipe), PY
# (python3; SMOKE: /work/.venv-parity/bin/python), DEVICE (cuda:0; SMOKE: cpu), WORK
# (/tmp/gpu-bench), SHAPES, TRAIN_SHAPE (llama8b), DOCS (160), CACHE_BATCH (32), CACHE_DTYPE (bf16;
# SMOKE: f32, faster than bf16 on the CPU; stored bf16 either way), PRECISIONS,
# TRAIN_F, TRAIN_BATCH, K (100), STEPS_A (3), STEPS_B (13), SKIP_CACHE=1 / SKIP_TRAIN=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then
    : "${PIPE_BIN:=target/release/pipe}" "${PY:=/work/.venv-parity/bin/python}" "${DEVICE:=cpu}"
    : "${SHAPES:=smoke}" "${TRAIN_SHAPE:=smoke}" "${DOCS:=12}" "${CACHE_BATCH:=4}"
    : "${TRAIN_F:=2048}" "${TRAIN_BATCH:=256}" "${K:=16}" "${PRECISIONS:=f32}" "${CACHE_DTYPE:=f32}"
    LAYERS_smoke=1
else
    : "${PIPE_BIN:=target/cuda/pipe}" "${PY:=python3}" "${DEVICE:=cuda:0}"
    : "${SHAPES:=llama1b llama8b}" "${TRAIN_SHAPE:=llama8b}" "${DOCS:=160}" "${CACHE_BATCH:=32}"
    : "${TRAIN_F:=131072}" "${TRAIN_BATCH:=2048}" "${K:=100}" "${PRECISIONS:=tf32 f32 bf16}" "${CACHE_DTYPE:=bf16}"
fi
LAYERS_llama1b=8
LAYERS_llama8b=16
STEPS_A="${STEPS_A:-3}"
STEPS_B="${STEPS_B:-13}"
WORK="${WORK:-/tmp/gpu-bench}"
TORCH_DEVICE="${DEVICE%%:*}"
[[ "$TORCH_DEVICE" == cuda ]] && TORCH_DEVICE="$DEVICE"

if [[ ! -x "$PIPE_BIN" && -f "$PIPE_BIN.gz" ]]; then
    gunzip -kf "$PIPE_BIN.gz"
    chmod +x "$PIPE_BIN"
fi
[[ -x "$PIPE_BIN" ]] || { echo "no pipe binary at $PIPE_BIN (scripts/build-cuda.sh builds one)" >&2; exit 2; }
PIPE_BIN="$(realpath "$PIPE_BIN")"
[[ -d /usr/local/cuda/lib64 ]] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset DATASTORE
rm -rf "$WORK"
mkdir -p "$WORK"
: > "$WORK/runs.jsonl"

say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
say "machine"
echo "date:   $(date -u +%FT%TZ)"
echo "cpu:    $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) × $(nproc)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)'
echo "pipe:   $("$PIPE_BIN" --version)"

# Runs "$@" as run $1 (its name), logging to $WORK/$1.log; appends {name, wall_s, peak_gpu_mib}
# to runs.jsonl.
timed() {
    local name="$1"
    shift
    local start end peak=0 pid sampler=""
    start=$(date +%s.%N)
    "$@" > "$WORK/$name.log" 2>&1 &
    pid=$!
    if command -v nvidia-smi >/dev/null; then
        (
            max=0
            while kill -0 "$pid" 2>/dev/null; do
                v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
                ((v > max)) && max=$v
                echo "$max" > "$WORK/$name.gpumem"
                sleep 0.5
            done
        ) &
        sampler=$!
    fi
    if ! wait "$pid"; then
        echo "$name failed; the end of $WORK/$name.log:" >&2
        tail -25 "$WORK/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    [[ -n "$sampler" ]] && wait "$sampler" || true
    [[ -f "$WORK/$name.gpumem" ]] && peak=$(cat "$WORK/$name.gpumem")
    printf '{"name": "%s", "wall_s": %s, "peak_gpu_mib": %s}\n' "$name" "$(awk "BEGIN { print $end - $start }")" "$peak" \
        | tee -a "$WORK/runs.jsonl"
}

say "data: $DOCS documents"
"$PY" - "$REPO/pipelines/tiny/data/web.jsonl" "$WORK/data.jsonl" "$DOCS" <<'EOF'
import json, random, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = [json.loads(l)["text"] for l in open(src) if l.strip()]
rng = random.Random(0)
with open(dst, "w") as f:
    for i in range(n):
        # ~4,000 characters: more than the 1,024-token context of the tiny tokenizer.
        text = ""
        while len(text) < 4000:
            text += rng.choice(docs) + " "
        f.write(json.dumps({"id": f"gpu-{i:04d}", "text": text.strip()}) + "\n")
EOF

for shape in $SHAPES; do
    layers_var="LAYERS_$shape"
    layer="${!layers_var}"
    say "models: $shape, blocks 0..$layer"
    timed "models-$shape" "$PY" bench/gpu/make_models.py "$WORK/$shape" --shape "$shape" --layers $((layer + 1)) \
        --device "${TORCH_DEVICE%%:*}"
    cat > "$WORK/$shape.toml" <<EOF
[pipeline]
name = "gpu-bench-$shape"

[stages.cache]
kind = "cache"
base = "$shape/base"
chat = "$shape/chat"
data = "data.jsonl"
layer = $layer
dtype = "$CACHE_DTYPE"
store_dtype = "bf16"
context_len = 1024
batch_size = $CACHE_BATCH

[stages.train]
kind = "train"
activations = ["cache"]
loss = "batchtopk"
k = $K
dict_size = $TRAIN_F
batch_size = $TRAIN_BATCH
epochs = 1000
max_steps = $STEPS_A
lr = 1e-4
warmup_steps = 1000
log_every = 1000000
checkpoint_every = 1000000
EOF
    if [[ "${SKIP_CACHE:-0}" != 1 || "$shape" == "$TRAIN_SHAPE" ]]; then
        say "cache: pipe, $shape"
        timed "cache-pipe-$shape" "$PIPE_BIN" -q --datastore "$WORK/ds-$shape" run "$WORK/$shape.toml" \
            --only cache --devices "$DEVICE"
        "$PIPE_BIN" -q --datastore "$WORK/ds-$shape" show "$WORK/$shape.toml" cache --json > "$WORK/cache-pipe-$shape.json"
    fi
    if [[ "${SKIP_CACHE:-0}" != 1 ]]; then
        say "cache: transformers, $shape"
        mkdir -p "$WORK/hf-$shape"
        timed "cache-hf-$shape" "$PY" bench/cache_hf.py --base "$WORK/$shape/base" --chat "$WORK/$shape/chat" \
            --data "$WORK/data.jsonl" --out "$WORK/hf-$shape" --layer "$layer" --batch-size "$CACHE_BATCH" \
            --context-len 1024 --device "$TORCH_DEVICE" --dtype "$CACHE_DTYPE" --store-dtype bf16 --threads "$(nproc)"
        rm -f "$WORK/hf-$shape"/activations.*
    fi
    [[ "$shape" == "$TRAIN_SHAPE" ]] || rm -rf "$WORK/$shape" "$WORK/ds-$shape"
done

if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then
    shape="$TRAIN_SHAPE"
    # Disk at the paper's size: models 2 × 8.4 GB (they stay: the cache's key hashes them), the cache
    # 2.7 GB, and at most two 8.6 GB crosscoders at a time (pipe gc below, torch's temporary file).
    mkdir -p "$WORK/torch-data"
    ln -sfn "$WORK/ds-$shape/results/gpu-bench-$shape/cache" "$WORK/torch-data/web"
    for precision in $PRECISIONS; do
        for steps in "$STEPS_A" "$STEPS_B"; do
            say "train: pipe, $precision, $steps steps"
            set_train=(--set "stages.train.precision=\"$precision\"" --set "stages.train.max_steps=$steps")
            # The train stage's info lines (the sparse step's check) go to the log too.
            timed "train-pipe-$precision-$steps" env RUST_LOG=warn,stages::train=info "$PIPE_BIN" -q --datastore "$WORK/ds-$shape" run "$WORK/$shape.toml" \
                --only train --devices "$DEVICE" "${set_train[@]}"
            "$PIPE_BIN" -q --datastore "$WORK/ds-$shape" show "$WORK/$shape.toml" train --json "${set_train[@]}" \
                > "$WORK/train-pipe-$precision-$steps.json"
            # Each run's crosscoder is 8.6 GB at the paper's size: keep only the cache.
            "$PIPE_BIN" -q --datastore "$WORK/ds-$shape" gc --keep "$WORK/$shape.toml" --keep-days 0 > /dev/null
            say "train: PyTorch, $precision, $steps steps"
            timed "train-torch-$precision-$steps" "$PY" bench/train_torch.py --data "$WORK/torch-data" \
                --loss batchtopk --steps "$steps" --k "$K" --dict-size "$TRAIN_F" --batch-size "$TRAIN_BATCH" \
                --warmup-steps 1000 --device "$TORCH_DEVICE" --precision "$precision" --threads "$(nproc)"
        done
    done
fi

say "results"
# pipe's own CUDA kernels (train) check themselves and turn off with a warning on a mismatch; the
# sparse BatchTopK step is checked against autograd on each run's first batch (that batch's time
# is in both runs of a pair, so it cancels out of steps/s).
if grep -l "CUDA kernels are off" "$WORK"/*-pipe-*.log 2> /dev/null; then
    echo "pipe's CUDA kernels turned themselves off in the runs above (their logs say why):"
    grep -h "CUDA kernels are off" "$WORK"/*-pipe-*.log | sort -u
fi
echo "runs whose sparse BatchTopK step matched autograd on the first batch:" \
    "$(grep -l "sparse BatchTopK step agrees" "$WORK"/train-pipe-*.log 2> /dev/null | wc -l)" \
    "of $(ls "$WORK"/train-pipe-*.log 2> /dev/null | wc -l)"
"$PY" - "$WORK" "$STEPS_A" "$STEPS_B" "$PRECISIONS" "$TRAIN_SHAPE" <<'EOF'
import glob, json, os, sys
work, a, b, precisions, train_shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(), sys.argv[5]
runs = {r["name"]: r for r in map(json.loads, open(f"{work}/runs.jsonl"))}
out = {"runs": runs, "cache": {}, "train": {}}
rows = []
for f in sorted(glob.glob(f"{work}/cache-pipe-*.json")):
    shape = f.rsplit("cache-pipe-", 1)[1][:-5]
    hf_path = f"{work}/hf-{shape}/summary.json"
    if not os.path.exists(hf_path):
        continue
    pipe = json.load(open(f))["metrics"]
    hf = json.load(open(hf_path))
    p, h = runs[f"cache-pipe-{shape}"], runs[f"cache-hf-{shape}"]
    ratio = pipe["tokens_per_s"] / hf["tokens_per_s"]
    out["cache"][shape] = {"pipe": pipe, "transformers": hf, "ratio": ratio}
    rows.append(f"| {shape} | {pipe['tokens']:,} | {pipe['tokens_per_s']:,.0f} | {hf['tokens_per_s']:,.0f} | **{ratio:.2f}×** "
                f"| {p['wall_s']:.1f} / {h['wall_s']:.1f} | {p['peak_gpu_mib']:,} / {h['peak_gpu_mib']:,} |")
if rows:
    print("| shape | tokens | pipe tokens/s | transformers tokens/s | pipe / transformers | wall s (pipe / tf) | peak GPU MiB (pipe / tf) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print()
rows = []
for prec in precisions:
    rate, wall, mem = {}, {}, {}
    for who in ("pipe", "torch"):
        ra, rb = runs.get(f"train-{who}-{prec}-{a}"), runs.get(f"train-{who}-{prec}-{b}")
        if not (ra and rb):
            continue
        # Each side's own timer: init, the steps and the final write (pipe: the stage's `seconds`
        # metric; PyTorch: train_torch.py's `seconds`), so the difference is b − a steps.
        if who == "pipe":
            own = [json.load(open(f"{work}/train-pipe-{prec}-{n}.json"))["metrics"]["seconds"] for n in (a, b)]
        else:
            own = [json.loads(open(f"{work}/train-torch-{prec}-{n}.log").read().strip().splitlines()[-1])["seconds"]
                   for n in (a, b)]
        rate[who] = (b - a) / (own[1] - own[0])
        wall[who] = (b - a) / (rb["wall_s"] - ra["wall_s"])
        mem[who] = max(ra["peak_gpu_mib"], rb["peak_gpu_mib"])
    if len(rate) == 2:
        out["train"][prec] = {"steps_per_s": rate, "steps_per_s_wall": wall, "peak_gpu_mib": mem,
                              "ratio": rate["pipe"] / rate["torch"]}
        rows.append(f"| {prec} | {rate['pipe']:.2f} | {rate['torch']:.2f} | **{rate['pipe'] / rate['torch']:.2f}×** "
                    f"| {wall['pipe']:.2f} / {wall['torch']:.2f} | {mem['pipe']:,} / {mem['torch']:,} |")
if rows:
    print(f"train ({train_shape} cache): steps/s = {b - a} steps / the difference of the {a}- and {b}-step runs' times")
    print("| precision | pipe steps/s | PyTorch steps/s | pipe / PyTorch | by wall time (pipe / PyTorch) | peak GPU MiB (pipe / PyTorch) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
json.dump(out, open(f"{work}/results.json", "w"), indent=1)
EOF
