//! Adam with PyTorch's semantics (no weight decay, no amsgrad), whose moments can be saved and
//! restored exactly: candle-nn's AdamW defaults weight decay to 0.01 and keeps its state private.
//!
//! Step t (1-based) with learning rate lr, as `torch.optim.Adam` (single-tensor path) computes it:
//! m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; denom = √v / √(1−β₂ᵗ) + ε;
//! p ← p − (lr / (1−β₁ᵗ)) · m / denom.

use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

use super::cpu::{host, with_host_mut};

/// The f32 constants of one Adam step as the fused updates use them, each rounded once from
/// f64: β₁, 1−β₁, β₂, 1−β₂, 1/√(1−β₂ᵗ), ε and lr/(1−β₁ᵗ).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FusedConstants {
    pub b1: f32,
    pub nb1: f32,
    pub b2: f32,
    pub nb2: f32,
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    pub step: f32,
}

pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken so far.
    pub t: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl Adam {
    pub fn new(params: &[&Var]) -> Result<Adam> {
        let zeros = |p: &&Var| p.as_tensor().zeros_like();
        Ok(Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One step over `params` with their `grads` (same order as at construction).
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            // Gradients of graphs through decoder norms carry an op history; moments that kept
            // it would chain every step's graph to the next (memory growing without bound).
            let g = g.detach();
            if self.step_fused_cpu(i, p, &g, lr, bc1, bc2)? || self.step_fused_cuda(i, p, &g, lr, bc1, bc2)? {
                continue;
            }
            let (p_new, m, v) =
                self.update_tensors(p.as_tensor(), &self.m[i], &self.v[i], &g, lr, bc1, bc2)?;
            p.set(&p_new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The step's update as candle tensor ops, on any device: the new parameter and moments.
    #[allow(clippy::too_many_arguments)]
    fn update_tensors(
        &self,
        p: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?.detach();
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
        let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
        let update = ((&m / &denom)? * (lr / bc1))?;
        Ok(((p.detach() - update)?.detach(), m, v))
    }

    /// The f32 constants of the fused updates (CPU and CUDA).
    fn fused_constants(&self, lr: f64, bc1: f64, bc2: f64) -> FusedConstants {
        let c = |x: f64| x as f32;
        FusedConstants {
            b1: c(self.beta1),
            nb1: c(1.0 - self.beta1),
            b2: c(self.beta2),
            nb2: c(1.0 - self.beta2),
            inv_sqrt_bc2: c(1.0 / bc2.sqrt()),
            eps: c(self.eps),
            step: c(lr / bc1),
        }
    }
}

impl Adam {
    /// The same update as the tensor ops of [`Adam::step`], in one parallel pass over each f32
    /// parameter on the CPU (about a dozen full-size temporaries fewer per parameter and step).
    /// Every operation is the one candle's ops perform, in the same order and precision (a
    /// scalar `* c` is `x · c + 0`, `/ c` is `x · (1/c) + 0`, `+ c` is `x · 1 + c`, with `c`
    /// rounded to f32), so the result is bit-identical. Parameter and moments are updated in place,
    /// without copies. Returns false (nothing done) elsewhere.
    fn step_fused_cpu(&mut self, i: usize, p: &Var, g: &Tensor, lr: f64, bc1: f64, bc2: f64) -> Result<bool> {
        let all_f32 = [p.as_tensor(), g, &self.m[i], &self.v[i]].iter().all(|t| t.dtype() == DType::F32);
        if !matches!(p.device(), Device::Cpu) || !all_f32 {
            return Ok(false);
        }
        let FusedConstants { b1, nb1, b2, nb2, inv_sqrt_bc2, eps, step } = self.fused_constants(lr, bc1, bc2);
        let (gs, gl) = g.storage_and_layout();
        let gv = host(&gs, gl, "gradient")?;
        // In place: the parameter and both moments are each written through their storage.
        with_host_mut(p.as_tensor(), |pv| {
            with_host_mut(&self.m[i], |mv| {
                with_host_mut(&self.v[i], |vv| {
                    if pv.len() != gv.len() || mv.len() != gv.len() || vv.len() != gv.len() {
                        candle_core::bail!("adam: parameter {i} and its gradient or moments differ in size");
                    }
                    const CHUNK: usize = 1 << 14;
                    pv.par_chunks_mut(CHUNK)
                        .zip(mv.par_chunks_mut(CHUNK))
                        .zip(vv.par_chunks_mut(CHUNK))
                        .zip(gv.par_chunks(CHUNK))
                        .for_each(|(((p, m), v), g)| {
                            for j in 0..p.len() {
                                let gj = g[j];
                                let mj = (m[j] * b1 + 0.0) + (gj * nb1 + 0.0);
                                let vj = (v[j] * b2 + 0.0) + ((gj * gj) * nb2 + 0.0);
                                let denom = (vj.sqrt() * inv_sqrt_bc2 + 0.0) * 1.0 + eps;
                                let update = (mj / denom) * step + 0.0;
                                p[j] -= update;
                                m[j] = mj;
                                v[j] = vj;
                            }
                        });
                    Ok(())
                })
            })
        })?;
        Ok(true)
    }
}

impl Adam {
    /// The CPU update of [`Adam::step_fused_cpu`] as one CUDA kernel (`train::cuda`), for f32
    /// parameters on a GPU; false (nothing done) elsewhere, in a build without the `cuda`
    /// feature, or with `PIPE_CUDA_KERNELS=0`. The kernel's first use in a process is checked
    /// against [`Adam::update_tensors`] on a slice of the step's real gradient; if they differ,
    /// or the kernel fails, kernels are off for the run (with a warning) and the tensor ops do
    /// the work.
    #[allow(unused_variables)]
    fn step_fused_cuda(
        &mut self,
        i: usize,
        p: &Var,
        g: &Tensor,
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> Result<bool> {
        #[cfg(feature = "cuda")]
        {
            use super::cuda;
            if !cuda::enabled() || !p.device().is_cuda() {
                return Ok(false);
            }
            static CHECKED: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
            if let Err(why) = CHECKED.get_or_init(|| self.check_cuda_kernel(g, lr, bc1, bc2)) {
                cuda::disable(why);
                return Ok(false);
            }
            let consts = self.fused_constants(lr, bc1, bc2);
            match cuda::adam_step(p.as_tensor(), &self.m[i], &self.v[i], g, &consts, None) {
                Ok(done) => Ok(done),
                Err(e) => {
                    cuda::disable(&format!("the Adam kernel failed: {e}"));
                    Ok(false)
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        Ok(false)
    }

    /// Runs the Adam kernel and the tensor ops on the first 2²⁰ entries of `g`, with made-up
    /// nonzero parameter and moments, on one thread block (so the kernel's grid-stride loop
    /// runs too), and compares the results.
    #[cfg(feature = "cuda")]
    fn check_cuda_kernel(&self, g: &Tensor, lr: f64, bc1: f64, bc2: f64) -> std::result::Result<(), String> {
        let check = || -> Result<Option<f32>> {
            let len = g.elem_count().min(1 << 20);
            let g = g.flatten_all()?.narrow(0, 0, len)?.copy()?;
            let p = ((&g * 3.0)? + 0.5)?;
            let m = (&g * 0.5)?;
            let v = (g.sqr()? + 1e-6)?;
            let (p_ref, m_ref, v_ref) = self.update_tensors(&p, &m, &v, &g, lr, bc1, bc2)?;
            let consts = self.fused_constants(lr, bc1, bc2);
            if !super::cuda::adam_step(&p, &m, &v, &g, &consts, Some(1))? {
                return Ok(None);
            }
            let mut worst = 0f32;
            for (got, want) in [(&p, &p_ref), (&m, &m_ref), (&v, &v_ref)] {
                let diff: f32 = (got - want)?.abs()?.max(0)?.to_scalar()?;
                let scale: f32 = want.abs()?.max(0)?.to_scalar()?;
                worst = worst.max(diff / scale.max(f32::MIN_POSITIVE));
            }
            Ok(Some(worst))
        };
        match check() {
            Ok(Some(worst)) if worst <= 1e-6 => Ok(()),
            Ok(Some(worst)) => {
                Err(format!("the Adam kernel differs from the tensor ops by {worst:e} (relative)"))
            }
            Ok(None) => Err("the Adam kernel did not run".into()),
            Err(e) => Err(format!("the Adam kernel's check failed: {e}")),
        }
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), applied when below 1). Returns the
/// norm before clipping.
///
/// Each gradient's squares are summed along its last dimension first, then those row sums in
/// f64: candle reduces with one GPU block per output value, so a single `sum_all` of the
/// encoder's gradient (L·d·F = 1.07G entries at the paper's sizes) would run on one streaming
/// multiprocessor.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        let sq = g.sqr()?;
        let rows = if sq.rank() >= 2 { sq.sum(candle_core::D::Minus1)? } else { sq };
        total += rows.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_closed_form_of_torch_adam() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut adam = Adam::new(&[&p]).unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        adam.step(&[&p], std::slice::from_ref(&g), 0.1).unwrap();
        // First step: m̂ = g, v̂ = g², update = lr · g / (|g| + ε) ≈ lr · sign(g).
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6, "{got:?}");
        // lr 0 changes nothing but the moments.
        adam.step(&[&p], &[g], 0.0).unwrap();
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), got);
        assert_eq!(adam.t, 2);
    }

    /// Moments never hold an autograd history, whatever the gradient carries (an L1 loss's
    /// gradients go through decoder norms and keep one): otherwise each step's graph stays
    /// alive through the next step's moments, and memory grows without bound.
    #[test]
    fn moments_hold_no_graph() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let w = Var::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        let mut adam = Adam::new(&[&p]).unwrap();
        for _ in 0..3 {
            // A gradient that is itself a function of a variable.
            let g = (w.as_tensor() * 2.0).unwrap();
            assert!(g.track_op());
            adam.step(&[&p], &[g], 0.1).unwrap();
            assert!(!adam.m[0].track_op() && !adam.v[0].track_op());
        }
    }

    /// The fused CPU pass and the tensor ops give the same bits, step after step.
    #[test]
    fn fused_cpu_step_is_bit_identical_to_the_tensor_ops() {
        let n = 3 * (1 << 14) + 7; // several chunks and a ragged one
        let init: Vec<f32> = (0..n).map(|j| ((j * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
        let p_fused = Var::from_vec(init.clone(), n, &Device::Cpu).unwrap();
        let p_ops = Var::from_vec(init, n, &Device::Cpu).unwrap();
        let mut fused = Adam::new(&[&p_fused]).unwrap();
        let mut ops = Adam::new(&[&p_ops]).unwrap();
        for step in 0..5 {
            let g: Vec<f32> =
                (0..n).map(|j| (((j + 31 * step) * 104_729 % 2001) as f32 - 1000.0) / 977.0).collect();
            let g = Tensor::from_vec(g, n, &Device::Cpu).unwrap();
            let lr = 1e-3 * (step + 1) as f64;
            fused.step(&[&p_fused], std::slice::from_ref(&g), lr).unwrap();
            // The tensor-op path, as on other devices: skip the fused one by hand.
            ops.t += 1;
            let (bc1, bc2) = (1.0 - ops.beta1.powi(ops.t as i32), 1.0 - ops.beta2.powi(ops.t as i32));
            let m = ((&ops.m[0] * ops.beta1).unwrap() + (&g * (1.0 - ops.beta1)).unwrap()).unwrap();
            let v =
                ((&ops.v[0] * ops.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - ops.beta2)).unwrap()).unwrap();
            let denom = ((v.sqrt().unwrap() / bc2.sqrt()).unwrap() + ops.eps).unwrap();
            let update = ((&m / &denom).unwrap() * (lr / bc1)).unwrap();
            p_ops.set(&(p_ops.as_tensor() - update).unwrap()).unwrap();
            ops.m[0] = m;
            ops.v[0] = v;
            let bits =
                |t: &Tensor| t.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(p_fused.as_tensor()), bits(p_ops.as_tensor()), "step {step}");
            assert_eq!(bits(&fused.m[0]), bits(&ops.m[0]));
            assert_eq!(bits(&fused.v[0]), bits(&ops.v[0]));
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a: f32 = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }
}
