//! Remote keys (`jwks_uri`, `discovery`) in the release filter under the wasmtime host, with
//! a clock the test moves and callouts the test answers: first fetch, waiting requests,
//! rotation, outages and stale keys, garbage, and one fetch for all workers.

use agentgate_test_harness::host::{Host, HostError, HttpCall, Outcome, Process};
use agentgate_test_harness::tokens::{agent_claims, read_invoice_rule, Signer, AUDIENCE, ISSUER};
use serde_json::{json, Value};
use std::time::Duration;

const REFRESH: u64 = 60;
const MAX_STALE: u64 = 300;
const MIN_REFETCH: u64 = 10;

fn key_a() -> Signer {
    Signer::es256("key-a", 1)
}

fn key_b() -> Signer {
    Signer::es256("key-b", 2)
}

fn jwks(signers: &[&Signer]) -> Vec<u8> {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string().into_bytes()
}

fn remote_policy(source: Value) -> String {
    let mut provider = json!({
        "name": "corp-idp",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["ES256"],
        "cluster": "idp",
        "jwks_fetch": {
            "refresh_seconds": REFRESH, "max_stale_seconds": MAX_STALE, "min_refetch_seconds": MIN_REFETCH,
            "wait_ms": 1000, "max_bytes": 4096
        }
    });
    provider.as_object_mut().unwrap_or_else(|| panic!()).extend(source.as_object().cloned().unwrap_or_default());
    json!({"providers": [provider], "rules": read_invoice_rule()}).to_string()
}

fn policy() -> String {
    remote_policy(json!({"jwks_uri": "https://idp.example.com/keys.json"}))
}

fn get(host: &mut Host, signer: &Signer) -> Outcome {
    let token = signer.sign(&agent_claims("agent-7", "invoices:read", host.now()));
    let auth = format!("Bearer {token}");
    host.request(&[(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn only_call(host: &Host) -> HttpCall {
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls.into_iter().next().unwrap_or_else(|| panic!())
}

fn header<'a>(call: &'a HttpCall, name: &str) -> Option<&'a str> {
    call.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn last_reason(host: &Host) -> Value {
    host.logs()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("agentgate audit ").and_then(|j| serde_json::from_str::<Value>(j).ok()))
        .map_or(Value::Null, |record| record["reason"].clone())
}

fn tick(host: &mut Host) {
    host.tick().unwrap_or_else(|e| panic!("{e}"));
}

/// A host whose first fetch served `signers`.
fn started(signers: &[&Signer]) -> Host {
    let mut host = Host::new(&policy()).unwrap_or_else(|e| panic!("{e}"));
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 200, &jwks(signers)).unwrap_or_else(|e| panic!("{e}"));
    host
}

#[test]
fn keys_are_fetched_at_start_and_a_request_waits_for_them() {
    let mut host = Host::new(&policy()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.tick_period_ms(), 100);
    // A request before the first fetch is held, not refused.
    let Outcome::Paused { context } = get(&mut host, &key_a()) else { panic!("not held") };
    tick(&mut host);
    let call = only_call(&host);
    assert_eq!(call.upstream, "idp");
    assert_eq!(header(&call, ":path"), Some("/keys.json"));
    assert_eq!(header(&call, ":authority"), Some("idp.example.com"));
    host.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(200));
    assert_eq!(host.paused(), 0);
    assert_eq!(get(&mut host, &key_a()).status(), 200);
    assert_eq!(host.metric("agentgate.jwks.corp-idp.fetch_success"), Some(1));
    // Nothing more is fetched before the refresh period.
    tick(&mut host);
    assert!(host.pending_http_calls().is_empty());
    host.advance_clock(Duration::from_secs(REFRESH));
    tick(&mut host);
    assert_eq!(host.pending_http_calls().len(), 1, "refresh after refresh_seconds");
}

#[test]
fn a_rotated_key_is_fetched_while_the_request_waits() {
    let mut host = started(&[&key_a()]);
    let Outcome::Paused { context } = get(&mut host, &key_b()) else { panic!("not held") };
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 200, &jwks(&[&key_a(), &key_b()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(200));

    // Unknown kids cannot make the gateway hammer the identity provider: within
    // min_refetch_seconds of the last forced fetch, they are answered at once.
    let stranger = Signer::es256("key-c", 3);
    assert_eq!(get(&mut host, &stranger).status(), 401);
    assert_eq!(last_reason(&host), "unknown_kid");
    tick(&mut host);
    assert!(host.pending_http_calls().is_empty());

    host.advance_clock(Duration::from_secs(MIN_REFETCH));
    let outcome = get(&mut host, &stranger);
    let Outcome::Paused { context } = outcome else { panic!("not held: {outcome:?} {:?}", host.logs()) };
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 200, &jwks(&[&key_b()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(401));
    // key-a was dropped by the identity provider: its tokens stop working at once.
    assert_eq!(get(&mut host, &key_a()).status(), 401);
}

#[test]
fn an_outage_keeps_the_last_keys_until_max_stale_then_fails_closed() {
    let mut host = started(&[&key_a()]);
    host.advance_clock(Duration::from_secs(REFRESH));
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 503, b"maintenance").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.metric("agentgate.jwks.corp-idp.fetch_failure"), Some(1));
    assert!(host.logs().iter().any(|l| l.contains("key fetch failed: the identity provider answered 503")));
    assert_eq!(get(&mut host, &key_a()).status(), 200, "stale keys still verify");

    // Retries back off (1 s, 2 s, ...), each one failing.
    for _ in 0..3 {
        host.advance_clock(Duration::from_secs(5));
        tick(&mut host);
        let call = only_call(&host);
        host.fail_call(call.token).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(host.metric("agentgate.jwks.corp-idp.fetch_failure"), Some(4));
    assert_eq!(get(&mut host, &key_a()).status(), 200);

    host.advance_clock(Duration::from_secs(MAX_STALE - REFRESH - 15));
    let outcome = match get(&mut host, &key_a()) {
        Outcome::Paused { context } => {
            tick(&mut host);
            for call in host.pending_http_calls() {
                host.respond(call.token, 500, b"").unwrap_or_else(|e| panic!("{e}"));
            }
            host.outcome(context)
        }
        other => Some(other),
    };
    assert_eq!(outcome.map(|o| o.status()), Some(401));
    assert_eq!(last_reason(&host), "keys_unavailable");

    // The identity provider is back: so are its tokens.
    host.advance_clock(Duration::from_secs(MAX_STALE));
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get(&mut host, &key_a()).status(), 200);
}

#[test]
fn garbage_oversized_and_keyless_answers_are_survived() {
    let mut host = started(&[&key_a()]);
    let big = vec![b'x'; 5000];
    let answers: [&[u8]; 4] =
        [b"<html>oops</html>", &big, br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, b"{\"keys\": 7}"];
    for (i, body) in answers.iter().enumerate() {
        host.advance_clock(Duration::from_secs(REFRESH));
        tick(&mut host);
        let call = only_call(&host);
        host.respond(call.token, 200, body).unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(get(&mut host, &key_a()).status(), 200, "answer {i}: the last good keys stay");
    }
    assert_eq!(host.metric("agentgate.jwks.corp-idp.fetch_failure"), Some(4));
    let logs = host.logs().join("\n");
    assert!(logs.contains("the response exceeds 4096 bytes"), "{logs}");
    assert!(logs.contains("no usable signing key"), "{logs}");
}

#[test]
fn workers_of_one_proxy_fetch_once_and_share_the_keys() {
    let process = Process::new();
    let mut first = Host::in_process(&policy(), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Host::in_process(&policy(), &process).unwrap_or_else(|e| panic!("{e}"));
    // The waiting request fetches for its worker; the other worker's tick sees the lease.
    let Outcome::Paused { context } = get(&mut second, &key_a()) else { panic!("not held") };
    tick(&mut first);
    tick(&mut second);
    assert_eq!(first.pending_http_calls().len() + second.pending_http_calls().len(), 1, "one fetch");
    let call = only_call(&second);
    second.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.outcome(context).map(|o| o.status()), Some(200));
    // The first worker adopts the keys at its next tick, without fetching.
    tick(&mut first);
    assert!(first.pending_http_calls().is_empty());
    assert_eq!(get(&mut first, &key_a()).status(), 200);
}

#[test]
fn a_request_adopts_the_keys_another_worker_fetched_before_its_own_tick() {
    let process = Process::new();
    let mut first = Host::in_process(&policy(), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Host::in_process(&policy(), &process).unwrap_or_else(|e| panic!("{e}"));
    tick(&mut second);
    let call = only_call(&second);
    second.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    // The first worker has not ticked since: its request takes the keys from shared data,
    // neither refused nor held for a fetch of its own.
    assert_eq!(get(&mut first, &key_a()).status(), 200);
    assert!(first.pending_http_calls().is_empty(), "no fetch of its own");
}

#[test]
fn a_request_waits_no_longer_than_wait_ms() {
    let mut host = Host::new(&policy()).unwrap_or_else(|e| panic!("{e}"));
    let Outcome::Paused { context } = get(&mut host, &key_a()) else { panic!("not held") };
    // Its own callout is bounded by wait_ms: the host ends it then.
    let call = only_call(&host);
    assert_eq!(call.timeout_ms, 1000);
    host.fail_call(call.token).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(401));
    assert_eq!(last_reason(&host), "keys_unavailable");
}

#[test]
fn discovery_finds_the_jwks_through_openid_configuration() {
    let mut host = Host::new(&remote_policy(json!({"discovery": true}))).unwrap_or_else(|e| panic!("{e}"));
    tick(&mut host);
    let call = only_call(&host);
    assert_eq!(header(&call, ":path"), Some("/.well-known/openid-configuration"));
    let config = json!({"issuer": ISSUER, "jwks_uri": "https://idp.example.com/oauth2/v1/keys"});
    host.respond(call.token, 200, config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let call = only_call(&host);
    assert_eq!(header(&call, ":path"), Some("/oauth2/v1/keys"));
    host.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get(&mut host, &key_a()).status(), 200);
}

#[test]
fn a_provider_without_keys_fails_alone() {
    let inline = Signer::es256("inline-1", 7);
    let mut policy: Value = serde_json::from_str(&policy()).unwrap_or_default();
    let other = json!({
        "name": "partner", "issuer": "https://partner.example.com", "audiences": [AUDIENCE],
        "algorithms": ["ES256"], "jwks": inline.jwks()
    });
    if let Some(providers) = policy["providers"].as_array_mut() {
        providers.push(other);
    }
    let mut host = Host::new(&policy.to_string()).unwrap_or_else(|e| panic!("{e}"));
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 500, b"").unwrap_or_else(|e| panic!("{e}"));
    // The identity provider never answered: its tokens are refused (after one more try the
    // request waits for), the partner's are not.
    let Outcome::Paused { context } = get(&mut host, &key_a()) else { panic!("not held") };
    tick(&mut host);
    let call = only_call(&host);
    host.respond(call.token, 500, b"").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(401));
    assert_eq!(last_reason(&host), "keys_unavailable");
    let mut claims = agent_claims("partner-agent", "invoices:read", host.now());
    claims["iss"] = json!("https://partner.example.com");
    let auth = format!("Bearer {}", inline.sign(&claims));
    let outcome = host
        .request(&[(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.status(), 200);
}

#[test]
fn a_waiting_client_that_leaves_does_not_disturb_the_filter() {
    let mut host = Host::new(&policy()).unwrap_or_else(|e| panic!("{e}"));
    let Outcome::Paused { context } = get(&mut host, &key_a()) else { panic!("not held") };
    tick(&mut host);
    host.cancel(context).unwrap_or_else(|e| panic!("{e}"));
    let call = only_call(&host);
    host.respond(call.token, 200, &jwks(&[&key_a()])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context), None);
    assert_eq!(get(&mut host, &key_a()).status(), 200);
}

#[test]
fn a_host_without_timers_refuses_remote_keys_at_configure_time() {
    let inline = agentgate_test_harness::tokens::policy(&key_a().jwks(), &read_invoice_rule(), "enforce");
    let mut host = Host::new(&inline).unwrap_or_else(|e| panic!("{e}"));
    host.lack("proxy_set_tick_period_milliseconds");
    match host.reconfigure(&policy()) {
        Err(HostError::Refused { logs }) => {
            assert!(
                logs.iter().any(|l| l.contains("fetches its keys (jwks_uri or discovery), which needs timer ticks")),
                "{logs:?}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The policy in force keeps working.
    assert_eq!(get(&mut host, &key_a()).status(), 200);
}

#[test]
fn a_refused_reconfiguration_leaves_the_policy_in_force_ticking() {
    let mut host = Host::new(&policy()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.tick_period_ms(), 100);
    host.lack("peer_certificates");
    let mut bound: Value = serde_json::from_str(&policy()).unwrap_or_default();
    bound["rules"][0]["require"]["bind_mtls_peer"] = json!(true);
    assert!(matches!(host.reconfigure(&bound.to_string()), Err(HostError::Refused { .. })));
    assert_eq!(host.tick_period_ms(), 100, "the keys of the policy in force are still refreshed");
}
