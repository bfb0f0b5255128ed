//! Validation of the merged document: top-level keys, `[pipeline]`, every stage against its kind
//! (inputs, parameters), stage references, and the DAG (cycles, topological order).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};

use super::error::{Span, did_you_mean, key_path};
use super::raw::{ExecutorTable, HEADER_KEYS, PipelineHeader};
use super::tree::{Entry, Node, Table, Val};
use super::{Cx, ExternalInput, StageDecl, paths};
use crate::key::Canon;
use crate::stage::{Arity, DynStage, InputSource, ParamError, ResolveCx, Resolver};

const NAME_MAX: usize = 100;
const NAME_RULE: &str = "names start with a letter or digit and contain only letters, digits, `_`, `.` and `-` \
     (at most 100 characters)";

pub(crate) struct Validated {
    pub name: String,
    pub description: String,
    pub datastore: Option<PathBuf>,
    pub stages: Vec<StageDecl>,
    pub executor: ExecutorTable,
    /// Resolved path values, to write back into the effective document: (key path, value).
    resolved: Vec<(Vec<String>, toml::Value)>,
}

/// A pipeline or stage name: it becomes a path component, so no separators, no `..`.
pub(crate) fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= NAME_MAX
}

pub(crate) fn validate(cx: &mut Cx<'_>, root: &Table) -> Option<Validated> {
    for (k, e) in &root.0 {
        if !matches!(k.as_str(), "pipeline" | "stages" | "executor") {
            let help = did_you_mean(k, ["pipeline", "stages", "executor"]).or_else(|| {
                let is_stage = e.node.as_table().is_some_and(|t| t.get("kind").is_some());
                Some(if is_stage {
                    format!("stages are declared under `stages`: write `[stages.{k}]`")
                } else {
                    "a pipeline file has a `[pipeline]` table and `[stages.<name>]` tables".to_string()
                })
            });
            cx.error_help(&e.key, key_path(&[k]), format!("unknown top-level key `{k}`"), help);
        }
    }
    let header = header(cx, root);
    let mut resolved = Vec::new();
    let datastore = header.as_ref().and_then(|(h, table)| {
        let raw = h.datastore.as_deref()?;
        let node = &table.get("datastore")?.node;
        let p = path_value(cx, raw, node, "pipeline.datastore")?;
        resolved.push((vec!["pipeline".into(), "datastore".into()], path_toml(&p)));
        Some(p)
    });
    let stages = stages(cx, root, &mut resolved);
    let executor = executor(cx, root, stages.as_deref());
    let (h, _) = header?;
    Some(Validated {
        name: h.name,
        description: h.description.unwrap_or_default(),
        datastore,
        stages: stages?,
        executor: executor?,
        resolved,
    })
}

/// Writes resolved paths into the effective document so it stands on its own.
pub(crate) fn patch_effective(effective: &mut toml::Table, v: &Validated) {
    for (path, value) in &v.resolved {
        set_in(effective, path, value);
    }
}

fn set_in(t: &mut toml::Table, path: &[String], value: &toml::Value) {
    match path {
        [] => {}
        [last] => {
            t.insert(last.clone(), value.clone());
        }
        [first, rest @ ..] => {
            if let Some(toml::Value::Table(next)) = t.get_mut(first) {
                set_in(next, rest, value);
            }
        }
    }
}

fn path_toml(p: &std::path::Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

/// Expands and resolves a path value written at `node` (against its source's directory).
fn path_value(cx: &mut Cx<'_>, raw: &str, node: &Node, key: &str) -> Option<PathBuf> {
    let expanded = expand_value(cx, raw, node, key)?;
    Some(paths::resolve(&source_dir(cx, node), &expanded))
}

/// The directory relative paths written at `node` resolve against.
fn source_dir(cx: &Cx<'_>, node: &Node) -> PathBuf {
    cx.sources.get(node.span.file).map(|s| s.dir.clone()).unwrap_or_default()
}

/// A path input's value: with a resolver, an existing local path wins; a value that names none
/// (or has a scheme, like `hf:org/name`) goes to the resolver, and stays a path if the resolver
/// says it is no reference. This is the loader's only look at path inputs on disk.
fn input_value(
    cx: &mut Cx<'_>,
    raw: &str,
    node: &Node,
    key: &str,
    resolver: Option<Resolver>,
) -> Option<PathBuf> {
    let Some(resolver) = resolver else {
        return path_value(cx, raw, node, key);
    };
    let expanded = expand_value(cx, raw, node, key)?;
    let dir = source_dir(cx, node);
    let local = paths::resolve(&dir, &expanded);
    if !paths::has_scheme(&expanded) && std::fs::symlink_metadata(&local).is_ok() {
        return Some(local);
    }
    match resolver(&expanded, &ResolveCx::new(&dir, cx.env)) {
        Ok(Some(p)) => Some(paths::clean(&dir.join(p))),
        Ok(None) => Some(local),
        Err(e) => {
            cx.error_help(&node.span, key, e.message, e.help);
            None
        }
    }
}

/// `${VAR}` and `~` expanded, or `None` with the error reported at `node`.
fn expand_value(cx: &mut Cx<'_>, raw: &str, node: &Node, key: &str) -> Option<String> {
    match paths::expand(raw, cx.env) {
        Ok(expanded) => Some(expanded),
        Err(e) => {
            let help = match &e {
                paths::ExpandError::Unset(var) => Some(format!(
                    "set `{var}` in the environment, or override the path with `--set {key}=...`"
                )),
                _ => None,
            };
            cx.error_help(&node.span, key, e.message(), help);
            None
        }
    }
}

fn header<'t>(cx: &mut Cx<'_>, root: &'t Table) -> Option<(PipelineHeader, &'t Table)> {
    let Some(entry) = root.get("pipeline") else {
        let span = Span::new(0, 0..0);
        cx.error_help(
            &span,
            "pipeline",
            "missing `[pipeline]` table",
            Some("start the file with `[pipeline]` and `name = \"...\"`".to_string()),
        );
        return None;
    };
    let Some(table) = entry.node.as_table() else {
        let found = entry.node.value.type_name();
        cx.error(&entry.node.span, "pipeline", format!("`pipeline` must be a table, found {found}"));
        return None;
    };
    let value = toml::Value::Table(table.to_toml());
    let h: PipelineHeader = match serde_path_to_error::deserialize(value) {
        Ok(h) => h,
        Err(e) => {
            let pe = param_error(&e);
            let unknown = unknown_field(&pe.message).is_some();
            let span = locate(entry, &pe.path, unknown);
            let kp = key_path(&prefixed(&["pipeline"], &pe.path));
            let (message, help) = if let Some(field) = unknown_field(&pe.message) {
                let help = did_you_mean(&field, HEADER_KEYS.iter().copied())
                    .unwrap_or_else(|| format!("`[pipeline]` takes: {}", HEADER_KEYS.join(", ")));
                (format!("unknown key `{field}` in `[pipeline]`"), Some(help))
            } else if let Some(field) = missing_field(&pe.message) {
                let help = (field == "name")
                    .then(|| "add `name = \"...\"` to `[pipeline]`: it names the pipeline's folder in the datastore".into());
                (format!("missing `pipeline.{field}`"), help)
            } else {
                (format!("invalid `{kp}`: {}", pe.message), None)
            };
            cx.error_help(span, kp, message, help);
            return None;
        }
    };
    if !valid_name(&h.name) {
        let span = table.get("name").map_or(&entry.key, |e| &e.node.span);
        cx.error_help(
            span,
            "pipeline.name",
            format!("invalid pipeline name `{}`", h.name),
            Some(format!("{NAME_RULE}: the name becomes a folder name in the datastore")),
        );
    }
    Some((h, table))
}

/// `[executor]`, typed; stage names in `[executor.slurm.stages]` must be stages of the pipeline.
fn executor(cx: &mut Cx<'_>, root: &Table, stages: Option<&[StageDecl]>) -> Option<ExecutorTable> {
    let Some(entry) = root.get("executor") else {
        return Some(ExecutorTable::default());
    };
    let Some(table) = entry.node.as_table() else {
        let found = entry.node.value.type_name();
        cx.error(&entry.node.span, "executor", format!("`executor` must be a table, found {found}"));
        return None;
    };
    let value = toml::Value::Table(table.to_toml());
    let t: ExecutorTable = match serde_path_to_error::deserialize(value) {
        Ok(t) => t,
        Err(e) => {
            let pe = param_error(&e);
            let unknown = unknown_field(&pe.message).is_some();
            let span = locate(entry, &pe.path, unknown);
            let kp = key_path(&prefixed(&["executor"], &pe.path));
            let message = match unknown_field(&pe.message) {
                Some(field) => format!(
                    "unknown key `{field}` in `[{}]`",
                    key_path(&prefixed(&["executor"], &pe.path[..pe.path.len().saturating_sub(1)]))
                ),
                None => format!("invalid `{kp}`: {}", pe.message),
            };
            cx.error_help(
                span,
                kp,
                message,
                Some("see `pipe schema` for what `[executor.slurm]` takes".into()),
            );
            return None;
        }
    };
    let s = &t.slurm;
    let mut bad = |path: &[&str], message: String| {
        let span = locate(entry, &path.iter().map(|p| p.to_string()).collect::<Vec<_>>(), false);
        cx.error(
            span,
            key_path(&prefixed(&["executor"], &path.iter().map(|p| p.to_string()).collect::<Vec<_>>())),
            message,
        );
    };
    if s.array_size == 0 {
        bad(&["slurm", "array_size"], "`array_size` must be at least 1".into());
    }
    if !(s.poll_seconds.is_finite() && s.poll_seconds > 0.0) {
        bad(&["slurm", "poll_seconds"], "`poll_seconds` must be a positive number".into());
    }
    for (name, o) in &s.stages {
        if o.array_size == Some(0) {
            bad(&["slurm", "stages", name, "array_size"], "`array_size` must be at least 1".into());
        }
        if let Some(stages) = stages
            && !stages.iter().any(|d| &d.name == name)
        {
            let names: Vec<&str> = stages.iter().map(|d| d.name.as_str()).collect();
            bad(
                &["slurm", "stages", name],
                format!("no stage `{name}` in this pipeline (stages: {})", names.join(", ")),
            );
        }
    }
    Some(t)
}

/// One stage table, as far as it could be validated.
struct Stage<'t> {
    name: &'t str,
    entry: &'t Entry,
    kind: Option<&'t dyn DynStage>,
    /// (role, [(upstream name, span)]), roles in declared order.
    refs: Vec<(&'static str, Vec<(String, Span)>)>,
    external: Vec<ExternalInput>,
    params: Option<Canon>,
}

fn stages<'r: 't, 't>(
    cx: &mut Cx<'r>,
    root: &'t Table,
    resolved: &mut Vec<(Vec<String>, toml::Value)>,
) -> Option<Vec<StageDecl>> {
    let Some(entry) = root.get("stages") else {
        return Some(Vec::new());
    };
    let Some(table) = entry.node.as_table() else {
        let found = entry.node.value.type_name();
        cx.error_help(
            &entry.node.span,
            "stages",
            format!("`stages` must be a table, found {found}"),
            Some("declare each stage as a `[stages.<name>]` table".to_string()),
        );
        return None;
    };
    let list: Vec<Stage<'t>> = table.0.iter().map(|(name, e)| stage(cx, name, e, resolved)).collect();
    let errors_before = cx.errors.len();
    let edges = references(cx, &list);
    let order = dag(cx, &list, &edges);
    if cx.errors.len() > errors_before {
        return None;
    }
    let mut out = Vec::with_capacity(list.len());
    for i in order? {
        let s = &list[i];
        let (Some(kind), Some(params)) = (s.kind, s.params.clone()) else {
            return None;
        };
        out.push(StageDecl {
            name: s.name.to_string(),
            kind: kind.kind().to_string(),
            params,
            inputs: s
                .refs
                .iter()
                .map(|(role, names)| (role.to_string(), names.iter().map(|(n, _)| n.clone()).collect()))
                .collect(),
            external: s.external.clone(),
            at: cx.location(&s.entry.key),
        });
    }
    Some(out)
}

fn kinds_help(cx: &Cx<'_>) -> String {
    let names = cx.registry.kind_names();
    if names.is_empty() {
        "this build knows no stage kinds".to_string()
    } else {
        format!("known kinds: {}", names.join(", "))
    }
}

fn stage<'r: 't, 't>(
    cx: &mut Cx<'r>,
    name: &'t str,
    entry: &'t Entry,
    resolved: &mut Vec<(Vec<String>, toml::Value)>,
) -> Stage<'t> {
    let mut s = Stage { name, entry, kind: None, refs: Vec::new(), external: Vec::new(), params: None };
    let kp = |rest: &[&str]| key_path(&prefixed(&["stages", name], rest));
    if !valid_name(name) {
        cx.error_help(
            &entry.key,
            kp(&[]),
            format!("invalid stage name `{name}`"),
            Some(format!("{NAME_RULE}: the name becomes a folder name in the datastore")),
        );
    }
    let Some(table) = entry.node.as_table() else {
        let found = entry.node.value.type_name();
        cx.error_help(
            &entry.node.span,
            kp(&[]),
            format!("stage `{name}` must be a table, found {found}"),
            Some(format!("declare it as `[stages.{}]` with a `kind`", key_path(&[name]))),
        );
        return s;
    };
    let kind = match table.get("kind") {
        None => {
            let help = format!("add `kind = \"...\"` to the stage; {}", kinds_help(cx));
            cx.error_help(&entry.key, kp(&[]), format!("stage `{name}` has no `kind`"), Some(help));
            return s;
        }
        Some(e) => match e.node.as_str() {
            None => {
                let found = e.node.value.type_name();
                let help = kinds_help(cx);
                cx.error_help(
                    &e.node.span,
                    kp(&["kind"]),
                    format!("`kind` must be a string, found {found}"),
                    Some(help),
                );
                return s;
            }
            Some(k) => match cx.registry.get(k) {
                Some(kind) => kind,
                None => {
                    let names = cx.registry.kind_names();
                    let help = match did_you_mean(k, names.iter().copied()) {
                        Some(dym) => format!("{dym} {}", kinds_help(cx)),
                        None => kinds_help(cx),
                    };
                    cx.error_help(
                        &e.node.span,
                        kp(&["kind"]),
                        format!("unknown stage kind `{k}`"),
                        Some(help),
                    );
                    return s;
                }
            },
        },
    };
    s.kind = Some(kind);

    let mut params = table.to_toml();
    params.remove("kind");
    for spec in kind.inputs() {
        params.remove(spec.name);
        let Some(e) = table.get(spec.name) else {
            if matches!(spec.arity, Arity::One | Arity::Many) {
                let example = match (&spec.source, spec.arity) {
                    (InputSource::Path, _) => format!("{} = \"path/to/...\"", spec.name),
                    (_, Arity::Many) => format!("{} = [\"<stage>\", ...]", spec.name),
                    _ => format!("{} = \"<stage>\"", spec.name),
                };
                let doc = if spec.doc.is_empty() { String::new() } else { format!(" ({})", spec.doc) };
                cx.error_help(
                    &entry.key,
                    kp(&[]),
                    format!("stage `{name}` is missing input `{}`", spec.name),
                    Some(format!("add `{example}`{doc}")),
                );
            }
            continue;
        };
        let (what, whats) = match spec.source {
            InputSource::Path => ("a path", "paths"),
            InputSource::Stage { .. } => ("a stage name", "stage names"),
        };
        let expected = match spec.arity {
            Arity::Many | Arity::OptionalMany => format!("{what} or an array of them"),
            _ => what.to_string(),
        };
        let values: Vec<(&str, &Node)> = match (&e.node.value, spec.arity) {
            (Val::Str(v), _) => vec![(v.as_str(), &e.node)],
            (Val::Array(items), Arity::Many | Arity::OptionalMany) => {
                if items.is_empty() {
                    if spec.arity == Arity::OptionalMany {
                        continue;
                    }
                    cx.error(
                        &e.node.span,
                        kp(&[spec.name]),
                        format!("input `{}` needs at least one value", spec.name),
                    );
                    continue;
                }
                let mut values = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(v) => values.push((v, item)),
                        None => cx.error(
                            &item.span,
                            kp(&[spec.name, &i.to_string()]),
                            format!(
                                "input `{}` takes {whats} (strings), found {}",
                                spec.name,
                                item.value.type_name()
                            ),
                        ),
                    }
                }
                if values.len() != items.len() {
                    continue;
                }
                values
            }
            (v, _) => {
                cx.error(
                    &e.node.span,
                    kp(&[spec.name]),
                    format!("input `{}` must be {expected}, found {}", spec.name, v.type_name()),
                );
                continue;
            }
        };
        match spec.source {
            InputSource::Stage { .. } => s
                .refs
                .push((spec.name, values.iter().map(|(v, n)| (v.to_string(), n.span.clone())).collect())),
            InputSource::Path => {
                let key = kp(&[spec.name]);
                let paths: Vec<Option<PathBuf>> =
                    values.iter().map(|(v, n)| input_value(cx, v, n, &key, spec.resolver)).collect();
                let Some(paths) = paths.into_iter().collect::<Option<Vec<_>>>() else {
                    continue;
                };
                let value = match &e.node.value {
                    Val::Array(_) => toml::Value::Array(paths.iter().map(|p| path_toml(p)).collect()),
                    _ => path_toml(&paths[0]),
                };
                resolved.push((vec!["stages".into(), name.to_string(), spec.name.to_string()], value));
                s.external.push(ExternalInput {
                    role: spec.name.to_string(),
                    paths,
                    at: cx.location(&e.node.span),
                });
            }
        }
    }

    match kind.canonical_params(params) {
        Ok(p) => s.params = Some(p),
        Err(pe) => param_failure(cx, name, entry, kind, &pe),
    }
    s
}

/// Points a parameter error at the value it is about, or at the stage when the value is absent.
fn param_failure(cx: &mut Cx<'_>, name: &str, entry: &Entry, kind: &dyn DynStage, pe: &ParamError) {
    let path = normalized_path(entry, pe);
    let span = locate(entry, &path, unknown_field(&pe.message).is_some());
    let kp = key_path(&prefixed(&["stages", name], &path));
    let pe = &ParamError { path, message: pe.message.clone() };
    let (message, help) = if let Some(field) = unknown_field(&pe.message) {
        let mut known = expected_fields(&pe.message);
        let (where_, list) = if pe.path.len() > 1 {
            let parent = key_path(&pe.path[..pe.path.len() - 1]);
            known.sort();
            (format!("`{parent}` of stage `{name}`"), format!("`{parent}` takes: {}", known.join(", ")))
        } else {
            known.extend(kind.inputs().iter().map(|s| s.name.to_string()));
            known.sort();
            (
                format!("stage `{name}`"),
                format!("stage kind `{}` takes: kind, {}", kind.kind(), known.join(", ")),
            )
        };
        let dym = did_you_mean(&field, known.iter().map(String::as_str));
        (
            format!("unknown field `{field}` in {where_}"),
            Some(match dym {
                Some(d) => format!("{d} {list}"),
                None => list,
            }),
        )
    } else if let Some(field) = missing_field(&pe.message) {
        let full = key_path(&prefixed(&pe.path.iter().map(String::as_str).collect::<Vec<_>>(), &[&field]));
        (
            format!("stage `{name}` is missing parameter `{full}`"),
            Some(format!("add `{field} = ...` to `[{}]`", key_path(&prefixed(&["stages", name], &pe.path)))),
        )
    } else if pe.path.is_empty() {
        (format!("invalid parameters for stage `{name}`: {}", pe.message), None)
    } else {
        (format!("invalid `{}` in stage `{name}`: {}", key_path(&pe.path), pe.message), None)
    };
    cx.error_help(span, kp, message, help);
}

/// Where a parameter error points: the value when it exists (its key for unknown-field errors,
/// which are about the key), else the deepest key that exists, else the stage itself.
fn locate<'a>(entry: &'a Entry, path: &[String], unknown: bool) -> &'a Span {
    let (node, key, found) = entry.node.walk(path);
    if std::ptr::eq(node, &entry.node) {
        return &entry.key;
    }
    match (found, key) {
        (true, Some(k)) if unknown => k,
        (true, _) => &node.span,
        (false, Some(k)) => k,
        (false, None) => &node.span,
    }
}

/// serde_path_to_error already ends an unknown field's path with the field, and the stage API
/// may push it again: keep it once.
fn normalized_path(entry: &Entry, pe: &ParamError) -> Vec<String> {
    let mut path = pe.path.clone();
    if let Some(field) = unknown_field(&pe.message) {
        let n = path.len();
        if n >= 2 && path[n - 1] == field && path[n - 2] == field && !entry.node.walk(&path).2 {
            path.pop();
        }
    }
    path
}

fn prefixed(prefix: &[&str], rest: &[impl AsRef<str>]) -> Vec<String> {
    prefix.iter().map(|s| s.to_string()).chain(rest.iter().map(|s| s.as_ref().to_string())).collect()
}

fn param_error(e: &serde_path_to_error::Error<toml::de::Error>) -> ParamError {
    use serde_path_to_error::Segment;
    let mut path: Vec<String> = e
        .path()
        .iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    let message = e.inner().message().to_string();
    if let Some(field) = unknown_field(&message)
        && path.last() != Some(&field)
    {
        path.push(field);
    }
    ParamError { path, message }
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The field names in serde's "unknown field `x`, expected one of `a`, `b`".
fn expected_fields(message: &str) -> Vec<String> {
    let Some(i) = message.find("expected") else {
        return Vec::new();
    };
    message[i..].split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// A resolved reference: (downstream index, upstream index, where the reference is written).
type Edge = (usize, usize, Span);

fn references(cx: &mut Cx<'_>, list: &[Stage<'_>]) -> Vec<Edge> {
    let index: BTreeMap<&str, usize> = list.iter().enumerate().map(|(i, s)| (s.name, i)).collect();
    let mut edges = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let Some(kind) = s.kind else { continue };
        for (role, names) in &s.refs {
            let accepted = kind
                .inputs()
                .iter()
                .find(|spec| spec.name == *role)
                .map(|spec| match spec.source {
                    InputSource::Stage { kinds } => kinds,
                    InputSource::Path => &[],
                })
                .unwrap_or(&[]);
            for (target, span) in names {
                let kp = key_path(&["stages", s.name, role]);
                let Some(&j) = index.get(target.as_str()) else {
                    let help = did_you_mean(target, index.keys().copied()).or_else(|| {
                        Some(if index.is_empty() {
                            "no stages are declared".to_string()
                        } else {
                            format!(
                                "declared stages: {}",
                                index.keys().copied().collect::<Vec<_>>().join(", ")
                            )
                        })
                    });
                    cx.error_help(span, kp, format!("unknown stage `{target}`"), help);
                    continue;
                };
                if let Some(up_kind) = list[j].kind.map(|k| k.kind())
                    && !accepted.is_empty()
                    && !accepted.contains(&up_kind)
                {
                    let wanted = accepted.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ");
                    let candidates: Vec<&str> = list
                        .iter()
                        .filter(|o| o.kind.is_some_and(|k| accepted.contains(&k.kind())))
                        .map(|o| o.name)
                        .collect();
                    let help = if candidates.is_empty() {
                        format!("no stage of kind {wanted} is declared")
                    } else {
                        format!("stages of kind {wanted}: {}", candidates.join(", "))
                    };
                    cx.error_help(
                        span,
                        kp,
                        format!(
                            "input `{role}` of stage `{}` takes stages of kind {wanted}, but `{target}` is of kind `{up_kind}`",
                            s.name
                        ),
                        Some(help),
                    );
                }
                edges.push((i, j, span.clone()));
            }
        }
    }
    edges
}

/// Reports dependency cycles; returns the topological order (upstreams first, ties by name)
/// when there is none.
fn dag(cx: &mut Cx<'_>, list: &[Stage<'_>], edges: &[Edge]) -> Option<Vec<usize>> {
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..list.len()).map(|i| g.add_node(i)).collect();
    // Successors: downstream → upstream (the direction references are written in).
    let mut succ: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); list.len()];
    for (a, b, _) in edges {
        if succ[*a].insert(*b) {
            g.add_edge(nodes[*a], nodes[*b], ());
        }
    }
    let mut cyclic = false;
    let mut sccs = petgraph::algo::tarjan_scc(&g);
    for scc in &mut sccs {
        scc.sort();
    }
    sccs.sort();
    for scc in sccs {
        let members: BTreeSet<usize> = scc.iter().map(|n| g[*n]).collect();
        let Some(&start) = members.first() else {
            continue;
        };
        if members.len() == 1 && !succ[start].contains(&start) {
            continue;
        }
        cyclic = true;
        let cycle = shortest_cycle(start, &members, &succ);
        let names: Vec<&str> = cycle.iter().map(|&i| list[i].name).collect();
        let (a, b) = (cycle[0], cycle.get(1).copied().unwrap_or(cycle[0]));
        let Some((_, _, span)) = edges.iter().find(|(x, y, _)| *x == a && *y == b) else {
            continue;
        };
        let role = list[a]
            .refs
            .iter()
            .find(|(_, names)| names.iter().any(|(_, s)| s == span))
            .map_or("", |(r, _)| r);
        let help = if cycle.len() == 2 {
            "a stage cannot take its own output as input".to_string()
        } else {
            format!(
                "`{}` means each stage takes input from the next; remove one of these references",
                names.join(" -> ")
            )
        };
        cx.error_help(
            span,
            key_path(&["stages", list[a].name, role]),
            format!("dependency cycle: {}", names.join(" -> ")),
            Some(help),
        );
    }
    if cyclic {
        return None;
    }
    // Kahn's algorithm, smallest index (= name order) first.
    let mut pending: Vec<usize> = succ.iter().map(BTreeSet::len).collect();
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); list.len()];
    for (a, ups) in succ.iter().enumerate() {
        for &b in ups {
            downstream[b].push(a);
        }
    }
    let mut ready: BTreeSet<usize> = (0..list.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(list.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &downstream[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.insert(d);
            }
        }
    }
    (order.len() == list.len()).then_some(order)
}

/// The shortest path `start -> ... -> start` inside `members` (breadth-first, smallest names first).
fn shortest_cycle(start: usize, members: &BTreeSet<usize>, succ: &[BTreeSet<usize>]) -> Vec<usize> {
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &m in &succ[n] {
            if !members.contains(&m) {
                continue;
            }
            if m == start {
                let mut path = Vec::new();
                let mut cur = n;
                while cur != start {
                    path.push(cur);
                    match prev.get(&cur) {
                        Some(&p) => cur = p,
                        None => break,
                    }
                }
                path.push(start);
                path.reverse();
                path.push(start);
                return path;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    vec![start, start]
}
