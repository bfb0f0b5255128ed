//! What the read verbs print: `status`, `plan`, `show`, `diff`, `gc` and `verify`, each as a
//! stable JSON shape (documented in the README) and as text rendered from that same value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::Path;

use serde_json::{Value, json};

use crate::config::Pipeline;
use crate::key::{self, Canon, Key};
use crate::plan::{Plan, State};
use crate::store::{GcReport, Store, VerifyEntry};

/// `pipe status --json`: `{"pipeline", "stages": [{"name", "kind", "key", "state", "path", "progress"}]}`.
pub fn status_json(plan: &Plan) -> Value {
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .map(|s| {
            let path = match (&s.object, &s.partial) {
                (Some(o), _) => Some(o.out_dir()),
                (None, Some(p)) => Some(p.dir.clone()),
                _ => None,
            };
            let progress = s.partial.as_ref().and_then(|p| p.progress.as_ref()).map(|pr| {
                json!({"done": pr.done, "total": pr.total, "unit": pr.unit, "message": pr.message, "updated": pr.updated})
            });
            json!({
                "name": s.name,
                "kind": s.kind,
                "key": s.key.hex(),
                "state": s.state.as_str(),
                "path": path.map(|p| p.display().to_string()),
                "progress": progress,
                "bytes": s.object.as_ref().map(|o| o.manifest.bytes),
            })
        })
        .collect();
    json!({"pipeline": plan.pipeline, "stages": stages})
}

pub fn status_text(plan: &Plan) -> String {
    let mut rows = vec![["STAGE".to_string(), "KIND".into(), "STATE".into(), "KEY".into(), "DETAIL".into()]];
    for s in &plan.stages {
        let detail = match s.state {
            State::Cached => s
                .object
                .as_ref()
                .map(|o| format!("{} in {}", human_bytes(o.manifest.bytes), o.out_dir().display())),
            State::Partial => s.partial.as_ref().map(|p| match &p.progress {
                Some(pr) => format!(
                    "{}{} {} ({})",
                    pr.done,
                    pr.total.map(|t| format!("/{t}")).unwrap_or_default(),
                    pr.unit,
                    p.dir.display()
                ),
                None => p.dir.display().to_string(),
            }),
            State::Stale => s.previous_key.map(|k| format!("last run had key {}", k.short())),
            State::Missing => None,
        };
        rows.push([
            s.name.clone(),
            s.kind.clone(),
            s.state.as_str().into(),
            s.key.short(),
            detail.unwrap_or_default(),
        ]);
    }
    table(&rows)
}

/// `pipe plan --json`: `{"pipeline", "stages": [{"name", "kind", "key", "action", "reasons"}], "hashed": {...}}`.
pub fn plan_json(plan: &Plan) -> Value {
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .map(|s| {
            json!({"name": s.name, "kind": s.kind, "key": s.key.hex(), "action": s.action.as_str(), "reasons": s.reasons})
        })
        .collect();
    json!({
        "pipeline": plan.pipeline,
        "stages": stages,
        "hashed": {"files": plan.files_hashed, "bytes": plan.bytes_hashed},
    })
}

pub fn plan_text(plan: &Plan) -> String {
    let mut s = String::new();
    for st in &plan.stages {
        let _ = writeln!(s, "{:<7}{} ({}) {}", st.action.as_str(), st.name, st.kind, st.key.short());
        for r in &st.reasons {
            let _ = writeln!(s, "         {r}");
        }
    }
    let n = |a| plan.stages.iter().filter(|s| s.action == a).count();
    use crate::plan::Action;
    let _ = writeln!(
        s,
        "{} to run, {} to resume, {} to skip",
        n(Action::Run),
        n(Action::Resume),
        n(Action::Skip)
    );
    s
}

/// `pipe show --json`: effective parameters (as written after `extends`/`--set`), canonical
/// parameters (defaults filled in), key, inputs, state, outputs and metrics of one stage.
pub fn show_json(p: &Pipeline, plan: &Plan, stage: &str) -> Option<Value> {
    let decl = p.stage(stage)?;
    let sp = plan.stage(stage)?;
    let effective = p
        .effective
        .get("stages")
        .and_then(|s| s.get(stage))
        .map(|v| serde_json::to_value(v).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    let external: Vec<Value> = decl
        .external
        .iter()
        .map(|e| json!({"role": e.role, "paths": e.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}))
        .collect();
    let (files, metrics, dir) = match &sp.object {
        Some(o) => (
            serde_json::to_value(&o.manifest.files).unwrap_or(Value::Null),
            serde_json::to_value(&o.manifest.metrics).unwrap_or(Value::Null),
            Some(o.out_dir().display().to_string()),
        ),
        None => (Value::Null, Value::Null, None),
    };
    Some(json!({
        "name": decl.name,
        "kind": decl.kind,
        "key": sp.key.hex(),
        "state": sp.state.as_str(),
        "effective": effective,
        "params": decl.params.to_json(),
        "inputs": decl.inputs.iter().map(|(r, u)| json!({"role": r, "stages": u})).collect::<Vec<_>>(),
        "external": external,
        "preimage": sp.preimage.to_json(),
        "path": dir,
        "files": files,
        "metrics": metrics,
    }))
}

pub fn show_text(v: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let _ = writeln!(s, "stage   {} ({})", str_of(&g("name")), str_of(&g("kind")));
    let _ = writeln!(s, "key     {}", str_of(&g("key")));
    let _ = writeln!(s, "state   {}", str_of(&g("state")));
    if let Some(p) = g("path").as_str() {
        let _ = writeln!(s, "output  {p}");
    }
    for i in g("inputs").as_array().into_iter().flatten() {
        let ups: Vec<String> = i["stages"].as_array().into_iter().flatten().map(str_of).collect();
        let _ = writeln!(s, "input   {} <- {}", str_of(&i["role"]), ups.join(", "));
    }
    for e in g("external").as_array().into_iter().flatten() {
        let ps: Vec<String> = e["paths"].as_array().into_iter().flatten().map(str_of).collect();
        let _ = writeln!(s, "input   {} <- {}", str_of(&e["role"]), ps.join(", "));
    }
    s.push_str("parameters (defaults filled in):\n");
    if let Ok(c) = Canon::from_json(&g("params"))
        && let Canon::Map(m) = c
    {
        for (k, v) in m {
            let _ = writeln!(s, "  {k} = {v}");
        }
    }
    if let Some(files) = g("files").as_array() {
        s.push_str("files:\n");
        for f in files {
            let _ =
                writeln!(s, "  {} ({})", str_of(&f["path"]), human_bytes(f["size"].as_u64().unwrap_or(0)));
        }
    }
    if let Some(m) = g("metrics").as_object()
        && !m.is_empty()
    {
        s.push_str("metrics:\n");
        for (k, v) in m {
            let _ = writeln!(s, "  {k} = {v}");
        }
    }
    s
}

/// `pipe diff --json`: `{"pipelines": [a, b], "params": [{"stage", "path", "a", "b"}],
/// "stages": [{"a", "b", "kind", "key_a", "key_b", "shared"}], "metrics": [{"stage", "metric", "a", "b", "delta"}]}`.
pub fn diff_json(a: (&Pipeline, &Plan), b: (&Pipeline, &Plan)) -> Value {
    let (pa, la) = a;
    let (pb, lb) = b;
    let mut params = Vec::new();
    let names: BTreeSet<&str> =
        pa.stages.iter().map(|s| s.name.as_str()).chain(pb.stages.iter().map(|s| s.name.as_str())).collect();
    for name in &names {
        match (pa.stage(name), pb.stage(name)) {
            (Some(x), Some(y)) => {
                if x.kind != y.kind {
                    params.push(json!({"stage": name, "path": "kind", "a": x.kind, "b": y.kind}));
                }
                for c in key::diff(&x.params, &y.params) {
                    params.push(json!({
                        "stage": name, "path": c.path,
                        "a": c.old.map(|v| v.to_json()), "b": c.new.map(|v| v.to_json()),
                    }));
                }
                let ins = |d: &crate::config::StageDecl| format!("{:?}", d.inputs);
                if ins(x) != ins(y) {
                    params.push(json!({"stage": name, "path": "inputs", "a": ins(x), "b": ins(y)}));
                }
                let ext = |d: &crate::config::StageDecl| {
                    d.external.iter().map(|e| (e.role.clone(), e.paths.clone())).collect::<Vec<_>>()
                };
                if ext(x) != ext(y) {
                    params.push(json!({"stage": name, "path": "external", "a": format!("{:?}", ext(x)), "b": format!("{:?}", ext(y))}));
                }
            }
            (Some(_), None) => params.push(json!({"stage": name, "path": "", "a": "present", "b": null})),
            (None, Some(_)) => params.push(json!({"stage": name, "path": "", "a": null, "b": "present"})),
            (None, None) => {}
        }
    }
    // Stages are matched by key first (renames share outputs), then by name.
    let by_key_b: BTreeMap<Key, &str> = lb.stages.iter().map(|s| (s.key, s.name.as_str())).collect();
    let mut stages = Vec::new();
    let mut matched_b = BTreeSet::new();
    for s in &la.stages {
        let other = by_key_b.get(&s.key).copied().or_else(|| lb.stage(&s.name).map(|x| x.name.as_str()));
        let o = other.and_then(|n| lb.stage(n));
        if let Some(o) = o {
            matched_b.insert(o.name.clone());
        }
        stages.push(json!({
            "a": s.name, "b": o.map(|o| o.name.clone()), "kind": s.kind,
            "key_a": s.key.hex(), "key_b": o.map(|o| o.key.hex()),
            "shared": o.is_some_and(|o| o.key == s.key),
        }));
    }
    for s in lb.stages.iter().filter(|s| !matched_b.contains(&s.name)) {
        stages.push(json!({"a": null, "b": s.name, "kind": s.kind, "key_a": null, "key_b": s.key.hex(), "shared": false}));
    }
    let mut metrics = Vec::new();
    for s in &la.stages {
        let Some(o) = lb.stage(&s.name) else { continue };
        let (Some(ma), Some(mb)) = (&s.object, &o.object) else { continue };
        let keys: BTreeSet<&String> = ma.manifest.metrics.keys().chain(mb.manifest.metrics.keys()).collect();
        for k in keys {
            let (x, y) = (ma.manifest.metrics.get(k), mb.manifest.metrics.get(k));
            let delta = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
                (Some(x), Some(y)) => json!(y - x),
                _ => Value::Null,
            };
            metrics.push(json!({"stage": s.name, "metric": k, "a": x, "b": y, "delta": delta}));
        }
    }
    json!({
        "pipelines": [
            {"name": pa.name, "file": pa.file.display().to_string()},
            {"name": pb.name, "file": pb.file.display().to_string()},
        ],
        "params": params,
        "stages": stages,
        "metrics": metrics,
    })
}

pub fn diff_text(v: &Value) -> String {
    let mut s = String::new();
    let name = |i: usize| str_of(&v["pipelines"][i]["name"]);
    let _ = writeln!(
        s,
        "A = {} ({})\nB = {} ({})",
        name(0),
        str_of(&v["pipelines"][0]["file"]),
        name(1),
        str_of(&v["pipelines"][1]["file"])
    );
    s.push_str("\nparameters:\n");
    let params = v["params"].as_array().cloned().unwrap_or_default();
    if params.is_empty() {
        s.push_str("  (identical)\n");
    }
    for p in params {
        let path = str_of(&p["path"]);
        let at =
            if path.is_empty() { str_of(&p["stage"]) } else { format!("{}.{path}", str_of(&p["stage"])) };
        let _ = writeln!(s, "  {at}: {} -> {}", compact(&p["a"]), compact(&p["b"]));
    }
    s.push_str("\nstages:\n");
    let mut rows =
        vec![["A".to_string(), "B".into(), "KIND".into(), "KEY A".into(), "KEY B".into(), "".into()]];
    for st in v["stages"].as_array().into_iter().flatten() {
        let short = |k: &Value| k.as_str().map(|k| k[..12].to_string()).unwrap_or("-".into());
        rows.push([
            st["a"].as_str().unwrap_or("-").into(),
            st["b"].as_str().unwrap_or("-").into(),
            str_of(&st["kind"]),
            short(&st["key_a"]),
            short(&st["key_b"]),
            if st["shared"].as_bool() == Some(true) { "shared".into() } else { "differs".into() },
        ]);
    }
    for line in table(&rows).lines() {
        let _ = writeln!(s, "  {line}");
    }
    let metrics = v["metrics"].as_array().cloned().unwrap_or_default();
    if !metrics.is_empty() {
        s.push_str("\nmetrics (stages both have run):\n");
        let mut rows = vec![["STAGE".to_string(), "METRIC".into(), "A".into(), "B".into(), "DELTA".into()]];
        for m in metrics {
            rows.push([
                str_of(&m["stage"]),
                str_of(&m["metric"]),
                compact(&m["a"]),
                compact(&m["b"]),
                compact(&m["delta"]),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

/// The RFC 3339 time `keep_days` days ago: runs that finished after it are recent.
pub fn gc_horizon(keep_days: u64) -> String {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(keep_days.saturating_mul(86_400));
    crate::store::rfc3339(t)
}

/// The keys `gc` keeps: every stage of the `keep` plans, plus every key named by a run record
/// that finished after `horizon` (or is still running).
pub fn gc_keep(store: &Store, keep: &[Plan], horizon: &str) -> BTreeSet<Key> {
    let mut out: BTreeSet<Key> = keep.iter().flat_map(|p| p.stages.iter().map(|s| s.key)).collect();
    for r in store.all_runs() {
        let recent = r.status == "running" || r.finished.as_deref().is_some_and(|f| f > horizon);
        if recent {
            out.extend(r.stages.values().filter_map(|s| Key::parse(&s.key)));
        }
    }
    out
}

pub fn gc_json(r: &GcReport, dry_run: bool) -> Value {
    json!({
        "dry_run": dry_run, "removed": r.removed, "bytes_freed": r.bytes_freed, "kept": r.kept,
        "busy": r.busy, "records_removed": r.records_removed,
    })
}

pub fn gc_text(r: &GcReport, dry_run: bool) -> String {
    let mut s = String::new();
    for e in &r.removed {
        let what = if e.partial { "partial" } else { "object" };
        let _ = writeln!(
            s,
            "{} {what} {}/{} ({})",
            if dry_run { "would remove" } else { "removed" },
            e.kind,
            &e.key[..12],
            human_bytes(e.bytes)
        );
    }
    let _ = writeln!(
        s,
        "{} {} in {} entries and {} old run records; kept {}{}",
        if dry_run { "would free" } else { "freed" },
        human_bytes(r.bytes_freed),
        r.removed.len(),
        r.records_removed,
        r.kept,
        if r.busy > 0 { format!(", {} in use", r.busy) } else { String::new() }
    );
    s
}

pub fn verify_json(entries: &[VerifyEntry]) -> Value {
    let bad: Vec<&VerifyEntry> = entries.iter().filter(|e| !e.problems.is_empty()).collect();
    json!({"checked": entries.len(), "corrupt": bad.len(), "objects": bad})
}

pub fn verify_text(entries: &[VerifyEntry], root: &Path) -> String {
    let mut s = String::new();
    for e in entries.iter().filter(|e| !e.problems.is_empty()) {
        for p in &e.problems {
            let _ = writeln!(s, "corrupt: {}/objects/{}/{}: {p}", root.display(), e.kind, e.key);
        }
    }
    let bad = entries.iter().filter(|e| !e.problems.is_empty()).count();
    let _ = writeln!(
        s,
        "checked {} objects: {}",
        entries.len(),
        if bad == 0 { "all intact".to_string() } else { format!("{bad} corrupt") }
    );
    s
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{}", (f * 1e6).round() / 1e6),
            _ => n.to_string(),
        },
        v => str_of(v),
    }
}

pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i < U.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{x:.1} {}", U[i]) }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut w = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<width$}  ", width = w[i]);
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}
