//! Per-object log files: a `tracing` layer that copies every event emitted inside a `stage` span
//! to that stage's `log.txt`, which is published with the object. The binary installs the layer;
//! the executor opens and closes the files.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::store::rfc3339;

fn files() -> &'static Mutex<HashMap<String, File>> {
    static F: OnceLock<Mutex<HashMap<String, File>>> = OnceLock::new();
    F.get_or_init(Default::default)
}

/// Starts copying the events of the stage span whose `name` field is `stage` to `path`
/// (appending: a resumed attempt keeps the earlier attempts' lines). Stage names are unique within
/// the one pipeline a process runs.
pub(crate) fn open(stage: &str, path: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    files().lock().unwrap_or_else(|p| p.into_inner()).insert(stage.to_string(), f);
    Ok(())
}

pub(crate) fn close(stage: &str) {
    if let Some(f) = files().lock().unwrap_or_else(|p| p.into_inner()).remove(stage) {
        let _ = f.sync_all();
    }
}

/// The `tracing_subscriber` layer that writes stage events to their object's log file.
pub struct ObjectLogLayer;

struct StageKey(String);

#[derive(Default)]
struct Fields {
    /// Reading a span's fields (where `name` is the stage name) rather than an event's.
    span: bool,
    key: Option<String>,
    text: String,
}

/// `Display`s a `Debug` value without the quotes `Debug` puts around strings.
struct DebugStr<'a>(&'a dyn std::fmt::Debug);

impl std::fmt::Display for DebugStr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = format!("{:?}", self.0);
        f.write_str(s.trim_matches('"'))
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "name" && self.span {
            self.key = Some(value.to_string());
        } else if field.name() == "message" {
            self.text.insert_str(0, value);
        } else {
            self.text.push_str(&format!(" {}={value}", field.name()));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "name" && self.span {
            self.key = Some(format!("{value}", value = DebugStr(value)));
        } else if field.name() == "message" {
            self.text.insert_str(0, &format!("{value:?}"));
        } else {
            self.text.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for ObjectLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "stage" {
            return;
        }
        let mut v = Fields { span: true, ..Fields::default() };
        attrs.record(&mut v);
        if let (Some(key), Some(span)) = (v.key, ctx.span(id)) {
            span.extensions_mut().insert(StageKey(key));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else { return };
        for span in scope {
            let ext = span.extensions();
            let Some(StageKey(key)) = ext.get::<StageKey>() else { continue };
            let mut v = Fields::default();
            event.record(&mut v);
            let mut map = files().lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = map.get_mut(key) {
                let m = event.metadata();
                let _ =
                    writeln!(f, "{} {:>5} {}: {}", rfc3339(SystemTime::now()), m.level(), m.target(), v.text);
            }
            return;
        }
    }
}
