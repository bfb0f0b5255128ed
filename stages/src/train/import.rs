//! The `crosscoder` stage: a crosscoder trained elsewhere (a dictionary_learning checkpoint or a
//! published Hugging Face crosscoder), checked and written out exactly as the `train` stage
//! writes its own (`crosscoder.safetensors` + `config.json`), so downstream stages take either.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use engine::{Arity, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// dictionary_learning's `CodeNormalization.CROSSCODER`, assumed when a checkpoint predates the
/// `code_normalization_id` buffer (as the reference's `from_pretrained` does).
const CROSSCODER_ID: i64 = 1;
/// `CodeNormalization.DECOUPLED`: per-model codes, (2, F), which no stage here handles.
const DECOUPLED_ID: i64 = 5;
/// What torch.compile prefixes every state-dict key with.
const COMPILED_PREFIX: &str = "_orig_mod.";
/// NormalizableMixin buffers, written through unchanged.
const NORMALIZATION_BUFFERS: [&str; 4] =
    ["activation_mean", "activation_std", "activation_global_scale", "target_rms"];
/// Files a checkpoint folder is searched for, in this order, before `checkpoint_{step}.pt`.
const FOLDER_FILES: [&str; 3] = ["model_final.pt", "model.safetensors", "crosscoder.safetensors"];

pub struct CrosscoderImport;

/// Parameters of the `crosscoder` stage. Input: `checkpoint`, a `.pt` or `.safetensors` file or a
/// folder holding one and (optionally) its `config.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// The file to read inside a `checkpoint` folder, relative to it. Default: `model_final.pt`,
    /// `model.safetensors` or `crosscoder.safetensors`, else the newest `checkpoint_{step}.pt`,
    /// else the folder's only `.pt` or `.safetensors` file.
    #[serde(default)]
    pub file: Option<String>,
}

impl Stage for CrosscoderImport {
    type Params = ImportParams;
    const KIND: &'static str = "crosscoder";
    const VERSION: u32 = 1;
    const DOC: &'static str = "A crosscoder trained elsewhere (a dictionary_learning .pt or safetensors \
        checkpoint, or a published Hugging Face crosscoder), written as the `train` stage writes its own.";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::path(
                "checkpoint",
                Arity::One,
                "A `.pt` (torch state dict) or `.safetensors` file, a dictionary_learning checkpoint \
                 folder (`model_final.pt` or `checkpoint_{step}.pt`, `config.json`), or a Hugging Face \
                 model reference `org/name[@revision]` in the local cache.",
            )
            .with_resolver(crate::hf::model_ref),
        ]
    }

    fn check(&self, p: &ImportParams) -> Result<(), ParamError> {
        if let Some(file) = &p.file {
            let path = Path::new(file);
            let plain = path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if file.is_empty() || !plain {
                return Err(ParamError::new(
                    &["file"],
                    "must be a relative path inside the checkpoint folder, without `..`",
                ));
            }
        }
        Ok(())
    }

    fn run(&self, p: &ImportParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let Some(src) = ctx.external("checkpoint").first().cloned() else {
            return Err(StageError::failed("input `checkpoint` is not set"));
        };
        let imported = import_checkpoint(&src, p.file.as_deref())?;
        imported.write(ctx.out_dir())?;
        ctx.record_metric("d", imported.d as u64);
        ctx.record_metric("dict_size", imported.dict_size as u64);
        if let Some(k) = imported.k {
            ctx.record_metric("k", k);
        }
        Ok(())
    }
}

/// A checked crosscoder state dict, ready to be written in the `train` stage's format.
#[derive(Debug)]
pub struct Imported {
    /// The file the tensors came from.
    pub source: PathBuf,
    /// dictionary_learning names, `_orig_mod.` stripped: the four weights in f32,
    /// `code_normalization_id` (i64), `k` (i64) and `threshold` (f32) for BatchTopK, and the
    /// NormalizableMixin buffers present in the source, unchanged.
    pub tensors: BTreeMap<String, Tensor>,
    /// `{"trainer": {...}, "pipe": {"imported_from": ...}}`.
    pub config: Value,
    pub d: usize,
    pub dict_size: usize,
    pub k: Option<u64>,
}

impl Imported {
    /// Writes `crosscoder.safetensors` and `config.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let path = dir.join("crosscoder.safetensors");
        let tensors: HashMap<&str, Tensor> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&self.config).expect("serializable"))
            .map_err(|e| StageError::io(path.display(), e))
    }
}

fn fail(path: &Path, msg: impl std::fmt::Display) -> StageError {
    StageError::failed(format!("{}: {msg}", path.display()))
}

/// Reads and checks the crosscoder at `src` (a file, or a folder and optionally the `file` in it;
/// a folder's `config.json` provides the trainer block).
pub fn import_checkpoint(src: &Path, file: Option<&str>) -> Result<Imported, StageError> {
    let (path, config) = if src.is_dir() {
        let path = pick_file(src, file)?;
        let config_path = src.join("config.json");
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => Some(
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|e| fail(&config_path, format!("not valid JSON ({e}); fix or remove it")))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StageError::io(config_path.display(), e)),
        };
        (path, config)
    } else {
        if file.is_some() {
            return Err(fail(src, "`file` chooses a file inside a checkpoint folder, but this is a file"));
        }
        (src.to_owned(), None)
    };
    let raw = read_state_dict(&path)?;
    check_state_dict(&path, raw, config)
}

/// The checkpoint file of a folder (see [`ImportParams::file`]).
fn pick_file(dir: &Path, file: Option<&str>) -> Result<PathBuf, StageError> {
    if let Some(file) = file {
        let path = dir.join(file);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(fail(dir, format!("no file `{file}` (parameter `file`)")))
        };
    }
    for name in FOLDER_FILES {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| StageError::io(dir.display(), e))?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let step = |n: &str| n.strip_prefix("checkpoint_")?.strip_suffix(".pt")?.parse::<u64>().ok();
    if let Some(newest) = names.iter().filter_map(|n| Some((step(n)?, n))).max() {
        return Ok(dir.join(newest.1));
    }
    let weights: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".pt") || n.ends_with(".pth") || n.ends_with(".safetensors"))
        .collect();
    match weights.as_slice() {
        [one] => Ok(dir.join(one)),
        [] => Err(fail(
            dir,
            "no crosscoder checkpoint: expected model_final.pt, model.safetensors, crosscoder.safetensors \
             or checkpoint_{step}.pt",
        )),
        many => Err(fail(
            dir,
            format!(
                "several checkpoints ({}): set `file` to the one to import",
                many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// All tensors of a torch zip checkpoint or a safetensors file, on the CPU, `_orig_mod.` stripped.
fn read_state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>, StageError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors: Vec<(String, Tensor)> = match ext {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| fail(path, format!("not a readable safetensors file: {e}")))?
            .into_iter()
            .collect(),
        "pt" | "pth" | "bin" => candle_core::pickle::read_all(path).map_err(|e| {
            fail(path, format!("not a readable torch checkpoint ({e}); save it with torch.save (zip format)"))
        })?,
        _ => return Err(fail(path, "expected a .pt, .pth, .bin or .safetensors file")),
    };
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let stripped = name.strip_prefix(COMPILED_PREFIX).unwrap_or(&name).to_string();
        if out.insert(stripped.clone(), t).is_some() {
            return Err(fail(
                path,
                format!("tensor `{stripped}` appears both with and without `{COMPILED_PREFIX}`"),
            ));
        }
    }
    Ok(out)
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

fn is_int(dtype: DType) -> bool {
    matches!(dtype, DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64)
}

/// The value of a one-element tensor.
fn scalar(path: &Path, name: &str, t: &Tensor) -> Result<f64, StageError> {
    if t.elem_count() != 1 {
        return Err(fail(path, format!("`{name}` has shape {:?}, expected a scalar", t.dims())));
    }
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .map(|v| v[0])
        .map_err(|e| fail(path, format!("`{name}`: {e}")))
}

fn check_state_dict(
    path: &Path,
    mut raw: BTreeMap<String, Tensor>,
    source_config: Option<Value>,
) -> Result<Imported, StageError> {
    let mut take = |name: &str| raw.remove(name);
    let mut weight = |name: &str, rank: usize| -> Result<Tensor, StageError> {
        let t = take(name).ok_or_else(|| {
            fail(path, format!("no tensor `{name}`: not a dictionary_learning crosscoder state dict"))
        })?;
        if !is_float(t.dtype()) {
            return Err(fail(path, format!("`{name}` is {:?}, expected a floating-point tensor", t.dtype())));
        }
        if t.rank() != rank {
            return Err(fail(path, format!("`{name}` has shape {:?}, expected {rank} dimensions", t.dims())));
        }
        t.to_dtype(DType::F32).map_err(|e| fail(path, format!("`{name}`: {e}")))
    };
    let w_enc = weight("encoder.weight", 3)?;
    let b_enc = weight("encoder.bias", 1)?;
    let w_dec = weight("decoder.weight", 3)?;
    let b_dec = weight("decoder.bias", 2)?;
    let (l, d, f) = w_enc.dims3().expect("rank checked");
    if l != 2 {
        return Err(fail(
            path,
            format!(
                "`encoder.weight` has shape {:?}: {l} models, but a crosscoder here diffs exactly 2",
                w_enc.dims()
            ),
        ));
    }
    for (name, t, want) in [
        ("encoder.bias", &b_enc, vec![f]),
        ("decoder.weight", &w_dec, vec![2, f, d]),
        ("decoder.bias", &b_dec, vec![2, d]),
    ] {
        if t.dims() != want.as_slice() {
            return Err(fail(
                path,
                format!(
                    "`{name}` has shape {:?}, expected {want:?} (from `encoder.weight` {:?} = (models, d, dict_size))",
                    t.dims(),
                    w_enc.dims()
                ),
            ));
        }
    }

    let norm_id = match take("code_normalization_id") {
        Some(t) if is_int(t.dtype()) => scalar(path, "code_normalization_id", &t)? as i64,
        Some(t) => {
            return Err(fail(
                path,
                format!("`code_normalization_id` is {:?}, expected an integer", t.dtype()),
            ));
        }
        None => {
            tracing::warn!(
                "{}: no code_normalization_id (an older checkpoint): assuming CROSSCODER",
                path.display()
            );
            CROSSCODER_ID
        }
    };
    if norm_id == DECOUPLED_ID {
        return Err(fail(
            path,
            "code_normalization_id 5 (DECOUPLED: per-model codes) is not supported; import a crosscoder with \
             CROSSCODER, SAE, MIXED or NONE code normalization",
        ));
    }
    if super::crosscoder::CodeNormalization::from_id(norm_id).is_none() {
        return Err(fail(
            path,
            format!("code_normalization_id {norm_id} is not a known code normalization (1-4)"),
        ));
    }

    let trainer_in = source_config.as_ref().and_then(|c| c.get("trainer")).filter(|t| t.is_object()).cloned();
    let threshold = match take("threshold") {
        Some(t) if is_float(t.dtype()) => Some(scalar(path, "threshold", &t)? as f32),
        Some(t) => return Err(fail(path, format!("`threshold` is {:?}, expected a float", t.dtype()))),
        None => None,
    };
    let k = match take("k") {
        Some(t) if is_int(t.dtype()) => Some(scalar(path, "k", &t)?),
        Some(t) => return Err(fail(path, format!("`k` is {:?}, expected an integer", t.dtype()))),
        None if threshold.is_some() => {
            // dictionary_learning registers `k` as int32, which the torch reader skips; its
            // config.json has it (k_target once annealing is over).
            let from_config = trainer_in.as_ref().and_then(|t| {
                let annealed = t.get("k_annealing_steps").and_then(Value::as_u64).unwrap_or(0) > 0;
                let key =
                    if annealed && t.get("k_target").is_some_and(Value::is_u64) { "k_target" } else { "k" };
                t.get(key).and_then(Value::as_u64)
            });
            match from_config {
                Some(k) => {
                    tracing::info!(
                        "{}: `k` = {k} taken from config.json (the .pt stores it as int32, which its \
                         reader skips)",
                        path.display()
                    );
                    Some(k as f64)
                }
                None => {
                    return Err(fail(
                        path,
                        "BatchTopK crosscoder (it has `threshold`) without a readable `k` (dictionary_learning \
                         stores it as int32, which the .pt reader skips): point `checkpoint` at the folder that \
                         holds this file and its config.json (trainer.k)",
                    ));
                }
            }
        }
        None => None,
    };
    let k = match k {
        Some(k) if k >= 1.0 && k.fract() == 0.0 => Some(k as u64),
        Some(k) => return Err(fail(path, format!("`k` is {k}, expected a positive integer"))),
        None => None,
    };

    let cpu = &Device::Cpu;
    let tensor = |v: Result<Tensor, candle_core::Error>| v.map_err(|e| fail(path, e));
    let mut tensors = BTreeMap::new();
    tensors.insert("encoder.weight".to_string(), w_enc);
    tensors.insert("encoder.bias".to_string(), b_enc);
    tensors.insert("decoder.weight".to_string(), w_dec);
    tensors.insert("decoder.bias".to_string(), b_dec);
    tensors.insert("code_normalization_id".to_string(), tensor(Tensor::new(norm_id, cpu))?);
    if let Some(k) = k {
        tensors.insert("k".to_string(), tensor(Tensor::new(k as i64, cpu))?);
        tensors.insert("threshold".to_string(), tensor(Tensor::new(threshold.unwrap_or(-1.0), cpu))?);
    }
    for name in NORMALIZATION_BUFFERS {
        if let Some(t) = take(name) {
            let want: &[usize] =
                if name.starts_with("activation_m") || name == "activation_std" { &[2, d] } else { &[] };
            if t.dims() != want && !(want.is_empty() && t.elem_count() == 1) {
                return Err(fail(path, format!("`{name}` has shape {:?}, expected {want:?}", t.dims())));
            }
            tensors.insert(name.to_string(), t);
        }
    }
    if !raw.is_empty() {
        tracing::warn!(
            "{}: ignoring tensors that are not part of a crosscoder: {}",
            path.display(),
            raw.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }

    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let trainer = match trainer_in {
        Some(t) => {
            for (key, want) in [("activation_dim", d), ("dict_size", f)] {
                if let Some(got) = t.get(key).and_then(Value::as_u64)
                    && got != want as u64
                {
                    return Err(fail(
                        path,
                        format!("config.json says trainer.{key} = {got}, but the tensors have {want}"),
                    ));
                }
            }
            t
        }
        None => {
            let (dict_class, trainer_class) = match k {
                Some(_) => ("BatchTopKCrossCoder", "BatchTopKCrossCoderTrainer"),
                None => ("CrossCoder", "CrossCoderTrainer"),
            };
            let mut t = json!({
                "dict_class": dict_class,
                "trainer_class": trainer_class,
                "activation_dim": d,
                "dict_size": f,
                "num_layers": 2,
            });
            if let Some(k) = k {
                t["k"] = k.into();
            }
            t
        }
    };
    let mut pipe = json!({ "imported_from": file_name });
    // A Hugging Face crosscoder's config.json holds its init kwargs, not a trainer block.
    if let Some(c) = source_config.filter(|c| c.get("trainer").is_none()) {
        pipe["source_config"] = c;
    }
    Ok(Imported {
        source: path.to_owned(),
        tensors,
        config: json!({ "trainer": trainer, "pipe": pipe }),
        d,
        dict_size: f,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::load_crosscoder;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crosscoder")
    }

    /// The BatchTopK reference run's final weights and threshold, in f32.
    fn reference() -> BTreeMap<String, Tensor> {
        let all =
            candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap();
        let mut out = BTreeMap::new();
        for name in ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"] {
            let steps = &all[&format!("btk.after.{name}")];
            let last = steps.get(steps.dim(0).unwrap() - 1).unwrap();
            out.insert(name.to_string(), last.to_dtype(DType::F32).unwrap());
        }
        let thr = &all["btk.threshold"];
        out.insert(
            "threshold".into(),
            thr.get(thr.dim(0).unwrap() - 1).unwrap().to_dtype(DType::F32).unwrap(),
        );
        out
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    fn assert_reference_weights(got: &Imported) {
        for (name, want) in reference() {
            assert_eq!(values(&got.tensors[&name]), values(&want), "{name}");
            assert_eq!(got.tensors[&name].dtype(), DType::F32, "{name}");
        }
        assert_eq!((got.d, got.dict_size, got.k), (8, 32, Some(4)));
        assert_eq!(got.tensors["k"].dtype(), DType::I64);
        assert_eq!(got.tensors["k"].to_scalar::<i64>().unwrap(), 4);
        assert_eq!(got.tensors["code_normalization_id"].to_scalar::<i64>().unwrap(), 1);
        assert_eq!(got.tensors["activation_mean"].dims(), &[2, 8]);
        assert!(values(&got.tensors["activation_std"]).iter().all(|v| v.is_nan()));
        assert_eq!(values(&got.tensors["target_rms"]), vec![1.0]);
        assert_eq!(values(&got.tensors["activation_global_scale"]), vec![1.0]);
    }

    /// Writes `tensors` (names as given) as `<name>` in a temp dir and imports that file.
    fn import_tensors(
        name: &str,
        tensors: &[(&str, Tensor)],
    ) -> (tempfile::TempDir, Result<Imported, StageError>) {
        let dir = tempfile::tempdir().unwrap();
        let map: HashMap<&str, Tensor> = tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.path().join(name)).unwrap();
        let got = import_checkpoint(&dir.path().join(name), None);
        (dir, got)
    }

    /// A valid L1 crosscoder (d = 3, F = 5) in f64 with the given replacements (None drops one).
    fn l1_tensors(changes: &[(&'static str, Option<Tensor>)]) -> Vec<(&'static str, Tensor)> {
        let cpu = &Device::Cpu;
        let mut t: BTreeMap<&'static str, Tensor> = BTreeMap::new();
        t.insert("encoder.weight", Tensor::arange(0f64, 30.0, cpu).unwrap().reshape((2, 3, 5)).unwrap());
        t.insert("encoder.bias", Tensor::zeros(5, DType::F64, cpu).unwrap());
        t.insert("decoder.weight", Tensor::ones((2, 5, 3), DType::F64, cpu).unwrap());
        t.insert("decoder.bias", Tensor::zeros((2, 3), DType::F64, cpu).unwrap());
        for (name, v) in changes {
            match v {
                Some(v) => t.insert(name, v.clone()),
                None => t.remove(name),
            };
        }
        t.into_iter().collect()
    }

    fn check_err(changes: &[(&'static str, Option<Tensor>)], expected: &[&str]) {
        let (_dir, got) = import_tensors("bad.safetensors", &l1_tensors(changes));
        let msg = got.unwrap_err().to_string();
        assert!(msg.contains("bad.safetensors"), "the error names the file: {msg}");
        for e in expected {
            assert!(msg.contains(e), "expected `{e}` in: {msg}");
        }
    }

    #[test]
    fn torch_pt_fixture_has_the_reference_weights() {
        let got = import_checkpoint(&fixtures().join("batchtopk.pt"), None).unwrap();
        assert_reference_weights(&got);
        assert_eq!(got.config["trainer"]["dict_class"], "BatchTopKCrossCoder");
        assert_eq!(got.config["trainer"]["k"], 4);
        assert_eq!(got.config["pipe"]["imported_from"], "batchtopk.pt");
    }

    #[test]
    fn dictionary_learning_folder_takes_int32_k_and_trainer_from_config() {
        let got = import_checkpoint(&fixtures().join("dl-checkpoint"), None).unwrap();
        assert_reference_weights(&got);
        assert_eq!(got.source.file_name().unwrap(), "model_final.pt");
        assert_eq!(got.config["trainer"]["trainer_class"], "BatchTopKCrossCoderTrainer");
        assert_eq!(got.config["trainer"]["threshold_start_step"], 2);
        assert_eq!(got.config["pipe"]["imported_from"], "model_final.pt");
    }

    #[test]
    fn int32_k_without_config_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model_final.pt");
        std::fs::copy(fixtures().join("dl-checkpoint/model_final.pt"), &file).unwrap();
        let msg = import_checkpoint(&file, None).unwrap_err().to_string();
        assert!(
            msg.contains("model_final.pt") && msg.contains("`k`") && msg.contains("config.json"),
            "{msg}"
        );
    }

    #[test]
    fn written_output_loads_like_a_train_stage_output() {
        let got = import_checkpoint(&fixtures().join("batchtopk.pt"), None).unwrap();
        let out = tempfile::tempdir().unwrap();
        got.write(out.path()).unwrap();
        let (cc, threshold) = load_crosscoder(out.path(), &Device::Cpu).unwrap();
        let want = reference();
        assert_eq!(values(cc.w_enc.as_tensor()), values(&want["encoder.weight"]));
        assert_eq!(values(cc.w_dec.as_tensor()), values(&want["decoder.weight"]));
        assert_eq!(threshold, Some(values(&want["threshold"])[0]));
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["trainer"]["dict_size"], 32);
        // The written file is itself importable, to the same tensors.
        let again = import_checkpoint(&out.path().join("crosscoder.safetensors"), None).unwrap();
        assert_eq!(again.tensors.keys().collect::<Vec<_>>(), got.tensors.keys().collect::<Vec<_>>());
        for (name, t) in &got.tensors {
            let (a, b) = (values(t), values(&again.tensors[name]));
            assert!(a.iter().zip(&b).all(|(x, y)| x == y || (x.is_nan() && y.is_nan())), "{name}");
        }
    }

    #[test]
    fn safetensors_l1_crosscoder_in_f64_without_code_normalization() {
        let prefixed: Vec<(String, Tensor)> =
            l1_tensors(&[]).into_iter().map(|(n, t)| (format!("{COMPILED_PREFIX}{n}"), t)).collect();
        let named: Vec<(&str, Tensor)> = prefixed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let (_dir, got) = import_tensors("model.safetensors", &named);
        let got = got.unwrap();
        assert_eq!((got.d, got.dict_size, got.k), (3, 5, None));
        assert_eq!(got.tensors["encoder.weight"].dtype(), DType::F32);
        assert_eq!(values(&got.tensors["encoder.weight"])[29], 29.0);
        assert_eq!(got.tensors["code_normalization_id"].to_scalar::<i64>().unwrap(), CROSSCODER_ID);
        assert!(!got.tensors.contains_key("k") && !got.tensors.contains_key("threshold"));
        assert_eq!(got.config["trainer"]["dict_class"], "CrossCoder");
    }

    #[test]
    fn hugging_face_folder_keeps_its_config_beside_a_synthesized_trainer() {
        let dir = tempfile::tempdir().unwrap();
        let map: HashMap<&str, Tensor> = l1_tensors(&[]).into_iter().collect();
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"activation_dim": 3, "dict_size": 5, "num_layers": 2}"#,
        )
        .unwrap();
        let got = import_checkpoint(dir.path(), None).unwrap();
        assert_eq!(got.config["trainer"]["activation_dim"], 3);
        assert_eq!(got.config["pipe"]["source_config"]["dict_size"], 5);
    }

    #[test]
    fn folder_without_model_final_takes_the_newest_step_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for step in [0, 2, 10] {
            std::fs::copy(fixtures().join("batchtopk.pt"), dir.path().join(format!("checkpoint_{step}.pt")))
                .unwrap();
        }
        let got = import_checkpoint(dir.path(), None).unwrap();
        assert_eq!(got.config["pipe"]["imported_from"], "checkpoint_10.pt");
        let got = import_checkpoint(dir.path(), Some("checkpoint_2.pt")).unwrap();
        assert_eq!(got.config["pipe"]["imported_from"], "checkpoint_2.pt");
        let msg = import_checkpoint(dir.path(), Some("nope.pt")).unwrap_err().to_string();
        assert!(msg.contains("nope.pt") && msg.contains("`file`"), "{msg}");
        let empty = tempfile::tempdir().unwrap();
        let msg = import_checkpoint(empty.path(), None).unwrap_err().to_string();
        assert!(msg.contains("no crosscoder checkpoint"), "{msg}");
    }

    #[test]
    fn missing_tensor() {
        check_err(&[("decoder.bias", None)], &["no tensor `decoder.bias`"]);
    }

    #[test]
    fn three_models() {
        let w = Tensor::zeros((3, 3, 5), DType::F64, &Device::Cpu).unwrap();
        check_err(&[("encoder.weight", Some(w))], &["`encoder.weight`", "3 models", "exactly 2"]);
    }

    #[test]
    fn decoder_shape_disagrees_with_encoder() {
        let w = Tensor::zeros((2, 3, 5), DType::F64, &Device::Cpu).unwrap();
        check_err(
            &[("decoder.weight", Some(w))],
            &["`decoder.weight` has shape [2, 3, 5]", "expected [2, 5, 3]"],
        );
    }

    #[test]
    fn integer_weights() {
        let w = Tensor::zeros(5, DType::I64, &Device::Cpu).unwrap();
        check_err(&[("encoder.bias", Some(w))], &["`encoder.bias` is I64"]);
    }

    #[test]
    fn decoupled_code_normalization() {
        let id = Tensor::new(DECOUPLED_ID, &Device::Cpu).unwrap();
        check_err(&[("code_normalization_id", Some(id))], &["DECOUPLED", "not supported"]);
    }

    #[test]
    fn threshold_without_k() {
        let thr = Tensor::new(0.5f32, &Device::Cpu).unwrap();
        check_err(&[("threshold", Some(thr))], &["without a readable `k`"]);
    }

    #[test]
    fn not_a_checkpoint_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weights.pt");
        std::fs::write(&file, b"not a zip").unwrap();
        let msg = import_checkpoint(&file, None).unwrap_err().to_string();
        assert!(msg.contains("weights.pt") && msg.contains("torch.save"), "{msg}");
    }

    #[test]
    fn file_parameter_must_stay_inside_the_folder() {
        let bad = ImportParams { file: Some("../x.pt".into()) };
        assert!(CrosscoderImport.check(&bad).is_err());
        assert!(CrosscoderImport.check(&ImportParams { file: Some("sub/model_final.pt".into()) }).is_ok());
    }
}
