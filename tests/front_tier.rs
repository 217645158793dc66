//! A fleet's front tier: the gate names the acting agent for consistent-hash routing and
//! decides nothing; the back tier, which holds the agent's state, decides.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Gate, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn front() -> Gate {
    let mut p: Value =
        serde_json::from_str(&policy(&Signer::es256("es-1", 1).jwks(), &read_invoice_rule(), "enforce")).unwrap();
    p["front_tier"] = json!({});
    Gate::from_json(&p.to_string()).unwrap()
}

fn route(gate: &Gate, headers: &[(&str, &str)]) -> (Vec<String>, Vec<(String, String)>) {
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let d = gate.evaluate(&Request::new("GET", "/x", &headers, NOW));
    assert!(d.allowed && d.reason.is_none(), "a front tier refuses nothing");
    match d.action {
        Action::Continue { remove, set } => (remove, set),
        Action::Respond { status, .. } => panic!("answered {status}"),
    }
}

#[test]
fn the_acting_agent_names_the_route_whatever_signed_the_token() {
    let g = front();
    let mut delegated = agent_claims("alice", "", NOW);
    delegated["act"] = json!({"sub": "agent-7"});
    // Signed by a key the policy does not trust: routing is not trust, the back tier refuses it.
    let token = Signer::es256("unknown", 42).sign(&delegated);
    let (remove, set) = route(&g, &[("authorization", &format!("Bearer {token}")), ("X-Agent-Route", "forged")]);
    assert_eq!(set, [("x-agent-route".to_string(), "agent-7".to_string())]);
    assert_eq!(remove, ["X-Agent-Route"], "a client cannot choose its instance");
    let plain = Signer::es256("es-1", 1).sign(&agent_claims("agent-8", "", NOW));
    assert_eq!(
        route(&g, &[("authorization", &format!("Bearer {plain}"))]).1,
        [("x-agent-route".into(), "agent-8".into())]
    );
    assert_eq!(route(&g, &[("authorization", "Bearer garbage")]).1, [], "no agent, no header: hashed anywhere");
    assert_eq!(route(&g, &[]).1, []);
}

#[test]
fn the_routing_header_is_checked() {
    let mut p: Value =
        serde_json::from_str(&policy(&Signer::es256("es-1", 1).jwks(), &read_invoice_rule(), "enforce")).unwrap();
    p["front_tier"] = json!({"routing_header": "X Route"});
    let e = Gate::from_json(&p.to_string()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.starts_with("front_tier.routing_header: must be a lower-case header name"), "{e}");
}
