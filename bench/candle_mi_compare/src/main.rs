//! Compares the residual stream after every decoder block, as read by
//! `candle-mi`'s `HookPoint::ResidPost(L)` hook, with `pipe-stages`'
//! `Model::forward_to_layer(ids, mask, L)`, and each with the transformers
//! reference (`layer_{L}_out` of `reference.safetensors`) where a fixture has one.
//!
//! Usage: cargo run --release -- <pipe repo root>   (default ../..)
//!
//! Error measure, as in stages/tests/parity.rs, over real (non-padded) tokens:
//! rel = max |a - b| / max |b|; abs = max |a - b|.
//!
//! candle-mi 0.2.2 has no attention-mask input: it is run on the same padded
//! batch without a mask. The fixtures pad on the right, so under the causal mask
//! real tokens never see the pads and the real-token rows are comparable.

use std::path::{Path, PathBuf};

use candle_mi::{GenericTransformer, HookPoint, HookSpec, MIBackend, TransformerConfig};

/// Activations as plain (B, T, d) f32 arrays: the two crates use different
/// candle versions (0.9 for pipe, 0.11 for candle-mi), so we compare numbers.
struct Acts {
    b: usize,
    t: usize,
    d: usize,
    data: Vec<f32>,
}

impl Acts {
    fn row(&self, b: usize, t: usize) -> &[f32] {
        let start = (b * self.t + t) * self.d;
        &self.data[start..start + self.d]
    }
}

fn from_ours(x: &candle_core::Tensor) -> Acts {
    let (b, t, d) = x.dims3().unwrap();
    let data = x.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Acts { b, t, d, data }
}

fn from_mi(x: &candle_core_mi::Tensor) -> Acts {
    let (b, t, d) = x.dims3().unwrap();
    let data =
        x.to_dtype(candle_core_mi::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Acts { b, t, d, data }
}

/// (max abs diff, max abs diff / max |reference|) over the real tokens, and the
/// first position at which |diff| exceeds 1e-4 * max |reference| (if any).
fn compare(a: &Acts, reference: &Acts, lengths: &[usize]) -> (f32, f32, Option<usize>) {
    assert_eq!((a.b, a.t, a.d), (reference.b, reference.t, reference.d));
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (b, &n) in lengths.iter().enumerate() {
        for t in 0..n {
            for (x, y) in a.row(b, t).iter().zip(reference.row(b, t)) {
                diff = diff.max((x - y).abs());
                scale = scale.max(y.abs());
            }
        }
    }
    let mut first = None;
    for (b, &n) in lengths.iter().enumerate() {
        for t in 0..n {
            let d = a.row(b, t).iter().zip(reference.row(b, t)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            if d > 1e-4 * scale {
                first = Some(first.map_or(t, |f: usize| f.min(t)));
            }
        }
        let _ = b;
    }
    (diff, diff / scale, first)
}

/// Loads a candle-mi `GenericTransformer` from a local folder, offline (the
/// `MIModel::from_pretrained` path goes through `hf-fetch-model`).
/// `hoist_rope_theta`: copy `rope_parameters.rope_theta` to the top level, which
/// candle-mi 0.2.2 reads (transformers >= 5 writes it only inside `rope_parameters`).
fn load_mi(dir: &Path, hoist_rope_theta: bool, window_minus_one: bool) -> Result<GenericTransformer, String> {
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| e.to_string())?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if hoist_rope_theta && json.get("rope_theta").is_none() {
        if let Some(theta) = json.pointer("/rope_parameters/rope_theta").cloned() {
            json["rope_theta"] = theta;
        }
    }
    let mut config = TransformerConfig::from_hf_config(&json).map_err(|e| format!("config: {e}"))?;
    // candle-mi masks j when i - j > window (window + 1 keys); transformers when i - j >= window.
    if window_minus_one {
        config.sliding_window = config.sliding_window.map(|w| w - 1);
    }
    let device = candle_core_mi::Device::Cpu;
    // SAFETY: the weights file is not modified while mapped.
    let vb = unsafe {
        candle_nn_mi::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            candle_core_mi::DType::F32,
            &device,
        )
    }
    .map_err(|e| format!("weights: {e}"))?;
    GenericTransformer::load(config, &device, candle_core_mi::DType::F32, vb).map_err(|e| format!("load: {e}"))
}

/// Residual stream after every block, through candle-mi's ResidPost hooks.
fn mi_resid_post(model: &GenericTransformer, ids: &[u32], b: usize, t: usize) -> Result<Vec<Acts>, String> {
    let input = candle_core_mi::Tensor::from_vec(ids.to_vec(), (b, t), &candle_core_mi::Device::Cpu).unwrap();
    let mut hooks = HookSpec::new();
    hooks.capture_all((0..model.num_layers()).map(HookPoint::ResidPost));
    let cache = model.forward(&input, &hooks).map_err(|e| format!("forward: {e}"))?;
    (0..model.num_layers())
        .map(|l| cache.require(&HookPoint::ResidPost(l)).map(from_mi).map_err(|e| e.to_string()))
        .collect()
}

struct Case {
    name: String,
    dir: PathBuf,
    ids: Vec<u32>,
    mask: Vec<u32>,
    b: usize,
    t: usize,
    lengths: Vec<usize>,
    /// transformers' `layer_{L}_out`, when the folder has a reference.
    reference: Option<Vec<Acts>>,
}

fn fixture_case(root: &Path, name: &str) -> Case {
    let dir = root.join("stages/tests/fixtures").join(name);
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    let ids_t = tensors["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let (b, t) = ids_t.dims2().unwrap();
    let ids = ids_t.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let mask =
        tensors["attention_mask"].to_dtype(candle_core::DType::U32).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let lengths = mask.chunks(t).map(|r| r.iter().sum::<u32>() as usize).collect::<Vec<_>>();
    // Right padding is what makes an unmasked candle-mi run comparable.
    for (row, &n) in mask.chunks(t).zip(&lengths) {
        assert!(row[..n].iter().all(|&m| m == 1), "{name}: not right-padded");
    }
    let mut reference = Vec::new();
    let mut l = 0;
    while let Some(x) = tensors.get(&format!("layer_{l}_out")) {
        reference.push(from_ours(x));
        l += 1;
    }
    Case { name: name.into(), dir, ids, mask, b, t, lengths, reference: Some(reference) }
}

/// A tiny pipeline model with no transformers reference: one unpadded row of
/// `t` deterministic pseudo-random ids (long enough to pass the llama3
/// `original_max_position_embeddings` = 64).
fn pipeline_case(root: &Path, rel: &str, t: usize, vocab: u32) -> Case {
    let mut s = 0x2545_f491_u32;
    let ids = (0..t)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % vocab
        })
        .collect();
    Case {
        name: rel.into(),
        dir: root.join(rel),
        ids,
        mask: vec![1; t],
        b: 1,
        t,
        lengths: vec![t],
        reference: None,
    }
}

fn fmt_first(f: Option<usize>) -> String {
    f.map_or("-".into(), |t| t.to_string())
}

fn run(case: &Case) {
    println!("\n## {} ({})", case.name, case.dir.display());
    let dev = candle_core::Device::Cpu;
    let ours = stages::models::Model::load(&case.dir, candle_core::DType::F32, &dev).unwrap();
    let ids = candle_core::Tensor::from_vec(case.ids.clone(), (case.b, case.t), &dev).unwrap();
    let mask = candle_core::Tensor::from_vec(case.mask.clone(), (case.b, case.t), &dev).unwrap();
    let ours_acts: Vec<Acts> =
        (0..ours.num_layers()).map(|l| from_ours(&ours.forward_to_layer(&ids, &mask, l).unwrap())).collect();

    let has_window = std::fs::read_to_string(case.dir.join("config.json")).unwrap().contains("\"sliding_window\": ");
    let mut variants = vec![(false, false), (true, false)];
    if has_window {
        variants.push((true, true));
    }
    for (hoist, shrink) in variants {
        let label = match (hoist, shrink) {
            (false, _) => "config.json as written",
            (true, false) => "config.json + top-level rope_theta",
            (true, true) => "config.json + top-level rope_theta, sliding_window - 1",
        };
        let mi = match load_mi(&case.dir, hoist, shrink).and_then(|m| mi_resid_post(&m, &case.ids, case.b, case.t)) {
            Ok(a) => a,
            Err(e) => {
                println!("candle-mi ({label}): FAILED: {e}");
                continue;
            }
        };
        println!("candle-mi ({label}):");
        println!(
            "| layer | ours vs candle-mi: max abs | max rel | first pos > 1e-4 | ours vs HF rel | candle-mi vs HF rel | first pos > 1e-4 (mi vs HF) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for l in 0..ours_acts.len() {
            let (abs, rel, first) = compare(&ours_acts[l], &mi[l], &case.lengths);
            let (ours_hf, mi_hf, mi_hf_first) = match &case.reference {
                Some(r) => {
                    let (_, o, _) = compare(&ours_acts[l], &r[l], &case.lengths);
                    let (_, m, f) = compare(&mi[l], &r[l], &case.lengths);
                    (format!("{o:.2e}"), format!("{m:.2e}"), fmt_first(f))
                }
                None => ("n/a".into(), "n/a".into(), "n/a".into()),
            };
            println!("| {l} | {abs:.2e} | {rel:.2e} | {} | {ours_hf} | {mi_hf} | {mi_hf_first} |", fmt_first(first));
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "../..".into()));
    let mut cases: Vec<Case> =
        ["tiny-llama", "tiny-llama-plain", "tiny-gemma2"].iter().map(|n| fixture_case(&root, n)).collect();
    for rel in ["pipelines/tiny/llama/base", "pipelines/tiny/llama/chat"] {
        if root.join(rel).join("config.json").exists() {
            cases.push(pipeline_case(&root, rel, 96, 512));
        }
    }
    for case in &cases {
        run(case);
    }
}
