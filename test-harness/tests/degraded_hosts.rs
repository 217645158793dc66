//! The release filter on hosts weaker than Envoy: the APISIX host model (no proxy-wasm clock,
//! ticks nor shared data; configured at the first request), and Envoy with host calls taken
//! away (no peer-certificate properties, no HTTP callouts, no clock). Same policy, same
//! decision where the host can carry it; a clear refusal where it cannot; never a dead VM.

use agentgate_test_harness::host::{Host, HostError, Outcome};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::eddsa("ed-1", 4)
}

fn inline_policy(edit: impl FnOnce(&mut Value)) -> String {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    edit(&mut p);
    p.to_string()
}

fn remote_policy() -> String {
    inline_policy(|p| {
        if let Some(provider) = p["providers"][0].as_object_mut() {
            provider.remove("jwks");
            provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys.json"));
            provider.insert("cluster".into(), json!("idp"));
        }
    })
}

fn get(host: &mut Host, token: &str) -> Outcome {
    let auth = format!("Bearer {token}");
    host.request(&[(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn token_at(host: &Host, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = agent_claims("agent-7", "invoices:read", host.now());
    edit(&mut claims);
    signer().sign(&claims)
}

fn refusal(result: Result<Host, HostError>) -> String {
    match result {
        Err(HostError::Refused { logs }) => logs.join("\n"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| "a running filter")),
    }
}

#[test]
fn on_apisix_the_wasi_clock_and_per_vm_state_carry_the_same_policy() {
    let single_use = inline_policy(|p| {
        p["providers"][0]["single_use"] = json!(true);
        // One use per worker VM: accepted where there is no shared data.
        p["providers"][0]["single_use_scope"] = json!("worker");
        p["providers"][0]["max_lifetime_seconds"] = json!(600);
        p["rules"][0]["rate_limit"] = json!({"requests": 3, "per_seconds": 60});
    });
    let mut host = Host::apisix(&single_use).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200);
    let logs = host.logs().join("\n");
    assert!(logs.contains("using the WASI clock"), "configured at the first request: {logs}");
    assert!(logs.contains("counted per worker VM"), "{logs}");
    assert!(!logs.contains("no metrics on this host"), "its metrics calls succeed: {logs}");

    assert_eq!(get(&mut host, &token).status(), 401, "single use holds in the VM");
    let expired = token_at(&host, |c| {
        c["jti"] = json!("old");
        c["exp"] = json!(c["iat"].as_i64().unwrap_or(0) - 120);
    });
    assert_eq!(get(&mut host, &expired).status(), 401, "lifetimes are checked on the WASI clock");
    for (n, status) in [(1, 200), (2, 200), (3, 429)] {
        let fresh = token_at(&host, |c| c["jti"] = json!(format!("t-{n}")));
        assert_eq!(get(&mut host, &fresh).status(), status, "request {n}: 3 a minute, one already used");
    }
}

#[test]
fn a_policy_that_fetches_keys_is_refused_where_the_host_cannot_fetch() {
    let lacking = ["proxy_set_tick_period_milliseconds", "proxy_get_shared_data", "proxy_set_shared_data"];
    let logs = refusal(Host::lacking(&remote_policy(), &lacking));
    assert!(logs.contains("provider \"corp-idp\" fetches its keys"), "{logs}");
    assert!(logs.contains("needs timer ticks and shared data"), "{logs}");
    assert!(logs.contains("inline (jwks)"), "says what to do instead: {logs}");
    assert!(!logs.contains("jwks_file"), "no gateway host reads files: {logs}");
}

#[test]
fn gateway_wide_single_use_is_refused_without_shared_data_and_names_the_way_out() {
    let single_use = inline_policy(|p| {
        p["providers"][0]["single_use"] = json!(true);
        p["providers"][0]["max_lifetime_seconds"] = json!(600);
    });
    let lacking = ["proxy_get_shared_data", "proxy_set_shared_data"];
    let logs = refusal(Host::lacking(&single_use, &lacking));
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("single_use_scope")).collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(lines[0].contains("\"single_use_scope\": \"worker\""), "{logs}");
    // With shared data the same policy runs, and the token is used once across workers.
    assert!(Host::new(&single_use).is_ok());
}

#[test]
fn a_host_that_refuses_callouts_fails_the_fetch_not_the_start() {
    // Callouts are not probed (Kong traps for good on one from on_configure): the first
    // fetch finds them missing, and the provider's tokens are refused.
    let mut host = Host::lacking(&remote_policy(), &["proxy_http_call"]).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 401);
    let logs = host.logs().join("\n");
    assert!(logs.contains("key fetch failed: cannot call upstream \"idp\""), "{logs}");
    assert!(logs.contains("\"reason\":\"keys_unavailable\""), "{logs}");
}

#[test]
fn mtls_binding_is_refused_on_a_host_without_peer_certificates() {
    let bound = inline_policy(|p| p["rules"][0]["require"]["bind_mtls_peer"] = json!(true));
    let logs = refusal(Host::lacking(&bound, &["peer_certificates"]));
    assert!(logs.contains("bind_mtls_peer"), "{logs}");
    assert!(logs.contains("no peer-certificate properties"), "{logs}");
    // The same host runs a policy that does not need them.
    let mut host = Host::lacking(&inline_policy(|_| {}), &["peer_certificates"]).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |_| {});
    assert_eq!(get(&mut host, &token).status(), 200);
}

#[test]
fn a_host_with_no_clock_at_all_is_refused() {
    let logs =
        refusal(Host::lacking(&inline_policy(|_| {}), &["proxy_get_current_time_nanoseconds", "clock_time_get"]));
    assert!(logs.contains("no clock"), "{logs}");
}

#[test]
fn losing_the_clock_after_configure_fails_closed_and_the_vm_lives_on() {
    let mut host = Host::new(&inline_policy(|_| {})).unwrap_or_else(|e| panic!("{e}"));
    let token = token_at(&host, |_| {});
    host.lack("proxy_get_current_time_nanoseconds");
    assert_eq!(get(&mut host, &token).status(), 200, "the WASI clock takes over");
    host.lack("clock_time_get");
    assert_eq!(get(&mut host, &token).status(), 500);
    assert_eq!(host.metric("agentgate.denied.host_error"), Some(1));
    host.lack("proxy_get_shared_data");
    host.lack("proxy_http_call");
    assert_eq!(get(&mut host, &token).status(), 500, "still answering");
}
