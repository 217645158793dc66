//! The release filter in the in-process wasmtime host: the same .wasm Envoy loads, with a
//! clock the test moves. Time-dependent rules are tested here, deterministically.

use agentgate_test_harness::host::{Host, HostError, Outcome, Process};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};
use std::time::Duration;

fn signer() -> Signer {
    Signer::eddsa("ed-1", 4)
}

fn host() -> Host {
    Host::new(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_else(|e| panic!("{e}"))
}

fn get(host: &mut Host, token: &str) -> Outcome {
    let auth = format!("Bearer {token}");
    host.request(&[
        (":method", "GET"),
        (":path", "/invoices/7"),
        (":authority", "api"),
        ("authorization", &auth),
        ("x-request-id", "r-9"),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn token_at(host: &Host, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = agent_claims("agent-7", "invoices:read", host.now());
    edit(&mut claims);
    signer().sign(&claims)
}

fn last_audit(host: &Host) -> Value {
    host.logs()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("agentgate audit ").and_then(|j| serde_json::from_str(j).ok()))
        .unwrap_or(Value::Null)
}

#[test]
fn allowed_request_continues_with_audit_headers() {
    let mut host = host();
    let token = token_at(&host, |_| {});
    let outcome = get(&mut host, &token);
    assert_eq!(outcome.status(), 200);
    assert_eq!(outcome.header("x-agent-id"), Some("agent-7"));
    assert_eq!(outcome.header("x-agent-rule"), Some("read-invoice"));
    assert_eq!(outcome.header("x-agent-audit-id"), Some("r-9"));
    assert_eq!(host.metric("agentgate.allowed"), Some(1));
    assert_eq!(host.metric("agentgate.rule.read-invoice.allowed"), Some(1));
    assert_eq!(host.filter_state("agentgate.decision").as_deref(), Some("allow"));
    assert_eq!(host.filter_state("agentgate.rule").as_deref(), Some("read-invoice"));
    assert_eq!(host.filter_state("agentgate.agent").as_deref(), Some("agent-7"));
}

#[test]
fn filter_state_can_be_turned_off() {
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap();
    p["audit"] = json!({"filter_state": false});
    let mut host = Host::new(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200);
    assert_eq!(host.filter_state("agentgate.decision"), None);
    assert!(last_audit(&host)["decision"] == "allow", "the audit record is still written");
}

#[test]
fn expired_token_is_rejected_once_the_clock_passes_exp_and_skew() {
    let mut host = host();
    let token = token_at(&host, |c| c["exp"] = json!(c["iat"].as_i64().unwrap_or(0) + 60));
    assert_eq!(get(&mut host, &token).status(), 200);
    host.advance_clock(Duration::from_secs(60 + 29));
    assert_eq!(get(&mut host, &token).status(), 200, "within the 30 s skew");
    host.advance_clock(Duration::from_secs(2));
    let outcome = get(&mut host, &token);
    assert_eq!(outcome.status(), 401);
    assert!(outcome.header("www-authenticate").is_some_and(|c| c.contains("invalid_token")));
    assert_eq!(last_audit(&host)["reason"], "expired");
    assert_eq!(host.metric("agentgate.denied.expired"), Some(1));
}

#[test]
fn token_becomes_valid_at_nbf() {
    let mut host = host();
    let token = token_at(&host, |c| c["nbf"] = json!(c["iat"].as_i64().unwrap_or(0) + 120));
    assert_eq!(get(&mut host, &token).status(), 401);
    assert_eq!(last_audit(&host)["reason"], "not_yet_valid");
    host.advance_clock(Duration::from_secs(120 - 30));
    assert_eq!(get(&mut host, &token).status(), 200);
}

#[test]
fn bad_policy_is_refused_with_its_path() {
    let bad = policy(
        &signer().jwks(),
        &json!([{"name": "r", "match": {"methods": ["GET"], "path": "/a/{*x}/b"}}]),
        "enforce",
    );
    match Host::new(&bad) {
        Err(HostError::Refused { logs }) => {
            assert!(
                logs.iter()
                    .any(|l| l.starts_with("agentgate: invalid policy: rules[0].match.path: invalid path template")),
                "{logs:?}"
            );
        }
        other => panic!("expected refusal, got {:?}", other.map(|_| "a running filter")),
    }
}

#[test]
fn a_request_on_a_context_never_created_fails_closed() {
    let mut host = host();
    assert_eq!(host.request_on_unknown_context(), Ok(Some(500)));
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200, "and the VM goes on");
}

#[test]
fn worker_vms_of_one_process_share_their_counters() {
    let process = Process::new();
    let policy = policy(&signer().jwks(), &read_invoice_rule(), "enforce");
    let mut workers = [Host::in_process(&policy, &process), Host::in_process(&policy, &process)]
        .map(|h| h.unwrap_or_else(|e| panic!("{e}")));
    for worker in &mut workers {
        let outcome = worker.request(&[(":method", "GET"), (":path", "/invoices/1")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.status(), 401);
    }
    assert_eq!(process.metric("agentgate.denied.missing_token"), Some(2));
}

#[test]
fn jwks_file_is_refused_inside_the_gateway() {
    let mut p: Value =
        serde_json::from_str(&policy(&json!({"keys": []}), &read_invoice_rule(), "enforce")).unwrap_or_default();
    if let Some(provider) = p["providers"][0].as_object_mut() {
        provider.remove("jwks");
        provider.insert("jwks_file".into(), json!("/etc/keys.json"));
    }
    match Host::new(&p.to_string()) {
        Err(HostError::Refused { logs }) => {
            assert!(
                logs.iter()
                    .any(|l| l
                        .contains("providers[0].jwks_file: this host cannot read files: inline the keys with `jwks`")),
                "{logs:?}"
            )
        }
        other => panic!("expected refusal, got {:?}", other.map(|_| "a running filter")),
    }
}

#[test]
fn a_reused_token_is_a_cache_hit_and_still_expires() {
    let mut host = host();
    let token = token_at(&host, |c| c["exp"] = json!(c["iat"].as_i64().unwrap_or(0) + 100));
    for _ in 0..3 {
        assert_eq!(get(&mut host, &token).status(), 200);
    }
    assert_eq!(host.metric("agentgate.token_cache.miss"), Some(1));
    assert_eq!(host.metric("agentgate.token_cache.hit"), Some(2));
    host.advance_clock(Duration::from_secs(100 + 30));
    assert_eq!(get(&mut host, &token).status(), 401);
    assert_eq!(last_audit(&host)["reason"], "expired");
}

#[test]
fn a_single_use_token_used_on_one_worker_is_refused_on_another() {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    p["providers"][0]["max_lifetime_seconds"] = json!(600);
    let process = Process::new();
    let mut a = Host::in_process(&p.to_string(), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut b = Host::in_process(&p.to_string(), &process).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&a, |_| {});
    assert_eq!(get(&mut a, &token).status(), 200);
    assert_eq!(get(&mut b, &token).status(), 401);
    assert_eq!(last_audit(&b)["reason"], "replayed");
    assert_eq!(get(&mut a, &token).status(), 401, "and again on the first worker");
    let fresh = token_at(&b, |c| c["jti"] = json!("fresh"));
    assert_eq!(get(&mut b, &fresh).status(), 200);
}

#[test]
fn a_bucket_slot_is_reused_once_its_tokens_expired() {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    p["providers"][0]["max_lifetime_seconds"] = json!(60);
    let mut host = Host::new(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    // The ring of buckets is reused several times over: each new token is still accepted
    // once, and each replay still caught.
    for round in 0..5 {
        let token = token_at(&host, |c| c["exp"] = json!(c["iat"].as_i64().unwrap_or(0) + 60));
        assert_eq!(get(&mut host, &token).status(), 200, "round {round}");
        assert_eq!(get(&mut host, &token).status(), 401, "round {round}");
        host.advance_clock(Duration::from_secs(170));
    }
}

#[test]
fn workers_share_one_rate_limit_bucket() {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["rules"][0]["rate_limit"] = json!({"requests": 2, "per_seconds": 60});
    let process = Process::new();
    let mut a = Host::in_process(&p.to_string(), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut b = Host::in_process(&p.to_string(), &process).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&a, |_| {});
    assert_eq!(get(&mut a, &token).status(), 200);
    assert_eq!(get(&mut b, &token).status(), 200);
    let limited = get(&mut a, &token);
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.header("retry-after"), Some("30"));
    a.advance_clock(Duration::from_secs(30));
    assert_eq!(get(&mut a, &token).status(), 200, "one request refilled after 30 s");
}

#[test]
fn the_filter_reads_the_mtls_peer_from_the_host() {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["rules"][0]["require"]["bind_mtls_peer"] = json!(true);
    let mut host = Host::new(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |c| c["sub"] = json!("spiffe://corp.example/agent/a"));
    assert_eq!(get(&mut host, &token).status(), 403, "no client certificate");
    host.set_property("connection.uri_san_peer_certificate", b"spiffe://corp.example/agent/a");
    assert_eq!(get(&mut host, &token).status(), 200);
    host.set_property("connection.uri_san_peer_certificate", b"spiffe://corp.example/agent/b");
    assert_eq!(get(&mut host, &token).status(), 403);
}

#[test]
fn a_revocation_pushed_as_new_configuration_applies_at_once() {
    let mut host = host();
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200);
    let mut revoking: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    revoking["revoked"] = json!({"subjects": ["agent-7"]});
    host.reconfigure(&revoking.to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get(&mut host, &token).status(), 403);
    assert_eq!(last_audit(&host)["reason"], "revoked");
    // A broken update is refused and the policy in force stays in force.
    assert!(matches!(host.reconfigure("{\"rules\": []}"), Err(HostError::Refused { .. })));
    assert_eq!(get(&mut host, &token).status(), 403);
}

#[test]
fn the_default_build_refuses_es384_and_says_how_to_get_it() {
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap();
    p["providers"][0]["algorithms"] = json!(["EdDSA", "ES384"]);
    match Host::new(&p.to_string()) {
        Err(HostError::Refused { logs }) => assert!(
            logs.iter().any(|l| l.starts_with(
                "agentgate: invalid policy: providers[0].algorithms[1]: ES384 (P-384) is not in this build"
            ) && l.contains("make build FEATURES=es384")),
            "{logs:?}"
        ),
        other => panic!("expected refusal, got {:?}", other.map(|_| "a running filter")),
    }
}

#[test]
fn a_host_without_filter_state_costs_a_feature_not_the_vm() {
    let mut host = host();
    host.lack("proxy_set_property");
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200, "no filter state, same decision");
    assert_eq!(host.filter_state("agentgate.decision"), None);
}
