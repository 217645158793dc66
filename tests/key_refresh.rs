//! Fetched keys: a refresh that brings the same JWKS keeps the verified tokens; a changed one
//! forgets them (a withdrawn key stops verifying at once). A token that failed after its
//! issuer chose the keys still names that issuer in the audit record.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::jwks::KeyRecord;
use agentgate::{Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer, ISSUER};
use serde_json::json;

const NOW: i64 = 1_800_000_000;

fn remote_gate() -> Gate {
    let mut p: serde_json::Value =
        serde_json::from_str(&policy(&json!({"keys": []}), &read_invoice_rule(), "enforce")).unwrap();
    let provider = p["providers"][0].as_object_mut().unwrap();
    provider.remove("jwks");
    provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys"));
    provider.insert("cluster".into(), json!("idp"));
    Gate::from_json(&p.to_string()).unwrap()
}

fn record(version: u64, jwks: &serde_json::Value) -> KeyRecord {
    KeyRecord { version, jwks: Some(jwks.to_string()), fetched_at: Some(NOW), ..KeyRecord::default() }
}

fn get(gate: &Gate, token: &str) -> Decision {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    gate.evaluate(&Request::new("GET", "/invoices/1", &headers, NOW))
}

#[test]
fn a_refresh_with_the_same_keys_keeps_verified_tokens_and_a_change_drops_them() {
    let (gate, es) = (remote_gate(), Signer::es256("es-1", 1));
    let token = es.sign(&agent_claims("agent-7", "invoices:read", NOW));
    assert_eq!(gate.install_keys(0, &record(1, &es.jwks())), Some(1));
    assert!(!get(&gate, &token).cache_hit);
    assert!(get(&gate, &token).cache_hit);
    assert_eq!(gate.install_keys(0, &record(2, &es.jwks())), Some(1), "a scheduled refresh, same document");
    assert!(get(&gate, &token).cache_hit, "no signature check again for nothing");
    let rotated = json!({"keys": [Signer::es256("es-2", 2).jwk()]});
    gate.install_keys(0, &record(3, &rotated));
    let after = get(&gate, &token);
    assert_eq!((after.cache_hit, after.reason), (false, Some(Reason::UnknownKid)), "the withdrawn key stops at once");
    assert_eq!(after.audit.issuer.as_deref(), Some(ISSUER), "the issuer that chose the keys is recorded");
}
