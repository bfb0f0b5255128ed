//! Adam with PyTorch's semantics (no weight decay, no amsgrad), whose moments can be saved and
//! restored exactly: candle-nn's AdamW defaults weight decay to 0.01 and keeps its state private.
//!
//! Step t (1-based) with learning rate lr, as `torch.optim.Adam` (single-tensor path) computes it:
//! m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; denom = √v / √(1−β₂ᵗ) + ε;
//! p ← p − (lr / (1−β₁ᵗ)) · m / denom.

use candle_core::{Result, Tensor, Var};

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
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = ((&m / &denom)? * (lr / bc1))?;
            p.set(&(p.as_tensor().detach() - update)?.detach())?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), applied when below 1). Returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
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
