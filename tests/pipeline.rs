//! The whole pipeline (extract → verify → authorize → audit) through `Gate::evaluate`, one
//! test per rule of the spec, each with its own tokens.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer, ISSUER};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn gate_with(signers: &[&Signer], rules: &Value, mode: &str) -> Gate {
    let jwks = json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()});
    Gate::from_json(&policy(&jwks, rules, mode)).unwrap_or_else(|e| panic!("{e}"))
}

fn es() -> Signer {
    Signer::es256("es-1", 1)
}

fn gate() -> Gate {
    gate_with(&[&es()], &read_invoice_rule(), "enforce")
}

fn eval_at(gate: &Gate, method: &str, path: &str, headers: &[(&str, &str)], now: i64) -> Decision {
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    gate.evaluate(&Request::new(method, path, &headers, now))
}

fn get(gate: &Gate, path: &str, token: &str) -> Decision {
    eval_at(gate, "GET", path, &[("authorization", &format!("Bearer {token}"))], NOW)
}

fn claims(scope: &str) -> Value {
    agent_claims("agent-7", scope, NOW)
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn status(decision: &Decision) -> u16 {
    match &decision.action {
        Action::Respond { status, .. } => *status,
        Action::Continue { .. } => 200,
    }
}

fn response_header<'a>(decision: &'a Decision, name: &str) -> Option<&'a str> {
    match &decision.action {
        Action::Respond { headers, .. } => headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()),
        Action::Continue { .. } => None,
    }
}

fn upstream_header<'a>(decision: &'a Decision, name: &str) -> Option<&'a str> {
    match &decision.action {
        Action::Continue { set, .. } => set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()),
        Action::Respond { .. } => None,
    }
}

#[test]
fn valid_token_with_the_rule_scope_is_allowed_with_audit_headers() {
    let token = es().sign(&claims("invoices:read profile"));
    let d = eval_at(
        &gate(),
        "GET",
        "/invoices/42?x=1",
        &[("authorization", &format!("Bearer {token}")), ("x-request-id", "r-1")],
        NOW,
    );
    assert!(d.allowed);
    assert_eq!(d.reason, None);
    assert_eq!(upstream_header(&d, "x-agent-decision"), Some("allow"));
    assert_eq!(upstream_header(&d, "x-agent-id"), Some("agent-7"));
    assert_eq!(upstream_header(&d, "x-agent-rule"), Some("read-invoice"));
    assert_eq!(upstream_header(&d, "x-agent-audit-id"), Some("r-1"));
    assert_eq!(d.audit.path, "/invoices/42", "the query string stays out of the audit record");
    assert_eq!(d.audit.issuer.as_deref(), Some(ISSUER));
    assert_eq!(d.audit.jti.as_deref(), Some(format!("agent-7-{NOW}").as_str()));
}

#[test]
fn client_sent_agent_headers_are_removed() {
    let token = es().sign(&claims("invoices:read"));
    let d = eval_at(
        &gate(),
        "GET",
        "/invoices/1",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-agent-id", "root"),
            ("x-agent-extra", "1"),
            ("x-other", "kept"),
        ],
        NOW,
    );
    match &d.action {
        // The token goes too: credentials stay at the gate.
        Action::Continue { remove, .. } => assert_eq!(remove, &["x-agent-id", "x-agent-extra", "authorization"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn scp_array_grants_scopes_too() {
    let mut c = claims("");
    c.as_object_mut().map(|o| o.remove("scope"));
    c["scp"] = json!(["invoices:read"]);
    assert!(get(&gate(), "/invoices/1", &es().sign(&c)).allowed);
}

#[test]
fn missing_token_is_401_with_a_bare_challenge() {
    let d = eval_at(&gate(), "GET", "/invoices/1", &[("authorization", "Basic YTpi")], NOW);
    assert_eq!(d.reason, Some(Reason::MissingToken));
    assert_eq!(status(&d), 401);
    assert_eq!(response_header(&d, "www-authenticate"), Some("Bearer"));
}

#[test]
fn expired_token_is_rejected_after_skew() {
    let token = es().sign(&with(claims("invoices:read"), "exp", json!(NOW - 31)));
    let d = get(&gate(), "/invoices/1", &token);
    assert_eq!(d.reason, Some(Reason::Expired));
    assert_eq!(status(&d), 401);
    assert!(response_header(&d, "www-authenticate").is_some_and(|c| c.starts_with("Bearer error=\"invalid_token\"")));
}

#[test]
fn expired_token_within_skew_is_accepted() {
    let token = es().sign(&with(claims("invoices:read"), "exp", json!(NOW - 29)));
    assert!(get(&gate(), "/invoices/1", &token).allowed);
}

#[test]
fn token_without_exp_is_rejected() {
    let mut c = claims("invoices:read");
    c.as_object_mut().map(|o| o.remove("exp"));
    assert_eq!(get(&gate(), "/invoices/1", &es().sign(&c)).reason, Some(Reason::MissingExp));
}

#[test]
fn token_not_yet_valid_is_rejected() {
    let nbf = es().sign(&with(claims("invoices:read"), "nbf", json!(NOW + 60)));
    assert_eq!(get(&gate(), "/invoices/1", &nbf).reason, Some(Reason::NotYetValid));
    let iat = es().sign(&with(claims("invoices:read"), "iat", json!(NOW + 60)));
    assert_eq!(get(&gate(), "/invoices/1", &iat).reason, Some(Reason::NotYetValid));
    let nbf_in_skew = es().sign(&with(claims("invoices:read"), "nbf", json!(NOW + 20)));
    assert!(get(&gate(), "/invoices/1", &nbf_in_skew).allowed);
}

#[test]
fn audience_must_intersect_the_providers_audiences() {
    let wrong = es().sign(&with(claims("invoices:read"), "aud", json!("https://other.example.com")));
    assert_eq!(get(&gate(), "/invoices/1", &wrong).reason, Some(Reason::AudienceMismatch));
    let array = es().sign(&with(
        claims("invoices:read"),
        "aud",
        json!(["https://other.example.com", "https://api.example.com"]),
    ));
    assert!(get(&gate(), "/invoices/1", &array).allowed);
    let mut none = claims("invoices:read");
    none.as_object_mut().map(|o| o.remove("aud"));
    assert_eq!(get(&gate(), "/invoices/1", &es().sign(&none)).reason, Some(Reason::AudienceMismatch));
}

#[test]
fn unknown_issuer_is_rejected() {
    let token = es().sign(&with(claims("invoices:read"), "iss", json!("https://evil.example.com")));
    assert_eq!(get(&gate(), "/invoices/1", &token).reason, Some(Reason::UnknownIssuer));
}

#[test]
fn unknown_kid_is_rejected() {
    let token = Signer::es256("es-2", 1).sign(&claims("invoices:read"));
    assert_eq!(get(&gate(), "/invoices/1", &token).reason, Some(Reason::UnknownKid));
}

#[test]
fn signature_by_another_key_is_rejected() {
    let token = Signer::es256("es-1", 99).sign(&claims("invoices:read"));
    assert_eq!(get(&gate(), "/invoices/1", &token).reason, Some(Reason::BadSignature));
}

#[test]
fn token_without_kid_is_tried_against_each_fitting_key() {
    let other = Signer::es256("es-0", 5);
    let gate = gate_with(&[&other, &es()], &read_invoice_rule(), "enforce");
    let token = es().sign_with_header(&json!({"alg": "ES256"}), &claims("invoices:read"));
    assert!(get(&gate, "/invoices/1", &token).allowed);
}

#[test]
fn a_token_without_kid_must_name_its_key_when_many_keys_fit() {
    let others: Vec<Signer> = (0..4).map(|i| Signer::es256(&format!("es-o{i}"), 10 + i)).collect();
    let mut signers: Vec<&Signer> = others.iter().collect();
    let es = es();
    signers.push(&es);
    let gate = gate_with(&signers, &read_invoice_rule(), "enforce");
    let kidless = es.sign_with_header(&json!({"alg": "ES256"}), &claims("invoices:read"));
    // Five candidate keys: not tried one by one (each a signature check), refused outright.
    assert_eq!(get(&gate, "/invoices/1", &kidless).reason, Some(Reason::UnknownKid));
    assert!(get(&gate, "/invoices/1", &es.sign(&claims("invoices:read"))).allowed, "with its kid it verifies");
}

#[test]
fn alg_none_in_every_case_is_rejected() {
    use agentgate_test_harness::tokens::b64;
    for alg in ["none", "None", "NONE", "nOnE"] {
        let unsigned = format!(
            "{}.{}",
            b64(json!({"alg": alg}).to_string().as_bytes()),
            b64(claims("invoices:read").to_string().as_bytes())
        );
        // RFC 7519 unsecured form (empty signature), and with some bytes where a signature would be.
        assert_eq!(get(&gate(), "/invoices/1", &format!("{unsigned}.")).reason, Some(Reason::Malformed), "{alg}");
        assert_eq!(
            get(&gate(), "/invoices/1", &format!("{unsigned}.AAAA")).reason,
            Some(Reason::AlgNotAllowed),
            "{alg}"
        );
    }
}

#[test]
fn algorithm_outside_the_providers_list_is_rejected() {
    let rs = Signer::rs256("rs-1", 1);
    let jwks = json!({"keys": [rs.jwk()]});
    let p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default();
    let mut p = p;
    p["providers"][0]["algorithms"] = json!(["RS256"]);
    let gate = Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let ps = Signer::ps256("rs-1", 1).sign(&claims("invoices:read"));
    assert_eq!(get(&gate, "/invoices/1", &ps).reason, Some(Reason::AlgNotAllowed));
    assert!(get(&gate, "/invoices/1", &rs.sign(&claims("invoices:read"))).allowed);
}

#[test]
fn header_alg_that_does_not_fit_the_named_key_is_rejected() {
    // An RS256 header naming the EC key's kid: the key decides, not the token.
    let token = Signer::rs256("es-1", 1).sign(&claims("invoices:read"));
    assert_eq!(get(&gate(), "/invoices/1", &token).reason, Some(Reason::AlgNotAllowed));
}

#[test]
fn garbage_tokens_are_malformed() {
    for token in ["x", "a.b", "a.b.c", "a.b.c.d", "....", "eyJhbGciOiJFUzI1NiJ9.e30=.AA", "eyJhbGciOiJFUzI1NiJ9.%%%.AA"]
    {
        assert_eq!(get(&gate(), "/invoices/1", token).reason, Some(Reason::Malformed), "{token}");
    }
}

#[test]
fn valid_token_without_the_scope_is_403_insufficient_scope() {
    let d = get(&gate(), "/invoices/1", &es().sign(&claims("invoices:write")));
    assert_eq!(d.reason, Some(Reason::InsufficientScope));
    assert_eq!(d.rule.as_deref(), Some("read-invoice"));
    assert_eq!(status(&d), 403);
    assert!(
        response_header(&d, "www-authenticate").is_some_and(|c| c.starts_with("Bearer error=\"insufficient_scope\""))
    );
}

#[test]
fn request_matching_no_rule_is_denied() {
    let token = es().sign(&claims("invoices:read"));
    assert_eq!(get(&gate(), "/payroll/1", &token).reason, Some(Reason::NoMatchingRule));
    let post = eval_at(&gate(), "POST", "/invoices/1", &[("authorization", &format!("Bearer {token}"))], NOW);
    assert_eq!(post.reason, Some(Reason::NoMatchingRule));
    assert_eq!(status(&post), 403);
}

#[test]
fn first_matching_rule_decides() {
    let rules = json!([
        {"name": "pay", "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"}, "require": {"scopes": ["invoices:pay"]}},
        {"name": "any-invoice", "match": {"path": "/invoices/{*rest}"}, "require": {"scopes": ["invoices:admin"]}},
    ]);
    let gate = gate_with(&[&es()], &rules, "enforce");
    let token = format!("Bearer {}", es().sign(&claims("invoices:pay")));
    let pay = eval_at(&gate, "POST", "/invoices/9/pay", &[("authorization", &token)], NOW);
    assert_eq!((pay.allowed, pay.rule.as_deref()), (true, Some("pay")));
    let get = eval_at(&gate, "GET", "/invoices/9/pay", &[("authorization", &token)], NOW);
    assert_eq!((get.reason, get.rule.as_deref()), (Some(Reason::InsufficientScope), Some("any-invoice")));
}

#[test]
fn non_canonical_paths_are_400() {
    let token = es().sign(&claims("invoices:read"));
    for path in ["/invoices/../admin", "/invoices//1", "/invoices/%2e%2e/x", "/invoices/a%2Fb"] {
        let d = get(&gate(), path, &token);
        assert_eq!(d.reason, Some(Reason::NonCanonicalPath), "{path}");
        assert_eq!(status(&d), 400);
    }
}

#[test]
fn two_different_tokens_are_400_invalid_request() {
    let a = es().sign(&claims("invoices:read"));
    let b = es().sign(&claims("invoices:write"));
    let d = eval_at(
        &gate(),
        "GET",
        "/invoices/1",
        &[("authorization", &format!("Bearer {a}")), ("authorization", &format!("Bearer {b}"))],
        NOW,
    );
    assert_eq!(d.reason, Some(Reason::MultipleTokens));
    assert_eq!(status(&d), 400);
    assert!(response_header(&d, "www-authenticate").is_some_and(|c| c.contains("invalid_request")));
}

#[test]
fn dry_run_forwards_a_denied_request_marked_deny() {
    let gate = gate_with(&[&es()], &read_invoice_rule(), "dry_run");
    let d = get(&gate, "/invoices/1", &es().sign(&claims("invoices:write")));
    assert!(!d.allowed);
    assert!(d.dry_run);
    assert_eq!(status(&d), 200);
    assert_eq!(upstream_header(&d, "x-agent-decision"), Some("deny"));
    assert_eq!(upstream_header(&d, "x-agent-reason"), Some("insufficient_scope"));
    assert_eq!(d.audit.decision, "deny");
    assert!(d.audit.dry_run);
}

#[test]
fn subject_cannot_inject_headers() {
    let token = es().sign(&with(claims("invoices:read"), "sub", json!("agent\r\nx-agent-rule: admin")));
    let d = get(&gate(), "/invoices/1", &token);
    assert_eq!(upstream_header(&d, "x-agent-id"), Some("agent%0D%0Ax-agent-rule: admin"));
}

#[test]
fn audit_record_and_responses_never_carry_the_token() {
    let token = es().sign(&claims("invoices:write"));
    let signature = token.rsplit('.').next().unwrap_or_default().to_string();
    for d in [
        get(&gate(), "/invoices/1", &token),
        get(&gate_with(&[&es()], &read_invoice_rule(), "dry_run"), "/invoices/1", &token),
    ] {
        let everything = format!("{} {:?}", d.audit.to_json(), d.action);
        assert!(!everything.contains(&signature), "{everything}");
        assert!(!everything.contains(&token[..40]), "{everything}");
    }
}

#[test]
fn reused_token_is_served_from_the_cache_but_never_past_exp() {
    let gate = gate();
    let token = es().sign(&with(claims("invoices:read"), "exp", json!(NOW + 60)));
    let first = get(&gate, "/invoices/1", &token);
    let second = get(&gate, "/invoices/2", &token);
    assert!(first.allowed && second.allowed);
    assert!(!first.cache_hit);
    assert!(second.cache_hit);
    let auth = format!("Bearer {token}");
    let later = eval_at(&gate, "GET", "/invoices/1", &[("authorization", &auth)], NOW + 60 + 30);
    assert!(later.cache_hit);
    assert_eq!(later.reason, Some(Reason::Expired));
}

#[test]
fn a_token_that_failed_verification_is_not_cached() {
    let gate = gate();
    let forged = Signer::es256("es-1", 42).sign(&claims("invoices:read"));
    for _ in 0..2 {
        let d = get(&gate, "/invoices/1", &forged);
        assert_eq!((d.reason, d.cache_hit), (Some(Reason::BadSignature), false));
    }
}

fn single_use_gate(max_lifetime: Option<u64>) -> Result<Gate, agentgate::ConfigError> {
    let jwks = json!({"keys": [es().jwk()]});
    let mut p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    if let Some(max) = max_lifetime {
        p["providers"][0]["max_lifetime_seconds"] = json!(max);
    }
    Gate::from_json(&p.to_string())
}

#[test]
fn single_use_token_is_accepted_once() {
    let gate = single_use_gate(Some(600)).unwrap_or_else(|e| panic!("{e}"));
    let token = es().sign(&claims("invoices:read"));
    assert!(get(&gate, "/invoices/1", &token).allowed);
    let replay = get(&gate, "/invoices/1", &token);
    assert_eq!(replay.reason, Some(Reason::Replayed));
    assert_eq!(status(&replay), 401);
    assert_eq!(replay.audit.agent.as_deref(), Some("agent-7"), "a replay is recorded with who the token names");
    let other = es().sign(&with(claims("invoices:read"), "jti", json!("another")));
    assert!(get(&gate, "/invoices/1", &other).allowed);
}

#[test]
fn single_use_token_without_jti_is_rejected() {
    let gate = single_use_gate(Some(600)).unwrap_or_else(|e| panic!("{e}"));
    let mut c = claims("invoices:read");
    c.as_object_mut().map(|o| o.remove("jti"));
    assert_eq!(get(&gate, "/invoices/1", &es().sign(&c)).reason, Some(Reason::MissingJti));
}

#[test]
fn single_use_needs_a_maximum_lifetime() {
    let e = single_use_gate(None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.starts_with("providers[0].single_use: needs max_lifetime_seconds"), "{e}");
}

#[test]
fn max_lifetime_limits_long_lived_tokens() {
    let jwks = json!({"keys": [es().jwk()]});
    let mut p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["max_lifetime_seconds"] = json!(300);
    let gate = Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let ok = es().sign(&with(claims("invoices:read"), "exp", json!(NOW + 300)));
    assert!(get(&gate, "/invoices/1", &ok).allowed);
    let long = es().sign(&with(claims("invoices:read"), "exp", json!(NOW + 3600)));
    assert_eq!(get(&gate, "/invoices/1", &long).reason, Some(Reason::LifetimeTooLong));
    let mut no_iat = with(claims("invoices:read"), "exp", json!(NOW + 3600));
    no_iat.as_object_mut().map(|o| o.remove("iat"));
    assert_eq!(get(&gate, "/invoices/1", &es().sign(&no_iat)).reason, Some(Reason::LifetimeTooLong));
}

#[test]
fn token_types_and_subject_patterns() {
    let jwks = json!({"keys": [es().jwk()]});
    let mut p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["providers"][0]["token_types"] = json!(["at+jwt"]);
    p["providers"][0]["subjects"] = json!(["spiffe://corp.example/agent/*"]);
    let gate = Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let spiffe = with(claims("invoices:read"), "sub", json!("spiffe://corp.example/agent/billing"));
    let header = |typ: Option<&str>| match typ {
        Some(t) => json!({"alg": "ES256", "kid": "es-1", "typ": t}),
        None => json!({"alg": "ES256", "kid": "es-1"}),
    };
    assert!(get(&gate, "/invoices/1", &es().sign_with_header(&header(Some("at+jwt")), &spiffe)).allowed);
    assert!(get(&gate, "/invoices/1", &es().sign_with_header(&header(Some("application/AT+JWT")), &spiffe)).allowed);
    assert_eq!(
        get(&gate, "/invoices/1", &es().sign_with_header(&header(Some("JWT")), &spiffe)).reason,
        Some(Reason::TypeNotAllowed)
    );
    assert_eq!(
        get(&gate, "/invoices/1", &es().sign_with_header(&header(None), &spiffe)).reason,
        Some(Reason::TypeNotAllowed)
    );
    let stranger = with(claims("invoices:read"), "sub", json!("spiffe://other.example/agent/x"));
    assert_eq!(
        get(&gate, "/invoices/1", &es().sign_with_header(&header(Some("at+jwt")), &stranger)).reason,
        Some(Reason::SubjectNotAllowed)
    );
}

#[test]
fn tokens_from_several_providers_are_told_apart_by_issuer() {
    let other = Signer::eddsa("ed-9", 9);
    let mut p: Value = serde_json::from_str(&policy(&json!({"keys": [es().jwk()]}), &read_invoice_rule(), "enforce"))
        .unwrap_or_default();
    let mut second = p["providers"][0].clone();
    second["name"] = json!("partner-idp");
    second["issuer"] = json!("https://partner.example");
    second["jwks"] = json!({"keys": [other.jwk()]});
    if let Some(providers) = p["providers"].as_array_mut() {
        providers.push(second);
    }
    let gate = Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let partner = with(claims("invoices:read"), "iss", json!("https://partner.example"));
    assert!(get(&gate, "/invoices/1", &other.sign(&partner)).allowed);
    assert!(get(&gate, "/invoices/1", &es().sign(&claims("invoices:read"))).allowed);
    // The partner's key does not vouch for the corporate issuer, nor the other way round.
    assert_eq!(get(&gate, "/invoices/1", &other.sign(&claims("invoices:read"))).reason, Some(Reason::UnknownKid));
    assert_eq!(get(&gate, "/invoices/1", &es().sign(&partner)).reason, Some(Reason::UnknownKid));
}

#[test]
fn forward_token_keeps_the_credential_for_the_upstream() {
    let jwks = json!({"keys": [es().jwk()]});
    let mut p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["forward_token"] = json!(true);
    let gate = Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    match &get(&gate, "/invoices/1", &es().sign(&claims("invoices:read"))).action {
        Action::Continue { remove, .. } => assert!(remove.is_empty(), "{remove:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn audit_record_carries_a_token_fingerprint_not_the_token() {
    let token = es().sign(&claims("invoices:read"));
    let shared = gate();
    let first = get(&shared, "/invoices/1", &token);
    let again = get(&shared, "/invoices/2", &token);
    assert!(again.cache_hit);
    let fingerprint = first.audit.token_fingerprint.clone().unwrap_or_default();
    assert_eq!(fingerprint.len(), 16);
    assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(again.audit.token_fingerprint, Some(fingerprint.clone()), "one token, one fingerprint, cached or not");
    assert_ne!(get(&gate(), "/invoices/1", &es().sign(&claims("x"))).audit.token_fingerprint, Some(fingerprint));
}
