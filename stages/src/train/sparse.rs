//! The BatchTopK step with sparse decode and backward on any candle device: the GPU's version of
//! [`super::cpu::batchtopk`], written with tensors so that its host side runs (and is tested) on
//! the CPU too.
//!
//! Only the encoder's product is dense (B × 2d × F). The k·B kept codes are compacted into CSR
//! ([`Kept`]), and four sparse operations do the rest over the kept entries alone: decoding, the
//! codes' gradients, and, grouped by latent, the decoder's and encoder's gradients. On CUDA they
//! are kernels of `train::cuda`; on the CPU they are the CPU step's own loops ([`super::cpu`]).
//! The selection, the dead-latent bookkeeping, the losses and their gradients with respect to
//! x̂ are tensor operations, the same on every device; so is the auxiliary loss, dense over the
//! dead latents' columns (`Aux`). In tests, `simulated` sends the four operations to the
//! CUDA kernels' source run on the CPU (`train::kernel_sim`).
//!
//! At its sizes (d = 4096, F = 131,072, B = 2048, k = 100) this replaces three of the dense
//! step's five B × 2d × F products (decode, and the two backward products of the codes) with
//! passes over 204,800 entries.
//!
//! The stage checks the CUDA version once per run against candle's autograd on the first batch
//! ([`check`]), and falls back to autograd if they disagree or a kernel fails.

use candle_core::{DType, Result, Tensor};

use super::cpu::{self, ByLatent, Sparse};
use super::crosscoder::{BatchTopK, Crosscoder, kth_largest, row_counts};

/// The kept entries of a (B, F) code matrix by row (CSR), on the codes' device: row r holds
/// `cols[offsets[r]..offsets[r + 1]]` (ascending) with their unscaled `vals`.
pub struct Kept {
    /// (B + 1), on the host.
    pub(super) offsets: Vec<u32>,
    /// The same offsets on the device, u32 (the CUDA kernels read them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    offsets_dev: Tensor,
    /// (N) u32.
    pub(super) cols: Tensor,
    /// (N) f32.
    pub(super) vals: Tensor,
    /// `cols` on the host (the dead-latent counters and the by-latent grouping need them).
    cols_host: Vec<u32>,
}

impl Kept {
    fn len(&self) -> usize {
        self.cols_host.len()
    }

    /// The entries as a dense (B, n) matrix on their device, zero elsewhere.
    fn to_dense(&self, n: usize) -> Result<Tensor> {
        let b = self.offsets.len() - 1;
        if u32::try_from(b * n).is_err() {
            candle_core::bail!("sparse step: a ({b}, {n}) code matrix overflows u32 indices");
        }
        let mut at = Vec::with_capacity(self.len());
        for r in 0..b {
            let row = (r * n) as u32;
            let cols = &self.cols_host[self.offsets[r] as usize..self.offsets[r + 1] as usize];
            at.extend(cols.iter().map(|j| row + j));
        }
        let device = self.vals.device();
        let zeros = Tensor::zeros(b * n, DType::F32, device)?;
        if at.is_empty() {
            return zeros.reshape((b, n));
        }
        let at = Tensor::from_vec(at, self.len(), device)?;
        zeros.index_add(&at, &self.vals, 0)?.reshape((b, n))
    }

    /// The entries as host CSR.
    fn to_sparse(&self) -> Result<Sparse> {
        Ok(Sparse {
            offsets: self.offsets.iter().map(|o| *o as usize).collect(),
            cols: self.cols_host.clone(),
            vals: self.vals.to_vec1()?,
        })
    }
}

/// How many of a row's entries equal to its threshold are kept.
#[derive(Clone, Copy)]
enum Quota {
    /// k in all, ties going to the lowest rows first (batch top-k).
    Batch(u64),
    /// k per row (the auxiliary loss's per-token top-k).
    PerRow(u64),
}

/// The entries of `scaled` (B, F, all ≥ 0) above their row's threshold `thresh[r]`, plus, when
/// the threshold is positive, enough of the entries equal to it (lowest columns first) to fill
/// the quota, as CSR of the matching unscaled `post` values.
fn select(post: &Tensor, scaled: &Tensor, thresh: Vec<f32>, quota: Quota) -> Result<Kept> {
    let (b, _) = scaled.dims2()?;
    let t = Tensor::from_vec(thresh.clone(), (b, 1), scaled.device())?;
    let above = row_counts(&scaled.broadcast_gt(&t)?)?;
    let equal =
        if thresh.iter().any(|t| *t > 0.0) { row_counts(&scaled.broadcast_eq(&t)?)? } else { vec![0; b] };
    let mut take = vec![0u32; b];
    match quota {
        Quota::Batch(k) => {
            let mut left = k.saturating_sub(above.iter().sum());
            for r in (0..b).filter(|r| thresh[*r] > 0.0) {
                let n = equal[r].min(left);
                take[r] = n as u32;
                left -= n;
            }
        }
        Quota::PerRow(k) => {
            for r in (0..b).filter(|r| thresh[*r] > 0.0) {
                take[r] = equal[r].min(k.saturating_sub(above[r])) as u32;
            }
        }
    }
    let mut offsets = vec![0u32; b + 1];
    let mut total = 0u64;
    for r in 0..b {
        total += above[r] + u64::from(take[r]);
        offsets[r + 1] = u32::try_from(total)
            .map_err(|_| candle_core::Error::Msg(format!("{total} kept codes overflow a u32 index")))?;
    }
    let offsets_dev = Tensor::from_slice(&offsets, b + 1, scaled.device())?;
    let (cols, vals) = compact(post, scaled, &thresh, &take, &offsets, &offsets_dev)?;
    let cols_host = cols.to_vec1::<u32>()?;
    Ok(Kept { offsets, offsets_dev, cols, vals, cols_host })
}

/// Where the sparse operations ([`compact`], [`decode`], [`code_grads`], [`backward`]) run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ops {
    /// cpu.rs's loops, on the host.
    Loops,
    /// pipe's CUDA kernels.
    #[cfg(feature = "cuda")]
    Cuda,
    /// The same kernels run on the CPU by `kernel_sim` (tests only).
    #[cfg(test)]
    Simulated,
}

#[cfg(test)]
thread_local! {
    static SIMULATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `body` with this thread's sparse operations on CPU tensors sent to the simulated
/// kernels (tests only).
#[cfg(test)]
pub(crate) fn simulated<R>(body: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SIMULATE.with(|s| s.set(false));
        }
    }
    SIMULATE.with(|s| s.set(true));
    let _reset = Reset;
    body()
}

/// Where `t`'s operations go: pipe's CUDA kernels on a CUDA device while they are on
/// (`PIPE_CUDA_KERNELS`, or a failed check, turns them off), else the CPU loops.
#[allow(unused_variables)]
fn ops(t: &Tensor) -> Ops {
    #[cfg(test)]
    if SIMULATE.with(|s| s.get()) && t.device().is_cpu() {
        return Ops::Simulated;
    }
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && super::cuda::enabled() {
        return Ops::Cuda;
    }
    Ops::Loops
}

/// The compaction of [`select`]: per row, the columns (ascending) and `post` values of the
/// entries s > t, and of the first `take` entries s = t when t > 0.
fn compact(
    post: &Tensor,
    scaled: &Tensor,
    thresh: &[f32],
    take: &[u32],
    offsets: &[u32],
    offsets_dev: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match ops(scaled) {
        #[cfg(feature = "cuda")]
        Ops::Cuda => return super::cuda::compact(post, scaled, thresh, take, offsets, offsets_dev),
        #[cfg(test)]
        Ops::Simulated => return super::kernel_sim::compact(post, scaled, thresh, take, offsets),
        Ops::Loops => {}
    }
    let _ = offsets_dev;
    let (b, f) = scaled.dims2()?;
    let device = scaled.device().clone();
    let (post, scaled) = (post.flatten_all()?.to_vec1::<f32>()?, scaled.flatten_all()?.to_vec1::<f32>()?);
    let n = offsets[b] as usize;
    let (mut cols, mut vals) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for r in 0..b {
        let (t, mut ties) = (thresh[r], 0u32);
        for j in 0..f {
            let v = scaled[r * f + j];
            let keep = (v > t && v > 0.0)
                || (t > 0.0 && v == t && ties < take[r] && {
                    ties += 1;
                    true
                });
            if keep {
                cols.push(j as u32);
                vals.push(post[r * f + j]);
            }
        }
        if cols.len() != offsets[r + 1] as usize {
            candle_core::bail!("row {r}: kept {} codes where the counts said {}", cols.len(), offsets[r + 1]);
        }
    }
    Ok((Tensor::from_vec(cols, n, &device)?, Tensor::from_vec(vals, n, &device)?))
}

/// Σ_j f_bj d_j (+ b_dec when `bias`) over the kept entries: (B, 2d).
fn decode(cc: &Crosscoder, kept: &Kept, bias: bool) -> Result<Tensor> {
    let b = kept.offsets.len() - 1;
    match ops(&kept.cols) {
        #[cfg(feature = "cuda")]
        Ops::Cuda => {
            return super::cuda::sparse_decode(
                &kept.offsets_dev,
                &kept.cols,
                &kept.vals,
                cc.w_dec.as_tensor(),
                cc.b_dec.as_tensor(),
                bias,
                (b, cc.f, cc.d),
            );
        }
        #[cfg(test)]
        Ops::Simulated => return super::kernel_sim::decode(cc, kept, bias),
        Ops::Loops => {}
    }
    let codes = kept.to_sparse()?;
    let out = cpu::with_weights(cc, |w| Ok(cpu::decode_sparse(&codes, w, bias)))?;
    Tensor::from_vec(out, (b, 2 * cc.d), kept.cols.device())
}

/// For each kept entry (b, j), ⟨U_b, d_j⟩ with `u` = ∂L/∂(decoder output) (B, 2d): (N).
fn code_grads(cc: &Crosscoder, kept: &Kept, u: &Tensor) -> Result<Tensor> {
    match ops(&kept.cols) {
        #[cfg(feature = "cuda")]
        Ops::Cuda => {
            return super::cuda::sparse_code_grads(
                &kept.offsets_dev,
                &kept.cols,
                u,
                cc.w_dec.as_tensor(),
                (kept.offsets.len() - 1, cc.f, cc.d),
            );
        }
        #[cfg(test)]
        Ops::Simulated => return super::kernel_sim::code_grads(cc, kept, u),
        Ops::Loops => {}
    }
    let codes = kept.to_sparse()?;
    let u = u.flatten_all()?.to_vec1::<f32>()?;
    let out = cpu::with_weights(cc, |w| Ok(cpu::code_grads(&codes, &u, w)))?;
    Tensor::from_vec(out, kept.len(), kept.cols.device())
}

/// The training codes' part in the backward: its entries, U = ∂L/∂(decoder output) (B, 2d),
/// and ∂L/∂pre at its entries (N).
struct Part<'a> {
    kept: &'a Kept,
    upstream: &'a Tensor,
    dpre: &'a Tensor,
}

/// The gradients of the decoder (2, F, d), of the encoder (2, d, F) and of its bias (F) from
/// the part's kept entries, grouped by latent; `x` (B, 2d).
fn backward(cc: &Crosscoder, part: &Part, x: &Tensor) -> Result<[Tensor; 3]> {
    let (d, f) = (cc.d, cc.f);
    let device = x.device().clone();
    // The grouping needs only the positions of the entries, which are on the host.
    let host = Sparse {
        offsets: part.kept.offsets.iter().map(|o| *o as usize).collect(),
        cols: part.kept.cols_host.clone(),
        vals: Vec::new(),
    };
    let by = ByLatent::new(&[&host], f);
    #[cfg(any(feature = "cuda", test))]
    if ops(x) != Ops::Loops {
        if by.entries.is_empty() {
            // No code kept at all: nothing moves (and no empty buffer goes to the device).
            return Ok([
                cc.w_dec.as_tensor().zeros_like()?,
                cc.w_enc.as_tensor().zeros_like()?,
                cc.b_enc.as_tensor().zeros_like()?,
            ]);
        }
        let groups = Groups::new(&by)?;
        let (vals, dpre, up) = (&part.kept.vals, part.dpre, part.upstream);
        match ops(x) {
            #[cfg(feature = "cuda")]
            Ops::Cuda => {
                let by = super::cuda::ByLatentDev {
                    start: Tensor::from_vec(groups.start, f + 1, &device)?,
                    rows: Tensor::new(groups.rows, &device)?,
                    idx: Tensor::new(groups.idx, &device)?,
                };
                return super::cuda::sparse_backward(&by, vals, dpre, up, x, cc.w_dec.as_tensor(), (f, d));
            }
            #[cfg(test)]
            Ops::Simulated => return super::kernel_sim::backward(&groups, vals, dpre, up, x, (f, d)),
            Ops::Loops => unreachable!("checked above"),
        }
    }
    let codes = part.kept.to_sparse()?;
    let up: Vec<f32> = part.upstream.flatten_all()?.to_vec1()?;
    let dpre: Vec<f32> = part.dpre.to_vec1()?;
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    let (mut dwd, mut dwe, mut dbe) = (vec![0f32; 2 * f * d], vec![0f32; 2 * d * f], vec![0f32; f]);
    cpu::with_weights(cc, |w| {
        cpu::sparse_backward_by(&by, &[&codes], &[&up], &[&dpre], &x, w, &mut dwd, &mut dwe, &mut dbe);
        Ok(())
    })?;
    Ok([
        Tensor::from_vec(dwd, (2, f, d), &device)?,
        Tensor::from_vec(dwe, (2, d, f), &device)?,
        Tensor::from_vec(dbe, f, &device)?,
    ])
}

/// The training codes' kept entries grouped by latent, as the CUDA backward reads them: latent
/// j's entries are `start[j]..start[j + 1]`, each with its row and its index in the codes' values.
#[cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]
pub(crate) struct Groups {
    pub start: Vec<u32>,
    pub rows: Vec<u32>,
    pub idx: Vec<u32>,
}

impl Groups {
    #[cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]
    fn new(by: &ByLatent) -> Result<Groups> {
        let too_many = |_| candle_core::Error::Msg("sparse step: more kept codes than u32 indices".into());
        let (rows, idx) = by.entries.iter().map(|&(_, r, e)| (r, e)).unzip();
        let start = by.start.iter().map(|s| u32::try_from(*s).map_err(too_many)).collect::<Result<_>>()?;
        Ok(Groups { start, rows, idx })
    }
}

/// The auxiliary loss's codes, dense over the D dead latents `ids` (D, u32, ascending): `codes`
/// (B, D), zero outside each token's kept entries; `w` the two models' decoder rows of those
/// latents (D, d each); `upstream` = ∂L/∂x̂_aux (B, 2d).
///
/// Dense because the sparse operations read 2d floats per kept entry in each of decode and the
/// codes' gradients and 4d in the backward (U's row and x's): 128 KiB an entry, 0.55 TB a step
/// for the 4.2M entries at the paper's sizes, with little reuse. These eight (B × D × d)
/// products do 16·B·D·d flops instead: 1.8 TFLOP with a tenth of F dead (D = 13,107), 13.5 with
/// all. (A count, not a measurement. On the CPU the CPU step, `cpu.rs`, keeps its auxiliary
/// part sparse.)
struct Aux {
    ids: Tensor,
    codes: Tensor,
    w: [Tensor; 2],
    upstream: Tensor,
}

impl Aux {
    /// Adds the auxiliary loss's gradients to the decoder's (2, F, d), the encoder's (2, d, F)
    /// and its bias's (F) at the dead latents; `x` (B, 2d). The codes' gradient passes the relu
    /// and the selection exactly at the nonzero codes (each kept code has post > 0).
    fn backward(&self, x: &Tensor, d: usize, [dwd, dwe, dbe]: [Tensor; 3]) -> Result<[Tensor; 3]> {
        let half = |t: &Tensor, l: usize| t.narrow(1, l * d, d)?.contiguous();
        let (u, xs) = ([half(&self.upstream, 0)?, half(&self.upstream, 1)?], [half(x, 0)?, half(x, 1)?]);
        let dcodes = (u[0].matmul(&self.w[0].t()?)? + u[1].matmul(&self.w[1].t()?)?)?;
        let dpre = (dcodes * self.codes.ne(0f32)?.to_dtype(DType::F32)?)?;
        let codes_t = self.codes.t()?;
        let dwd_dead = Tensor::stack(&[codes_t.matmul(&u[0])?, codes_t.matmul(&u[1])?], 0)?;
        let dwe_dead = Tensor::stack(&[xs[0].t()?.matmul(&dpre)?, xs[1].t()?.matmul(&dpre)?], 0)?;
        Ok([
            dwd.index_add(&self.ids, &dwd_dead, 1)?,
            dwe.index_add(&self.ids, &dwe_dead, 2)?,
            dbe.index_add(&self.ids, &dpre.sum(0)?, 0)?,
        ])
    }
}

/// Σ over rows of the row sums of `t` (R, W), the rows summed on the device (one block per row
/// on a GPU) and added on the host in f64.
fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.sum(1)?.to_vec1::<f32>()?.iter().map(|v| f64::from(*v)).sum())
}

/// A step's loss, its parts, the gradients and what the metrics need, as tensors on the batch's
/// device.
pub struct Step {
    pub loss: f32,
    pub l2: f32,
    pub auxk: f32,
    /// In [`Crosscoder::vars`] order, unclipped.
    pub grads: Vec<Tensor>,
    /// (B, 2, d).
    pub x_hat: Tensor,
    /// The training codes, on the host.
    pub codes: Sparse,
    /// The smallest kept f·c (0 if none), for the threshold.
    pub min_scaled: f32,
}

/// The BatchTopK loss and its gradients (DOMAIN.md §2b) for the batch `x` (B, 2, d), updating
/// the dead-latent counters as [`BatchTopK::loss`] does (only once the step has succeeded).
pub fn batchtopk(t: &mut BatchTopK, cc: &Crosscoder, x: &Tensor) -> Result<Step> {
    let b = x.dim(0)?;
    let (d, f, width) = (cc.d, cc.f, 2 * cc.d);
    let device = x.device().clone();
    let post = cc.pre_relu(x)?.contiguous()?;
    let c = cc.code_weights()?.detach();
    let scaled = post.broadcast_mul(&c)?;
    let k = t.k * b as u64;
    let kth = kth_largest(&scaled.reshape((1, b * f))?, &[k])?[0];
    let main = select(&post, &scaled, vec![kth; b], Quota::Batch(k))?;

    let mut fired = vec![false; f];
    main.cols_host.iter().for_each(|j| fired[*j as usize] = true);
    let since_fired: Vec<u64> =
        t.since_fired.iter().zip(&fired).map(|(s, fired)| if *fired { 0 } else { s + b as u64 }).collect();
    let dead: Vec<bool> = since_fired.iter().map(|s| *s >= t.dead_tokens).collect();
    let n_dead = dead.iter().filter(|d| **d).count();

    let xf = x.reshape((b, width))?.contiguous()?;
    let x_hat = decode(cc, &main, true)?;
    let e = (&xf - &x_hat)?;
    // The reconstruction term: mean over (b, l) of ‖e_bl‖, and ∂/∂x̂ = −e_bl / (‖e_bl‖ · 2B).
    let norms: Vec<f32> = e.reshape((2 * b, d))?.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    let l2 = (norms.iter().map(|v| f64::from(*v)).sum::<f64>() / (2 * b) as f64) as f32;
    let n = (2 * b) as f32;
    let s: Vec<f32> = norms.iter().map(|norm| if *norm > 0.0 { -1.0 / (norm * n) } else { 0.0 }).collect();
    let g = e
        .reshape((2 * b, d))?
        .broadcast_mul(&Tensor::from_vec(s, (2 * b, 1), &device)?)?
        .reshape((b, width))?;

    // The auxiliary loss: dead latents reconstruct the (detached) residual, per token from its
    // top min(d/2, dead) dead latents' codes. Its codes live among the D dead latents only, and
    // up to d/2 = 2,048 per token at the paper's sizes (4.2M in a batch), so it runs densely over
    // those D columns (see `Aux`), not through the sparse operations.
    let mut auxk = 0f32;
    let mut aux: Option<Aux> = None;
    if n_dead > 0 {
        let ids: Vec<u32> = (0..f as u32).filter(|j| dead[*j as usize]).collect();
        let ids = Tensor::from_vec(ids, n_dead, &device)?;
        let k_aux = (d / 2).min(n_dead) as u64;
        let (dead_post, dead_scaled) = (post.index_select(&ids, 1)?, scaled.index_select(&ids, 1)?);
        // (The k-th largest among the dead columns is the k-th of the rows with the live ones
        // zeroed, since k ≤ D; ties go to the lowest latents, as the columns keep their order.)
        let thresh = kth_largest(&dead_scaled, &vec![k_aux; b])?;
        let codes = select(&dead_post, &dead_scaled, thresh, Quota::PerRow(k_aux))?.to_dense(n_dead)?;
        let w = cc.w_dec.as_tensor().index_select(&ids, 1)?;
        let w = [w.get(0)?, w.get(1)?];
        let x_aux = Tensor::cat(&[codes.matmul(&w[0])?, codes.matmul(&w[1])?], 1)?;
        let diff = (&e - &x_aux)?;
        let num = sum_f64(&diff.sqr()?)? / b as f64;
        let den = sum_f64(&e.broadcast_sub(&e.mean_keepdim(0)?)?.sqr()?)? / b as f64;
        let value = (num / den) as f32;
        if value.is_finite() {
            auxk = value;
            let s = (-2.0 * t.auxk_alpha / (b as f64 * den)) as f32;
            aux = Some(Aux { ids, codes, w, upstream: (diff * f64::from(s))? });
        }
    }
    let loss = l2 + (f64::from(auxk) * t.auxk_alpha) as f32;

    // Backward over the kept entries (the relu passes them: each has post > 0).
    let dcodes = code_grads(cc, &main, &g)?;
    let [mut dwd, mut dwe, mut dbe] = backward(cc, &Part { kept: &main, upstream: &g, dpre: &dcodes }, &xf)?;
    if let Some(aux) = &aux {
        [dwd, dwe, dbe] = aux.backward(&xf, d, [dwd, dwe, dbe])?;
    }
    let dbd = g.sum(0)?.reshape((2, d))?;

    let nan = post.sum(1)?.to_vec1::<f32>()?.iter().any(|v| v.is_nan());
    let codes = main.to_sparse()?;
    let c: Vec<f32> = c.to_vec1()?;
    let min_scaled =
        codes.cols.iter().zip(&codes.vals).map(|(j, v)| v * c[*j as usize]).fold(f32::INFINITY, f32::min);
    t.since_fired = since_fired;
    Ok(Step {
        loss: if nan { f32::NAN } else { loss },
        l2,
        auxk,
        grads: vec![dwe, dbe, dwd, dbd],
        x_hat: x_hat.reshape((b, 2, d))?,
        codes,
        min_scaled: if min_scaled.is_finite() { min_scaled } else { 0.0 },
    })
}

/// Largest relative L2 error the check accepts between this step's gradients and autograd's:
/// the two differ by the order of float sums, and where the dense products run in TF32 or
/// bf16, by their rounding (2⁻¹¹ and 2⁻⁸ relative per input); a wrong index or a missing entry
/// is off by far more.
fn tolerance(cc: &Crosscoder) -> f64 {
    if cc.matmul_dtype == DType::F32 { 2e-2 } else { 6e-2 }
}

/// Runs this step and candle's autograd on the same batch, leaving `t` untouched, and says
/// whether they agree: the same codes kept, and the loss, its parts and every gradient within
/// [`tolerance`]. Agreeing, it returns the largest gradient error (relative L2). The stage runs
/// it once per run before trusting the CUDA kernels.
pub fn check(t: &BatchTopK, cc: &Crosscoder, x: &Tensor) -> std::result::Result<f64, String> {
    let fail = |e: candle_core::Error| e.to_string();
    let mine = batchtopk(&mut t.clone(), cc, x).map_err(fail)?;
    let auto = t.clone().loss(cc, x).map_err(fail)?;
    let grads = auto.loss.backward().map_err(fail)?;
    let tol = tolerance(cc);
    let close = |what: &str, a: f32, b: f32| {
        let err = f64::from((a - b).abs()) / f64::from(b.abs()).max(1e-6);
        if err <= tol { Ok(()) } else { Err(format!("{what}: {a} here, {b} by autograd")) }
    };
    let scalar = |t: &Tensor| t.to_scalar::<f32>().map_err(fail);
    close("loss", mine.loss, scalar(&auto.loss)?)?;
    close("the reconstruction loss", mine.l2, scalar(&auto.l2)?)?;
    close("the auxiliary loss", mine.auxk, auto.auxk.as_ref().map_or(Ok(0.0), scalar)?)?;
    let kept =
        auto.f.ne(0.0).and_then(|m| m.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()).map_err(fail)?;
    if kept as usize != mine.codes.cols.len() {
        return Err(format!("{} codes kept here, {kept} by autograd", mine.codes.cols.len()));
    }
    let mut worst = 0.0f64;
    for (i, v) in cc.vars().iter().enumerate() {
        let want = grads.get(v.as_tensor()).cloned().unwrap_or(v.as_tensor().zeros_like().map_err(fail)?);
        let err = rel_error(&mine.grads[i], &want).map_err(fail)?;
        if err > tol {
            return Err(format!("{}'s gradient is off by {err:.3e} (relative L2)", Crosscoder::NAMES[i]));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// ‖a − b‖ / ‖b‖ (‖a‖ when b = 0), the squares summed by row on the device and in f64 across.
fn rel_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let rows = |t: &Tensor| -> Result<Tensor> {
        let n = t.elem_count();
        let w = t.dims().last().copied().unwrap_or(1).max(1);
        t.reshape((n / w, w))
    };
    let (a, b) = (rows(a)?, rows(b)?);
    let diff = sum_f64(&(&a - &b)?.sqr()?)?.sqrt();
    let norm = sum_f64(&b.sqr()?)?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::cpu::tests::{batch, topk};
    use crate::train::crosscoder::CodeNormalization;

    fn crosscoder(d: usize, f: usize, norm: CodeNormalization, seed: u64) -> Crosscoder {
        let dev = Device::Cpu;
        let cc = Crosscoder::init(d, f, Some(1.0), norm, seed, &dev).unwrap();
        for (i, v) in cc.vars().iter().enumerate() {
            let n = v.elem_count();
            let mut rng = crate::rng::SplitMix64::new(200 + i as u64);
            let noise: Vec<f32> = (0..n).map(|_| (rng.next_f64() - 0.5) as f32 * 0.2).collect();
            v.set(&(v.as_tensor() + Tensor::from_vec(noise, v.shape(), &dev).unwrap()).unwrap()).unwrap();
        }
        cc
    }

    /// Same selection, counters, losses and gradients as the CPU step, with and without dead
    /// latents, for each code normalisation.
    #[test]
    fn the_tensor_step_is_the_cpu_step() {
        let (d, f, b) = (8, 64, 24);
        let x = batch(b, d, 11);
        let xt = Tensor::from_slice(&x, (b, 2, d), &Device::Cpu).unwrap();
        for norm in [CodeNormalization::Crosscoder, CodeNormalization::Sae, CodeNormalization::None] {
            for dead_tokens in [u64::MAX, 10] {
                let cc = crosscoder(d, f, norm, 3);
                let (mut tc, mut ts) = (topk(4, f, dead_tokens), topk(4, f, dead_tokens));
                for t in [&mut tc, &mut ts] {
                    t.since_fired.iter_mut().step_by(2).for_each(|s| *s = 1000);
                }
                let want = cpu::batchtopk(&mut tc, &cc, &x, b).unwrap();
                let got = batchtopk(&mut ts, &cc, &xt).unwrap();
                assert_eq!(tc.since_fired, ts.since_fired, "{norm:?}");
                let cpu::Codes::Sparse(codes) = &want.codes else { panic!("sparse codes") };
                assert_eq!(codes, &got.codes, "{norm:?}");
                assert_eq!(want.min_scaled, Some(got.min_scaled));
                assert_eq!(want.auxk.unwrap() > 0.0, dead_tokens == 10);
                for (a, b) in [(want.loss, got.loss), (want.l2, got.l2), (want.auxk.unwrap(), got.auxk)] {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{norm:?}: {a} vs {b}");
                }
                let x_hat: Vec<f32> = got.x_hat.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(want.x_hat, x_hat, "the same decode");
                for (i, (w, g)) in want.grads.iter().zip(&got.grads).enumerate() {
                    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    let worst = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst <= 1e-5 * scale, "{norm:?} {}: {worst} of {scale}", Crosscoder::NAMES[i]);
                }
            }
        }
    }

    /// The kernels' step on `dev` (a GPU, or the CPU with the simulated kernels) against the CPU
    /// step on the same weights and batch. The selection is the same, x̂ and every gradient agree
    /// to float rounding (the encoder's product and the codes' gradients differ in their order of
    /// sums), with and without dead latents; and the run-time check passes.
    fn the_kernels_step_is_the_cpu_step(dev: &Device) {
        let (d, f, b) = (40, 300, 33);
        let x = batch(b, d, 17);
        let xt = Tensor::from_slice(&x, (b, 2, d), dev).unwrap();
        for norm in [CodeNormalization::Crosscoder, CodeNormalization::Sae] {
            for dead_tokens in [u64::MAX, 10] {
                let cc = crosscoder(d, f, norm, 5);
                let on_dev = Crosscoder::init(d, f, Some(1.0), norm, 5, dev).unwrap();
                for (g, c) in on_dev.vars().iter().zip(cc.vars()) {
                    g.set(&c.as_tensor().to_device(dev).unwrap()).unwrap();
                }
                let (mut tc, mut tg) = (topk(7, f, dead_tokens), topk(7, f, dead_tokens));
                for t in [&mut tc, &mut tg] {
                    t.since_fired.iter_mut().step_by(2).for_each(|s| *s = 1000);
                }
                let worst = check(&tg, &on_dev, &xt).unwrap();
                assert!(worst < 1e-3, "{norm:?}: the check's largest error {worst}");
                let want = cpu::batchtopk(&mut tc, &cc, &x, b).unwrap();
                let got = batchtopk(&mut tg, &on_dev, &xt).unwrap();
                #[cfg(feature = "cuda")]
                if dev.is_cuda() {
                    assert!(super::super::cuda::enabled(), "a kernel failed and turned the kernels off");
                }
                let cpu::Codes::Sparse(codes) = &want.codes else { panic!("sparse codes") };
                assert_eq!(codes.offsets, got.codes.offsets, "{norm:?}: the same codes per row");
                assert_eq!(codes.cols, got.codes.cols, "{norm:?}: the same latents");
                assert_eq!(tc.since_fired, tg.since_fired, "{norm:?}");
                assert_eq!(want.auxk.unwrap() > 0.0, dead_tokens == 10);
                let close = |what: &str, w: &[f32], g: &Tensor| {
                    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(w.len(), g.len(), "{what}");
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    let worst = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst <= 1e-4 * scale, "{norm:?} {what}: {worst} of {scale}");
                };
                close("x̂", &want.x_hat, &got.x_hat);
                for (i, (w, g)) in want.grads.iter().zip(&got.grads).enumerate() {
                    close(Crosscoder::NAMES[i], w, g);
                }
                for (a, b) in [(want.loss, got.loss), (want.l2, got.l2), (want.auxk.unwrap(), got.auxk)] {
                    assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-3), "{norm:?}: {a} vs {b}");
                }
            }
        }
    }

    /// On a GPU (a `cuda` build; skipped, saying so, where no CUDA device opens): the kernels'
    /// step against the CPU step. scripts/build-cuda.sh builds this test binary for
    /// scripts/device-check.sh.
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_the_kernels_step_is_the_cpu_step() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: on_cuda_the_kernels_step_is_the_cpu_step skipped");
            return;
        };
        assert!(super::super::cuda::enabled(), "PIPE_CUDA_KERNELS=0: nothing to test");
        the_kernels_step_is_the_cpu_step(&gpu);
    }

    /// The same on the CPU, the CUDA kernels run by the simulator (`kernel_sim`): their logic is
    /// checked on every CPU test run.
    #[test]
    fn simulated_the_kernels_step_is_the_cpu_step() {
        if !crate::train::kernel_sim::ready("simulated_the_kernels_step_is_the_cpu_step") {
            return;
        }
        simulated(|| the_kernels_step_is_the_cpu_step(&Device::Cpu));
    }

    /// Ties at the threshold: exactly k·B kept, the surplus dropped from the highest index, as
    /// the CPU step and autograd's mask do; per row for the auxiliary selection.
    #[test]
    fn ties_fill_the_quota_from_the_lowest_index() {
        let (b, f) = (6, 10);
        let post: Vec<f32> = (0..b * f).map(|i| ((i * 7) % 4) as f32 * 0.5).collect();
        let dense = Tensor::from_vec(post.clone(), (b, f), &Device::Cpu).unwrap();
        let cases = [(false, vec![1u64, 5, 13, 29, 40]), (true, vec![1, 3, 9])];
        for (per_row, ks) in cases {
            for k in ks {
                let kept = if per_row {
                    let kth = kth_largest(&dense, &vec![k; b]).unwrap();
                    select(&dense, &dense, kth, Quota::PerRow(k)).unwrap()
                } else {
                    let kth = kth_largest(&dense.reshape((1, b * f)).unwrap(), &[k]).unwrap()[0];
                    select(&dense, &dense, vec![kth; b], Quota::Batch(k)).unwrap()
                };
                let mask: Vec<f32> = super::super::crosscoder::top_mask(&dense, k, per_row)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mine = cpu::Codes::Sparse(kept.to_sparse().unwrap()).to_dense(b, f);
                assert_eq!(
                    mine.iter().map(|v| *v != 0.0).collect::<Vec<_>>(),
                    mask.iter().map(|m| *m != 0.0).collect::<Vec<_>>(),
                    "per row {per_row}, k = {k}"
                );
            }
        }
    }

    /// The compaction kernel (simulated) keeps the CPU loops' entries where ties at the
    /// threshold must be split: rows of three 1024-entry tiles, a fifth of each row equal to the
    /// threshold, batch and per-row quotas that take part of them.
    #[test]
    fn simulated_the_compaction_kernel_splits_ties_as_the_loops_do() {
        if !crate::train::kernel_sim::ready("simulated_the_compaction_kernel_splits_ties_as_the_loops_do") {
            return;
        }
        let (b, f) = (5, 2500);
        let scaled: Vec<f32> = (0..b * f).map(|i| ((i * 7) % 5) as f32 * 0.5).collect();
        let post: Vec<f32> = scaled.iter().enumerate().map(|(i, v)| v + i as f32 * 1e-3).collect();
        let dev = Device::Cpu;
        let (scaled, post) =
            (Tensor::from_vec(scaled, (b, f), &dev).unwrap(), Tensor::from_vec(post, (b, f), &dev).unwrap());
        // Per row 500 entries each of 0, 0.5, 1, 1.5 and 2.
        for (per_row, k) in
            [(false, 1u64), (false, 2750), (false, 4100), (true, 1), (true, 700), (true, 1333)]
        {
            let (thresh, quota) = if per_row {
                (kth_largest(&scaled, &vec![k; b]).unwrap(), Quota::PerRow(k))
            } else {
                let kth = kth_largest(&scaled.reshape((1, b * f)).unwrap(), &[k]).unwrap()[0];
                (vec![kth; b], Quota::Batch(k))
            };
            let want = select(&post, &scaled, thresh.clone(), quota).unwrap();
            let got = simulated(|| select(&post, &scaled, thresh, quota)).unwrap();
            assert_eq!(want.len() as u64, if per_row { k * b as u64 } else { k });
            assert_eq!(want.offsets, got.offsets, "per row {per_row}, k = {k}");
            assert_eq!(want.cols_host, got.cols_host, "per row {per_row}, k = {k}");
            let (wv, gv): (Vec<f32>, Vec<f32>) = (want.vals.to_vec1().unwrap(), got.vals.to_vec1().unwrap());
            assert_eq!(wv, gv, "per row {per_row}, k = {k}");
        }
    }

    /// The check passes this step against autograd, and leaves the counters alone.
    #[test]
    fn the_check_agrees_with_autograd() {
        let (d, f, b) = (8, 64, 24);
        let xt = Tensor::from_vec(batch(b, d, 5), (b, 2, d), &Device::Cpu).unwrap();
        let cc = crosscoder(d, f, CodeNormalization::Crosscoder, 8);
        let mut t = topk(4, f, 10);
        t.since_fired.iter_mut().step_by(3).for_each(|s| *s = 1000);
        let before = t.since_fired.clone();
        let worst = check(&t, &cc, &xt).unwrap();
        assert!(worst < 1e-4, "{worst}");
        assert_eq!(t.since_fired, before);
    }

    #[test]
    fn relative_error_sees_a_wrong_gradient() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &dev).unwrap();
        let b = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.5], (2, 2), &dev).unwrap();
        assert_eq!(rel_error(&a, &a).unwrap(), 0.0);
        let err = rel_error(&a, &b).unwrap();
        assert!((err - 0.5 / (1.0f64 + 4.0 + 9.0 + 20.25).sqrt()).abs() < 1e-9, "{err}");
        let z = a.zeros_like().unwrap();
        assert!((rel_error(&a, &z).unwrap() - 30f64.sqrt()).abs() < 1e-9);
    }
}
