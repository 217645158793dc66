//! What a decision leaves behind: upstream audit headers (prefix, delegation chain, task),
//! pseudonymized subjects, the audit record's fields, and the access-log fields.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Decision, Gate, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;
const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn pay_rule() -> Value {
    json!([{
        "name": "pay-invoice",
        "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"},
        "require": {"task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{id}"}}
    }])
}

fn gate(audit: Value) -> Gate {
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &pay_rule(), "enforce")).unwrap();
    p["audit"] = audit;
    p["token_sources"] = json!([{"header": "authorization", "prefix": "Bearer "}, {"query": "access_token"}]);
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

/// A token of agent `billing` acting for alice through an orchestrator, tasked to pay invoice 42.
fn delegated_token() -> String {
    let mut c = agent_claims("alice", "", NOW);
    c["act"] = json!({"sub": "billing", "act": {"sub": "orchestrator,eu"}});
    c["authorization_details"] = json!([{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]);
    signer().sign(&c)
}

fn eval(gate: &Gate, path: &str, headers: &[(&str, &str)]) -> Decision {
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    gate.evaluate(&Request { source: Some("203.0.113.9:5123"), ..Request::new("POST", path, &headers, NOW) })
}

fn pay(gate: &Gate, invoice: &str, token: &str) -> Decision {
    let bearer = format!("Bearer {token}");
    eval(gate, &format!("/invoices/{invoice}/pay"), &[("authorization", &bearer), ("x-request-id", "req-9")])
}

fn upstream(d: &Decision) -> Vec<(String, String)> {
    match &d.action {
        Action::Continue { set, .. } => set.clone(),
        other => panic!("not forwarded: {other:?}"),
    }
}

fn header<'a>(set: &'a [(String, String)], name: &str) -> Option<&'a str> {
    set.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn upstream_learns_agent_principal_chain_task_rule_and_audit_id() {
    let d = pay(&gate(json!({})), "42", &delegated_token());
    let set = upstream(&d);
    assert_eq!(header(&set, "x-agent-decision"), Some("allow"));
    assert_eq!(header(&set, "x-agent-id"), Some("billing"));
    assert_eq!(header(&set, "x-agent-on-behalf-of"), Some("alice"));
    // Current actor first; a comma inside an identifier cannot fake a chain link.
    assert_eq!(header(&set, "x-agent-delegation-chain"), Some("billing,orchestrator%2Ceu"));
    assert_eq!(header(&set, "x-agent-task-type"), Some("invoice_processing"));
    assert_eq!(header(&set, "x-agent-task-id"), Some("42"));
    assert_eq!(header(&set, "x-agent-rule"), Some("pay-invoice"));
    assert_eq!(header(&set, "x-agent-audit-id"), Some("req-9"));
}

#[test]
fn the_record_holds_who_what_where_and_never_the_token() {
    let token = delegated_token();
    let d = pay(&gate(json!({})), "42", &token);
    let record: Value = serde_json::from_str(&d.audit.to_json()).unwrap();
    assert_eq!(record["agent"], "billing");
    assert_eq!(record["on_behalf_of"], "alice");
    assert_eq!(record["actors"], json!(["billing", "orchestrator,eu"]));
    assert_eq!(record["task_type"], "invoice_processing");
    assert_eq!(record["task_identifier"], "42");
    assert_eq!(record["source"], "203.0.113.9:5123");
    assert_eq!(record["audit_id"], "req-9");
    let json = d.audit.to_json();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!json.contains(&token) && !json.contains(signature), "{json}");

    let denied = pay(&gate(json!({})), "43", &token);
    assert_eq!(denied.audit.decision, "deny");
    assert_eq!(denied.audit.reason, Some("task_mismatch"));
    assert_eq!(denied.audit.status, Some(403));
    assert_eq!(denied.audit.task_type.as_deref(), Some("invoice_processing"));
}

#[test]
fn a_custom_prefix_names_every_header_and_removes_forgeries_under_it() {
    let g = gate(json!({"header_prefix": "x-gw-"}));
    let bearer = format!("Bearer {}", delegated_token());
    let d = eval(&g, "/invoices/42/pay", &[("authorization", &bearer), ("x-gw-id", "root"), ("x-agent-id", "kept")]);
    match &d.action {
        Action::Continue { remove, set } => {
            assert!(remove.contains(&"x-gw-id".to_string()) && !remove.contains(&"x-agent-id".to_string()));
            assert_eq!(header(set, "x-gw-id"), Some("billing"));
            assert_eq!(header(set, "x-gw-delegation-chain"), Some("billing,orchestrator%2Ceu"));
            assert!(set.iter().all(|(n, _)| n.starts_with("x-gw-")), "{set:?}");
        }
        other => panic!("{other:?}"),
    }
    let denied = eval(&g, "/invoices/42/pay", &[("x-request-id", "req-1")]);
    match &denied.action {
        Action::Respond { headers, .. } => assert_eq!(header(headers, "x-gw-audit-id"), Some("req-1")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pseudonymization_replaces_every_subject_with_a_keyed_hmac() {
    let g = gate(json!({"pseudonymize_key": KEY}));
    let d = pay(&g, "42", &delegated_token());
    let pseudonym = |s: &str| agentgate::audit::Pseudonymizer::new(KEY.as_bytes()).unwrap().pseudonym(s);
    let set = upstream(&d);
    assert_eq!(header(&set, "x-agent-id"), Some(pseudonym("billing").as_str()));
    assert_eq!(header(&set, "x-agent-on-behalf-of"), Some(pseudonym("alice").as_str()));
    let chain = format!("{},{}", pseudonym("billing"), pseudonym("orchestrator,eu"));
    assert_eq!(header(&set, "x-agent-delegation-chain"), Some(chain.as_str()));
    let json = d.audit.to_json();
    for subject in ["\"alice\"", "\"billing\"", "orchestrator"] {
        assert!(!json.contains(subject), "{subject} in {json}");
    }
    assert_eq!(d.audit.on_behalf_of, Some(pseudonym("alice")));
    // Rules still see the real identities: the task check passed, the rule is named.
    assert_eq!(d.audit.rule.as_deref(), Some("pay-invoice"));
}

#[test]
fn query_strings_are_logged_only_when_asked_and_never_with_the_token() {
    let token = delegated_token();
    let path = format!("/invoices/42/pay?access_token={token}&page=2");
    let quiet = eval(&gate(json!({})), &path, &[]);
    assert_eq!(quiet.audit.path, "/invoices/42/pay");
    let logged = eval(&gate(json!({"log_query": true})), &path, &[]);
    assert!(logged.allowed);
    assert_eq!(logged.audit.path, "/invoices/42/pay?page=2");
}

#[test]
fn access_log_fields_name_decision_rule_and_agent() {
    let d = pay(&gate(json!({})), "43", &delegated_token());
    let fields = d.audit.log_fields();
    let has = |name: &str, value: &str| fields.iter().any(|(n, v)| *n == name && v == value);
    assert!(has("decision", "deny"));
    assert!(has("reason", "task_mismatch"));
    assert!(has("rule", "pay-invoice"));
    assert!(has("agent", "billing"));
    let none = eval(&gate(json!({})), "/invoices/1/pay", &[]);
    assert_eq!(
        none.audit.log_fields(),
        vec![("decision", "deny".to_string()), ("reason", "missing_token".to_string())]
    );
}

#[test]
fn audit_settings_are_checked() {
    let refused = |audit: Value| {
        let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &pay_rule(), "enforce")).unwrap();
        p["audit"] = audit;
        Gate::from_json(&p.to_string()).err().map(|e| e.to_string())
    };
    assert_eq!(
        refused(json!({"pseudonymize_key": "short"})).as_deref(),
        Some("audit.pseudonymize_key: must be at least 32 bytes (e.g. `openssl rand -hex 32`)")
    );
    assert_eq!(
        refused(json!({"header_prefix": "x-request-"})).as_deref(),
        Some("audit.header_prefix: \"x-request-\" would remove the client's \"x-request-id\" header")
    );
    assert!(refused(json!({"header_prefix": "X Bad"})).is_some_and(|e| e.starts_with("audit.header_prefix: ")));
    assert_eq!(refused(json!({"header_prefix": "x-gw-", "log_query": true, "filter_state": false})), None);
}
