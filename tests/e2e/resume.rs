//! Interruption: kill -9 and Ctrl-C mid-stage, resume, and concurrent runs sharing a stage.

use std::time::{Duration, Instant};

use crate::support::{Env, read};

const SLOW: &str = r#"
[pipeline]
name = "slow"

[stages.src]
kind = "emit"
chunks = 12
chunk_bytes = 4096
seed = 7
delay_ms = 60

[stages.other]
kind = "emit"
chunks = 6
seed = 8
delay_ms = 40

[stages.sink]
kind = "combine"
parts = ["src", "other"]
"#;

/// A small deterministic generator so the kill times vary by seed but are reproducible.
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        x >> 33
    }
}

/// The `pipe status --json` entry of one stage.
fn stage_status(env: &Env, stage: &str) -> serde_json::Value {
    let st = env.json(&["status", "p.toml"]);
    st["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).unwrap().clone()
}

/// Polls `pipe status` until `stage` is a partial with at least `done` units checkpointed.
fn wait_for_progress(env: &Env, stage: &str, done: u64) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let s = stage_status(env, stage);
        if s["state"] == "partial" && s["progress"]["done"].as_u64().unwrap_or(0) >= done {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no progress: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn outputs(env: &Env) -> Vec<Vec<u8>> {
    ["src", "other", "sink"].iter().map(|s| read(&env.out("p.toml", s).join("data.bin"))).collect()
}

#[test]
fn kill_9_at_random_moments_then_rerun_gives_identical_outputs() {
    let reference = Env::new();
    reference.write("p.toml", SLOW);
    reference.ok(&["run", "p.toml", "--jobs", "2"]);
    let want = outputs(&reference);

    for seed in 1..=5u64 {
        let env = Env::new();
        env.write("p.toml", SLOW);
        let mut rng = lcg(seed);
        // Kill several times per seed, at moments spread over the ~0.5 s the run takes.
        for _ in 0..3 {
            let mut child = env.spawn(&["run", "p.toml", "--jobs", "2"]);
            std::thread::sleep(Duration::from_millis(20 + rng() % 450));
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
        env.ok(&["run", "p.toml", "--jobs", "2"]);
        assert_eq!(outputs(&env), want, "seed {seed}: outputs differ from an uninterrupted run");
        let v = env.ok(&["verify"]);
        assert!(v.contains("all intact"), "seed {seed}: {v}");
        let st = env.json(&["status", "p.toml"]);
        assert!(st["stages"].as_array().unwrap().iter().all(|s| s["state"] == "cached"));
    }
}

#[test]
fn a_killed_stage_resumes_from_its_checkpoints() {
    let env = Env::new();
    env.write("p.toml", SLOW);
    let mut child = env.spawn(&["run", "p.toml", "--only", "src"]);
    // Wait until a few chunks are checkpointed, then kill.
    let src = wait_for_progress(&env, "src", 3);
    assert_eq!(src["progress"]["total"], 12);
    assert_eq!(src["progress"]["unit"], "chunks");
    child.kill().unwrap();
    child.wait().unwrap();
    let plan = env.json(&["plan", "p.toml"]);
    let src = plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == "src").unwrap().clone();
    let scratch = env.ds().join("work/emit").join(src["key"].as_str().unwrap()).join("scratch");
    let checkpointed = std::fs::read_dir(&scratch)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".bin"))
        .count();
    assert!(checkpointed >= 3, "{checkpointed} chunks checkpointed");
    assert_eq!(src["action"], "resume");
    assert!(src["reasons"][0].as_str().unwrap().contains("resuming an interrupted attempt at"), "{src}");
    env.ok(&["run", "p.toml"]);
    let ev = env.events();
    let src_key = src["key"].as_str().unwrap();
    assert!(ev.iter().any(|l| l == &format!("emit {src_key} resume")), "{ev:?}");
    // The resumed attempt wrote only the chunks that were not checkpointed; the object's log
    // keeps both attempts.
    let log = std::fs::read_to_string(env.out("p.toml", "src").parent().unwrap().join("log.txt")).unwrap();
    let (first, resumed) = log.split_once("resuming src").expect("the log records the resumed attempt");
    assert!(first.contains("running src"), "{log}");
    assert_eq!(resumed.matches(" written").count(), 12 - checkpointed, "{log}");
}

#[test]
fn ctrl_c_stops_cleanly_and_leaves_a_resumable_partial() {
    let env = Env::new();
    env.write("p.toml", SLOW);
    let child = env.spawn(&["run", "p.toml"]);
    wait_for_progress(&env, "src", 2);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let src = stage_status(&env, "src");
    assert_eq!(src["state"], "partial", "{src}");
    env.ok(&["run", "p.toml"]);
    let st = env.json(&["status", "p.toml"]);
    assert!(st["stages"].as_array().unwrap().iter().all(|s| s["state"] == "cached"));
}

#[test]
fn two_concurrent_runs_sharing_a_stage_compute_it_once() {
    let env = Env::new();
    let shared = "[stages.shared]\nkind = \"emit\"\nchunks = 8\ndelay_ms = 30\nseed = 3\n";
    env.write("one.toml", &format!("[pipeline]\nname = \"one\"\n{shared}[stages.x]\nkind = \"combine\"\nparts = [\"shared\"]\nsalt = \"1\"\n"));
    env.write("two.toml", &format!("[pipeline]\nname = \"two\"\n{shared}[stages.y]\nkind = \"combine\"\nparts = [\"shared\"]\nsalt = \"2\"\n"));
    let a = env.spawn(&["run", "one.toml"]);
    let b = env.spawn(&["run", "two.toml"]);
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let ev = env.events();
    assert_eq!(ev.iter().filter(|l| l.starts_with("emit ") && l.ends_with(" start")).count(), 1, "{ev:?}");
    assert_eq!(ev.iter().filter(|l| l.starts_with("combine ") && l.ends_with(" done")).count(), 2, "{ev:?}");
    assert_eq!(
        read(&env.out("one.toml", "shared").join("data.bin")),
        read(&env.out("two.toml", "shared").join("data.bin"))
    );
}
