//! The datastore: content-addressed objects, resumable work dirs, per-key locks, run records, the
//! readable `results/` view, `gc` and `verify`. Only this module and the executor write under
//! `$DATASTORE`.
//!
//! Layout (format [`STORE_FORMAT`], recorded in `$DATASTORE/FORMAT`):
//! ```text
//! objects/<kind>/<key>/{manifest.json, log.txt, out/…}   published; manifest.json written last
//! work/<kind>/<key>/{preimage.json, progress.json, scratch/, object/{log.txt, out/}}   partial
//! locks/<key>.lock, locks/store.lock                      advisory flock(2) locks
//! locks/<key>.lease, locks/<key>.part-<i>.{lock,lease}     leases beside them (see `lease`)
//! work/<kind>/<key>/{split.json, parts/<i>.done}          a stage split into parts (jobs)
//! jobs/<pipeline>/…                                       cluster executors' job files
//! memo/<xx>/<dev-ino-size-mtime>                          external file hash memo
//! runs/<pipeline>/<utc>-<ns>-<pid>.json                   one record per `pipe run`
//! results/<pipeline>/<stage> -> ../../objects/<kind>/<key>/out
//! ```
//! Publishing is one `rename(2)` of `work/<kind>/<key>/object` to `objects/<kind>/<key>`, so an
//! object either exists whole, with its manifest, or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hash::{Hasher, hash_file_contents};
use crate::key::{Key, PreImage};

/// Version of the datastore layout and of the manifest and run-record formats.
pub const STORE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path}: this datastore has format {found}, this pipe reads format {STORE_FORMAT}; use a matching pipe or another --datastore"
    )]
    Format { path: PathBuf, found: String },
    #[error(
        "`{name}` cannot be used as a {what} name inside the datastore (letters, digits, `_`, `.`, `-`; not starting with `.`)"
    )]
    UnsafeName { what: &'static str, name: String },
    #[error("stage output `{path}` is {what}; outputs must be regular files and folders inside the object")]
    UnsafeOutput { path: PathBuf, what: &'static str },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Checks that a pipeline or stage name is one plain path component.
pub fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok { Ok(()) } else { Err(StoreError::UnsafeName { what, name: name.to_string() }) }
}

/// Writes a file atomically: temp file in the same folder, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), unique()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(io_err(path))
}

pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (N.fetch_add(1, Ordering::Relaxed) << 32) | t as u64
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path: path.to_path_buf(), source: e }),
    }
}

/// Seconds since the Unix epoch, as RFC 3339 UTC (`2026-11-26T11:48:50Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// One output file of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the object's `out/`, `/`-separated.
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// Written last into a published object; its presence is what makes the object exist.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub kind: String,
    pub stage_version: u32,
    /// The key's pre-image (canonical JSON): what the key was computed from.
    pub preimage: serde_json::Value,
    pub files: Vec<FileEntry>,
    pub bytes: u64,
    /// Summary metrics recorded by the stage.
    pub metrics: BTreeMap<String, serde_json::Value>,
    /// Name the stage had in the pipeline that produced it (informational: not part of the key).
    pub produced_by: String,
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    /// True when the run continued from an earlier attempt's work dir.
    pub resumed: bool,
    pub tool: String,
}

/// A published object.
#[derive(Clone, Debug)]
pub struct Object {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Object {
    pub fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }
}

/// Progress of a partial, persisted by the executor while a stage runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProgressSnapshot {
    pub done: u64,
    pub total: Option<u64>,
    pub unit: String,
    pub message: String,
    pub updated: String,
}

/// `work/<kind>/<key>/split.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SplitRecord {
    parts: usize,
}

/// A work dir left by an unfinished attempt.
#[derive(Clone, Debug)]
pub struct Partial {
    pub dir: PathBuf,
    pub progress: Option<ProgressSnapshot>,
}

/// An exclusive per-key lock, released when dropped or when the process dies: a `flock(2)` on
/// `locks/<key>.lock` (coherent on one machine) and a lease `locks/<key>.lease` (coherent across
/// machines on a shared filesystem, see [`crate::lease`]).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
    lease: Option<crate::lease::Lease>,
}

impl KeyLock {
    /// True once another machine broke this lock's lease (this one was cut off too long).
    pub fn is_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(|l| l.is_lost())
    }
}

/// A shared (run) or exclusive (gc) lock on the whole store.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// The work dir of one attempt, prepared under the key's lock.
#[derive(Debug)]
pub struct Work {
    pub kind: String,
    pub key: Key,
    pub root: PathBuf,
    pub scratch: PathBuf,
    pub staging: PathBuf,
    pub out: PathBuf,
    pub log: PathBuf,
    pub progress: PathBuf,
    pub resumed: bool,
}

/// What `publish` records beside the outputs.
pub struct PublishInfo<'a> {
    pub preimage: &'a PreImage,
    pub metrics: BTreeMap<String, serde_json::Value>,
    pub produced_by: &'a str,
    pub started: SystemTime,
    pub resumed: bool,
}

#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a datastore rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let root = root.canonicalize().map_err(io_err(root))?;
        let fmt = root.join("FORMAT");
        let want = format!("pipe-datastore {STORE_FORMAT}\n");
        match fs::read_to_string(&fmt) {
            Ok(found) if found == want => {}
            Ok(found) => return Err(StoreError::Format { path: fmt, found: found.trim().to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&fmt, want.as_bytes())?,
            Err(e) => return Err(StoreError::Io { path: fmt, source: e }),
        }
        for d in ["objects", "work", "locks", "memo", "runs", "results", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn hasher(&self) -> Hasher {
        Hasher::new(Some(self.root.join("memo")))
    }

    pub fn object_dir(&self, kind: &str, key: &Key) -> PathBuf {
        self.root.join("objects").join(kind).join(key.hex())
    }

    pub fn work_root(&self, kind: &str, key: &Key) -> PathBuf {
        self.root.join("work").join(kind).join(key.hex())
    }

    /// The published object of a key; `Ok(None)` on a miss.
    pub fn lookup(&self, kind: &str, key: &Key) -> Result<Option<Object>, StoreError> {
        let dir = self.object_dir(kind, key);
        let manifest: Option<Manifest> = read_json(&dir.join("manifest.json"))?;
        Ok(manifest.map(|manifest| Object { dir, manifest }))
    }

    /// The work dir an earlier attempt left for this key, if any.
    pub fn partial(&self, kind: &str, key: &Key) -> Option<Partial> {
        let dir = self.work_root(kind, key);
        if !dir.is_dir() {
            return None;
        }
        let progress = read_json(&dir.join("progress.json")).ok().flatten();
        Some(Partial { dir, progress })
    }

    fn lock_file(&self, name: &str) -> Result<File, StoreError> {
        let path = self.root.join("locks").join(name);
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))
    }

    /// Takes the key's lock, waiting for another process that holds it.
    pub fn lock(&self, key: &Key) -> Result<KeyLock, StoreError> {
        loop {
            if let Some(l) = self.try_lock(key)? {
                return Ok(l);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Takes the key's lock if it is free.
    pub fn try_lock(&self, key: &Key) -> Result<Option<KeyLock>, StoreError> {
        self.try_lock_named(&key.hex(), || {})
    }

    /// Takes the key's lock if it is free; `on_lost` runs if its lease is later broken.
    pub fn try_lock_watched(
        &self,
        key: &Key,
        on_lost: impl Fn() + Send + 'static,
    ) -> Result<Option<KeyLock>, StoreError> {
        self.try_lock_named(&key.hex(), on_lost)
    }

    /// The lock of part `index` of a split key (held by whoever computes that part).
    pub fn try_lock_part(
        &self,
        key: &Key,
        index: usize,
        on_lost: impl Fn() + Send + 'static,
    ) -> Result<Option<KeyLock>, StoreError> {
        self.try_lock_named(&format!("{}.part-{index}", key.hex()), on_lost)
    }

    fn try_lock_named(
        &self,
        name: &str,
        on_lost: impl Fn() + Send + 'static,
    ) -> Result<Option<KeyLock>, StoreError> {
        let file = self.lock_file(&format!("{name}.lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&self.root.join("locks"))(e)),
        }
        let path = self.root.join("locks").join(format!("{name}.lease"));
        match crate::lease::Lease::try_acquire(&path, crate::lease::ttl_from_env(), on_lost) {
            Ok(Some(lease)) => Ok(Some(KeyLock { _file: file, lease: Some(lease) })),
            Ok(None) => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The lock of the one Slurm coordinator of a pipeline.
    pub fn try_lock_coordinator(&self, pipeline: &str) -> Result<Option<KeyLock>, StoreError> {
        check_name("pipeline", pipeline)?;
        self.try_lock_named(&format!("coordinator-{pipeline}"), || {})
    }

    /// Who holds a pipeline's coordinator lock.
    pub fn coordinator_holder(&self, pipeline: &str) -> Option<crate::lease::Holder> {
        crate::lease::read_holder(&self.root.join("locks").join(format!("coordinator-{pipeline}.lease")))
            .ok()
            .flatten()
    }

    /// Who holds the key's lease, for "waiting for ..." messages.
    pub fn lock_holder(&self, key: &Key) -> Option<crate::lease::Holder> {
        crate::lease::read_holder(&self.root.join("locks").join(format!("{}.lease", key.hex())))
            .ok()
            .flatten()
    }

    // ---- split stages ----

    /// How many parts the key's work was split into, if it was (see [`crate::Stage::split`]).
    pub fn split_count(&self, kind: &str, key: &Key) -> Option<usize> {
        let rec: Option<SplitRecord> =
            read_json(&self.work_root(kind, key).join("split.json")).ok().flatten();
        rec.map(|r| r.parts)
    }

    /// Records the split of a key's work (call with the key's lock held, after `begin`).
    pub fn write_split(&self, work: &Work, parts: usize, _lock: &KeyLock) -> Result<(), StoreError> {
        fs::create_dir_all(work.root.join("parts")).map_err(io_err(&work.root))?;
        write_json(&work.root.join("split.json"), &SplitRecord { parts })
    }

    /// Whether part `index` of a split key is done.
    pub fn part_done(&self, kind: &str, key: &Key, index: usize) -> bool {
        self.part_path(kind, key, index, "done").is_file()
    }

    /// Marks part `index` done (call with the part's lock held).
    pub fn mark_part_done(
        &self,
        kind: &str,
        key: &Key,
        index: usize,
        _lock: &KeyLock,
    ) -> Result<(), StoreError> {
        write_atomic(&self.part_path(kind, key, index, "done"), b"done\n")
    }

    /// `work/<kind>/<key>/parts/<index>.<ext>`: a part's done marker, log and progress.
    pub fn part_path(&self, kind: &str, key: &Key, index: usize, ext: &str) -> PathBuf {
        self.work_root(kind, key).join("parts").join(format!("{index:05}.{ext}"))
    }

    /// Held by every `pipe run` for its whole duration, so `gc` never collects under a run.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        let file = self.lock_file("store.lock")?;
        file.lock_shared().map_err(io_err(&self.root.join("locks/store.lock")))?;
        Ok(StoreLock { _file: file })
    }

    /// Exclusive store lock for `gc`; `None` while a run holds it shared.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>, StoreError> {
        let file = self.lock_file("store.lock")?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&self.root.join("locks/store.lock"))(e)),
        }
    }

    /// Prepares the work dir of `key` (call with the key's lock held). An existing work dir of the
    /// same key is handed back as is, so the stage can resume from its checkpoints.
    pub fn begin(&self, kind: &str, preimage: &PreImage, _lock: &KeyLock) -> Result<Work, StoreError> {
        let key = preimage.key();
        let root = self.work_root(kind, &key);
        let resumed = root.join("preimage.json").is_file();
        let staging = root.join("object");
        let work = Work {
            kind: kind.to_string(),
            key,
            scratch: root.join("scratch"),
            out: staging.join("out"),
            log: staging.join("log.txt"),
            progress: root.join("progress.json"),
            staging,
            root,
            resumed,
        };
        for d in [&work.scratch, &work.out] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        if !resumed {
            write_json(&work.root.join("preimage.json"), &preimage.to_json())?;
        }
        Ok(work)
    }

    /// Removes a key's work dir (for `--force`); call with the key's lock held.
    pub fn discard_partial(&self, kind: &str, key: &Key, _lock: &KeyLock) -> Result<(), StoreError> {
        let dir = self.work_root(kind, key);
        remove_tree(&dir)
    }

    /// Hashes the outputs, writes the manifest last and renames the object into place. An older
    /// object of the same key (`--force`) is replaced only after the new one is complete.
    pub fn publish(&self, work: Work, info: PublishInfo<'_>, _lock: &KeyLock) -> Result<Object, StoreError> {
        let mut rel = Vec::new();
        list_outputs(&work.out, Path::new(""), &mut rel)?;
        rel.sort();
        let files: Vec<FileEntry> = {
            use rayon::prelude::*;
            rel.par_iter()
                .map(|r| {
                    let p = work.out.join(r);
                    let size = fs::metadata(&p).map_err(io_err(&p))?.len();
                    let hash = hash_file_contents(&p)
                        .map_err(|e| StoreError::Corrupt { path: p.clone(), message: e.to_string() })?;
                    Ok(FileEntry { path: slash_path(r), size, blake3: hash.hex() })
                })
                .collect::<Result<_, StoreError>>()?
        };
        // Outputs must be durable before the manifest claims them.
        for r in &rel {
            if let Ok(f) = File::open(work.out.join(r)) {
                let _ = f.sync_all();
            }
        }
        let finished = SystemTime::now();
        let manifest = Manifest {
            format: STORE_FORMAT,
            key: work.key.hex(),
            kind: work.kind.clone(),
            stage_version: info.preimage.version,
            preimage: info.preimage.to_json(),
            bytes: files.iter().map(|f| f.size).sum(),
            files,
            metrics: info.metrics,
            produced_by: info.produced_by.to_string(),
            started: rfc3339(info.started),
            finished: rfc3339(finished),
            seconds: finished.duration_since(info.started).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            resumed: info.resumed,
            tool: format!("pipe {}", env!("CARGO_PKG_VERSION")),
        };
        write_json(&work.staging.join("manifest.json"), &manifest)?;
        let dest = self.object_dir(&work.kind, &work.key);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        if dest.exists() {
            let trash = self.root.join("tmp").join(format!("replaced-{}-{}", work.key.hex(), unique()));
            fs::rename(&dest, &trash).map_err(io_err(&dest))?;
            fs::rename(&work.staging, &dest).map_err(io_err(&dest))?;
            let _ = remove_tree(&trash);
        } else {
            fs::rename(&work.staging, &dest).map_err(io_err(&dest))?;
        }
        sync_dir(&parent);
        // The object is complete; what is left of the work dir is scratch.
        remove_tree(&work.root)?;
        Ok(Object { dir: dest, manifest })
    }

    /// Points `results/<pipeline>/<stage>` at an object's outputs (relative symlink, replaced atomically).
    pub fn link_result(&self, pipeline: &str, stage: &str, obj: &Object) -> Result<PathBuf, StoreError> {
        check_name("pipeline", pipeline)?;
        check_name("stage", stage)?;
        let dir = self.root.join("results").join(pipeline);
        if let Ok(m) = fs::symlink_metadata(&dir)
            && !m.is_dir()
        {
            return Err(StoreError::UnsafeOutput { path: dir, what: "not a plain folder" });
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let rel = obj.out_dir().strip_prefix(&self.root).map(|p| Path::new("../..").join(p));
        let target = rel.unwrap_or_else(|_| obj.out_dir());
        let link = dir.join(stage);
        // A no-op run relinks every stage; leave a correct link alone (no rename, no metadata write).
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            return Ok(link);
        }
        let tmp = dir.join(format!(".{stage}.tmp-{}-{}", std::process::id(), unique()));
        std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &link).map_err(io_err(&link))?;
        Ok(link)
    }

    // ---- run records ----

    pub fn runs_dir(&self, pipeline: &str) -> PathBuf {
        self.root.join("runs").join(pipeline)
    }

    /// `runs/<pipeline>/<utc>-<ns>-<pid>.json`: names sort in start order, even within a second.
    pub fn new_run_path(&self, pipeline: &str, started: SystemTime) -> Result<PathBuf, StoreError> {
        check_name("pipeline", pipeline)?;
        let ts = rfc3339(started).replace([':', '-'], "");
        let ns = started.duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Ok(self.runs_dir(pipeline).join(format!("{ts}-{ns:09}-{}.json", std::process::id())))
    }

    /// Run records of a pipeline, newest first, read lazily (a long history costs only what the
    /// caller consumes); unreadable records are skipped with a warning.
    pub fn runs_newest_first(&self, pipeline: &str) -> impl Iterator<Item = RunRecord> + use<> {
        let mut paths = if check_name("pipeline", pipeline).is_ok() {
            record_paths(&self.runs_dir(pipeline))
        } else {
            Vec::new()
        };
        paths.reverse();
        paths.into_iter().filter_map(|p| read_record(&p))
    }

    fn read_runs(&self, dir: &Path) -> Vec<RunRecord> {
        record_paths(dir).iter().filter_map(|p| read_record(p)).collect()
    }

    /// Every run record in the store, all pipelines.
    pub fn all_runs(&self) -> Vec<RunRecord> {
        let mut out = Vec::new();
        let runs = self.root.join("runs");
        let mut dirs: Vec<PathBuf> = fs::read_dir(&runs)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.sort();
        for d in dirs {
            out.extend(self.read_runs(&d));
        }
        out
    }

    // ---- listing, gc, verify ----

    /// Every published object and partial: (kind, key, is_partial, folder).
    pub fn entries(&self) -> Vec<(String, Key, bool, PathBuf)> {
        let mut out = Vec::new();
        for (top, partial) in [("objects", false), ("work", true)] {
            let Ok(kinds) = fs::read_dir(self.root.join(top)) else { continue };
            for kind in kinds.filter_map(|e| e.ok()) {
                let Ok(keys) = fs::read_dir(kind.path()) else { continue };
                for k in keys.filter_map(|e| e.ok()) {
                    let name = k.file_name().to_string_lossy().to_string();
                    if let Some(key) = Key::parse(&name) {
                        out.push((kind.file_name().to_string_lossy().to_string(), key, partial, k.path()));
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        out
    }

    /// Removes every object and partial whose key is not in `keep`, skipping keys locked by a
    /// running stage, and the run records that finished before `records_before` (RFC 3339), except
    /// each pipeline's newest. Takes the store lock exclusively: refuses while a `pipe run` is active.
    pub fn gc(&self, keep: &BTreeSet<Key>, records_before: &str, dry_run: bool) -> Result<GcReport, GcError> {
        let _guard = self.try_lock_exclusive()?.ok_or(GcError::Busy)?;
        let mut report = GcReport::default();
        for (kind, key, partial, dir) in self.entries() {
            // A work dir whose key is published is left over from a kill between the publishing
            // rename and the clean-up: garbage even when the key is kept.
            let leftover = partial && self.object_dir(&kind, &key).join("manifest.json").is_file();
            if keep.contains(&key) && !leftover {
                report.kept += 1;
                continue;
            }
            let Some(_lock) = self.try_lock(&key)? else {
                report.busy += 1;
                continue;
            };
            let bytes = dir_size(&dir);
            if !dry_run {
                remove_tree(&dir)?;
                let _ = fs::remove_file(self.root.join("locks").join(format!("{}.lock", key.hex())));
            }
            report.bytes_freed += bytes;
            report.removed.push(GcEntry { kind, key: key.hex(), partial, bytes });
        }
        self.prune_runs(records_before, dry_run, &mut report);
        if !dry_run {
            self.prune_results()?;
            let tmp = self.root.join("tmp");
            if let Ok(rd) = fs::read_dir(&tmp) {
                for e in rd.filter_map(|e| e.ok()) {
                    let _ = remove_tree(&e.path());
                }
            }
        }
        Ok(report)
    }

    /// Old run records: all but the newest of each pipeline (plans explain changes against it).
    fn prune_runs(&self, before: &str, dry_run: bool, report: &mut GcReport) {
        let Ok(dirs) = fs::read_dir(self.root.join("runs")) else { return };
        for d in dirs.filter_map(|e| e.ok()) {
            let mut paths = record_paths(&d.path());
            paths.pop();
            for p in paths {
                let old = read_record(&p).is_some_and(|r| {
                    r.status != "running" && r.finished.as_deref().is_some_and(|f| f <= before)
                });
                if old {
                    report.records_removed += 1;
                    report.bytes_freed += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    if !dry_run {
                        let _ = fs::remove_file(&p);
                    }
                }
            }
        }
    }

    /// Removes `results/` links whose object is gone.
    fn prune_results(&self) -> Result<(), StoreError> {
        let results = self.root.join("results");
        let Ok(pipes) = fs::read_dir(&results) else { return Ok(()) };
        for p in pipes.filter_map(|e| e.ok()) {
            let Ok(links) = fs::read_dir(p.path()) else { continue };
            for l in links.filter_map(|e| e.ok()) {
                if !l.path().exists() {
                    let _ = fs::remove_file(l.path());
                }
            }
        }
        Ok(())
    }

    /// Re-hashes the outputs of published objects (all, or those in `only`) against their manifests.
    pub fn verify(&self, only: Option<&BTreeSet<Key>>) -> Vec<VerifyEntry> {
        use rayon::prelude::*;
        let objs: Vec<_> = self
            .entries()
            .into_iter()
            .filter(|(_, key, partial, _)| !partial && only.is_none_or(|o| o.contains(key)))
            .collect();
        objs.par_iter()
            .map(|(kind, key, _, dir)| VerifyEntry {
                kind: kind.clone(),
                key: key.hex(),
                problems: verify_object(dir, key),
            })
            .collect()
    }
}

/// Record files of one pipeline, oldest first (names start with the UTC start time).
fn record_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> =
        fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    paths
}

fn read_record(p: &Path) -> Option<RunRecord> {
    match read_json::<RunRecord>(p) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("skipping unreadable run record: {e}");
            None
        }
    }
}

fn verify_object(dir: &Path, key: &Key) -> Vec<String> {
    let manifest: Manifest = match read_json(&dir.join("manifest.json")) {
        Ok(Some(m)) => m,
        Ok(None) => return vec!["manifest.json is missing".into()],
        Err(e) => return vec![format!("manifest.json is unreadable: {e}")],
    };
    let mut problems = Vec::new();
    if manifest.key != key.hex() {
        problems.push(format!(
            "manifest names key {} but the object is stored under {}",
            manifest.key,
            key.hex()
        ));
    }
    match PreImage::from_json(&manifest.preimage) {
        Some(p) if p.key() == *key => {}
        Some(_) => problems.push("the pre-image does not hash to the object's key".into()),
        None => problems.push("the pre-image is unreadable".into()),
    }
    let out = dir.join("out");
    let mut listed = BTreeSet::new();
    for f in &manifest.files {
        listed.insert(f.path.clone());
        let p = out.join(&f.path);
        match fs::metadata(&p) {
            Err(_) => problems.push(format!("out/{}: missing", f.path)),
            Ok(m) if m.len() != f.size => {
                problems.push(format!("out/{}: size {} but the manifest says {}", f.path, m.len(), f.size))
            }
            Ok(_) => match hash_file_contents(&p) {
                Ok(h) if h.hex() == f.blake3 => {}
                Ok(h) => problems.push(format!(
                    "out/{}: content changed (blake3 {} but the manifest says {})",
                    f.path,
                    &h.hex()[..12],
                    &f.blake3[..12.min(f.blake3.len())]
                )),
                Err(e) => problems.push(format!("out/{}: {e}", f.path)),
            },
        }
    }
    let mut present = Vec::new();
    if list_outputs(&out, Path::new(""), &mut present).is_ok() {
        for r in present {
            let s = slash_path(&r);
            if !listed.contains(&s) {
                problems.push(format!("out/{s}: not in the manifest"));
            }
        }
    }
    problems
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("a `pipe run` is using this datastore; run gc when it has finished")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub removed: Vec<GcEntry>,
    pub bytes_freed: u64,
    pub kept: usize,
    /// Entries skipped because a running stage holds their lock.
    pub busy: usize,
    /// Run records removed (older than the horizon, not a pipeline's newest).
    pub records_removed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct GcEntry {
    pub kind: String,
    pub key: String,
    pub partial: bool,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyEntry {
    pub kind: String,
    pub key: String,
    pub problems: Vec<String>,
}

/// What one `pipe run` did, written when it starts and rewritten as it ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: u32,
    pub pipeline: String,
    pub file: PathBuf,
    pub files: Vec<PathBuf>,
    pub started: String,
    pub finished: Option<String>,
    /// `running`, `ok`, `failed`, `cancelled`
    pub status: String,
    pub stages: BTreeMap<String, StageRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub kind: String,
    pub key: String,
    pub preimage: serde_json::Value,
    /// `cached`, `done`, `failed`, `cancelled`, `blocked` (an upstream failed), `pending`, `not-selected`
    pub state: String,
    pub seconds: Option<f64>,
    pub error: Option<String>,
}

fn slash_path(p: &Path) -> String {
    p.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Lists regular files under `root`; symlinks and special files are refused so that an object
/// never points outside the datastore.
fn list_outputs(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), StoreError> {
    let dir = root.join(rel);
    for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let e = e.map_err(io_err(&dir))?;
        let r = rel.join(e.file_name());
        let ft = e.file_type().map_err(io_err(&e.path()))?;
        if ft.is_symlink() {
            return Err(StoreError::UnsafeOutput { path: e.path(), what: "a symlink" });
        } else if ft.is_dir() {
            list_outputs(root, &r, out)?;
        } else if ft.is_file() {
            out.push(r);
        } else {
            return Err(StoreError::UnsafeOutput { path: e.path(), what: "not a regular file" });
        }
    }
    Ok(())
}

/// Total size of regular files under `dir` (symlinks not followed).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn remove_tree(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io { path: dir.to_path_buf(), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Canon;

    fn pre(n: i64) -> PreImage {
        PreImage {
            kind: "emit".into(),
            version: 1,
            params: Canon::Map(BTreeMap::from([("n".into(), Canon::Int(n))])),
            inputs: vec![],
            external: vec![],
        }
    }

    fn publish(store: &Store, p: &PreImage, content: &[u8]) -> Object {
        let lock = store.lock(&p.key()).unwrap();
        let work = store.begin("emit", p, &lock).unwrap();
        fs::write(work.out.join("data.bin"), content).unwrap();
        let info = PublishInfo {
            preimage: p,
            metrics: BTreeMap::new(),
            produced_by: "s",
            started: SystemTime::now(),
            resumed: false,
        };
        store.publish(work, info, &lock).unwrap()
    }

    #[test]
    fn publish_then_lookup() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let p = pre(1);
        assert!(store.lookup("emit", &p.key()).unwrap().is_none());
        let obj = publish(&store, &p, b"abc");
        let found = store.lookup("emit", &p.key()).unwrap().unwrap();
        assert_eq!(found.manifest.files, obj.manifest.files);
        assert!(store.partial("emit", &p.key()).is_none());
        assert!(store.verify(None).iter().all(|v| v.problems.is_empty()));
    }

    #[test]
    fn partial_is_handed_back() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let p = pre(2);
        let lock = store.lock(&p.key()).unwrap();
        let w = store.begin("emit", &p, &lock).unwrap();
        assert!(!w.resumed);
        fs::write(w.scratch.join("ckpt"), b"1").unwrap();
        drop(w);
        let w = store.begin("emit", &p, &lock).unwrap();
        assert!(w.resumed);
        assert!(w.scratch.join("ckpt").exists());
    }

    #[test]
    fn flipped_byte_is_found() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let obj = publish(&store, &pre(3), b"abcdef");
        let f = obj.out_dir().join("data.bin");
        let mut bytes = fs::read(&f).unwrap();
        bytes[2] ^= 1;
        fs::write(&f, bytes).unwrap();
        let v = store.verify(None);
        assert_eq!(v.len(), 1);
        assert!(v[0].problems[0].contains("content changed"), "{:?}", v[0].problems);
    }

    #[test]
    fn symlinked_outputs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("ds")).unwrap();
        let p = pre(4);
        let lock = store.lock(&p.key()).unwrap();
        let work = store.begin("emit", &p, &lock).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", work.out.join("escape")).unwrap();
        let info = PublishInfo {
            preimage: &p,
            metrics: BTreeMap::new(),
            produced_by: "s",
            started: SystemTime::now(),
            resumed: false,
        };
        let e = store.publish(work, info, &lock).unwrap_err();
        assert!(e.to_string().contains("is a symlink"), "{e}");
        assert!(store.lookup("emit", &p.key()).unwrap().is_none());
    }

    #[test]
    fn names_that_leave_the_store_are_refused() {
        for bad in ["..", ".", "a/b", "/abs", "", ".hidden", "a\\b"] {
            assert!(check_name("stage", bad).is_err(), "{bad}");
        }
        check_name("stage", "train_l1-k100.v2").unwrap();
    }

    #[test]
    fn gc_keeps_referenced_and_frees_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let a = publish(&store, &pre(5), b"keep");
        let b = publish(&store, &pre(6), b"drop me");
        let b_bytes = dir_size(&b.dir);
        let keep = BTreeSet::from([pre(5).key()]);
        let r = store.gc(&keep, "", false).unwrap();
        assert_eq!(r.removed.len(), 1);
        assert_eq!(r.bytes_freed, b_bytes);
        assert!(a.dir.exists());
        assert!(store.lookup("emit", &pre(6).key()).unwrap().is_none());
    }

    #[test]
    fn gc_removes_a_work_dir_left_beside_its_published_object() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let p = pre(7);
        publish(&store, &p, b"x");
        fs::create_dir_all(store.work_root("emit", &p.key()).join("scratch")).unwrap();
        let r = store.gc(&BTreeSet::from([p.key()]), "", false).unwrap();
        assert_eq!(r.removed.len(), 1);
        assert!(r.removed[0].partial);
        assert!(store.lookup("emit", &p.key()).unwrap().is_some());
    }

    #[test]
    fn gc_refuses_while_a_run_holds_the_store() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let _run = store.lock_shared().unwrap();
        assert!(matches!(store.gc(&BTreeSet::new(), "", true), Err(GcError::Busy)));
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_700_000);
        assert_eq!(rfc3339(t), "2026-11-26T13:33:20Z");
    }
}
