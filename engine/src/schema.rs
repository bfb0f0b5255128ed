//! JSON Schema (draft 2020-12) of pipeline files, generated from the raw `[pipeline]` struct and
//! the registered stage kinds, for editors (taplo / Even Better TOML `#:schema` comments) and the
//! generated docs. The schema checks shape only; `pipe check` remains the authority (it also
//! checks references, cycles, `check` rules and environment variables).

use schemars::SchemaGenerator;
use schemars::generate::SchemaSettings;
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
    let executor = generator.subschema_for::<crate::config::ExecutorTable>().to_value();
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
            "executor": executor,
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
    let many = spec.arity.is_many();
    let what = match (&spec.source, many) {
        (InputSource::Stage { kinds: [] }, false) => "The name of another stage.".to_string(),
        (InputSource::Stage { kinds: [] }, true) => "Names of other stages.".to_string(),
        (InputSource::Stage { kinds }, _) => {
            let kinds: Vec<String> = kinds.iter().map(|k| format!("`{k}`")).collect();
            let of = if many { "Names of stages" } else { "The name of a stage" };
            format!("{of} of kind {}.", kinds.join(" or "))
        }
        (InputSource::Path, _) => {
            let of = if many { "Paths" } else { "A path" };
            format!(
                "{of} outside the datastore; `${{VAR}}` and `~/` are expanded, relative paths start at this file."
            )
        }
    };
    let description = if spec.doc.is_empty() { what } else { format!("{} {what}", spec.doc) };
    match spec.arity {
        Arity::One | Arity::Optional => json!({ "description": description, "type": "string" }),
        Arity::Many | Arity::OptionalMany => json!({
            "description": description,
            "anyOf": [
                { "type": "string" },
                {
                    "type": "array",
                    "items": { "type": "string" },
                    "minItems": if spec.arity == Arity::Many { 1 } else { 0 },
                },
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::tests::kinds;

    /// Just enough of JSON Schema to check the generated schema against example documents:
    /// type, const, properties, required, additionalProperties, items, minItems, oneOf, anyOf,
    /// minimum, maxLength and local `$ref`s. Returns the first violation.
    fn validate(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let Some(s) = schema.as_object() else {
            return if schema == &Value::Bool(false) { Err(format!("{at}: not allowed")) } else { Ok(()) };
        };
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.strip_prefix("#/$defs/").ok_or(format!("{at}: non-local $ref {r}"))?;
            validate(root, &root["$defs"][name], v, at)?;
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            let ok = types.iter().any(|t| match *t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "null" => v.is_null(),
                _ => false,
            });
            if !ok {
                return Err(format!("{at}: expected {t}, found {v}"));
            }
        }
        if let Some(c) = s.get("const")
            && c != v
        {
            return Err(format!("{at}: expected {c}"));
        }
        if let (Some(min), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64())
            && x < min
        {
            return Err(format!("{at}: {x} < {min}"));
        }
        if let (Some(max), Some(x)) = (s.get("maxLength").and_then(Value::as_u64), v.as_str())
            && x.chars().count() as u64 > max
        {
            return Err(format!("{at}: too long"));
        }
        if let (Some(min), Some(a)) = (s.get("minItems").and_then(Value::as_u64), v.as_array())
            && (a.len() as u64) < min
        {
            return Err(format!("{at}: too few items"));
        }
        if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
            for (i, x) in a.iter().enumerate() {
                validate(root, items, x, &format!("{at}/{i}"))?;
            }
        }
        if let Some(o) = v.as_object() {
            let props = s.get("properties").and_then(Value::as_object);
            for req in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                let req = req.as_str().unwrap_or_default();
                if !o.contains_key(req) {
                    return Err(format!("{at}: missing {req}"));
                }
            }
            for (k, x) in o {
                let here = format!("{at}/{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(p) => validate(root, p, x, &here)?,
                    None => {
                        if let Some(extra) = s.get("additionalProperties") {
                            validate(root, extra, x, &here)?;
                        }
                    }
                }
            }
        }
        if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
            let n = one.iter().filter(|x| validate(root, x, v, at).is_ok()).count();
            if n != 1 {
                return Err(format!("{at}: matches {n} of oneOf"));
            }
        }
        if let Some(any) = s.get("anyOf").and_then(Value::as_array)
            && !any.iter().any(|x| validate(root, x, v, at).is_ok())
        {
            return Err(format!("{at}: matches none of anyOf"));
        }
        Ok(())
    }

    fn check(toml_text: &str) -> Result<(), String> {
        let schema = pipeline_schema(&kinds::registry());
        let doc: toml::Table = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        let doc = serde_json::to_value(doc).map_err(|e| e.to_string())?;
        validate(&schema, &schema, &doc, "")
    }

    #[test]
    fn schema_snapshot() {
        insta::assert_snapshot!(pipeline_schema_string(&kinds::registry()));
    }

    #[test]
    fn deterministic() {
        let r = kinds::registry();
        assert_eq!(pipeline_schema_string(&r), pipeline_schema_string(&r));
        assert!(pipeline_schema_string(&r).ends_with("}\n"));
    }

    #[test]
    fn stage_shapes() {
        let s = pipeline_schema(&kinds::registry());
        assert_eq!(s["$schema"], DRAFT);
        assert_eq!(s["properties"]["pipeline"], json!({"$ref": "#/$defs/PipelineHeader"}));
        assert_eq!(s["$defs"]["PipelineHeader"]["additionalProperties"], false);
        let kinds = s["properties"]["stages"]["additionalProperties"]["oneOf"].as_array().expect("oneOf");
        let names: Vec<&str> = kinds.iter().filter_map(|k| k["title"].as_str()).collect();
        assert_eq!(names, ["bundle", "sink", "source", "train"]);
        let train = &kinds[3];
        assert_eq!(train["description"], "Trains on the rows of sources.");
        assert_eq!(train["properties"]["kind"]["const"], "train");
        assert_eq!(train["required"], json!(["activations", "k", "kind"]));
        assert_eq!(train["additionalProperties"], false);
        assert!(train["properties"]["activations"]["anyOf"].is_array());
        assert_eq!(kinds[1]["required"], json!(["kind"]));
        assert_eq!(kinds[1]["properties"]["from"]["type"], "string");
        // Nested parameter types are hoisted to the root `$defs`.
        assert_eq!(kinds[1]["properties"]["opt"]["$ref"], "#/$defs/Opt");
        assert!(s["$defs"]["Opt"].is_object());
        assert_eq!(pipeline_schema(&Registry::new())["properties"]["stages"]["additionalProperties"], false);
    }

    #[test]
    fn examples_validate() {
        let valid = r#"
            [pipeline]
            name = "tiny"
            datastore = "${SCRATCH}/ds"
            [stages.web]
            kind = "source"
            data = "${DATA}/web.jsonl"
            seed = 1
            [stages.train]
            kind = "train"
            activations = ["web"]
            k = 3
            [stages.out]
            kind = "sink"
            from = "train"
            opt = { beta = 0.5 }
            [stages.b]
            kind = "bundle"
            files = "a"
        "#;
        assert_eq!(check(valid), Ok(()));
        let invalid = [
            ("[pipeline]\nname = \"x\"\nnope = 1\n", "/pipeline/nope: not allowed"),
            ("[pipeline]\ndescription = \"x\"\n", "/pipeline: missing name"),
            ("[stages.a]\nkind = \"sink\"\n", ": missing pipeline"),
            ("[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"trian\"\n", "/stages/a: matches 0 of oneOf"),
            (
                "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"train\"\nk = 1\n",
                "/stages/a: matches 0 of oneOf",
            ),
            (
                "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\nlabel = 1\n",
                "/stages/a: matches 0 of oneOf",
            ),
            (
                "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"bundle\"\nfiles = []\n",
                "/stages/a: matches 0 of oneOf",
            ),
            (
                "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"sink\"\nextra = 1\n",
                "/stages/a: matches 0 of oneOf",
            ),
        ];
        for (text, expected) in invalid {
            assert_eq!(check(text), Err(expected.to_string()), "{text}");
        }
    }
}
