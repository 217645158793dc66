//! No host answer aborts the VM: every host call the filter makes, answered with every status
//! of the ABI (and garbage pointers and sizes where it returns data), leaves requests failing
//! closed and the VM answering; a trap in the middle of a request leaves later requests working.

use agentgate_test_harness::host::{Answer, Host, HostError, Outcome, ALL_STATUSES};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

/// Every host call the filter makes.
const IMPORTS: &[&str] = &[
    "proxy_log",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_send_local_response",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_http_call",
    "proxy_define_metric",
    "proxy_increment_metric",
    "clock_time_get",
    "random_get",
];

fn signer() -> Signer {
    Signer::eddsa("ed-1", 4)
}

fn single_use_policy() -> String {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    p["providers"][0]["max_lifetime_seconds"] = json!(600);
    p.to_string()
}

fn remote_policy() -> String {
    let mut p: Value = serde_json::from_str(&single_use_policy()).unwrap_or_default();
    if let Some(provider) = p["providers"][0].as_object_mut() {
        provider.remove("jwks");
        provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys.json"));
        provider.insert("cluster".into(), json!("idp"));
    }
    p.to_string()
}

fn answers() -> Vec<Answer> {
    ALL_STATUSES.iter().map(|&s| Answer::Status(s)).chain([Answer::GarbagePointer, Answer::GarbageSize]).collect()
}

fn send(host: &mut Host, auth: Option<&str>, path: &str) -> Result<Outcome, HostError> {
    let mut headers = vec![(":method", "GET"), (":path", path), (":authority", "api")];
    if let Some(auth) = auth {
        headers.push(("authorization", auth));
    }
    host.request(&headers)
}

fn token(host: &Host, jti: &str) -> String {
    let mut claims = agent_claims("agent-7", "invoices:read", host.now());
    claims["jti"] = json!(jti);
    format!("Bearer {}", signer().sign(&claims))
}

/// A request that must never pass: no token, or a token for a path no rule allows.
fn assert_refused(outcome: &Outcome, what: &str) {
    assert!(matches!(outcome.status(), 401 | 403 | 500 | 503 | 0), "{what}: {outcome:?}");
    assert!(!matches!(outcome, Outcome::Continued { .. }), "{what}: {outcome:?}");
}

#[test]
fn every_status_of_every_host_call_fails_closed_and_the_vm_lives_on() {
    for import in IMPORTS {
        for answer in answers() {
            let what = format!("{import} answering {answer:?}");
            let mut host = Host::new(&single_use_policy()).unwrap_or_else(|e| panic!("{what}: {e}"));
            host.answer_with(import, answer);
            let outcome = send(&mut host, None, "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_refused(&outcome, &what);
            let auth = token(&host, "j-1");
            let outcome = send(&mut host, Some(&auth), "/admin/users").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_refused(&outcome, &what);
            // A good request may pass or fail closed, but never trap.
            let auth = token(&host, "j-2");
            let outcome = send(&mut host, Some(&auth), "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}"));
            if let Outcome::Continued { upstream_headers } = &outcome {
                assert!(
                    upstream_headers.iter().any(|(n, v)| n == "x-agent-id" && v == "agent-7")
                        || matches!(*import, "proxy_replace_header_map_value"),
                    "{what}: passed without its audit headers: {outcome:?}"
                );
            }
            // The host answers normally again: the VM decides as before.
            host.answer_normally();
            let auth = token(&host, "j-3");
            let outcome = send(&mut host, Some(&auth), "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(outcome.status(), 200, "{what}: after: {outcome:?}");
            assert_refused(&send(&mut host, None, "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}")), &what);
        }
    }
}

#[test]
fn every_status_while_fetching_keys_fails_closed_and_the_vm_lives_on() {
    let keys = json!({"keys": [signer().jwk()]}).to_string().into_bytes();
    for import in IMPORTS {
        for answer in answers() {
            let what = format!("{import} answering {answer:?}");
            let mut host = Host::new(&remote_policy()).unwrap_or_else(|e| panic!("{what}: {e}"));
            host.answer_with(import, answer);
            let auth = token(&host, "j-1");
            let first = send(&mut host, Some(&auth), "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}"));
            host.tick().unwrap_or_else(|e| panic!("{what}: {e}"));
            for call in host.pending_http_calls() {
                host.respond(call.token, 200, &keys).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            if let Outcome::Paused { context } = first {
                if let Some(outcome) = host.outcome(context) {
                    if *import != "proxy_replace_header_map_value" && outcome.status() == 200 {
                        assert_eq!(outcome.header("x-agent-id"), Some("agent-7"), "{what}");
                    }
                }
            }
            assert_refused(&send(&mut host, None, "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}")), &what);
            // Normal answers again: keys are fetched (now or at a later tick) and used.
            host.answer_normally();
            for _ in 0..3 {
                host.advance_clock(std::time::Duration::from_secs(70));
                host.tick().unwrap_or_else(|e| panic!("{what}: {e}"));
                for call in host.pending_http_calls() {
                    host.respond(call.token, 200, &keys).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
            let auth = token(&host, "j-2");
            let outcome = send(&mut host, Some(&auth), "/invoices/7").unwrap_or_else(|e| panic!("{what}: {e}"));
            let outcome = match outcome {
                Outcome::Paused { context } => {
                    for call in host.pending_http_calls() {
                        host.respond(call.token, 200, &keys).unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                    host.outcome(context).unwrap_or_else(|| panic!("{what}: still held"))
                }
                other => other,
            };
            assert_eq!(outcome.status(), 200, "{what}: after: {outcome:?}");
        }
    }
}

#[test]
fn a_trap_in_the_middle_of_a_request_leaves_later_requests_working() {
    let mut host = Host::new(&single_use_policy()).unwrap_or_else(|e| panic!("{e}"));
    for import in [
        "proxy_get_header_map_pairs",
        "proxy_get_property",
        "proxy_get_shared_data",
        "proxy_replace_header_map_value",
        "proxy_log",
    ] {
        host.trap_next(import);
        let auth = token(&host, &format!("{import}-trapped"));
        assert!(matches!(send(&mut host, Some(&auth), "/invoices/7"), Err(HostError::Trap(_))), "{import}");
        let auth = token(&host, &format!("{import}-after"));
        let outcome = send(&mut host, Some(&auth), "/invoices/7").unwrap_or_else(|e| panic!("{import}: {e}"));
        assert_eq!(outcome.status(), 200, "{import}: {outcome:?}");
        assert_eq!(outcome.header("x-agent-id"), Some("agent-7"));
        assert_eq!(send(&mut host, None, "/invoices/7").map(|o| o.status()), Ok(401), "{import}");
        assert_eq!(
            send(&mut host, Some(&auth), "/invoices/7").map(|o| o.status()),
            Ok(401),
            "{import}: replay still caught"
        );
    }
}

#[test]
fn a_trap_while_a_request_waits_for_keys_leaves_the_next_fetch_working() {
    let keys = json!({"keys": [signer().jwk()]}).to_string().into_bytes();
    let mut host = Host::new(&remote_policy()).unwrap_or_else(|e| panic!("{e}"));
    let auth = token(&host, "j-1");
    let Ok(Outcome::Paused { .. }) = send(&mut host, Some(&auth), "/invoices/7") else { panic!("not held") };
    let call = host.pending_http_calls().into_iter().next().unwrap_or_else(|| panic!("no fetch"));
    host.trap_next("proxy_get_buffer_bytes");
    assert!(matches!(host.respond(call.token, 200, &keys), Err(HostError::Trap(_))));
    // The lease of the lost fetch runs out; the next request fetches again.
    host.advance_clock(std::time::Duration::from_secs(30));
    let auth = token(&host, "j-2");
    let Ok(Outcome::Paused { context }) = send(&mut host, Some(&auth), "/invoices/7") else { panic!("not held") };
    let call = host.pending_http_calls().into_iter().next_back().unwrap_or_else(|| panic!("no fetch"));
    host.respond(call.token, 200, &keys).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.outcome(context).map(|o| o.status()), Some(200));
}
