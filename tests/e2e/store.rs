//! The datastore seen from the CLI: status states, results links, run records, logs, gc.

use crate::support::{DIAMOND, Env};

#[test]
fn status_reports_cached_missing_and_stale() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    let v = env.json(&["status", "p.toml"]);
    for s in v["stages"].as_array().unwrap() {
        assert_eq!(s["state"], "missing");
        assert_eq!(s["key"].as_str().unwrap().len(), 64);
        assert!(s["kind"].is_string() && s["name"].is_string());
    }
    env.ok(&["run", "p.toml"]);
    let v = env.json(&["status", "p.toml", "--set", "stages.b.seed=3"]);
    let states: Vec<&str> =
        v["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["cached", "stale", "cached", "stale"]);
}

#[test]
fn results_view_run_records_and_logs() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    let link = env.ds().join("results/diamond/d");
    assert!(link.join("data.bin").is_file());
    assert_eq!(link.canonicalize().unwrap(), env.out("p.toml", "d").canonicalize().unwrap());
    let runs: Vec<_> = std::fs::read_dir(env.ds().join("runs/diamond")).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs[0].as_ref().unwrap().path()).unwrap()).unwrap();
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["stages"]["d"]["state"], "done");
    let obj = env.out("p.toml", "a").parent().unwrap().to_path_buf();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(obj.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["metrics"]["bytes"], 4096);
    assert_eq!(manifest["preimage"]["kind"], "emit");
    let log = std::fs::read_to_string(obj.join("log.txt")).unwrap();
    assert!(log.contains("chunk 3 written"), "{log}");
}

#[test]
fn gc_removes_what_nothing_references() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml", "--set", "stages.b.chunks=64"]);
    env.ok(&["run", "p.toml"]);
    // Recent runs are kept by default.
    let v = env.json(&["gc", "--dry-run"]);
    assert_eq!(v["removed"].as_array().unwrap().len(), 0);
    let v = env.json(&["gc", "--keep", "p.toml", "--keep-days", "0"]);
    let removed = v["removed"].as_array().unwrap();
    assert_eq!(removed.len(), 2, "{v}"); // the 64-chunk b and its d
    assert!(v["bytes_freed"].as_u64().unwrap() > 64 * 1024);
    // The older run record goes too; the newest of the pipeline stays for `plan`'s explanations.
    assert_eq!(v["records_removed"], 1, "{v}");
    assert_eq!(std::fs::read_dir(env.ds().join("runs/diamond")).unwrap().count(), 1);
    let st = env.json(&["status", "p.toml"]);
    assert!(st["stages"].as_array().unwrap().iter().all(|s| s["state"] == "cached"));
    assert!(env.ok(&["verify"]).contains("checked 4 objects: all intact"));
}

#[test]
fn force_recomputes_and_replaces() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    let acts = env.actions("p.toml", &["--force", "c"]);
    assert_eq!(acts.iter().filter(|(_, a)| a == "run").count(), 1);
    let before = env.count("combine");
    env.ok(&["run", "p.toml", "--force", "c"]);
    assert_eq!(env.count("combine"), before + 2, "c ran (start and done), d stayed cached");
    assert!(env.ok(&["verify"]).contains("all intact"));
}
