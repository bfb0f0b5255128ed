//! Parity of the candle forwards with Hugging Face transformers, on the tiny random models of
//! `tests/fixtures/` (written by `scripts/make_tiny_models.py`; no Python at test time).
//!
//! Error measure, per tensor and over real (non-padded) tokens only:
//! `max |ours - reference| / max |reference|`, required ≤ 1e-4 in f32.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use stages::models::{Model, ModelError};

const MAX_REL_ERR: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Reference {
    ids: Tensor,
    mask: Tensor,
    lengths: Vec<usize>,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn reference(name: &str) -> Reference {
    let tensors =
        candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = tensors["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = tensors["attention_mask"].to_dtype(DType::U8).unwrap();
    let lengths = mask
        .to_dtype(DType::U32)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(|n| n as usize)
        .collect();
    Reference { ids, mask, lengths, tensors }
}

/// The real tokens of a (B, T, ...) tensor, concatenated: (sum of lengths, ...).
fn real_tokens(xs: &Tensor, lengths: &[usize]) -> Tensor {
    let rows: Vec<Tensor> =
        lengths.iter().enumerate().map(|(b, &n)| xs.i(b).unwrap().narrow(0, 0, n).unwrap()).collect();
    Tensor::cat(&rows, 0).unwrap()
}

fn rel_err(ours: &Tensor, reference: &Tensor, lengths: &[usize]) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let a = real_tokens(&ours.to_dtype(DType::F32).unwrap(), lengths);
    let b = real_tokens(reference, lengths);
    let diff = (a - &b).unwrap().abs().unwrap().flatten_all().unwrap();
    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff / scale.to_scalar::<f32>().unwrap()
}

/// Every block's output and the logits continued from every block, against transformers.
fn check_parity(name: &str) {
    let model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let logits_ref = &r.tensors["logits"];
    for layer in 0..model.num_layers() {
        let resid = model.forward_to_layer(&r.ids, &r.mask, layer).unwrap();
        let err = rel_err(&resid, &r.tensors[&format!("layer_{layer}_out")], &r.lengths);
        let logits = model.forward_from_layer(&resid, &r.mask, layer).unwrap();
        let logits_err = rel_err(&logits, logits_ref, &r.lengths);
        eprintln!("{name}: layer {layer}: resid rel err {err:.2e}, logits rel err {logits_err:.2e}");
        assert!(err <= MAX_REL_ERR, "{name} layer {layer}: {err:e}");
        assert!(logits_err <= MAX_REL_ERR, "{name} logits from {layer}: {logits_err:e}");
        if layer + 1 < model.num_layers() {
            let hf = &r.tensors[&format!("hidden_states_{}", layer + 1)];
            assert!(rel_err(&resid, hf, &r.lengths) <= MAX_REL_ERR);
        }
    }
}

#[test]
fn llama_matches_transformers() {
    check_parity("tiny-llama");
}

#[test]
fn llama_without_rope_scaling_untied_matches_transformers() {
    check_parity("tiny-llama-plain");
}

#[test]
fn gemma2_matches_transformers() {
    check_parity("tiny-gemma2");
}

/// A sequence's real tokens do not depend on the padding of the batch around it, and the mask may
/// be u8 or u32.
#[test]
fn real_tokens_do_not_see_padding() {
    for name in ["tiny-llama", "tiny-gemma2"] {
        let model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let r = reference(name);
        let last = model.num_layers() - 1;
        let n = r.lengths[1];
        let alone_ids = r.ids.i((1..2, ..n)).unwrap();
        let alone_mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let alone = model.forward_to_layer(&alone_ids, &alone_mask, last).unwrap();
        let mask_u32 = r.mask.to_dtype(DType::U32).unwrap();
        let batched = model.forward_to_layer(&r.ids, &mask_u32, last).unwrap();
        let batched = batched.i((1..2, ..n)).unwrap();
        let err = rel_err(&batched, &alone, &[n]);
        assert!(err <= 1e-6, "{name}: {err:e}");
    }
}

#[test]
fn layer_out_of_range_is_an_error() {
    let model = Model::load(&fixture("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let r = reference("tiny-llama");
    let err = model.forward_to_layer(&r.ids, &r.mask, 4).unwrap_err();
    assert!(err.to_string().contains("layer 4 is out of range"), "{err}");
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let err = Model::load(dir, DType::F32, &Device::Cpu).unwrap_err();
    format!("{err}")
}

#[test]
fn missing_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = copy_fixture("tiny-llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.starts_with("no weights in"), "{msg}");
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = copy_fixture("tiny-llama");
    let index = r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = copy_fixture("tiny-gemma2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("corrupt"), "{msg}");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = copy_fixture("tiny-llama");
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, config.replace("\"vocab_size\": 512", "\"vocab_size\": 500")).unwrap();
    let err = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("model.embed_tokens.weight"), "{msg}");
}

#[test]
fn unsupported_model_type_is_named() {
    let dir = copy_fixture("tiny-llama");
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, config.replace("\"llama\"", "\"mistral\"")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("unsupported model_type \"mistral\""), "{msg}");
}

/// f16 and bf16 weights and activations (f32 RoPE tables, norms and softmax) stay near the f32
/// reference: a smoke test of the reduced-precision paths, not a parity claim. bf16 keeps 8
/// significant bits to f16's 11, hence its looser bound. (candle's CPU backend multiplies bf16
/// matrices in f32.)
#[test]
fn f16_and_bf16_forwards_stay_close() {
    for (dtype, bound) in [(DType::F16, 1e-2), (DType::BF16, 4e-2)] {
        for name in ["tiny-llama", "tiny-gemma2"] {
            let model = Model::load(&fixture(name), dtype, &Device::Cpu).unwrap();
            let r = reference(name);
            let last = model.num_layers() - 1;
            let resid = model.forward_to_layer(&r.ids, &r.mask, last).unwrap();
            assert_eq!(resid.dtype(), dtype);
            let err = rel_err(&resid, &r.tensors[&format!("layer_{last}_out")], &r.lengths);
            let logits = model.forward_from_layer(&resid, &r.mask, last).unwrap();
            let logits_err = rel_err(&logits, &r.tensors["logits"], &r.lengths);
            eprintln!("{name}: {dtype:?}: resid rel err {err:.2e}, logits rel err {logits_err:.2e}");
            assert!(err <= bound && logits_err <= bound, "{name} {dtype:?}: {err:e} {logits_err:e}");
        }
    }
}

/// `dtype = "auto"` reads the checkpoint's dtype from its config, under either key transformers
/// writes; a config naming none means f32; a dtype pipe cannot run names the file and key.
#[test]
fn checkpoint_dtype_is_read_from_the_config() {
    use stages::models::checkpoint_dtype;
    let dir = copy_fixture("tiny-llama");
    let config_path = dir.path().join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |entries: &[(&str, serde_json::Value)]| {
        let mut config = original.clone();
        let obj = config.as_object_mut().unwrap();
        obj.remove("torch_dtype");
        obj.remove("dtype");
        for (k, v) in entries {
            obj.insert(k.to_string(), v.clone());
        }
        std::fs::write(&config_path, config.to_string()).unwrap();
        checkpoint_dtype(dir.path())
    };
    use serde_json::json;
    assert_eq!(with(&[]).unwrap(), DType::F32);
    assert_eq!(with(&[("torch_dtype", json!("bfloat16"))]).unwrap(), DType::BF16);
    assert_eq!(with(&[("dtype", json!("float16"))]).unwrap(), DType::F16);
    assert_eq!(with(&[("dtype", json!("float32"))]).unwrap(), DType::F32);
    assert_eq!(with(&[("torch_dtype", json!(null)), ("dtype", json!("bfloat16"))]).unwrap(), DType::BF16);
    let err = with(&[("torch_dtype", json!("float64"))]).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("torch_dtype") && err.contains("float64"), "{err}");
}
