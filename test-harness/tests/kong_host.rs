//! The release filter on the Kong host model (`Host::kong`, kong.md): what that host does that
//! Envoy does not, pinned; the filter starts there, fetches keys from the contexts Kong
//! allows, and decides the shared decision table and the audit-header cases as on Envoy.

use agentgate_test_harness::envoy::workspace_root;
use agentgate_test_harness::host::{Callback, Host, HostError, Outcome, KONG_SERVER_NAME};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use base64ct::{Base64UrlUnpadded, Encoding};
use p256::ecdsa::signature::Signer as _;
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn inline_policy() -> String {
    policy(&signer().jwks(), &read_invoice_rule(), "enforce")
}

fn remote_policy(wait_ms: u64) -> String {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap_or_default();
    if let Some(provider) = p["providers"][0].as_object_mut() {
        provider.remove("jwks");
        provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys.json"));
        provider.insert("cluster".into(), json!("idp.example.com:443"));
        provider.insert("jwks_fetch".into(), json!({"wait_ms": wait_ms, "min_refetch_seconds": 10}));
    }
    p.to_string()
}

fn keys() -> Vec<u8> {
    signer().jwks().to_string().into_bytes()
}

fn kong(policy: &str) -> Host {
    Host::kong(policy).unwrap_or_else(|e| panic!("{e}"))
}

fn bearer(host: &Host) -> String {
    format!("Bearer {}", signer().sign(&agent_claims("agent-7", "invoices:read", host.now())))
}

fn get(host: &mut Host, extra: &[(&str, &str)]) -> Outcome {
    let mut headers = vec![(":method", "GET"), (":path", "/invoices/42"), (":authority", "api.example.com")];
    headers.extend_from_slice(extra);
    host.request(&headers).unwrap_or_else(|e| panic!("{e}"))
}

fn last_audit(host: &Host) -> Value {
    host.logs()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("agentgate audit ").and_then(|j| serde_json::from_str(j).ok()))
        .unwrap_or(Value::Null)
}

/// Every value the upstream receives for `name` (any case).
fn upstream<'a>(outcome: &'a Outcome, name: &str) -> Vec<&'a str> {
    match outcome {
        Outcome::Continued { upstream_headers } => {
            upstream_headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
        }
        _ => Vec::new(),
    }
}

// ---- the host model ---------------------------------------------------------------------

#[test]
fn kong_traps_a_callout_outside_request_headers_ticks_and_answers() {
    let mut host = kong(&remote_policy(0));
    match host.tick_during(Callback::Configure) {
        Err(HostError::Trap(message)) => assert!(message.contains("can only send HTTP dispatch during"), "{message}"),
        other => panic!("a callout from on_configure must trap on Kong: {other:?}"),
    }
    // The same callout from on_tick is allowed.
    let mut host = kong(&remote_policy(0));
    host.tick().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.pending_http_calls().len(), 1);
    // Envoy allows it anywhere.
    let mut envoy = Host::new(&remote_policy(0)).unwrap_or_else(|e| panic!("{e}"));
    envoy.tick_during(Callback::Configure).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn kong_crashes_on_request_headers_read_with_no_current_request() {
    let mut host = kong(&inline_policy());
    match host.request_headers_from_root(&[(":method", "GET"), (":path", "/invoices/42")]) {
        Err(HostError::Trap(message)) => assert!(message.contains("SIGSEGV"), "{message}"),
        other => panic!("{other:?}"),
    }
    let mut envoy = Host::new(&inline_policy()).unwrap_or_else(|e| panic!("{e}"));
    assert!(envoy.request_headers_from_root(&[(":method", "GET")]).is_ok(), "Envoy answers an error status");
}

#[test]
fn kong_logs_an_error_for_connection_properties_outside_a_request_and_mtls_binding_is_refused_once() {
    let mut bound: Value = serde_json::from_str(&inline_policy()).unwrap_or_default();
    bound["rules"][0]["require"]["bind_mtls_peer"] = json!(true);
    let logs = match Host::kong(&bound.to_string()) {
        Err(HostError::Refused { logs }) => logs,
        other => panic!("expected a refusal: {:?}", other.map(|_| "running")),
    };
    assert!(logs.iter().any(|l| l.contains("cannot get scoped properties outside of a request")), "{logs:?}");
    let ours: Vec<&String> =
        logs.iter().filter(|l| l.starts_with("agentgate:") && l.contains("bind_mtls_peer")).collect();
    assert_eq!(ours.len(), 1, "one clear line: {logs:?}");
    // A policy that does not bind starts without touching them.
    let host = kong(&inline_policy());
    assert!(!host.logs().iter().any(|l| l.contains("scoped properties")), "{:?}", host.logs());
}

// ---- the filter on Kong -----------------------------------------------------------------

#[test]
fn the_filter_starts_on_kong_and_finds_headers_in_the_client_case() {
    let mut host = kong(&inline_policy());
    let auth = bearer(&host);
    let outcome = get(&mut host, &[("Authorization", &auth)]);
    assert_eq!(outcome.status(), 200, "{outcome:?}");
    assert_eq!(upstream(&outcome, "x-agent-id"), vec!["agent-7"]);
    // nginx forwards a removed header: the token's value is emptied in place first.
    assert_eq!(upstream(&outcome, "authorization"), vec![""], "the token never reaches the upstream");
}

#[test]
fn a_waiting_request_fetches_from_its_own_context_and_is_answered_there() {
    let mut host = kong(&remote_policy(2000));
    let auth = bearer(&host);
    let Outcome::Paused { context } = get(&mut host, &[("Authorization", &auth)]) else { panic!("not held") };
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].context, context, "dispatched by the request itself");
    assert_eq!(calls[0].upstream, "idp.example.com:443");
    host.respond(calls[0].token, 200, &keys()).unwrap_or_else(|e| panic!("{e}"));
    let outcome = host.outcome(context).unwrap_or_else(|| panic!("not answered"));
    assert_eq!(outcome.status(), 200);
    assert_eq!(upstream(&outcome, "x-agent-id"), vec!["agent-7"]);
    // Refreshes come from the root context's ticks.
    host.advance_clock(std::time::Duration::from_secs(400));
    host.tick().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host.pending_http_calls().first().map(|c| c.context), Some(1));
}

#[test]
fn without_waiting_a_new_kid_is_refused_and_refetched_at_the_next_tick() {
    let mut host = kong(&remote_policy(0));
    host.tick().unwrap_or_else(|e| panic!("{e}"));
    let call = host.pending_http_calls().remove(0);
    host.respond(call.token, 200, &Signer::es256("other", 9).jwks().to_string().into_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let auth = bearer(&host);
    assert_eq!(get(&mut host, &[("Authorization", &auth)]).status(), 401);
    assert_eq!(last_audit(&host)["reason"], "unknown_kid");
    host.tick().unwrap_or_else(|e| panic!("{e}"));
    let call = host.pending_http_calls().pop().unwrap_or_else(|| panic!("no early refetch"));
    host.respond(call.token, 200, &keys()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get(&mut host, &[("Authorization", &auth)]).status(), 200);
}

#[test]
fn a_stripped_header_sent_twice_or_headers_past_the_hundredth_are_refused() {
    let mut host = kong(&inline_policy());
    let auth = bearer(&host);
    let twice = get(&mut host, &[("Authorization", &auth), ("X-Agent-Id", "root"), ("x-agent-id", "admin")]);
    assert_eq!(twice.status(), 400, "the second copy would reach the upstream: {twice:?}");
    let names: Vec<String> = (0..100).map(|i| format!("x-pad-{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    many.push(("Authorization", &auth));
    many.push(("x-agent-id", "root"));
    assert_eq!(get(&mut host, &many).status(), 431, "a forged header past the 100th is neither seen nor stripped");
    assert!(host.logs().iter().any(|l| l.contains("the host passed")), "{:?}", host.logs());
}

#[test]
fn audit_headers_reach_the_upstream_as_on_envoy() {
    let mut host = kong(&inline_policy());
    let auth = bearer(&host);
    let outcome =
        get(&mut host, &[("Authorization", &auth), ("X-Agent-Rule", "admin"), ("x-agent-on-behalf-of", "ceo")]);
    assert_eq!(outcome.status(), 200, "{outcome:?}");
    assert_eq!(upstream(&outcome, "x-agent-decision"), vec!["allow"]);
    assert_eq!(upstream(&outcome, "x-agent-rule"), vec!["read-invoice"], "replaced in place");
    assert_eq!(upstream(&outcome, "x-agent-on-behalf-of"), vec![""], "a forged header arrives emptied");
    // No x-request-id from Kong: the filter makes the audit id.
    let audit_id = upstream(&outcome, "x-agent-audit-id");
    assert_eq!(audit_id.len(), 1);
    assert_eq!(audit_id[0].len(), 32);
    assert_eq!(last_audit(&host)["audit_id"], json!(audit_id[0]));
    // A client's id is used as sent.
    let outcome = get(&mut host, &[("Authorization", &auth), ("X-Request-Id", "r-7")]);
    assert_eq!(upstream(&outcome, "x-agent-audit-id"), vec!["r-7"]);
    // A denial carries a bare challenge and the audit id.
    let denied = get(&mut host, &[]);
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    assert_eq!(last_audit(&host)["audit_id"], json!(denied.header("x-agent-audit-id").unwrap_or_default()));
}

#[test]
fn hosts_rules_see_the_clients_host_not_the_server_name() {
    let mut p: Value = serde_json::from_str(&inline_policy()).unwrap_or_default();
    p["rules"][0]["match"]["hosts"] = json!(["api.example.com"]);
    let mut host = kong(&p.to_string());
    let auth = bearer(&host);
    assert_eq!(get(&mut host, &[("Authorization", &auth)]).status(), 200, ":authority is {KONG_SERVER_NAME}");
}

// ---- the shared decision table ----------------------------------------------------------

fn sign(key: &Value, claims: &Value, tamper: bool) -> String {
    let b64 = |bytes: &[u8]| Base64UrlUnpadded::encode_string(bytes);
    let d = Base64UrlUnpadded::decode_vec(key["d"].as_str().unwrap_or_default()).unwrap_or_default();
    let signing = p256::ecdsa::SigningKey::from_slice(&d).unwrap_or_else(|e| panic!("signing key: {e}"));
    let header = json!({"alg": "ES256", "kid": key["kid"], "typ": "JWT"});
    let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature: p256::ecdsa::Signature = signing.sign(signed.as_bytes());
    let mut signature = signature.to_bytes().to_vec();
    if tamper {
        if let Some(last) = signature.last_mut() {
            *last ^= 1;
        }
    }
    format!("{signed}.{}", b64(&signature))
}

#[test]
fn every_shared_decision_case_decides_on_kong_as_on_envoy() {
    let text = std::fs::read_to_string(workspace_root().join("tests/cases/decisions.json")).unwrap_or_default();
    let cases: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("decisions.json: {e}"));
    let list = cases["cases"].as_array().cloned().unwrap_or_default();
    assert!(list.len() >= 10);
    for profile in ["kong", "envoy"] {
        let policy = cases["policy"].to_string();
        let mut host =
            if profile == "kong" { kong(&policy) } else { Host::new(&policy).unwrap_or_else(|e| panic!("{e}")) };
        host.set_clock(cases["now"].as_i64().unwrap_or_default());
        for case in &list {
            let name = format!("{profile}: {}", case["name"].as_str().unwrap_or_default());
            let request = &case["request"];
            let mut owned: Vec<(String, String)> = vec![
                (":method".into(), request["method"].as_str().unwrap_or_default().into()),
                (":path".into(), request["path"].as_str().unwrap_or_default().into()),
                (":authority".into(), "api.example.com".into()),
            ];
            for (n, v) in request["headers"].as_object().into_iter().flatten() {
                owned.push((n.clone(), v.as_str().unwrap_or_default().into()));
            }
            if case["claims"].is_object() {
                let token = sign(&cases["signing_key"], &case["claims"], case["tamper"] == json!(true));
                owned.push(("Authorization".into(), format!("Bearer {token}")));
            }
            let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let outcome = host.request(&headers).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expect = &case["expect"];
            let record = last_audit(&host);
            assert_eq!(record["decision"], expect["decision"], "{name}: {outcome:?}");
            if let Some(reason) = expect["reason"].as_str() {
                assert_eq!(record["reason"], reason, "{name}");
            }
            if let Some(rule) = expect["rule"].as_str() {
                assert_eq!(record["rule"], rule, "{name}");
            }
            if expect["decision"] == "allow" {
                assert!(matches!(outcome, Outcome::Continued { .. }), "{name}: {outcome:?}");
                for (header, value) in expect["headers"].as_object().into_iter().flatten() {
                    assert_eq!(
                        upstream(&outcome, header),
                        vec![value.as_str().unwrap_or_default()],
                        "{name}: {header}"
                    );
                }
                assert!(upstream(&outcome, "authorization").iter().all(|v| v.is_empty()), "{name}: token forwarded");
            } else {
                assert_eq!(u64::from(outcome.status()), expect["status"].as_u64().unwrap_or_default(), "{name}");
            }
        }
    }
}
