//! Tests only: the `train` stage's CUDA kernels (`kernels.cu`) run on the CPU, so that the CPU
//! test suite checks their logic (indices, tie quotas, tiles, warp ballots and shuffles, the
//! block barriers) against the CPU step, where the real kernels can only be run on a GPU.
//!
//! `kernel_sim/main.cpp` compiles `kernels.cu` as C++ against `kernel_sim/cuda_sim.hpp`, which
//! runs every CUDA thread of a block as an OS thread (see there), with AddressSanitizer and
//! UBSan where the compiler has them, so an out-of-bounds read or write fails the test. It is
//! built once per test process with the C++ compiler (`$CXX`, else `c++`), cached in the
//! temporary directory by a hash of its sources, and run once per launch. The host functions
//! here mirror those of `cuda.rs` with the same launch geometry (`launch`). Without a C++
//! compiler the tests that need it say so and pass, unless `PIPE_REQUIRE_KERNEL_SIM` is set
//! (CI sets it).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{Device, Result, Tensor};

use super::crosscoder::Crosscoder;
use super::launch::{self, Geometry};
use super::sparse::{Groups, Kept};

/// One kernel argument: a buffer (read back after the launch) or a scalar.
pub(crate) enum Arg {
    F(Vec<f32>),
    U(Vec<u32>),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Arg {
    pub(crate) fn f(&self) -> &[f32] {
        match self {
            Arg::F(v) => v,
            _ => panic!("not an f32 buffer"),
        }
    }

    pub(crate) fn u(&self) -> &[u32] {
        match self {
            Arg::U(v) => v,
            _ => panic!("not a u32 buffer"),
        }
    }
}

const SOURCES: [(&str, &str); 3] = [
    ("kernels.cu", include_str!("kernels.cu")),
    ("kernel_sim/cuda_sim.hpp", include_str!("kernel_sim/cuda_sim.hpp")),
    ("kernel_sim/main.cpp", include_str!("kernel_sim/main.cpp")),
];
const FLAGS: [&str; 5] = ["-std=c++20", "-O1", "-g", "-pthread", "-ffp-contract=off"];
const SANITIZERS: [&str; 2] = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"];

/// Why the simulator cannot be built.
#[derive(Debug)]
enum Unbuilt {
    /// No C++ compiler: the tests skip, unless `PIPE_REQUIRE_KERNEL_SIM` is set.
    NoCompiler(String),
    /// The compiler rejected the sources: always a failure.
    Failed(String),
}

impl std::fmt::Display for Unbuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unbuilt::NoCompiler(why) => write!(f, "no C++ compiler: {why}"),
            Unbuilt::Failed(why) => write!(f, "{why}"),
        }
    }
}

fn build() -> std::result::Result<PathBuf, Unbuilt> {
    use std::hash::{Hash, Hasher};
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut h = std::hash::DefaultHasher::new();
    (SOURCES, FLAGS, SANITIZERS, &cxx).hash(&mut h);
    let dir = std::env::temp_dir().join(format!("pipe-kernel-sim-{:016x}", h.finish()));
    let bin = dir.join("sim");
    if bin.exists() {
        return Ok(bin);
    }
    let src = tempfile::tempdir().map_err(|e| Unbuilt::Failed(e.to_string()))?;
    for (name, text) in SOURCES {
        let path = src.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| Unbuilt::Failed(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Unbuilt::Failed(e.to_string()))?;
    }
    let out = src.path().join("sim");
    let compile = |sanitize: bool| {
        let mut cmd = Command::new(&cxx);
        cmd.args(FLAGS);
        if sanitize {
            cmd.args(SANITIZERS);
        }
        cmd.arg(src.path().join("kernel_sim/main.cpp")).arg("-o").arg(&out).output()
    };
    let done = match compile(true) {
        Err(e) => return Err(Unbuilt::NoCompiler(format!("cannot run `{cxx}`: {e}"))),
        Ok(o) if o.status.success() => o,
        Ok(with) => match compile(false) {
            // The sources compile, the sanitizers' runtime does not link: run without them.
            Ok(o) if o.status.success() => {
                eprintln!("kernel_sim: built without sanitizers ({cxx} could not link them)");
                o
            }
            _ => return Err(Unbuilt::Failed(String::from_utf8_lossy(&with.stderr).into_owned())),
        },
    };
    drop(done);
    std::fs::create_dir_all(&dir).map_err(|e| Unbuilt::Failed(e.to_string()))?;
    // Another test process may be building the same: each renames its own whole file into place.
    let tmp = dir.join(format!("sim.{}", std::process::id()));
    std::fs::copy(&out, &tmp).map_err(|e| Unbuilt::Failed(e.to_string()))?;
    std::fs::rename(&tmp, &bin).map_err(|e| Unbuilt::Failed(e.to_string()))?;
    Ok(bin)
}

fn binary() -> &'static std::result::Result<PathBuf, Unbuilt> {
    static BIN: OnceLock<std::result::Result<PathBuf, Unbuilt>> = OnceLock::new();
    BIN.get_or_init(build)
}

/// Whether the simulator can run here; `test` names the caller in the message when it cannot.
/// Panics where it must run (`PIPE_REQUIRE_KERNEL_SIM`) or its sources do not compile.
pub(crate) fn ready(test: &str) -> bool {
    match binary() {
        Ok(_) => true,
        Err(Unbuilt::NoCompiler(why)) if std::env::var_os("PIPE_REQUIRE_KERNEL_SIM").is_none() => {
            eprintln!("{test} skipped: no C++ compiler for the kernel simulator ({why})");
            false
        }
        Err(e) => panic!("the kernel simulator cannot be built: {e}"),
    }
}

/// Runs kernel `name` on the CPU with `args`; the buffers hold the kernel's results after.
pub(crate) fn run(name: &str, g: Geometry, args: &mut [Arg]) -> Result<()> {
    let bin = match binary() {
        Ok(bin) => bin,
        Err(e) => candle_core::bail!("the kernel simulator cannot be built: {e}"),
    };
    let mut req = Vec::new();
    let u32s = |req: &mut Vec<u8>, vs: &[u32]| vs.iter().for_each(|v| req.extend(v.to_le_bytes()));
    u32s(&mut req, &[name.len() as u32]);
    req.extend(name.as_bytes());
    u32s(&mut req, &[g.grid.0, g.grid.1, g.grid.2, g.block.0, g.block.1, g.block.2, args.len() as u32]);
    for a in args.iter() {
        match a {
            Arg::F(v) => {
                req.push(b'F');
                req.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| req.extend(x.to_le_bytes()));
            }
            Arg::U(v) => {
                req.push(b'U');
                req.extend((v.len() as u64).to_le_bytes());
                u32s(&mut req, v);
            }
            Arg::U32(v) => {
                req.push(b'u');
                req.extend(v.to_le_bytes());
            }
            Arg::U64(v) => {
                req.push(b'q');
                req.extend(v.to_le_bytes());
            }
            Arg::F32(v) => {
                req.push(b'f');
                req.extend(v.to_le_bytes());
            }
        }
    }
    let mut child = Command::new(bin)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| candle_core::Error::Msg(format!("kernel_sim: cannot start {}: {e}", bin.display())))?;
    // The simulator reads the whole request before it writes; a write error means it stopped
    // early, and its status and stderr say why.
    let _ = child.stdin.take().expect("piped").write_all(&req);
    let mut reply = Vec::new();
    child.stdout.take().expect("piped").read_to_end(&mut reply)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        candle_core::bail!(
            "kernel_sim: {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s =
            reply.get(at..at + n).ok_or_else(|| candle_core::Error::Msg("kernel_sim: short reply".into()))?;
        at += n;
        Ok(s)
    };
    for a in args.iter_mut() {
        let (len, bytes) = match a {
            Arg::F(v) => (v.len(), v.as_mut_ptr().cast::<u8>()),
            Arg::U(v) => (v.len(), v.as_mut_ptr().cast::<u8>()),
            _ => continue,
        };
        let n = u64::from_le_bytes(take(8)?.try_into().unwrap()) as usize;
        if n != len {
            candle_core::bail!("kernel_sim: {name} returned {n} entries for a buffer of {len}");
        }
        let src = take(4 * n)?;
        // SAFETY: `bytes` points at the buffer's n 4-byte entries (f32 or u32, both plain old
        // data, any bit pattern valid), and `src` holds 4n bytes written from the same buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), bytes, 4 * n) };
    }
    Ok(())
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

/// `cuda::kth_largest` on the simulator: the radix select's histograms from `pipe_radix_hist`.
pub(crate) fn kth_largest(values: &Tensor, k: &[u64]) -> Result<Vec<f32>> {
    let (rows, n) = values.dims2()?;
    let v = host_f32(values)?;
    let g = launch::radix_hist(rows, n);
    super::crosscoder::radix_select(n as u64, k, |prefix, (shift, high, digit)| {
        let mut args = [
            Arg::F(v.clone()),
            Arg::U64(n as u64),
            Arg::U(prefix.to_vec()),
            Arg::U32(high),
            Arg::U32(shift),
            Arg::U32(digit),
            Arg::U(vec![0; rows * 2048]),
        ];
        run("pipe_radix_hist", g, &mut args)?;
        Ok(args[6].u().to_vec())
    })
}

/// `cuda::compact` on the simulator.
pub(crate) fn compact(
    post: &Tensor,
    scaled: &Tensor,
    thresh: &[f32],
    take: &[u32],
    offsets: &[u32],
) -> Result<(Tensor, Tensor)> {
    let (rows, n) = scaled.dims2()?;
    let total = offsets[rows] as usize;
    let mut args = [
        Arg::F(host_f32(scaled)?),
        Arg::F(host_f32(post)?),
        Arg::F(thresh.to_vec()),
        Arg::U(take.to_vec()),
        Arg::U(offsets.to_vec()),
        Arg::U32(n as u32),
        Arg::U(vec![0; total]),
        Arg::F(vec![0.0; total]),
        Arg::U(vec![0; rows]),
    ];
    run("pipe_compact_f32", launch::compact(rows), &mut args)?;
    for r in 0..rows {
        let want = offsets[r + 1] - offsets[r];
        if args[8].u()[r] != want {
            candle_core::bail!(
                "the compaction kernel kept {} codes of row {r} where the counts say {want}",
                args[8].u()[r]
            );
        }
    }
    let dev = &Device::Cpu;
    Ok((Tensor::new(args[6].u(), dev)?, Tensor::new(args[7].f(), dev)?))
}

/// `cuda::sparse_decode` on the simulator: (B, 2d), plus the decoder's bias when `bias`.
pub(crate) fn decode(cc: &Crosscoder, kept: &Kept, bias: bool) -> Result<Tensor> {
    let (rows, d) = (kept.offsets.len() - 1, cc.d);
    let mut args = [
        Arg::U(kept.offsets.clone()),
        Arg::U(kept.cols.to_vec1()?),
        Arg::F(kept.vals.to_vec1()?),
        Arg::F(host_f32(cc.w_dec.as_tensor())?),
        Arg::F(host_f32(cc.b_dec.as_tensor())?),
        Arg::U32(u32::from(bias)),
        Arg::U32(cc.f as u32),
        Arg::U32(d as u32),
        Arg::F(vec![0.0; rows * 2 * d]),
    ];
    run("pipe_decode_f32", launch::decode(rows), &mut args)?;
    Tensor::from_slice(args[8].f(), (rows, 2 * d), &Device::Cpu)
}

/// `cuda::sparse_code_grads` on the simulator: ⟨u_b, d_j⟩ per kept entry, u (B, 2d).
pub(crate) fn code_grads(cc: &Crosscoder, kept: &Kept, u: &Tensor) -> Result<Tensor> {
    let n = kept.cols.elem_count();
    let mut args = [
        Arg::U(kept.offsets.clone()),
        Arg::U(kept.cols.to_vec1()?),
        Arg::F(host_f32(u)?),
        Arg::F(host_f32(cc.w_dec.as_tensor())?),
        Arg::U32(cc.f as u32),
        Arg::U32(cc.d as u32),
        Arg::F(vec![0.0; n]),
    ];
    run("pipe_code_grads_f32", launch::code_grads(kept.offsets.len() - 1), &mut args)?;
    Tensor::new(args[6].f(), &Device::Cpu)
}

/// `cuda::sparse_backward` on the simulator: the by-latent kernel, then the transpose.
pub(crate) fn backward(
    groups: &Groups,
    vals: &Tensor,
    dpre: &Tensor,
    upstream: &Tensor,
    x: &Tensor,
    (f, d): (usize, usize),
) -> Result<[Tensor; 3]> {
    let width = 2 * d;
    let mut args = [
        Arg::U(groups.start.clone()),
        Arg::U(groups.rows.clone()),
        Arg::U(groups.idx.clone()),
        Arg::F(vals.to_vec1()?),
        Arg::F(dpre.to_vec1()?),
        Arg::F(host_f32(upstream)?),
        Arg::F(host_f32(x)?),
        Arg::U32(f as u32),
        Arg::U32(d as u32),
        Arg::F(vec![0.0; 2 * f * d]),
        Arg::F(vec![0.0; f * width]),
        Arg::F(vec![0.0; f]),
    ];
    run("pipe_sparse_backward_f32", launch::sparse_backward(f), &mut args)?;
    let dwe = transpose(args[10].f(), f, width)?;
    let dev = &Device::Cpu;
    Ok([
        Tensor::from_slice(args[9].f(), (2, f, d), dev)?,
        Tensor::from_vec(dwe, (2, d, f), dev)?,
        Tensor::from_slice(args[11].f(), f, dev)?,
    ])
}

/// `pipe_transpose_f32` of the (rows, cols) matrix `m`.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let mut args =
        [Arg::F(m.to_vec()), Arg::U32(rows as u32), Arg::U32(cols as u32), Arg::F(vec![0.0; m.len()])];
    run("pipe_transpose_f32", launch::transpose(rows, cols), &mut args)?;
    let [_, _, _, Arg::F(out)] = args else { unreachable!() };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values with ties, zeros and −0, in several rows: the radix select on the simulator gives
    /// each row's k-th largest exactly, k = 0 and k > n included.
    #[test]
    fn the_radix_kernel_selects_the_kth_largest() {
        if !ready("the_radix_kernel_selects_the_kth_largest") {
            return;
        }
        let (rows, n) = (3usize, 5000usize);
        let mut rng = crate::rng::SplitMix64::new(9);
        let v: Vec<f32> = (0..rows * n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => -0.0,
                2 => 0.25,
                _ => rng.next_f64() as f32 * 3.0,
            })
            .collect();
        let t = Tensor::from_slice(&v, (rows, n), &Device::Cpu).unwrap();
        let ks = [0u64, 1, 2, 17, 700, 1500, 2143, 4000, n as u64, n as u64 + 3];
        for k in ks {
            let want = super::super::crosscoder::kth_largest(&t, &[k; 3]).unwrap();
            let got = kth_largest(&t, &[k; 3]).unwrap();
            // (== : the CPU's selection may answer −0 where the radix select, which counts −0
            // as +0, answers +0.)
            assert_eq!(got, want, "k = {k}");
        }
    }

    /// The Adam kernel on one block (its grid-stride loop running many times) and on its own
    /// grid: the CPU's fused update to the bit (up to the sign of zero), as `adam.rs` promises.
    #[test]
    fn the_adam_kernel_is_the_cpu_update() {
        if !ready("the_adam_kernel_is_the_cpu_update") {
            return;
        }
        let n = 3000usize;
        let mut rng = crate::rng::SplitMix64::new(4);
        let mut r = || (rng.next_f64() - 0.5) as f32;
        let g: Vec<f32> = (0..n).map(|_| r()).collect();
        let p: Vec<f32> = (0..n).map(|_| r()).collect();
        let m: Vec<f32> = (0..n).map(|_| r() * 0.1).collect();
        let v: Vec<f32> = (0..n).map(|_| r().abs() * 0.01).collect();
        let (b1, b2, eps, lr, bc1, bc2) =
            (0.9f64, 0.999f64, 1e-8f64, 1e-3f64, 1.0 - 0.9f64.powi(3), 1.0 - 0.999f64.powi(3));
        let c = |x: f64| x as f32;
        let (cb1, cnb1, cb2, cnb2, inv, ceps, step) =
            (c(b1), c(1.0 - b1), c(b2), c(1.0 - b2), c(1.0 / bc2.sqrt()), c(eps), c(lr / bc1));
        let (mut pw, mut mw, mut vw) = (p.clone(), m.clone(), v.clone());
        for j in 0..n {
            let gj = g[j];
            mw[j] = (m[j] * cb1 + 0.0) + (gj * cnb1 + 0.0);
            vw[j] = (v[j] * cb2 + 0.0) + ((gj * gj) * cnb2 + 0.0);
            let denom = (vw[j].sqrt() * inv + 0.0) * 1.0 + ceps;
            pw[j] -= (mw[j] / denom) * step + 0.0;
        }
        for blocks in [Some(1), None] {
            let mut args = [
                Arg::F(p.clone()),
                Arg::F(m.clone()),
                Arg::F(v.clone()),
                Arg::F(g.clone()),
                Arg::U64(n as u64),
                Arg::F32(cb1),
                Arg::F32(cnb1),
                Arg::F32(cb2),
                Arg::F32(cnb2),
                Arg::F32(inv),
                Arg::F32(ceps),
                Arg::F32(step),
            ];
            run("pipe_adam_f32", launch::adam(n as u64, blocks), &mut args).unwrap();
            assert_eq!(args[0].f(), &pw[..], "{blocks:?}: parameters");
            assert_eq!(args[1].f(), &mw[..], "{blocks:?}: first moments");
            assert_eq!(args[2].f(), &vw[..], "{blocks:?}: second moments");
        }
    }

    /// The transpose kernel on sizes that are not multiples of its 32 × 32 tiles.
    #[test]
    fn the_transpose_kernel_transposes() {
        if !ready("the_transpose_kernel_transposes") {
            return;
        }
        for (rows, cols) in [(1usize, 1usize), (33, 70), (64, 32), (5, 100)] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&m, rows, cols).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "({rows}, {cols}) at ({r}, {c})");
                }
            }
        }
    }

    /// The simulator itself: a kernel that reads past its buffer fails its launch (where the
    /// sanitizers are built in), and an unknown kernel or a wrong argument kind is an error.
    #[test]
    fn the_simulator_reports_bad_launches() {
        if !ready("the_simulator_reports_bad_launches") {
            return;
        }
        let bad = |name: &str, g, args: &mut [Arg]| run(name, g, args).unwrap_err().to_string();
        assert!(bad("pipe_nothing", launch::decode(1), &mut []).contains("no kernel"));
        let e = bad("pipe_transpose_f32", launch::transpose(2, 2), &mut [Arg::U32(1)]);
        assert!(e.contains("takes 4 arguments"), "{e}");
        // A 4 × 4 transpose over a buffer of 2 entries reads and writes past both.
        let mut args = [Arg::F(vec![1.0; 2]), Arg::U32(4), Arg::U32(4), Arg::F(vec![0.0; 2])];
        let e = run("pipe_transpose_f32", launch::transpose(4, 4), &mut args);
        if !e.as_ref().is_err_and(|e| e.to_string().contains("AddressSanitizer")) {
            eprintln!(
                "kernel_sim: no AddressSanitizer report for an overrun ({e:?}); built without sanitizers?"
            );
            assert!(std::env::var_os("PIPE_REQUIRE_KERNEL_SIM").is_none(), "CI builds it with sanitizers");
        }
    }
}
