//! The filter's own logic on a mock host, natively: deciding, waiting for keys and being
//! answered in the request's own context, capabilities, and what a host's odd answers do.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::host::INTERNAL_FAILURE;
use crate::mock::Mock;
use crate::{Vm, CONTINUE, PAUSE};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

const ROOT: u32 = 1;
const NOW: u64 = 1_767_225_600;

fn signer() -> Signer {
    Signer::es256("k-1", 3)
}

fn inline_policy() -> String {
    policy(&signer().jwks(), &read_invoice_rule(), "enforce")
}

fn remote_policy(wait_ms: u64) -> String {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap();
    let provider = p["providers"][0].as_object_mut().unwrap();
    provider.remove("jwks");
    provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys.json"));
    provider.insert("cluster".into(), json!("idp"));
    provider.insert("jwks_fetch".into(), json!({"wait_ms": wait_ms, "min_refetch_seconds": 10}));
    p.to_string()
}

/// A VM configured with `policy` on the mock host, or the refusal's log lines.
fn vm(policy: &str, setup: impl FnOnce(&Mock)) -> Result<(Vm<Mock>, Mock), Vec<String>> {
    let mock = Mock::default();
    mock.state().now_nanos = NOW * 1_000_000_000;
    mock.state().config = policy.as_bytes().to_vec();
    setup(&mock);
    let vm = Vm::new(mock.clone());
    vm.on_context_create(ROOT, 0);
    if vm.on_vm_start(ROOT) && vm.on_configure(ROOT) {
        Ok((vm, mock))
    } else {
        Err(mock.state().logs.iter().map(|(_, l)| l.clone()).collect())
    }
}

fn started(policy: &str) -> (Vm<Mock>, Mock) {
    vm(policy, |_| {}).unwrap_or_else(|logs| panic!("{logs:?}"))
}

fn token() -> String {
    signer().sign(&agent_claims("agent-7", "invoices:read", NOW as i64))
}

fn headers(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [(":method", "GET"), (":path", "/invoices/7"), (":authority", "api")]
        .iter()
        .chain(extra)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Sends a request on context `id`; the action the filter returned.
fn request(vm: &Vm<Mock>, mock: &Mock, id: u32, headers: Vec<(String, String)>) -> u32 {
    {
        let mut state = mock.state();
        state.headers = Some(headers.clone());
        state.response = None;
        state.changes.clear();
    }
    vm.on_context_create(id, ROOT);
    let announced = headers.iter().filter(|(n, _)| !n.starts_with(':')).count();
    vm.on_request_headers(id, announced, true)
}

fn status(mock: &Mock) -> Option<u16> {
    mock.state().response.as_ref().map(|(s, _, _)| *s)
}

fn response_header(mock: &Mock, name: &str) -> Option<String> {
    let state = mock.state();
    let (_, headers, _) = state.response.as_ref()?;
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

#[test]
fn header_names_in_any_case_are_found_and_stripped() {
    let (vm, mock) = started(&inline_policy());
    let auth = format!("Bearer {}", token());
    let action = request(&vm, &mock, 2, headers(&[("Authorization", &auth), ("X-Agent-Id", "root")]));
    assert_eq!(action, CONTINUE, "{:?}", mock.state().logs);
    let changes = mock.state().changes.clone();
    assert!(changes.contains(&("authorization".into(), None)), "{changes:?}");
    assert!(changes.contains(&("x-agent-id".into(), Some("agent-7".into()))), "{changes:?}");
    assert!(!changes.contains(&("x-agent-id".into(), None)), "replaced in place, not removed: {changes:?}");
}

#[test]
fn an_audit_id_is_generated_when_the_host_gives_none() {
    let (vm, mock) = started(&inline_policy());
    assert_eq!(request(&vm, &mock, 2, headers(&[])), PAUSE);
    assert_eq!(status(&mock), Some(401));
    assert_eq!(response_header(&mock, "x-agent-audit-id").as_deref(), Some("abababababababababababababababab"));
    assert_eq!(request(&vm, &mock, 3, headers(&[("X-Request-Id", "r-1")])), PAUSE);
    assert_eq!(response_header(&mock, "x-agent-audit-id").as_deref(), Some("r-1"), "the client's id is kept");
}

#[test]
fn the_host_header_is_the_authority_where_the_host_sends_both() {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap();
    p["rules"][0]["match"]["hosts"] = json!(["api.example.com"]);
    let (vm, mock) = started(&p.to_string());
    let auth = format!("Bearer {}", token());
    let mut sent = headers(&[("Host", "api.example.com"), ("Authorization", &auth)]);
    sent.retain(|(n, _)| n != ":authority");
    sent.push((":authority".into(), "kong-server:8000".into()));
    assert_eq!(request(&vm, &mock, 2, sent), CONTINUE, "{:?}", mock.state().response);
}

#[test]
fn a_request_waiting_for_keys_fetches_them_itself_and_is_made_current_for_the_answer() {
    let (vm, mock) = started(&remote_policy(1000));
    let auth = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &auth)])), PAUSE);
    assert_eq!(status(&mock), None, "held, not answered");
    let (token_id, upstream, call_headers) = mock.state().calls.last().cloned().unwrap();
    assert_eq!(upstream, "idp");
    assert!(call_headers.contains(&(":path".into(), "/keys.json".into())));
    // The host answers on the root context: the request is made current, and only it.
    let body = signer().jwks().to_string().into_bytes();
    mock.state().call_response = Some((vec![(":status".into(), "200".into())], body.clone()));
    vm.on_http_call_response(ROOT, token_id, body.len());
    assert_eq!(mock.state().effective, vec![2]);
    assert_eq!(mock.state().continued, 1);
    // Keys are installed for the next request.
    assert_eq!(request(&vm, &mock, 4, headers(&[("authorization", &auth)])), CONTINUE);
    // An answer for a request that is gone makes nothing current.
    assert_eq!(request(&vm, &mock, 5, headers(&[("authorization", "Bearer x.y.z")])), PAUSE);
    vm.on_delete(5);
    vm.on_http_call_response(ROOT, 4242, 0);
    assert_eq!(mock.state().effective, vec![2]);
}

#[test]
fn the_body_of_a_request_waiting_for_keys_stays_buffered_until_its_decision() {
    let (vm, mock) = started(&remote_policy(1000));
    let auth = format!("Bearer {}", token());
    let with_body = headers(&[("authorization", &auth), ("content-length", "5")]);
    {
        let mut state = mock.state();
        state.headers = Some(with_body);
    }
    vm.on_context_create(2, ROOT);
    assert_eq!(vm.on_request_headers(2, 2, false), PAUSE, "waits for keys");
    // Envoy hands the body over while the headers are held: forwarding it would skip the decision.
    assert_eq!(vm.on_request_body(2, 5, true), PAUSE);
    let (token_id, _, _) = mock.state().calls.last().cloned().unwrap();
    let body = signer().jwks().to_string().into_bytes();
    mock.state().call_response = Some((vec![(":status".into(), "200".into())], body.clone()));
    vm.on_http_call_response(ROOT, token_id, body.len());
    assert_eq!(mock.state().continued, 1);
    assert_eq!(vm.on_request_body(2, 5, true), CONTINUE, "decided: the body passes");
}

#[test]
fn a_waiting_request_is_resumed_by_its_own_callout() {
    let (vm, mock) = started(&remote_policy(1000));
    let auth = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &auth)])), PAUSE);
    let (token_id, _, _) = mock.state().calls.last().cloned().unwrap();
    let body = signer().jwks().to_string().into_bytes();
    mock.state().call_response = Some((vec![(":status".into(), "200".into())], body.clone()));
    vm.on_http_call_response(2, token_id, body.len());
    assert_eq!(mock.state().continued, 1);
    assert_eq!(status(&mock), None);
}

#[test]
fn a_failed_fetch_fails_the_waiting_request_closed() {
    let (vm, mock) = started(&remote_policy(1000));
    let auth = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &auth)])), PAUSE);
    let (token_id, _, _) = mock.state().calls.last().cloned().unwrap();
    mock.state().call_response = None; // a timeout: no headers
    vm.on_http_call_response(2, token_id, 0);
    assert_eq!(mock.state().continued, 0);
    assert_eq!(status(&mock), Some(401));
    assert!(
        mock.state().logs.iter().any(|(_, m)| m.contains("\"reason\":\"keys_unavailable\"")),
        "{:?}",
        mock.state().logs
    );
}

#[test]
fn without_waiting_an_unknown_kid_still_triggers_an_early_refetch() {
    let (vm, mock) = started(&remote_policy(0));
    let auth = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &auth)])), PAUSE);
    assert!(status(&mock).is_some_and(|s| s >= 400), "answered at once");
    assert!(mock.state().calls.is_empty());
    vm.on_tick(ROOT);
    assert_eq!(mock.state().calls.len(), 1, "the next tick fetches early");
}

#[test]
fn configure_never_makes_a_callout() {
    let (_vm, mock) = started(&remote_policy(1000));
    assert!(mock.state().calls.is_empty());
    assert_eq!(mock.state().tick_ms, Some(100));
}

#[test]
fn mtls_binding_is_refused_where_the_peer_property_fails_and_asked_only_then() {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap();
    p["rules"][0]["require"]["bind_mtls_peer"] = json!(true);
    let failing = |m: &Mock| {
        m.state().properties.insert("connection.uri_san_peer_certificate".into(), Err(INTERNAL_FAILURE));
    };
    let logs = vm(&p.to_string(), failing).err().unwrap();
    let errors: Vec<&String> = logs.iter().filter(|l| l.contains("bind_mtls_peer")).collect();
    assert_eq!(errors.len(), 1, "{logs:?}");
    // A policy without it loads on the same host.
    assert!(vm(&inline_policy(), failing).is_ok());
}

#[test]
fn garbage_from_the_host_fails_closed() {
    let (vm, mock) = started(&inline_policy());
    mock.state().refuse.insert("clock", 10);
    assert_eq!(request(&vm, &mock, 2, headers(&[])), PAUSE);
    assert_eq!(status(&mock), Some(500));
    mock.state().refuse.clear();
    mock.state().headers = None;
    vm.on_context_create(3, ROOT);
    assert_eq!(vm.on_request_headers(3, 1, true), PAUSE);
    assert_eq!(status(&mock), Some(500));
    // A context the host never created.
    mock.state().response = None;
    assert_eq!(vm.on_request_headers(99, 0, true), PAUSE);
    assert_eq!(status(&mock), Some(500));
    // An answer to a callout the filter never made is ignored.
    vm.on_http_call_response(2, 4242, 10);
}

#[test]
fn on_nginx_a_repeated_stripped_header_or_hidden_headers_are_refused() {
    let (vm, mock) = started(&inline_policy());
    mock.state().properties.insert("ngx.nginx_version".into(), Ok(b"1.22.1".to_vec()));
    let auth = format!("Bearer {}", token());
    let twice = headers(&[("Authorization", &auth), ("x-agent-on-behalf-of", "a"), ("X-Agent-On-Behalf-Of", "b")]);
    assert_eq!(request(&vm, &mock, 2, twice), PAUSE);
    assert_eq!(status(&mock), Some(400));
    // The host said there are more headers than it passed.
    mock.state().headers = Some(headers(&[("Authorization", &auth)]));
    mock.state().response = None;
    vm.on_context_create(3, ROOT);
    assert_eq!(vm.on_request_headers(3, 101, true), PAUSE);
    assert_eq!(status(&mock), Some(431));
    // Once: emptied in place, then removed (nginx still forwards the name).
    assert_eq!(request(&vm, &mock, 4, headers(&[("Authorization", &auth), ("x-agent-on-behalf-of", "a")])), CONTINUE);
    let changes = mock.state().changes.clone();
    assert!(
        changes.starts_with(&[
            ("x-agent-on-behalf-of".into(), Some(String::new())),
            ("x-agent-on-behalf-of".into(), None)
        ]),
        "{changes:?}"
    );
}

/// A host that configures at a request (APISIX: no `proxy_on_vm_start`).
fn configured_at_request(policy: &str) -> (Vm<Mock>, Mock, bool) {
    let mock = Mock::default();
    mock.state().now_nanos = NOW * 1_000_000_000;
    mock.state().config = policy.as_bytes().to_vec();
    let vm = Vm::new(mock.clone());
    vm.on_context_create(ROOT, 0);
    let accepted = vm.on_configure(ROOT);
    (vm, mock, accepted)
}

#[test]
fn a_refusal_where_the_host_configures_at_a_request_is_logged_once_and_answered_503() {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap();
    p["rules"][0]["require"]["source_cidrs"] = json!(["10.0.0.0/8"]);
    let (vm, mock, accepted) = configured_at_request(&p.to_string());
    assert!(accepted, "kept, so that the host does not configure again per request");
    for id in 2..5 {
        assert_eq!(request(&vm, &mock, id, headers(&[])), PAUSE);
        assert_eq!(status(&mock), Some(503));
    }
    // The host asks again (a new root context for the same route): not logged again.
    vm.on_context_create(9, 0);
    assert!(vm.on_configure(9));
    let refusals = mock.state().logs.iter().filter(|(_, l)| l.contains("cannot run on this host")).count();
    assert_eq!(refusals, 1, "{:?}", mock.state().logs);
    // A policy it can run replaces it.
    mock.state().config = inline_policy().into_bytes();
    assert!(vm.on_configure(ROOT));
    assert_eq!(request(&vm, &mock, 10, headers(&[])), PAUSE);
    assert_eq!(status(&mock), Some(401));
}

#[test]
fn where_the_host_starts_the_vm_a_refusal_refuses_the_plugin_each_time() {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap();
    p["rules"][0]["require"]["source_cidrs"] = json!(["10.0.0.0/8"]);
    let (running, mock) = started(&inline_policy());
    mock.state().config = "{".into();
    assert!(!running.on_configure(ROOT));
    assert!(!running.on_configure(ROOT));
    assert_eq!(mock.state().logs.iter().filter(|(_, l)| l.contains("invalid policy")).count(), 2);
    // source_cidrs runs where the host starts the VM (Envoy gives source.address) ...
    assert!(vm(&p.to_string(), |_| {}).is_ok());
    // ... and is refused where it configures at a request (APISIX gives none).
    assert!(configured_at_request(&p.to_string()).2);
    let (_vm, mock, _) = configured_at_request(&p.to_string());
    assert!(mock.state().logs.iter().any(|(_, l)| l.contains("source_cidrs")), "{:?}", mock.state().logs);
}

#[test]
fn filter_state_stops_at_the_first_write_the_host_refuses() {
    let (vm, mock) = started(&inline_policy());
    mock.state().refuse.insert("set_property", 1);
    let auth = format!("Bearer {}", token());
    for id in 2..5 {
        assert_eq!(request(&vm, &mock, id, headers(&[("authorization", &auth)])), CONTINUE);
    }
    assert_eq!(mock.state().set.len(), 1, "one refused write, then none");
    let warned = mock.state().logs.iter().filter(|(_, l)| l.contains("keeps no filter state")).count();
    assert_eq!(warned, 1);
}

/// Envoy's `verify_signature` (natively, from the harness), counting its calls.
fn envoy_crypto(mock: &Mock) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&calls);
    mock.set_verify_signature(Some(std::sync::Arc::new(move |arguments: &[u8]| {
        counted.fetch_add(1, Ordering::SeqCst);
        agentgate_test_harness::foreign::verify_signature(arguments).map_err(|s| s as u32)
    })));
    calls
}

fn logged(mock: &Mock, text: &str) -> bool {
    mock.state().logs.iter().any(|(_, line)| line.contains(text))
}

#[test]
fn on_envoy_the_host_verifies_es256_and_rs256_once_its_probe_passed_and_kong_is_never_asked() {
    use std::sync::atomic::Ordering;
    for signer in [Signer::es256("k-1", 3), Signer::rs256("k-1", 3)] {
        let policy = policy(&signer.jwks(), &read_invoice_rule(), "enforce");
        let (vm, mock) = started(&policy);
        let calls = envoy_crypto(&mock);
        let good = format!("Bearer {}", signer.sign(&agent_claims("agent-7", "invoices:read", NOW as i64)));
        assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &good)])), CONTINUE, "{:?}", mock.state().logs);
        assert!(logged(&mock, "host crypto (verify_signature) for ES256, RS256, RS384, RS512; wasm for"));
        // Four probes (a good and a bad signature per family), then the token itself.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        let (signed, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{}", agentgate_test_harness::tokens::b64(&[1; 64]));
        assert_eq!(request(&vm, &mock, 3, headers(&[("authorization", &forged)])), PAUSE);
        assert_eq!(status(&mock), Some(401));
        // A reconfiguration keeps the host's crypto without probing again.
        assert!(vm.on_configure(ROOT));
        let fresh = format!("Bearer {}", signer.sign(&agent_claims("agent-8", "invoices:read", NOW as i64)));
        assert_eq!(request(&vm, &mock, 4, headers(&[("authorization", &fresh)])), CONTINUE);
        assert_eq!(calls.load(Ordering::SeqCst), 7, "one call per new token, no probe again");
    }
    // Kong: the import traps there for any name but resolve_lua; it is never called.
    let (vm, mock) = vm(&inline_policy(), |m| {
        m.state().properties.insert("ngx.nginx_version".into(), Ok(b"1.22.1".to_vec()));
    })
    .unwrap();
    let calls = envoy_crypto(&mock);
    let good = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &good)])), CONTINUE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(!logged(&mock, "signature backends"));
}

#[test]
fn a_host_whose_crypto_fails_its_probe_keeps_wasm_and_one_that_fails_later_denies() {
    // No verify_signature (Unimplemented): wasm for everything, said once.
    let (vm, mock) = started(&inline_policy());
    let good = format!("Bearer {}", token());
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &good)])), CONTINUE);
    assert!(logged(&mock, "every algorithm in wasm; host crypto (verify_signature) not used: the host's verify_signature answered status 12"));
    // A host that says yes to everything fails the known-bad probe.
    let (vm, mock) = started(&inline_policy());
    mock.set_verify_signature(Some(std::sync::Arc::new(|_: &[u8]| Ok(vec![0x08, 0x01]))));
    let (signed, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", agentgate_test_harness::tokens::b64(&[1; 64]));
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &forged)])), PAUSE);
    assert_eq!(status(&mock), Some(401), "verified in wasm");
    assert!(logged(&mock, "every algorithm in wasm"));
    // Probed right, then failing: 503 crypto_unavailable with why, never an allow.
    let (vm, mock) = started(&inline_policy());
    envoy_crypto(&mock);
    assert_eq!(request(&vm, &mock, 2, headers(&[("authorization", &good)])), CONTINUE);
    for (answer, why) in [
        (Err(10), "answered status 10"),
        (Ok(vec![0xff, 0xff]), "do not parse"),
        (Ok([&[0x12, 5][..], b"oops!"].concat()), "failed: \"oops!\""),
    ] {
        mock.set_verify_signature(Some(std::sync::Arc::new(move |_: &[u8]| answer.clone())));
        let fresh = format!("Bearer {}", signer().sign(&agent_claims(why, "invoices:read", NOW as i64)));
        assert_eq!(request(&vm, &mock, 3, headers(&[("authorization", &fresh)])), PAUSE, "{why}");
        assert_eq!(status(&mock), Some(503), "{why}");
        let logs = mock.state().crypto_logs.lock().unwrap().clone();
        assert!(logs.iter().any(|l| l.contains(why) && l.contains("crypto_unavailable")), "{logs:?}");
    }
}

/// Hot requests (one cached token) in a loop, for an instruction profile of the filter's
/// stages natively (BENCHMARKS.md): `cargo test --release -p agentgate-proxy-wasm --lib
/// hot_path_profile -- --ignored` under `valgrind --tool=callgrind`.
#[test]
#[ignore = "a profiling workload, not a test"]
fn hot_path_profile() {
    let (vm, mock) = started(&inline_policy());
    let token = format!("Bearer {}", token());
    let sent = headers(&[("authorization", &token), ("x-request-id", "7f3c9a2e-5b1d-4e8a-9c6f-2d4b8e1a3f5c")]);
    for id in 2..2002 {
        mock.state().logs.clear();
        assert_eq!(request(&vm, &mock, id, sent.clone()), CONTINUE);
        vm.on_delete(id);
    }
}
