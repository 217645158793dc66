//! Behavioural quarantine through the gate: an agent that strays is cut off everywhere for
//! the cool-off; garbage in its name never counts; a policy update releases it.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::gate::SharedState;
use agentgate::quarantine::{ConductStore, Update};
use agentgate::ratelimit::{RateLimit, RateLimiter};
use agentgate::replay::{GuardError, ReplayGuard, ReplayScope, TokenId};
use agentgate::{Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;

const NOW: i64 = 1_800_000_000;

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn policy_json(edit: impl FnOnce(&mut Value)) -> String {
    let rules = json!([
        {"name": "read", "match": {"methods": ["GET"], "path": "/invoices/{id}"},
         "require": {"task": {"type": "invoice", "actions": ["read"], "identifier": "{id}"}}},
        {"name": "pay", "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"},
         "require": {"max_recent_denials": 0}},
    ]);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap();
    p["quarantine"] = json!({"window_seconds": 60, "max_denials": 3, "cool_off_seconds": 900});
    edit(&mut p);
    p.to_string()
}

fn token(sub: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut c = agent_claims(sub, "", NOW);
    c["exp"] = json!(NOW + 3600);
    c["authorization_details"] = json!([{"type": "invoice", "actions": ["read"], "identifier": "42"}]);
    edit(&mut c);
    signer().sign(&c)
}

fn call(gate: &Gate, state: Option<&dyn SharedState>, method: &str, path: &str, token: &str, now: i64) -> Decision {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    let request = Request::new(method, path, &headers, now);
    match state {
        Some(state) => gate.evaluate_with(&request, state),
        None => gate.evaluate(&request),
    }
}

#[test]
fn an_agent_that_strays_is_cut_off_for_the_cool_off_and_only_then() {
    let gate = Gate::from_json(&policy_json(|_| {})).unwrap();
    let t = token("agent-7", |_| {});
    assert!(call(&gate, None, "GET", "/invoices/42", &t, NOW).allowed);
    assert!(call(&gate, None, "GET", "/invoices/43", &t, NOW + 1).quarantine.is_none());
    assert!(call(&gate, None, "GET", "/invoices/44", &t, NOW + 2).quarantine.is_none());
    // A risky rule already refuses an agent with recent denials.
    assert_eq!(call(&gate, None, "POST", "/invoices/42/pay", &t, NOW + 3).reason, Some(Reason::RecentDenials));
    let third = call(&gate, None, "GET", "/invoices/45", &t, NOW + 4);
    let event = third.quarantine.clone().expect("the third counted denial quarantines");
    assert_eq!((event.agent.as_str(), event.until, event.denials), ("agent-7", NOW + 904, 3));
    assert!(event.to_json().contains(r#""task_mismatch":3"#), "{}", event.to_json());
    // Every request of the agent, any token, any rule, is now refused.
    let fresh = token("agent-7", |c| c["jti"] = json!("new-token"));
    for (method, path, t) in [("GET", "/invoices/42", &t), ("GET", "/invoices/42", &fresh)] {
        let d = call(&gate, None, method, path, t, NOW + 10);
        assert_eq!((d.reason, d.audit.reason), (Some(Reason::Quarantined), Some("quarantined")));
    }
    // ... also where it acts for someone else, and only it.
    let acting = token("alice", |c| c["act"] = json!({"sub": "agent-7"}));
    assert_eq!(call(&gate, None, "GET", "/invoices/42", &acting, NOW + 10).reason, Some(Reason::Quarantined));
    assert!(call(&gate, None, "GET", "/invoices/42", &token("agent-8", |_| {}), NOW + 10).allowed);
    assert!(call(&gate, None, "GET", "/invoices/42", &fresh, NOW + 905).allowed, "the cool-off ended");
}

#[test]
fn garbage_in_a_victims_name_never_counts() {
    let gate = Gate::from_json(&policy_json(|_| {})).unwrap();
    let forged = Signer::es256("es-1", 99).sign(&agent_claims("victim", "", NOW));
    let expired = token("victim", |c| c["exp"] = json!(NOW - 600));
    for n in 0..20 {
        assert!(call(&gate, None, "GET", "/invoices/43", &forged, NOW + n).quarantine.is_none());
        assert!(call(&gate, None, "GET", "/invoices/43", &expired, NOW + n).quarantine.is_none());
    }
    assert!(call(&gate, None, "GET", "/invoices/42", &token("victim", |_| {}), NOW + 30).allowed);
}

#[test]
fn a_policy_update_releases_and_dry_run_blocks_nothing() {
    let first = Gate::from_json(&policy_json(|_| {})).unwrap();
    let t = token("agent-7", |_| {});
    for n in 0..3 {
        call(&first, None, "GET", "/invoices/43", &t, NOW + n);
    }
    assert_eq!(call(&first, None, "GET", "/invoices/42", &t, NOW + 5).reason, Some(Reason::Quarantined));
    let mut released = Gate::from_json(&policy_json(|p| p["quarantine"]["release"] = json!(["agent-7"]))).unwrap();
    released.inherit_state(&first);
    assert!(call(&released, None, "GET", "/invoices/42", &t, NOW + 6).allowed, "released at once");

    let dry = Gate::from_json(&policy_json(|p| p["mode"] = json!("dry_run"))).unwrap();
    let events: Vec<bool> =
        (0..4).map(|n| call(&dry, None, "GET", "/invoices/43", &t, NOW + n).quarantine.is_some()).collect();
    assert_eq!(events, [false, false, true, false], "computed and logged in dry run");
    let d = call(&dry, None, "GET", "/invoices/42", &t, NOW + 10);
    assert_eq!((d.reason, d.dry_run, d.allowed), (Some(Reason::Quarantined), true, false));
    assert!(matches!(d.action, agentgate::Action::Continue { .. }), "dry run blocks nothing");
}

/// Two workers of one proxy: shared data as a map.
#[derive(Default)]
struct Shared(Mutex<HashMap<String, Vec<u8>>>);

impl ReplayGuard for Shared {
    fn first_use(&self, _: ReplayScope<'_>, _: &TokenId, _: i64, _: i64) -> Result<bool, GuardError> {
        Ok(true)
    }
}

impl RateLimiter for Shared {
    fn admit(&self, _: &str, _: &str, _: &RateLimit, _: i64) -> Result<Result<(), u64>, GuardError> {
        Ok(Ok(()))
    }
}

impl ConductStore for Shared {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>, GuardError> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }

    fn update(&self, key: &str, update: &Update<'_>) -> Result<(), GuardError> {
        let mut map = self.0.lock().unwrap();
        if let Some(new) = update(map.get(key).map(Vec::as_slice)) {
            map.insert(key.to_string(), new);
        }
        Ok(())
    }
}

impl SharedState for Shared {
    fn conduct(&self) -> Option<&dyn ConductStore> {
        Some(self)
    }
}

#[test]
fn denials_on_two_workers_add_up() {
    let json = policy_json(|_| {});
    let (a, b, shared) = (Gate::from_json(&json).unwrap(), Gate::from_json(&json).unwrap(), Shared::default());
    let t = token("agent-7", |_| {});
    call(&a, Some(&shared), "GET", "/invoices/43", &t, NOW);
    call(&b, Some(&shared), "GET", "/invoices/44", &t, NOW + 1);
    assert!(call(&a, Some(&shared), "GET", "/invoices/45", &t, NOW + 2).quarantine.is_some());
    assert_eq!(call(&b, Some(&shared), "GET", "/invoices/42", &t, NOW + 3).reason, Some(Reason::Quarantined));
}

#[test]
fn only_reasons_of_verified_tokens_may_count() {
    let refused =
        Gate::from_json(&policy_json(|p| p["quarantine"]["count"] = json!(["task_mismatch", "bad_signature"])));
    let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.starts_with("quarantine.count[1]: \"bad_signature\" is not a reason given after a token verified"),
        "{error}"
    );
    let no_quarantine = Gate::from_json(&policy_json(|p| {
        p.as_object_mut().unwrap().remove("quarantine");
    }));
    assert!(no_quarantine.is_err_and(|e| e.to_string().starts_with("rules[1].require.max_recent_denials")));
}
