//! With the `cuda` feature, compiles `src/train/kernels.cu` to PTX with nvcc (found as `$NVCC`, in
//! `$CUDA_HOME/bin` or on the PATH) for `compute_$CUDA_COMPUTE_CAP` (default 75, the oldest CUDA 13
//! supports; the driver compiles the PTX for the card it runs on). Without it, nothing: CPU builds
//! need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/train/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("train_kernels.ptx");
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|home| PathBuf::from(home).join("bin/nvcc"))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap = cap.trim().replace('.', "");
    let status = Command::new(&nvcc)
        .args(["--ptx", &format!("-arch=compute_{cap}"), "-O3", "src/train/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} (needed by the `cuda` feature): {e}", nvcc.display()));
    assert!(status.success(), "{} failed on src/train/kernels.cu", nvcc.display());
}
