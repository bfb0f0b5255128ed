//! The `crosscoder` stage through the real `pipe` binary: a dictionary_learning checkpoint folder
//! written by torch becomes a `train`-shaped output.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use stages::train::load_crosscoder;

use crate::support::Env;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("stages/tests/fixtures/crosscoder")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// The reference BatchTopK run's last weights and threshold.
fn last_step(name: &str) -> Vec<f32> {
    let all = candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap();
    let steps = &all[name];
    values(&steps.get(steps.dim(0).unwrap() - 1).unwrap())
}

fn pipeline(checkpoint: &str) -> String {
    format!(
        "[pipeline]\nname = \"imp\"\n\n[stages.cc]\nkind = \"crosscoder\"\ncheckpoint = \"{checkpoint}\"\n"
    )
}

#[test]
fn dictionary_learning_folder_imports_and_reruns_skip() {
    let env = Env::pipe();
    env.write("p.toml", &pipeline(&fixtures().join("dl-checkpoint").display().to_string()));
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "cc");
    let (cc, threshold) = load_crosscoder(&out, &Device::Cpu).unwrap();
    assert_eq!((cc.d, cc.f), (8, 32));
    assert_eq!(values(cc.w_enc.as_tensor()), last_step("btk.after.encoder.weight"));
    assert_eq!(values(cc.b_enc.as_tensor()), last_step("btk.after.encoder.bias"));
    assert_eq!(values(cc.w_dec.as_tensor()), last_step("btk.after.decoder.weight"));
    assert_eq!(values(cc.b_dec.as_tensor()), last_step("btk.after.decoder.bias"));
    assert_eq!(threshold, Some(last_step("btk.threshold")[0]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["trainer"]["dict_class"], "BatchTopKCrossCoder");
    assert_eq!(config["trainer"]["k"], 4);
    assert_eq!(config["pipe"]["imported_from"], "model_final.pt");
    let show = env.json(&["show", "p.toml", "cc"]);
    assert!(show.to_string().contains("dict_size"), "{show}");

    assert_eq!(env.actions("p.toml", &[]), vec![("cc".to_string(), "skip".to_string())]);
    let manifest = out.parent().unwrap().join("manifest.json");
    let before = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    env.ok(&["run", "p.toml"]);
    assert_eq!(env.out("p.toml", "cc"), out);
    assert_eq!(std::fs::metadata(&manifest).unwrap().modified().unwrap(), before, "the rerun skipped");
}

#[test]
fn a_bad_checkpoint_fails_the_stage_naming_the_file() {
    let env = Env::pipe();
    env.write("ckpt/weights.pt", "not a torch file");
    env.write("p.toml", &pipeline("ckpt/weights.pt"));
    let e = env.stderr(&["run", "p.toml"], 1);
    assert!(e.contains("weights.pt") && e.contains("torch.save"), "{e}");
}
