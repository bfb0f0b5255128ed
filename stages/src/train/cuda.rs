//! The `train` stage's own CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs` with the
//! `cuda` feature), for work that candle's tensor ops would do in many passes over memory.
//! Each entry point returns `Ok(false)` where it does not apply, and its caller then takes the
//! tensor-op path; `PIPE_CUDA_KERNELS=0` turns them all off.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train_kernels.ptx"));
const MODULE: &str = "pipe_train";

fn switch() -> &'static AtomicBool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| AtomicBool::new(std::env::var("PIPE_CUDA_KERNELS").map(|v| v != "0").unwrap_or(true)))
}

/// Whether the kernels may be used in this process (`PIPE_CUDA_KERNELS=0` says no, and so does
/// a kernel that failed or disagreed with its check).
pub fn enabled() -> bool {
    switch().load(Ordering::Relaxed)
}

/// Turns the kernels off for the rest of the process, with a warning saying `why`: the tensor-op
/// paths take over, slower but unchanged in what they compute.
pub fn disable(why: &str) {
    if switch().swap(false, Ordering::Relaxed) {
        tracing::warn!("pipe's CUDA kernels are off for this run ({why}); using candle's tensor ops");
    }
}

/// Per row of the f32 CUDA tensor `values` (R, N), all ≥ 0, the `k[r]`-th largest value (the
/// conventions of `crosscoder::kth_largest`), by a radix select: three histogram passes over
/// the bit patterns (`crosscoder::RADIX_PASSES`), each one read of the values, where bisection
/// takes 31 compare-and-count passes. None where it does not apply.
pub fn kth_largest(values: &Tensor, k: &[u64]) -> Result<Option<Vec<f32>>> {
    use super::crosscoder::{RADIX_PASSES, radix_step};
    if !enabled() || !values.device().is_cuda() || values.dtype() != DType::F32 {
        return Ok(None);
    }
    let (rows, n) = values.dims2()?;
    if rows == 0 || rows > 65_535 || k.len() != rows {
        return Ok(None);
    }
    let values = values.contiguous()?;
    let (storage, layout) = values.storage_and_layout();
    let (Storage::Cuda(storage), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let device = storage.device().clone();
    let view = storage.as_cuda_slice::<f32>()?.slice(a..b);
    let func = device.get_or_load_custom_func("pipe_radix_hist", MODULE, PTX)?;
    let per_row = (n as u64).div_ceil(256 * 16).clamp(1, 1024) as u32;
    let cfg =
        LaunchConfig { grid_dim: (per_row, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let n64 = n as u64;
    let (mut prefix, mut remaining) = (vec![0u32; rows], k.to_vec());
    for pass in RADIX_PASSES {
        let (shift, high_mask, digit_mask) = pass;
        let mut hist = device.alloc_zeros::<u32>(rows * 2048)?;
        let prefix_dev = device.clone_htod(&prefix)?;
        let mut launch = func.builder();
        launch.arg(&view).arg(&n64).arg(&prefix_dev).arg(&high_mask).arg(&shift).arg(&digit_mask);
        launch.arg(&mut hist);
        // SAFETY: the arguments match `pipe_radix_hist` in kernels.cu: rows × n f32 values, n as
        // u64, one u32 prefix per row, three u32 scalars, rows × 2048 u32 bins; the grid's y is
        // the row and every thread stays below n within it.
        unsafe { launch.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        let hist = device.clone_dtoh(&hist)?;
        for r in 0..rows {
            if k[r] >= 1 && k[r] <= n64 {
                radix_step(&hist[r * 2048..(r + 1) * 2048], pass, &mut prefix[r], &mut remaining[r]);
            }
        }
    }
    Ok(Some(
        (0..rows)
            .map(|r| match k[r] {
                0 => f32::INFINITY,
                k if k > n64 => 0.0,
                _ => f32::from_bits(prefix[r]),
            })
            .collect(),
    ))
}

/// Runs `body` on the device buffer of a contiguous f32 CUDA tensor, writable in place (through
/// candle's in-place op, which holds the storage's write lock meanwhile), with its range.
fn with_cuda_mut(
    t: &Tensor,
    body: impl FnOnce(&mut CudaSlice<f32>, std::ops::Range<usize>, &CudaDevice) -> Result<()>,
) -> Result<()> {
    struct Op<F>(std::cell::RefCell<Option<F>>);
    impl<F> candle_core::InplaceOp1 for Op<F>
    where
        F: FnOnce(&mut CudaSlice<f32>, std::ops::Range<usize>, &CudaDevice) -> Result<()>,
    {
        fn name(&self) -> &'static str {
            "pipe-cuda-mut"
        }
        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!("pipe-cuda-mut runs on CUDA tensors only")
        }
        fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("an in-place CUDA update needs a contiguous tensor");
            };
            let device = storage.device().clone();
            let slice = storage.as_cuda_slice_mut::<f32>()?;
            let body = self.0.borrow_mut().take().expect("called once");
            body(slice, a..b, &device)
        }
    }
    t.inplace_op1(&Op(std::cell::RefCell::new(Some(body))))
}

/// One fused Adam step on CUDA over the f32 parameter `p` with gradient `g` and moments `m`,
/// `v`, updated in place: one pass over memory instead of candle's dozen. The arithmetic is
/// [`super::adam::Adam`]'s CPU update, operation for operation, in the same roundings. `blocks`
/// overrides the grid size (the check runs on one block).
pub(crate) fn adam_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    c: &super::adam::FusedConstants,
    blocks: Option<u32>,
) -> Result<bool> {
    let all = [p, m, v, g];
    if !enabled() || !all.iter().all(|t| t.device().is_cuda() && t.dtype() == DType::F32) {
        return Ok(false);
    }
    let n = p.elem_count();
    if all.iter().any(|t| t.elem_count() != n) {
        candle_core::bail!("adam: a parameter and its gradient or moments differ in size");
    }
    let g = g.contiguous()?;
    let (gs, gl) = g.storage_and_layout();
    let (Storage::Cuda(gs), Some((ga, gb))) = (&*gs, gl.contiguous_offsets()) else {
        candle_core::bail!("adam: the gradient is not a contiguous CUDA tensor");
    };
    let g_slice = gs.as_cuda_slice::<f32>()?;
    let g_view = g_slice.slice(ga..gb);
    with_cuda_mut(p, |ps, pr, device| {
        with_cuda_mut(m, |ms, mr, _| {
            with_cuda_mut(v, |vs, vr, _| {
                let func = device.get_or_load_custom_func("pipe_adam_f32", MODULE, PTX)?;
                let (mut pv, mut mv, mut vv) = (ps.slice_mut(pr), ms.slice_mut(mr), vs.slice_mut(vr));
                let n = n as u64;
                let blocks = blocks.unwrap_or(n.div_ceil(256).clamp(1, 1 << 16) as u32);
                let cfg =
                    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let mut launch = func.builder();
                launch.arg(&mut pv).arg(&mut mv).arg(&mut vv).arg(&g_view).arg(&n);
                launch
                    .arg(&c.b1)
                    .arg(&c.nb1)
                    .arg(&c.b2)
                    .arg(&c.nb2)
                    .arg(&c.inv_sqrt_bc2)
                    .arg(&c.eps)
                    .arg(&c.step);
                // SAFETY: the arguments match the kernel's signature in kernels.cu (four f32
                // buffers of n entries, n as u64, eight f32 scalars); the grid-stride loop stays
                // below n.
                unsafe { launch.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
                Ok(())
            })
        })
    })?;
    Ok(true)
}
