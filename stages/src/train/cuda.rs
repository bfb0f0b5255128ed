//! The `train` stage's own CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs` with the
//! `cuda` feature), for work that candle's tensor ops would do in many passes over memory.
//! Each entry point returns `Ok(false)` where it does not apply, and its caller then takes the
//! tensor-op path; `PIPE_CUDA_KERNELS=0` turns them all off.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

use super::launch::{self, Geometry};
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
    let cfg = config(launch::radix_hist(rows, n));
    let n64 = n as u64;
    let kth = super::crosscoder::radix_select(n64, k, |prefix, (shift, high_mask, digit_mask)| {
        let mut hist = device.alloc_zeros::<u32>(rows * 2048)?;
        let prefix_dev = device.clone_htod(prefix)?;
        let mut launch = func.builder();
        launch.arg(&view).arg(&n64).arg(&prefix_dev).arg(&high_mask).arg(&shift).arg(&digit_mask);
        launch.arg(&mut hist);
        // SAFETY: the arguments match `pipe_radix_hist` in kernels.cu: rows × n f32 values, n as
        // u64, one u32 prefix per row, three u32 scalars, rows × 2048 u32 bins; the grid's y is
        // the row and every thread stays below n within it.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
        device.clone_dtoh(&hist)
    })?;
    Ok(Some(kth))
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
                let cfg = config(launch::adam(n, blocks));
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
                unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
                Ok(())
            })
        })
    })?;
    Ok(true)
}

/// A contiguous CUDA tensor's storage, held for reading while a kernel uses it, and its range.
struct Held<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> Held<'a> {
    /// `t` must be contiguous (callers pass `.contiguous()` copies).
    fn new(t: &'a Tensor, name: &str) -> Result<Held<'a>> {
        let (guard, layout) = t.storage_and_layout();
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("sparse step: `{name}` is not contiguous");
        };
        if !matches!(&*guard, Storage::Cuda(_)) {
            candle_core::bail!("sparse step: `{name}` is not on a CUDA device");
        }
        Ok(Held { guard, range: a..b })
    }

    fn storage(&self) -> &CudaStorage {
        match &*self.guard {
            Storage::Cuda(s) => s,
            _ => unreachable!("checked in Held::new"),
        }
    }

    fn view<T: candle_core::cuda::CudaDType>(
        &self,
    ) -> Result<candle_core::cuda::cudarc::driver::CudaView<'_, T>> {
        Ok(self.storage().as_cuda_slice::<T>()?.slice(self.range.clone()))
    }
}

/// A tensor of `shape` over a kernel's output buffer (allocated with at least one entry; the
/// first `len` are the tensor).
fn wrap<T: candle_core::cuda::CudaDType>(
    buf: CudaSlice<T>,
    device: &CudaDevice,
    len: usize,
    shape: impl Into<candle_core::Shape>,
) -> Result<Tensor> {
    let all = buf.len();
    let t = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, device.clone())),
        all,
        candle_core::op::BackpropOp::none(),
        false,
    );
    t.narrow(0, 0, len)?.reshape(shape)
}

/// Fails unless `t` has the dims a kernel is about to assume.
fn expect(t: &Tensor, dims: &[usize], name: &str) -> Result<()> {
    if t.dims() != dims {
        candle_core::bail!("sparse step: `{name}` is {:?}, the kernel expects {dims:?}", t.dims());
    }
    Ok(())
}

fn config(g: Geometry) -> LaunchConfig {
    LaunchConfig { grid_dim: g.grid, block_dim: g.block, shared_mem_bytes: 0 }
}

fn launch_failed(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// `sparse::compact` on CUDA (`pipe_compact_f32`): the CSR columns and values of the kept entries
/// of `scaled` (rows, n), with the host's per-row thresholds, tie quotas and offsets. The kernel's
/// count of each row is checked against the host's.
pub(crate) fn compact(
    post: &Tensor,
    scaled: &Tensor,
    thresh: &[f32],
    take: &[u32],
    offsets: &[u32],
    offsets_dev: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (rows, n) = scaled.dims2()?;
    expect(post, &[rows, n], "post")?;
    if thresh.len() != rows || take.len() != rows || offsets.len() != rows + 1 {
        candle_core::bail!("sparse step: {rows} rows, but thresholds, quotas or offsets do not match");
    }
    let (post, scaled, offsets_dev) = (post.contiguous()?, scaled.contiguous()?, offsets_dev.contiguous()?);
    let (hp, hs, ho) =
        (Held::new(&post, "post")?, Held::new(&scaled, "scaled")?, Held::new(&offsets_dev, "offsets")?);
    let device = hs.storage().device().clone();
    let total = offsets[rows] as usize;
    let thresh_dev = device.clone_htod(thresh)?;
    let take_dev = device.clone_htod(take)?;
    let mut cols = device.alloc_zeros::<u32>(total.max(1))?;
    let mut vals = device.alloc_zeros::<f32>(total.max(1))?;
    let mut written = device.alloc_zeros::<u32>(rows.max(1))?;
    let func = device.get_or_load_custom_func("pipe_compact_f32", MODULE, PTX)?;
    let n32 = u32::try_from(n).map_err(|_| candle_core::Error::Msg("sparse step: rows too wide".into()))?;
    {
        let (vs, vp, vo) = (hs.view::<f32>()?, hp.view::<f32>()?, ho.view::<u32>()?);
        let mut launch = func.builder();
        launch.arg(&vs).arg(&vp).arg(&thresh_dev).arg(&take_dev).arg(&vo).arg(&n32);
        launch.arg(&mut cols).arg(&mut vals).arg(&mut written);
        let cfg = config(launch::compact(rows));
        // SAFETY: the arguments match `pipe_compact_f32` in kernels.cu: rows × n f32 scaled and
        // post values, rows f32 thresholds, rows u32 quotas, rows + 1 u32 offsets, n as u32, then
        // `total` u32 columns and f32 values (at least one) and rows u32 counts; the kernel
        // writes row r's entries below offsets[r + 1] only.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
    }
    let written = device.clone_dtoh(&written)?;
    for r in 0..rows {
        let want = offsets[r + 1] - offsets[r];
        if written[r] != want {
            candle_core::bail!(
                "the compaction kernel kept {} codes of row {r} where the counts say {want}",
                written[r]
            );
        }
    }
    Ok((wrap(cols, &device, total, total)?, wrap(vals, &device, total, total)?))
}

/// `sparse::decode` on CUDA (`pipe_decode_f32`): (rows, 2d) from the CSR entries and the decoder
/// (2, f, d), plus its bias (2, d) when `bias`.
pub(crate) fn sparse_decode(
    offsets: &Tensor,
    cols: &Tensor,
    vals: &Tensor,
    w_dec: &Tensor,
    b_dec: &Tensor,
    bias: bool,
    (rows, f, d): (usize, usize, usize),
) -> Result<Tensor> {
    let (offsets, cols, vals) = (offsets.contiguous()?, cols.contiguous()?, vals.contiguous()?);
    let (w_dec, b_dec) = (w_dec.contiguous()?, b_dec.contiguous()?);
    let ho = Held::new(&offsets, "offsets")?;
    let (hc, hv) = (Held::new(&cols, "cols")?, Held::new(&vals, "vals")?);
    let (hw, hb) = (Held::new(&w_dec, "decoder.weight")?, Held::new(&b_dec, "decoder.bias")?);
    let device = hw.storage().device().clone();
    expect(&w_dec, &[2, f, d], "decoder.weight")?;
    expect(&b_dec, &[2, d], "decoder.bias")?;
    expect(&offsets, &[rows + 1], "offsets")?;
    let len = rows * 2 * d;
    // SAFETY: every one of the rows × 2d outputs is written by the kernel before it is read.
    let mut out = unsafe { device.alloc::<f32>(len.max(1)) }?;
    let func = device.get_or_load_custom_func("pipe_decode_f32", MODULE, PTX)?;
    let (use_bias, f_u32, d32) = (u32::from(bias), f as u32, d as u32);
    {
        let (vo, vc, vv, vw, vb) =
            (ho.view::<u32>()?, hc.view::<u32>()?, hv.view::<f32>()?, hw.view::<f32>()?, hb.view::<f32>()?);
        let mut launch = func.builder();
        launch.arg(&vo).arg(&vc).arg(&vv).arg(&vw).arg(&vb).arg(&use_bias).arg(&f_u32).arg(&d32);
        launch.arg(&mut out);
        let cfg = config(launch::decode(rows));
        // SAFETY: the arguments match `pipe_decode_f32`: rows + 1 u32 offsets, u32 columns below
        // f and f32 values indexed by them, the (2, f, d) decoder, its (2, d) bias, three u32
        // scalars, and rows × 2d f32 outputs, each written by one thread.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
    }
    wrap(out, &device, len, (rows, 2 * d))
}

/// `sparse::code_grads` on CUDA (`pipe_code_grads_f32`): ⟨u_b, d_j⟩ for each CSR entry (b, j),
/// u (rows, 2d).
pub(crate) fn sparse_code_grads(
    offsets: &Tensor,
    cols: &Tensor,
    u: &Tensor,
    w_dec: &Tensor,
    (rows, f, d): (usize, usize, usize),
) -> Result<Tensor> {
    let (offsets, cols, u, w_dec) =
        (offsets.contiguous()?, cols.contiguous()?, u.contiguous()?, w_dec.contiguous()?);
    let n = cols.elem_count();
    let (ho, hc) = (Held::new(&offsets, "offsets")?, Held::new(&cols, "cols")?);
    let (hu, hw) = (Held::new(&u, "upstream")?, Held::new(&w_dec, "decoder.weight")?);
    let device = hw.storage().device().clone();
    expect(&w_dec, &[2, f, d], "decoder.weight")?;
    expect(&u, &[rows, 2 * d], "upstream")?;
    expect(&offsets, &[rows + 1], "offsets")?;
    // SAFETY: each of the n entries is written by the warp that owns it before it is read.
    let mut out = unsafe { device.alloc::<f32>(n.max(1)) }?;
    let func = device.get_or_load_custom_func("pipe_code_grads_f32", MODULE, PTX)?;
    let (f_u32, d32) = (f as u32, d as u32);
    {
        let (vo, vc, vu, vw) = (ho.view::<u32>()?, hc.view::<u32>()?, hu.view::<f32>()?, hw.view::<f32>()?);
        let mut launch = func.builder();
        launch.arg(&vo).arg(&vc).arg(&vu).arg(&vw).arg(&f_u32).arg(&d32).arg(&mut out);
        let cfg = config(launch::code_grads(rows));
        // SAFETY: the arguments match `pipe_code_grads_f32`: rows + 1 u32 offsets over n u32
        // columns below f, rows × 2d f32 upstream values, the (2, f, d) decoder, two u32 scalars
        // and n f32 outputs, entry e written by the one warp that owns it.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
    }
    wrap(out, &device, n, n)
}

/// The training codes' kept entries grouped by latent (`sparse::Groups`), on the device: latent
/// j's entries are `start[j]..start[j + 1]`, each with its row and its index in the values.
pub(crate) struct ByLatentDev {
    pub start: Tensor,
    pub rows: Tensor,
    pub idx: Tensor,
}

/// `sparse::backward` on CUDA (`pipe_sparse_backward_f32`, then `pipe_transpose_f32` for the
/// encoder): the gradients of the decoder (2, f, d), the encoder (2, d, f) and its bias (f).
pub(crate) fn sparse_backward(
    by: &ByLatentDev,
    vals: &Tensor,
    dpre: &Tensor,
    upstream: &Tensor,
    x: &Tensor,
    w_dec: &Tensor,
    (f, d): (usize, usize),
) -> Result<[Tensor; 3]> {
    let c = |t: &Tensor| t.contiguous();
    let (start, rows, idx) = (c(&by.start)?, c(&by.rows)?, c(&by.idx)?);
    let (vals, dpre, up, x) = (c(vals)?, c(dpre)?, c(upstream)?, c(x)?);
    let held = [
        Held::new(&start, "start")?,
        Held::new(&rows, "rows")?,
        Held::new(&idx, "idx")?,
        Held::new(&vals, "vals")?,
        Held::new(&dpre, "dpre")?,
        Held::new(&up, "upstream")?,
        Held::new(&x, "x")?,
    ];
    let device = match w_dec.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => candle_core::bail!("sparse step: the decoder is not on a CUDA device"),
    };
    let width = 2 * d;
    if f.div_ceil(32) > 65_535 {
        candle_core::bail!("sparse step: {f} latents are more than the transpose's grid takes");
    }
    expect(&start, &[f + 1], "start")?;
    let b = x.dim(0)?;
    expect(&x, &[b, width], "x")?;
    expect(&up, &[b, width], "upstream")?;
    expect(w_dec, &[2, f, d], "decoder.weight")?;
    // SAFETY: the kernel writes every entry of the three outputs (one block per latent, its
    // threads over all 2d columns), and nothing reads them before it has run.
    let (mut dwd, mut dwe_t, mut dbe) = unsafe {
        (
            device.alloc::<f32>((2 * f * d).max(1))?,
            device.alloc::<f32>((f * width).max(1))?,
            device.alloc::<f32>(f.max(1))?,
        )
    };
    let (f_u32, d32) = (f as u32, d as u32);
    {
        let [h_start, h_rows, h_idx, h_vals, h_dpre, h_up, h_x] = &held;
        let (v_start, v_rows, v_idx) = (h_start.view::<u32>()?, h_rows.view::<u32>()?, h_idx.view::<u32>()?);
        let (v_vals, v_dpre, v_up, v_x) =
            (h_vals.view::<f32>()?, h_dpre.view::<f32>()?, h_up.view::<f32>()?, h_x.view::<f32>()?);
        let func = device.get_or_load_custom_func("pipe_sparse_backward_f32", MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&v_start).arg(&v_rows).arg(&v_idx).arg(&v_vals).arg(&v_dpre);
        launch.arg(&v_up).arg(&v_x).arg(&f_u32).arg(&d32);
        launch.arg(&mut dwd).arg(&mut dwe_t).arg(&mut dbe);
        let cfg = config(launch::sparse_backward(f));
        // SAFETY: the arguments match `pipe_sparse_backward_f32`: f + 1 u32 starts over the u32
        // rows and indices of the grouped entries (rows below B, indices below the values'
        // length), the f32 values and code gradients, the (B, 2d) upstream and x, two u32
        // scalars, then (2, f, d), (f, 2d) and (f) f32 outputs, every entry written by exactly
        // one thread of latent j's block.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
    }
    drop(held);
    // SAFETY: the transpose writes each of the 2d × f entries.
    let mut dwe = unsafe { device.alloc::<f32>((f * width).max(1)) }?;
    {
        let func = device.get_or_load_custom_func("pipe_transpose_f32", MODULE, PTX)?;
        let (r32, c32) = (f as u32, width as u32);
        let mut launch = func.builder();
        launch.arg(&dwe_t).arg(&r32).arg(&c32).arg(&mut dwe);
        let cfg = config(launch::transpose(f, width));
        // SAFETY: `pipe_transpose_f32` reads the f × 2d input and writes the 2d × f output, each
        // index checked against the sizes.
        unsafe { launch.launch(cfg) }.map_err(launch_failed)?;
    }
    Ok([
        wrap(dwd, &device, 2 * f * d, (2, f, d))?,
        wrap(dwe, &device, f * width, (2, d, f))?,
        wrap(dbe, &device, f, f)?,
    ])
}
