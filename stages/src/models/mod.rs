//! Transformer forwards that can stop after any decoder block: one file per model family
//! (`llama`, `gemma2`), and [`Model`], which loads either from a local Hugging Face model folder.

mod common;
pub mod gemma2;
pub mod llama;
pub mod tiny;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use gemma2::Gemma2;
pub use llama::Llama;

/// Why a model folder could not be loaded. Each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {}: {source}; point the stage at a complete model folder", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid {}: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error(
        "unsupported model_type {model_type:?} in {}: pipe implements \"llama\" and \"gemma2\"",
        path.display()
    )]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json \
         (pipe reads safetensors only)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("{} is listed in {} but missing; download the complete model", path.display(), index.display())]
    MissingShard { path: PathBuf, index: PathBuf },
    #[error("cannot open safetensors file {}: {source}; the file may be truncated or corrupt", path.display())]
    Safetensors { path: PathBuf, source: Box<candle_core::Error> },
    #[error(
        "{}: {key} = {value} is not a dtype pipe runs models in (float32, bfloat16, float16); \
         set the stage's `dtype` explicitly",
        path.display()
    )]
    UnknownDtype { path: PathBuf, key: &'static str, value: String },
    #[error("the weights in {} do not fit {}: {source}", dir.display(), config.display())]
    Weights { dir: PathBuf, config: PathBuf, source: Box<candle_core::Error> },
}

/// A loaded decoder of one of the supported families.
#[derive(Debug, Clone)]
pub enum Model {
    Llama(Llama),
    Gemma2(Gemma2),
}

impl Model {
    /// Loads a base and a chat model (the pair every stage that runs models needs), logging what
    /// is loaded where; `device_name` is the device as the run names it (`cpu`, `cuda:0`).
    pub fn load_pair(
        base_dir: &Path,
        chat_dir: &Path,
        dtype: DType,
        device: &Device,
        device_name: &str,
    ) -> Result<(Model, Model), ModelError> {
        tracing::info!(
            "loading {} and {} ({dtype:?} on {device_name})",
            base_dir.display(),
            chat_dir.display()
        );
        Ok((Model::load(base_dir, dtype, device)?, Model::load(chat_dir, dtype, device)?))
    }

    /// Loads the model in `dir` (a Hugging Face `save_pretrained` folder): `config.json` picks
    /// the family by `model_type`; the weights are `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`, converted to `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = read_json(&config_path)?;
        let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or_default().to_string();
        let files = weight_files(dir)?;
        for path in &files {
            // SAFETY: the file is mapped read-only; pipe never writes into model folders.
            unsafe { MmapedSafetensors::new(path) }
                .map_err(|source| ModelError::Safetensors { path: path.clone(), source: Box::new(source) })?;
        }
        // SAFETY: as above.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|source| ModelError::Safetensors { path: files[0].clone(), source: Box::new(source) })?;
        let weights_err = |source: candle_core::Error| ModelError::Weights {
            dir: dir.to_path_buf(),
            config: config_path.clone(),
            source: Box::new(source),
        };
        let json_err = |source| ModelError::Json { path: config_path.clone(), source };
        match model_type.as_str() {
            "llama" => {
                let cfg: llama::Config = serde_json::from_value(config).map_err(json_err)?;
                Ok(Self::Llama(Llama::load(vb, &cfg).map_err(weights_err)?))
            }
            "gemma2" => {
                let cfg: gemma2::Config = serde_json::from_value(config).map_err(json_err)?;
                Ok(Self::Gemma2(Gemma2::load(vb, &cfg).map_err(weights_err)?))
            }
            _ => Err(ModelError::UnsupportedModelType { path: config_path, model_type }),
        }
    }

    /// The `model_type` of the family, as in `config.json`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Llama(_) => "llama",
            Self::Gemma2(_) => "gemma2",
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Llama(m) => m.device(),
            Self::Gemma2(m) => m.device(),
        }
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Llama(m) => m.dtype(),
            Self::Gemma2(m) => m.dtype(),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(m) => m.num_layers(),
            Self::Gemma2(m) => m.num_layers(),
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.hidden_size(),
            Self::Gemma2(m) => m.hidden_size(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.vocab_size(),
            Self::Gemma2(m) => m.vocab_size(),
        }
    }

    /// See [`Llama::forward_to_layer`].
    pub fn forward_to_layer(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward_to_layer(ids, attention_mask, layer),
            Self::Gemma2(m) => m.forward_to_layer(ids, attention_mask, layer),
        }
    }

    /// See [`Llama::forward_from_layer`].
    pub fn forward_from_layer(
        &self,
        resid: &Tensor,
        attention_mask: &Tensor,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward_from_layer(resid, attention_mask, layer),
            Self::Gemma2(m) => m.forward_from_layer(resid, attention_mask, layer),
        }
    }
}

/// The dtype the checkpoint in `dir` is saved in, as its `config.json` names it (`torch_dtype`,
/// or `dtype` as transformers writes it since 4.56): what transformers loads with
/// `torch_dtype="auto"`. f32 when the config names none, as transformers does then.
pub fn checkpoint_dtype(dir: &Path) -> Result<DType, ModelError> {
    let path = dir.join("config.json");
    let config: serde_json::Value = read_json(&path)?;
    let Some((key, value)) = ["torch_dtype", "dtype"]
        .into_iter()
        .find_map(|key| config.get(key).filter(|v| !v.is_null()).map(|v| (key, v)))
    else {
        return Ok(DType::F32);
    };
    let name = value.as_str().map(|s| s.strip_prefix("torch.").unwrap_or(s));
    match name {
        Some("float32" | "float") => Ok(DType::F32),
        Some("bfloat16") => Ok(DType::BF16),
        Some("float16" | "half") => Ok(DType::F16),
        _ => Err(ModelError::UnknownDtype { path, key, value: value.to_string() }),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
}

/// The safetensors files of a model folder: the shards of `model.safetensors.index.json` (in name
/// order) if it exists, else `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let index: Index = read_json(&index_path)?;
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::MissingShard { path: missing.clone(), index: index_path });
        }
        if files.is_empty() {
            return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights { dir: dir.to_path_buf() })
}
