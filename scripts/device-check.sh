#!/usr/bin/env bash
# The tiny pipeline on the GPU against the CPU, on the GPU machine, in one short run: carry the
# working tree with the `cuda` build of scripts/build-cuda.sh (carry target/cuda/pipe.gz, 20 MB,
# and target/cuda/stages-tests.gz) and run
#
#   bash scripts/device-check.sh
#
# It runs pipelines/tiny.toml twice into separate datastores, `--devices cpu` and `--devices
# $DEVICE` (the tiny models' configs say float32, so the caches compute in f32 on both: the
# `cache` stage's dtype "auto" is the checkpoint's own on every device), then
# scripts/compare_runs.py checks the outputs stage by
# stage (tolerances in its header) and exits 1 on a failed check. Wall times of both runs are
# printed. Knobs: DEVICE (cuda:0), PIPE_BIN (default target/cuda/pipe, unpacked from its .gz),
# PY (default /opt/torch/.venv/bin/python: it needs torch only), OUT (/tmp/device-check),
# STAGES_TESTS (target/cuda/stages-tests, unpacked from its .gz: the unit tests named on_cuda_*
# run first).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda:0}"
PY="${PY:-/opt/torch/.venv/bin/python}"
OUT="${OUT:-/tmp/device-check}"
BIN="${PIPE_BIN:-target/cuda/pipe}"
if [[ ! -x "$BIN" && -f "$BIN.gz" ]]; then
    gunzip -kf "$BIN.gz"
    chmod +x "$BIN"
fi
[[ -x "$BIN" ]] || { echo "no pipe binary at $BIN (build it with scripts/build-cuda.sh)" >&2; exit 2; }
[[ -d /usr/local/cuda/lib64 ]] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rm -rf "$OUT" "$OUT-ref.log" "$OUT-dev.log"
# First the stages' CUDA-only unit tests (the sparse step's kernels against the CPU step), when
# scripts/build-cuda.sh's test binary came along.
TESTS="${STAGES_TESTS:-target/cuda/stages-tests}"
if [[ ! -x "$TESTS" && -f "$TESTS.gz" ]]; then
    gunzip -kf "$TESTS.gz"
    chmod +x "$TESTS"
fi
if [[ -x "$TESTS" ]]; then
    "$TESTS" --test-threads 1 --nocapture on_cuda_ || { echo "the CUDA unit tests failed" >&2; exit 1; }
else
    echo "no $TESTS: the CUDA unit tests are not run" >&2
fi
for side in ref dev; do
    devices=cpu
    [[ $side == dev ]] && devices="$DEVICE"
    start=$(date +%s%N)
    # On the GPU, the train stage's info lines say whether its kernels ran: the sparse BatchTopK
    # step's check against autograd ("agrees ...") or the warning that switched them off.
    rc=0
    RUST_LOG="warn,stages::train=info" "$BIN" -q --datastore "$OUT/$side" run pipelines/tiny.toml \
        --devices "$devices" > "$OUT-$side.log" 2>&1 || rc=$?
    grep -E "sparse|kernel|WARN|ERROR" "$OUT-$side.log" || true
    (( rc == 0 )) || { tail -20 "$OUT-$side.log"; echo "pipe run on $devices failed: rc $rc" >&2; exit 1; }
    echo "run on $devices: $(( ($(date +%s%N) - start) / 1000000 )) ms"
    "$BIN" --datastore "$OUT/$side" status pipelines/tiny.toml | sed 's/^/  /'
done
"$PY" scripts/compare_runs.py "$OUT/ref/results/tiny" "$OUT/dev/results/tiny"
