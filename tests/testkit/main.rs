//! `pipe-testkit`: the `pipe` CLI with small engine-test stage kinds instead of the ML stages.
//! Built only with `--features testkit`; the end-to-end tests in `tests/e2e` drive it.
//!
//! Every kind appends `<kind> <key> <event>` to `$PIPE_TESTKIT_LOG` (when set), so tests can count
//! how often a key was computed and whether a run resumed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::{Arity, Compared, DeviceUse, InputSpec, ParamError, Registry, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn event(ctx: &StageContext, kind: &str, what: &str) {
    if let Some(p) = std::env::var_os("PIPE_TESTKIT_LOG")
        && let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(p)
    {
        let _ = writeln!(f, "{kind} {} {what}", ctx.key().hex());
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| StageError::io(tmp.display(), e))?;
    fs::rename(&tmp, path).map_err(|e| StageError::io(path.display(), e))
}

/// Writes `chunks` deterministic chunks, one checkpoint file each, then joins them.
struct Emit;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct EmitParams {
    /// Number of chunks (units of resumable work).
    chunks: u32,
    /// Bytes per chunk.
    chunk_bytes: u32,
    seed: u64,
    /// Sleep after each chunk, so tests can kill mid-stage.
    delay_ms: u64,
    /// Output files: 0 writes one `data.bin`; n > 0 writes chunk i to `parts/<i % n>/chunk-<i>.bin`
    /// instead (for benchmarks over many files).
    files: u32,
}

impl Default for EmitParams {
    fn default() -> Self {
        Self { chunks: 4, chunk_bytes: 1024, seed: 0, delay_ms: 0, files: 0 }
    }
}

impl Stage for Emit {
    type Params = EmitParams;
    const KIND: &'static str = "emit";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Test source: deterministic bytes in resumable chunks.";
    const UNKEYED: &'static [&'static str] = &["delay_ms"];

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec::path("data", Arity::Optional, "A file whose content is mixed into the bytes.")]
    }

    fn check(&self, p: &EmitParams) -> Result<(), ParamError> {
        if p.chunks == 0 {
            return Err(ParamError::new(&["chunks"], "must be at least 1"));
        }
        Ok(())
    }

    fn run(&self, p: &EmitParams, ctx: &mut StageContext) -> Result<(), StageError> {
        event(ctx, "emit", if ctx.resumed() { "resume" } else { "start" });
        tracing::info!("delay_ms = {}", p.delay_ms);
        let extra = match ctx.external("data").first() {
            Some(path) => fs::read(path).map_err(|e| StageError::io(path.display(), e))?,
            None => Vec::new(),
        };
        ctx.progress().set_total(p.chunks as u64, "chunks");
        for i in 0..p.chunks {
            let ck = ctx.work_dir().join(format!("chunk-{i}.bin"));
            if ck.exists() {
                ctx.progress().inc(1);
                continue;
            }
            ctx.check_cancelled()?;
            let mut h = blake3::Hasher::new();
            h.update(&p.seed.to_le_bytes());
            h.update(&i.to_le_bytes());
            h.update(&extra);
            let mut buf = vec![0u8; p.chunk_bytes as usize];
            h.finalize_xof().fill(&mut buf);
            std::thread::sleep(Duration::from_millis(p.delay_ms));
            write_atomic(&ck, &buf)?;
            ctx.progress().inc(1);
            tracing::info!("chunk {i} written");
        }
        if p.files > 0 {
            for i in 0..p.chunks {
                let dir = ctx.out_dir().join("parts").join((i % p.files).to_string());
                fs::create_dir_all(&dir)?;
                let ck = ctx.work_dir().join(format!("chunk-{i}.bin"));
                fs::rename(&ck, dir.join(format!("chunk-{i}.bin")))?;
            }
            event(ctx, "emit", "done");
            return Ok(());
        }
        let mut all = Vec::new();
        for i in 0..p.chunks {
            let ck = ctx.work_dir().join(format!("chunk-{i}.bin"));
            all.extend(fs::read(&ck).map_err(|e| StageError::io(ck.display(), e))?);
        }
        write_atomic(&ctx.out_dir().join("data.bin"), &all)?;
        ctx.record_metric("bytes", all.len() as u64);
        event(ctx, "emit", "done");
        Ok(())
    }

    /// `sizes.tsv`: each label and the size of its `data.bin`; fails when one has none
    /// (`files > 0`), so the tests see a failing comparison too.
    fn compare(&self, outputs: &[Compared], dest: &Path) -> Result<Vec<PathBuf>, StageError> {
        let mut tsv = String::from("label\tstage\tbytes\n");
        for o in outputs {
            let f = o.dir.join("data.bin");
            let size = fs::metadata(&f)
                .map_err(|e| StageError::io(format!("{}: {}", o.label, f.display()), e))?
                .len();
            tsv.push_str(&format!("{}\t{}\t{size}\n", o.label, o.stage));
        }
        let out = dest.join("sizes.tsv");
        fs::write(&out, tsv)?;
        Ok(vec![out])
    }
}

/// A 1×1 PNG (one orange pixel).
const PIXEL_PNG: [u8; 69] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00,
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53, 0xde, 0x00,
    0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xdf, 0xc0, 0x00, 0x00, 0x04, 0x01,
    0x01, 0x80, 0xc5, 0x2a, 0x18, 0x5d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60,
    0x82,
];

/// Writes `plot.png` and `unlisted.png`, and, when `title` is set, a `figures.json` that lists
/// only `plot.png` (the figure convention of `pipe report`).
struct Figure;

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct FigureParams {
    title: String,
    caption: String,
}

impl Stage for Figure {
    type Params = FigureParams;
    const KIND: &'static str = "figure";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Test stage that writes PNG figures and figures.json.";

    fn run(&self, p: &FigureParams, ctx: &mut StageContext) -> Result<(), StageError> {
        fs::write(ctx.out_dir().join("plot.png"), PIXEL_PNG)?;
        fs::write(ctx.out_dir().join("unlisted.png"), b"\x89PNG not listed")?;
        if !p.title.is_empty() {
            let index = serde_json::json!([{"file": "plot.png", "title": p.title, "caption": p.caption}]);
            fs::write(ctx.out_dir().join("figures.json"), index.to_string())?;
        }
        ctx.record_metric("pixels", 1);
        ctx.record_metric("ratio", 2.0 / 3.0);
        Ok(())
    }
}

/// Hashes its upstreams' `data.bin` files together; can be told to fail.
struct Combine;

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct CombineParams {
    salt: String,
    /// Fail instead of producing output.
    fail: bool,
    /// Panic instead of producing output.
    panic: bool,
    delay_ms: u64,
}

impl Stage for Combine {
    type Params = CombineParams;
    const KIND: &'static str = "combine";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Test sink: blake3 of its upstreams' data.";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec::stage("parts", Arity::Many, "Stages whose data.bin is combined.")]
    }

    fn run(&self, p: &CombineParams, ctx: &mut StageContext) -> Result<(), StageError> {
        event(ctx, "combine", "start");
        std::thread::sleep(Duration::from_millis(p.delay_ms));
        if p.fail {
            return Err(StageError::failed("told to fail (fail = true)"));
        }
        assert!(!p.panic, "told to panic (panic = true)");
        let mut h = blake3::Hasher::new();
        h.update(p.salt.as_bytes());
        let mut n = 0u64;
        for up in ctx.inputs("parts") {
            let f = up.dir.join("data.bin");
            let bytes = fs::read(&f).map_err(|e| StageError::io(f.display(), e))?;
            n += bytes.len() as u64;
            h.update(&bytes);
        }
        fs::write(ctx.out_dir().join("data.bin"), h.finalize().as_bytes())?;
        ctx.record_metric("input_bytes", n);
        ctx.record_metric("score", (n % 1000) as f64 / 1000.0);
        event(ctx, "combine", "done");
        Ok(())
    }
}

/// Records the device it was given.
struct Accel;

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct AccelParams {
    id: u32,
    delay_ms: u64,
}

impl Stage for Accel {
    type Params = AccelParams;
    const KIND: &'static str = "accel";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Test accelerator stage: writes the device it got.";

    fn device(&self) -> DeviceUse {
        DeviceUse::Accelerator
    }

    fn run(&self, p: &AccelParams, ctx: &mut StageContext) -> Result<(), StageError> {
        event(ctx, "accel", &format!("start {}", ctx.device()));
        std::thread::sleep(Duration::from_millis(p.delay_ms));
        fs::write(ctx.out_dir().join("device.txt"), ctx.device())?;
        event(ctx, "accel", &format!("done {}", ctx.device()));
        Ok(())
    }
}

/// Tries to publish a symlink that leaves the datastore.
struct Escape;

#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
struct EscapeParams {
    target: String,
}

impl Stage for Escape {
    type Params = EscapeParams;
    const KIND: &'static str = "escape";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Test stage that writes a symlink output.";

    fn run(&self, p: &EscapeParams, ctx: &mut StageContext) -> Result<(), StageError> {
        std::os::unix::fs::symlink(&p.target, ctx.out_dir().join("link"))?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let mut r = Registry::new();
    r.register(Emit).register(Combine).register(Accel).register(Escape).register(Figure);
    pipe::main_with(r)
}
