//! Gemma 2 decoder: GQA, RoPE, RMSNorm with `(1 + w)` in f32 and four norms per block, attention
//! logit soft-capping, `query_pre_attn_scalar`, sliding-window attention on alternating blocks,
//! final logit soft-capping, `gelu_pytorch_tanh` MLP, embeddings scaled by `sqrt(hidden_size)`.
//!
//! Follows Hugging Face transformers' `Gemma2ForCausalLM` (eager attention), see
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma2/modeling_gemma2.py>
//! and <https://huggingface.co/google/gemma-2-2b/blob/main/config.json>. Unlike
//! candle-transformers' `gemma2`, the forward takes a padding mask (right padding: real tokens are
//! exact), returns every position, and can stop after any decoder block
//! ([`Gemma2::forward_to_layer`]) or continue from one ([`Gemma2::forward_from_layer`]).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::common::{RotaryEmbedding, attention_bias, attention_probs, check_layer, linear, repeat_kv};
use super::llama::{RopeParameters, rope_theta};

/// The fields of a Gemma 2 `config.json` this forward uses (names as in the file).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// transformers 4 configs; transformers 5 moves it into `rope_parameters`. Default 10000.
    pub rope_theta: Option<f64>,
    /// transformers 5 configs; only its `rope_theta` is used (Gemma 2 has plain RoPE).
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ^ -0.5` (not `head_dim ^ -0.5`).
    pub query_pre_attn_scalar: f64,
    /// Window of the sliding-window blocks; `null` means full attention everywhere.
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` or `"full_attention"` per block (newer transformers writes it).
    /// Absent: blocks 0, 2, 4, ... slide, as in transformers.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// The MLP activation; transformers reads `hidden_activation` and ignores `hidden_act`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

impl Config {
    /// Whether decoder block `layer` uses the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
            None => layer.is_multiple_of(2),
        }
    }

    fn activation(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh")
    }
}

/// Soft-capping: `cap * tanh(x / cap)`, or `x` when no cap is set.
fn soft_cap(xs: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(cap) => (xs / cap)?.tanh()? * cap,
        None => Ok(xs.clone()),
    }
}

/// Gemma's RMSNorm: normalise and scale by `(1 + w)` in f32, then cast back.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `1 + w`, f32.
    scale: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints_dtype(size, "weight", Default::default(), DType::F32)?;
        Ok(Self { scale: (weight + 1.0)?, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let var = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xs.broadcast_mul(&self.scale)?.to_dtype(dtype)
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
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(h, nh * d, bias, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * d, bias, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * d, bias, vb.pp("v_proj"))?,
            o_proj: linear(nh * d, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `mask`: additive (B, 1, T, T) f32 mask (with the window already applied on sliding blocks).
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
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = soft_cap(&scores, self.softcap)?;
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
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, i.e. `gelu_pytorch_tanh`.
        let gate = self.gate_proj.forward(xs)?.gelu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn new(cfg: &Config, sliding: bool, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let norm = |name: &str| RmsNorm::new(h, eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding,
        })
    }

    fn forward(&self, xs: &Tensor, rope: &(Tensor, Tensor), masks: &Masks) -> Result<Tensor> {
        let mask = if self.sliding { &masks.sliding } else { &masks.full };
        let attn = self.self_attn.forward(&self.input_layernorm.forward(xs)?, rope, mask)?;
        let xs = (xs + self.post_attention_layernorm.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&xs)?)?;
        xs + self.post_feedforward_layernorm.forward(&mlp)?
    }
}

/// The additive masks of one forward: full causal and sliding-window causal, both with padding.
struct Masks {
    full: Tensor,
    sliding: Tensor,
}

/// A Gemma 2 causal language model (`Gemma2ForCausalLM` weights; the LM head is always tied to
/// the embeddings).
#[derive(Debug, Clone)]
pub struct Gemma2 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    sliding_window: Option<usize>,
    final_logit_softcapping: Option<f64>,
    hidden_size: usize,
    dtype: DType,
}

impl Gemma2 {
    /// Loads `Gemma2ForCausalLM` weights (`model.*`).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        if cfg.activation() != "gelu_pytorch_tanh" {
            candle_core::bail!(
                "unsupported hidden_activation {:?} for gemma2: only \"gelu_pytorch_tanh\" is \
                 implemented",
                cfg.activation()
            );
        }
        if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            candle_core::bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
        let vb_m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, cfg.is_sliding(i), vb_m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = Linear::new(embed_tokens.embeddings().clone(), None);
        if let Some(params) = cfg.rope_parameters.as_ref().filter(|p| p.rope_type != "default") {
            candle_core::bail!("unsupported rope type {:?} for gemma2", params.rope_type);
        }
        let theta = rope_theta(cfg.rope_parameters.as_ref(), cfg.rope_theta);
        let inv_freq = RotaryEmbedding::default_inv_freq(cfg.head_dim, theta);
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(&inv_freq, vb.device())?,
            sliding_window: cfg.sliding_window,
            final_logit_softcapping: cfg.final_logit_softcapping,
            hidden_size: cfg.hidden_size,
            dtype: vb.dtype(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
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

    fn masks(&self, attention_mask: &Tensor) -> Result<Masks> {
        Ok(Masks {
            full: attention_bias(attention_mask, None)?,
            sliding: attention_bias(attention_mask, self.sliding_window)?,
        })
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
        let masks = self.masks(attention_mask)?;
        let rope = self.rotary.cos_sin(t, self.dtype)?;
        // transformers rounds the normaliser to the model dtype before multiplying.
        let normalizer =
            Tensor::new((self.hidden_size as f32).sqrt(), self.device())?.to_dtype(self.dtype)?;
        let mut xs = self.embed_tokens.forward(ids)?.broadcast_mul(&normalizer)?;
        for block in &self.layers[..=layer] {
            xs = block.forward(&xs, &rope, &masks)?;
        }
        Ok(xs)
    }

    /// Continues from the residual stream after block `layer` (as returned by
    /// [`Self::forward_to_layer`]) through the remaining blocks, the final norm, the tied LM head
    /// and the final soft-capping: logits (B, T, vocab_size).
    pub fn forward_from_layer(
        &self,
        resid: &Tensor,
        attention_mask: &Tensor,
        layer: usize,
    ) -> Result<Tensor> {
        check_layer(layer, self.num_layers())?;
        let (_, t, _) = resid.dims3()?;
        let masks = self.masks(attention_mask)?;
        let rope = self.rotary.cos_sin(t, self.dtype)?;
        let mut xs = resid.clone();
        for block in &self.layers[layer + 1..] {
            xs = block.forward(&xs, &rope, &masks)?;
        }
        let logits = self.lm_head.forward(&self.norm.forward(&xs)?)?;
        soft_cap(&logits, self.final_logit_softcapping)
    }
}
