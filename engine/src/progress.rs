//! Stage progress: a handle stages update, drawn as an indicatif bar on a terminal, as plain log
//! lines otherwise, and persisted in the work dir (`progress.json`) so `pipe status` can show how
//! far a partial got.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::{ProgressSnapshot, rfc3339, write_json};

/// Persist at most this often; a killed run loses at most this much progress display (never data).
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Without a terminal, one plain line per stage at most this often.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// The process-wide set of bars. Log writers print through [`suspend`] so lines and bars don't mix.
pub fn multi() -> &'static MultiProgress {
    static M: OnceLock<MultiProgress> = OnceLock::new();
    M.get_or_init(|| {
        let m = MultiProgress::new();
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            m.set_draw_target(ProgressDrawTarget::hidden());
        }
        m
    })
}

/// Runs `f` (e.g. a log write) with the bars cleared, then redraws them.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    multi().suspend(f)
}

struct State {
    snap: ProgressSnapshot,
    last_persist: Option<Instant>,
    last_line: Instant,
}

struct Inner {
    stage: String,
    bar: Option<ProgressBar>,
    persist: Option<PathBuf>,
    state: Mutex<State>,
}

/// Progress of one running stage. Cheap to clone; safe to update from several threads.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::detached("stage")
    }
}

impl Progress {
    /// A handle that draws nothing and persists nothing (for stage unit tests).
    pub fn detached(stage: &str) -> Self {
        Self::build(stage, None, None)
    }

    pub(crate) fn for_stage(stage: &str, persist: PathBuf, resumed: bool) -> Self {
        let bar = multi().add(ProgressBar::no_length());
        bar.set_style(style(false));
        bar.set_prefix(stage.to_string());
        bar.set_message(if resumed { "resuming" } else { "starting" });
        bar.enable_steady_tick(Duration::from_millis(200));
        Self::build(stage, Some(bar), Some(persist))
    }

    fn build(stage: &str, bar: Option<ProgressBar>, persist: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                stage: stage.to_string(),
                bar,
                persist,
                state: Mutex::new(State {
                    snap: ProgressSnapshot::default(),
                    last_persist: None,
                    last_line: Instant::now(),
                }),
            }),
        }
    }

    /// Sets the amount of work, e.g. `set_total(1_000_000, "tokens")`.
    pub fn set_total(&self, total: u64, unit: &str) {
        if let Some(bar) = &self.inner.bar {
            bar.set_length(total);
            bar.set_style(style(true));
        }
        self.update(|s| {
            s.total = Some(total);
            s.unit = unit.to_string();
        });
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.inc(n);
        }
        self.update(|s| s.done += n);
    }

    /// Sets the absolute position (e.g. after resuming from a checkpoint).
    pub fn set_done(&self, done: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.set_position(done);
        }
        self.update(|s| s.done = done);
    }

    /// A short status shown beside the bar (`loss 0.031`).
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(bar) = &self.inner.bar {
            bar.set_message(msg.clone());
        }
        self.update(|s| s.message = msg);
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        self.lock().snap.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProgressSnapshot)) {
        let mut st = self.lock();
        f(&mut st.snap);
        let now = Instant::now();
        if st.last_persist.is_none_or(|t| now - t >= PERSIST_EVERY) {
            st.last_persist = Some(now);
            st.snap.updated = rfc3339(SystemTime::now());
            if let Some(p) = &self.inner.persist {
                let _ = write_json(p, &st.snap);
            }
        }
        if self.inner.bar.as_ref().is_none_or(|b| b.is_hidden()) && now - st.last_line >= LINE_EVERY {
            st.last_line = now;
            let s = &st.snap;
            let total = s.total.map(|t| format!("/{t}")).unwrap_or_default();
            tracing::info!(stage = %self.inner.stage, "{}{} {} {}", s.done, total, s.unit, s.message);
        }
    }

    /// Writes the final snapshot and removes the bar.
    pub(crate) fn finish(&self) {
        let st = self.lock();
        if let Some(p) = &self.inner.persist
            && p.parent().is_some_and(|d| d.exists())
        {
            let _ = write_json(p, &st.snap);
        }
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
            multi().remove(bar);
        }
    }
}

fn style(with_len: bool) -> ProgressStyle {
    let t = if with_len {
        "{spinner} {prefix:>16.bold} [{bar:30}] {pos}/{len} ({eta}) {msg}"
    } else {
        "{spinner} {prefix:>16.bold} {pos} {msg}"
    };
    ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}
