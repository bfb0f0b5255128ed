//! Latent Scaling (DOMAIN.md §5b): for every latent j and target y, the closed-form
//! β_j = argmin_β Σ_i ‖y_i − β f_j(x_i) d_j‖² = (d_j · Σ_i f_ij y_i) / (‖d_j‖² Σ_i f_ij²), with
//! d_j the latent's chat decoder vector, streamed over the tokens of one or more caches; the
//! ratios ν_ε = β(base error) / β(chat error) and ν_r = β(base reconstruction) / β(chat
//! reconstruction); the effective chat-only set and its matched shared baseline.
//!
//! [`Accumulators`] holds per-latent sums only (O(F), whatever the number of tokens):
//! d_j · Σ_i f_ij y_i is the row-wise dot product of fᵀY (F, d) with the chat decoder D, computed
//! per batch, and the targets share two products per model, fᵀX and fᵀX̂:
//! - activation: B = Σ f ∘ (X Dᵀ);
//! - reconstruction: B = Σ f ∘ (X̂ Dᵀ);
//! - error with latent j's own contribution added back, y = x − (x̂ − f_j d_j^l):
//!   B = B_activation − B_reconstruction + (d_j^l · d_j) Σ f_j²;
//! - activation without bias, y = x − b^l: B = B_activation − (b^l · d_j) Σ f_j.

pub mod stage;

use candle_core::{DType, Result, Tensor};

use crate::train::crosscoder::{Crosscoder, encode_inference};

pub use stage::{ScaleParams, ScaleStage};

/// The targets, in table order; each exists for `base` and `chat`.
pub const TARGETS: [&str; 4] = ["reconstruction", "error", "activation", "activation_no_bias"];

/// Per-latent sums over the tokens seen so far, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Accumulators {
    pub f: usize,
    /// Σ f_j.
    pub sum_f: Vec<f64>,
    /// Σ f_j² (C_j).
    pub sum_f2: Vec<f64>,
    /// #{i: f_ij ≠ 0}.
    pub count_active: Vec<u64>,
    /// Σ f_ij (x^l_i · d_j), per model l.
    pub act: [Vec<f64>; 2],
    /// Σ f_ij (x̂^l_i · d_j), per model l.
    pub rec: [Vec<f64>; 2],
    pub tokens: u64,
}

impl Accumulators {
    pub fn new(f: usize) -> Accumulators {
        let z = || vec![0f64; f];
        Accumulators {
            f,
            sum_f: z(),
            sum_f2: z(),
            count_active: vec![0; f],
            act: [z(), z()],
            rec: [z(), z()],
            tokens: 0,
        }
    }

    /// Folds a batch x (n, 2, d) in (already normalised if the crosscoder was trained so).
    pub fn update(&mut self, cc: &Crosscoder, threshold: Option<f32>, x: &Tensor) -> Result<()> {
        let f = encode_inference(cc, threshold, x)?;
        let x_hat = cc.decode(&f)?;
        let n = x.dim(0)?;
        // Everything as matrix products (multi-threaded, no (n, F) temporaries beyond f):
        // column sums are 1ᵀ f; d_j · Σ_i f_ij y_i is the row-wise dot of fᵀY (F, d) with D.
        let dec_chat = cc.w_dec.as_tensor().get(1)?;
        let ft = f.t()?;
        let ones = Tensor::ones((1, n), DType::F32, f.device())?;
        let add = |acc: &mut Vec<f64>, t: Tensor| -> Result<()> {
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b as f64);
            Ok(())
        };
        add(&mut self.sum_f, ones.matmul(&f)?)?;
        add(&mut self.sum_f2, ones.matmul(&f.sqr()?)?)?;
        let active: Vec<f32> = ones.matmul(&f.ne(0.0)?.to_dtype(DType::F32)?)?.flatten_all()?.to_vec1()?;
        self.count_active.iter_mut().zip(active).for_each(|(a, b)| *a += b as u64);
        for l in 0..2 {
            let xl = x.narrow(1, l, 1)?.squeeze(1)?.contiguous()?;
            let xhl = x_hat.narrow(1, l, 1)?.squeeze(1)?.contiguous()?;
            add(&mut self.act[l], (ft.matmul(&xl)? * &dec_chat)?.sum(1)?)?;
            add(&mut self.rec[l], (ft.matmul(&xhl)? * &dec_chat)?.sum(1)?)?;
        }
        self.tokens += x.dim(0)? as u64;
        Ok(())
    }

    /// β per target and model, and the parts: `(nominator B, C = Σf², D = ‖d‖²)`.
    pub fn betas(&self, cc: &Crosscoder) -> Result<Betas> {
        let dec: Vec<Vec<Vec<f32>>> = cc.w_dec.as_tensor().to_vec3()?;
        let bias: Vec<Vec<f32>> = cc.b_dec.as_tensor().to_vec2()?;
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
        let norm_d: Vec<f64> = (0..self.f).map(|j| dot(&dec[1][j], &dec[1][j])).collect();
        let mut nominators: Vec<(String, Vec<f64>)> = Vec::new();
        for (l, model) in ["base", "chat"].iter().enumerate() {
            let act = &self.act[l];
            let rec = &self.rec[l];
            let err: Vec<f64> =
                (0..self.f).map(|j| act[j] - rec[j] + dot(&dec[l][j], &dec[1][j]) * self.sum_f2[j]).collect();
            let no_bias: Vec<f64> =
                (0..self.f).map(|j| act[j] - dot(&bias[l], &dec[1][j]) * self.sum_f[j]).collect();
            for (target, b) in TARGETS.iter().zip([rec.clone(), err, act.clone(), no_bias]) {
                nominators.push((format!("{model}_{target}"), b));
            }
        }
        let betas = nominators
            .iter()
            .map(|(name, b)| {
                (name.clone(), (0..self.f).map(|j| b[j] / (self.sum_f2[j] * norm_d[j])).collect::<Vec<f64>>())
            })
            .collect();
        Ok(Betas {
            betas,
            nominators,
            norm_f: self.sum_f2.clone(),
            norm_d,
            count_active: self.count_active.clone(),
        })
    }
}

/// β per `{model}_{target}` (see [`TARGETS`]) and the parts it is computed from.
#[derive(Clone, Debug)]
pub struct Betas {
    pub betas: Vec<(String, Vec<f64>)>,
    pub nominators: Vec<(String, Vec<f64>)>,
    /// C_j = Σ f_j².
    pub norm_f: Vec<f64>,
    /// D_j = ‖d_j‖².
    pub norm_d: Vec<f64>,
    pub count_active: Vec<u64>,
}

impl Betas {
    pub fn get(&self, name: &str) -> &[f64] {
        &self.betas.iter().find(|(n, _)| n == name).expect("a known target").1
    }

    /// β(base target) / β(chat target).
    pub fn ratio(&self, target: &str) -> Vec<f64> {
        let (b, c) = (self.get(&format!("base_{target}")), self.get(&format!("chat_{target}")));
        b.iter().zip(c).map(|(b, c)| b / c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::crosscoder::CodeNormalization;
    use candle_core::{Device, Var};

    fn small_crosscoder(seed: u64) -> Crosscoder {
        let mut cc =
            Crosscoder::init(3, 5, Some(0.8), CodeNormalization::Crosscoder, seed, &Device::Cpu).unwrap();
        // Make base and chat decoders differ, and give the decoder a bias.
        let w: Vec<f32> = (0..2 * 5 * 3).map(|i| (i * 31 % 13) as f32 / 13.0 - 0.4).collect();
        cc.w_dec = Var::from_tensor(&Tensor::from_vec(w, (2, 5, 3), &Device::Cpu).unwrap()).unwrap();
        cc.b_dec =
            Var::from_tensor(&Tensor::new(&[[0.1f32, -0.2, 0.3], [0.0, 0.5, -0.1]], &Device::Cpu).unwrap())
                .unwrap();
        cc.b_enc = Var::from_tensor(&Tensor::full(0.2f32, 5, &Device::Cpu).unwrap()).unwrap();
        cc
    }

    /// β from the accumulators equals the least-squares solution computed directly, token by
    /// token, for every target (the error target's latent-specific y included).
    #[test]
    fn betas_equal_direct_least_squares() {
        let cc = small_crosscoder(4);
        let n = 40;
        let x: Vec<f32> = (0..n * 6).map(|i| ((i as f32) * 0.731).sin() * 1.5).collect();
        let xt = Tensor::from_vec(x.clone(), (n, 2, 3), &Device::Cpu).unwrap();
        let mut acc = Accumulators::new(5);
        acc.update(&cc, None, &xt.narrow(0, 0, 17).unwrap()).unwrap();
        acc.update(&cc, None, &xt.narrow(0, 17, n - 17).unwrap()).unwrap();
        let betas = acc.betas(&cc).unwrap();

        let f: Vec<Vec<f32>> = encode_inference(&cc, None, &xt).unwrap().to_vec2().unwrap();
        let xh: Vec<Vec<Vec<f32>>> =
            cc.decode(&encode_inference(&cc, None, &xt).unwrap()).unwrap().to_vec3().unwrap();
        let dec: Vec<Vec<Vec<f32>>> = cc.w_dec.as_tensor().to_vec3().unwrap();
        let bias: Vec<Vec<f32>> = cc.b_dec.as_tensor().to_vec2().unwrap();
        for j in 0..5 {
            for (l, model) in ["base", "chat"].iter().enumerate() {
                for target in TARGETS {
                    // y_i per token, then β = Σ (f d)·y / Σ ‖f d‖².
                    let (mut num, mut den) = (0f64, 0f64);
                    for i in 0..n {
                        let fx = f[i][j] as f64;
                        let y: Vec<f64> = (0..3)
                            .map(|k| {
                                let xk = x[(i * 2 + l) * 3 + k] as f64;
                                let xhk = xh[i][l][k] as f64;
                                match target {
                                    "reconstruction" => xhk,
                                    "error" => xk - (xhk - fx * dec[l][j][k] as f64),
                                    "activation" => xk,
                                    _ => xk - bias[l][k] as f64,
                                }
                            })
                            .collect();
                        let fd: Vec<f64> = (0..3).map(|k| fx * dec[1][j][k] as f64).collect();
                        num += fd.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>();
                        den += fd.iter().map(|a| a * a).sum::<f64>();
                    }
                    let want = num / den;
                    let got = betas.get(&format!("{model}_{target}"))[j];
                    if den == 0.0 {
                        assert!(got.is_nan(), "latent {j} never fires: NaN");
                    } else {
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{model}_{target} latent {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Two chat-only latents: one whose direction is truly absent from the base model (ν_ε ≈ 0),
    /// one whose direction the base model has too, so the base error carries it (ν_ε ≈ 1:
    /// Complete Shrinkage).
    #[test]
    fn nu_error_separates_truly_chat_only_from_shrunk_latents() {
        let dev = Device::Cpu;
        let d = 4;
        let mut enc = vec![0f32; 2 * d * 2];
        enc[d * 2] = 1.0; // model 1 (chat), dim 0 -> latent 0
        enc[(d + 1) * 2 + 1] = 1.0; // chat, dim 1 -> latent 1
        let mut dec = vec![0f32; 2 * 2 * d];
        dec[2 * d] = 1.0; // chat decoder of latent 0 = e0
        dec[3 * d + 1] = 1.0; // chat decoder of latent 1 = e1
        let t = |v: Vec<f32>, s: &[usize]| Var::from_tensor(&Tensor::from_vec(v, s, &dev).unwrap()).unwrap();
        let cc = Crosscoder {
            w_enc: t(enc, &[2, d, 2]),
            b_enc: t(vec![0.0; 2], &[2]),
            w_dec: t(dec, &[2, 2, d]),
            b_dec: t(vec![0.0; 2 * d], &[2, d]),
            norm: CodeNormalization::Crosscoder,
            d,
            f: 2,
            matmul_dtype: DType::F32,
        };
        let mut x = Vec::new();
        for i in 0..50 {
            let a = 0.5 + (i % 7) as f32 * 0.3;
            let mut row = vec![0f32; 2 * d];
            if i % 2 == 0 {
                row[d] = a; // chat only: base has nothing
            } else {
                row[1] = a; // base has e1 too
                row[d + 1] = a;
            }
            x.extend(row);
        }
        let x = Tensor::from_vec(x, (50, 2, d), &dev).unwrap();
        let mut acc = Accumulators::new(2);
        acc.update(&cc, None, &x).unwrap();
        let b = acc.betas(&cc).unwrap();
        let nu_e = b.ratio("error");
        assert!(nu_e[0].abs() < 1e-6, "truly chat-only: ν_ε = {}", nu_e[0]);
        assert!((nu_e[1] - 1.0).abs() < 1e-6, "shrunk: ν_ε = {}", nu_e[1]);
        // Both are reconstructed only on the chat side: ν_r = 0.
        assert!(b.ratio("reconstruction").iter().all(|r| r.abs() < 1e-6));
    }
}
