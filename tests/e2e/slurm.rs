//! `pipe run --executor slurm` against a real Slurm: Debian's slurm-wlm (slurmctld + slurmd +
//! munge), started on loopback by `scripts/slurm-local.sh` in a temporary folder. The tiny
//! pipeline runs as jobs (its `cache_web` as a job array), a worker is killed with SIGKILL (the
//! coordinator resubmits it), a job is cancelled with `scancel` mid-way (the run fails, the rerun
//! resumes), a detached run is reattached, and every output equals the local executor's.
//!
//! Skipped with a message when slurm-wlm is not installed (or we are not root), unless
//! `PIPE_REQUIRE_SLURM=1` (as `.ci/run` sets after installing it), when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Env, tiny_toml};

/// A cluster in a temporary folder, stopped on drop.
struct Cluster {
    dir: PathBuf,
    conf: String,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let have = Path::new("/usr/sbin/slurmctld").exists() && Path::new("/usr/sbin/munged").exists();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !have || !root {
            assert!(
                std::env::var_os("PIPE_REQUIRE_SLURM").is_none(),
                "PIPE_REQUIRE_SLURM is set but slurm-wlm and munge are not installed (or not root)"
            );
            eprintln!("SKIPPED: the Slurm test needs Debian's slurm-wlm and munge, run as root");
            return None;
        }
        // A short path: munge's socket lives inside it.
        let tmp = tempfile::Builder::new().prefix("pipe-slurm").tempdir_in("/tmp").unwrap();
        let dir = tmp.path().join("c");
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .env("SLURM_LOCAL_CTLD_PORT", free().to_string())
            .env("SLURM_LOCAL_SLURMD_PORT", free().to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slurm-local.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.join("slurm.conf").to_string_lossy().into_owned();
        Some(Cluster { dir, conf, _tmp: tmp })
    }

    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh");
        let _ = Command::new("bash").arg(script).arg("stop").arg(&self.dir).stderr(Stdio::null()).status();
    }
}

/// The tiny pipeline, with a `cache_web` of several shards (so it becomes a job array) and a
/// training long enough to interrupt.
fn pipeline(env: &Env) {
    let toml = tiny_toml()
        .replace("[stages.train]\n", "[stages.train]\ncheckpoint_every = 25\n")
        .replace("epochs = 25", "epochs = 60");
    let web = toml.find("[stages.cache_web]").expect("a cache_web stage");
    let at = web + toml[web..].find("shard_tokens = 2000").expect("cache_web's shard_tokens");
    // Shards close at window ends (8 × batch_size documents): small windows, several shards.
    let toml = format!(
        "{}shard_tokens = 700\nbatch_size = 2{}",
        &toml[..at],
        &toml[at + "shard_tokens = 2000".len()..]
    );
    assert!(toml.contains("shard_tokens = 700") && toml.contains("epochs = 60"), "tiny.toml changed shape");
    env.write("tiny.toml", &toml);
}

fn slurm_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "tiny.toml",
        "--executor",
        "slurm",
        "--gpus-per-job",
        "0",
        "--poll-seconds",
        "0.3",
        "--array-size",
        "3",
        "--on-interrupt",
        "cancel",
    ];
    a.extend_from_slice(extra);
    a
}

/// Every published file of every stage (path → blake3), by stage, from the manifests.
fn published(env: &Env) -> BTreeMap<String, BTreeMap<String, String>> {
    let st = env.json(&["status", "tiny.toml"]);
    st["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "cached", "{s}");
            let out = PathBuf::from(s["path"].as_str().unwrap());
            let m: Value =
                serde_json::from_slice(&std::fs::read(out.parent().unwrap().join("manifest.json")).unwrap())
                    .unwrap();
            let files = m["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f["path"].as_str().unwrap().to_string(), f["blake3"].as_str().unwrap().to_string()))
                .collect();
            (s["name"].as_str().unwrap().to_string(), files)
        })
        .collect()
}

fn manifest(env: &Env, stage: &str) -> Value {
    let out = env.out("tiny.toml", stage);
    serde_json::from_slice(&std::fs::read(out.parent().unwrap().join("manifest.json")).unwrap()).unwrap()
}

/// `pipe status --json` of one stage, and its Slurm record.
fn status(env: &Env, stage: &str) -> (Value, Value) {
    let st = env.json(&["status", "tiny.toml"]);
    let s = st["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).unwrap().clone();
    (s, st["slurm"]["stages"][stage].clone())
}

/// Waits until `stage`'s `run` job is RUNNING and its checkpoints hold more than `done` steps;
/// returns the job id.
fn wait_running(env: &Env, stage: &str, done: u64, not: &str) -> String {
    let t0 = Instant::now();
    loop {
        let (s, jobs) = status(env, stage);
        let job = jobs["jobs"].as_array().and_then(|j| j.iter().rev().find(|j| j["role"] == "run")).cloned();
        if let Some(j) = job
            && j["state"] == "RUNNING"
            && j["id"] != not
            && s["state"] == "partial"
            && s["progress"]["done"].as_u64().unwrap_or(0) > done
        {
            return j["id"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{stage} never ran past step {done}: {s} {jobs}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the `pipe exec-stage` process computing `stage` in datastore `ds`.
fn worker_pid(ds: &Path, stage: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmd.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let has = |a: &str| args.iter().any(|x| x == a);
        if has("exec-stage") && has(stage) && args.iter().any(|x| Path::new(x) == ds) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn tiny_pipeline_on_slurm_equals_local_survives_kill_and_cancel_and_reattaches() {
    let Some(cluster) = Cluster::start() else { return };

    // The reference: the local executor.
    let local = Env::pipe();
    pipeline(&local);
    local.ok(&["run", "tiny.toml", "-q"]);
    let want = published(&local);

    // 1. A worker killed with SIGKILL (a lost node) is resubmitted; its resubmission is then
    //    cancelled with scancel mid-way: the run fails and says so.
    let mut env = Env::pipe();
    env.set_var("SLURM_CONF", &cluster.conf);
    pipeline(&env);
    let coord = env
        .cmd(&slurm_args(&["--max-retries", "2"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = wait_running(&env, "train", 50, "");
    let pid = worker_pid(&env.ds(), "train").expect("the train worker process");
    // SAFETY: sending a signal to a process id we just found.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let second = wait_running(&env, "train", 100, &first);
    assert_ne!(first, second, "a resubmitted job has a new id");
    let o = cluster.cmd("scancel").arg(&second).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = coord.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("Slurm job {second} was cancelled")), "{stderr}");
    assert!(stderr.contains("resubmitting (1 of 2 retries"), "{stderr}");
    assert!(stderr.contains("blocked      collect") || stderr.contains("blocked      scale"), "{stderr}");
    let (train, jobs) = status(&env, "train");
    assert_eq!(train["state"], "partial", "the cancelled job left its checkpoints: {train}");
    assert_eq!(jobs["retries"], 1, "{jobs}");
    assert_eq!(jobs["state"], "failed", "{jobs}");
    // The cache stages ran: cache_web as a job array of parts and an assembling job.
    let web = status(&env, "cache_web").1;
    let roles: Vec<&str> =
        web["jobs"].as_array().unwrap().iter().map(|j| j["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["parts", "run"], "{web}");
    assert!(web["jobs"][0]["parts"].as_array().unwrap().len() > 1, "{web}");
    let text = env.ok(&["status", "tiny.toml"]);
    assert!(text.contains("slurm jobs (") && text.contains(&format!("job {second} CANCELLED")), "{text}");

    // 2. The rerun resumes the training and finishes; everything equals the local run.
    let out = env.cmd(&slurm_args(&[])).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cached       cache_web") && stderr.contains("done         train"), "{stderr}");
    assert_eq!(manifest(&env, "train")["resumed"], true);
    assert_eq!(
        manifest(&env, "cache_web")["metrics"]["shards"],
        manifest(&local, "cache_web")["metrics"]["shards"]
    );
    let got = published(&env);
    for (stage, files) in &want {
        assert_eq!(&got[stage], files, "stage {stage} differs from the local executor's");
    }

    // 3. --detach submits and returns; the next run reattaches to the queued jobs (held here, so
    //    that they are still queued when it starts).
    let mut env = Env::pipe();
    env.set_var("SLURM_CONF", &cluster.conf);
    pipeline(&env);
    let t0 = Instant::now();
    let out = env.cmd(&slurm_args(&["--detach", "--sbatch-arg=--hold"])).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("detached:"), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(60));
    let st = env.json(&["status", "tiny.toml"]);
    assert_eq!(st["slurm"]["attached"], false, "{st}");
    let ids: Vec<String> = st["slurm"]["stages"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(st["slurm"]["stages"]["plot"]["state"], "submitted", "{st}");
    assert_eq!(st["slurm"]["stages"]["plot"]["jobs"][0]["state"], "PENDING", "{st}");
    let plot_job = st["slurm"]["stages"]["plot"]["jobs"][0]["id"].as_str().unwrap().to_string();
    let coord = env.cmd(&slurm_args(&["-v"])).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // While it watches the held jobs, a second coordinator of the pipeline is refused.
    let second = env.run(&slurm_args(&[]));
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another `pipe run --executor slurm` coordinates pipeline `tiny`"), "{err}");
    let o = cluster.cmd("scontrol").arg("release").arg(ids.join(",")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = coord.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reattached to the Slurm jobs of 7 stage(s)"), "{stderr}");
    assert!(!stderr.contains("submitted job"), "the queued jobs are adopted, not resubmitted: {stderr}");
    assert_eq!(status(&env, "plot").1["jobs"][0]["id"], plot_job.as_str());
    let got = published(&env);
    for (stage, files) in &want {
        assert_eq!(&got[stage], files, "stage {stage} differs from the local executor's");
    }
    // A rerun with everything cached submits nothing.
    let out = env.cmd(&slurm_args(&["-v"])).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("submitted job"));
}
