//! Leases: a lock that holds across machines on a shared filesystem where `flock(2)` may not
//! (NFS mounted with `nolock` or `local_lock=all`, some parallel filesystems, a lock server that
//! lost its state). A lease is a file created with `O_EXCL` (atomic on NFSv3 and later) that
//! names its holder and the time it was last renewed; a thread renews it every quarter of its
//! time to live. Anyone may break a lease that was not renewed for its time to live, or whose
//! holder is a dead process on this host. A holder that finds its lease broken or taken (its
//! machine was cut off longer than the time to live) reports it lost, and the executor cancels
//! the stage rather than let two machines write one work dir.
//!
//! What this relies on: clocks agree across nodes to well under the time to live (NTP), and
//! `rename(2)`/`O_EXCL` create are atomic on the server, which NFSv3+, Lustre, GPFS and BeeGFS
//! provide.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How long a lease lives without renewal, unless `PIPE_LEASE_SECONDS` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90);

/// The lease's time to live: `PIPE_LEASE_SECONDS` (at least 4), else [`DEFAULT_TTL`].
pub fn ttl_from_env() -> Duration {
    std::env::var("PIPE_LEASE_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.max(4)))
        .unwrap_or(DEFAULT_TTL)
}

/// Who holds a lease, as written in its file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// `$SLURM_JOB_ID` of the holder, when it runs in a Slurm job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub token: String,
    /// Seconds since the epoch of the last renewal.
    pub renewed: f64,
    pub ttl_s: f64,
}

impl Holder {
    fn stale(&self, now: f64, me: &str) -> bool {
        now > self.renewed + self.ttl_s || (self.host == me && !pid_alive(self.pid))
    }
    /// Whether anyone may break this lease now.
    pub fn is_stale(&self) -> bool {
        self.stale(now_s(), &hostname())
    }
    /// `host pid N (Slurm job J)`, for messages.
    pub fn describe(&self) -> String {
        let job = self.job.as_ref().map(|j| format!(", Slurm job {j}")).unwrap_or_default();
        format!("{} pid {}{job}", self.host, self.pid)
    }
}

/// A held lease; released (its file removed) when dropped.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    token: String,
    /// Dropped to wake and stop the renewer at once.
    stop: Option<std::sync::mpsc::Sender<()>>,
    lost: Arc<AtomicBool>,
    renewer: Option<JoinHandle<()>>,
}

impl Lease {
    /// Takes the lease at `path` if it is free or stale. `on_lost` runs (once, on the renewal
    /// thread) if the lease is later found broken or taken by someone else.
    pub fn try_acquire(
        path: &Path,
        ttl: Duration,
        on_lost: impl Fn() + Send + 'static,
    ) -> std::io::Result<Option<Lease>> {
        let me = hostname();
        let token = format!("{me}-{}-{}", std::process::id(), unique());
        for _ in 0..3 {
            let holder = Holder {
                host: me.clone(),
                pid: std::process::id(),
                job: std::env::var("SLURM_JOB_ID").ok(),
                token: token.clone(),
                renewed: now_s(),
                ttl_s: ttl.as_secs_f64(),
            };
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    f.write_all(&serde_json::to_vec(&holder).expect("serializable"))?;
                    f.sync_all()?;
                    return Ok(Some(Self::start(path, token, ttl, on_lost)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            match read_holder(path) {
                Ok(Some(h)) if !h.stale(now_s(), &me) => return Ok(None),
                Ok(Some(h)) => {
                    tracing::info!("breaking the stale lease {} of {}", path.display(), h.describe());
                    break_lease(path, Some(&h.token))?;
                }
                // Gone meanwhile: try again.
                Ok(None) if !path.exists() => {}
                // Unreadable (a holder died while writing it): stale once old enough.
                Ok(None) => {
                    let age = fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .unwrap_or_default();
                    if age < ttl {
                        return Ok(None);
                    }
                    break_lease(path, None)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn start(path: &Path, token: String, ttl: Duration, on_lost: impl Fn() + Send + 'static) -> Lease {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (path, token, lost) = (path.to_path_buf(), token.clone(), lost.clone());
            std::thread::Builder::new()
                .name("pipe-lease".into())
                .spawn(move || {
                    let every = ttl / 4;
                    // Wakes every `every` to renew, or at once when the lease is dropped.
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        if let Err(why) = renew(&path, &token, ttl) {
                            tracing::error!("lost the lease {}: {why}", path.display());
                            lost.store(true, Ordering::SeqCst);
                            on_lost();
                            return;
                        }
                    }
                })
                .ok()
        };
        Lease { path: path.to_path_buf(), token, stop: Some(stop), lost, renewer }
    }

    /// True once the lease was found broken or taken.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if read_holder(&self.path).ok().flatten().is_some_and(|h| h.token == self.token) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The holder named in a lease file; `Ok(None)` when the file is missing or unreadable.
pub fn read_holder(path: &Path) -> std::io::Result<Option<Holder>> {
    match fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn renew(path: &Path, token: &str, ttl: Duration) -> Result<(), String> {
    let mut h = match read_holder(path) {
        Ok(Some(h)) => h,
        Ok(None) => return Err("its file is gone or unreadable".into()),
        Err(e) => return Err(e.to_string()),
    };
    if h.token != token {
        return Err(format!("it is now held by {}", h.describe()));
    }
    h.renewed = now_s();
    h.ttl_s = ttl.as_secs_f64();
    let tmp = path.with_extension(format!("renew-{token}"));
    fs::write(&tmp, serde_json::to_vec(&h).expect("serializable")).map_err(|e| e.to_string())?;
    fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// Moves a stale lease aside. When `token` is given and the file moved holds another token (a
/// fresh lease taken meanwhile by someone who broke it first), it is put back.
fn break_lease(path: &Path, token: Option<&str>) -> std::io::Result<()> {
    let aside = path.with_extension(format!("broken-{}-{}", std::process::id(), unique()));
    match fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(t) = token
        && read_holder(&aside).ok().flatten().is_some_and(|h| h.token != t)
    {
        // Not the lease we judged stale: restore it unless yet another was created.
        let _ = fs::hard_link(&aside, path);
    }
    let _ = fs::remove_file(&aside);
    Ok(())
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn unique() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::SeqCst).rotate_left(48)
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let a = Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap().expect("free");
        assert!(Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap().is_none());
        let h = read_holder(&path).unwrap().unwrap();
        assert_eq!(h.pid, std::process::id());
        drop(a);
        assert!(!path.exists());
        assert!(Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap().is_some());
    }

    #[test]
    fn a_stale_lease_is_broken_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        // Another host's lease, renewed long ago.
        let old = Holder {
            host: "elsewhere".into(),
            pid: 1,
            job: Some("42".into()),
            token: "t-old".into(),
            renewed: now_s() - 1000.0,
            ttl_s: 60.0,
        };
        fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let got = Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap();
        assert!(got.is_some(), "a lease unrenewed past its ttl is stale");
        drop(got);
        // Another host's lease renewed just now holds.
        let live = Holder { renewed: now_s(), ..old.clone() };
        fs::write(&path, serde_json::to_vec(&live).unwrap()).unwrap();
        assert!(Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap().is_none());
        // This host's lease of a dead process is stale at once.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Holder { host: hostname(), pid, renewed: now_s(), ..old };
        fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(Lease::try_acquire(&path, Duration::from_secs(60), || {}).unwrap().is_some());
    }

    #[test]
    fn a_taken_lease_is_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let lease =
            Lease::try_acquire(&path, Duration::from_millis(400), move || f.store(true, Ordering::SeqCst))
                .unwrap()
                .unwrap();
        // Someone broke it and took it.
        let other = Holder {
            host: "elsewhere".into(),
            pid: 1,
            job: None,
            token: "thief".into(),
            renewed: now_s(),
            ttl_s: 60.0,
        };
        fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        let t0 = std::time::Instant::now();
        while !lease.is_lost() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(lease.is_lost());
        assert!(flag.load(Ordering::SeqCst));
        drop(lease);
        // The thief's lease is left alone.
        assert_eq!(read_holder(&path).unwrap().unwrap().token, "thief");
    }

    #[test]
    fn renewal_keeps_a_short_lease_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lease");
        let lease = Lease::try_acquire(&path, Duration::from_millis(400), || {}).unwrap().unwrap();
        let first = read_holder(&path).unwrap().unwrap().renewed;
        std::thread::sleep(Duration::from_millis(900));
        let h = read_holder(&path).unwrap().unwrap();
        assert!(h.renewed > first, "renewed");
        assert!(!h.stale(now_s(), "elsewhere"));
        assert!(!lease.is_lost());
    }
}
