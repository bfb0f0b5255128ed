//! Llama 3.x decoder (3.1, 3.2): GQA, RoPE with optional `llama3` frequency scaling, RMSNorm,
//! SwiGLU MLP, optionally tied embeddings.
//!
//! Follows Hugging Face transformers' `LlamaForCausalLM` (eager attention), see
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py>
//! and <https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json>. Unlike
//! candle-transformers' `llama`, the forward takes a padding mask (right padding: real tokens are
//! exact), returns every position, and can stop after any decoder block ([`Llama::forward_to_layer`])
//! or continue from one ([`Llama::forward_from_layer`]).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::common::{RotaryEmbedding, attention_bias, attention_probs, check_layer, linear, repeat_kv};

/// RoPE settings: the `rope_scaling` object of configs written by transformers 4 (with
/// `rope_theta` beside it), or the `rope_parameters` object of transformers 5 (with `rope_theta`
/// inside). Only the `default` and `llama3` types are supported.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct RopeParameters {
    /// `"default"` or `"llama3"`; also accepted under its older key `type`.
    #[serde(alias = "type", default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_type() -> String {
    "default".to_string()
}

impl RopeParameters {
    fn field(&self, name: &str, value: Option<f64>) -> Result<f32> {
        match value {
            Some(v) => Ok(v as f32),
            None => candle_core::bail!("rope type {:?} needs the field {name:?}", self.rope_type),
        }
    }

    /// Applies this scaling to plain RoPE inverse frequencies.
    fn scale(&self, inv_freq: Vec<f32>) -> Result<Vec<f32>> {
        match self.rope_type.as_str() {
            "default" => Ok(inv_freq),
            "llama3" => self.llama3(inv_freq),
            other => candle_core::bail!(
                "unsupported rope type {other:?}: only \"default\" and \"llama3\" are implemented"
            ),
        }
    }

    /// transformers' `_compute_llama3_parameters`, in f32.
    fn llama3(&self, inv_freq: Vec<f32>) -> Result<Vec<f32>> {
        let factor = self.field("factor", self.factor)?;
        let low = self.field("low_freq_factor", self.low_freq_factor)?;
        let high = self.field("high_freq_factor", self.high_freq_factor)?;
        let old_len = self.field(
            "original_max_position_embeddings",
            self.original_max_position_embeddings.map(|n| n as f64),
        )?;
        let low_freq_wavelen = old_len / low;
        let high_freq_wavelen = old_len / high;
        Ok(inv_freq
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                if medium {
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                }
            })
            .collect())
    }
}

/// The fields of a Llama `config.json` this forward uses (names as in the file).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in old configs: then multi-head attention (`num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Absent in old configs: then `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// transformers 4 configs; transformers 5 moves it into `rope_parameters`. Default 10000.
    pub rope_theta: Option<f64>,
    /// transformers 4 configs.
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5 configs.
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

impl Config {
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE inverse frequencies (f32, as transformers computes them), with the `llama3` scaling
    /// when the config asks for it.
    fn inv_freq(&self) -> Result<Vec<f32>> {
        let theta = rope_theta(self.rope_parameters.as_ref(), self.rope_theta);
        let inv_freq = RotaryEmbedding::default_inv_freq(self.head_dim(), theta);
        match self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) {
            Some(params) => params.scale(inv_freq),
            None => Ok(inv_freq),
        }
    }
}

/// `rope_theta` from transformers 5's `rope_parameters`, else the top-level field, else 10000.
pub(super) fn rope_theta(params: Option<&RopeParameters>, top_level: Option<f64>) -> f64 {
    params.and_then(|p| p.rope_theta).or(top_level).unwrap_or(10_000.0)
}

/// RMSNorm as transformers' `LlamaRMSNorm`: normalise in f32, cast back, then scale by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let var = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xs.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads());
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(h, nh * d, bias, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * d, bias, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * d, bias, vb.pp("v_proj"))?,
            o_proj: linear(nh * d, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    /// `mask`: additive (B, 1, T, T) f32 mask.
    fn forward(&self, xs: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = heads(self.q_proj.forward(xs)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(xs)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(xs)?, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rope.0, &rope.1)?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.0, &rope.1)?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = attention_probs(&scores, mask)?;
        let out = probs.matmul(&v)?;
        let out = out.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, bias, vb.pp("up_proj"))?,
            down_proj: linear(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::new(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(xs)?, rope, mask)?;
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// A Llama 3.x causal language model (`LlamaForCausalLM` weights).
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    dtype: DType,
}

impl Llama {
    /// Loads `LlamaForCausalLM` weights (`model.*`, `lm_head.weight` unless tied).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            candle_core::bail!(
                "unsupported hidden_act {:?} for llama: only \"silu\" is implemented",
                cfg.hidden_act
            );
        }
        if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads()) {
            candle_core::bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                cfg.num_attention_heads,
                cfg.num_key_value_heads()
            );
        }
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let rotary = RotaryEmbedding::new(&cfg.inv_freq()?, vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary, dtype: vb.dtype() })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.hidden_size()
    }

    /// Rows of the embedding matrix: every input id must be below it.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.embeddings().dim(0).unwrap_or(0)
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The residual stream after decoder block `layer` (0-based), shape (B, T, hidden_size): the
    /// block's output, as a forward hook on `model.layers[layer]` sees it, which is transformers'
    /// `hidden_states[layer + 1]` for every block but the last (whose `hidden_states` entry is
    /// after the final norm). Later blocks are not computed.
    ///
    /// `ids`: (B, T) u32 token ids. `attention_mask`: (B, T), 1 for real tokens, 0 for right
    /// padding (any integer or float dtype). Real tokens never attend to padding, so their
    /// activations do not depend on the padding; padded positions hold finite garbage.
    pub fn forward_to_layer(&self, ids: &Tensor, attention_mask: &Tensor, layer: usize) -> Result<Tensor> {
        check_layer(layer, self.num_layers())?;
        let (_, t) = ids.dims2()?;
        let mask = attention_bias(attention_mask, None)?;
        let rope = self.rotary.cos_sin(t, self.dtype)?;
        let mut xs = self.embed_tokens.forward(ids)?;
        for block in &self.layers[..=layer] {
            xs = block.forward(&xs, &rope, &mask)?;
        }
        Ok(xs)
    }

    /// Continues from the residual stream after block `layer` (as returned by
    /// [`Self::forward_to_layer`]) through the remaining blocks, the final norm and the LM head:
    /// logits (B, T, vocab_size).
    pub fn forward_from_layer(
        &self,
        resid: &Tensor,
        attention_mask: &Tensor,
        layer: usize,
    ) -> Result<Tensor> {
        check_layer(layer, self.num_layers())?;
        let (_, t, _) = resid.dims3()?;
        let mask = attention_bias(attention_mask, None)?;
        let rope = self.rotary.cos_sin(t, self.dtype)?;
        let mut xs = resid.clone();
        for block in &self.layers[layer + 1..] {
            xs = block.forward(&xs, &rope, &mask)?;
        }
        self.lm_head.forward(&self.norm.forward(&xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RoPE part of meta-llama/Llama-3.2-1B's config.json, as transformers 4 wrote it.
    const LLAMA_3_2_1B: &str = r#"{
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": true
    }"#;

    fn check_inv_freq(config: &str, expected: &[(usize, f32)]) {
        let cfg: Config = serde_json::from_str(config).unwrap();
        let inv_freq = cfg.inv_freq().unwrap();
        for &(i, want) in expected {
            let got = inv_freq[i];
            assert!((got - want).abs() <= 1e-6 * want, "inv_freq[{i}] = {got:e}, want {want:e}");
        }
    }

    /// Values printed by transformers 5.24's `ROPE_INIT_FUNCTIONS["llama3"]` for this config:
    /// high-frequency (0, 8), medium (16, 20) and low-frequency (24, 31) bands.
    const LLAMA3_INV_FREQ: [(usize, f32); 6] = [
        (0, 1.0),
        (8, 0.037_606_03),
        (16, 0.000_429_556_7),
        (20, 8.570_256e-6),
        (24, 1.661_967_4e-6),
        (31, 9.418_306_5e-8),
    ];

    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        check_inv_freq(LLAMA_3_2_1B, &LLAMA3_INV_FREQ);
    }

    #[test]
    fn transformers_5_rope_parameters_read_the_same() {
        let config = LLAMA_3_2_1B
            .replace(r#""rope_theta": 500000.0,"#, "")
            .replace("rope_scaling", "rope_parameters")
            .replace(r#""rope_type": "llama3""#, r#""rope_type": "llama3", "rope_theta": 500000.0"#);
        check_inv_freq(&config, &LLAMA3_INV_FREQ);
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let config = LLAMA_3_2_1B.replace(r#""rope_type": "llama3""#, r#""rope_type": "yarn""#);
        let cfg: Config = serde_json::from_str(&config).unwrap();
        let err = cfg.inv_freq().unwrap_err().to_string();
        assert!(err.contains("unsupported rope type \"yarn\""), "{err}");
    }
}
