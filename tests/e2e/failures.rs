//! Bad input and failing stages: clear errors, exit codes, nothing lost.

use crate::support::{DIAMOND, Env};

#[test]
fn a_failed_stage_fails_only_its_descendants() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    let err = env.stderr(&["run", "p.toml", "--set", "stages.c.fail=true"], 1);
    assert!(err.contains("told to fail"), "{err}");
    let v = env.json(&["status", "p.toml", "--set", "stages.c.fail=true"]);
    let states: Vec<&str> =
        v["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["cached", "cached", "partial", "missing"]);
    assert!(err.contains("blocked      d: upstream `c` failed"), "{err}");
}

#[test]
fn a_panicking_stage_is_a_failed_stage() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    let err = env.stderr(&["run", "p.toml", "--set", "stages.c.panic=true", "--jobs", "2"], 1);
    assert!(err.contains("failed       c: the stage panicked: told to panic"), "{err}");
    assert!(err.contains("done         b"), "{err}");
    assert!(err.contains("blocked      d: upstream `c` failed"), "{err}");
}

#[test]
fn config_errors_name_file_line_and_key_and_exit_2() {
    let env = Env::new();
    env.write("p.toml", "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"emit\"\nseed = \"one\"\n");
    let err = env.stderr(&["run", "p.toml"], 2);
    assert!(err.contains("p.toml:5:8"), "{err}");
    assert!(err.contains("stages.a.seed"), "{err}");
    assert!(
        !env.ds().join("runs").exists() || std::fs::read_dir(env.ds().join("runs")).unwrap().count() == 0
    );
}

#[test]
fn missing_external_file_names_stage_input_and_path() {
    let env = Env::new();
    env.write("p.toml", "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"emit\"\ndata = \"nope/model.bin\"\n");
    let err = env.stderr(&["plan", "p.toml"], 2);
    assert!(err.contains("stage `a`"), "{err}");
    assert!(err.contains("input `data`"), "{err}");
    assert!(err.contains("p.toml:5:8"), "{err}");
    assert!(err.contains("nope/model.bin"), "{err}");
}

#[test]
fn names_and_outputs_cannot_leave_the_datastore() {
    let env = Env::new();
    for (name, text) in [
        ("dots", "[pipeline]\nname = \"..\"\n"),
        ("slash", "[pipeline]\nname = \"../../etc\"\n"),
        ("stage", "[pipeline]\nname = \"ok\"\n[stages.\"../x\"]\nkind = \"emit\"\n"),
        ("abs", "[pipeline]\nname = \"ok\"\n[stages.\"/tmp/x\"]\nkind = \"emit\"\n"),
    ] {
        let f = format!("{name}.toml");
        env.write(&f, text);
        let err = env.stderr(&["run", &f], 2);
        assert!(err.contains("name"), "{name}: {err}");
    }
    assert!(!env.path("etc").exists());
    // A stage output that is a symlink out of the store is refused and nothing is published.
    env.write(
        "esc.toml",
        "[pipeline]\nname = \"esc\"\n[stages.e]\nkind = \"escape\"\ntarget = \"/etc/passwd\"\n",
    );
    let err = env.stderr(&["run", "esc.toml"], 1);
    assert!(err.contains("is a symlink"), "{err}");
    let v = env.json(&["status", "esc.toml"]);
    assert_ne!(v["stages"][0]["state"], "cached");
}

#[test]
fn verify_finds_a_flipped_byte() {
    let env = Env::new();
    env.write("p.toml", DIAMOND);
    env.ok(&["run", "p.toml"]);
    assert!(env.ok(&["verify"]).contains("all intact"));
    let f = env.out("p.toml", "b").join("data.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&f, bytes).unwrap();
    let out = env.expect(&["verify", "p.toml"], 1);
    assert!(out.contains("data.bin: content changed"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&env.expect(&["verify", "--json"], 1)).unwrap();
    assert_eq!(v["corrupt"], 1);
    assert_eq!(v["checked"], 4);
}
