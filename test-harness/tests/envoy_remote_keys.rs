//! Remote keys through the real Envoy 1.40: the filter fetches the JWKS from a test identity
//! provider on loopback (through the `idp` cluster) that the test rotates, breaks, slows
//! down and fills with garbage.

use agentgate_test_harness::envoy::Envoy;
use agentgate_test_harness::idp::{Behaviour, Idp};
use agentgate_test_harness::tokens::{agent_claims, now, read_invoice_rule, Signer, AUDIENCE, ISSUER};
use agentgate_test_harness::upstream::Upstream;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

struct Setup {
    envoy: Envoy,
    idp: Idp,
    _upstream: Upstream,
}

fn start(first: Behaviour, fetch: Value) -> Setup {
    let idp = Idp::start(first);
    let policy = json!({
        "providers": [{
            "name": "corp-idp",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["ES256"],
            "jwks_uri": format!("http://127.0.0.1:{}/keys", idp.port),
            "cluster": "idp",
            "jwks_fetch": fetch,
        }],
        "rules": read_invoice_rule(),
    });
    let upstream = Upstream::start();
    let envoy =
        Envoy::start_with_idp(&policy.to_string(), upstream.port, Some(idp.port)).unwrap_or_else(|e| panic!("{e}"));
    Setup { envoy, idp, _upstream: upstream }
}

fn status(envoy: &Envoy, signer: &Signer) -> u16 {
    let token = signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    envoy.get("/invoices/1", &[("authorization", &format!("Bearer {token}"))]).status
}

fn counter(envoy: &Envoy, name: &str) -> u64 {
    let stats = envoy.admin(&format!("/stats?filter={name}")).body;
    stats.lines().find_map(|l| l.rsplit_once(": ")?.1.parse().ok()).unwrap_or(0)
}

fn last_reason(envoy: &Envoy) -> Value {
    envoy.audit_records().last().map_or(Value::Null, |r| r["reason"].clone())
}

/// Polls `check` for up to `seconds`.
fn eventually(seconds: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn keys_are_fetched_at_start_and_a_rotated_key_is_accepted_without_restart() {
    let (a, b) = (Signer::es256("key-a", 1), Signer::es256("key-b", 2));
    let s = start(Behaviour::Serve(jwks(&[&a])), json!({"refresh_seconds": 300, "min_refetch_seconds": 1}));
    assert_eq!(status(&s.envoy, &a), 200, "{}", s.envoy.logs());
    assert!(s.idp.requests() >= 1);
    assert!(s.envoy.logs().contains("agentgate: provider corp-idp: fetched 1 signing keys"));

    // The identity provider rotates: the first token signed with the new key waits for a
    // refetch (at most one per min_refetch_seconds).
    std::thread::sleep(Duration::from_millis(1100));
    s.idp.set(Behaviour::Serve(jwks(&[&a, &b])));
    assert_eq!(status(&s.envoy, &b), 200, "{}", s.envoy.logs());
    assert_eq!(status(&s.envoy, &a), 200);
    assert_eq!(counter(&s.envoy, "agentgate.jwks.corp-idp.fetch_success"), 2);

    // A key nobody publishes is refused after the refetch.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(status(&s.envoy, &Signer::es256("key-x", 9)), 401);
    assert_eq!(last_reason(&s.envoy), "unknown_kid");
}

#[test]
fn an_outage_keeps_old_keys_until_max_stale_seconds_then_fails_closed() {
    let a = Signer::es256("key-a", 1);
    let s = start(
        Behaviour::Serve(jwks(&[&a])),
        json!({"refresh_seconds": 1, "max_stale_seconds": 4, "min_refetch_seconds": 1}),
    );
    assert_eq!(status(&s.envoy, &a), 200, "{}", s.envoy.logs());
    let fetched = Instant::now();
    s.idp.set(Behaviour::Fail(503));
    assert!(eventually(5, || counter(&s.envoy, "agentgate.jwks.corp-idp.fetch_failure") >= 1));
    if fetched.elapsed() < Duration::from_secs(3) {
        assert_eq!(status(&s.envoy, &a), 200, "stale keys keep working");
    }
    assert!(s.envoy.logs().contains("key fetch failed: the identity provider answered 503"));
    std::thread::sleep(Duration::from_secs(4).saturating_sub(fetched.elapsed()) + Duration::from_millis(200));
    assert_eq!(status(&s.envoy, &a), 401);
    assert_eq!(last_reason(&s.envoy), "keys_unavailable");

    // Back up: tokens work again at the next fetch.
    s.idp.set(Behaviour::Serve(jwks(&[&a])));
    assert!(eventually(5, || status(&s.envoy, &a) == 200), "{}", s.envoy.logs());
}

#[test]
fn garbage_and_slow_answers_are_survived() {
    let (a, b) = (Signer::es256("key-a", 1), Signer::es256("key-b", 2));
    let s = start(
        Behaviour::Serve(jwks(&[&a])),
        json!({"refresh_seconds": 1, "max_stale_seconds": 60, "timeout_ms": 500, "min_refetch_seconds": 1}),
    );
    let mut envoy = s.envoy;
    assert_eq!(status(&envoy, &a), 200, "{}", envoy.logs());
    s.idp.set(Behaviour::Garbage);
    assert!(eventually(5, || counter(&envoy, "agentgate.jwks.corp-idp.fetch_failure") >= 1));
    assert_eq!(status(&envoy, &a), 200);
    s.idp.set(Behaviour::Slow(Duration::from_secs(2), jwks(&[&a, &b])));
    assert!(eventually(6, || counter(&envoy, "agentgate.jwks.corp-idp.fetch_failure") >= 2));
    // Envoy ends a callout that times out with its own 504: the log says so, not that the
    // identity provider answered 504.
    assert!(
        envoy.logs().contains("no answer from the identity provider: request timed out (the proxy's own 504)"),
        "{}",
        envoy.logs()
    );
    assert_eq!(status(&envoy, &a), 200);
    assert!(envoy.is_running());
    s.idp.set(Behaviour::Serve(jwks(&[&a, &b])));
    assert!(eventually(5, || status(&envoy, &b) == 200), "{}", envoy.logs());
}
