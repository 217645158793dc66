//! The verified-token cache shared by workers: a token one worker verified costs the others
//! no signature check, under the same policy only, and every other check still runs.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::gate::SharedState;
use agentgate::ratelimit::{RateLimit, RateLimiter};
use agentgate::replay::{GuardError, ReplayGuard, ReplayScope, TokenId};
use agentgate::shared_cache::{bucket_name, contains, insert, CacheId};
use agentgate::{Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use std::collections::HashMap;
use std::sync::Mutex;

const NOW: i64 = 1_800_000_000;

/// Shared data as the filter keeps it: buckets by name.
#[derive(Default)]
struct Store(Mutex<HashMap<String, Vec<u8>>>);

impl ReplayGuard for Store {
    fn first_use(&self, _: ReplayScope<'_>, _: &TokenId, _: i64, _: i64) -> Result<bool, GuardError> {
        Ok(true)
    }
}

impl RateLimiter for Store {
    fn admit(&self, _: &str, _: &str, _: &RateLimit, _: i64) -> Result<Result<(), u64>, GuardError> {
        Ok(Ok(()))
    }
}

impl SharedState for Store {
    fn verified_elsewhere(&self, id: &CacheId, stamp: u64) -> bool {
        contains(self.0.lock().unwrap().get(&bucket_name(id)).map(Vec::as_slice), id, stamp)
    }

    fn record_verified(&self, id: &CacheId, stamp: u64) {
        let mut buckets = self.0.lock().unwrap();
        let name = bucket_name(id);
        if let Some(updated) = insert(buckets.get(&name).map(Vec::as_slice), id, stamp) {
            buckets.insert(name, updated);
        }
    }
}

fn worker(policy_json: &str) -> Gate {
    Gate::from_json(policy_json).unwrap_or_else(|e| panic!("{e}"))
}

fn get(gate: &Gate, store: &Store, token: &str, now: i64) -> Decision {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    let request = Request::new("GET", "/invoices/7", &headers, now);
    gate.evaluate_with(&request, store)
}

#[test]
fn a_token_verified_by_one_worker_costs_the_others_no_signature_check() {
    let signer = Signer::es256("es-1", 1);
    let json = policy(&signer.jwks(), &read_invoice_rule(), "enforce");
    let (first, second, store) = (worker(&json), worker(&json), Store::default());
    let token = signer.sign(&agent_claims("agent-7", "invoices:read", NOW));

    let verified = get(&first, &store, &token, NOW);
    assert!(verified.allowed && !verified.cache_hit && !verified.shared_cache_hit);
    let elsewhere = get(&second, &store, &token, NOW);
    assert!(elsewhere.allowed && elsewhere.shared_cache_hit, "the second worker found it in the shared cache");
    assert_eq!(elsewhere.audit.agent.as_deref(), Some("agent-7"), "claims are read again");
    assert!(get(&second, &store, &token, NOW).cache_hit, "then from its own cache");

    // Every other check still runs on a shared hit: expiry, rules.
    let third = worker(&json);
    let expired = get(&third, &store, &token, NOW + 3600);
    assert!(expired.shared_cache_hit);
    assert_eq!(expired.reason, Some(Reason::Expired));
    let no_scope = signer.sign(&agent_claims("agent-7", "invoices:write", NOW));
    get(&first, &store, &no_scope, NOW);
    let denied = get(&worker(&json), &store, &no_scope, NOW);
    assert_eq!((denied.shared_cache_hit, denied.reason), (true, Some(Reason::InsufficientScope)));
}

#[test]
fn another_policy_or_a_failed_token_is_never_a_shared_hit() {
    let signer = Signer::es256("es-1", 1);
    let json = policy(&signer.jwks(), &read_invoice_rule(), "enforce");
    let store = Store::default();
    let token = signer.sign(&agent_claims("agent-7", "invoices:read", NOW));
    get(&worker(&json), &store, &token, NOW);
    let reconfigured = worker(&json.replace("invoices:read", "invoices:list"));
    assert!(!get(&reconfigured, &store, &token, NOW).shared_cache_hit, "another policy verifies again");

    let forged = Signer::es256("es-1", 99).sign(&agent_claims("agent-7", "invoices:read", NOW));
    assert_eq!(get(&worker(&json), &store, &forged, NOW).reason, Some(Reason::BadSignature));
    let again = get(&worker(&json), &store, &forged, NOW);
    assert_eq!((again.shared_cache_hit, again.reason), (false, Some(Reason::BadSignature)), "failures are not shared");
}
