//! The `train` stage through the real `pipe` binary, on the caches of the tiny pipeline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use stages::train::load_crosscoder;

use crate::support::{Env, tiny_toml};

/// The tiny pipeline with the train stage's table replaced by `train`.
fn with_train(train: &str) -> String {
    let t = tiny_toml();
    let at = t.find("[stages.train]").unwrap();
    format!("{}{train}\n", &t[..at])
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn batchtopk_on_the_tiny_pipeline_learns_and_exports() {
    let env = Env::pipe();
    env.write("p.toml", &tiny_toml());
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "train");
    let m = metrics(&out);
    let train: Vec<&serde_json::Value> = m.iter().filter(|r| r["split"] == "train").collect();
    let val = m.iter().rfind(|r| r["split"] == "val").unwrap();
    let first = train.first().unwrap()["l2"].as_f64().unwrap();
    let last = train.last().unwrap()["l2"].as_f64().unwrap();
    assert!(last < 0.5 * first, "the reconstruction loss falls: {first} -> {last}");
    assert!(val["frac_variance_explained"].as_f64().unwrap() > 0.6, "{val}");
    assert!(train.last().unwrap()["threshold"].as_f64().unwrap() > 0.0);
    // The manifest carries the summary `pipe diff` compares.
    let show = env.json(&["show", "p.toml", "train"]);
    assert!(show.to_string().contains("val/frac_variance_explained"), "{show}");
    // dictionary_learning names and config.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["trainer"]["dict_class"], "BatchTopKCrossCoder");
    assert_eq!(config["trainer"]["k"], 4);
    let (cc, threshold) = load_crosscoder(&out, &Device::Cpu).unwrap();
    assert_eq!((cc.d, cc.f), (64, 256));
    assert!(threshold.unwrap() > 0.0);
}

#[test]
fn l1_crosscoder_trains_too() {
    let env = Env::pipe();
    env.write(
        "p.toml",
        &with_train(
            "[stages.train]\nkind = \"train\"\nactivations = [\"cache_web\", \"cache_chat\"]\nloss = \"l1\"\nmu = 0.01\nexpansion_factor = 2\nbatch_size = 256\nepochs = 3\nlr = 1e-3\nwarmup_steps = 5\nshuffle_window = 1000\nlog_every = 5\n",
        ),
    );
    env.ok(&["run", "p.toml"]);
    let out = env.out("p.toml", "train");
    let m = metrics(&out);
    assert!(m.iter().all(|r| r["split"] == "train" && r["sparsity"].as_f64().unwrap() >= 0.0));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["trainer"]["dict_class"], "CrossCoder");
    assert_eq!(config["trainer"]["l1_penalty"], 0.01);
}

/// kill -9 after a checkpoint: the rerun resumes there, and the crosscoder and metrics are
/// byte-identical to an uninterrupted run's.
#[test]
fn kill_9_mid_training_resumes_bit_identically() {
    let text = tiny_toml().replace("validate_every = 100", "validate_every = 100\ncheckpoint_every = 25");
    let clean = Env::pipe();
    clean.write("p.toml", &text);
    clean.ok(&["run", "p.toml"]);
    let want = clean.out("p.toml", "train");

    let mut resumed = false;
    for _attempt in 0..5 {
        let env = Env::pipe();
        env.write("p.toml", &text);
        env.ok(&["run", "p.toml", "--only", "cache_web", "--only", "cache_chat"]);
        let mut child = env.spawn(&["run", "p.toml"]);
        let t0 = Instant::now();
        let mut step = 0;
        while t0.elapsed() < Duration::from_secs(120) {
            let ckpt = std::fs::read_dir(env.ds().join("work/train"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| std::fs::read_to_string(e.ok()?.path().join("scratch/checkpoint.json")).ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(c) = ckpt {
                step = c["step"].as_u64().unwrap();
                if step >= 100 {
                    break;
                }
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        if child.wait().unwrap().success() || step < 100 {
            continue;
        }
        env.ok(&["run", "p.toml"]);
        let got = env.out("p.toml", "train");
        let log = std::fs::read_to_string(got.parent().unwrap().join("log.txt")).unwrap();
        assert!(log.contains("resuming at step"), "{log}");
        for file in ["crosscoder.safetensors", "metrics.jsonl"] {
            assert!(
                std::fs::read(want.join(file)).unwrap() == std::fs::read(got.join(file)).unwrap(),
                "{file} differs after kill -9 and resume"
            );
        }
        resumed = true;
        break;
    }
    assert!(resumed, "never killed the run after a checkpoint");
}

#[test]
fn train_errors_name_the_problem() {
    let env = Env::pipe();
    env.write(
        "p.toml",
        &with_train("[stages.train]\nkind = \"train\"\nactivations = [\"cache_web\"]\nbatch_size = 100000\n"),
    );
    let o = env.run(&["run", "p.toml"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("train") && e.contains("less than one batch"), "{e}");

    env.write(
        "q.toml",
        &with_train("[stages.train]\nkind = \"train\"\nactivations = [\"cache_web\"]\nk = 0\n"),
    );
    let o = env.run(&["plan", "q.toml"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("k") && e.contains("at least 1"), "{e}");
}

/// Activation normalisation (off in the paper) stores dictionary_learning's buffers; the
/// reference's dead-latent counting changes the counters, hence the weights.
#[test]
fn normalisation_and_reference_dead_counting() {
    let env = Env::pipe();
    let base = "[stages.train]\nkind = \"train\"\nactivations = [\"cache_web\", \"cache_chat\"]\nk = 4\nexpansion_factor = 4\nbatch_size = 256\nepochs = 4\nlr = 1e-3\nwarmup_steps = 10\nshuffle_window = 1000\ndead_tokens = 2000\nlog_every = 5\n";
    env.write("plain.toml", &with_train(base));
    env.write("norm.toml", &with_train(&format!("{base}normalize_activations = true\n")));
    env.write("ref.toml", &with_train(&format!("{base}dead_counting = \"reference\"\n")));
    for f in ["plain.toml", "norm.toml", "ref.toml"] {
        env.ok(&["run", f]);
    }
    let plain = env.out("plain.toml", "train");
    assert!(stages::train::load_normalizer(&plain).unwrap().is_none());
    let n = stages::train::load_normalizer(&env.out("norm.toml", "train")).unwrap().expect("normalised");
    assert!(n.keep_relative_variance && n.global_scale > 0.0 && n.mean.iter().all(|m| m.is_finite()));
    let read = |p: PathBuf| std::fs::read(p.join("crosscoder.safetensors")).unwrap();
    assert!(read(plain.clone()) != read(env.out("ref.toml", "train")), "reference counting changed nothing");
}
