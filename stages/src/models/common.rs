//! Building blocks both model families share: the additive attention mask (causal, padding,
//! sliding window), RoPE tables computed in f32, grouped-query head repetition.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

pub(super) fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias { candle_nn::linear(in_dim, out_dim, vb) } else { candle_nn::linear_no_bias(in_dim, out_dim, vb) }
}

pub(super) fn check_layer(layer: usize, num_layers: usize) -> Result<()> {
    if layer >= num_layers {
        candle_core::bail!(
            "layer {layer} is out of range: the model has {num_layers} decoder blocks, \
             numbered 0 to {}",
            num_layers.saturating_sub(1)
        );
    }
    Ok(())
}

/// The additive f32 attention mask, shape (B, 1, T, T): 0 where query `i` may attend key `j`
/// (`j <= i`, key `j` is a real token, and `i - j < window` when a sliding window is given, as in
/// transformers), `-f32::MAX` elsewhere. Finite rather than `-inf`, so a padded query whose
/// window holds only padding gets a uniform (finite) row instead of NaN.
pub(super) fn attention_bias(attention_mask: &Tensor, sliding_window: Option<usize>) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let window = sliding_window.unwrap_or(usize::MAX);
    let causal: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| f32::from(j <= i && i - j < window))).collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), attention_mask.device())?;
    let keys = attention_mask.to_dtype(DType::F32)?.ne(0f64)?.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
    let allowed = causal.broadcast_mul(&keys)?;
    (allowed - 1.0)? * f64::from(f32::MAX)
}

/// Softmax in f32 over the masked scores, cast back to the scores' dtype (transformers' eager
/// attention: `softmax(..., dtype=torch.float32).to(query.dtype)`).
pub(super) fn attention_probs(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)
}

/// (B, n_kv, T, D) -> (B, n_kv * n_rep, T, D), each kv head repeated `n_rep` times in a row
/// (transformers' `repeat_kv`).
pub(super) fn repeat_kv(xs: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (b, n_kv, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?.expand((b, n_kv, n_rep, t, d))?.reshape((b, n_kv * n_rep, t, d))
}

/// Rotary position embedding tables, computed in f32 whatever the model dtype and cast only at
/// the end, as transformers does. Positions are 0..T for every row (right padding).
#[derive(Debug, Clone)]
pub(super) struct RotaryEmbedding {
    /// (1, head_dim / 2) f32.
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    pub(super) fn new(inv_freq: &[f32], device: &Device) -> Result<Self> {
        let inv_freq = Tensor::from_slice(inv_freq, (1, inv_freq.len()), device)?;
        Ok(Self { inv_freq })
    }

    /// Plain RoPE: `1 / base^(2i / dim)`.
    pub(super) fn default_inv_freq(dim: usize, base: f64) -> Vec<f32> {
        let base = base as f32;
        (0..dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / dim as f32)).collect()
    }

    /// (cos, sin), each (T, head_dim / 2) in `dtype`, for candle's non-interleaved `rope`.
    pub(super) fn cos_sin(&self, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let positions =
            Tensor::arange(0u32, t as u32, self.inv_freq.device())?.to_dtype(DType::F32)?.reshape((t, 1))?;
        let freqs = positions.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}
