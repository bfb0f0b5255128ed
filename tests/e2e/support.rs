//! A temporary project folder + datastore and helpers to run `pipe-testkit` in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub struct Env {
    pub dir: tempfile::TempDir,
    bin: &'static str,
    vars: Vec<(String, String)>,
}

impl Env {
    /// Runs `pipe-testkit` (the engine-test stage kinds).
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), bin: env!("CARGO_BIN_EXE_pipe-testkit"), vars: Vec::new() }
    }

    /// Runs the real `pipe` binary (the ML stage kinds).
    pub fn pipe() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), bin: env!("CARGO_BIN_EXE_pipe"), vars: Vec::new() }
    }

    /// Sets an environment variable for every command of this environment.
    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.push((name.to_string(), value.to_string()));
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn ds(&self) -> PathBuf {
        self.path("ds")
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin);
        c.args(args)
            .current_dir(self.dir.path())
            .env("DATASTORE", self.ds())
            .env("PIPE_TESTKIT_LOG", self.path("events.log"))
            .env_remove("RUST_LOG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and asserts the exit code, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.expect(args, 0)
    }

    pub fn expect(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "pipe {args:?}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn stderr(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(code), "pipe {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Lines `<kind> <key> <event>` the test stages appended.
    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("events.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn count(&self, pat: &str) -> usize {
        self.events().iter().filter(|l| l.contains(pat)).count()
    }

    /// `{stage: action}` from `pipe plan --json`.
    pub fn actions(&self, file: &str, extra: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["plan", file];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["action"].as_str().unwrap().to_string()))
            .collect()
    }

    /// The published out/ folder of a stage, from `pipe status --json`.
    pub fn out(&self, file: &str, stage: &str) -> PathBuf {
        self.out_with(file, stage, &[])
    }

    /// [`Env::out`] with extra arguments (`--set ...`).
    pub fn out_with(&self, file: &str, stage: &str, extra: &[&str]) -> PathBuf {
        let v = self.json(&[&["status", file][..], extra].concat());
        let s = v["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).unwrap();
        assert_eq!(s["state"], "cached", "{stage} is not cached: {s}");
        PathBuf::from(s["path"].as_str().unwrap())
    }
}

/// A four-stage pipeline: two sources, one combine of the first, one combine of everything.
pub const DIAMOND: &str = r#"
[pipeline]
name = "diamond"

[stages.a]
kind = "emit"
seed = 1

[stages.b]
kind = "emit"
seed = 2

[stages.c]
kind = "combine"
parts = ["a"]

[stages.d]
kind = "combine"
parts = ["c", "b"]
"#;

pub fn all(actions: &[(String, String)], action: &str) -> bool {
    actions.iter().all(|(_, a)| a == action)
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// `pipelines/tiny.toml` with its asset paths made absolute, to be written into a test's folder.
pub fn tiny_toml() -> String {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(repo.join("pipelines/tiny.toml"))
        .unwrap()
        .replace("\"tiny/", &format!("\"{}/", repo.join("pipelines/tiny").display()))
}
