//! The `cache` stage through the real `pipe` binary, on the tiny model pair of `pipelines/tiny`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use stages::cache::ActivationCache;
use stages::models::Model;
use stages::text::{Column, TextTokenizer, open_texts};

use crate::support::{Env, all};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    repo().join("pipelines/tiny")
}

/// A pipeline with one cache stage over the tiny pair; `extra` lines are added to the stage.
fn cache_pipeline(data: &str, extra: &str) -> String {
    let t = tiny();
    format!(
        "[pipeline]\nname = \"c\"\n[stages.cache]\nkind = \"cache\"\nbase = \"{}\"\nchat = \"{}\"\ndata = \"{}\"\nlayer = 2\n{extra}\n",
        t.join("llama/base").display(),
        t.join("llama/chat").display(),
        t.join("data").join(data).display(),
    )
}

fn object_out(env: &Env, file: &str, stage: &str) -> PathBuf {
    env.out(file, stage)
}

#[test]
fn tiny_pipeline_runs_then_skips() {
    let env = Env::pipe();
    let file = repo().join("pipelines/tiny.toml");
    let file = file.to_str().unwrap();
    env.ok(&["run", file]);
    let acts = env.actions(file, &[]);
    assert!(!acts.is_empty() && all(&acts, "skip"), "{acts:?}");
    let verify = env.json(&["verify"]);
    assert_eq!(verify["corrupt"], 0, "{verify}");
    assert_eq!(verify["checked"].as_u64(), Some(acts.len() as u64), "{verify}");
    for stage in ["cache_web", "cache_chat"] {
        let cache = ActivationCache::open(&object_out(&env, file, stage)).unwrap();
        assert!(cache.len() > 1000, "{stage}: {} tokens", cache.len());
        assert_eq!(cache.d_model(), 64);
    }
}

/// Every stored row equals a forward pass of its document alone (no padding, no batching), the
/// tokens are the tokenizer's, documents are where the offsets say, and the statistics are those
/// of the stored rows.
#[test]
fn stored_activations_equal_unbatched_forwards() {
    let env = Env::pipe();
    // Small batches and shards: padding in every micro-batch, several shards.
    env.write(
        "p.toml",
        &cache_pipeline("web.jsonl", "batch_size = 2\nshard_tokens = 500\nignore_first_n = 2"),
    );
    env.ok(&["run", "p.toml"]);
    let cache = ActivationCache::open(&object_out(&env, "p.toml", "cache")).unwrap();
    assert!(cache.meta().shards.len() >= 2, "{:?}", cache.meta().shards);

    let tok = TextTokenizer::from_dir(&tiny().join("llama/chat")).unwrap();
    let texts: Vec<String> =
        open_texts(&tiny().join("data/web.jsonl"), None, Column::Text("text".into()), None, &tok)
            .unwrap()
            .map(Result::unwrap)
            .collect();
    assert_eq!(cache.num_docs(), texts.len() as u64);
    let encoded = tok.encode_batch(&texts).unwrap();
    let offsets = cache.doc_offsets();
    let models: Vec<Model> = ["base", "chat"]
        .iter()
        .map(|m| Model::load(&tiny().join("llama").join(m), DType::F32, &Device::Cpu).unwrap())
        .collect();
    let d = 64;
    let mut row = vec![0f32; 2 * d];
    let mut worst = 0f32;
    for (j, ids) in encoded.docs().enumerate() {
        let stored = offsets[j]..offsets[j + 1];
        assert_eq!(stored.end - stored.start, ids.len().saturating_sub(2) as u64, "document {j}");
        assert_eq!(cache.doc_range(j as u64), stored);
        let t = ids.len();
        let input = Tensor::new(ids, &Device::Cpu).unwrap().reshape((1, t)).unwrap();
        let mask = Tensor::ones((1, t), DType::U8, &Device::Cpu).unwrap();
        let h: Vec<Vec<Vec<f32>>> = models
            .iter()
            .map(|m| m.forward_to_layer(&input, &mask, 2).unwrap().squeeze(0).unwrap().to_vec2().unwrap())
            .collect();
        for (k, i) in stored.clone().enumerate() {
            assert_eq!(cache.token(i), ids[k + 2]);
            cache.pair_into(i, &mut row);
            for m in 0..2 {
                for (a, b) in row[m * d..(m + 1) * d].iter().zip(&h[m][k + 2]) {
                    worst = worst.max((a - b).abs() / b.abs().max(1e-3));
                }
            }
        }
    }
    assert!(worst <= 1e-4, "max relative error {worst}");

    // Statistics over the stored rows.
    let n = cache.len();
    let mut all_rows = vec![0f32; n as usize * 2 * d];
    cache.range_into(0..n, &mut all_rows);
    let (mean, std) = cache.stats().unwrap();
    for c in [0, 5, d + 7] {
        let col: Vec<f64> = all_rows.iter().skip(c).step_by(2 * d).map(|x| *x as f64).collect();
        let m = col.iter().sum::<f64>() / n as f64;
        let s = (col.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
        assert!((mean[c] as f64 - m).abs() < 1e-5, "mean {c}");
        assert!((std[c] as f64 - s).abs() < 1e-5, "std {c}");
    }
}

/// The chat model differs from the base at chat-template tokens, and (nearly) only there.
#[test]
fn chat_cache_sees_the_planted_difference() {
    let env = Env::pipe();
    env.write("p.toml", &cache_pipeline("chat.jsonl", "column = \"messages\"\ncolumn_type = \"messages\""));
    env.ok(&["run", "p.toml"]);
    let cache = ActivationCache::open(&object_out(&env, "p.toml", "cache")).unwrap();
    let tok = TextTokenizer::from_dir(&tiny().join("llama/chat")).unwrap();
    let template: Vec<u32> = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        .iter()
        .map(|t| tok.token_id(t).unwrap())
        .collect();
    let d = 64;
    let mut row = vec![0f32; 2 * d];
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..cache.len() {
        cache.pair_into(i, &mut row);
        let diff: f32 = row[..d].iter().zip(&row[d..]).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        if template.contains(&cache.token(i)) { on.push(diff) } else { off.push(diff) }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(!on.is_empty() && !off.is_empty());
    assert!(mean(&on) > 10.0 * mean(&off), "template {} vs other {}", mean(&on), mean(&off));
}

fn work_state(ds: &Path) -> Option<serde_json::Value> {
    let work = ds.join("work/cache");
    let key = std::fs::read_dir(&work).ok()?.next()?.ok()?.path();
    let text = std::fs::read_to_string(key.join("scratch/cache-state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// kill -9 once some shards are finished; the rerun resumes from them and the result is
/// byte-identical to an uninterrupted run.
#[test]
fn kill_9_mid_cache_resumes_to_identical_bytes() {
    let text = cache_pipeline("web.jsonl", "batch_size = 1\nshard_tokens = 100");
    let clean = Env::pipe();
    clean.write("p.toml", &text);
    clean.ok(&["run", "p.toml"]);
    let want = object_out(&clean, "p.toml", "cache");

    let mut killed_mid_run = false;
    for _attempt in 0..5 {
        let env = Env::pipe();
        env.write("p.toml", &text);
        let mut child = env.spawn(&["run", "p.toml"]);
        let t0 = Instant::now();
        let mut shards = 0;
        while t0.elapsed() < Duration::from_secs(60) {
            if let Some(s) = work_state(&env.ds()) {
                shards = s["shards"].as_array().map_or(0, Vec::len);
                if shards >= 2 && s["done"] == false {
                    break;
                }
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let finished = child.wait().unwrap().success();
        if finished || shards < 2 {
            continue;
        }
        killed_mid_run = true;
        let plan = env.json(&["plan", "p.toml"]);
        assert_eq!(plan["stages"][0]["action"], "resume", "{plan}");
        env.ok(&["run", "p.toml"]);
        let log =
            std::fs::read_to_string(object_out(&env, "p.toml", "cache").parent().unwrap().join("log.txt"))
                .unwrap();
        assert!(log.contains("resuming after"), "{log}");
        let got = object_out(&env, "p.toml", "cache");
        for entry in std::fs::read_dir(want.join("shards")).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                std::fs::read(want.join("shards").join(&name)).unwrap()
                    == std::fs::read(got.join("shards").join(&name)).unwrap(),
                "shard {name:?} differs after resume"
            );
        }
        assert!(
            std::fs::read(want.join("stats.safetensors")).unwrap()
                == std::fs::read(got.join("stats.safetensors")).unwrap(),
            "statistics differ after resume"
        );
        assert_eq!(env.json(&["verify"])["corrupt"], 0);
        break;
    }
    assert!(killed_mid_run, "never managed to kill the run between shards");
}

fn failure(env: &Env, file: &str) -> String {
    let o = env.run(&["run", file]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies the tiny pair into the env so tests can break it.
fn copy_pair(env: &Env) -> PathBuf {
    let to = env.path("models");
    for m in ["base", "chat"] {
        std::fs::create_dir_all(to.join(m)).unwrap();
        for f in std::fs::read_dir(tiny().join("llama").join(m)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(m).join(f.file_name())).unwrap();
        }
    }
    to
}

#[test]
fn bad_inputs_fail_with_the_stage_and_file_named() {
    let env = Env::pipe();
    let models = copy_pair(&env);
    let data = tiny().join("data");
    let pipeline = |extra: &str, data_file: &str| {
        let data = if data_file.contains('/') { PathBuf::from(data_file) } else { data.join(data_file) };
        format!(
            "[pipeline]\nname = \"bad\"\n[stages.cache]\nkind = \"cache\"\nbase = \"models/base\"\nchat = \"models/chat\"\ndata = \"{}\"\n{extra}\n",
            data.display()
        )
    };

    env.write("layer.toml", &pipeline("layer = 9", "web.jsonl"));
    let e = failure(&env, "layer.toml");
    assert!(e.contains("cache") && e.contains("layer 9 is out of range") && e.contains("config.json"), "{e}");

    env.write("empty.jsonl", "");
    env.write("empty.toml", &pipeline("layer = 1", env.path("empty.jsonl").to_str().unwrap()));
    let e = failure(&env, "empty.toml");
    assert!(e.contains("empty.jsonl") && e.contains("no documents"), "{e}");

    env.write("column.toml", &pipeline("layer = 1\ncolumn = \"body\"", "web.jsonl"));
    let e = failure(&env, "column.toml");
    assert!(e.contains("web.jsonl") && e.contains("body"), "{e}");

    // A chat template is needed for a messages column.
    let cfg = models.join("chat/tokenizer_config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg, json.to_string()).unwrap();
    env.write(
        "template.toml",
        &pipeline("layer = 1\ncolumn = \"messages\"\ncolumn_type = \"messages\"", "chat.jsonl"),
    );
    let e = failure(&env, "template.toml");
    assert!(e.contains("needs a chat template") && e.contains("models/chat"), "{e}");
    std::fs::write(&cfg, original).unwrap();

    // Weights that do not fit the config.
    let config = models.join("base/config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"))
        .unwrap();
    env.write("shape.toml", &pipeline("layer = 1", "web.jsonl"));
    let e = failure(&env, "shape.toml");
    assert!(e.contains("do not fit") && e.contains("models/base"), "{e}");
    std::fs::write(&config, &original).unwrap();

    // A truncated weight file.
    let weights = models.join("chat/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = failure(&env, "shape.toml");
    assert!(e.contains("model.safetensors") && e.contains("models/chat"), "{e}");
    // A missing one.
    std::fs::remove_file(&weights).unwrap();
    let e = failure(&env, "shape.toml");
    assert!(e.contains("no weights") && e.contains("models/chat"), "{e}");

    // Nothing was published by any of these failures.
    assert!(
        !env.ds().join("objects/cache").exists()
            || std::fs::read_dir(env.ds().join("objects/cache")).unwrap().next().is_none()
    );
}

/// `base_token_map` changes the base model's input ids only: at the mapped positions the base
/// rows are the base model's activations of the replacement token, the chat rows are untouched,
/// and the stored tokens are the originals.
#[test]
fn base_token_map_replaces_base_inputs_only() {
    let env = Env::pipe();
    let tok = TextTokenizer::from_dir(&tiny().join("llama/chat")).unwrap();
    let header = tok.token_id("<|start_header_id|>").unwrap();
    let plain = tok.token_id("the").or_else(|| tok.token_id("Ġthe")).unwrap();
    let chat = "column = \"messages\"\ncolumn_type = \"messages\"\nmax_docs = 4";
    env.write("plain.toml", &cache_pipeline("chat.jsonl", chat));
    env.write(
        "mapped.toml",
        &cache_pipeline("chat.jsonl", &format!("{chat}\nbase_token_map = [[{header}, {plain}]]")),
    );
    env.ok(&["run", "plain.toml"]);
    env.ok(&["run", "mapped.toml"]);
    let a = ActivationCache::open(&object_out(&env, "plain.toml", "cache")).unwrap();
    let b = ActivationCache::open(&object_out(&env, "mapped.toml", "cache")).unwrap();
    assert_eq!(a.tokens(), b.tokens(), "stored tokens are the originals");
    assert_eq!(b.meta().base_token_map, [(header, plain)]);
    let d = 64;
    let (mut x, mut y) = (vec![0f32; 2 * d], vec![0f32; 2 * d]);
    let (mut base_changed, mut mapped_seen) = (false, false);
    for i in 0..a.len() {
        a.pair_into(i, &mut x);
        b.pair_into(i, &mut y);
        assert_eq!(x[d..], y[d..], "chat rows never change (row {i})");
        if a.token(i) == header {
            mapped_seen = true;
            base_changed |= x[..d] != y[..d];
        }
    }
    assert!(mapped_seen && base_changed);

    let e = failure(&env, {
        env.write("oov.toml", &cache_pipeline("chat.jsonl", "base_token_map = \"llama3\""));
        "oov.toml"
    });
    assert!(e.contains("base_token_map uses token id 128006") && e.contains("tokenizer.json"), "{e}");
}

/// The Gemma 2 family through the stage (generated tiny pair): exact against an unbatched forward.
#[test]
fn gemma2_pair_caches_exactly() {
    let env = Env::pipe();
    let pair = stages::models::tiny::write_tiny_pair(
        &env.path("gemma"),
        &stages::models::tiny::TinyModelSpec::gemma2(),
        3,
    )
    .unwrap();
    env.write(
        "g.toml",
        &format!(
            "[pipeline]\nname = \"g\"\n[stages.cache]\nkind = \"cache\"\nbase = \"gemma/base\"\nchat = \"gemma/chat\"\ndata = \"{}\"\nlayer = {}\ncolumn = \"messages\"\ncolumn_type = \"messages\"\nbatch_size = 4\nmax_tokens = 1500\n",
            tiny().join("data/chat.jsonl").display(),
            pair.middle_layer
        ),
    );
    env.ok(&["run", "g.toml"]);
    let cache = ActivationCache::open(&object_out(&env, "g.toml", "cache")).unwrap();
    assert!(cache.len() >= 1500, "max_tokens is reached: {}", cache.len());
    let offsets = cache.doc_offsets();
    let last = offsets[offsets.len() - 2];
    assert!(last < 1500, "and the cut is right after the document that reaches it");
    let model = Model::load(&pair.chat, DType::F32, &Device::Cpu).unwrap();
    let d = model.hidden_size();
    let mut row = vec![0f32; 2 * d];
    for j in [0u64, cache.num_docs() - 1] {
        let range = cache.doc_range(j);
        let ids: Vec<u32> = range.clone().map(|i| cache.token(i)).collect();
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().reshape((1, t)).unwrap();
        let mask = Tensor::ones((1, t), DType::U8, &Device::Cpu).unwrap();
        let h: Vec<Vec<f32>> = model
            .forward_to_layer(&input, &mask, pair.middle_layer)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (k, i) in range.enumerate() {
            cache.pair_into(i, &mut row);
            for (a, b) in row[d..].iter().zip(&h[k]) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-2), "doc {j} pos {k}: {a} vs {b}");
            }
        }
    }
}

/// Models and the dataset named as Hugging Face cache references, resolved offline in
/// `$HF_HUB_CACHE`; the dataset is a parquet snapshot read by split.
#[test]
fn hugging_face_cache_references_and_parquet_splits() {
    let env = Env::pipe();
    let hub = env.path("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = |repo: &str| {
        let root = hub.join(repo);
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), commit).unwrap();
        let snap = root.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        (root, snap)
    };
    // Files live in blobs/, snapshots link to them, as huggingface_hub lays them out.
    let link = |root: &Path, snap: &Path, from: &Path, name: &str| {
        let blob = root.join("blobs").join(name.replace('/', "_"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(from, &blob).unwrap();
        let to = snap.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &to).unwrap();
    };
    for m in ["base", "chat"] {
        let (root, snap) = snapshot(&format!("models--tiny-org--llama-{m}"));
        for f in std::fs::read_dir(tiny().join("llama").join(m)).unwrap() {
            let f = f.unwrap();
            link(&root, &snap, &f.path(), f.file_name().to_str().unwrap());
        }
    }
    let parquet = repo().join("stages/tests/data/chat-sample.parquet");
    let (root, snap) = snapshot("datasets--tiny-org--chats");
    link(&root, &snap, &parquet, "data/train-00000-of-00001.parquet");
    link(&root, &snap, &parquet, "data/validation-00000-of-00001.parquet");

    env.write(
        "hf.toml",
        "[pipeline]\nname = \"hf\"\n[stages.cache]\nkind = \"cache\"\nbase = \"tiny-org/llama-base\"\nchat = \"tiny-org/llama-chat@main\"\ndata = \"tiny-org/chats\"\nsplit = \"validation\"\ncolumn = \"messages\"\ncolumn_type = \"messages\"\nlayer = 1\n",
    );
    let run = |args: &[&str]| env.cmd(args).env("HF_HUB_CACHE", &hub).output().unwrap();
    let o = run(&["run", "hf.toml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let show: serde_json::Value =
        serde_json::from_slice(&run(&["show", "hf.toml", "cache", "--json"]).stdout).unwrap();
    let shown = show.to_string();
    assert!(shown.contains(&format!("models--tiny-org--llama-base/snapshots/{commit}")), "{shown}");
    let status: serde_json::Value =
        serde_json::from_slice(&run(&["status", "hf.toml", "--json"]).stdout).unwrap();
    let out = PathBuf::from(status["stages"][0]["path"].as_str().unwrap());
    let cache = ActivationCache::open(&out).unwrap();
    assert_eq!(cache.num_docs(), 18, "every conversation of the parquet split");
    assert!(cache.meta().dataset.files[0].ends_with("data/validation-00000-of-00001.parquet"));

    // A revision that is not in the cache is a config error naming what exists.
    env.write("bad.toml", &std::fs::read_to_string(env.path("hf.toml")).unwrap().replace("@main", "@v2"));
    let o = run(&["plan", "bad.toml"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("v2") && e.contains("main") && e.contains("bad.toml"), "{e}");
}

#[test]
fn a_layer_the_models_lack_fails_the_stage_naming_it() {
    let env = Env::pipe();
    env.write("tiny.toml", &crate::support::tiny_toml());
    let o = env.run(&["run", "tiny.toml", "--only", "cache_web", "--set", "stages.cache_web.layer=9"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("layer 9 is out of range")
            && err.contains("config.json has 4 decoder blocks (layers 0..=3)"),
        "{err}"
    );
    assert!(!env.ds().join("results/tiny/cache_web").exists(), "nothing published");
}
