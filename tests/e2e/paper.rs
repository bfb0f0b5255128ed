//! The paper's pipelines (`pipelines/gemma2b.toml`, `llama1b.toml`, `llama8b.toml`, all extending
//! `paper.toml`): without the models and datasets, `pipe plan` names every missing reference and
//! how to download it; with a Hugging Face cache that holds them (here: the tiny models and
//! corpora under the paper's names), they validate and plan the paper's DAG with its settings.

use std::path::{Path, PathBuf};

use crate::support::Env;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const MODELS: [(&str, [&str; 2]); 3] = [
    ("gemma2b", ["google/gemma-2-2b", "google/gemma-2-2b-it"]),
    ("llama1b", ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"]),
    ("llama8b", ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"]),
];
const DATASETS: [&str; 2] =
    ["science-of-finetuning/fineweb-1m-sample", "science-of-finetuning/lmsys-chat-1m-chat-formatted"];

/// A Hugging Face hub cache with every model of the three pipelines (the tiny Llama pair) and
/// both datasets (the tiny corpora, as `data/{train,validation}.jsonl`).
fn fake_hub(root: &Path) {
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snapshot = |folder: String| {
        let dir = root.join(&folder);
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), commit).unwrap();
        let snap = dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        snap
    };
    for (_, pair) in MODELS {
        for (id, tiny) in pair.iter().zip(["base", "chat"]) {
            let snap = snapshot(format!("models--{}", id.replace('/', "--")));
            for f in std::fs::read_dir(repo().join("pipelines/tiny/llama").join(tiny)).unwrap() {
                let f = f.unwrap();
                std::os::unix::fs::symlink(f.path(), snap.join(f.file_name())).unwrap();
            }
        }
    }
    for (id, file) in DATASETS.iter().zip(["web.jsonl", "chat.jsonl"]) {
        let snap = snapshot(format!("datasets--{}", id.replace('/', "--")));
        std::fs::create_dir_all(snap.join("data")).unwrap();
        for split in ["train", "validation"] {
            std::fs::copy(
                repo().join("pipelines/tiny/data").join(file),
                snap.join(format!("data/{split}.jsonl")),
            )
            .unwrap();
        }
    }
}

fn pipeline(name: &str) -> String {
    repo().join("pipelines").join(format!("{name}.toml")).display().to_string()
}

#[test]
fn without_the_models_plan_names_each_missing_reference() {
    let env = Env::pipe();
    let empty = env.path("no-hub");
    std::fs::create_dir_all(&empty).unwrap();
    for (name, pair) in MODELS {
        let o = env.cmd(&["plan", &pipeline(name)]).env("HF_HUB_CACHE", &empty).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        for id in pair.iter().chain(&DATASETS) {
            assert!(
                err.contains(&format!("`{id}` is not in the Hugging Face cache")),
                "{name}: {id} not named:\n{err}"
            );
            assert!(err.contains(&format!("hf download {id}")), "{name}: no download command for {id}");
        }
        assert!(err.contains(&format!("pipelines/{name}.toml:")), "{err}");
        // Each missing reference once (four caches use each model), with its other places.
        assert!(err.contains(&format!("errors in {} (4 distinct)", pipeline(name))), "{err}");
        assert_eq!(err.matches(&format!("`{}` is not in", pair[0])).count(), 1, "{err}");
    }
}

#[test]
fn with_the_models_cached_the_papers_pipelines_plan_their_dag() {
    let env = Env::pipe();
    let hub = env.path("hub");
    fake_hub(&hub);
    let json = |args: &[&str]| -> serde_json::Value {
        let o = env.cmd(args).env("HF_HUB_CACHE", &hub).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let stages = [
        "cache_web",
        "cache_chat",
        "cache_web_val",
        "cache_chat_val",
        "train_batchtopk",
        "train_l1",
        "collect_batchtopk",
        "collect_l1",
        "scale_batchtopk",
        "scale_l1",
        "plot_batchtopk",
        "plot_l1",
        "eval_batchtopk",
        "eval_l1",
    ];
    let mut train_keys = Vec::new();
    for (name, (layer, mu, betas, store)) in [
        ("gemma2b", (13, 0.041, 25_000_000, "f32")),
        ("llama1b", (8, 0.036, 25_000_000, "bf16")),
        ("llama8b", (16, 0.021, 5_000_000, "bf16")),
    ] {
        let file = pipeline(name);
        let plan = json(&["plan", &file, "--json"]);
        assert_eq!(plan["pipeline"], name, "{plan}");
        let mut planned: Vec<&str> =
            plan["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        planned.sort();
        let mut want = stages.to_vec();
        want.sort();
        assert_eq!(planned, want, "{name}");
        assert!(plan["stages"].as_array().unwrap().iter().all(|s| s["action"] == "run"), "{plan}");

        let p = |stage: &str| json(&["show", &file, stage, "--json"])["params"].clone();
        let web = p("cache_web");
        assert_eq!(
            (web["layer"].as_u64(), web["store_dtype"].as_str()),
            (Some(layer), Some(store)),
            "{name}: {web}"
        );
        assert_eq!(web["max_tokens"], 50_000_000);
        let chat = p("cache_chat");
        assert_eq!(chat["column"], if name == "gemma2b" { "text" } else { "text_llama3" }, "{name}");
        assert_eq!(chat["max_tokens"], if name == "gemma2b" { 100_000_000 } else { 50_000_000 });
        assert_eq!(p("cache_chat_val")["max_tokens"], 5_000_000);
        let (ignore, map) = if name == "gemma2b" { (0, "none") } else { (25, "llama3") };
        assert_eq!(
            (web["ignore_first_n"].as_u64(), web["base_token_map"].as_str()),
            (Some(ignore), Some(map)),
            "{name}"
        );
        let bt = p("train_batchtopk");
        assert_eq!(
            (bt["loss"].as_str(), bt["k"].as_u64(), bt["expansion_factor"].as_u64()),
            (Some("batchtopk"), Some(100), Some(32))
        );
        assert_eq!(
            (bt["lr"].as_f64(), bt["batch_size"].as_u64(), bt["epochs"].as_u64()),
            (Some(1e-4), Some(2048), Some(2))
        );
        assert_eq!((bt["warmup_steps"].as_u64(), bt["seed"].as_u64()), (Some(1000), Some(42)));
        let l1 = p("train_l1");
        assert_eq!((l1["loss"].as_str(), l1["mu"].as_f64()), (Some("l1"), Some(mu)), "{name}");
        assert_eq!(p("scale_l1")["tokens_per_cache"], betas, "{name}");
        assert_eq!(p("scale_batchtopk")["tokens_per_cache"], betas, "{name}");
        for stage in ["eval_batchtopk", "eval_l1"] {
            let ev = p(stage);
            assert_eq!(
                (ev["layer"].as_u64(), ev["max_docs"].as_u64(), ev["context_len"].as_u64()),
                (Some(layer), Some(512), Some(1024)),
                "{name}: {ev}"
            );
            assert_eq!(
                (ev["ignore_first_n"].as_u64(), ev["base_token_map"].as_str(), ev["column"].as_str()),
                (Some(ignore), Some(map), Some("conversation")),
                "{name}: {ev}"
            );
            assert_eq!((ev["k_first"].as_u64(), ev["fraction"].as_f64()), (Some(10), Some(0.5)));
        }
        train_keys.push(
            plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == "train_l1").unwrap()["key"]
                .clone(),
        );
    }
    // The same tiny files stand in for every pair here, so only the settings tell the pipelines
    // apart: three different training keys.
    train_keys.dedup();
    assert_eq!(train_keys.len(), 3);
}
