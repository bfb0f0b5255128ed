//! The `pipe` command line: argument parsing, logging set-up and the mapping of engine results to
//! output and exit codes. All behaviour lives in `engine`; this crate is glue shared by the `pipe`
//! binary and the `pipe-testkit` binary of the end-to-end tests (which registers other stage kinds).

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use engine::config::Pipeline;
use engine::plan::PlanOptions;
use engine::store::Store;
use engine::{Cancel, Registry};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit codes: 0 success, 1 a stage failed or verify found corruption, 2 bad input (config,
/// arguments, missing files), 130 interrupted.
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const INTERRUPTED: u8 = 130;
}

/// The datastore used when neither --datastore, $DATASTORE nor `[pipeline] datastore` names one.
pub const DEFAULT_DATASTORE: &str = "./datastore";

#[derive(Parser, Debug)]
#[command(
    name = "pipe",
    version,
    about = "Declarative, content-addressed pipelines for crosscoder model-diffing experiments",
    long_about = "Runs the stages of a pipeline file (TOML) in dependency order. Every stage's output is \
stored under its blake3 key in the datastore, so unchanged stages are skipped, interrupted stages resume, \
and two pipelines can be compared stage by stage.",
    after_help = "Examples:\n  pipe run pipelines/tiny.toml\n  pipe plan pipelines/llama8b.toml --set stages.train.k=64\n  pipe status pipelines/tiny.toml --json\n  pipe diff pipelines/l1.toml pipelines/batchtopk.toml\n  pipe report pipelines/tiny.toml\n  pipe serve pipelines/tiny.toml\n  pipe gc --keep pipelines/tiny.toml --dry-run\n\nDatastore: --datastore > $DATASTORE > [pipeline] datastore > ./datastore"
)]
pub struct Cli {
    /// Datastore root (overrides $DATASTORE and the pipeline's `datastore`).
    #[arg(long, global = true, value_name = "DIR")]
    datastore: Option<PathBuf>,
    /// More log output (-v info of every stage, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Load {
    /// The pipeline file.
    file: PathBuf,
    /// Override a value, parsed as TOML (strings need no quotes): `--set stages.train.k=64`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline: skip cached stages, resume partial ones, run the rest.
    #[command(
        after_help = "Examples:\n  pipe run pipelines/tiny.toml\n  pipe run exp.toml --only train --jobs 2 --devices cuda:0,cuda:1\n  pipe run exp.toml --force plot --dry-run"
    )]
    Run {
        #[command(flatten)]
        load: Load,
        /// Run only this stage and what it needs (repeatable).
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Recompute this stage even if cached (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Stages run in parallel at most.
        #[arg(long, short = 'j', default_value_t = 1)]
        jobs: usize,
        /// Devices for stages that want an accelerator, one each: `cpu` or `cuda:0,cuda:1`.
        #[arg(long, default_value = "cpu", value_delimiter = ',')]
        devices: Vec<String>,
        /// Print the plan and run nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Run one stage (or one part of it) of a pipeline snapshot: what a cluster job runs.
    #[command(hide = true)]
    ExecStage {
        /// The pipeline snapshot the coordinator wrote.
        file: PathBuf,
        #[arg(long)]
        stage: String,
        /// The key the coordinator planned; the job refuses to run another.
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Where to write how the stage ended (JSON).
        #[arg(long)]
        outcome: Option<PathBuf>,
        /// Compute only this part of a split stage.
        #[arg(long)]
        part: Option<usize>,
        /// Recompute even if published (`pipe run --force`; the coordinator cleared the work dir).
        #[arg(long)]
        force: bool,
    },
    /// What a run would do with each stage (skip, run, resume) and why.
    #[command(after_help = "Example:\n  pipe plan exp.toml --set stages.train.k=64 --json")]
    Plan {
        #[command(flatten)]
        load: Load,
        #[arg(long)]
        force: Vec<String>,
        /// JSON: {"stages":[{"name","kind","key","action","reasons"}]}
        #[arg(long)]
        json: bool,
    },
    /// Each stage's state: cached, partial (with progress), missing or stale.
    #[command(after_help = "Example:\n  pipe status exp.toml --json")]
    Status {
        #[command(flatten)]
        load: Load,
        /// JSON: {"stages":[{"name","kind","key","state","path","progress"}]}
        #[arg(long)]
        json: bool,
    },
    /// The stage graph.
    #[command(after_help = "Example:\n  pipe graph exp.toml --format dot | dot -Tsvg > graph.svg")]
    Graph {
        #[command(flatten)]
        load: Load,
        #[arg(long, value_enum, default_value_t = GraphFormatArg::Text)]
        format: GraphFormatArg,
    },
    /// A stage's effective parameters, key, outputs and metrics.
    #[command(after_help = "Example:\n  pipe show exp.toml train --set stages.train.k=64")]
    Show {
        #[command(flatten)]
        load: Load,
        /// The stage name.
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Compare pipelines: parameter differences, shared keys, metrics, and figures from the stage kinds.
    #[command(
        after_help = "Examples:\n  pipe diff l1.toml batchtopk.toml\n  pipe diff sweep/k*.toml --json\n  pipe diff a.toml b.toml --out figs/ab\n\nFigures: every stage that at least two pipelines have run with different keys is compared by its\nstage kind into <folder>/<stage>/; the folder defaults to $DATASTORE/diffs/<label>--<label>[--…]."
    )]
    Diff {
        /// Two or more pipeline files.
        #[arg(num_args = 2.., required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The figure folder (replaced whole on each diff); default $DATASTORE/diffs/<labels>.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Write no figure folder.
        #[arg(long, conflicts_with = "out")]
        no_figures: bool,
        /// JSON: {"pipelines","params","stages","metrics","figures"}
        #[arg(long)]
        json: bool,
    },
    /// Write one self-contained HTML page of a pipeline's latest results.
    #[command(
        after_help = "Examples:\n  pipe report pipelines/tiny.toml\n  pipe report exp.toml --set stages.train.k=64 -o exp-k64.html\n\nThe page embeds each stage's figures (those its figures.json lists, else every top-level PNG)\nand needs no network and no JavaScript."
    )]
    Report {
        #[command(flatten)]
        load: Load,
        /// The HTML file to write; default $DATASTORE/reports/<pipeline>.html.
        #[arg(short = 'o', long = "out", value_name = "OUT.html")]
        out: Option<PathBuf>,
    },
    /// Serve the latent explorer (latent tables, examples, figures, steering) over the datastore.
    #[command(
        after_help = "Examples:\n  pipe serve                      every pipeline with runs in the datastore\n  pipe serve pipelines/tiny.toml  one pipeline file, at its current keys\n  pipe serve --port 8080 --device cuda:0\n\nBinds 127.0.0.1 unless --host says otherwise; open the printed address in a browser."
    )]
    Serve {
        /// A pipeline file: show its stages at their current keys (default: every pipeline with
        /// run records in the datastore, each stage at its newest published key).
        file: Option<PathBuf>,
        /// Override a value of FILE, parsed as TOML.
        #[arg(long = "set", value_name = "KEY=VALUE", requires = "file")]
        set: Vec<String>,
        /// Address to bind; anything but loopback exposes the datastore to the network.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0: any free one).
        #[arg(long, short = 'p', default_value_t = 8765)]
        port: u16,
        /// Where steering runs the models: `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Longest generation a steering request may ask for.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Generations at once; more requests are refused (429) until one ends.
        #[arg(long, default_value_t = 1)]
        max_concurrent: usize,
    },
    /// Remove objects and partials that no kept pipeline or recent run references, and old run records.
    #[command(after_help = "Example:\n  pipe gc --keep pipelines/llama8b.toml --keep-days 0 --dry-run")]
    Gc {
        /// Keep every output of this pipeline (repeatable).
        #[arg(long, value_name = "FILE")]
        keep: Vec<PathBuf>,
        /// Also keep what runs of the last N days produced.
        #[arg(long, default_value_t = 7, value_name = "N")]
        keep_days: u64,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash published outputs against their manifests.
    #[command(after_help = "Examples:\n  pipe verify\n  pipe verify exp.toml --json")]
    Verify {
        /// Only the outputs of this pipeline.
        file: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  pipe completions bash > ~/.local/share/bash-completion/completions/pipe"
    )]
    Completions { shell: clap_complete::Shell },
}

/// `pipe run` on a cluster: which executor, and `[executor.slurm]` overrides.
#[derive(Args, Debug, Clone)]
struct ClusterArgs {
    /// Where stages run: here (`local`) or as Slurm jobs (`slurm`).
    #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
    executor: ExecutorArg,
    /// Slurm: the partition of every job.
    #[arg(long, help_heading = "Slurm")]
    partition: Option<String>,
    /// Slurm: GPUs per job of a stage that wants an accelerator (0: CPUs only).
    #[arg(long, help_heading = "Slurm")]
    gpus_per_job: Option<u32>,
    /// Slurm: the time limit of every job (`--time`), e.g. 24:00:00.
    #[arg(long, help_heading = "Slurm")]
    time: Option<String>,
    /// Slurm: one more sbatch option for every job (repeatable), e.g. --sbatch-arg=--account=lab.
    #[arg(long = "sbatch-arg", value_name = "OPTION", allow_hyphen_values = true, help_heading = "Slurm")]
    sbatch_args: Vec<String>,
    /// Slurm: resubmissions of a preempted, timed-out or lost job per stage.
    #[arg(long, help_heading = "Slurm")]
    max_retries: Option<u32>,
    /// Slurm: at most this many array jobs for a stage that splits (`cache`); 1: one job.
    #[arg(long, help_heading = "Slurm")]
    array_size: Option<usize>,
    /// Slurm: seconds between two looks at the queue.
    #[arg(long, help_heading = "Slurm")]
    poll_seconds: Option<f64>,
    /// Slurm: submit the jobs and return; a later `pipe run` reattaches, `pipe status` shows them.
    #[arg(long, help_heading = "Slurm")]
    detach: bool,
    /// Slurm: on Ctrl-C, ask (on a terminal; else cancel), cancel the jobs, or detach from them.
    #[arg(long, value_enum, default_value_t = InterruptArg::Ask, help_heading = "Slurm")]
    on_interrupt: InterruptArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum InterruptArg {
    Ask,
    Cancel,
    Detach,
}

impl ClusterArgs {
    fn is_default(&self) -> bool {
        self.partition.is_none()
            && self.gpus_per_job.is_none()
            && self.time.is_none()
            && self.sbatch_args.is_empty()
            && self.max_retries.is_none()
            && self.array_size.is_none()
            && self.poll_seconds.is_none()
            && !self.detach
    }

    /// `[executor.slurm]` with the flags applied.
    fn slurm_options(&self, p: &Pipeline) -> Result<engine::config::SlurmOptions> {
        let mut o = p.executor.slurm.clone();
        if let Some(v) = &self.partition {
            o.partition = Some(v.clone());
        }
        if let Some(v) = self.gpus_per_job {
            o.gpus_per_job = v;
        }
        if let Some(v) = &self.time {
            o.time = Some(v.clone());
        }
        o.sbatch_args.extend(self.sbatch_args.iter().cloned());
        if let Some(v) = self.max_retries {
            o.max_retries = v;
        }
        if let Some(v) = self.array_size {
            if v == 0 {
                bail!("--array-size must be at least 1");
            }
            o.array_size = v;
        }
        if let Some(v) = self.poll_seconds {
            if !(v.is_finite() && v > 0.0) {
                bail!("--poll-seconds must be a positive number");
            }
            o.poll_seconds = v;
        }
        Ok(o)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GraphFormatArg {
    Text,
    Dot,
    Mermaid,
}

/// Runs the CLI with the given stage kinds and returns the process exit code.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let cancel = Cancel::new();
    {
        let cancel = cancel.clone();
        let mut hits = 0;
        let _ = ctrlc::set_handler(move || {
            hits += 1;
            if hits > 1 {
                eprintln!("interrupted again: exiting now (partials stay resumable)");
                std::process::exit(exit::INTERRUPTED as i32);
            }
            eprintln!("interrupted: stopping (running stages end cleanly; press Ctrl-C again to exit now)");
            cancel.cancel();
        });
    }
    on_sigterm(cancel.clone());
    match dispatch(cli, &registry, cancel) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = std::io::stdout().flush();
            if let Some(c) = e.downcast_ref::<engine::config::ConfigErrors>() {
                eprintln!("{c}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(exit::BAD_INPUT)
        }
    }
}

/// SIGTERM (`scancel`, a job's time limit, `kill`) stops like a first Ctrl-C: running stages end
/// cleanly at their next check and stay resumable. SIGHUP keeps its default (the process ends):
/// a Slurm coordinator whose terminal went away leaves its jobs running.
fn on_sigterm(cancel: Cancel) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TERM: AtomicBool = AtomicBool::new(false);
    extern "C" fn handler(_: libc::c_int) {
        TERM.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as *const () as libc::sighandler_t);
    }
    let _ = std::thread::Builder::new().name("pipe-sigterm".into()).spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if TERM.load(Ordering::SeqCst) {
                eprintln!("terminated: stopping (running stages end cleanly; partials stay resumable)");
                cancel.cancel();
                return;
            }
        }
    });
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "warn,engine=info",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(|| SuspendWriter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_filter(filter);
    let objects = engine::logging::ObjectLogLayer.with_filter(tracing_subscriber::filter::LevelFilter::DEBUG);
    let _ = tracing_subscriber::registry().with(stderr).with(objects).try_init();
}

/// Writes log lines to stderr with the progress bars cleared.
struct SuspendWriter;

impl Write for SuspendWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        engine::progress::suspend(|| std::io::stderr().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn load(l: &Load, registry: &Registry) -> Result<Pipeline> {
    Ok(engine::config::load(&l.file, &l.set, registry)?)
}

/// --datastore > $DATASTORE > [pipeline] datastore > ./datastore; printed once to stderr.
fn open_store(flag: &Option<PathBuf>, quiet: bool, pipeline: Option<&Pipeline>) -> Result<Store> {
    let env = std::env::var_os("DATASTORE").filter(|v| !v.is_empty()).map(PathBuf::from);
    let (root, from) = if let Some(d) = flag {
        (d.clone(), "--datastore")
    } else if let Some(d) = env {
        (d, "$DATASTORE")
    } else if let Some(d) = pipeline.and_then(|p| p.datastore.clone()) {
        (d, "[pipeline] datastore")
    } else {
        (PathBuf::from(DEFAULT_DATASTORE), "default")
    };
    let store =
        Store::open(&root).with_context(|| format!("cannot open the datastore {}", root.display()))?;
    if !quiet {
        eprintln!("datastore: {} ({from})", store.root().display());
    }
    Ok(store)
}

/// `--devices`: `cpu`, or accelerators as `cuda:N` / `metal:N`, each listed once.
fn check_devices(devices: &[String]) -> Result<()> {
    for (i, d) in devices.iter().enumerate() {
        let ok = d == "cpu"
            || d.split_once(':').is_some_and(|(kind, n)| {
                matches!(kind, "cuda" | "metal") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
            });
        if !ok {
            bail!("--devices: `{d}` is not a device; write `cpu` or `cuda:0,cuda:1` (also `metal:N`)");
        }
        if devices[..i].contains(d) {
            bail!("--devices: `{d}` is listed twice");
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The Slurm part of `pipe status`: each stage's jobs at its current key.
fn slurm_status_text(
    file: &engine::slurm::JobsFile,
    stages: &std::collections::BTreeMap<String, engine::slurm::StageJobs>,
    order: &[&str],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if stages.is_empty() {
        return out;
    }
    let active =
        stages.values().flat_map(|s| &s.jobs).any(|j| engine::slurm::JobState::parse(&j.state).is_active());
    let who = match (file.attached, active) {
        (true, _) => format!("watched by {}", file.coordinator),
        (false, true) => {
            "no coordinator is watching; `pipe run FILE --executor slurm` reattaches".to_string()
        }
        (false, false) => format!("last coordinated by {}", file.coordinator),
    };
    let _ = writeln!(out, "\nslurm jobs ({who}; updated {}):", file.updated);
    for (name, sj) in order.iter().filter_map(|n| stages.get_key_value(*n)) {
        let jobs: Vec<String> = sj
            .jobs
            .iter()
            .map(|j| {
                let what = if j.role == "parts" {
                    format!("parts job array {}", j.id)
                } else {
                    format!("job {}", j.id)
                };
                format!("{what} {}", j.state)
            })
            .collect();
        let retries =
            if sj.retries > 0 { format!(", {} resubmission(s)", sj.retries) } else { String::new() };
        let _ = writeln!(out, "  {name:<16} {:<10} {}{retries}", sj.state, jobs.join(", "));
        if let Some(e) = &sj.error {
            let _ = writeln!(out, "  {:<16} {e}", "");
        }
    }
    out
}

fn plan_of(p: &Pipeline, registry: &Registry, store: &Store, force: &[String]) -> Result<engine::plan::Plan> {
    for f in force {
        if p.stage(f).is_none() {
            bail!("--force {f}: no stage `{f}` in {}", p.file.display());
        }
    }
    let opts = PlanOptions { force: force.iter().cloned().collect() };
    Ok(engine::plan::plan(p, registry, store, &opts)?)
}

fn dispatch(cli: Cli, registry: &Registry, cancel: Cancel) -> Result<u8> {
    let ds = cli.datastore.clone();
    let quiet = cli.quiet;
    match cli.command {
        Command::Run { load: l, only, force, jobs, devices, dry_run, cluster } => {
            let p = load(&l, registry)?;
            for o in &only {
                if p.stage(o).is_none() {
                    bail!("--only {o}: no stage `{o}` in {}", p.file.display());
                }
            }
            check_devices(&devices)?;
            let store = open_store(&ds, quiet, Some(&p))?;
            let plan = plan_of(&p, registry, &store, &force)?;
            if dry_run {
                print!("{}", engine::report::plan_text(&plan));
                return Ok(0);
            }
            let summary = if cluster.executor == ExecutorArg::Slurm {
                let binary = match &p.executor.slurm.binary {
                    Some(b) => PathBuf::from(b),
                    None => std::env::current_exe().context(
                        "cannot tell which pipe binary the jobs should run; set `[executor.slurm] binary`",
                    )?,
                };
                let opts = engine::slurm::SlurmRunOptions {
                    slurm: cluster.slurm_options(&p)?,
                    only: only.into_iter().collect(),
                    cancel,
                    detach: cluster.detach,
                    on_interrupt: match cluster.on_interrupt {
                        InterruptArg::Ask => engine::slurm::OnInterrupt::Ask,
                        InterruptArg::Cancel => engine::slurm::OnInterrupt::Cancel,
                        InterruptArg::Detach => engine::slurm::OnInterrupt::Detach,
                    },
                    binary,
                };
                let sched = engine::slurm::SlurmCli::default();
                match engine::slurm::run(&p, registry, &store, &plan, &opts, &sched) {
                    Ok(s) => s,
                    Err(engine::slurm::SlurmError::Exec(e)) => return Err(e.into()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(exit::FAILED);
                    }
                }
            } else {
                if !cluster.is_default() {
                    bail!(
                        "--partition, --gpus-per-job, --time, --sbatch-arg, --max-retries, --array-size, --poll-seconds and --detach need --executor slurm"
                    );
                }
                let opts =
                    engine::exec::RunOptions { jobs, devices, only: only.into_iter().collect(), cancel };
                engine::exec::run(&p, registry, &store, &plan, &opts)?
            };
            if cluster.detach {
                eprintln!("results: {}", store.root().join("results").join(&p.name).display());
                return Ok(
                    if summary.stages.iter().any(|(_, o)| matches!(o, engine::exec::Outcome::Failed(_))) {
                        exit::FAILED
                    } else {
                        0
                    },
                );
            }
            for (name, outcome) in &summary.stages {
                let detail = match outcome {
                    engine::exec::Outcome::Done { seconds, resumed } => {
                        format!(" in {seconds:.2}s{}", if *resumed { " (resumed)" } else { "" })
                    }
                    engine::exec::Outcome::Failed(e) => format!(": {e}"),
                    engine::exec::Outcome::Blocked(e) => format!(": {e}"),
                    engine::exec::Outcome::Queued(jobs) => format!(": Slurm job {jobs}"),
                    _ => String::new(),
                };
                eprintln!("{:<13}{name}{detail}", outcome.as_str());
            }
            eprintln!("results: {}", store.root().join("results").join(&p.name).display());
            Ok(if summary.cancelled {
                exit::INTERRUPTED
            } else if summary.ok() {
                0
            } else {
                exit::FAILED
            })
        }
        Command::ExecStage { file, stage, key, device, outcome, part, force } => {
            check_devices(std::slice::from_ref(&device))?;
            let p = engine::config::load(&file, &[], registry)?;
            let store = open_store(&ds, true, Some(&p))?;
            let forced = if force { vec![stage.clone()] } else { Vec::new() };
            let plan = plan_of(&p, registry, &store, &forced)?;
            let Some(s) = plan.stage(&stage) else {
                bail!("no stage `{stage}` in {}", file.display());
            };
            if s.key.hex() != key {
                bail!(
                    "stage `{stage}` of {} has key {} here but was submitted with key {key}: an input changed after submission (a model or dataset file?)",
                    file.display(),
                    s.key.hex()
                );
            }
            let mode = match part {
                Some(i) => engine::exec::Mode::Part(i),
                None => engine::exec::Mode::Resume,
            };
            let done = engine::exec::execute_one(&p, registry, &store, &plan, &stage, device, cancel, mode)?;
            if let Some(path) = &outcome {
                engine::slurm::JobOutcome::from_outcome(&done.outcome)
                    .write(path)
                    .with_context(|| format!("cannot write the job outcome {}", path.display()))?;
            }
            eprintln!(
                "{:<13}{stage}{}",
                done.outcome.as_str(),
                match &done.outcome {
                    engine::exec::Outcome::Failed(e) | engine::exec::Outcome::Blocked(e) => format!(": {e}"),
                    _ => String::new(),
                }
            );
            Ok(match done.outcome {
                engine::exec::Outcome::Done { .. } | engine::exec::Outcome::Cached => 0,
                engine::exec::Outcome::Cancelled => exit::INTERRUPTED,
                _ => exit::FAILED,
            })
        }
        Command::Plan { load: l, force, json } => {
            let p = load(&l, registry)?;
            let store = open_store(&ds, quiet, Some(&p))?;
            let plan = plan_of(&p, registry, &store, &force)?;
            if json {
                print_json(&engine::report::plan_json(&plan));
            } else {
                print!("{}", engine::report::plan_text(&plan));
            }
            Ok(0)
        }
        Command::Status { load: l, json } => {
            let p = load(&l, registry)?;
            let store = open_store(&ds, quiet, Some(&p))?;
            let plan = plan_of(&p, registry, &store, &[])?;
            let jobs = engine::slurm::status(&store, &p, &plan, &engine::slurm::SlurmCli::default());
            if json {
                let mut v = engine::report::status_json(&plan);
                if let (Some((file, stages)), Some(obj)) = (&jobs, v.as_object_mut()) {
                    obj.insert(
                        "slurm".into(),
                        serde_json::json!({ "attached": file.attached, "coordinator": file.coordinator, "updated": file.updated, "stages": stages }),
                    );
                }
                print_json(&v);
            } else {
                print!("{}", engine::report::status_text(&plan));
                if let Some((file, stages)) = &jobs {
                    let order: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
                    print!("{}", slurm_status_text(file, stages, &order));
                }
            }
            Ok(0)
        }
        Command::Graph { load: l, format } => {
            let p = load(&l, registry)?;
            let f = match format {
                GraphFormatArg::Text => engine::graph::GraphFormat::Text,
                GraphFormatArg::Dot => engine::graph::GraphFormat::Dot,
                GraphFormatArg::Mermaid => engine::graph::GraphFormat::Mermaid,
            };
            print!("{}", engine::graph::render(&p, f));
            Ok(0)
        }
        Command::Show { load: l, stage, json } => {
            let p = load(&l, registry)?;
            if p.stage(&stage).is_none() {
                let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
                bail!("no stage `{stage}` in {}; stages: {}", l.file.display(), names.join(", "));
            }
            let store = open_store(&ds, quiet, Some(&p))?;
            let plan = plan_of(&p, registry, &store, &[])?;
            let v = engine::report::show_json(&p, &plan, &stage).context("stage vanished")?;
            if json {
                print_json(&v);
            } else {
                print!("{}", engine::report::show_text(&v));
            }
            Ok(0)
        }
        Command::Diff { files, out, no_figures, json } => {
            let pipes: Vec<Pipeline> =
                files.iter().map(|f| engine::config::load(f, &[], registry)).collect::<Result<_, _>>()?;
            let store = open_store(&ds, quiet, pipes.first())?;
            let plans: Vec<_> =
                pipes.iter().map(|p| plan_of(p, registry, &store, &[])).collect::<Result<_>>()?;
            let labels = engine::diff::labels(&pipes.iter().collect::<Vec<_>>());
            let sides: Vec<engine::diff::Side> = labels
                .iter()
                .zip(pipes.iter().zip(&plans))
                .map(|(label, (pipeline, plan))| engine::diff::Side { label, pipeline, plan })
                .collect();
            let figures = if no_figures {
                None
            } else {
                let folder = out
                    .unwrap_or_else(|| store.root().join("diffs").join(engine::diff::folder_name(&labels)));
                let about: Vec<String> =
                    sides.iter().map(|s| format!("{}\t{}", s.label, s.pipeline.file.display())).collect();
                let jobs = engine::diff::figure_jobs(&sides);
                Some(engine::diff::write_figures(registry, &jobs, &folder, &about)?)
            };
            let v = engine::report::diff_json(&sides, figures.as_ref());
            if json {
                for w in figures.iter().flat_map(|f| &f.warnings) {
                    eprintln!(
                        "warning: comparing stage `{}` (kind `{}`) failed: {}",
                        w.stage, w.kind, w.message
                    );
                }
                print_json(&v);
            } else {
                print!("{}", engine::report::diff_text(&v));
            }
            Ok(0)
        }
        Command::Report { load: l, out } => {
            let p = load(&l, registry)?;
            let store = open_store(&ds, quiet, Some(&p))?;
            let plan = plan_of(&p, registry, &store, &[])?;
            let generated = engine::store::rfc3339(std::time::SystemTime::now());
            let read = |path: &std::path::Path| std::fs::read(path).ok();
            let html = engine::report_html::render(&p, &plan, store.root(), &generated, &read);
            let out = out.unwrap_or_else(|| store.root().join("reports").join(format!("{}.html", p.name)));
            engine::store::write_atomic(&out, html.as_bytes())
                .with_context(|| format!("cannot write the report {}", out.display()))?;
            println!("{}", out.display());
            Ok(0)
        }
        Command::Serve { file, set, host, port, device, max_new_tokens, max_concurrent } => {
            let pipeline = file.map(|file| load(&Load { file, set }, registry)).transpose()?;
            let store = open_store(&ds, quiet, pipeline.as_ref())?;
            let source: serve::CatalogSource = match &pipeline {
                Some(p) => {
                    let planned = serve::Catalog::from_plan(&plan_of(p, registry, &store, &[])?, &p.file);
                    Arc::new(move || Ok(planned.refreshed(&store)))
                }
                None => Arc::new(move || Ok(serve::Catalog::from_runs(&store))),
            };
            if max_concurrent == 0 {
                bail!("--max-concurrent must be at least 1");
            }
            let device =
                stages::device::candle_device(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let mut opts = serve::Options { max_concurrent, ..serve::Options::default() };
            opts.limits.max_new_tokens = max_new_tokens.max(1);
            let app = serve::App::new(source, device, opts);
            if !host.is_loopback() {
                tracing::warn!("serving on {host}: anyone who can reach this address can read the datastore");
            }
            let stop = cancel.clone();
            serve::serve(
                app,
                std::net::SocketAddr::new(host, port),
                |addr| {
                    println!("serving http://{addr}/ (Ctrl-C to stop)");
                    let _ = std::io::stdout().flush();
                },
                move || stop.is_cancelled(),
            )
            .with_context(|| format!("cannot serve on {host}:{port}"))?;
            Ok(0)
        }
        Command::Gc { keep, keep_days, dry_run, json } => {
            let pipes: Vec<Pipeline> =
                keep.iter().map(|f| engine::config::load(f, &[], registry)).collect::<Result<_, _>>()?;
            let store = open_store(&ds, quiet, pipes.first())?;
            let plans: Vec<_> =
                pipes.iter().map(|p| plan_of(p, registry, &store, &[])).collect::<Result<_>>()?;
            let horizon = engine::report::gc_horizon(keep_days);
            let keep = engine::report::gc_keep(&store, &plans, &horizon);
            let r = store.gc(&keep, &horizon, dry_run)?;
            if json {
                print_json(&engine::report::gc_json(&r, dry_run));
            } else {
                print!("{}", engine::report::gc_text(&r, dry_run));
            }
            Ok(0)
        }
        Command::Verify { file, set, json } => {
            let p = match &file {
                Some(f) => Some(engine::config::load(f, &set, registry)?),
                None => None,
            };
            let store = open_store(&ds, quiet, p.as_ref())?;
            let only: Option<BTreeSet<engine::Key>> = match &p {
                Some(p) => Some(plan_of(p, registry, &store, &[])?.stages.iter().map(|s| s.key).collect()),
                None => None,
            };
            let entries = store.verify(only.as_ref());
            if json {
                print_json(&engine::report::verify_json(&entries));
            } else {
                print!("{}", engine::report::verify_text(&entries, store.root()));
            }
            Ok(if entries.iter().any(|e| !e.problems.is_empty()) { exit::FAILED } else { 0 })
        }
        Command::Schema => {
            print!("{}", engine::schema::pipeline_schema_string(registry));
            Ok(0)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "pipe", &mut std::io::stdout());
            Ok(0)
        }
    }
}
