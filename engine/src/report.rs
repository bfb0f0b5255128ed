//! What the read verbs print: `status`, `plan`, `show`, `diff`, `gc` and `verify`, each as a
//! stable JSON shape (documented in the README) and as text rendered from that same value.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::Path;

use serde_json::{Value, json};

use crate::config::{Pipeline, StageDecl};
use crate::diff::{Figures, Side};
use crate::key::{Canon, Key};
use crate::plan::{Plan, StagePlan, State};
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

/// `pipe diff --json`, one shape for any number of pipelines:
/// `{"pipelines": [{"label", "name", "file"}], "params": [{"stage", "path", "values"}],
/// "stages": [{"kind", "names", "keys", "states", "shared"}], "metrics": [{"stage", "metric",
/// "values", "delta"?}], "figures": {"folder", "files": [{"stage", "kind", "files"}], "warnings"}}`.
/// Arrays called `names`, `keys`, `states` and `values` have one entry per pipeline, in the order
/// given, `null` where a pipeline lacks it; `delta` (last − first) only for two pipelines.
pub fn diff_json(sides: &[Side<'_>], figures: Option<&Figures>) -> Value {
    let n = sides.len();
    let mut names: Vec<&str> = Vec::new();
    for s in sides {
        for d in &s.pipeline.stages {
            if !names.contains(&d.name.as_str()) {
                names.push(&d.name);
            }
        }
    }
    // Parameters: only effective differences (defaults filled in), plus kind, inputs and paths.
    let mut params = Vec::new();
    for name in &names {
        let decls: Vec<Option<&StageDecl>> = sides.iter().map(|s| s.pipeline.stage(name)).collect();
        let row = |path: &str, values: Vec<Value>| json!({"stage": name, "path": path, "values": values});
        if decls.iter().any(Option::is_none) {
            params.push(row(
                "",
                decls.iter().map(|d| d.map(|_| json!("present")).unwrap_or(Value::Null)).collect(),
            ));
        }
        if decls.iter().flatten().count() < 2 {
            continue;
        }
        let fields: Vec<Option<Vec<(String, Value)>>> = decls.iter().map(|d| d.map(fields_of)).collect();
        let mut paths: Vec<&str> = Vec::new();
        for f in fields.iter().flatten() {
            for (p, _) in f {
                if !paths.contains(&p.as_str()) {
                    paths.push(p);
                }
            }
        }
        for path in paths {
            let values: Vec<Option<Value>> = fields
                .iter()
                .map(|f| {
                    f.as_ref().map(|f| {
                        f.iter().find(|(p, _)| p == path).map(|(_, v)| v.clone()).unwrap_or(Value::Null)
                    })
                })
                .collect();
            let present: Vec<&Value> = values.iter().flatten().collect();
            if present.iter().any(|v| *v != present[0]) {
                params.push(row(path, values.into_iter().map(|v| v.unwrap_or(Value::Null)).collect()));
            }
        }
    }
    // Stages are matched by key first (renames share outputs), then by name.
    let mut rows: Vec<Vec<Option<&StagePlan>>> = Vec::new();
    for (i, s) in sides.iter().enumerate() {
        let mut unmatched = Vec::new();
        for st in &s.plan.stages {
            match rows.iter_mut().find(|r| r[i].is_none() && r.iter().flatten().any(|o| o.key == st.key)) {
                Some(r) => r[i] = Some(st),
                None => unmatched.push(st),
            }
        }
        for st in unmatched {
            match rows.iter_mut().find(|r| r[i].is_none() && r.iter().flatten().any(|o| o.name == st.name)) {
                Some(r) => r[i] = Some(st),
                None => {
                    let mut r = vec![None; n];
                    r[i] = Some(st);
                    rows.push(r);
                }
            }
        }
    }
    let stages: Vec<Value> = rows
        .iter()
        .map(|r| {
            let first = r.iter().flatten().next();
            json!({
                "kind": first.map(|s| s.kind.clone()),
                "names": r.iter().map(|s| s.map(|s| s.name.clone())).collect::<Vec<_>>(),
                "keys": r.iter().map(|s| s.map(|s| s.key.hex())).collect::<Vec<_>>(),
                "states": r.iter().map(|s| s.map(|s| s.state.as_str())).collect::<Vec<_>>(),
                "shared": r.iter().all(|s| s.is_some_and(|s| Some(s.key) == first.map(|f| f.key))),
            })
        })
        .collect();
    // Metrics of every matched stage that at least two pipelines have published.
    let mut metrics = Vec::new();
    for r in &rows {
        let objects: Vec<Option<&crate::store::Object>> =
            r.iter().map(|s| s.and_then(|s| s.object.as_ref())).collect();
        if objects.iter().flatten().count() < 2 {
            continue;
        }
        let Some(stage) = r.iter().flatten().next().map(|s| s.name.clone()) else { continue };
        let keys: BTreeSet<&String> =
            objects.iter().flatten().flat_map(|o| o.manifest.metrics.keys()).collect();
        for k in keys {
            let values: Vec<Value> = objects
                .iter()
                .map(|o| o.and_then(|o| o.manifest.metrics.get(k).cloned()).unwrap_or(Value::Null))
                .collect();
            let mut m = json!({"stage": stage, "metric": k, "values": values});
            if let [Some(x), Some(y)] = [values.first(), values.last()].map(|v| v.and_then(Value::as_f64))
                && n == 2
            {
                m["delta"] = json!(y - x);
            }
            metrics.push(m);
        }
    }
    let figures = json!({
        "folder": figures.map(|f| f.folder.display().to_string()),
        "files": figures.map(|f| f.stages.iter().map(|s| json!({"stage": s.stage, "kind": s.kind, "files": s.files})).collect::<Vec<_>>()).unwrap_or_default(),
        "warnings": figures.map(|f| f.warnings.iter().map(|w| json!({"stage": w.stage, "kind": w.kind, "message": w.message})).collect::<Vec<_>>()).unwrap_or_default(),
    });
    json!({
        "pipelines": sides.iter().map(|s| json!({
            "label": s.label, "name": s.pipeline.name, "file": s.pipeline.file.display().to_string(),
        })).collect::<Vec<_>>(),
        "params": params,
        "stages": stages,
        "metrics": metrics,
        "figures": figures,
    })
}

/// What `diff` compares of one stage declaration, as (path, value) in a fixed order: `kind`, the
/// canonical parameters flattened to dotted paths, `inputs.<role>` and `external.<role>`.
fn fields_of(d: &StageDecl) -> Vec<(String, Value)> {
    let mut out = vec![("kind".to_string(), json!(d.kind))];
    flatten(&d.params, "", &mut out);
    for (role, ups) in &d.inputs {
        out.push((format!("inputs.{role}"), json!(ups)));
    }
    for e in &d.external {
        let paths: Vec<String> = e.paths.iter().map(|p| p.display().to_string()).collect();
        out.push((format!("external.{}", e.role), json!(paths)));
    }
    out
}

/// Canonical parameters as (dotted path, JSON value) leaves; lists and empty tables are leaves.
pub fn flatten(c: &Canon, path: &str, out: &mut Vec<(String, Value)>) {
    match c {
        Canon::Map(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(v, &p, out);
            }
        }
        c => out.push((if path.is_empty() { "params".to_string() } else { path.to_string() }, c.to_json())),
    }
}

/// The width `pipe diff` fits its tables for several pipelines into.
const DIFF_WIDTH: usize = 120;

pub fn diff_text(v: &Value) -> String {
    let mut s =
        if v["pipelines"].as_array().map_or(0, Vec::len) == 2 { diff_text_two(v) } else { diff_text_many(v) };
    let f = &v["figures"];
    if let Some(folder) = f["folder"].as_str() {
        let _ = writeln!(s, "\nfigures: {folder}");
        let files: Vec<String> = f["files"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|st| st["files"].as_array().cloned().unwrap_or_default())
            .map(|x| str_of(&x))
            .collect();
        if files.is_empty() {
            s.push_str("  (no stage kind wrote a comparison)\n");
        }
        for file in files {
            let _ = writeln!(s, "  {file}");
        }
    }
    for w in f["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "warning: comparing stage `{}` (kind `{}`) failed: {}",
            str_of(&w["stage"]),
            str_of(&w["kind"]),
            str_of(&w["message"])
        );
    }
    s
}

/// Two pipelines: `A`/`B`, one line per parameter difference, metric deltas.
fn diff_text_two(v: &Value) -> String {
    let mut s = String::new();
    for (i, side) in ["A", "B"].iter().enumerate() {
        let p = &v["pipelines"][i];
        let _ = writeln!(s, "{side} = {} ({})", str_of(&p["label"]), str_of(&p["file"]));
    }
    s.push_str("\nparameters:\n");
    let params = v["params"].as_array().cloned().unwrap_or_default();
    if params.is_empty() {
        s.push_str("  (identical)\n");
    }
    for p in params {
        let _ =
            writeln!(s, "  {}: {} -> {}", param_at(&p), compact(&p["values"][0]), compact(&p["values"][1]));
    }
    s.push_str("\nstages:\n");
    let mut rows =
        vec![["A".to_string(), "B".into(), "KIND".into(), "KEY A".into(), "KEY B".into(), "".into()]];
    for st in v["stages"].as_array().into_iter().flatten() {
        let short = |k: &Value| k.as_str().map(|k| k[..12].to_string()).unwrap_or("-".into());
        rows.push([
            st["names"][0].as_str().unwrap_or("-").into(),
            st["names"][1].as_str().unwrap_or("-").into(),
            str_of(&st["kind"]),
            short(&st["keys"][0]),
            short(&st["keys"][1]),
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
                compact(&m["values"][0]),
                compact(&m["values"][1]),
                compact(&m["delta"]),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

/// Three or more pipelines: tables with one column per pipeline label, fitted to [`DIFF_WIDTH`].
fn diff_text_many(v: &Value) -> String {
    let mut s = String::new();
    let pipes = v["pipelines"].as_array().cloned().unwrap_or_default();
    let labels: Vec<String> = pipes.iter().map(|p| str_of(&p["label"])).collect();
    let width = DIFF_WIDTH - 2;
    s.push_str("pipelines:\n");
    for p in &pipes {
        let _ = writeln!(
            s,
            "  {:<w$}  {}",
            truncate_middle(&str_of(&p["label"]), 32),
            str_of(&p["file"]),
            w = labels.iter().map(|l| l.chars().count().min(32)).max().unwrap_or(0)
        );
    }

    s.push_str("\nparameters that differ:\n");
    let params = v["params"].as_array().cloned().unwrap_or_default();
    if params.is_empty() {
        s.push_str("  (identical)\n");
    } else {
        let mut rows = vec![[vec!["STAGE.PARAMETER".to_string()], labels.clone()].concat()];
        for p in &params {
            let cells = p["values"].as_array().into_iter().flatten().map(compact);
            rows.push(std::iter::once(param_at(p)).chain(cells).collect());
        }
        let caps = [vec![Some(32)], vec![None; labels.len()]].concat();
        push_indented(&mut s, &fit_table(&rows, &caps, width));
    }

    s.push_str("\nstages (key, and state when not cached):\n");
    let mut rows =
        vec![[vec!["STAGE".to_string(), "KIND".into()], labels.clone(), vec!["SHARED".into()]].concat()];
    for st in v["stages"].as_array().into_iter().flatten() {
        let mut names: Vec<String> = Vec::new();
        for n in st["names"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
        let cells = (0..labels.len()).map(|i| match (st["keys"][i].as_str(), st["states"][i].as_str()) {
            (Some(k), Some("cached")) => k[..8].to_string(),
            (Some(k), Some(state)) => format!("{} {state}", &k[..8]),
            _ => "-".to_string(),
        });
        let shared = if st["shared"].as_bool() == Some(true) { "yes" } else { "no" };
        rows.push(
            [vec![names.join("/"), str_of(&st["kind"])], cells.collect(), vec![shared.to_string()]].concat(),
        );
    }
    let caps = [vec![Some(24), Some(12)], vec![None; labels.len()], vec![Some(6)]].concat();
    push_indented(&mut s, &fit_table(&rows, &caps, width));

    let metrics = v["metrics"].as_array().cloned().unwrap_or_default();
    if !metrics.is_empty() {
        s.push_str("\nmetrics (stages at least two have run):\n");
        let mut rows = vec![[vec!["STAGE".to_string(), "METRIC".into()], labels.clone()].concat()];
        for m in &metrics {
            let cells = m["values"].as_array().into_iter().flatten().map(compact);
            rows.push([vec![str_of(&m["stage"]), str_of(&m["metric"])], cells.collect()].concat());
        }
        let caps = [vec![Some(20), Some(24)], vec![None; labels.len()]].concat();
        push_indented(&mut s, &fit_table(&rows, &caps, width));
    }
    s
}

fn param_at(p: &Value) -> String {
    let path = str_of(&p["path"]);
    if path.is_empty() { str_of(&p["stage"]) } else { format!("{}.{path}", str_of(&p["stage"])) }
}

fn push_indented(s: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(s, "  {line}");
    }
}

/// Like [`table`], fitted into `width` columns: a column with a cap is at most that wide; the
/// columns without one share what is left equally. Longer cells end in `…`; the cells of the
/// first row (labels, which in a sweep often differ only at the end) lose their middle instead.
fn fit_table(rows: &[Vec<String>], caps: &[Option<usize>], width: usize) -> String {
    let ncols = caps.len();
    let mut w = vec![0usize; ncols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(ncols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for (wi, cap) in w.iter_mut().zip(caps) {
        if let Some(c) = cap {
            *wi = (*wi).min(*c);
        }
    }
    let fixed: usize = w.iter().zip(caps).filter(|(_, c)| c.is_some()).map(|(w, _)| *w).sum();
    let flex = caps.iter().filter(|c| c.is_none()).count();
    if let Some(share) = width.saturating_sub(fixed + 2 * (ncols - 1)).checked_div(flex) {
        let each = share.max(6);
        for (wi, cap) in w.iter_mut().zip(caps) {
            if cap.is_none() {
                *wi = (*wi).min(each);
            }
        }
    }
    let mut s = String::new();
    for (n, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate().take(ncols) {
            let c = if n == 0 { truncate_middle(c, w[i]) } else { truncate(c, w[i]) };
            if i + 1 == ncols {
                line.push_str(&c);
            } else {
                let _ = write!(line, "{c:<width$}  ", width = w[i]);
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// At most `w` characters; a longer string keeps its start and end around a `…`.
fn truncate_middle(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        return s.to_string();
    }
    let keep = w.saturating_sub(1);
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut t: String = s.chars().take(head).collect();
    t.push('…');
    t.extend(s.chars().skip(n - tail));
    t
}

/// At most `w` characters; a longer string keeps its first `w - 1` and ends in `…`.
fn truncate(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::{self, StageFigures};
    use crate::exec::{RunOptions, run};
    use crate::plan::tests::Fixture;
    use crate::plan::{PlanOptions, plan};
    use std::path::PathBuf;

    /// [`TEXT`] as `<file>.toml` with overrides, run when `run_it`, and planned; every published
    /// stage gets the metric `loss` = `loss`.
    fn side(f: &Fixture, file: &str, overrides: &[&str], run_it: bool, loss: f64) -> (Pipeline, Plan) {
        let p = f.load_as(file, overrides);
        if run_it {
            let pl = plan(&p, &f.registry, &f.store, &PlanOptions::default()).unwrap();
            assert!(run(&p, &f.registry, &f.store, &pl, &RunOptions::default()).unwrap().ok());
        }
        let mut pl = plan(&p, &f.registry, &f.store, &PlanOptions::default()).unwrap();
        for s in &mut pl.stages {
            if let Some(o) = &mut s.object {
                o.manifest.metrics.insert("loss".into(), json!(loss));
            }
        }
        (p, pl)
    }

    fn diff_of(sides: &[(Pipeline, Plan)], figures: Option<&Figures>) -> Value {
        let labels = diff::labels(&sides.iter().map(|(p, _)| p).collect::<Vec<_>>());
        let s: Vec<Side<'_>> = sides
            .iter()
            .zip(&labels)
            .map(|((pipeline, plan), label)| Side { label, pipeline, plan })
            .collect();
        diff_json(&s, figures)
    }

    /// Three runs of a sweep over `train.k`, the last one not run.
    fn three() -> (Fixture, Value) {
        let f = Fixture::new();
        let sides = vec![
            side(&f, "k4", &[], true, 0.5),
            side(&f, "k8", &["stages.train.k=8"], true, 0.25),
            side(&f, "k16", &["stages.train.k=16", "stages.train.lr=0.01"], false, 0.0),
        ];
        let figs = Figures {
            folder: PathBuf::from("/ds/diffs/k4--k8--k16"),
            stages: vec![StageFigures {
                stage: "train".into(),
                kind: "train".into(),
                files: vec!["train/x.tsv".into()],
            }],
            warnings: vec![],
        };
        let v = diff_of(&sides, Some(&figs));
        (f, v)
    }

    #[test]
    fn three_way_json_has_one_value_per_pipeline() {
        let (_f, v) = three();
        let labels: Vec<&str> =
            v["pipelines"].as_array().unwrap().iter().map(|p| p["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["k4", "k8", "k16"], "names repeat, so labels are file stems");
        assert_eq!(v["pipelines"][0]["name"], "p");
        assert_eq!(
            v["params"],
            json!([
                {"stage": "train", "path": "k", "values": [4, 8, 16]},
                {"stage": "train", "path": "lr", "values": [0.001, 0.001, 0.01]},
            ])
        );
        let stages = v["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0]["names"], json!(["web", "web", "web"]));
        assert_eq!(stages[0]["shared"], true);
        assert_eq!(stages[0]["states"], json!(["cached", "cached", "cached"]));
        assert_eq!(stages[1]["shared"], false);
        assert_eq!(
            stages[1]["states"],
            json!(["cached", "cached", "stale"]),
            "same name, run before with another key"
        );
        assert!(stages[1]["keys"].as_array().unwrap().iter().all(Value::is_string));
        // Metrics of stages at least two have published; no delta for three pipelines.
        let m: Vec<&Value> =
            v["metrics"].as_array().unwrap().iter().filter(|m| m["stage"] == "train").collect();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["values"], json!([0.5, 0.25, null]));
        assert!(m[0].get("delta").is_none(), "{}", m[0]);
        assert_eq!(v["figures"]["folder"], "/ds/diffs/k4--k8--k16");
        assert_eq!(v["figures"]["files"][0]["files"], json!(["train/x.tsv"]));
    }

    #[test]
    fn two_way_json_has_a_delta_and_presence_rows() {
        let f = Fixture::new();
        let a = side(&f, "a", &[], true, 0.5);
        let data = format!("stages.extra.data={}", f.dir.path().join("web.bin").display());
        let b = side(
            &f,
            "b",
            &["stages.train.k=8", "stages.extra.kind=source", &data, "stages.extra.seed=3"],
            true,
            0.25,
        );
        let v = diff_of(&[a, b], None);
        let train: Vec<&Value> =
            v["metrics"].as_array().unwrap().iter().filter(|m| m["stage"] == "train").collect();
        assert_eq!(train[0]["delta"], json!(-0.25));
        assert!(
            v["params"]
                .as_array()
                .unwrap()
                .contains(&json!({"stage": "extra", "path": "", "values": [null, "present"]}))
        );
        assert_eq!(v["figures"], json!({"folder": null, "files": [], "warnings": []}));
        let text = diff_text(&v);
        assert!(text.contains("A = p#1 (") || text.contains("A = a ("), "{text}");
        assert!(text.contains("  train.k: 4 -> 8\n"), "{text}");
        assert!(text.contains("-0.25"), "{text}");
    }

    #[test]
    fn three_way_text_is_a_table_per_label() {
        let (f, v) = three();
        let text = diff_text(&v).replace(&f.dir.path().display().to_string(), "[TMP]");
        let keys: Vec<String> = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()[..8].to_string()))
            .collect();
        let mut text = text;
        for k in keys {
            text = text.replace(&k, "[KEY]   ");
        }
        insta::assert_snapshot!(text);
    }

    #[test]
    fn wide_sweeps_fit_120_columns() {
        let f = Fixture::new();
        let sides: Vec<(Pipeline, Plan)> = (0..5)
            .map(|i| {
                let k = format!("stages.train.k={}", 1 << (i + 2));
                let lr = format!("stages.train.lr={}", 0.000123456789 * (i + 1) as f64);
                side(&f, &format!("a-rather-long-configuration-name-{i}"), &[&k, &lr], true, 1.0 / 3.0)
            })
            .collect();
        let text = diff_text(&diff_of(&sides, None));
        // File paths are printed whole; everything else fits.
        for line in text.lines().filter(|l| !l.ends_with(".toml")) {
            assert!(line.chars().count() <= 120, "{} chars: {line}\n{text}", line.chars().count());
        }
        // Long labels lose their middle, so the end that tells them apart stays.
        assert!(text.contains("a-rather-…n-name-0") && text.contains("…n-name-4"), "{text}");
    }

    #[test]
    fn truncate_keeps_width() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate_middle("config-name-12", 8), "conf…-12");
    }
}
