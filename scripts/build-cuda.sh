#!/usr/bin/env bash
# Builds `pipe` with the `cuda` feature on a machine without a GPU or a system CUDA toolkit, for a
# GPU machine that cannot build Rust: NVIDIA's pip wheels (CUDA 13.0.x, for a driver ≥ 580) make a
# CUDA home that candle's and cudarc's build scripts accept, with a link-only `libcuda.so` stub
# (at run time the GPU machine's own driver library is loaded). One command:
#
#   scripts/build-cuda.sh                 # -> target/cuda/release/pipe; stripped target/cuda/pipe, target/cuda/pipe.gz
#                                         #    and the stages' unit tests, target/cuda/stages-tests.gz
#
# On a machine with a CUDA toolkit none of this is needed: `cargo build --release --features cuda`.
# Run the binary on the GPU machine with its CUDA libraries on the path:
#   LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH ./pipe run FILE --devices cuda:0
#
# Environment: CUDA_COMPUTE_CAP (90: H100/H200; 80: A100; 89: L4/L40), PIPE_CUDA_DIR (the wheels'
# venv and the CUDA home, default ~/.cache/pipe-cuda-13.0), CARGO_TARGET_DIR (default target/cuda,
# so the CPU build in target/ is left alone). The first build compiles candle's CUDA kernels with
# nvcc: ~15 min on 2 cores, once.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${PIPE_CUDA_DIR:-$HOME/.cache/pipe-cuda-13.0}"
VENV="$DIR/venv"
CUDA="$DIR/cuda-home"
log() { echo "build-cuda: $*" >&2; }

if [[ ! -x "$VENV/bin/pip" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
if [[ ! -f "$DIR/.wheels-ok" ]]; then
    log "installing NVIDIA's CUDA 13.0 wheels (~700 MB, cached by pip)"
    "$VENV/bin/pip" install -q \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.88" "nvidia-cuda-nvrtc==13.0.88" \
        "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" \
        "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
    touch "$DIR/.wheels-ok"
fi
WHEELS=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[[ -x "$WHEELS/bin/nvcc" ]] || { log "no nvcc under $WHEELS"; exit 1; }

# A CUDA home laid out as the build scripts look for one.
rm -rf "$CUDA"
mkdir -p "$CUDA/lib64/stubs" "$CUDA/targets/x86_64-linux"
ln -s "$WHEELS/bin" "$WHEELS/nvvm" "$WHEELS/include" "$CUDA/"
ln -s "$WHEELS/include" "$CUDA/targets/x86_64-linux/include"
ln -s "$CUDA/lib64" "$CUDA/targets/x86_64-linux/lib"
for so in "$WHEELS"/lib/*.so.*; do ln -s "$so" "$CUDA/lib64/"; done
for lib in cudart nvrtc cublas cublasLt curand; do
    real=$(ls "$CUDA"/lib64/lib$lib.so.* | head -1)
    ln -sf "$(basename "$real")" "$CUDA/lib64/lib$lib.so"
done

# No wheel ships the driver's link stub: one from the entry points cuda.h declares (and their
# versioned aliases) and those cudarc's bindings name, each an empty function; it is only linked
# against.
(cd "$REPO" && cargo fetch -q)
{
    grep -oE 'CUDAAPI cu[A-Za-z0-9_]+\(' "$WHEELS/include/cuda.h" | sed -E 's/CUDAAPI (cu[A-Za-z0-9_]+)\(/\1/'
    grep -oE '^#define cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$WHEELS/include/cuda.h" | awk '{print $3}'
    cat "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/*.rs 2>/dev/null \
        | grep -oP '^\s+pub fn \Kcu\w+(?=\()|^\s+fn \Kcu\w+(?=\()' || true
} | sort -u | awk '{print "void " $1 "(void) {}"}' > "$DIR/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib64/stubs/libcuda.so" "$DIR/libcuda_stub.c"

export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" CUDA_ROOT="$CUDA" PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CUDA/lib64:$CUDA/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"
log "nvcc: $("$CUDA/bin/nvcc" --version | tail -1); compute capability $CUDA_COMPUTE_CAP"
(cd "$REPO" && cargo build --release --features cuda --bin pipe "$@")
# A stripped copy to carry to the GPU machine (the release profile keeps line tables: ~190 MB).
# Stripped it is still ~65 MB (candle's kernels are embedded as PTX); gzip brings it to ~19 MB for
# transfers with a size limit (`gunzip -k pipe.gz && chmod +x pipe` on the other side).
strip -o "$CARGO_TARGET_DIR/pipe" "$CARGO_TARGET_DIR/release/pipe"
gzip -6 -f -k "$CARGO_TARGET_DIR/pipe"
# The stages' unit tests with the `cuda` feature, for scripts/device-check.sh: the CUDA-only tests
# (the sparse step's kernels against the CPU step) run on the GPU machine, which cannot build them.
TESTS=$(cd "$REPO" && cargo test --release --features cuda -p pipe-stages --lib --no-run \
    --message-format=json "$@" | "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "stages":
        print(m["executable"])')
strip -o "$CARGO_TARGET_DIR/stages-tests" "$TESTS"
gzip -6 -f -k "$CARGO_TARGET_DIR/stages-tests"
log "built $CARGO_TARGET_DIR/stages-tests.gz ($(du -h "$CARGO_TARGET_DIR/stages-tests.gz" | cut -f1)): the stages' unit tests"
log "built $CARGO_TARGET_DIR/release/pipe; stripped: $CARGO_TARGET_DIR/pipe ($(du -h "$CARGO_TARGET_DIR/pipe" | cut -f1)), gzipped: $CARGO_TARGET_DIR/pipe.gz ($(du -h "$CARGO_TARGET_DIR/pipe.gz" | cut -f1))"
