//! The crosscoder of DOMAIN.md §2 as candle tensors with autograd: initialisation, encode and
//! decode, the L1 and BatchTopK losses (with the auxiliary loss and the inference threshold), and
//! the training metrics.
//!
//! Shapes: x (B, 2, d); `encoder.weight` (2, d, F); `encoder.bias` (F); `decoder.weight`
//! (2, F, d); `decoder.bias` (2, d). Model index 0 = base, 1 = chat.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// How latent activations are weighted by decoder norms (`code_normalization_id` in the state
/// dict: crosscoder 1, sae 2, mixed 3, none 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeNormalization {
    /// c_j = Σ_l ‖d_j^l‖ (the paper's).
    #[default]
    Crosscoder,
    /// c_j = ‖concat_l d_j^l‖.
    Sae,
    /// sae + 0.1 · crosscoder.
    Mixed,
    /// c_j = 1.
    None,
}

impl CodeNormalization {
    pub fn id(self) -> i64 {
        match self {
            CodeNormalization::Crosscoder => 1,
            CodeNormalization::Sae => 2,
            CodeNormalization::Mixed => 3,
            CodeNormalization::None => 4,
        }
    }

    pub fn from_id(id: i64) -> Option<Self> {
        Some(match id {
            1 => CodeNormalization::Crosscoder,
            2 => CodeNormalization::Sae,
            3 => CodeNormalization::Mixed,
            4 => CodeNormalization::None,
            _ => return None,
        })
    }
}

/// The four trainable tensors.
pub struct Crosscoder {
    pub w_enc: Var,
    pub b_enc: Var,
    pub w_dec: Var,
    pub b_dec: Var,
    pub norm: CodeNormalization,
    pub d: usize,
    pub f: usize,
    /// The dtype of the two large matmuls (encode, decode): f32, or bf16 as autocast does it
    /// (inputs cast down, results back to f32; the weights stay f32).
    pub matmul_dtype: DType,
}

impl Crosscoder {
    /// `a @ b` in [`Crosscoder::matmul_dtype`], returned in f32.
    fn mm(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.matmul_dtype == DType::F32 {
            return a.matmul(b);
        }
        a.to_dtype(self.matmul_dtype)?.matmul(&b.to_dtype(self.matmul_dtype)?)?.to_dtype(DType::F32)
    }

    /// DOMAIN.md §2 init: one (d, F) kaiming-uniform matrix (bound √(6/F), torch's fan_in of a 2-D
    /// tensor being its second size) for both models, columns scaled to norm `norm_init_scale`;
    /// decoder = encoder transposed; biases zero. Drawn from `seed` with SplitMix64.
    pub fn init(
        d: usize,
        f: usize,
        norm_init_scale: Option<f64>,
        norm: CodeNormalization,
        seed: u64,
        device: &Device,
    ) -> Result<Crosscoder> {
        let mut rng = SplitMix64::stream(seed, &[0x1417]);
        let bound = (6.0 / f as f64).sqrt();
        let mut w: Vec<f64> = (0..d * f).map(|_| (rng.next_f64() * 2.0 - 1.0) * bound).collect();
        if let Some(s) = norm_init_scale {
            for j in 0..f {
                let n: f64 = (0..d).map(|i| w[i * f + j].powi(2)).sum::<f64>().sqrt();
                (0..d).for_each(|i| w[i * f + j] *= s / n);
            }
        }
        let w: Vec<f32> = w.iter().map(|x| *x as f32).collect();
        let enc = Tensor::from_vec(w, (d, f), device)?;
        let w_enc = Tensor::stack(&[&enc, &enc], 0)?;
        let dec = enc.t()?.contiguous()?;
        let w_dec = Tensor::stack(&[&dec, &dec], 0)?;
        Ok(Crosscoder {
            w_enc: Var::from_tensor(&w_enc)?,
            b_enc: Var::from_tensor(&Tensor::zeros(f, DType::F32, device)?)?,
            w_dec: Var::from_tensor(&w_dec)?,
            b_dec: Var::from_tensor(&Tensor::zeros((2, d), DType::F32, device)?)?,
            norm,
            d,
            f,
            matmul_dtype: DType::F32,
        })
    }

    pub fn vars(&self) -> [&Var; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    /// State-dict names of [`Crosscoder::vars`], as dictionary_learning writes them.
    pub const NAMES: [&'static str; 4] = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"];

    /// ReLU(Σ_l x_l W_enc[l] + b_enc): (B, F).
    pub fn pre_relu(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let w = self.w_enc.as_tensor().reshape((2 * self.d, self.f))?;
        self.mm(&x.reshape((b, 2 * self.d))?, &w)?.broadcast_add(self.b_enc.as_tensor())?.relu()
    }

    /// The decoder as (F, 2d): row j is [d_j^base | d_j^chat].
    fn dec_flat(&self) -> Result<Tensor> {
        self.w_dec.as_tensor().transpose(0, 1)?.contiguous()?.reshape((self.f, 2 * self.d))
    }

    /// x̂ = f W_dec[l] + b_dec[l]: (B, 2, d).
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let b = f.dim(0)?;
        let bias = self.b_dec.as_tensor().reshape(2 * self.d)?;
        self.mm(f, &self.dec_flat()?)?.broadcast_add(&bias)?.reshape((b, 2, self.d))
    }

    /// f W_dec without the bias, flattened: (B, 2d).
    fn decode_no_bias_flat(&self, f: &Tensor) -> Result<Tensor> {
        self.mm(f, &self.dec_flat()?)
    }

    /// ‖W_dec[l, j, :]‖: (2, F).
    pub fn decoder_norms(&self) -> Result<Tensor> {
        self.w_dec.as_tensor().sqr()?.sum(D::Minus1)?.sqrt()
    }

    /// The code weights c: (F).
    pub fn code_weights(&self) -> Result<Tensor> {
        let per_model = self.decoder_norms()?;
        let sae = || self.w_dec.as_tensor().sqr()?.sum(D::Minus1)?.sum(0)?.sqrt();
        match self.norm {
            CodeNormalization::Crosscoder => per_model.sum(0),
            CodeNormalization::Sae => sae(),
            CodeNormalization::Mixed => sae()? + (per_model.sum(0)? * 0.1)?,
            CodeNormalization::None => Tensor::ones(self.f, DType::F32, self.w_dec.device()),
        }
    }
}

/// The codes analysis uses (DOMAIN.md §2, §5b): ReLU(pre) for an L1 crosscoder, and for a
/// BatchTopK one (`threshold` given) the inference path post · (post·c > threshold). Unscaled:
/// multiply by [`Crosscoder::code_weights`] for the original's `get_activations`.
pub fn encode_inference(cc: &Crosscoder, threshold: Option<f32>, x: &Tensor) -> Result<Tensor> {
    let post = cc.pre_relu(x)?;
    match threshold {
        Some(t) => {
            let scaled = post.broadcast_mul(&cc.code_weights()?)?;
            post * scaled.gt(t as f64)?.to_dtype(DType::F32)?
        }
        None => Ok(post),
    }
}

/// mean over (b, l) of ‖e[b, l, :]‖₂ (not squared), the reconstruction term of both losses.
pub fn recon_l2(x: &Tensor, x_hat: &Tensor) -> Result<Tensor> {
    (x - x_hat)?.sqr()?.sum(D::Minus1)?.sqrt()?.mean_all()
}

/// The L1 loss (DOMAIN.md §2a): recon + mu · mean_b Σ_j f_bj c_j. Returns (loss, recon, l1, f, x̂).
pub fn l1_loss(cc: &Crosscoder, x: &Tensor, mu: f64) -> Result<LossOut> {
    let f = cc.pre_relu(x)?;
    let c = cc.code_weights()?;
    let x_hat = cc.decode(&f)?;
    let recon = recon_l2(x, &x_hat)?;
    let l1 = f.broadcast_mul(&c)?.sum(1)?.mean_all()?;
    let loss = (&recon + (&l1 * mu)?)?;
    Ok(LossOut { loss, l2: recon, sparsity: Some(l1), auxk: None, f, x_hat })
}

/// What a loss returns: the differentiable total, its parts, the codes f (unscaled) and x̂.
pub struct LossOut {
    pub loss: Tensor,
    pub l2: Tensor,
    pub sparsity: Option<Tensor>,
    pub auxk: Option<Tensor>,
    pub f: Tensor,
    pub x_hat: Tensor,
}

/// Per row of `values` (R, N), all ≥ 0, the `k[r]`-th largest value (+∞ when k = 0, 0 when
/// k > N), exactly. On the CPU a selection; on CUDA the radix-select kernel of `train::cuda`
/// (cuda builds), its answer checked by [`kth_is_exact`]; otherwise, or if the kernel fails, a
/// bisection over the bit patterns, which order non-negative f32 like their values: compare and
/// count only, so it works on any device, where sorting wide rows does not.
pub fn kth_largest(values: &Tensor, k: &[u64]) -> Result<Vec<f32>> {
    #[cfg(feature = "cuda")]
    match super::cuda::kth_largest(values, k) {
        Ok(Some(kth)) => match kth_is_exact(values, k, &kth) {
            Ok(true) => return Ok(kth),
            Ok(false) => super::cuda::disable("its k-th value disagreed with a count of the values"),
            Err(e) => super::cuda::disable(&e.to_string()),
        },
        Ok(None) => {}
        Err(e) => super::cuda::disable(&e.to_string()),
    }
    if values.device().is_cpu() {
        // Same answer, one selection per row instead of 32 counting passes.
        let v: Vec<Vec<f32>> = values.to_vec2()?;
        return Ok(v
            .into_iter()
            .zip(k)
            .map(|(mut row, &k)| {
                if k == 0 {
                    f32::INFINITY
                } else if k as usize > row.len() {
                    0.0
                } else {
                    let at = k as usize - 1;
                    *row.select_nth_unstable_by(at, |a, b| b.total_cmp(a)).1
                }
            })
            .collect());
    }
    kth_largest_bisect(values, k)
}

/// Whether `kth[r]` is the `k[r]`-th largest value of row r of `values` (R, N), all ≥ 0: at least
/// k[r] entries are ≥ it and fewer than k[r] are above it (k = 0 or k > N: the conventions of
/// [`kth_largest`]). Two counting passes, which check a faster selection's answer.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kth_is_exact(values: &Tensor, k: &[u64], kth: &[f32]) -> Result<bool> {
    let (rows, n) = values.dims2()?;
    let at = |t: Vec<f32>| Tensor::from_vec(t, (rows, 1), values.device());
    // −0 is 0 (its bit pattern would make the next value up negative).
    let kth: Vec<f32> = kth.iter().map(|t| if *t == 0.0 { 0.0 } else { *t }).collect();
    let above: Vec<f32> = kth.iter().map(|t| f32::from_bits(t.to_bits().saturating_add(1))).collect();
    let ge = row_counts(&values.broadcast_ge(&at(kth.clone())?)?)?;
    let gt = row_counts(&values.broadcast_ge(&at(above)?)?)?;
    Ok((0..rows).all(|r| match k[r] {
        0 => kth[r] == f32::INFINITY,
        k if k > n as u64 => kth[r] == 0.0,
        k => ge[r] >= k && gt[r] < k && kth[r] >= 0.0,
    }))
}

/// The passes of the radix select that finds [`kth_largest`] on the GPU (`train::cuda`), most
/// significant digit first: (shift, mask of the bits already fixed, digit mask), 11 + 11 + 10
/// bits of the f32 bit pattern.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const RADIX_PASSES: [(u32, u32, u32); 3] =
    [(21, 0, 0x7ff), (10, 0xffe0_0000, 0x7ff), (0, 0xffff_fc00, 0x3ff)];

/// The radix select's host side, for any device that histograms: per row of (R, n) values, the
/// `k[r]`-th largest (the conventions of [`kth_largest`]), where `hist(prefix, pass)` returns
/// each row's 2048 bins (R × 2048) of the pass's digit among the entries matching its prefix.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn radix_select<E>(
    n: u64,
    k: &[u64],
    mut hist: impl FnMut(&[u32], (u32, u32, u32)) -> std::result::Result<Vec<u32>, E>,
) -> std::result::Result<Vec<f32>, E> {
    let (mut prefix, mut remaining) = (vec![0u32; k.len()], k.to_vec());
    for pass in RADIX_PASSES {
        let bins = hist(&prefix, pass)?;
        for r in 0..k.len() {
            if k[r] >= 1 && k[r] <= n {
                radix_step(&bins[r * 2048..(r + 1) * 2048], pass, &mut prefix[r], &mut remaining[r]);
            }
        }
    }
    Ok(k.iter()
        .zip(&prefix)
        .map(|(&k, p)| match k {
            0 => f32::INFINITY,
            k if k > n => 0.0,
            _ => f32::from_bits(*p),
        })
        .collect())
}

/// Folds one pass's histogram of a row (the digit's counts among the entries that match
/// `prefix`) into the search for the `remaining`-th largest of them: fixes the digit in `prefix`
/// and leaves in `remaining` the rank within that digit.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn radix_step(
    hist: &[u32],
    (shift, _, digit_mask): (u32, u32, u32),
    prefix: &mut u32,
    remaining: &mut u64,
) {
    let mut above = 0u64;
    for d in (0..=digit_mask as usize).rev() {
        let c = u64::from(hist[d]);
        if above + c >= *remaining {
            *prefix |= (d as u32) << shift;
            *remaining -= above;
            return;
        }
        above += c;
    }
}

/// [`kth_largest`] by bisection over bit patterns with compare-and-count passes (any device).
fn kth_largest_bisect(values: &Tensor, k: &[u64]) -> Result<Vec<f32>> {
    let (rows, _) = values.dims2()?;
    let device = values.device();
    let mut lo = vec![0u32; rows]; // count(v >= 0) = N >= k
    let mut hi = vec![0x7f80_0000u32; rows]; // count(v >= inf) = 0 < k
    for _ in 0..33 {
        if lo.iter().zip(&hi).all(|(l, h)| h - l <= 1) {
            break;
        }
        let mid: Vec<u32> = lo.iter().zip(&hi).map(|(l, h)| l + (h - l) / 2).collect();
        let t =
            Tensor::from_vec(mid.iter().map(|m| f32::from_bits(*m)).collect::<Vec<_>>(), (rows, 1), device)?;
        let counts = row_counts(&values.broadcast_ge(&t)?)?;
        for r in 0..rows {
            if hi[r] - lo[r] <= 1 {
                continue;
            }
            if counts[r] >= k[r] {
                lo[r] = mid[r];
            } else {
                hi[r] = mid[r];
            }
        }
    }
    Ok(lo.iter().zip(k).map(|(l, k)| if *k == 0 { f32::INFINITY } else { f32::from_bits(*l) }).collect())
}

/// The number of nonzero entries in each row of the 0/1 mask `mask` (R, N, u8).
///
/// candle reduces with one GPU block per output value, so the batch-level selection's counts
/// (one row of B·F = 268M entries at the paper's sizes, 31 passes a step) would each run on one
/// streaming multiprocessor. Rows that long are counted in [`COUNT_CHUNKS`] chunks each, whose
/// sums (u32, exact) are added on the host in u64. The counts are the same either way.
pub(crate) fn row_counts(mask: &Tensor) -> Result<Vec<u64>> {
    let (rows, n) = mask.dims2()?;
    let chunks = if rows < COUNT_CHUNKS && n >= COUNT_CHUNKS * 64 { COUNT_CHUNKS } else { 1 };
    row_counts_in(mask, chunks)
}

/// Chunks each long row of [`row_counts`] is counted in.
const COUNT_CHUNKS: usize = 1024;

/// [`row_counts`] with each row cut into `chunks` equal pieces (the remainder, shorter than
/// `chunks`, counted apart).
fn row_counts_in(mask: &Tensor, chunks: usize) -> Result<Vec<u64>> {
    let (rows, n) = mask.dims2()?;
    let sum_rows = |m: &Tensor| -> Result<Vec<u64>> {
        Ok(m.to_dtype(DType::U32)?.sum(1)?.to_vec1::<u32>()?.into_iter().map(u64::from).collect())
    };
    let len = n / chunks.max(1);
    if chunks <= 1 || len == 0 {
        return sum_rows(mask);
    }
    let main = mask.narrow(1, 0, len * chunks)?.contiguous()?.reshape((rows * chunks, len))?;
    let parts = sum_rows(&main)?;
    let mut counts: Vec<u64> = parts.chunks(chunks).map(|c| c.iter().sum()).collect();
    if len * chunks < n {
        let rest = sum_rows(&mask.narrow(1, len * chunks, n - len * chunks)?.contiguous()?)?;
        counts.iter_mut().zip(rest).for_each(|(c, r)| *c += r);
    }
    Ok(counts)
}

/// 0/1 mask of the entries of `values` (R, N) that are positive and among the `k` largest of
/// their row (`per_row`) or of the whole tensor: exactly `k` of them when at least `k` are
/// positive, ties at the boundary going to the lowest (row-major) indices, deterministically.
pub fn top_mask(values: &Tensor, k: u64, per_row: bool) -> Result<Tensor> {
    let v = values.detach();
    let (rows, n) = v.dims2()?;
    let flat = if per_row { v.clone() } else { v.reshape((1, rows * n))? };
    let groups = flat.dim(0)?;
    let kth = kth_largest(&flat, &vec![k; groups])?;
    let t = Tensor::from_vec(kth.clone(), (groups, 1), v.device())?;
    let ge = flat.broadcast_ge(&t)?;
    let counts = row_counts(&ge)?;
    let positive = flat.gt(0.0)?;
    let tied = (0..groups).any(|g| kth[g] > 0.0 && counts[g] > k);
    let mask = if tied {
        // Rare: drop the surplus entries equal to the k-th value, from the highest index down.
        let mut host: Vec<Vec<u8>> = ge.to_vec2()?;
        let vals: Vec<Vec<f32>> = flat.to_vec2()?;
        for g in 0..groups {
            let mut surplus = counts[g].saturating_sub(k);
            for i in (0..host[g].len()).rev() {
                if surplus == 0 || kth[g] <= 0.0 {
                    break;
                }
                if host[g][i] != 0 && vals[g][i] == kth[g] {
                    host[g][i] = 0;
                    surplus -= 1;
                }
            }
        }
        let width = host[0].len();
        Tensor::from_vec(host.concat(), (groups, width), v.device())?
    } else {
        ge
    };
    (mask.to_dtype(DType::F32)? * positive.to_dtype(DType::F32)?)?.reshape((rows, n))
}

/// BatchTopK settings and state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchTopK {
    pub k: u64,
    pub auxk_alpha: f64,
    /// A latent is dead once it has not fired for this many tokens.
    pub dead_tokens: u64,
    /// Tokens since each latent last fired.
    pub since_fired: Vec<u64>,
    /// Inference threshold on f·c (−1 until the first update).
    pub threshold: f32,
}

impl BatchTopK {
    /// Training encode + loss (DOMAIN.md §2b): keep the k·B largest scaled codes of the batch,
    /// reconstruct from the unscaled ones; the auxiliary loss over dead latents. Updates the
    /// dead-latent counters with this batch (before the dead set is taken).
    pub fn loss(&mut self, cc: &Crosscoder, x: &Tensor) -> Result<LossOut> {
        let b = x.dim(0)?;
        let post = cc.pre_relu(x)?;
        let c = cc.code_weights()?.detach();
        let scaled = post.broadcast_mul(&c)?;
        let mask = top_mask(&scaled, self.k * b as u64, false)?;
        let f = (&post * &mask)?;
        let x_hat = cc.decode(&f)?;
        let l2 = recon_l2(x, &x_hat)?;

        self.count_firing(&mask)?;
        let dead: Vec<f32> =
            self.since_fired.iter().map(|s| if *s >= self.dead_tokens { 1.0 } else { 0.0 }).collect();
        let n_dead = dead.iter().filter(|d| **d > 0.0).count();
        let auxk = if n_dead > 0 {
            let k_aux = (cc.d / 2).min(n_dead) as u64;
            let dead = Tensor::from_vec(dead, cc.f, x.device())?;
            let dead_scaled = scaled.broadcast_mul(&dead)?;
            let aux_mask = top_mask(&dead_scaled, k_aux, true)?;
            let x_aux = cc.decode_no_bias_flat(&(&post * &aux_mask)?)?;
            let r = (x - &x_hat)?.detach().reshape((b, 2 * cc.d))?;
            let num = (&r - &x_aux)?.sqr()?.sum(1)?.mean_all()?;
            let den = r.broadcast_sub(&r.mean_keepdim(0)?)?.sqr()?.sum(1)?.mean_all()?;
            let aux = (num / den)?;
            let value: f32 = aux.to_scalar()?;
            if value.is_finite() { aux } else { Tensor::new(0f32, x.device())? }
        } else {
            Tensor::new(0f32, x.device())?
        };
        let loss = (&l2 + (&auxk * self.auxk_alpha)?)?;
        Ok(LossOut { loss, l2, sparsity: None, auxk: Some(auxk), f, x_hat })
    }

    /// Folds a batch's codes `f` (B, F) into the dead-latent counters: a latent that is nonzero
    /// anywhere in the batch restarts at 0, the others age by B tokens.
    pub fn count_firing(&mut self, f: &Tensor) -> Result<()> {
        let b = f.dim(0)? as u64;
        let fired: Vec<u8> = f.ne(0.0)?.max(0)?.to_vec1()?;
        for (s, fired) in self.since_fired.iter_mut().zip(&fired) {
            *s = if *fired != 0 { 0 } else { *s + b };
        }
        Ok(())
    }

    /// The training (batch top-k) codes of `x`, unscaled, without touching any state.
    pub fn encode_topk(&self, cc: &Crosscoder, x: &Tensor) -> Result<Tensor> {
        let post = cc.pre_relu(x)?;
        let scaled = post.broadcast_mul(&cc.code_weights()?.detach())?;
        post * top_mask(&scaled, self.k * x.dim(0)? as u64, false)?
    }

    /// The threshold EMA (DOMAIN.md §2b), from the training codes `f` of a step.
    pub fn update_threshold(&mut self, cc: &Crosscoder, f: &Tensor) -> Result<()> {
        self.fold_threshold(min_positive_scaled(cc, f)?);
        Ok(())
    }

    /// The threshold EMA step with m, the batch's smallest positive f·c (0 if none).
    pub fn fold_threshold(&mut self, m: f32) {
        self.threshold = if self.threshold < 0.0 { m } else { 0.999 * self.threshold + 0.001 * m };
    }

    /// Inference encode: f = post where post·c > threshold.
    pub fn encode_threshold(&self, cc: &Crosscoder, x: &Tensor) -> Result<Tensor> {
        let post = cc.pre_relu(x)?;
        let scaled = post.broadcast_mul(&cc.code_weights()?)?;
        post * scaled.gt(self.threshold as f64)?.to_dtype(DType::F32)?
    }
}

/// The smallest positive entry of f·c over the batch (0 if none).
pub fn min_positive_scaled(cc: &Crosscoder, f: &Tensor) -> Result<f32> {
    let scaled = f.detach().broadcast_mul(&cc.code_weights()?.detach())?;
    // min over positive entries: replace non-positive by +inf.
    let positive = scaled.gt(0.0)?;
    let inf = Tensor::full(f32::INFINITY, scaled.shape(), scaled.device())?;
    let m = min_all(&positive.where_cond(&scaled, &inf)?)?;
    Ok(if m.is_finite() { m } else { 0.0 })
}

/// The smallest entry of the f32 tensor `t`, over chunks of [`COUNT_CHUNKS`] for a long one
/// (one GPU block per output value, as in [`row_counts`]).
fn min_all(t: &Tensor) -> Result<f32> {
    let flat = t.flatten_all()?;
    let n = flat.dim(0)?;
    if n < COUNT_CHUNKS * 64 {
        return flat.min(0)?.to_scalar();
    }
    let len = n / COUNT_CHUNKS;
    let main = flat.narrow(0, 0, len * COUNT_CHUNKS)?.reshape((COUNT_CHUNKS, len))?.min(1)?.min(0)?;
    let mut m: f32 = main.to_scalar()?;
    if len * COUNT_CHUNKS < n {
        m = m.min(flat.narrow(0, len * COUNT_CHUNKS, n - len * COUNT_CHUNKS)?.min(0)?.to_scalar()?);
    }
    Ok(m)
}

/// Optional activation normalisation (DOMAIN.md §3, dictionary_learning's NormalizableMixin):
/// x ↦ (x − μ) · s per (model, dimension), with s = target_rms / √(Σ σ² + 1e-8) for every entry
/// (`keep_relative_variance`) or 1 / (σ + 1e-8).
#[derive(Clone, Debug, PartialEq)]
pub struct Normalizer {
    /// (2, d) row-major.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The global scale (keep_relative_variance), else 1.0.
    pub global_scale: f32,
    pub keep_relative_variance: bool,
}

impl Normalizer {
    pub const TARGET_RMS: f32 = 1.0;

    pub fn new(mean: Vec<f32>, std: Vec<f32>, keep_relative_variance: bool) -> Normalizer {
        let total: f64 = std.iter().map(|s| (*s as f64).powi(2)).sum();
        let global_scale = if keep_relative_variance {
            (Self::TARGET_RMS as f64 / (total + 1e-8).sqrt()) as f32
        } else {
            1.0
        };
        Normalizer { mean, std, global_scale, keep_relative_variance }
    }

    /// Normalises rows of (2, d) in place.
    pub fn apply(&self, rows: &mut [f32]) {
        let width = self.mean.len();
        for row in rows.chunks_exact_mut(width) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
                *x = if self.keep_relative_variance {
                    (*x - m) * self.global_scale
                } else {
                    (*x - m) / (s + 1e-8)
                };
            }
        }
    }
}

/// Per-model geometric median of `x` (B, 2, d) by Weiszfeld's iteration, in f64: started at the
/// mean, at most 100 iterations, stopping once neither model's estimate moved by 1e-5 (as the
/// reference iterates both models together). Returns (2, d) row-major.
pub fn geometric_median(x: &[f32], b: usize, d: usize) -> Vec<f32> {
    let pts =
        |l: usize| -> Vec<&[f32]> { (0..b).map(|i| &x[(i * 2 + l) * d..(i * 2 + l + 1) * d]).collect() };
    let models = [pts(0), pts(1)];
    let mut y: Vec<Vec<f64>> = models
        .iter()
        .map(|p| (0..d).map(|k| p.iter().map(|r| r[k] as f64).sum::<f64>() / b as f64).collect())
        .collect();
    for _ in 0..100 {
        let mut moved = 0f64;
        for (l, p) in models.iter().enumerate() {
            let mut num = vec![0f64; d];
            let mut den = 0f64;
            for r in p {
                let dist = r.iter().zip(&y[l]).map(|(a, c)| (*a as f64 - c).powi(2)).sum::<f64>().sqrt();
                let w = 1.0 / dist.max(f64::MIN_POSITIVE);
                den += w;
                num.iter_mut().zip(r.iter()).for_each(|(n, a)| *n += *a as f64 * w);
            }
            let next: Vec<f64> = num.iter().map(|n| n / den).collect();
            moved = moved.max(next.iter().zip(&y[l]).map(|(a, c)| (a - c).powi(2)).sum::<f64>().sqrt());
            y[l] = next;
        }
        if moved < 1e-5 {
            break;
        }
    }
    y.iter().flatten().map(|v| *v as f32).collect()
}

/// Training and validation metrics of one batch (DOMAIN.md §4).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BatchStats {
    pub l0: f64,
    pub frac_variance_explained: f64,
    pub frac_variance_explained_base: f64,
    pub frac_variance_explained_chat: f64,
    /// Latents with no activation above 1e-4 (scaled) in the batch.
    pub frac_dead: f64,
}

/// L0, fraction of variance explained (total and per model; unbiased variance over the batch)
/// and the fraction of latents dead in the batch.
pub fn batch_stats(
    cc: &Crosscoder,
    x: &Tensor,
    x_hat: &Tensor,
    f: &Tensor,
) -> Result<(BatchStats, Vec<bool>)> {
    let l0: f32 = f.ne(0.0)?.to_dtype(DType::F32)?.sum(1)?.mean_all()?.to_scalar()?;
    let var = |t: &Tensor| -> Result<Vec<f32>> {
        // Var over the batch per (l, d), summed over d: (2).
        t.var_keepdim(0)?.squeeze(0)?.sum(D::Minus1)?.to_vec1()
    };
    let total = var(x)?;
    let resid = var(&(x - x_hat)?)?;
    let fve = |i: std::ops::Range<usize>| {
        1.0 - resid[i.clone()].iter().map(|v| *v as f64).sum::<f64>()
            / total[i].iter().map(|v| *v as f64).sum::<f64>()
    };
    let scaled = f.broadcast_mul(&cc.code_weights()?)?;
    let alive: Vec<u8> = scaled.gt(1e-4)?.max(0)?.to_vec1()?;
    let dead: Vec<bool> = alive.iter().map(|a| *a == 0).collect();
    let stats = BatchStats {
        l0: l0 as f64,
        frac_variance_explained: fve(0..2),
        frac_variance_explained_base: fve(0..1),
        frac_variance_explained_chat: fve(1..2),
        frac_dead: dead.iter().filter(|d| **d).count() as f64 / dead.len() as f64,
    };
    Ok((stats, dead))
}

/// Latents whose decoder is specific to model `l`: dec_norm_diff_l > 0.9 (DOMAIN.md §4).
pub fn specific_latents(cc: &Crosscoder) -> Result<[u64; 2]> {
    let n: Vec<Vec<f32>> = cc.decoder_norms()?.to_vec2()?;
    let mut out = [0u64; 2];
    for (nb, nc) in n[0].iter().zip(&n[1]) {
        let pair = [*nb as f64, *nc as f64];
        for l in 0..2 {
            let (nl, no) = (pair[l], pair[1 - l]);
            let diff = 0.5 * ((2.0 * nl - (nl + no)) / nl.max(no) + 1.0);
            if diff > 0.9 {
                out[l] += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device path (bisection over bit patterns) and the CPU path (selection) agree.
    #[test]
    fn bisection_equals_selection() {
        let dev = Device::Cpu;
        let vals: Vec<f32> =
            (0..7 * 300).map(|i| ((i * 2654435761u64 as usize) % 1000) as f32 / 37.0).collect();
        let v = Tensor::from_vec(vals, (7, 300), &dev).unwrap();
        let k = [1u64, 2, 17, 150, 299, 300, 0];
        assert_eq!(kth_largest(&v, &k).unwrap(), kth_largest_bisect(&v, &k).unwrap());
        // One row long enough to be counted in chunks, as the batch-level selection's is.
        let n = COUNT_CHUNKS * 64 + 11;
        let vals: Vec<f32> = (0..n).map(|i| ((i * 2654435761usize) % 100_003) as f32 / 7.0).collect();
        let v = Tensor::from_vec(vals, (1, n), &dev).unwrap();
        for k in [1u64, 1000, n as u64 / 3, n as u64] {
            assert_eq!(kth_largest(&v, &[k]).unwrap(), kth_largest_bisect(&v, &[k]).unwrap(), "k = {k}");
        }
    }

    /// The GPU's radix select, with the kernel's histograms computed here: the three passes
    /// find the k-th largest as a selection does, ties and zeros included; the count check
    /// accepts exactly the right answers.
    #[test]
    fn radix_passes_find_the_kth_largest_and_the_check_knows_it() {
        let n = 5000usize;
        let mut vals: Vec<f32> = (0..n).map(|i| ((i * 2654435761usize) % 9973) as f32 / 91.0).collect();
        vals[..300].iter_mut().for_each(|v| *v = 0.0);
        vals[300..320].iter_mut().for_each(|v| *v = 3.25);
        vals[320] = -0.0;
        vals[321] = f32::from_bits(1); // the smallest subnormal
        let mut sorted = vals.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let t = Tensor::from_vec(vals.clone(), (1, n), &Device::Cpu).unwrap();
        for k in [1u64, 2, 19, 20, 21, 777, 4678, 4679, 4680, 4700, n as u64] {
            let (mut prefix, mut remaining) = (0u32, k);
            for pass in RADIX_PASSES {
                let (shift, high, digit) = pass;
                let mut hist = vec![0u32; 2048];
                for v in &vals {
                    let bits = if v.to_bits() >> 31 != 0 { 0 } else { v.to_bits() };
                    if bits & high == prefix {
                        hist[((bits >> shift) & digit) as usize] += 1;
                    }
                }
                radix_step(&hist, pass, &mut prefix, &mut remaining);
            }
            let want = sorted[k as usize - 1].max(0.0);
            assert_eq!(f32::from_bits(prefix), want, "k = {k}");
            assert!(kth_is_exact(&t, &[k], &[want]).unwrap(), "k = {k}");
            let wrong = if want > 0.0 { f32::from_bits(want.to_bits() - 1) } else { 1e-3 };
            assert!(!kth_is_exact(&t, &[k], &[wrong]).unwrap(), "k = {k}: {wrong} accepted");
        }
        let two = Tensor::from_vec([vals.clone(), vals].concat(), (2, n), &Device::Cpu).unwrap();
        assert!(kth_is_exact(&two, &[0, n as u64 + 1], &[f32::INFINITY, 0.0]).unwrap());
        assert!(!kth_is_exact(&two, &[0, n as u64 + 1], &[0.0, 0.0]).unwrap());
    }

    /// Counting long rows in chunks gives the plain row sums, with and without a remainder, for
    /// one row and several.
    #[test]
    fn chunked_row_counts_are_the_row_sums() {
        let dev = Device::Cpu;
        for (rows, n) in
            [(1usize, 10_000usize), (1, 7 * 64), (3, 1000 * 7 + 5), (2, 5), (1, COUNT_CHUNKS * 64 + 3)]
        {
            let bits: Vec<u8> = (0..rows * n).map(|i| u8::from((i * 2654435761) % 7 < 3)).collect();
            let mask = Tensor::from_vec(bits.clone(), (rows, n), &dev).unwrap();
            let want: Vec<u64> = bits.chunks(n).map(|r| r.iter().map(|b| u64::from(*b)).sum()).collect();
            for chunks in [1, 2, 7, 64, 1000, n + 1] {
                assert_eq!(row_counts_in(&mask, chunks).unwrap(), want, "{rows}×{n} in {chunks}");
            }
            assert_eq!(row_counts(&mask).unwrap(), want, "{rows}×{n}");
        }
    }

    /// The chunked minimum is the minimum, wherever it lies (remainder included).
    #[test]
    fn min_all_finds_the_minimum_anywhere() {
        for n in [10usize, COUNT_CHUNKS * 64, COUNT_CHUNKS * 64 + 5] {
            for at in [0, n / 2, n - 1] {
                let mut v: Vec<f32> = (0..n).map(|i| 1.0 + (i % 97) as f32).collect();
                v[at] = 0.5;
                let t = Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap();
                assert_eq!(min_all(&t).unwrap(), 0.5, "n = {n}, at {at}");
            }
        }
    }

    #[test]
    fn kth_largest_is_exact_per_row_and_overall() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[0.0f32, 3.0, 1.5, 1.5, 7.0], [2.0, 0.0, 0.0, 0.25, 9.0]], &dev).unwrap();
        assert_eq!(kth_largest(&v, &[1, 1]).unwrap(), [7.0, 9.0]);
        assert_eq!(kth_largest(&v, &[3, 2]).unwrap(), [1.5, 2.0]);
        assert_eq!(kth_largest(&v, &[5, 5]).unwrap(), [0.0, 0.0]);
        let flat = v.reshape((1, 10)).unwrap();
        assert_eq!(kth_largest(&flat, &[4]).unwrap(), [2.0]);
        let m = top_mask(&v, 3, false).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, [[0.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0]]);
        // Only positive entries are ever kept.
        let m = top_mask(&v, 4, true).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, [[0.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0, 1.0]]);
        // Ties at the boundary: exactly k, the lowest indices first.
        let m = top_mask(&v, 2, true).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, [[0.0, 1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0]]);
        let m = top_mask(&v, 3, true).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, [[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 1.0]]);
    }

    #[test]
    fn batch_top_k_keeps_exactly_k_times_b() {
        // Many ties: values from a small set.
        let vals: Vec<f32> = (0..16 * 40).map(|i| ((i * 7919) % 5) as f32 * 0.5).collect();
        let v = Tensor::from_vec(vals.clone(), (16, 40), &Device::Cpu).unwrap();
        for k in [1u64, 3, 10, 25] {
            let m = top_mask(&v, k * 16, false).unwrap();
            let kept: f32 = m.sum_all().unwrap().to_scalar().unwrap();
            assert_eq!(kept as u64, k * 16, "k = {k}");
            // Every kept value is ≥ every dropped positive value.
            let m: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
            let min_kept =
                vals.iter().zip(&m).filter(|(_, m)| **m > 0.0).map(|(v, _)| *v).fold(f32::MAX, f32::min);
            let max_dropped =
                vals.iter().zip(&m).filter(|(_, m)| **m == 0.0).map(|(v, _)| *v).fold(0.0, f32::max);
            assert!(min_kept >= max_dropped);
            assert_eq!(
                top_mask(&v, k * 16, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                m
            );
        }
    }

    #[test]
    fn init_is_transposed_normalised_and_seeded() {
        let cc = Crosscoder::init(4, 16, Some(0.5), CodeNormalization::Crosscoder, 42, &Device::Cpu).unwrap();
        let enc: Vec<Vec<Vec<f32>>> = cc.w_enc.as_tensor().to_vec3().unwrap();
        let dec: Vec<Vec<Vec<f32>>> = cc.w_dec.as_tensor().to_vec3().unwrap();
        assert_eq!(enc[0], enc[1], "same init for both models");
        for j in 0..16 {
            let n: f32 = (0..4).map(|i| enc[0][i][j].powi(2)).sum::<f32>().sqrt();
            assert!((n - 0.5).abs() < 1e-6);
            for i in 0..4 {
                assert_eq!(dec[1][j][i], enc[1][i][j]);
            }
        }
        let again =
            Crosscoder::init(4, 16, Some(0.5), CodeNormalization::Crosscoder, 42, &Device::Cpu).unwrap();
        assert_eq!(again.w_enc.as_tensor().to_vec3::<f32>().unwrap(), enc);
        // c_j = Σ_l ‖d_j^l‖ = 2 · 0.5.
        let c: Vec<f32> = cc.code_weights().unwrap().to_vec1().unwrap();
        assert!(c.iter().all(|c| (c - 1.0).abs() < 1e-6), "{c:?}");
    }

    /// Central finite differences of the L1 and BatchTopK losses agree with autograd (BatchTopK
    /// with the selection fixed: the mask is piecewise constant).
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let (d, f, b) = (3, 8, 6);
        let x: Vec<f32> = (0..b * 2 * d).map(|i| ((i * 37 % 17) as f32 / 17.0 - 0.3) * 2.0).collect();
        let x = Tensor::from_vec(x, (b, 2, d), &dev).unwrap();
        for topk in [false, true] {
            let cc = Crosscoder::init(d, f, Some(0.7), CodeNormalization::Crosscoder, 3, &dev).unwrap();
            cc.b_enc.set(&Tensor::full(0.05f32, f, &dev).unwrap()).unwrap();
            let loss = |cc: &Crosscoder| -> f64 {
                if topk {
                    let mut t = BatchTopK {
                        k: 3,
                        auxk_alpha: 0.0,
                        dead_tokens: u64::MAX,
                        since_fired: vec![0; f],
                        threshold: -1.0,
                    };
                    t.loss(cc, &x).unwrap().loss.to_scalar::<f32>().unwrap() as f64
                } else {
                    l1_loss(cc, &x, 0.05).unwrap().loss.to_scalar::<f32>().unwrap() as f64
                }
            };
            let analytic = if topk {
                let mut t = BatchTopK {
                    k: 3,
                    auxk_alpha: 0.0,
                    dead_tokens: u64::MAX,
                    since_fired: vec![0; f],
                    threshold: -1.0,
                };
                t.loss(&cc, &x).unwrap().loss.backward().unwrap()
            } else {
                l1_loss(&cc, &x, 0.05).unwrap().loss.backward().unwrap()
            };
            for var in cc.vars() {
                let g: Vec<f32> =
                    analytic.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let w: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let shape = var.as_tensor().shape().clone();
                for i in (0..w.len()).step_by(3) {
                    let h = 1e-2f32;
                    let at = |delta: f32| {
                        let mut v = w.clone();
                        v[i] += delta;
                        var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap()).unwrap();
                        loss(&cc)
                    };
                    let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                    var.set(&Tensor::from_vec(w.clone(), shape.clone(), &dev).unwrap()).unwrap();
                    let err = (numeric - g[i] as f64).abs();
                    assert!(
                        err <= 2e-3 + 2e-2 * numeric.abs(),
                        "topk={topk} {i}: numeric {numeric} vs autograd {}",
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn auxiliary_loss_is_zero_without_dead_latents() {
        let dev = Device::Cpu;
        let cc = Crosscoder::init(4, 16, Some(1.0), CodeNormalization::Crosscoder, 1, &dev).unwrap();
        let x = Tensor::from_vec(
            (0..8 * 8).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            (8, 2, 4),
            &dev,
        )
        .unwrap();
        let mut t = BatchTopK {
            k: 2,
            auxk_alpha: 1.0 / 32.0,
            dead_tokens: 1_000,
            since_fired: vec![0; 16],
            threshold: -1.0,
        };
        let out = t.loss(&cc, &x).unwrap();
        assert_eq!(out.auxk.unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), out.l2.to_scalar::<f32>().unwrap());
        // Once latents are dead, it is positive.
        t.since_fired.iter_mut().for_each(|s| *s = 5_000);
        let out = t.loss(&cc, &x).unwrap();
        assert!(out.auxk.unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn normalizer_scales_to_unit_rms_or_z_scores() {
        let mean = vec![1.0, -1.0, 0.0, 2.0];
        let std = vec![2.0, 2.0, 1.0, 1.0];
        let n = Normalizer::new(mean.clone(), std.clone(), true);
        assert!((n.global_scale - 1.0 / 10f32.sqrt()).abs() < 1e-6);
        let mut row = vec![3.0, 1.0, 1.0, 3.0];
        n.apply(&mut row);
        let want: Vec<f32> = [2.0f32, 2.0, 1.0, 1.0].iter().map(|v| v * n.global_scale).collect();
        assert_eq!(row, want);
        let z = Normalizer::new(mean, std, false);
        let mut row = vec![3.0, 1.0, 1.0, 3.0];
        z.apply(&mut row);
        assert!(row.iter().zip([1.0, 1.0, 1.0, 1.0]).all(|(a, b)| (a - b).abs() < 1e-6), "{row:?}");
    }

    #[test]
    fn geometric_median_beats_the_mean_on_outliers() {
        // Three points at the origin, one far away, in both models.
        let d = 2;
        let mut x = vec![0f32; 4 * 2 * d];
        x[3 * 2 * d] = 100.0;
        x[3 * 2 * d + d] = 100.0;
        let m = geometric_median(&x, 4, d);
        assert!(m.iter().all(|v| v.abs() < 1e-3), "{m:?}");
    }
}
