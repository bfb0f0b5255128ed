//! The `eval` stage kind: conversations of a chat dataset through both models to the
//! crosscoder's layer, each intervention's patched residual through the rest of the chat model,
//! and KL / NLL per predicted assistant token, summed per (intervention, subset).
//!
//! Conversations are read and tokenised up front (at most `max_docs`, 512 in the paper), sorted
//! longest first and run in right-padded micro-batches of `batch_size` conversations. Per batch:
//! x_base (the base model on its mapped ids) and x_chat at layer L; the reference logits (the chat
//! model from x_chat, the base model from x_base); then one chat forward from layer L per
//! intervention. Only the rows of measured tokens are turned into f32 log-probabilities.
//! Nothing is checkpointed: the stage is short next to the ones before it.
//!
//! Outputs: `kl.json` (per intervention × subset: tokens, mean KL, its standard error, mean NLL,
//! mean KL to the base model; the latent sets' sizes and ids), `kl.csv` (the same rows),
//! `kl.png` / `kl.svg`, and `figures.json` (the figure's title and caption, for `pipe report`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use engine::{Arity, DeviceUse, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::figure::KlBars;
use super::kl::{Patcher, Summary, Sums, kl_rows, log_probs, nll_rows};
use super::sets::{ChatOnlySets, LatentSet, chat_only_sets};
use super::tokens::{Target, conversation, special_ids, targets};
use super::{Intervention, Subset};
use crate::cache::stage::{BaseTokenMap, ComputeDtype};
use crate::latents::LatentTable;
use crate::models::Model;
use crate::plot::FigureEntry;
use crate::plot::canvas::{Format, render};
use crate::text::{Column, Doc, Docs, TextError, TextTokenizer, TokenMap};
use crate::train::{load_crosscoder, load_normalizer};

pub struct EvalStage;

/// Parameters of the `eval` stage. Inputs: `base`, `chat` (model folders), `data` (a chat
/// dataset), `crosscoder` (a `train` or `crosscoder` stage) and, optionally, `latents` (a `scale`
/// stage, for the chat-only latent sets).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// The crosscoder's layer: the decoder block (0-based) whose output it was trained on, as
    /// the `cache` stages' `layer`. The patch replaces the chat model's residual after it.
    pub layer: usize,
    /// The split to read when `data` is a folder (`validation`); ignored for a file.
    #[serde(default)]
    pub split: Option<String>,
    /// The dataset column holding each conversation, a list of {role, content} messages
    /// (rendered with the chat model's chat template).
    #[serde(default = "default_column")]
    pub column: String,
    /// Conversations evaluated: the dataset's first ones (the paper: 512).
    #[serde(default = "default_max_docs")]
    pub max_docs: u64,
    /// Conversations are truncated to this many tokens (the paper: 1024).
    #[serde(default = "default_context_len")]
    pub context_len: usize,
    /// Tokens at positions below this are not measured (the paper's Llama runs: 25, as the
    /// caches drop them and the crosscoder never saw them).
    #[serde(default)]
    pub ignore_first_n: usize,
    /// Token replacement in the base model's input, as in `cache` (`"llama3"` for the base
    /// Llama 3 models).
    #[serde(default)]
    pub base_token_map: BaseTokenMap,
    /// The dtype the models run in (the patches and the KL are computed in f32).
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// The `k_first` subset: the first this many predicted tokens of each assistant turn,
    /// special (control) tokens skipped; `post_k_first` is the rest.
    #[serde(default = "default_k_first")]
    pub k_first: usize,
    /// The share of the filtered chat-only latents in each best / worst set (the paper: 0.5).
    #[serde(default = "default_fraction")]
    pub fraction: f64,
    /// The chat-only latents eligible for the sets have both νʳ and νᵋ in [lo, hi] (the
    /// paper: [-0.1, 2]).
    #[serde(default = "default_nu_range")]
    pub nu_range: [f64; 2],
    /// The interventions to run, in this order (default: every one that applies: those of a
    /// latent set only with `latents`).
    #[serde(default)]
    pub interventions: Option<Vec<Intervention>>,
    /// Conversations per forward micro-batch (the paper: 6). Not part of the key: change it to
    /// fit memory.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_column() -> String {
    "messages".into()
}
fn default_max_docs() -> u64 {
    512
}
fn default_context_len() -> usize {
    crate::text::DEFAULT_CONTEXT_LEN
}
fn default_k_first() -> usize {
    10
}
fn default_fraction() -> f64 {
    0.5
}
fn default_nu_range() -> [f64; 2] {
    [-0.1, 2.0]
}
fn default_batch_size() -> usize {
    6
}

impl Stage for EvalStage {
    type Params = EvalParams;
    const KIND: &'static str = "eval";
    // 2: dtype "auto" is the checkpoints' dtype on every device (it was f32 on the CPU).
    const VERSION: u32 = 2;
    const DOC: &'static str = "KL of the chat model's next-token distribution under interventions on its \
        layer-L residual (base activations with crosscoder latents swapped in), per assistant token.";
    const UNKEYED: &'static [&'static str] = &["batch_size"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::path(
                "base",
                Arity::One,
                "The base model the crosscoder was trained on: a model folder or a Hugging Face \
                 cache reference `org/name[@revision]`.",
            )
            .with_resolver(crate::hf::model_ref),
            InputSpec::path(
                "chat",
                Arity::One,
                "The chat model, as `base`; its tokenizer and chat template are used.",
            )
            .with_resolver(crate::hf::model_ref),
            InputSpec::path(
                "data",
                Arity::One,
                "Chat conversations: a .jsonl or .parquet file, a folder read by `split`, or a \
                 Hugging Face dataset cache reference.",
            )
            .with_resolver(crate::hf::dataset_ref),
            crate::train::crosscoder_input(),
            InputSpec::stage_of(
                "latents",
                &["scale"],
                Arity::Optional,
                "A `scale` stage of the same crosscoder: its latent table gives the chat-only sets.",
            ),
        ]
    }

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn check(&self, p: &EvalParams) -> Result<(), ParamError> {
        let at_least_one = [
            ("max_docs", p.max_docs as usize),
            ("context_len", p.context_len),
            ("k_first", p.k_first),
            ("batch_size", p.batch_size),
        ];
        for (name, v) in at_least_one {
            if v == 0 {
                return Err(ParamError::new(&[name], "must be at least 1"));
            }
        }
        if p.ignore_first_n >= p.context_len {
            return Err(ParamError::new(
                &["ignore_first_n"],
                format!("must be below context_len ({}), or no token is measured", p.context_len),
            ));
        }
        if !(p.fraction > 0.0 && p.fraction <= 1.0) {
            return Err(ParamError::new(&["fraction"], "must be in (0, 1]"));
        }
        if p.nu_range[0] > p.nu_range[1] {
            return Err(ParamError::new(&["nu_range"], "must be [lo, hi] with lo ≤ hi"));
        }
        if let Some(list) = &p.interventions {
            if list.is_empty() {
                return Err(ParamError::new(
                    &["interventions"],
                    "must name at least one (leave it out for all)",
                ));
            }
            for (i, x) in list.iter().enumerate() {
                if list[..i].contains(x) {
                    return Err(ParamError::new(
                        &["interventions"],
                        format!("`{}` is listed twice", x.name()),
                    ));
                }
            }
        }
        p.base_token_map.resolve().map_err(|m| ParamError::new(&["base_token_map"], m))?;
        Ok(())
    }

    fn run(&self, p: &EvalParams, ctx: &mut StageContext) -> Result<(), StageError> {
        run(p, ctx)
    }
}

fn candle(e: candle_core::Error) -> StageError {
    StageError::failed(format!("tensor operation failed: {e}"))
}

/// The interventions to run: the listed ones, or all that apply.
fn chosen(p: &EvalParams, has_latents: bool) -> Result<Vec<Intervention>, StageError> {
    match &p.interventions {
        None => Ok(Intervention::ALL.into_iter().filter(|i| has_latents || i.set().is_none()).collect()),
        Some(list) => {
            if !has_latents && let Some(i) = list.iter().find(|i| i.set().is_some()) {
                return Err(StageError::failed(format!(
                    "interventions: `{}` patches a chat-only latent set, which needs the `latents` \
                     input (a `scale` stage of this crosscoder)",
                    i.name()
                )));
            }
            Ok(list.clone())
        }
    }
}

/// One conversation, ready to run.
struct Conv {
    ids: Vec<u32>,
    targets: Vec<Target>,
}

/// Reads and tokenises the first `max_docs` conversations.
fn read_conversations(
    data: &Path,
    p: &EvalParams,
    tokenizer: &TextTokenizer,
    special: &[u32],
) -> Result<Vec<Conv>, StageError> {
    let docs =
        Docs::open(data, p.split.as_deref(), Column::Messages(p.column.clone()), Some(p.max_docs as usize))
            .map_err(StageError::other)?;
    let mut out = Vec::new();
    for (i, doc) in docs.enumerate() {
        let messages = match doc.map_err(StageError::other)? {
            Doc::Chat(m) => m,
            Doc::Text(_) => unreachable!("a messages column yields conversations"),
        };
        let conv = conversation(tokenizer, &messages).map_err(|m| {
            StageError::failed(format!("{}: conversation {i} (column `{}`): {m}", data.display(), p.column))
        })?;
        let targets = targets(&conv, special, p.k_first, p.ignore_first_n);
        out.push(Conv { ids: conv.ids, targets });
    }
    Ok(out)
}

fn run(p: &EvalParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let t0 = Instant::now();
    let device = crate::device::candle_device(ctx.device())?;
    let base_dir = ctx.external("base")[0].clone();
    let chat_dir = ctx.external("chat")[0].clone();
    let dtype = p.dtype.resolve(&base_dir, &chat_dir).map_err(StageError::other)?;
    let data = ctx.external("data")[0].clone();
    let tokenizer = TextTokenizer::from_dir(&chat_dir)
        .and_then(|t| t.with_context_len(p.context_len))
        .map_err(StageError::other)?;
    if tokenizer.chat_template().is_none() {
        return Err(StageError::other(TextError::NoChatTemplate {
            wanted_by: format!("the conversations of {}", data.display()),
            tokenizer: chat_dir.clone(),
        }));
    }
    let token_map = p.base_token_map.resolve().map_err(StageError::failed)?;
    if let Some(id) = token_map.out_of_vocab(tokenizer.vocab_size()) {
        return Err(StageError::failed(format!(
            "base_token_map uses token id {id}, outside the vocabulary of {} ({} tokens)",
            chat_dir.join("tokenizer.json").display(),
            tokenizer.vocab_size()
        )));
    }

    let cc_input = ctx.input("crosscoder")?.clone();
    let cc_file = cc_input.dir.join("crosscoder.safetensors");
    let (cc, threshold) = load_crosscoder(&cc_input.dir, &device)?;
    let normalizer = load_normalizer(&cc_input.dir)?;
    let latents = ctx.inputs("latents").first().cloned();
    let interventions = chosen(p, latents.is_some())?;
    let sets = match &latents {
        Some(up) if interventions.iter().any(|i| i.set().is_some()) => {
            let path = up.dir.join("latents.parquet");
            let table = LatentTable::read_parquet(&path).map_err(StageError::other)?;
            let sets = chat_only_sets(&table, p.fraction, p.nu_range).map_err(|m| {
                StageError::failed(format!("input `{}` (latents), {}: {m}", up.stage, path.display()))
            })?;
            if sets.candidates.len() > cc.f || sets.candidates.iter().any(|&j| j as usize >= cc.f) {
                return Err(StageError::failed(format!(
                    "input `{}` (latents) names latents beyond the crosscoder's {}: is it a `scale` \
                     stage of this crosscoder?",
                    up.stage, cc.f
                )));
            }
            for (set, ids) in &sets.sets {
                if ids.is_empty() {
                    tracing::warn!(
                        "latent set {} is empty ({} eligible chat-only latents): its patch is x_base",
                        set.name(),
                        sets.candidates.len()
                    );
                }
            }
            Some(sets)
        }
        _ => None,
    };

    let (base, chat) =
        Model::load_pair(&base_dir, &chat_dir, dtype, &device, ctx.device()).map_err(StageError::other)?;
    for (dir, m) in [(&base_dir, &base), (&chat_dir, &chat)] {
        if m.hidden_size() != cc.d {
            return Err(StageError::failed(format!(
                "the crosscoder in {} takes activations of width {}, but {} has hidden_size {}: \
                 use the crosscoder trained on this model pair",
                cc_file.display(),
                cc.d,
                dir.join("config.json").display(),
                m.hidden_size()
            )));
        }
        crate::cache::stage::check_fits(dir, m, p.layer, &tokenizer, &chat_dir)?;
    }
    if base.vocab_size() != chat.vocab_size() {
        return Err(StageError::failed(format!(
            "the models do not share a vocabulary: {} has {} logits, {} has {}",
            base_dir.join("config.json").display(),
            base.vocab_size(),
            chat_dir.join("config.json").display(),
            chat.vocab_size()
        )));
    }

    let special = special_ids(&tokenizer);
    let convs = read_conversations(&data, p, &tokenizer, &special)?;
    let measured: usize = convs.iter().map(|c| c.targets.len()).sum();
    if measured == 0 {
        return Err(StageError::failed(format!(
            "no assistant token to measure in the first {} conversations of {} (column `{}`): the \
             dataset needs assistant turns within the first {} tokens{}",
            convs.len(),
            data.display(),
            p.column,
            p.context_len,
            if p.ignore_first_n > 0 {
                format!(", after position {}", p.ignore_first_n)
            } else {
                String::new()
            }
        )));
    }
    let no_sets = BTreeMap::new();
    let patcher =
        Patcher::new(cc, threshold, normalizer.as_ref(), sets.as_ref().map_or(&no_sets, |s| &s.sets))
            .map_err(candle)?;
    tracing::info!(
        "{} conversations, {measured} assistant tokens; {} interventions: {}",
        convs.len(),
        interventions.len(),
        interventions.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    );

    let progress = ctx.progress().clone();
    progress.set_total(convs.len() as u64, "conversations");
    let mut sums = vec![[Sums::default(); 3]; interventions.len()];
    let mut order: Vec<usize> = (0..convs.len()).filter(|&i| !convs[i].targets.is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(convs[i].ids.len()));
    progress.inc((convs.len() - order.len()) as u64);
    let models = Models { base: &base, chat: &chat, layer: p.layer, token_map: &token_map, device: &device };
    for group in order.chunks(p.batch_size) {
        ctx.check_cancelled()?;
        let batch: Vec<&Conv> = group.iter().map(|&i| &convs[i]).collect();
        let rows = evaluate_batch(&models, &patcher, &batch, &interventions).map_err(candle)?;
        let flat: Vec<&Target> = batch.iter().flat_map(|c| &c.targets).collect();
        for (k, r) in rows.iter().enumerate() {
            for (t, target) in flat.iter().enumerate() {
                let (kl, nll, klb) = (r.kl[t], r.nll[t], r.kl_base[t]);
                sums[k][0].add(kl, nll, klb);
                sums[k][if target.k_first { 1 } else { 2 }].add(kl, nll, klb);
            }
        }
        progress.inc(group.len() as u64);
    }

    let summaries: Vec<(String, [Summary; 3])> = interventions
        .iter()
        .zip(&sums)
        .map(|(i, s)| (i.name().to_string(), [s[0].summary(), s[1].summary(), s[2].summary()]))
        .collect();
    let out = ctx.out_dir().to_owned();
    write_outputs(&out, p, convs.len(), &summaries, sets.as_ref())?;
    let fig = KlBars {
        rows: &summaries,
        k_first: p.k_first,
        title: format!("KL to the chat model after patching layer {}", p.layer),
        size: (1600, 1000),
    };
    render(&fig, &out, "kl", &[Format::Png, Format::Svg]).map_err(StageError::other)?;
    let entry = FigureEntry {
        file: "kl.png".into(),
        svg: Some("kl.svg".into()),
        title: fig.title.clone(),
        caption: format!(
            "Mean KL(p_chat ‖ p_patched) per predicted assistant token over {} conversations, ± one \
             standard error, for all assistant tokens, the first {} of each turn and the rest; \
             shorter bars are closer to the chat model.",
            convs.len(),
            p.k_first
        ),
    };
    let index = serde_json::to_vec_pretty(&[entry]).expect("serializable");
    std::fs::write(out.join("figures.json"), index)
        .map_err(|e| StageError::io(out.join("figures.json").display(), e))?;

    ctx.record_metric("docs", convs.len() as u64);
    for (j, subset) in Subset::ALL.iter().enumerate() {
        let tokens = summaries.first().map_or(0, |s| s.1[j].tokens);
        ctx.record_metric(&format!("tokens/{}", subset.name()), tokens);
    }
    for (name, s) in &summaries {
        for (j, subset) in Subset::ALL.iter().enumerate() {
            if s[j].kl_mean.is_finite() {
                ctx.record_metric(&format!("kl/{}/{name}", subset.name()), s[j].kl_mean);
            }
        }
        if s[0].nll_mean.is_finite() {
            ctx.record_metric(&format!("nll/{name}"), s[0].nll_mean);
        }
    }
    if let Some(sets) = &sets {
        ctx.record_metric("latents/candidates", sets.candidates.len() as u64);
        for (set, ids) in &sets.sets {
            ctx.record_metric(&format!("latents/{}", set.name()), ids.len() as u64);
        }
    }
    tracing::info!(
        "{} conversations, {measured} tokens, {} interventions in {:.1}s",
        convs.len(),
        interventions.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Models<'a> {
    base: &'a Model,
    chat: &'a Model,
    layer: usize,
    token_map: &'a TokenMap,
    device: &'a Device,
}

/// Per measured token of a batch (in batch order, each conversation's targets in order), for one
/// intervention.
struct Rows {
    kl: Vec<f32>,
    nll: Vec<f32>,
    kl_base: Vec<f32>,
}

/// Runs one micro-batch: both models to the layer, the references, every intervention.
fn evaluate_batch(
    m: &Models<'_>,
    patcher: &Patcher,
    batch: &[&Conv],
    interventions: &[Intervention],
) -> candle_core::Result<Vec<Rows>> {
    let b = batch.len();
    let t = batch.iter().map(|c| c.ids.len()).max().unwrap_or(0);
    let d = patcher.d();
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u8; b * t];
    let mut rows = Vec::new();
    let mut next = Vec::new();
    for (r, c) in batch.iter().enumerate() {
        ids[r * t..r * t + c.ids.len()].copy_from_slice(&c.ids);
        mask[r * t..r * t + c.ids.len()].iter_mut().for_each(|x| *x = 1);
        for target in &c.targets {
            rows.push((r * t + target.pos - 1) as u32);
            next.push(c.ids[target.pos]);
        }
    }
    let mut base_ids = ids.clone();
    m.token_map.apply(&mut base_ids);
    let mask = Tensor::from_vec(mask, (b, t), m.device)?;
    let rows = Tensor::new(rows.as_slice(), m.device)?;
    let next = Tensor::new(next.as_slice(), m.device)?;
    let x_base = m.base.forward_to_layer(&Tensor::from_vec(base_ids, (b, t), m.device)?, &mask, m.layer)?;
    let x_chat = m.chat.forward_to_layer(&Tensor::from_vec(ids, (b, t), m.device)?, &mask, m.layer)?;
    let model_dtype = x_chat.dtype();
    // Log-probabilities at the measured rows of logits (B, T, V).
    let measured = |logits: Tensor| -> candle_core::Result<Tensor> {
        let v = logits.dim(2)?;
        log_probs(&logits.reshape((b * t, v))?.index_select(&rows, 0)?)
    };
    let lp_chat = measured(m.chat.forward_from_layer(&x_chat, &mask, m.layer)?)?;
    let lp_base = measured(m.base.forward_from_layer(&x_base, &mask, m.layer)?)?;

    let keys: Vec<Option<LatentSet>> = {
        let mut k: Vec<Option<LatentSet>> =
            interventions.iter().filter(|i| i.uses_latents()).map(|i| i.set()).collect();
        k.sort();
        k.dedup();
        k
    };
    let flat = |x: &Tensor| x.reshape((b * t, d))?.to_dtype(DType::F32);
    let (xb, xc) = (flat(&x_base)?, flat(&x_chat)?);
    let deltas = if keys.is_empty() { BTreeMap::new() } else { patcher.deltas(&xb, &xc, &keys)? };
    let back = |x: Tensor| x.to_dtype(model_dtype)?.reshape((b, t, d));
    let mut out = Vec::with_capacity(interventions.len());
    for i in interventions {
        let lp = match i {
            Intervention::VanillaBase => lp_base.clone(),
            _ => {
                let resid = match i {
                    Intervention::VanillaChat => x_chat.clone(),
                    Intervention::VanillaBase2Chat => x_base.clone(),
                    Intervention::ChatErrorBaseLatents => back((&xc - &deltas[&None])?)?,
                    Intervention::BaseErrorChatLatents => back((&xb + &deltas[&None])?)?,
                    set => back((&xb + &deltas[&set.set()])?)?,
                };
                measured(m.chat.forward_from_layer(&resid, &mask, m.layer)?)?
            }
        };
        out.push(Rows {
            kl: kl_rows(&lp_chat, &lp)?,
            nll: nll_rows(&lp, &next)?,
            kl_base: kl_rows(&lp_base, &lp)?,
        });
    }
    Ok(out)
}

/// `kl.json` and `kl.csv`.
fn write_outputs(
    out: &Path,
    p: &EvalParams,
    docs: usize,
    summaries: &[(String, [Summary; 3])],
    sets: Option<&ChatOnlySets>,
) -> Result<(), StageError> {
    let num = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
    let mut results = Vec::new();
    let mut csv = String::from("intervention,subset,tokens,kl_mean,kl_stderr,nll_mean,kl_base_mean\n");
    let cell = |v: f64| if v.is_finite() { format!("{v}") } else { String::new() };
    for (name, s) in summaries {
        for (subset, m) in Subset::ALL.iter().zip(s) {
            results.push(serde_json::json!({
                "intervention": name,
                "subset": subset.name(),
                "tokens": m.tokens,
                "kl_mean": num(m.kl_mean),
                "kl_stderr": num(m.kl_stderr),
                "nll_mean": num(m.nll_mean),
                "kl_base_mean": num(m.kl_base_mean),
            }));
            csv.push_str(&format!(
                "{name},{},{},{},{},{},{}\n",
                subset.name(),
                m.tokens,
                cell(m.kl_mean),
                cell(m.kl_stderr),
                cell(m.nll_mean),
                cell(m.kl_base_mean)
            ));
        }
    }
    let latent_sets = sets.map(|s| {
        let mut map = serde_json::Map::new();
        map.insert("candidates".into(), s.candidates.len().into());
        for (set, ids) in &s.sets {
            map.insert(set.name().into(), serde_json::json!({ "size": ids.len(), "latents": ids }));
        }
        serde_json::Value::Object(map)
    });
    let json = serde_json::json!({
        "layer": p.layer,
        "docs": docs,
        "k_first": p.k_first,
        "fraction": p.fraction,
        "kl": "KL(p_chat || p_patched), natural log, per predicted assistant token",
        "kl_base": "KL(p_base || p_patched)",
        "results": results,
        "latent_sets": latent_sets,
    });
    let write = |path: PathBuf, bytes: Vec<u8>| {
        std::fs::write(&path, bytes).map_err(|e| StageError::io(path.display(), e))
    };
    write(out.join("kl.json"), serde_json::to_vec_pretty(&json).expect("serializable"))?;
    write(out.join("kl.csv"), csv.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(extra: &str) -> EvalParams {
        serde_json::from_str(&format!("{{\"layer\": 2{extra}}}")).unwrap()
    }

    #[test]
    fn defaults_are_the_papers() {
        let p = params("");
        assert_eq!((p.max_docs, p.context_len, p.k_first, p.batch_size), (512, 1024, 10, 6));
        assert_eq!((p.fraction, p.nu_range), (0.5, [-0.1, 2.0]));
        assert_eq!(p.column, "messages");
        assert!(EvalStage.check(&p).is_ok());
    }

    #[test]
    fn params_are_checked_with_the_parameter_named() {
        let bad = [
            (", \"k_first\": 0", "k_first"),
            (", \"fraction\": 0", "fraction"),
            (", \"fraction\": 1.5", "fraction"),
            (", \"nu_range\": [2, 1]", "nu_range"),
            (", \"interventions\": []", "interventions"),
            (", \"interventions\": [\"vanilla_chat\", \"vanilla_chat\"]", "interventions"),
            (", \"ignore_first_n\": 1024", "ignore_first_n"),
            (", \"base_token_map\": \"gpt2\"", "base_token_map"),
            (", \"batch_size\": 0", "batch_size"),
        ];
        for (extra, name) in bad {
            let err = EvalStage.check(&params(extra)).unwrap_err();
            assert_eq!(err.path, [name], "{extra}");
        }
        assert!(serde_json::from_str::<EvalParams>(r#"{"layer": 2, "bogus": 1}"#).is_err());
        assert!(serde_json::from_str::<EvalParams>(r#"{"layer": 2, "interventions": ["nope"]}"#).is_err());
    }

    #[test]
    fn interventions_default_to_those_that_apply() {
        let all = chosen(&params(""), true).unwrap();
        assert_eq!(all, Intervention::ALL);
        let without = chosen(&params(""), false).unwrap();
        assert_eq!(without.len(), 5);
        assert!(without.iter().all(|i| i.set().is_none()));
        let listed = params(", \"interventions\": [\"patch_rank_sum-best_cchat\"]");
        let err = chosen(&listed, false).unwrap_err().to_string();
        assert!(err.contains("patch_rank_sum-best_cchat") && err.contains("`latents`"), "{err}");
        assert_eq!(chosen(&listed, true).unwrap(), [Intervention::RankSumBest]);
    }
}
