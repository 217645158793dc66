//! The committed JSON Schema is the one the config types generate.

#[test]
fn committed_schema_is_current() {
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../docs/policy.schema.json")).unwrap_or(serde_json::Value::Null);
    assert!(
        committed == agentgate::config::schema(),
        "docs/policy.schema.json is stale: run `cargo run -- schema > docs/policy.schema.json`"
    );
}

#[test]
fn schema_describes_the_contract_fields() {
    let schema = agentgate::config::schema().to_string();
    for field in ["max_delegation_depth", "acr_values", "single_use", "token_sources", "revoked", "task_claim"] {
        assert!(schema.contains(&format!("\"{field}\"")), "{field} missing from the schema");
    }
}
