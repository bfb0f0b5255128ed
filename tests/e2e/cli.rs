//! The read verbs and options: plan/dry-run, graph, show, diff, only, devices, completions.

use crate::support::{DIAMOND, Env};

#[test]
fn dry_run_runs_nothing() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    let out = env.ok(&["run", "p.toml", "--dry-run"]);
    assert!(out.contains("4 to run, 0 to resume, 0 to skip"), "{out}");
    assert!(env.events().is_empty());
}

#[test]
fn only_runs_the_stage_and_what_it_needs() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml", "--only", "c"]);
    let v = env.json(&["status", "p.toml"]);
    let states: Vec<&str> =
        v["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["cached", "missing", "cached", "missing"]);
    let err = env.stderr(&["run", "p.toml", "--only", "zz"], 2);
    assert!(err.contains("no stage `zz`"), "{err}");
}

#[test]
fn graph_formats() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    let text = env.ok(&["graph", "p.toml"]);
    assert!(text.contains("d (combine)  [parts <- c, b]"), "{text}");
    let dot = env.ok(&["graph", "p.toml", "--format", "dot"]);
    assert!(dot.contains("\"c\" -> \"d\" [label=\"parts\"]"), "{dot}");
    let mm = env.ok(&["graph", "p.toml", "--format", "mermaid"]);
    assert!(mm.starts_with("flowchart LR") && mm.contains("-->|parts|"), "{mm}");
}

#[test]
fn diff_two_pipelines() {
    let env = Env::new();
    env.write("a.toml", DIAMOND);
    env.write(
        "b.toml",
        &DIAMOND.replace("name = \"diamond\"", "name = \"other\"").replace("seed = 2", "seed = 3"),
    );
    env.ok(&["run", "a.toml"]);
    env.ok(&["run", "b.toml"]);
    let v = env.json(&["diff", "a.toml", "b.toml"]);
    assert_eq!(v["params"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["params"][0]["path"], "seed");
    assert_eq!(v["params"][0]["stage"], "b");
    let shared: Vec<bool> =
        v["stages"].as_array().unwrap().iter().map(|s| s["shared"].as_bool().unwrap()).collect();
    assert_eq!(shared, [true, false, true, false]);
    let text = env.ok(&["diff", "a.toml", "b.toml"]);
    assert!(text.contains("b.seed: 2 -> 3"), "{text}");
    assert!(text.contains("input_bytes"), "{text}");
}

#[test]
fn accelerator_stages_get_one_device_each() {
    let env = Env::new();
    env.write(
        "p.toml",
        "[pipeline]\nname = \"acc\"\n[stages.g1]\nkind = \"accel\"\nid = 1\ndelay_ms = 300\n[stages.g2]\nkind = \"accel\"\nid = 2\ndelay_ms = 300\n",
    );
    env.ok(&["run", "p.toml", "--jobs", "4", "--devices", "cuda:0,cuda:1"]);
    let mut devs: Vec<String> = ["g1", "g2"]
        .iter()
        .map(|s| std::fs::read_to_string(env.out("p.toml", s).join("device.txt")).unwrap())
        .collect();
    devs.sort();
    assert_eq!(devs, ["cuda:0", "cuda:1"]);
    // With a single device, the two accelerator stages cannot overlap.
    let env = Env::new();
    env.write("p.toml", "[pipeline]\nname = \"acc\"\n[stages.g1]\nkind = \"accel\"\nid = 1\ndelay_ms = 200\n[stages.g2]\nkind = \"accel\"\nid = 2\ndelay_ms = 200\n");
    env.ok(&["run", "p.toml", "--jobs", "4", "--devices", "cuda:0"]);
    let ev = env.events();
    let kinds: Vec<&str> =
        ev.iter().map(|l| l.rsplit_once(' ').unwrap().0.rsplit_once(' ').unwrap().1).collect();
    assert_eq!(kinds, ["start", "done", "start", "done"], "{ev:?}");
}

#[test]
fn bad_device_lists_are_refused() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    for bad in ["gpu0", "cuda:", "cuda:x", "cuda:0,cuda:0", ""] {
        let err = env.stderr(&["run", "p.toml", "--devices", bad], 2);
        assert!(err.contains("--devices"), "{bad}: {err}");
    }
    assert!(env.events().is_empty());
}

#[test]
fn completions_and_help() {
    let env = Env::new();
    assert!(env.ok(&["completions", "bash"]).contains("pipe"));
    let help = env.ok(&["run", "--help"]);
    assert!(help.contains("Examples:") && help.contains("--set"), "{help}");
}
