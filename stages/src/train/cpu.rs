//! The training step on the CPU with hand-written gradients: the losses of DOMAIN.md §2a and §2b
//! computed directly on f32 slices instead of through candle's autograd.
//!
//! The autograd path ([`super::crosscoder`]) materialises every intermediate as a dense (B, F)
//! tensor and differentiates through each. Here:
//! - **BatchTopK** keeps k·B of the B·F codes, so only the encoder's forward product is dense.
//!   Decoding, the decoder's gradient, the codes' gradients and the encoder's gradient run over the
//!   kept entries only (k of F per token, as EleutherAI's `sparsify` does for TopK SAEs). The k·B-th
//!   value is found by a two-pass radix select over the bit patterns.
//! - **L1** codes are dense: the five matrix products are `gemm` calls (the crate candle's CPU
//!   matmul uses), and the element-wise parts are fused into single passes.
//!
//! Same losses, same selection (ties at the boundary to the lowest row-major index), same
//! dead-latent bookkeeping as the autograd path; the two agree to float rounding (tests below).
//! Every reduction runs in a fixed order over fixed chunks, so a step is deterministic on a given
//! machine and thread count (which exact resume relies on).

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::crosscoder::{BatchTopK, CodeNormalization, Crosscoder};

/// A step's loss, its parts, the gradients and what the metrics need.
pub struct CpuStep {
    pub loss: f32,
    pub l2: f32,
    pub sparsity: Option<f32>,
    pub auxk: Option<f32>,
    /// Gradients in [`Crosscoder::vars`] order, each row-major in its variable's shape.
    pub grads: [Vec<f32>; 4],
    /// x̂ (B, 2, d), row-major.
    pub x_hat: Vec<f32>,
    /// The training codes f (B, F), unscaled.
    pub codes: Codes,
    /// BatchTopK: the smallest positive f·c of the training codes (0 if none), for the threshold.
    pub min_scaled: Option<f32>,
}

/// The training codes of a step.
pub enum Codes {
    /// (B, F) row-major.
    Dense(Vec<f32>),
    Sparse(Sparse),
}

impl Codes {
    /// The codes as a dense (B, F) row-major buffer.
    pub fn to_dense(&self, b: usize, f: usize) -> Vec<f32> {
        match self {
            Codes::Dense(v) => v.clone(),
            Codes::Sparse(s) => {
                let mut out = vec![0f32; b * f];
                for r in 0..b {
                    for e in s.offsets[r]..s.offsets[r + 1] {
                        out[r * f + s.cols[e] as usize] = s.vals[e];
                    }
                }
                out
            }
        }
    }
}

/// Kept entries of a (B, F) matrix by row (CSR): row r holds `cols[offsets[r]..offsets[r + 1]]`
/// (ascending) with their `vals`.
#[derive(Debug, Default, PartialEq)]
pub struct Sparse {
    pub offsets: Vec<usize>,
    pub cols: Vec<u32>,
    pub vals: Vec<f32>,
}

impl Sparse {
    fn from_rows(rows: Vec<Vec<(u32, f32)>>) -> Sparse {
        let mut s = Sparse { offsets: Vec::with_capacity(rows.len() + 1), ..Sparse::default() };
        s.offsets.push(0);
        for row in rows {
            for (j, v) in row {
                s.cols.push(j);
                s.vals.push(v);
            }
            s.offsets.push(s.cols.len());
        }
        s
    }

    fn rows(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// Whether this path can run: the weights are f32 on the CPU and the matmuls in f32.
pub fn applies(cc: &Crosscoder) -> bool {
    cc.matmul_dtype == candle_core::DType::F32
        && cc.vars().iter().all(|v| v.device().is_cpu() && v.dtype() == candle_core::DType::F32)
}

/// A borrowed matrix: element (r, c) at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    fn t(self) -> Mat<'a> {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Mat<'a> {
        Mat { data, rows, cols, rs, cs: 1 }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), dst row-major with row stride
/// `dst_rs`, through the `gemm` crate on all of rayon's threads.
fn matmul(dst: &mut [f32], dst_rs: usize, accumulate: bool, lhs: Mat, rhs: Mat) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul inner sizes");
    assert!(lhs.fits() && rhs.fits(), "matmul operand out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul destination out of bounds");
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every index gemm touches, (i·rs + j·cs) for i < rows, j < cols, was checked above
    // to lie inside its slice; dst is borrowed mutably, the operands immutably, so none overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The contiguous f32 data of a CPU tensor's storage.
pub(crate) fn host<'a>(storage: &'a Storage, layout: &Layout, name: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("the CPU training step needs `{name}` as a contiguous f32 CPU tensor"),
    }
}

/// Runs `body` on the contiguous f32 data of a CPU tensor, writable in place (through candle's
/// in-place op, which holds the storage's write lock meanwhile).
pub(crate) fn with_host_mut(t: &Tensor, body: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    struct Op<F>(std::cell::RefCell<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> Result<()>> candle_core::InplaceOp1 for Op<F> {
        fn name(&self) -> &'static str {
            "pipe-host-mut"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let (CpuStorage::F32(v), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
                candle_core::bail!("an in-place CPU update needs a contiguous f32 tensor");
            };
            let body = self.0.borrow_mut().take().expect("called once");
            body(&mut v[a..b])
        }
    }
    t.inplace_op1(&Op(std::cell::RefCell::new(Some(body))))
}

/// The sum of per-chunk partial sums in chunk order: rayon's own `sum` combines partials in an
/// order that depends on work stealing, which would make float results vary from run to run.
fn ordered_sum(parts: impl IndexedParallelIterator<Item = f64>) -> f64 {
    parts.collect::<Vec<f64>>().iter().sum()
}

/// Scales the gradients so their global L2 norm is at most `max_norm`, as
/// [`super::adam::clip_grad_norm`] does (coefficient max_norm / (norm + 1e-6), applied when
/// below 1; the squares summed in f64). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let total: f64 = grads
        .iter()
        .map(|g| {
            ordered_sum(
                g.par_chunks(1 << 14).map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>()),
            )
        })
        .sum();
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        grads.iter_mut().for_each(|g| g.par_iter_mut().for_each(|v| *v *= coef));
    }
    norm
}

/// The crosscoder's weights, borrowed: `we` (2d, F), `be` (F), `wd` (2, F, d), `bd` (2d).
pub(super) struct Weights<'a> {
    we: &'a [f32],
    be: &'a [f32],
    wd: &'a [f32],
    bd: &'a [f32],
    d: usize,
    f: usize,
}

impl Weights<'_> {
    /// d_j^l, the decoder row of latent j for model l (length d).
    fn dec(&self, l: usize, j: usize) -> &[f32] {
        &self.wd[(l * self.f + j) * self.d..][..self.d]
    }
}

/// Runs `body` with the crosscoder's weights borrowed from their storage (no copy).
pub(super) fn with_weights<R>(cc: &Crosscoder, body: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = cc.vars().iter().map(|v| v.as_tensor().storage_and_layout()).collect();
    let s = |i: usize| host(&guards[i].0, guards[i].1, Crosscoder::NAMES[i]);
    let w = Weights { we: s(0)?, be: s(1)?, wd: s(2)?, bd: s(3)?, d: cc.d, f: cc.f };
    body(&w)
}

/// ReLU(x W_enc + b_enc), (B, F); NaN stays NaN.
fn encode(x: &[f32], b: usize, w: &Weights) -> Vec<f32> {
    let (width, f) = (2 * w.d, w.f);
    let mut post = vec![0f32; b * f];
    matmul(&mut post, f, false, Mat::rows(x, b, width), Mat::rows(w.we, width, f));
    post.par_chunks_mut(f).for_each(|row| {
        for (p, bias) in row.iter_mut().zip(w.be) {
            let v = *p + bias;
            *p = if v < 0.0 { 0.0 } else { v };
        }
    });
    post
}

/// Σ_k W_dec[l, j, k]² for each (l, j): (2F).
fn decoder_sq(w: &Weights) -> Vec<f32> {
    w.wd.par_chunks(w.d).map(|r| r.iter().map(|v| v * v).sum::<f32>()).collect()
}

/// The code weights c (F) from the squared decoder norms `sq` (2F).
fn code_weights(norm: CodeNormalization, sq: &[f32], f: usize) -> Vec<f32> {
    let per_model = |j: usize| sq[j].sqrt() + sq[f + j].sqrt();
    let sae = |j: usize| (sq[j] + sq[f + j]).sqrt();
    (0..f)
        .map(|j| match norm {
            CodeNormalization::Crosscoder => per_model(j),
            CodeNormalization::Sae => sae(j),
            CodeNormalization::Mixed => sae(j) + per_model(j) * 0.1,
            CodeNormalization::None => 1.0,
        })
        .collect()
}

/// A row's kept (column, value) pairs.
type Entries = Vec<(u32, f32)>;

/// Row chunks for a parallel pass over a (B, F) buffer: a few per thread, so per-chunk scratch
/// (the selection's histograms) stays small in number.
fn row_chunk(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// The bit pattern that orders non-negative floats like their values (NaN and ≤ 0 as 0).
fn key(v: f32) -> u32 {
    if v > 0.0 { v.to_bits() } else { 0 }
}

/// Sums per-chunk histograms of 2¹⁶ bins (integer counts: the order does not matter).
fn merge(hists: Vec<Vec<u32>>) -> Vec<u64> {
    let mut total = vec![0u64; 1 << 16];
    for h in hists {
        total.iter_mut().zip(h).for_each(|(t, h)| *t += u64::from(h));
    }
    total
}

/// The bin (from the top) in which the running count of `h` reaches `k`, and the count above it.
fn find_bin(h: &[u64], k: u64) -> (u32, u64) {
    let mut above = 0u64;
    for bin in (0..h.len()).rev() {
        if above + h[bin] >= k {
            return (bin as u32, above);
        }
        above += h[bin];
    }
    (0, above)
}

/// The `k` largest positive entries of s = post·c over the whole batch (ties at the k-th value to
/// the lowest row-major indices), as CSR of their unscaled values; and the smallest kept s.
///
/// The k-th value comes from a radix select over the bit patterns of s (which order like the
/// values, s ≥ 0): one pass builds the keys and a histogram of their upper 16 bits, a second
/// histograms the lower 16 bits within the bin that holds the k-th; then each row keeps its
/// entries above it, and the entries equal to it go to the lowest rows first.
fn select_batch(post: &[f32], c: &[f32], b: usize, k: u64) -> (Sparse, f32) {
    let f = c.len();
    let chunk = row_chunk(b) * f;
    let mut keys = vec![0u32; post.len()];
    let (high, zeros): (Vec<Vec<u32>>, Vec<u64>) = keys
        .par_chunks_mut(chunk)
        .zip(post.par_chunks(chunk))
        .map(|(keys, post)| {
            let mut h = vec![0u32; 1 << 16];
            let mut zeros = 0u64;
            for (krow, prow) in keys.chunks_mut(f).zip(post.chunks(f)) {
                for ((key_out, p), cj) in krow.iter_mut().zip(prow).zip(c) {
                    let bits = key(p * cj);
                    *key_out = bits;
                    h[(bits >> 16) as usize] += 1;
                    zeros += u64::from(bits == 0);
                }
            }
            (h, zeros)
        })
        .unzip();
    let high = merge(high);
    // Not `len − high[0]`: the lowest bin also holds the tiniest positive values.
    let positive = post.len() as u64 - zeros.iter().sum::<u64>();
    // Keep keys above `t`; the entries equal to `t` up to the quota (none when t = 0).
    let t = if positive <= k {
        0
    } else {
        let (hi, above) = find_bin(&high, k);
        let low: Vec<Vec<u32>> = keys
            .par_chunks(chunk)
            .map(|keys| {
                let mut h = vec![0u32; 1 << 16];
                keys.iter().filter(|v| *v >> 16 == hi).for_each(|v| h[(v & 0xffff) as usize] += 1);
                h
            })
            .collect();
        let (lo, _) = find_bin(&merge(low), k - above);
        (hi << 16) | lo
    };
    // Per row: the entries above t, and the columns equal to t (rarely more than a few).
    let rows: Vec<(Entries, Vec<u32>)> = keys
        .par_chunks(f)
        .zip(post.par_chunks(f))
        .map(|(krow, prow)| {
            let (mut above, mut tied) = (Vec::new(), Vec::new());
            for (j, (kv, p)) in krow.iter().zip(prow).enumerate() {
                if *kv > t {
                    above.push((j as u32, *p));
                } else if *kv == t && t > 0 {
                    tied.push(j as u32);
                }
            }
            (above, tied)
        })
        .collect();
    let mut quota = k.saturating_sub(rows.iter().map(|r| r.0.len() as u64).sum());
    let mut min = u32::MAX;
    let kept: Vec<Vec<(u32, f32)>> = rows
        .into_iter()
        .enumerate()
        .map(|(r, (above, tied))| {
            let take = (tied.len() as u64).min(quota) as usize;
            quota -= take as u64;
            if let Some(m) = above.iter().map(|(j, _)| keys[r * f + *j as usize]).min() {
                min = min.min(m);
            }
            if take == 0 {
                return above;
            }
            min = min.min(t);
            let mut row: Vec<(u32, f32)> = above
                .into_iter()
                .chain(tied[..take].iter().map(|j| (*j, post[r * f + *j as usize])))
                .collect();
            row.sort_unstable_by_key(|e| e.0);
            row
        })
        .collect();
    let min = if min == u32::MAX { 0.0 } else { f32::from_bits(min) };
    (Sparse::from_rows(kept), min)
}

/// Per row, the `k` largest positive s = post·c among the `dead` latents (ties to the lowest
/// index), as CSR of their unscaled values.
fn select_rows(post: &[f32], c: &[f32], dead: &[bool], k: usize) -> Sparse {
    let f = c.len();
    let dead: Vec<usize> = (0..f).filter(|&j| dead[j]).collect();
    let rows = post
        .par_chunks(f)
        .map(|row| {
            let cand: Vec<(u32, f32, f32)> =
                dead.iter().map(|&j| (j as u32, row[j], row[j] * c[j])).filter(|e| key(e.2) > 0).collect();
            if cand.len() <= k {
                return cand.into_iter().map(|(j, p, _)| (j, p)).collect();
            }
            let mut s: Vec<f32> = cand.iter().map(|e| e.2).collect();
            let t = *s.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1;
            let mut q = k - cand.iter().filter(|e| e.2 > t).count();
            cand.into_iter()
                .filter(|e| {
                    e.2 > t
                        || (e.2 == t && q > 0 && {
                            q -= 1;
                            true
                        })
                })
                .map(|(j, p, _)| (j, p))
                .collect()
        })
        .collect();
    Sparse::from_rows(rows)
}

/// Σ_j f_bj d_j (+ b_dec when `bias`): (B, 2d).
pub(super) fn decode_sparse(codes: &Sparse, w: &Weights, bias: bool) -> Vec<f32> {
    let (d, width) = (w.d, 2 * w.d);
    let mut out = vec![0f32; codes.rows() * width];
    out.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        for e in codes.offsets[r]..codes.offsets[r + 1] {
            let (j, v) = (codes.cols[e] as usize, codes.vals[e]);
            for l in 0..2 {
                row[l * d..][..d].iter_mut().zip(w.dec(l, j)).for_each(|(o, dv)| *o += v * dv);
            }
        }
        if bias {
            row.iter_mut().zip(w.bd).for_each(|(o, b)| *o += b);
        }
    });
    out
}

/// The reconstruction term of both losses, mean over (b, l) of ‖e_bl‖ with e = x − x̂; returns
/// (its value, e, its gradient with respect to x̂: −e_bl / (‖e_bl‖ · 2B), 0 where e_bl = 0).
fn recon(x: &[f32], x_hat: &[f32], b: usize, d: usize) -> (f32, Vec<f32>, Vec<f32>) {
    let e: Vec<f32> = x.par_iter().zip(x_hat).map(|(x, h)| x - h).collect();
    let norms: Vec<f32> = e.par_chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
    let n = (2 * b) as f32;
    let mut g = vec![0f32; e.len()];
    g.par_chunks_mut(d).zip(e.par_chunks(d)).zip(&norms).for_each(|((g, e), norm)| {
        if *norm > 0.0 {
            let s = -1.0 / (norm * n);
            g.iter_mut().zip(e).for_each(|(g, e)| *g = e * s);
        }
    });
    let l2 = (norms.iter().map(|v| *v as f64).sum::<f64>() / (2 * b) as f64) as f32;
    (l2, e, g)
}

/// For each kept entry (b, j): ⟨U_b, d_j⟩, the gradient of the code given U = ∂L/∂(decoder output).
pub(super) fn code_grads(codes: &Sparse, u: &[f32], w: &Weights) -> Vec<f32> {
    let (d, width) = (w.d, 2 * w.d);
    let rows: Vec<Vec<f32>> = (0..codes.rows())
        .into_par_iter()
        .map(|r| {
            let ur = &u[r * width..][..width];
            (codes.offsets[r]..codes.offsets[r + 1])
                .map(|e| {
                    let j = codes.cols[e] as usize;
                    (0..2).map(|l| dot(&ur[l * d..][..d], w.dec(l, j))).sum()
                })
                .collect()
        })
        .collect();
    rows.concat()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// The kept entries of several code matrices grouped by latent (CSC), in matrix then row order:
/// `(matrix, row, entry index)` for latent j at `entries[start[j]..start[j + 1]]`.
pub(super) struct ByLatent {
    pub(super) start: Vec<usize>,
    pub(super) entries: Vec<(u8, u32, u32)>,
}

impl ByLatent {
    pub(super) fn new(codes: &[&Sparse], f: usize) -> ByLatent {
        let mut start = vec![0usize; f + 1];
        for c in codes {
            c.cols.iter().for_each(|j| start[*j as usize + 1] += 1);
        }
        for j in 0..f {
            start[j + 1] += start[j];
        }
        let mut fill = start.clone();
        let mut entries = vec![(0u8, 0u32, 0u32); start[f]];
        for (m, c) in codes.iter().enumerate() {
            for r in 0..c.rows() {
                for e in c.offsets[r]..c.offsets[r + 1] {
                    let j = c.cols[e] as usize;
                    entries[fill[j]] = (m as u8, r as u32, e as u32);
                    fill[j] += 1;
                }
            }
        }
        ByLatent { start, entries }
    }
}

/// The sparse backward by latent j over the kept entries (b, j) of each code matrix m:
/// ∂L/∂d_j^l += f_bj · U_m[b, l] (U_m = ∂L/∂(decoder output) of matrix m) into `dwd` (2, F, d);
/// ∂L/∂W_enc[:, j] += g_bj · x_b (g_m = ∂L/∂pre at the entries) and ∂L/∂b_enc[j] += g_bj.
/// The encoder's columns are built as rows of its transpose (contiguous), then transposed.
#[allow(clippy::too_many_arguments)]
pub(super) fn sparse_backward(
    codes: &[&Sparse],
    upstream: &[&[f32]],
    dpre: &[&[f32]],
    x: &[f32],
    w: &Weights,
    dwd: &mut [f32],
    dwe: &mut [f32],
    dbe: &mut [f32],
) {
    sparse_backward_by(&ByLatent::new(codes, w.f), codes, upstream, dpre, x, w, dwd, dwe, dbe);
}

/// [`sparse_backward`] with the entries already grouped by latent (`by`, from `codes`).
#[allow(clippy::too_many_arguments)]
pub(super) fn sparse_backward_by(
    by: &ByLatent,
    codes: &[&Sparse],
    upstream: &[&[f32]],
    dpre: &[&[f32]],
    x: &[f32],
    w: &Weights,
    dwd: &mut [f32],
    dwe: &mut [f32],
    dbe: &mut [f32],
) {
    let (d, f, width) = (w.d, w.f, 2 * w.d);
    let mut dwe_t = vec![0f32; f * width];
    let (base, chat) = dwd.split_at_mut(f * d);
    base.par_chunks_mut(d)
        .zip(chat.par_chunks_mut(d))
        .zip(dwe_t.par_chunks_mut(width))
        .zip(dbe.par_iter_mut())
        .enumerate()
        .for_each(|(j, (((o0, o1), oe), ob))| {
            for &(m, r, e) in &by.entries[by.start[j]..by.start[j + 1]] {
                let (m, r, e) = (m as usize, r as usize, e as usize);
                let v = codes[m].vals[e];
                let ur = &upstream[m][r * width..][..width];
                o0.iter_mut().zip(&ur[..d]).for_each(|(o, u)| *o += v * u);
                o1.iter_mut().zip(&ur[d..]).for_each(|(o, u)| *o += v * u);
                let g = dpre[m][e];
                oe.iter_mut().zip(&x[r * width..][..width]).for_each(|(o, x)| *o += g * x);
                *ob += g;
            }
        });
    transpose(&dwe_t, f, width, dwe);
}

/// `out` (cols, rows) = `a` (rows, cols)ᵀ, by tiles.
fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    if rows == 0 || cols == 0 {
        return;
    }
    // Each task writes TILE rows of `out` (TILE columns of `a`), reading `a` TILE floats at a time.
    out.par_chunks_mut(rows * TILE).enumerate().for_each(|(blk, o)| {
        let (i0, n) = (blk * TILE, o.len() / rows);
        for r in 0..rows {
            for (i, v) in a[r * cols + i0..][..n].iter().enumerate() {
                o[i * rows + r] = *v;
            }
        }
    });
}

/// Σ_b of a (B, W) buffer by column: (W), in row order.
fn column_sums(v: &[f32], width: usize) -> Vec<f32> {
    const COLS: usize = 256;
    let mut out = vec![0f32; width];
    out.par_chunks_mut(COLS).enumerate().for_each(|(blk, o)| {
        for row in v.chunks_exact(width) {
            o.iter_mut().zip(&row[blk * COLS..]).for_each(|(o, v)| *o += v);
        }
    });
    out
}

/// The BatchTopK loss and its gradients (DOMAIN.md §2b) for the batch `x` (B, 2, d) row-major,
/// updating the dead-latent counters as [`BatchTopK::loss`] does.
pub fn batchtopk(t: &mut BatchTopK, cc: &Crosscoder, x: &[f32], b: usize) -> Result<CpuStep> {
    with_weights(cc, |w| {
        let (d, f, width) = (w.d, w.f, 2 * w.d);
        let post = encode(x, b, w);
        let c = code_weights(cc.norm, &decoder_sq(w), f);
        let (codes, min_scaled) = select_batch(&post, &c, b, t.k * b as u64);

        let mut fired = vec![false; f];
        codes.cols.iter().for_each(|j| fired[*j as usize] = true);
        for (s, fired) in t.since_fired.iter_mut().zip(&fired) {
            *s = if *fired { 0 } else { *s + b as u64 };
        }
        let dead: Vec<bool> = t.since_fired.iter().map(|s| *s >= t.dead_tokens).collect();
        let n_dead = dead.iter().filter(|d| **d).count();

        let x_hat = decode_sparse(&codes, w, true);
        let (l2, e, g) = recon(x, &x_hat, b, d);

        // The auxiliary loss: dead latents reconstruct the (detached) residual.
        let mut auxk = 0f32;
        let mut aux: Option<(Sparse, Vec<f32>)> = None;
        if n_dead > 0 {
            let aux_codes = select_rows(&post, &c, &dead, (d / 2).min(n_dead));
            let x_aux = decode_sparse(&aux_codes, w, false);
            let num = e.iter().zip(&x_aux).map(|(r, a)| ((r - a) as f64).powi(2)).sum::<f64>() / b as f64;
            let mean = column_sums(&e, width);
            let mean: Vec<f32> = mean.iter().map(|m| m / b as f32).collect();
            let den = e
                .chunks_exact(width)
                .map(|r| r.iter().zip(&mean).map(|(v, m)| ((v - m) as f64).powi(2)).sum::<f64>())
                .sum::<f64>()
                / b as f64;
            let value = (num / den) as f32;
            if value.is_finite() {
                auxk = value;
                let s = (-2.0 * t.auxk_alpha / (b as f64 * den)) as f32;
                let ga: Vec<f32> = e.iter().zip(&x_aux).map(|(r, a)| (r - a) * s).collect();
                aux = Some((aux_codes, ga));
            }
        }
        let loss = l2 + (auxk as f64 * t.auxk_alpha) as f32;

        // Backward over the kept entries (the relu passes them: each has post > 0).
        let dcodes = code_grads(&codes, &g, w);
        let daux = aux.as_ref().map(|(a, ga)| code_grads(a, ga, w));
        let (mut mats, mut ups, mut dpre): (Vec<&Sparse>, Vec<&[f32]>, Vec<&[f32]>) =
            (vec![&codes], vec![&g], vec![&dcodes]);
        if let (Some((a, ga)), Some(da)) = (&aux, &daux) {
            mats.push(a);
            ups.push(ga);
            dpre.push(da);
        }
        let mut dwd = vec![0f32; 2 * f * d];
        let mut dwe = vec![0f32; width * f];
        let mut dbe = vec![0f32; f];
        sparse_backward(&mats, &ups, &dpre, x, w, &mut dwd, &mut dwe, &mut dbe);
        let dbd = column_sums(&g, width);
        let nan = post.par_iter().any(|v| v.is_nan());
        Ok(CpuStep {
            loss: if nan { f32::NAN } else { loss },
            l2,
            sparsity: None,
            auxk: Some(auxk),
            grads: [dwe, dbe, dwd, dbd],
            x_hat,
            codes: Codes::Sparse(codes),
            min_scaled: Some(min_scaled),
        })
    })
}

/// The L1 loss and its gradients (DOMAIN.md §2a) for the batch `x` (B, 2, d) row-major: the
/// penalty's gradient reaches the decoder through the code weights.
pub fn l1(cc: &Crosscoder, x: &[f32], b: usize, mu: f64) -> Result<CpuStep> {
    with_weights(cc, |w| {
        let (d, f, width) = (w.d, w.f, 2 * w.d);
        let post = encode(x, b, w);
        let sq = decoder_sq(w);
        let c = code_weights(cc.norm, &sq, f);

        let mut x_hat = vec![0f32; b * width];
        for l in 0..2 {
            let dec = Mat::rows(&w.wd[l * f * d..][..f * d], f, d);
            matmul(&mut x_hat[l * d..], width, false, Mat::rows(&post, b, f), dec);
        }
        x_hat.par_chunks_mut(width).for_each(|r| r.iter_mut().zip(w.bd).for_each(|(o, b)| *o += b));
        let (l2, _, g) = recon(x, &x_hat, b, d);
        let penalty =
            ordered_sum(post.par_chunks(f).map(|r| r.iter().zip(&c).map(|(p, c)| p * c).sum::<f32>() as f64))
                / b as f64;
        let sparsity = penalty as f32;
        let loss = l2 + (penalty * mu) as f32;

        // ∂L/∂W_dec[l] = fᵀ G_l, plus the penalty through c: (mu / B) Σ_b f_bj · ∂c_j/∂d_j^l.
        let mut dwd = vec![0f32; 2 * f * d];
        for l in 0..2 {
            let gl = Mat::strided(&g[l * d..], b, d, width);
            matmul(&mut dwd[l * f * d..], d, false, Mat::rows(&post, b, f).t(), gl);
        }
        let sums = column_sums(&post, f);
        let scale = |sq: f32| if sq > 0.0 { 1.0 / sq.sqrt() } else { 0.0 };
        dwd.par_chunks_mut(d).zip(w.wd.par_chunks(d)).enumerate().for_each(|(lj, (o, wr))| {
            let j = lj % f;
            let per_model = scale(sq[lj]);
            let sae = scale(sq[j] + sq[f + j]);
            let dc = match cc.norm {
                CodeNormalization::Crosscoder => per_model,
                CodeNormalization::Sae => sae,
                CodeNormalization::Mixed => sae + 0.1 * per_model,
                CodeNormalization::None => return,
            };
            let a = (mu / b as f64) as f32 * sums[j] * dc;
            o.iter_mut().zip(wr).for_each(|(o, w)| *o += a * w);
        });

        // ∂L/∂pre = (G W_decᵀ + mu c / B) · 1[post > 0].
        let mut dpre = vec![0f32; b * f];
        for l in 0..2 {
            let gl = Mat::strided(&g[l * d..], b, d, width);
            let dec_t = Mat::rows(&w.wd[l * f * d..][..f * d], f, d).t();
            matmul(&mut dpre, f, l == 1, gl, dec_t);
        }
        let k = (mu / b as f64) as f32;
        dpre.par_chunks_mut(f).zip(post.par_chunks(f)).for_each(|(dr, pr)| {
            for ((g, p), cj) in dr.iter_mut().zip(pr).zip(&c) {
                *g = if *p > 0.0 { *g + k * cj } else { 0.0 };
            }
        });
        let mut dwe = vec![0f32; width * f];
        matmul(&mut dwe, f, false, Mat::rows(x, b, width).t(), Mat::rows(&dpre, b, f));
        let dbe = column_sums(&dpre, f);
        let dbd = column_sums(&g, width);
        Ok(CpuStep {
            loss,
            l2,
            sparsity: Some(sparsity),
            auxk: None,
            grads: [dwe, dbe, dwd, dbd],
            x_hat,
            codes: Codes::Dense(post),
            min_scaled: None,
        })
    })
}

/// The four gradients as tensors of the variables' shapes.
pub fn grad_tensors(cc: &Crosscoder, grads: [Vec<f32>; 4]) -> Result<Vec<Tensor>> {
    cc.vars().iter().zip(grads).map(|(v, g)| Tensor::from_vec(g, v.shape(), v.device())).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::Device;

    use super::*;

    /// B × 2 × d values uniform in [−1, 1) (shared with `train::sparse`'s tests).
    pub(in crate::train) fn batch(b: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..b * 2 * d).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
    }

    fn crosscoder(d: usize, f: usize, scale: f64, norm: CodeNormalization, seed: u64) -> Crosscoder {
        let dev = Device::Cpu;
        let cc = Crosscoder::init(d, f, Some(scale), norm, seed, &dev).unwrap();
        // Break the init's symmetries: distinct decoders per model, nonzero biases.
        let jitter = |t: &Tensor, s: u64| {
            let n = t.elem_count();
            let mut rng = crate::rng::SplitMix64::new(s);
            let noise: Vec<f32> = (0..n).map(|_| (rng.next_f64() - 0.5) as f32 * 0.2).collect();
            (t + Tensor::from_vec(noise, t.shape(), &dev).unwrap()).unwrap()
        };
        for (i, v) in cc.vars().iter().enumerate() {
            v.set(&jitter(v.as_tensor(), 100 + i as u64)).unwrap();
        }
        cc
    }

    /// Both paths' gradients, variable by variable, agree to `tol` of the largest magnitude.
    fn check_grads(auto: &candle_core::backprop::GradStore, cc: &Crosscoder, mine: &[Vec<f32>; 4], tol: f32) {
        for (i, v) in cc.vars().iter().enumerate() {
            let a: Vec<f32> = auto.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = a.iter().zip(&mine[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                worst <= tol * scale,
                "{}: max error {worst} vs max |grad| {scale}",
                Crosscoder::NAMES[i]
            );
        }
    }

    /// A fresh BatchTopK state (shared with `train::sparse`'s tests).
    pub(in crate::train) fn topk(k: u64, f: usize, dead_tokens: u64) -> BatchTopK {
        BatchTopK { k, auxk_alpha: 1.0 / 32.0, dead_tokens, since_fired: vec![0; f], threshold: -1.0 }
    }

    #[test]
    fn batchtopk_matches_autograd_with_and_without_dead_latents() {
        let (d, f, b) = (8, 64, 24);
        let x = batch(b, d, 1);
        let xt = Tensor::from_slice(&x, (b, 2, d), &Device::Cpu).unwrap();
        for norm in [CodeNormalization::Crosscoder, CodeNormalization::Sae, CodeNormalization::None] {
            for dead_tokens in [u64::MAX, 10] {
                let cc = crosscoder(d, f, 1.0, norm, 5);
                let (mut ta, mut tc) = (topk(4, f, dead_tokens), topk(4, f, dead_tokens));
                // Age half of the latents so some are dead.
                for t in [&mut ta, &mut tc] {
                    t.since_fired.iter_mut().step_by(2).for_each(|s| *s = 1000);
                }
                let auto = ta.loss(&cc, &xt).unwrap();
                let mine = batchtopk(&mut tc, &cc, &x, b).unwrap();
                assert_eq!(ta.since_fired, tc.since_fired, "{norm:?}");
                let f_auto: Vec<f32> = auto.f.flatten_all().unwrap().to_vec1().unwrap();
                let f_mine = mine.codes.to_dense(b, f);
                assert_eq!(
                    f_auto.iter().map(|v| *v != 0.0).collect::<Vec<_>>(),
                    f_mine.iter().map(|v| *v != 0.0).collect::<Vec<_>>(),
                    "the same entries kept ({norm:?})"
                );
                let aux: f32 = auto.auxk.as_ref().unwrap().to_scalar().unwrap();
                assert_eq!(aux > 0.0, dead_tokens == 10, "aux loss {aux}");
                assert!((aux - mine.auxk.unwrap()).abs() <= 1e-5 * aux.max(1.0));
                let loss: f32 = auto.loss.to_scalar().unwrap();
                assert!((loss - mine.loss).abs() <= 1e-5 * loss, "{loss} vs {}", mine.loss);
                check_grads(&auto.loss.backward().unwrap(), &cc, &mine.grads, 1e-4);
                let x_hat: Vec<f32> = auto.x_hat.flatten_all().unwrap().to_vec1().unwrap();
                assert!(x_hat.iter().zip(&mine.x_hat).all(|(a, b)| (a - b).abs() < 1e-5));
            }
        }
    }

    #[test]
    fn l1_matches_autograd_for_every_code_normalization() {
        let (d, f, b) = (8, 48, 20);
        let x = batch(b, d, 2);
        let xt = Tensor::from_slice(&x, (b, 2, d), &Device::Cpu).unwrap();
        for norm in [
            CodeNormalization::Crosscoder,
            CodeNormalization::Sae,
            CodeNormalization::Mixed,
            CodeNormalization::None,
        ] {
            let cc = crosscoder(d, f, 0.3, norm, 9);
            let auto = super::super::crosscoder::l1_loss(&cc, &xt, 0.2).unwrap();
            let mine = l1(&cc, &x, b, 0.2).unwrap();
            let loss: f32 = auto.loss.to_scalar().unwrap();
            assert!((loss - mine.loss).abs() <= 1e-5 * loss, "{norm:?}: {loss} vs {}", mine.loss);
            let sparsity: f32 = auto.sparsity.as_ref().unwrap().to_scalar().unwrap();
            assert!((sparsity - mine.sparsity.unwrap()).abs() <= 1e-5 * sparsity);
            check_grads(&auto.loss.backward().unwrap(), &cc, &mine.grads, 1e-4);
        }
    }

    /// Ties at the k·B-th value go to the lowest row-major indices, and exactly k·B are kept.
    #[test]
    fn batch_selection_keeps_exactly_k_b_with_ties_to_the_lowest_index() {
        let (b, f) = (6, 10);
        let post: Vec<f32> = (0..b * f).map(|i| ((i * 7) % 4) as f32 * 0.5).collect();
        let c = vec![1.0f32; f];
        for k in [1u64, 5, 13, 29, 40] {
            let (sel, min) = select_batch(&post, &c, b, k);
            let dense = Tensor::from_vec(post.clone(), (b, f), &Device::Cpu).unwrap();
            let mask: Vec<f32> = super::super::crosscoder::top_mask(&dense, k, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mine = Codes::Sparse(sel).to_dense(b, f);
            let kept = mine.iter().filter(|v| **v != 0.0).count() as u64;
            let positive = post.iter().filter(|v| **v > 0.0).count() as u64;
            assert_eq!(kept, k.min(positive), "k = {k}");
            assert_eq!(
                mine.iter().map(|v| *v != 0.0).collect::<Vec<_>>(),
                mask.iter().map(|m| *m != 0.0).collect::<Vec<_>>()
            );
            let want = post
                .iter()
                .zip(&mine)
                .filter(|(_, m)| **m != 0.0)
                .map(|(p, _)| *p)
                .fold(f32::INFINITY, f32::min);
            assert_eq!(min, want);
        }
    }

    #[test]
    fn radix_select_finds_the_kth_value() {
        let mut rng = crate::rng::SplitMix64::new(3);
        let post: Vec<f32> =
            (0..37 * 50).map(|_| if rng.next_f64() < 0.4 { 0.0 } else { rng.next_f64() as f32 }).collect();
        let c: Vec<f32> = (0..50).map(|j| 0.5 + j as f32 / 50.0).collect();
        let mut s: Vec<f32> = post.chunks(50).flat_map(|r| r.iter().zip(&c).map(|(p, c)| p * c)).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        for k in [1u64, 2, 100, 500, 1000] {
            let (sel, min) = select_batch(&post, &c, 37, k);
            assert_eq!(sel.cols.len() as u64, k);
            assert_eq!(min, s[k as usize - 1], "k = {k}");
        }
        // Subnormal values share the lowest upper-16-bit bin with the zeros.
        let tiny: Vec<f32> = (0..40).map(|i| if i % 4 == 0 { 0.0 } else { f32::from_bits(i) }).collect();
        let (sel, min) = select_batch(&tiny, &[1.0; 10], 4, 25);
        assert_eq!(sel.cols.len(), 25);
        assert_eq!(min, f32::from_bits(7), "the 25th largest of the 30 positive bit patterns");
    }
}
