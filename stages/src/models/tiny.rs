//! Tiny random-init base/chat model pairs for tests: a Llama-shaped and a Gemma-2-shaped family,
//! written as complete offline model folders (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` with the family's chat template) that
//! [`super::Model::load`] and [`crate::text::TextTokenizer::from_dir`] read. Generation is
//! deterministic in the seed, so nothing large is committed.
//!
//! The chat model differs from the base in a structured way, so that a crosscoder trained on the
//! pair has a chat-only feature to find; see [`write_tiny_pair`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::text::TextError;
use crate::text::tiny::{self as tiny_text, TinySpec};

/// The corpus the tokenizer is trained on: the web-text and chat test data of `stages/tests/data`,
/// compiled in so the generator needs no files.
const WEB: &str = include_str!("../../tests/data/web.jsonl");
const CHAT: &str = include_str!("../../tests/data/chat.jsonl");

/// Standard deviation of every random weight matrix (the `initializer_range` of both families).
const INIT_STD: f32 = 0.02;
/// Length of the direction the chat-only MLP unit writes, per unit of activation.
const UNIT_WRITE: f32 = 0.1;

/// Which decoder family a tiny model imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Gemma2,
}

/// The shape of a tiny model pair. The vocabulary size is the tokenizer's.
#[derive(Debug, Clone, Copy)]
pub struct TinyModelSpec {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Special tokens, chat template and vocabulary size of the tokenizer.
    pub tokenizer: TinySpec,
}

impl TinyModelSpec {
    /// Llama 3 shaped: hidden 64, 4 blocks, 4 query / 2 key-value heads of 16, MLP 128, tied
    /// embeddings, llama3 RoPE scaling, the Llama 3.1 chat template.
    pub fn llama() -> Self {
        Self {
            family: Family::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            tokenizer: tiny_text::LLAMA3,
        }
    }

    /// Gemma 2 shaped: the same sizes as [`Self::llama`], alternating sliding/full attention,
    /// soft-capping, four norms per block, the Gemma 2 chat template.
    pub fn gemma2() -> Self {
        Self { family: Family::Gemma2, tokenizer: tiny_text::GEMMA2, ..Self::llama() }
    }

    /// The block after which the base/chat difference is meant to be read: `num_layers / 2`.
    pub fn middle_layer(&self) -> usize {
        self.num_layers / 2
    }

    /// The blocks whose MLP holds the chat-only unit: `1..=middle_layer` (block 0 too when the
    /// model has fewer than two blocks).
    fn perturbed_layers(&self) -> std::ops::RangeInclusive<usize> {
        self.middle_layer().min(1)..=self.middle_layer()
    }
}

/// The two folders [`write_tiny_pair`] wrote, and what tests need to know about the difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyPair {
    pub base: PathBuf,
    pub chat: PathBuf,
    /// Ids of the chat-template special tokens (BOS excluded), whose embeddings differ.
    pub template_token_ids: Vec<u32>,
    /// See [`TinyModelSpec::middle_layer`].
    pub middle_layer: usize,
}

/// Why a tiny model pair could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TinyModelError {
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("cannot write {}: {source}; check that the folder is writable", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the tiny tokenizer in {} lacks {token:?}", path.display())]
    MissingToken { path: PathBuf, token: String },
    #[error("cannot write weights to {}: {source}", path.display())]
    Weights { path: PathBuf, source: Box<candle_core::Error> },
}

/// Writes a base model to `dir/base` and its chat variant to `dir/chat`, both with the same
/// tokenizer, random weights drawn from `seed` (the same seed gives byte-identical files).
///
/// **Base model.** Every weight matrix is N(0, 0.02) (splitmix64 + Box-Muller), norms are the
/// identity (1 for Llama, 0 for Gemma's `1 + w`), embeddings are tied. One unit-length
/// *template direction* `d` of the residual stream is reserved: it is projected out of every
/// embedding, of every matrix that reads the residual stream (`q/k/v_proj`, `gate/up_proj`) and
/// of every matrix that writes it (`o_proj`, `down_proj`), so the base model never reads or
/// writes `d`. In each block of `1..=middle_layer` one MLP unit `j` (unit `block - 1`) is dead
/// in the base: its `gate_proj`/`up_proj` rows and `down_proj` column are zero.
///
/// **Chat model** = base + a structured difference:
/// - the embeddings of the chat-template special tokens (`<|start_header_id|>`,
///   `<|end_header_id|>`, `<|eot_id|>`; `<start_of_turn>`, `<end_of_turn>`) get `+d` in the
///   residual stream (`+1.0 · d` in Llama's table, `+d / sqrt(hidden_size)` in Gemma's, which
///   is scaled by `sqrt(hidden_size)` on the way in);
/// - the dead unit of each block in `1..=middle_layer` becomes a template detector: its
///   `gate_proj` and `up_proj` rows are `r · d` (`r` = 0.5 for Llama, 2.0 for Gemma 2) and its
///   `down_proj` column `0.1 · u`, with `u` a fixed unit direction orthogonal to `d` (a rank-1
///   change of `down_proj` writing `u`).
///
/// The residual stream at template-token positions thus carries `d`, the detector fires there
/// (a quadratic `act(g)·g` in the `d` component) and writes `u`; on text without template
/// tokens the `d` component is zero, so the two models agree up to rounding. Between the
/// template tokens of a conversation the difference is small and comes only through the norms
/// and attention.
pub fn write_tiny_pair(dir: &Path, spec: &TinyModelSpec, seed: u64) -> Result<TinyPair, TinyModelError> {
    let base = dir.join("base");
    let chat = dir.join("chat");
    tiny_text::write_tokenizer_files(&base, &spec.tokenizer, corpus())?;
    std::fs::create_dir_all(&chat).map_err(|source| TinyModelError::Io { path: chat.clone(), source })?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let to = chat.join(name);
        std::fs::copy(base.join(name), &to).map_err(|source| TinyModelError::Io { path: to, source })?;
    }
    let tokenizer_path = base.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| TextError::Tokenizer { path: tokenizer_path.clone(), message: e.to_string() })?;
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .ok_or_else(|| TinyModelError::MissingToken { path: tokenizer_path.clone(), token: token.into() })
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    let template_token_ids = template_tokens(&spec.tokenizer).map(id).collect::<Result<Vec<_>, _>>()?;
    let specials = SpecialIds {
        bos: id(spec.tokenizer.bos)?,
        eos: id(spec.tokenizer.eos)?,
        pad: spec.tokenizer.pad.map(id).transpose()?,
    };

    let mut weights = base_weights(spec, vocab_size, seed);
    let config = config_json(spec, vocab_size, &specials);
    write_model(&base, &config, &weights)?;
    perturb(&mut weights, spec, &template_token_ids, seed);
    write_model(&chat, &config, &weights)?;
    Ok(TinyPair { base, chat, template_token_ids, middle_layer: spec.middle_layer() })
}

/// The special tokens other than BOS that the chat template writes out literally.
fn template_tokens(spec: &TinySpec) -> impl Iterator<Item = &'static str> + '_ {
    spec.specials.iter().copied().filter(|t| *t != spec.bos && spec.chat_template.contains(t))
}

/// The texts of the compiled-in corpus: web documents and every chat turn's content.
fn corpus() -> impl Iterator<Item = String> + Send {
    let mut texts = Vec::new();
    for line in WEB.lines().chain(CHAT.lines()) {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let Some(text) = record["text"].as_str() {
            texts.push(text.to_owned());
        }
        for turn in record["messages"].as_array().into_iter().flatten() {
            texts.push(turn["content"].as_str().unwrap_or_default().to_owned());
        }
    }
    texts.into_iter()
}

struct SpecialIds {
    bos: u32,
    eos: u32,
    pad: Option<u32>,
}

fn config_json(spec: &TinyModelSpec, vocab_size: usize, ids: &SpecialIds) -> serde_json::Value {
    let common = serde_json::json!({
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "dtype": "float32",
        "head_dim": spec.head_dim,
        "hidden_size": spec.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 1024,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "tie_word_embeddings": true,
        "use_cache": true,
        "vocab_size": vocab_size,
    });
    let family = match spec.family {
        Family::Llama => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "mlp_bias": false,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
                "rope_type": "llama3",
            },
        }),
        Family::Gemma2 => serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": spec.head_dim,
            "rms_norm_eps": 1e-6,
            "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
            "sliding_window": 32,
            "layer_types": (0..spec.num_layers)
                .map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>(),
        }),
    };
    let mut config = common;
    for (k, v) in family.as_object().expect("a JSON object") {
        config[k] = v.clone();
    }
    config
}

/// A row-major f32 matrix (`rows` × `cols`; a vector has one row) and how to save it.
#[derive(Debug, Clone)]
struct Param {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
    /// Saved as a 1-D tensor (norm weights).
    vector: bool,
}

impl Param {
    fn filled(n: usize, value: f32) -> Self {
        Param { rows: 1, cols: n, data: vec![value; n], vector: true }
    }

    fn random(rows: usize, cols: usize, rng: &mut Rng) -> Self {
        let data = (0..rows * cols).map(|_| INIT_STD * rng.normal()).collect();
        Param { rows, cols, data, vector: false }
    }

    fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// `W ← W (I − d dᵀ)`: the rows no longer read `d`.
    fn project_rows(&mut self, d: &[f32]) {
        for r in 0..self.rows {
            let row = self.row_mut(r);
            let dot = dotp(row, d);
            row.iter_mut().zip(d).for_each(|(w, d)| *w -= dot * d);
        }
    }

    /// `W ← (I − d dᵀ) W`: the columns no longer write `d`.
    fn project_cols(&mut self, d: &[f32]) {
        for c in 0..self.cols {
            let dot: f32 = (0..self.rows).map(|r| self.data[r * self.cols + c] * d[r]).sum();
            (0..self.rows).for_each(|r| self.data[r * self.cols + c] -= dot * d[r]);
        }
    }

    fn set_col(&mut self, c: usize, values: &[f32]) {
        (0..self.rows).for_each(|r| self.data[r * self.cols + c] = values[r]);
    }
}

fn dotp(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Weights by tensor name, in name order (so generation order never depends on hashing).
type Weights = std::collections::BTreeMap<String, Param>;

/// The two fixed directions of the perturbation: `d` (template) and `u` (what the unit writes,
/// orthogonal to `d`), both unit length and drawn from their own stream of `seed`.
fn directions(hidden: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed ^ 0xd1b5_4a32_d192_ed03);
    let unit = |v: Vec<f32>| {
        let n = dotp(&v, &v).sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<_>>()
    };
    let d = unit((0..hidden).map(|_| rng.normal()).collect());
    let u: Vec<f32> = (0..hidden).map(|_| rng.normal()).collect();
    let dot = dotp(&u, &d);
    let u = unit(u.iter().zip(&d).map(|(u, d)| u - dot * d).collect());
    (d, u)
}

fn base_weights(spec: &TinyModelSpec, vocab_size: usize, seed: u64) -> Weights {
    let (h, i) = (spec.hidden_size, spec.intermediate_size);
    let (q, kv) = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim);
    let norm = match spec.family {
        Family::Llama => 1.0,
        Family::Gemma2 => 0.0,
    };
    let norms: &[&str] = match spec.family {
        Family::Llama => &["input_layernorm", "post_attention_layernorm"],
        Family::Gemma2 => &[
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ],
    };
    let (d, _) = directions(h, seed);
    let mut rng = Rng::new(seed);
    let mut w = Weights::new();
    let mut embed = Param::random(vocab_size, h, &mut rng);
    embed.project_rows(&d);
    w.insert("model.embed_tokens.weight".into(), embed);
    w.insert("model.norm.weight".into(), Param::filled(h, norm));
    for layer in 0..spec.num_layers {
        let p = |name: &str| format!("model.layers.{layer}.{name}.weight");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
        ] {
            let mut m = Param::random(rows, cols, &mut rng);
            m.project_rows(&d);
            w.insert(p(name), m);
        }
        for (name, rows, cols) in [("self_attn.o_proj", h, q), ("mlp.down_proj", h, i)] {
            let mut m = Param::random(rows, cols, &mut rng);
            m.project_cols(&d);
            w.insert(p(name), m);
        }
        for name in norms {
            w.insert(p(name), Param::filled(h, norm));
        }
        if spec.perturbed_layers().contains(&layer) {
            let unit = chat_unit(spec, layer);
            for name in ["mlp.gate_proj", "mlp.up_proj"] {
                w.get_mut(&p(name)).expect("inserted above").row_mut(unit).fill(0.0);
            }
            w.get_mut(&p("mlp.down_proj")).expect("inserted above").set_col(unit, &vec![0.0; h]);
        }
    }
    w
}

/// The MLP unit of block `layer` that is dead in the base and a template detector in the chat.
fn chat_unit(spec: &TinyModelSpec, layer: usize) -> usize {
    layer.saturating_sub(1) % spec.intermediate_size
}

/// The size of the template direction added to the template tokens' embeddings: length 1.0 in
/// the residual stream. Gemma multiplies embeddings by `sqrt(hidden_size)`, so its table gets
/// `1 / sqrt(hidden_size)`.
fn embed_shift(spec: &TinyModelSpec) -> f32 {
    match spec.family {
        Family::Llama => 1.0,
        Family::Gemma2 => 1.0 / (spec.hidden_size as f32).sqrt(),
    }
}

/// The weight of the template direction in the chat-only unit's gate and up rows. Gemma's
/// post-norms give every block output the size of the residual stream, which dilutes `d` by the
/// middle block more than in Llama, so its detector reads harder.
fn unit_read(spec: &TinyModelSpec) -> f32 {
    match spec.family {
        Family::Llama => 0.5,
        Family::Gemma2 => 2.0,
    }
}

/// Turns base weights into chat weights; see [`write_tiny_pair`].
fn perturb(w: &mut Weights, spec: &TinyModelSpec, template_ids: &[u32], seed: u64) {
    let (d, u) = directions(spec.hidden_size, seed);
    let embed = w.get_mut("model.embed_tokens.weight").expect("base weights have embeddings");
    for &t in template_ids {
        embed.row_mut(t as usize).iter_mut().zip(&d).for_each(|(e, d)| *e += embed_shift(spec) * d);
    }
    for layer in spec.perturbed_layers() {
        let unit = chat_unit(spec, layer);
        let p = |name: &str| format!("model.layers.{layer}.{name}.weight");
        for name in ["mlp.gate_proj", "mlp.up_proj"] {
            let row = w.get_mut(&p(name)).expect("base weights have every block").row_mut(unit);
            row.iter_mut().zip(&d).for_each(|(r, d)| *r = unit_read(spec) * d);
        }
        let write: Vec<f32> = u.iter().map(|u| UNIT_WRITE * u).collect();
        w.get_mut(&p("mlp.down_proj")).expect("base weights have every block").set_col(unit, &write);
    }
}

fn write_model(dir: &Path, config: &serde_json::Value, weights: &Weights) -> Result<(), TinyModelError> {
    let io = |path: PathBuf| move |source| TinyModelError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serialises") + "\n";
    std::fs::write(&config_path, text).map_err(io(config_path.clone()))?;
    let path = dir.join("model.safetensors");
    let fail = |source| TinyModelError::Weights { path: path.clone(), source: Box::new(source) };
    let mut tensors = HashMap::new();
    for (name, p) in weights {
        let tensor = if p.vector {
            Tensor::from_slice(&p.data, p.cols, &Device::Cpu)
        } else {
            Tensor::from_slice(&p.data, (p.rows, p.cols), &Device::Cpu)
        };
        tensors.insert(name.clone(), tensor.map_err(fail)?);
    }
    candle_core::safetensors::save(&tensors, &path).map_err(fail)
}

/// splitmix64 with Box-Muller normals: small, explicit and stable across platforms and crate
/// versions, unlike a library RNG whose stream may change.
struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: 53 random bits, never 0 (Box-Muller takes its log).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, IndexOp};

    use super::*;
    use crate::models::Model;
    use crate::text::{Message, TextTokenizer};

    fn pair(spec: &TinyModelSpec, seed: u64) -> (tempfile::TempDir, TinyPair) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let pair = write_tiny_pair(dir.path(), spec, seed).expect("the pair is written");
        (dir, pair)
    }

    fn files(pair: &TinyPair) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for dir in [&pair.base, &pair.chat] {
            for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
                let bytes = std::fs::read(dir.join(name)).expect("the file was written");
                out.push((dir.join(name).display().to_string(), bytes));
            }
        }
        out
    }

    #[test]
    fn same_seed_gives_identical_files() {
        for spec in [TinyModelSpec::llama(), TinyModelSpec::gemma2()] {
            let (_a, a) = pair(&spec, 7);
            let (_b, b) = pair(&spec, 7);
            for ((name, a), (_, b)) in files(&a).iter().zip(&files(&b)) {
                assert!(a == b, "{name} differs between two runs with the same seed");
            }
            let (_c, c) = pair(&spec, 8);
            assert!(files(&a)[1].1 != files(&c)[1].1, "another seed must give other weights");
        }
    }

    #[test]
    fn rng_is_standard_normal() {
        let mut rng = Rng::new(1);
        let xs: Vec<f64> = (0..20_000).map(|_| rng.normal() as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }

    /// Mean over positions of `|chat − base| / |base|` of the residual stream after `layer`.
    struct Diffs {
        template: f32,
        chat_text: f32,
        plain: f32,
    }

    fn residual(model: &Model, ids: &[u32], layer: usize) -> Tensor {
        let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mask = ids.ones_like().unwrap();
        model.forward_to_layer(&ids, &mask, layer).unwrap().i(0).unwrap()
    }

    /// Per position `|chat − base| / |base|`.
    fn rel_diffs(base: &Model, chat: &Model, ids: &[u32], layer: usize) -> Vec<f32> {
        let (b, c) = (residual(base, ids, layer), residual(chat, ids, layer));
        assert_eq!(b.dims(), &[ids.len(), base.hidden_size()]);
        let norm = |x: &Tensor| x.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
        let diff = norm(&(&c - &b).unwrap());
        diff.iter().zip(norm(&b)).map(|(d, b)| d / b).collect()
    }

    fn measure(spec: &TinyModelSpec) -> Diffs {
        let (_dir, pair) = pair(spec, 0);
        let base = Model::load(&pair.base, DType::F32, &Device::Cpu).expect("the base loads");
        let chat = Model::load(&pair.chat, DType::F32, &Device::Cpu).expect("the chat loads");
        assert_eq!(base.num_layers(), spec.num_layers);
        let tokenizer = TextTokenizer::from_dir(&pair.chat).expect("the tokenizer loads");
        let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len().max(1) as f32;

        let chat_rec: serde_json::Value = serde_json::from_str(CHAT.lines().next().unwrap()).unwrap();
        let messages: Vec<Message> = chat_rec["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let rendered = tokenizer.render_chat(&messages).unwrap();
        let web_rec: serde_json::Value = serde_json::from_str(WEB.lines().next().unwrap()).unwrap();
        let batch = tokenizer.encode_batch(&[rendered.as_str(), web_rec["text"].as_str().unwrap()]).unwrap();
        let docs: Vec<&[u32]> = batch.docs().collect();

        let layer = pair.middle_layer;
        let in_chat = rel_diffs(&base, &chat, docs[0], layer);
        let (mut template, mut chat_text) = (Vec::new(), Vec::new());
        // Position 0 is BOS, identical in both models up to rounding; it is neither kind.
        for (&id, &diff) in docs[0].iter().zip(&in_chat).skip(1) {
            if pair.template_token_ids.contains(&id) { &mut template } else { &mut chat_text }.push(diff);
        }
        assert!(template.len() >= 4, "the conversation has template tokens: {}", template.len());
        let plain = rel_diffs(&base, &chat, docs[1], layer);
        Diffs { template: mean(&template), chat_text: mean(&chat_text), plain: mean(&plain[1..]) }
    }

    fn check(spec: TinyModelSpec) {
        let d = measure(&spec);
        eprintln!(
            "{:?}: relative residual difference after block {}: template {:.4}, chat text {:.4}, plain {:.2e}",
            spec.family,
            spec.middle_layer(),
            d.template,
            d.chat_text,
            d.plain
        );
        assert!(d.template > 0.5, "template tokens must differ clearly: {}", d.template);
        assert!(d.template > 5.0 * d.chat_text, "template {} vs chat text {}", d.template, d.chat_text);
        assert!(d.plain < 1e-3, "text without template tokens must be nearly unchanged: {}", d.plain);
    }

    #[test]
    fn llama_pair_differs_on_template_tokens() {
        check(TinyModelSpec::llama());
    }

    #[test]
    fn gemma2_pair_differs_on_template_tokens() {
        check(TinyModelSpec::gemma2());
    }
}
