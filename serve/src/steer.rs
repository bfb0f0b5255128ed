//! Steering (the original's steering app): generate from the base or the chat model with
//! latent decoder directions added to the residual stream after the crosscoder's layer L, and
//! the same generation without them, token by token.
//!
//! At every step the whole sequence is run: `forward_to_layer(L)`, then
//! `h[t] += Σ_j strength_j · d_j^model` at every position (prompt and generated), then
//! `forward_from_layer(L)` to the logits of the last position, then greedy (temperature 0) or
//! seeded sampling. A strength is a latent activation value: the latent page shows each
//! latent's max activation for scale. Decoder directions of a crosscoder trained on normalised
//! activations are mapped back to the residual's units.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use engine::Key;
use serde::{Deserialize, Serialize};
use stages::cache::CacheMeta;
use stages::models::Model;
use stages::rng::SplitMix64;
use stages::text::template::strip_leading_bos;
use stages::text::{GenerationPrompt, Message, TextTokenizer, TokenMap};

use crate::error::ApiError;

/// Bounds on a request (the server's; a request may ask for less).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_new_tokens: usize,
    pub max_prompt_tokens: usize,
    pub max_latents: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_new_tokens: 256, max_prompt_tokens: 2048, max_latents: 32 }
    }
}

/// Which model generates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Base,
    #[default]
    Chat,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentStrength {
    pub latent: usize,
    pub strength: f64,
}

/// `POST …/steer`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerRequest {
    #[serde(default)]
    pub model: Side,
    /// The user turn; chat-templated (with the generation prompt) unless `raw`.
    pub prompt: String,
    /// Use `prompt` as it is, without the chat template.
    #[serde(default)]
    pub raw: bool,
    #[serde(default)]
    pub latents: Vec<LatentStrength>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
    /// Also generate without steering, side by side.
    #[serde(default = "yes")]
    pub compare: bool,
}

fn default_new_tokens() -> usize {
    48
}

fn yes() -> bool {
    true
}

/// One line of the streamed response (NDJSON).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Models ready, prompt encoded.
    Start {
        model: Side,
        prompt: String,
        prompt_tokens: usize,
        layer: usize,
    },
    /// New text of one stream (`steered` or `plain`).
    Token {
        stream: &'static str,
        text: String,
        id: u32,
    },
    /// A stream ended (end-of-turn token or the length limit).
    End {
        stream: &'static str,
        reason: &'static str,
        tokens: usize,
    },
    Done,
    Error {
        message: String,
    },
}

/// Where a view's steering comes from: the crosscoder object and the cache's `cache.json`.
#[derive(Clone, Debug)]
pub struct Source {
    pub crosscoder_key: Key,
    pub crosscoder_dir: PathBuf,
    pub cache_dir: PathBuf,
}

/// What steering holds in memory for one crosscoder: both models, the tokenizer, the decoder.
pub struct Loaded {
    key: Key,
    base: Model,
    chat: Model,
    tokenizer: TextTokenizer,
    layer: usize,
    base_map: TokenMap,
    /// (2, F, d) in the residual's units, f32, row-major.
    w_dec: Vec<f32>,
    f: usize,
    d: usize,
    stops: Vec<u32>,
}

impl Loaded {
    pub fn latents(&self) -> usize {
        self.f
    }
}

/// The models of the crosscoder steered last (loading an 8B pair takes a while; one pair is kept).
pub struct Steering {
    device: Device,
    dtype: DType,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

impl Steering {
    pub fn new(device: Device) -> Steering {
        let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
        Steering { device, dtype, loaded: Mutex::new(None) }
    }

    /// The loaded models for `src`, loading them (and dropping the previous pair) if needed.
    pub fn load(&self, src: &Source) -> Result<Arc<Loaded>, ApiError> {
        let mut slot = self.loaded.lock().expect("not poisoned");
        if let Some(l) = slot.as_ref().filter(|l| l.key == src.crosscoder_key) {
            return Ok(l.clone());
        }
        *slot = None;
        let l = Arc::new(load(src, &self.device, self.dtype)?);
        *slot = Some(l.clone());
        Ok(l)
    }
}

fn failed(what: &str) -> impl Fn(candle_core::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

fn load(src: &Source, device: &Device, dtype: DType) -> Result<Loaded, ApiError> {
    let meta = CacheMeta::read(&src.cache_dir).map_err(|e| ApiError::internal(e.to_string()))?;
    let model_dir = |i: usize| -> Result<&Path, ApiError> {
        let m =
            meta.models.get(i).ok_or_else(|| ApiError::internal("cache.json lists fewer than 2 models"))?;
        if !m.path.join("config.json").is_file() {
            return Err(ApiError::conflict(format!(
                "the model folder {} (from {}) is gone: steering needs the models the cache was made with",
                m.path.display(),
                src.cache_dir.join("cache.json").display()
            )));
        }
        Ok(&m.path)
    };
    let (base_dir, chat_dir) = (model_dir(0)?, model_dir(1)?);
    tracing::info!("steering: loading {} and {}", base_dir.display(), chat_dir.display());
    let model = |dir: &Path| Model::load(dir, dtype, device).map_err(|e| ApiError::internal(e.to_string()));
    let (base, chat) = (model(base_dir)?, model(chat_dir)?);
    let tokenizer =
        TextTokenizer::from_dir(&meta.tokenizer).map_err(|e| ApiError::internal(e.to_string()))?;
    let (cc, _) = stages::train::load_crosscoder(&src.crosscoder_dir, &Device::Cpu)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (f, d) = (cc.f, cc.d);
    if d != chat.hidden_size() {
        return Err(ApiError::conflict(format!(
            "the crosscoder's d = {d} does not match the models' hidden size {}",
            chat.hidden_size()
        )));
    }
    let mut w_dec: Vec<f32> = cc
        .w_dec
        .as_tensor()
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(failed("reading the decoder"))?;
    if let Some(norm) =
        stages::train::load_normalizer(&src.crosscoder_dir).map_err(|e| ApiError::internal(e.to_string()))?
    {
        // A normalised activation is (x − mean)·g or (x − mean)/(std + 1e-8): undo the scale.
        for (m, chunk) in w_dec.chunks_exact_mut(f * d).enumerate() {
            for row in chunk.chunks_exact_mut(d) {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = if norm.keep_relative_variance {
                        *v / norm.global_scale
                    } else {
                        *v * (norm.std[m * d + i] + 1e-8)
                    };
                }
            }
        }
    }
    let mut stops: Vec<u32> = ["<|eot_id|>", "<end_of_turn>", "<|end_of_text|>", "<|im_end|>"]
        .iter()
        .filter_map(|t| tokenizer.token_id(t))
        .chain(tokenizer.eos_id())
        .collect();
    stops.sort();
    stops.dedup();
    Ok(Loaded {
        key: src.crosscoder_key,
        base,
        chat,
        tokenizer,
        layer: meta.layer,
        base_map: TokenMap::from_pairs(meta.base_token_map.iter().copied()),
        w_dec,
        f,
        d,
        stops,
    })
}

/// Checks a request against the limits and the crosscoder; the message names the field.
pub fn check(req: &SteerRequest, limits: &Limits, latents: usize) -> Result<(), ApiError> {
    if req.prompt.trim().is_empty() {
        return Err(ApiError::bad_request("`prompt` is empty"));
    }
    if req.max_new_tokens == 0 || req.max_new_tokens > limits.max_new_tokens {
        return Err(ApiError::bad_request(format!(
            "`max_new_tokens` must be 1 to {} (the server's limit, `pipe serve --max-new-tokens`)",
            limits.max_new_tokens
        )));
    }
    if !(req.temperature.is_finite() && (0.0..=10.0).contains(&req.temperature)) {
        return Err(ApiError::bad_request("`temperature` must be 0 (greedy) to 10"));
    }
    if req.latents.len() > limits.max_latents {
        return Err(ApiError::bad_request(format!("at most {} `latents`", limits.max_latents)));
    }
    for (i, l) in req.latents.iter().enumerate() {
        if l.latent >= latents {
            return Err(ApiError::bad_request(format!(
                "`latents[{i}].latent` = {} is out of range: the crosscoder has {latents} latents",
                l.latent
            )));
        }
        if !(l.strength.is_finite() && l.strength.abs() <= 1e4) {
            return Err(ApiError::bad_request(format!(
                "`latents[{i}].strength` must be a finite number within ±10000"
            )));
        }
    }
    Ok(())
}

struct Stream {
    name: &'static str,
    ids: Vec<u32>,
    prompt_len: usize,
    delta: Option<Tensor>,
    text: String,
    rng: SplitMix64,
    ended: bool,
}

/// Generates for `req`, calling `emit` with each event; stops early when `emit` returns false
/// (the client went away). Blocking: run it off the async runtime.
pub fn generate(l: &Loaded, req: &SteerRequest, limits: &Limits, emit: &mut dyn FnMut(Event) -> bool) {
    if let Err(message) = generate_inner(l, req, limits, emit) {
        emit(Event::Error { message });
    }
}

fn generate_inner(
    l: &Loaded,
    req: &SteerRequest,
    limits: &Limits,
    emit: &mut dyn FnMut(Event) -> bool,
) -> Result<(), String> {
    let model = match req.model {
        Side::Base => &l.base,
        Side::Chat => &l.chat,
    };
    let device = model.device().clone();
    let text = if req.raw {
        req.prompt.clone()
    } else {
        let template = l.tokenizer.chat_template().ok_or_else(|| {
            format!("the tokenizer in {} has no chat template; send `raw: true`", l.tokenizer.dir().display())
        })?;
        let rendered = template
            .render(&[Message::new("user", req.prompt.clone())], GenerationPrompt::Append)
            .map_err(|e| e.to_string())?;
        strip_leading_bos(&rendered, l.tokenizer.special_tokens().bos.as_deref()).to_owned()
    };
    let prompt = l.tokenizer.inner().encode(text.as_str(), true).map_err(|e| e.to_string())?;
    let prompt: Vec<u32> = prompt.get_ids().to_vec();
    if prompt.len() > limits.max_prompt_tokens {
        return Err(format!(
            "the prompt has {} tokens; the limit is {}",
            prompt.len(),
            limits.max_prompt_tokens
        ));
    }
    if !emit(Event::Start { model: req.model, prompt: text, prompt_tokens: prompt.len(), layer: l.layer }) {
        return Ok(());
    }
    let m = match req.model {
        Side::Base => 0,
        Side::Chat => 1,
    };
    let mut delta = vec![0f32; l.d];
    for s in &req.latents {
        let row = &l.w_dec[(m * l.f + s.latent) * l.d..][..l.d];
        for (x, w) in delta.iter_mut().zip(row) {
            *x += s.strength as f32 * w;
        }
    }
    let candle = |e: candle_core::Error| e.to_string();
    let delta =
        Tensor::from_vec(delta, l.d, &device).and_then(|t| t.to_dtype(model.dtype())).map_err(candle)?;
    let mut streams = vec![Stream {
        name: "steered",
        ids: prompt.clone(),
        prompt_len: prompt.len(),
        delta: Some(delta),
        text: String::new(),
        rng: SplitMix64::new(req.seed),
        ended: false,
    }];
    if req.compare {
        streams.push(Stream {
            name: "plain",
            ids: prompt.clone(),
            prompt_len: prompt.len(),
            delta: None,
            text: String::new(),
            rng: SplitMix64::new(req.seed),
            ended: false,
        });
    }
    for step in 0..req.max_new_tokens {
        for s in streams.iter_mut().filter(|s| !s.ended) {
            let mut input = s.ids.clone();
            if m == 0 {
                l.base_map.apply(&mut input);
            }
            let t = input.len();
            let ids = Tensor::from_vec(input, (1, t), &device).map_err(candle)?;
            let mask = Tensor::ones((1, t), DType::U8, &device).map_err(candle)?;
            let mut h = model.forward_to_layer(&ids, &mask, l.layer).map_err(candle)?;
            if let Some(delta) = &s.delta {
                h = h.broadcast_add(delta).map_err(candle)?;
            }
            let logits = model
                .forward_from_layer(&h, &mask, l.layer)
                .and_then(|x| x.get(0))
                .and_then(|x| x.get(t - 1))
                .and_then(|x| x.to_dtype(DType::F32))
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(candle)?;
            let id = pick(&logits, req.temperature, &mut s.rng);
            s.ids.push(id);
            let stop = l.stops.contains(&id);
            if !stop {
                let full = l.tokenizer.decode(&s.ids[s.prompt_len..]).map_err(|e| e.to_string())?;
                // A token ending inside a multi-byte character decodes to U+FFFD: wait for the rest.
                if !full.ends_with('\u{fffd}') && full.len() >= s.text.len() && full.starts_with(&s.text) {
                    let new = full[s.text.len()..].to_string();
                    s.text = full;
                    if !emit(Event::Token { stream: s.name, text: new, id }) {
                        return Ok(());
                    }
                }
            }
            if stop || step + 1 == req.max_new_tokens {
                s.ended = true;
                let reason = if stop { "end_of_turn" } else { "max_new_tokens" };
                emit(Event::End { stream: s.name, reason, tokens: s.ids.len() - s.prompt_len });
            }
        }
        if streams.iter().all(|s| s.ended) {
            break;
        }
    }
    emit(Event::Done);
    Ok(())
}

/// Greedy (lowest id among equal maxima) at temperature 0, else a seeded draw from
/// softmax(logits / temperature).
fn pick(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    if temperature == 0.0 {
        let mut best = 0;
        for (i, x) in logits.iter().enumerate() {
            if *x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|x| ((*x as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    (logits.len() - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_sampling_is_seeded() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(pick(&[0.0, 2.0, 2.0, -1.0], 0.0, &mut rng), 1);
        let draws = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..20).map(|_| pick(&[0.0, 0.1, 0.2], 1.0, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        let d = draws(7);
        assert!(d.contains(&0) && d.contains(&1) && d.contains(&2), "{d:?}");
        // A sharp distribution at low temperature is near-greedy.
        let mut rng = SplitMix64::new(1);
        assert!((0..50).all(|_| pick(&[0.0, 5.0, 0.0], 0.05, &mut rng) == 1));
    }

    fn req(json: serde_json::Value) -> SteerRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn requests_are_bounded_and_errors_name_the_field() {
        let limits = Limits { max_new_tokens: 10, max_prompt_tokens: 100, max_latents: 2 };
        let msg = |v| check(&req(v), &limits, 8).err().map(|e| e.message).unwrap_or_default();
        assert_eq!(
            check(&req(serde_json::json!({"prompt": "hi", "max_new_tokens": 10})), &limits, 8),
            Ok(())
        );
        assert!(msg(serde_json::json!({"prompt": " "})).contains("`prompt`"));
        assert!(msg(serde_json::json!({"prompt": "a", "max_new_tokens": 11})).contains("`max_new_tokens`"));
        assert!(
            msg(serde_json::json!({"prompt": "a", "max_new_tokens": 5, "latents": [{"latent": 8, "strength": 1}]}))
                .contains("`latents[0].latent` = 8 is out of range")
        );
        assert!(
            msg(serde_json::json!({"prompt": "a", "max_new_tokens": 5, "latents": [{"latent": 1, "strength": 1e9}]}))
                .contains("`latents[0].strength`")
        );
        assert!(
            msg(serde_json::json!({"prompt": "a", "max_new_tokens": 5, "temperature": -1}))
                .contains("`temperature`")
        );
        let three = serde_json::json!([{"latent": 0, "strength": 1}, {"latent": 1, "strength": 1}, {"latent": 2, "strength": 1}]);
        assert!(
            msg(serde_json::json!({"prompt": "a", "max_new_tokens": 5, "latents": three}))
                .contains("at most 2")
        );
        assert!(
            serde_json::from_value::<SteerRequest>(serde_json::json!({"prompt": "a", "bogus": 1})).is_err()
        );
    }
}
