//! The checked-in JSON Schema must equal what `pipe schema` generates from the registered stage
//! kinds. Regenerate with `UPDATE_SCHEMA=1 cargo test --test schema`.

#[test]
fn checked_in_schema_is_current() {
    let out = assert_cmd::cargo::cargo_bin_cmd!("pipe").arg("schema").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schemas/pipeline.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test schema` and commit it"
    );
    let v: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(v["type"], "object");
}
