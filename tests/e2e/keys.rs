//! Skipping: what changes a key and what does not.

use crate::support::{DIAMOND, Env, all};

#[test]
fn rerun_skips_everything() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    let n = env.events().len();
    assert_eq!(env.count(" done"), 4);
    assert!(all(&env.actions("p.toml", &[]), "skip"));
    env.ok(&["run", "p.toml"]);
    assert_eq!(env.events().len(), n, "a rerun computed something");
}

#[test]
fn parameter_change_reruns_exactly_the_stage_and_its_descendants() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    let v = env.json(&["plan", "p.toml", "--set", "stages.a.seed=5"]);
    let acts: Vec<(&str, &str)> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["action"].as_str().unwrap()))
        .collect();
    assert_eq!(acts, [("a", "run"), ("b", "skip"), ("c", "run"), ("d", "run")]);
    let reasons = |i: usize| v["stages"][i]["reasons"].to_string();
    assert!(reasons(0).contains("parameter seed: 1 -> 5"), "{}", reasons(0));
    assert!(reasons(2).contains("upstream `a` (input `parts`) changed"), "{}", reasons(2));
    assert!(reasons(3).contains("upstream `c` (input `parts`) changed"), "{}", reasons(3));
    let before = env.count(" start");
    env.ok(&["run", "p.toml", "--set", "stages.a.seed=5"]);
    assert_eq!(env.count(" start"), before + 3);
}

#[test]
fn renaming_reordering_and_explicit_defaults_rerun_nothing() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    // Stage `a` renamed to `source_a`, keys reordered, defaults written out, another file name.
    env.write(
        "other/q.toml",
        r#"
[pipeline]
name = "renamed"

[stages.d]
parts = ["c", "b"]
kind = "combine"
salt = ""

[stages.c]
kind = "combine"
parts = ["source_a"]
fail = false

[stages.b]
seed = 2
kind = "emit"
chunks = 4

[stages.source_a]
chunk_bytes = 1024
kind = "emit"
seed = 1
delay_ms = 0
"#,
    );
    let acts = env.actions("other/q.toml", &[]);
    assert_eq!(acts.len(), 4);
    assert!(all(&acts, "skip"), "{acts:?}");
    let n = env.events().len();
    env.ok(&["run", "other/q.toml"]);
    assert_eq!(env.events().len(), n);
}

#[test]
fn extends_and_set() {
    let env = Env::new();
    env.write("base.toml", DIAMOND);
    env.write(
        "child.toml",
        r#"
[pipeline]
name = "child"
extends = "base.toml"

[stages.b]
seed = 9
"#,
    );
    env.ok(&["run", "base.toml"]);
    let acts = env.actions("child.toml", &[]);
    assert_eq!(
        acts,
        [("a", "skip"), ("b", "run"), ("c", "skip"), ("d", "run")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // --set on top of extends: back to the base's value, so everything is cached again.
    assert!(all(&env.actions("child.toml", &["--set", "stages.b.seed=2"]), "skip"));
    let show = env.json(&["show", "child.toml", "b", "--set", "stages.b.chunks=6"]);
    assert_eq!(show["params"]["seed"], 9);
    assert_eq!(show["params"]["chunks"], 6);
    assert_eq!(show["params"]["chunk_bytes"], 1024, "defaults are filled in");
}

#[test]
fn external_input_content_enters_the_key_and_is_memoized() {
    let env = Env::new();
    env.write("data/in.txt", "hello");
    env.write(
        "p.toml",
        "[pipeline]\nname = \"ext\"\n[stages.a]\nkind = \"emit\"\ndata = \"${DATA_DIR}/in.txt\"\n",
    );
    let data_dir = env.path("data");
    let run = |args: &[&str]| {
        let o = env.cmd(args).env("DATA_DIR", &data_dir).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok()
    };
    run(&["run", "p.toml"]);
    let v = run(&["plan", "p.toml", "--json"]).unwrap();
    assert_eq!(v["stages"][0]["action"], "skip");
    assert_eq!(v["hashed"]["files"], 0, "an unchanged input was read again");
    env.write("data/in.txt", "hellp");
    let v = run(&["plan", "p.toml", "--json"]).unwrap();
    assert_eq!(v["stages"][0]["action"], "run");
    assert_eq!(v["hashed"]["files"], 1);
    assert!(v["stages"][0]["reasons"].to_string().contains("content of input `data` changed"), "{v}");
}

#[test]
fn unkeyed_parameters_rerun_nothing_but_reach_the_stage() {
    let env = Env::new();
    env.write("base.toml", DIAMOND);
    env.ok(&["run", "base.toml"]);
    // `delay_ms` of `emit` is declared UNKEYED: same keys, nothing to do.
    let acts = env.actions("base.toml", &["--set", "stages.a.delay_ms=7"]);
    assert!(all(&acts, "skip"), "{acts:?}");
    let show = env.json(&["show", "base.toml", "a", "--set", "stages.a.delay_ms=7"]);
    assert_eq!(show["params"]["delay_ms"], 7, "shown with the other parameters");
    // A run that computes the stage gets the unkeyed value.
    let set = ["--set", "stages.a.delay_ms=7", "--set", "stages.a.seed=11"];
    env.ok(&[&["run", "base.toml"][..], &set].concat());
    let out = env.out_with("base.toml", "a", &set);
    let log = std::fs::read_to_string(out.parent().unwrap().join("log.txt")).unwrap();
    assert!(log.contains("delay_ms = 7"), "{log}");
}
