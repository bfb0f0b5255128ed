//! JSON Schema (draft 2020-12) of pipeline files, generated from the raw `[pipeline]` struct and
//! the registered stage kinds, for editors (taplo / Even Better TOML `#:schema` comments) and the
//! generated docs. The schema checks shape only; `pipe check` remains the authority (it also
//! checks references, cycles, `check` rules and environment variables).

use schemars::generate::SchemaSettings;
use schemars::SchemaGenerator;
use serde_json::{Map, Value, json};

use crate::config::PipelineHeader;
use crate::stage::{Arity, DynStage, InputSource, InputSpec, Registry};

const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";
/// The rule of pipeline and stage names (they become folder names).
const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]*$";

/// The schema of a pipeline file whose stages are of the registry's kinds. Deterministic: every
/// object's keys are sorted and kinds come in name order.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let header = generator.subschema_for::<PipelineHeader>().to_value();
    let kinds: Vec<Value> = registry.kinds().map(|k| stage_schema(k, &mut generator)).collect();
    let defs: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    let stage = if kinds.is_empty() { Value::Bool(false) } else { json!({ "oneOf": kinds }) };
    let mut root = json!({
        "$schema": DRAFT,
        "title": "pipe pipeline",
        "description": "A pipe pipeline file: a `[pipeline]` table and one `[stages.<name>]` table per stage.",
        "type": "object",
        "properties": {
            "pipeline": header,
            "stages": {
                "description": "The stages, by name. A name becomes a folder name: letters, digits, `_`, `.`, `-`, starting with a letter or digit.",
                "type": "object",
                "propertyNames": { "pattern": NAME_PATTERN, "maxLength": 100 },
                "additionalProperties": stage,
            },
        },
        "required": ["pipeline"],
        "additionalProperties": false,
    });
    if !defs.is_empty()
        && let Some(obj) = root.as_object_mut()
    {
        obj.insert("$defs".into(), Value::Object(defs));
    }
    sorted(root)
}

/// [`pipeline_schema`] as pretty JSON with a trailing newline (the checked-in file's form).
pub fn pipeline_schema_string(registry: &Registry) -> String {
    let mut s = serde_json::to_string_pretty(&pipeline_schema(registry)).unwrap_or_default();
    s.push('\n');
    s
}

/// One stage kind: `kind` pinned, its inputs, its parameters; nothing else.
fn stage_schema(stage: &dyn DynStage, generator: &mut SchemaGenerator) -> Value {
    let params = stage.params_schema(generator).to_value();
    let params = params.as_object();
    let param_props = params.and_then(|p| p.get("properties")).and_then(Value::as_object);
    let param_required = params.and_then(|p| p.get("required")).and_then(Value::as_array);

    let mut props = Map::new();
    props.insert("kind".into(), json!({ "const": stage.kind(), "description": "The stage kind." }));
    let mut required = vec!["kind".to_string()];
    for spec in stage.inputs() {
        props.insert(spec.name.into(), input_schema(spec));
        if matches!(spec.arity, Arity::One | Arity::Many) {
            required.push(spec.name.into());
        }
    }
    for (k, v) in param_props.into_iter().flatten() {
        props.entry(k.clone()).or_insert_with(|| v.clone());
    }
    required.extend(param_required.into_iter().flatten().filter_map(Value::as_str).map(str::to_string));
    required.sort();
    required.dedup();
    json!({
        "title": stage.kind(),
        "description": stage.doc(),
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    })
}

fn input_schema(spec: &InputSpec) -> Value {
    let what = match spec.source {
        InputSource::Stage { kinds: [] } => "stage name".to_string(),
        InputSource::Stage { kinds } => format!("name of a stage of kind {}", kinds.join(" or ")),
        InputSource::Path => "path (`${VAR}` and `~/` are expanded; relative to this file)".to_string(),
    };
    let description = if spec.doc.is_empty() { what } else { format!("{} ({what})", spec.doc) };
    match spec.arity {
        Arity::One | Arity::Optional => json!({ "description": description, "type": "string" }),
        Arity::Many => json!({
            "description": description,
            "anyOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" }, "minItems": 1 },
            ],
        }),
    }
}

/// Rebuilds every object with sorted keys (a no-op unless serde_json's `preserve_order` is on).
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}
