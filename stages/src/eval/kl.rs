//! The arithmetic of the experiment: the patched residuals (DOMAIN.md §8), KL and NLL per token
//! row, and their sums per (intervention, subset).
//!
//! Patches are computed in f32 from the models' residuals (cast back to the model dtype by the
//! caller). The crosscoder sees (x_base, x_chat) as it was trained, normalised if it was; its
//! decoders are mapped back to the residual's scale, so a patch is
//! Σ_{j∈S} f_j (d_j^chat / s_chat − d_j^base / s_base) with s the normaliser's per-dimension scale
//! (1 without one). Codes are computed for `CHUNK` rows at a time, which bounds memory to
//! `CHUNK × F` floats whatever the batch.

use std::collections::BTreeMap;

use candle_core::{D, DType, Result, Tensor};

use super::sets::LatentSet;
use crate::train::crosscoder::{Crosscoder, Normalizer, encode_inference};

/// Rows of codes computed at once.
const CHUNK: usize = 1024;

/// log_softmax over the last dimension, in f32.
pub fn log_probs(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}

/// KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row of log-probabilities (M, V) (natural log,
/// torch's `kl_div(lq, lp, log_target=True)` summed over the vocabulary). Exactly 0 for equal rows.
pub fn kl_rows(lp: &Tensor, lq: &Tensor) -> Result<Vec<f32>> {
    (lp.exp()? * (lp - lq)?)?.sum(D::Minus1)?.to_vec1()
}

/// −log q(target) per row: `targets` (M,) u32.
pub fn nll_rows(lq: &Tensor, targets: &Tensor) -> Result<Vec<f32>> {
    lq.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?.to_vec1()
}

/// What a patch adds to a residual: Σ_{j∈S} f_j (d_j^chat − d_j^base) for S = every latent
/// (`None`) or one of the chat-only sets.
pub struct Patcher {
    cc: Crosscoder,
    threshold: Option<f32>,
    /// (1, 2, d): x ↦ (x − mean) · scale before encoding.
    norm: Option<(Tensor, Tensor)>,
    /// (F, d): d_j^chat / s_chat − d_j^base / s_base.
    diff: Tensor,
    /// (F,) 0/1 per set.
    masks: BTreeMap<LatentSet, Tensor>,
}

impl Patcher {
    pub fn new(
        cc: Crosscoder,
        threshold: Option<f32>,
        normalizer: Option<&Normalizer>,
        sets: &BTreeMap<LatentSet, Vec<u32>>,
    ) -> Result<Patcher> {
        let device = cc.w_dec.device().clone();
        let (f, d) = (cc.f, cc.d);
        let scale: Vec<f32> = match normalizer {
            Some(n) if n.keep_relative_variance => vec![n.global_scale; 2 * d],
            Some(n) => n.std.iter().map(|s| 1.0 / (s + 1e-8)).collect(),
            None => vec![1.0; 2 * d],
        };
        let norm = normalizer
            .map(|n| -> Result<(Tensor, Tensor)> {
                Ok((
                    Tensor::from_slice(&n.mean, (1, 2, d), &device)?,
                    Tensor::from_slice(&scale, (1, 2, d), &device)?,
                ))
            })
            .transpose()?;
        let w = cc.w_dec.as_tensor(); // (2, F, d)
        let inv = Tensor::from_vec(scale.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(), (2, 1, d), &device)?;
        let w = w.broadcast_mul(&inv)?;
        let diff = (w.get(1)? - w.get(0)?)?.contiguous()?;
        let masks = sets
            .iter()
            .map(|(set, ids)| {
                let mut m = vec![0f32; f];
                for &j in ids {
                    m[j as usize] = 1.0;
                }
                Ok((*set, Tensor::from_vec(m, (1, f), &device)?))
            })
            .collect::<Result<_>>()?;
        Ok(Patcher { cc, threshold, norm, diff, masks })
    }

    pub fn d(&self) -> usize {
        self.cc.d
    }

    /// The codes f (N, F) of residual rows (N, d) f32 of both models.
    pub fn codes(&self, x_base: &Tensor, x_chat: &Tensor) -> Result<Tensor> {
        let mut x = Tensor::stack(&[x_base, x_chat], 1)?;
        if let Some((mean, scale)) = &self.norm {
            x = x.broadcast_sub(mean)?.broadcast_mul(scale)?;
        }
        encode_inference(&self.cc, self.threshold, &x)
    }

    /// For each of `keys` (`None`: all latents), Σ_{j∈S} f_j (d_j^chat − d_j^base) for every row
    /// of (x_base, x_chat) (N, d) f32: (N, d) f32 each.
    pub fn deltas(
        &self,
        x_base: &Tensor,
        x_chat: &Tensor,
        keys: &[Option<LatentSet>],
    ) -> Result<BTreeMap<Option<LatentSet>, Tensor>> {
        let n = x_base.dim(0)?;
        let mut parts: BTreeMap<Option<LatentSet>, Vec<Tensor>> = BTreeMap::new();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let f = self.codes(&x_base.narrow(0, start, len)?, &x_chat.narrow(0, start, len)?)?;
            for key in keys {
                let fs = match key {
                    None => f.clone(),
                    Some(set) => f.broadcast_mul(&self.masks[set])?,
                };
                parts.entry(*key).or_default().push(fs.matmul(&self.diff)?);
            }
            start += len;
        }
        parts
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    k,
                    if v.is_empty() {
                        Tensor::zeros((0, self.cc.d), DType::F32, x_base.device())?
                    } else {
                        Tensor::cat(&v, 0)?
                    },
                ))
            })
            .collect()
    }
}

/// Running sums of one (intervention, subset).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    pub n: u64,
    pub kl: f64,
    pub kl2: f64,
    pub nll: f64,
    pub kl_base: f64,
}

/// Means of one (intervention, subset).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub tokens: u64,
    pub kl_mean: f64,
    /// The standard error of the mean KL: √(sample variance / n) (0 under two tokens).
    pub kl_stderr: f64,
    pub nll_mean: f64,
    pub kl_base_mean: f64,
}

impl Sums {
    pub fn add(&mut self, kl: f32, nll: f32, kl_base: f32) {
        let kl = kl as f64;
        self.n += 1;
        self.kl += kl;
        self.kl2 += kl * kl;
        self.nll += nll as f64;
        self.kl_base += kl_base as f64;
    }

    pub fn summary(&self) -> Summary {
        let n = self.n as f64;
        let mean = |s: f64| if self.n == 0 { f64::NAN } else { s / n };
        let stderr = if self.n < 2 {
            0.0
        } else {
            let var = ((self.kl2 - self.kl * self.kl / n) / (n - 1.0)).max(0.0);
            (var / n).sqrt()
        };
        Summary {
            tokens: self.n,
            kl_mean: mean(self.kl),
            kl_stderr: stderr,
            nll_mean: mean(self.nll),
            kl_base_mean: mean(self.kl_base),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::rng::SplitMix64;
    use crate::train::crosscoder::CodeNormalization;

    fn t(rows: &[&[f32]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn kl_of_identical_rows_is_exactly_zero() {
        let logits = t(&[&[1.0, -2.0, 0.5, 3.0], &[100.0, -100.0, 0.0, 7.0]]);
        let lp = log_probs(&logits).unwrap();
        assert_eq!(kl_rows(&lp, &lp).unwrap(), [0.0, 0.0]);
    }

    #[test]
    fn kl_and_nll_match_a_hand_computation() {
        let p = [0.5f64, 0.25, 0.25];
        let q = [0.25f64, 0.25, 0.5];
        let lp = log_probs(&t(&[&p.map(|x| x.ln() as f32)])).unwrap();
        let lq = log_probs(&t(&[&q.map(|x| (x.ln() + 3.0) as f32)])).unwrap(); // logits up to a constant
        // KL = ½ ln 2 + ¼ ln 1 + ¼ ln ½ = ¼ ln 2.
        let kl = kl_rows(&lp, &lq).unwrap()[0] as f64;
        assert!((kl - 0.25 * 2f64.ln()).abs() < 1e-6, "{kl}");
        let back = kl_rows(&lq, &lp).unwrap()[0] as f64; // ¼ ln ½ + ¼ ln 1 + ½ ln 2 = ¼ ln 2 too
        assert!((back - 0.25 * 2f64.ln()).abs() < 1e-6);
        let skew = log_probs(&t(&[&[0.9f64, 0.05, 0.05].map(|x| x.ln() as f32)])).unwrap();
        let want: f64 = [0.9f64, 0.05, 0.05].iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((kl_rows(&skew, &lq).unwrap()[0] as f64 - want).abs() < 1e-6);
        let targets = Tensor::new(&[2u32], &Device::Cpu).unwrap();
        let nll = nll_rows(&lq, &targets).unwrap()[0] as f64;
        assert!((nll - 2f64.ln()).abs() < 1e-6, "{nll}");
    }

    #[test]
    fn sums_give_mean_and_standard_error() {
        let mut s = Sums::default();
        for (kl, nll) in [(1.0, 2.0), (2.0, 2.0), (3.0, 5.0), (6.0, 3.0)] {
            s.add(kl, nll, 0.5);
        }
        let m = s.summary();
        // mean 3, sample variance (4 + 1 + 0 + 9) / 3.
        assert_eq!((m.tokens, m.kl_mean, m.nll_mean, m.kl_base_mean), (4, 3.0, 3.0, 0.5));
        assert!((m.kl_stderr - (14.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        assert!(Sums::default().summary().kl_mean.is_nan());
    }

    const DIM: usize = 5;
    const F: usize = 9;

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
    }

    fn crosscoder(rng: &mut SplitMix64, equal_decoders: bool) -> Crosscoder {
        let cc = Crosscoder::init(DIM, F, Some(1.0), CodeNormalization::Crosscoder, 5, &Device::Cpu).unwrap();
        let mut w = random(rng, 2 * F * DIM);
        if equal_decoders {
            let (base, chat) = w.split_at_mut(F * DIM);
            chat.copy_from_slice(base);
        }
        cc.w_dec.set(&Tensor::from_vec(w, (2, F, DIM), &Device::Cpu).unwrap()).unwrap();
        cc.b_enc.set(&Tensor::from_vec(random(rng, F), F, &Device::Cpu).unwrap()).unwrap();
        cc
    }

    #[test]
    fn equal_decoders_patch_nothing() {
        let mut rng = SplitMix64::new(3);
        let cc = crosscoder(&mut rng, true);
        let all: BTreeMap<_, _> = [(LatentSet::RankSumBest, (0..F as u32).collect())].into();
        let patcher = Patcher::new(cc, None, None, &all).unwrap();
        let n = 7;
        let xb = Tensor::from_vec(random(&mut rng, n * DIM), (n, DIM), &Device::Cpu).unwrap();
        let xc = Tensor::from_vec(random(&mut rng, n * DIM), (n, DIM), &Device::Cpu).unwrap();
        let deltas = patcher.deltas(&xb, &xc, &[None, Some(LatentSet::RankSumBest)]).unwrap();
        let f = patcher.codes(&xb, &xc).unwrap();
        assert!(f.sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "some latent fires");
        for delta in deltas.values() {
            let patched = (&xb + delta).unwrap();
            assert_eq!(patched.to_vec2::<f32>().unwrap(), xb.to_vec2::<f32>().unwrap());
        }
    }

    #[test]
    fn patches_follow_the_formula() {
        let set: Vec<u32> = vec![1, 4, 8];
        let sets: BTreeMap<_, _> = [(LatentSet::DecNormDiffWorst, set.clone())].into();
        let mean = random(&mut SplitMix64::new(5), 2 * DIM).iter().map(|x| x * 0.1).collect();
        let normalizer = Normalizer::new(mean, vec![2.0; 2 * DIM], false);
        for norm in [None, Some(&normalizer)] {
            let mut rng = SplitMix64::new(11);
            let cc = crosscoder(&mut rng, false);
            let w: Vec<f32> = cc.w_dec.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let patcher = Patcher::new(cc, Some(0.05), norm, &sets).unwrap();
            let n = 2 * CHUNK + 3; // several chunks
            let xb = Tensor::from_vec(random(&mut rng, n * DIM), (n, DIM), &Device::Cpu).unwrap();
            let xc = Tensor::from_vec(random(&mut rng, n * DIM), (n, DIM), &Device::Cpu).unwrap();
            let f = patcher.codes(&xb, &xc).unwrap().to_vec2::<f32>().unwrap();
            let deltas = patcher.deltas(&xb, &xc, &[None, Some(LatentSet::DecNormDiffWorst)]).unwrap();
            let scale = if norm.is_some() { 0.5f64 } else { 1.0 }; // 1 / (std + 1e-8)
            for (key, delta) in &deltas {
                let got = delta.to_vec2::<f32>().unwrap();
                for (i, row) in got.iter().enumerate() {
                    for (k, v) in row.iter().enumerate() {
                        let want: f64 = (0..F)
                            .filter(|j| key.is_none() || set.contains(&(*j as u32)))
                            .map(|j| {
                                f[i][j] as f64 * (w[(F + j) * DIM + k] as f64 - w[j * DIM + k] as f64) / scale
                            })
                            .sum();
                        assert!((*v as f64 - want).abs() < 1e-5, "{key:?} row {i} dim {k}: {v} vs {want}");
                    }
                }
            }
        }
    }
}
