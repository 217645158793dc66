//! The release filter in the real Envoy 1.40: statuses, challenges, audit headers as the
//! upstream receives them, audit records and counters, and refusal of a bad policy.

use agentgate_test_harness::envoy::{validate, Envoy};
use agentgate_test_harness::tokens::{agent_claims, now, policy, read_invoice_rule, Signer, AUDIENCE};
use agentgate_test_harness::upstream::Upstream;
use serde_json::{json, Value};

struct Setup {
    envoy: Envoy,
    signer: Signer,
    _upstream: Upstream,
}

fn start_with(signer: Signer, jwks: Value, mode: &str) -> Setup {
    let upstream = Upstream::start();
    let envoy =
        Envoy::start(&policy(&jwks, &read_invoice_rule(), mode), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    Setup { envoy, signer, _upstream: upstream }
}

fn start() -> Setup {
    let signer = Signer::es256("es-1", 1);
    let jwks = signer.jwks();
    start_with(signer, jwks, "enforce")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn allowed_request_reaches_upstream_with_audit_headers() {
    let s = start();
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    // At the edge Envoy replaces a client's x-request-id with its own: the audit id is Envoy's.
    let r = s.envoy.get("/invoices/42", &[("authorization", &bearer(&token)), ("x-request-id", "chosen-by-client")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.upstream_header("x-agent-id").as_deref(), Some("agent-7"));
    assert_eq!(r.upstream_header("x-agent-decision").as_deref(), Some("allow"));
    assert_eq!(r.upstream_header("x-agent-rule").as_deref(), Some("read-invoice"));
    assert_eq!(r.upstream_header("authorization"), None, "the token stays at the gate");
    let request_id = r.upstream_header("x-request-id").unwrap_or_default();
    assert_ne!(request_id, "chosen-by-client");
    assert_eq!(r.upstream_header("x-agent-audit-id"), Some(request_id.clone()));

    let records = s.envoy.audit_records();
    let record = records.last().unwrap_or_else(|| panic!("no audit record in:\n{}", s.envoy.logs()));
    assert_eq!(record["decision"], "allow");
    assert_eq!(record["agent"], "agent-7");
    assert_eq!(record["rule"], "read-invoice");
    assert_eq!(record["audit_id"], json!(request_id));
}

#[test]
fn forged_agent_headers_are_removed_before_the_upstream_sees_them() {
    let s = start();
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    let r = s.envoy.get(
        "/invoices/42",
        &[
            ("authorization", &bearer(&token)),
            ("x-agent-id", "root"),
            ("X-Agent-Rule", "admin"),
            ("x-agent-on-behalf-of", "ceo"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.upstream_header("x-agent-id").as_deref(), Some("agent-7"));
    assert_eq!(r.upstream_header("x-agent-rule").as_deref(), Some("read-invoice"));
    assert_eq!(r.upstream_header("x-agent-on-behalf-of"), None);
}

#[test]
fn every_supported_algorithm_is_accepted() {
    let signers = [Signer::es256("es", 1), Signer::rs256("rs", 1), Signer::ps256("ps", 1), Signer::eddsa("ed", 1)];
    let jwks = json!({"keys": signers.iter().map(Signer::jwk).collect::<Vec<_>>()});
    let s = start_with(Signer::es256("es", 1), jwks, "enforce");
    for signer in &signers {
        let token = signer.sign(&agent_claims("agent-7", "invoices:read", now()));
        let r = s.envoy.get("/invoices/1", &[("authorization", &bearer(&token))]);
        assert_eq!(r.status, 200, "{}: {}", signer.alg, r.body);
    }
}

#[test]
fn missing_token_gets_a_bare_bearer_challenge() {
    let s = start();
    let r = s.envoy.get("/invoices/42", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let record = s.envoy.audit_records().last().cloned().unwrap_or_default();
    assert_eq!(record["reason"], "missing_token");
    // The denial carries the audit id, so support can find the record.
    assert!(
        r.header("x-agent-audit-id").is_some_and(|id| !id.is_empty() && record["audit_id"] == json!(id)),
        "{r:?} {record}"
    );
}

#[test]
fn invalid_tokens_get_401_invalid_token() {
    let s = start();
    let t = now();
    let other_key = Signer::es256("es-1", 2);
    let mut wrong_audience = agent_claims("agent-7", "invoices:read", t);
    wrong_audience["aud"] = json!("https://other.example.com");
    let mut expired = agent_claims("agent-7", "invoices:read", t - 3600);
    expired["exp"] = json!(t - 600);
    let cases = [
        ("expired", s.signer.sign(&expired)),
        ("bad_signature", other_key.sign(&agent_claims("agent-7", "invoices:read", t))),
        ("audience_mismatch", s.signer.sign(&wrong_audience)),
        ("malformed", "not-a-jwt".to_string()),
        (
            "alg_not_allowed",
            s.signer.sign_with_header(&json!({"alg": "none", "kid": "es-1"}), &agent_claims("a", "invoices:read", t)),
        ),
    ];
    for (reason, token) in cases {
        let r = s.envoy.get("/invoices/42", &[("authorization", &bearer(&token))]);
        assert_eq!(r.status, 401, "{reason}: {}", r.body);
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{reason}: {challenge}");
        assert_eq!(r.json()["error"], "invalid_token", "{reason}");
        // Only expiry is told to the client (so a legitimate agent refreshes); the rest stays in the audit record.
        if reason != "expired" {
            assert!(!r.body.contains(reason), "client body must not carry the precise reason: {}", r.body);
        }
        assert_eq!(s.envoy.audit_records().last().map(|r| r["reason"].clone()), Some(json!(reason)));
    }
    // The filter survived every one of them.
    let ok = s.signer.sign(&agent_claims("agent-7", "invoices:read", t));
    assert_eq!(s.envoy.get("/invoices/42", &[("authorization", &bearer(&ok))]).status, 200);
}

#[test]
fn valid_token_without_the_rule_scope_gets_403() {
    let s = start();
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:write", now()));
    for path in ["/invoices/42", "/payroll/1"] {
        let r = s.envoy.get(path, &[("authorization", &bearer(&token))]);
        assert_eq!(r.status, 403, "{path}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer error=\"insufficient_scope\""), "{challenge}");
    }
    let reasons: Vec<Value> = s.envoy.audit_records().iter().map(|r| r["reason"].clone()).collect();
    assert_eq!(reasons, [json!("insufficient_scope"), json!("no_matching_rule")]);
}

#[test]
fn dry_run_lets_a_denied_request_through_marked_deny() {
    let signer = Signer::eddsa("ed", 3);
    let jwks = signer.jwks();
    let s = start_with(signer, jwks, "dry_run");
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:write", now()));
    let r = s.envoy.get("/invoices/42", &[("authorization", &bearer(&token))]);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_header("x-agent-decision").as_deref(), Some("deny"));
    assert_eq!(r.upstream_header("x-agent-reason").as_deref(), Some("insufficient_scope"));
    assert_eq!(r.upstream_header("x-agent-dry-run").as_deref(), Some("true"));
}

#[test]
fn counters_show_in_envoy_stats() {
    let s = start();
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    s.envoy.get("/invoices/1", &[("authorization", &bearer(&token))]);
    s.envoy.get("/invoices/1", &[]);
    s.envoy.get("/invoices/1", &[]);
    let stats = s.envoy.admin("/stats?filter=agentgate").body;
    assert!(stats.contains("agentgate.allowed: 1"), "{stats}");
    assert!(stats.contains("agentgate.denied.missing_token: 2"), "{stats}");
}

#[test]
fn invalid_policy_makes_envoy_refuse_the_filter() {
    let signer = Signer::es256("es-1", 1);
    let bad_rules = json!([{"name": "r", "match": {"path": "invoices/{id}"}}]);
    let (accepted, output) = validate(&policy(&signer.jwks(), &bad_rules, "enforce"));
    assert!(!accepted, "envoy accepted an invalid policy:\n{output}");
    assert!(output.contains("agentgate: invalid policy: rules[0].match.path: must start with '/'"), "{output}");

    let (accepted, output) = validate(&policy(&signer.jwks(), &read_invoice_rule(), "enforce"));
    assert!(accepted, "envoy refused a valid policy:\n{output}");
}

#[test]
fn audience_constant_is_what_the_policy_trusts() {
    // Guards the fixtures themselves: the e2e policy trusts exactly the audience tokens carry.
    let p: Value = serde_json::from_str(&policy(&json!({"keys": []}), &json!([]), "enforce")).unwrap_or_default();
    assert_eq!(p["providers"][0]["audiences"], json!([AUDIENCE]));
}

#[test]
fn hostile_tokens_are_refused_and_envoy_keeps_serving() {
    use agentgate_test_harness::tokens::b64;
    let s = start();
    let t = now();
    let claims = agent_claims("agent-7", "invoices:read", t);
    let raw = |header: &str, sig: &[u8]| {
        format!("{}.{}.{}", b64(header.as_bytes()), b64(claims.to_string().as_bytes()), b64(sig))
    };
    let deep = format!(r#"{{"iss":"x","a":{}1{}}}"#, "[".repeat(2_000), "]".repeat(2_000));
    let cases: Vec<(&str, String)> = vec![
        ("alg none", raw(r#"{"alg":"none","kid":"es-1"}"#, b"x")),
        ("alg NoNe", raw(r#"{"alg":"NoNe","kid":"es-1"}"#, b"x")),
        ("HS256 confusion", raw(r#"{"alg":"HS256","kid":"es-1"}"#, &[7; 32])),
        ("psychic signature", raw(r#"{"alg":"ES256","kid":"es-1"}"#, &[0; 64])),
        ("crit", s.signer.sign_with_header(&json!({"alg": "ES256", "kid": "es-1", "crit": ["x"]}), &claims)),
        ("duplicate alg", raw(r#"{"alg":"none","alg":"ES256","kid":"es-1"}"#, &[1; 64])),
        ("kid traversal", s.signer.sign_with_header(&json!({"alg": "ES256", "kid": "../../etc/passwd"}), &claims)),
        ("deep json", format!("{}.{}.AAAA", b64(br#"{"alg":"ES256"}"#), b64(deep.as_bytes()))),
        ("bad base64", format!("{}.!!!.AAAA", b64(br#"{"alg":"ES256"}"#))),
        ("empty segments", "..".to_string()),
    ];
    for (name, token) in &cases {
        let r = s.envoy.get("/invoices/42", &[("authorization", &bearer(token))]);
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert!(r.header("www-authenticate").is_some_and(|c| c.contains("invalid_token")), "{name}");
    }
    // A 1 MB token: Envoy itself refuses headers that large (431), before the filter runs.
    let huge = s.envoy.get("/invoices/42", &[("authorization", &bearer(&"a".repeat(1 << 20)))]);
    assert!(matches!(huge.status, 431 | 401 | 0), "huge token: {}", huge.status);
    let ok = s.signer.sign(&claims);
    assert_eq!(s.envoy.get("/invoices/42", &[("authorization", &bearer(&ok))]).status, 200, "Envoy still serves");
    assert!(!s.envoy.logs().contains("panicked"), "{}", s.envoy.logs());
}

#[test]
fn task_scoped_rules_delegation_approval_and_revocation() {
    let signer = Signer::es256("es-1", 1);
    let rules = json!([{
        "name": "pay-invoice",
        "match": {"methods": ["GET"], "path": "/invoices/{id}/pay"},
        "require": {
            "task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{id}"},
            "max_delegation_depth": 1,
            "actors": ["orchestrator-*"],
            "approval": {"acr_values": ["urn:corp:human-approved"], "max_age_seconds": 300}
        }
    }]);
    let mut p: Value = serde_json::from_str(&policy(&signer.jwks(), &rules, "enforce")).unwrap_or_default();
    p["revoked"] = json!({"subjects": ["mallory"]});
    let upstream = Upstream::start();
    let envoy = Envoy::start(&p.to_string(), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let t = now();
    let token = |edit: &dyn Fn(&mut Value)| {
        let mut c = agent_claims("alice", "", t);
        c["authorization_details"] = json!([{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]);
        c["act"] = json!({"sub": "orchestrator-1"});
        c["acr"] = json!("urn:corp:human-approved");
        c["auth_time"] = json!(t - 10);
        edit(&mut c);
        bearer(&signer.sign(&c))
    };
    let get = |path: &str, auth: &str| envoy.get(path, &[("authorization", auth)]);

    let ok = get("/invoices/42/pay", &token(&|_| {}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.upstream_header("x-agent-id").as_deref(), Some("orchestrator-1"));
    assert_eq!(ok.upstream_header("x-agent-on-behalf-of").as_deref(), Some("alice"));
    assert_eq!(ok.upstream_header("x-agent-delegation-chain").as_deref(), Some("orchestrator-1"));
    assert_eq!(ok.upstream_header("x-agent-task-type").as_deref(), Some("invoice_processing"));
    assert_eq!(ok.upstream_header("x-agent-task-id").as_deref(), Some("42"));

    let other_invoice = get("/invoices/43/pay", &token(&|_| {}));
    assert_eq!(other_invoice.status, 403);

    let too_deep =
        get("/invoices/42/pay", &token(&|c| c["act"] = json!({"sub": "orchestrator-1", "act": {"sub": "planner"}})));
    assert_eq!(too_deep.status, 403);
    let wrong_actor = get("/invoices/42/pay", &token(&|c| c["act"] = json!({"sub": "scraper"})));
    assert_eq!(wrong_actor.status, 403);

    let unapproved = get("/invoices/42/pay", &token(&|c| c["acr"] = json!("urn:corp:mfa")));
    assert_eq!(unapproved.status, 401);
    let challenge = unapproved.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer error=\"insufficient_user_authentication\""), "{challenge}");
    assert!(challenge.contains("acr_values=\"urn:corp:human-approved\", max_age=300"), "{challenge}");

    let revoked = get("/invoices/42/pay", &token(&|c| c["sub"] = json!("mallory")));
    assert_eq!(revoked.status, 403);

    let reasons: Vec<Value> = envoy.audit_records().iter().map(|r| r["reason"].clone()).collect();
    assert_eq!(
        reasons,
        [
            Value::Null,
            json!("task_mismatch"),
            json!("delegation_not_allowed"),
            json!("delegation_not_allowed"),
            json!("approval_required"),
            json!("revoked")
        ]
    );
}

#[test]
fn source_cidrs_use_the_address_envoy_saw() {
    let signer = Signer::es256("es-1", 1);
    let rules = json!([
        {"name": "loopback", "match": {"path": "/local"}, "require": {"source_cidrs": ["127.0.0.0/8"]}},
        {"name": "corp-net", "match": {"path": "/corp"}, "require": {"source_cidrs": ["10.0.0.0/8"]}},
    ]);
    let upstream = Upstream::start();
    let envoy =
        Envoy::start(&policy(&signer.jwks(), &rules, "enforce"), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let auth = bearer(&signer.sign(&agent_claims("agent-7", "", now())));
    assert_eq!(envoy.get("/local", &[("authorization", &auth)]).status, 200);
    assert_eq!(envoy.get("/corp", &[("authorization", &auth), ("x-forwarded-for", "10.1.1.1")]).status, 403);
    assert_eq!(envoy.audit_records().last().map(|r| r["reason"].clone()), Some(json!("source_not_allowed")));
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let signer = Signer::es256("es-1", 1);
    let mut rules = read_invoice_rule();
    rules[0]["rate_limit"] = json!({"requests": 2, "per_seconds": 60});
    let upstream = Upstream::start();
    let envoy =
        Envoy::start(&policy(&signer.jwks(), &rules, "enforce"), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let auth = bearer(&signer.sign(&agent_claims("agent-7", "invoices:read", now())));
    let statuses: Vec<u16> = (0..3).map(|_| envoy.get("/invoices/1", &[("authorization", &auth)]).status).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let limited = envoy.get("/invoices/1", &[("authorization", &auth)]);
    assert!(
        limited.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=30).contains(&s))),
        "{limited:?}"
    );
    assert_eq!(limited.json()["error"], "too_many_requests");
}

#[test]
fn tokens_in_cookies_and_query_strings_stay_at_the_gate() {
    let signer = Signer::es256("es-1", 1);
    let mut p: Value =
        serde_json::from_str(&policy(&signer.jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["token_sources"] = json!([{"cookie": "agent_token"}, {"query": "access_token"}]);
    let upstream = Upstream::start();
    let envoy = Envoy::start(&p.to_string(), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let token = signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    let by_cookie = envoy.get("/invoices/1?page=2", &[("cookie", &format!("theme=dark; agent_token={token}"))]);
    assert_eq!(by_cookie.status, 200, "{}", by_cookie.body);
    assert_eq!(by_cookie.upstream_header("cookie").as_deref(), Some("theme=dark"));
    assert_eq!(by_cookie.json()["path"], "/invoices/1?page=2");
    let by_query = envoy.get(&format!("/invoices/1?page=2&access_token={token}"), &[]);
    assert_eq!(by_query.status, 200, "{}", by_query.body);
    assert_eq!(by_query.json()["path"], "/invoices/1?page=2");
    let denied_by_query = envoy.get(&format!("/other?access_token={token}"), &[]);
    assert_eq!(denied_by_query.status, 403);
    // Neither the token nor its signature is in Envoy's log, the audit records or the access log.
    let access_log: Vec<String> = envoy.access_log(3).iter().map(Value::to_string).collect();
    assert_eq!(access_log.len(), 3);
    let signature = token.rsplit('.').next().unwrap_or_default();
    for text in [envoy.logs(), access_log.join("\n")] {
        assert!(!text.contains(signature), "a signature is logged:\n{text}");
    }
    assert_eq!(envoy.audit_records().len(), 3);
    assert!(envoy.audit_records().iter().all(|r| r["token_fingerprint"].as_str().is_some_and(|f| f.len() == 16)));
}

#[test]
fn access_log_shows_decision_rule_and_agent() {
    let s = start();
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    let allowed = s.envoy.get("/invoices/42?page=1", &[("authorization", &bearer(&token))]);
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let narrow = s.signer.sign(&agent_claims("agent-8", "profile", now()));
    let denied = s.envoy.get("/invoices/42", &[("authorization", &bearer(&narrow))]);
    assert_eq!(denied.status, 403, "{}", denied.body);

    let lines = s.envoy.access_log(2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (first, second) = (&lines[0], &lines[1]);
    assert_eq!(first["agentgate_decision"], "allow", "{first}");
    assert_eq!(first["agentgate_rule"], "read-invoice");
    assert_eq!(first["agentgate_agent"], "agent-7");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/invoices/42", "no query string in the access log");
    assert_eq!(second["agentgate_decision"], "deny", "{second}");
    assert_eq!(second["agentgate_reason"], "insufficient_scope");
    assert_eq!(second["agentgate_rule"], "read-invoice");
    assert_eq!(second["agentgate_agent"], "agent-8");
    assert_eq!(second["status"], 403);
    // The access log and the audit record name the same request.
    assert_eq!(Some(&second["request_id"]), s.envoy.audit_records().last().map(|r| &r["audit_id"]));
}

#[test]
fn prometheus_shows_the_counters_moving() {
    let s = start();
    let metric = |text: &str, name: &str| -> Option<u64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key.strip_suffix("{}") == Some(name)).then(|| value.parse().ok()).flatten()
        })
    };
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    s.envoy.get("/invoices/1", &[("authorization", &bearer(&token))]);
    s.envoy.get("/invoices/1", &[]);
    let before = s.envoy.admin("/stats/prometheus").body;
    s.envoy.get("/invoices/2", &[("authorization", &bearer(&token))]);
    s.envoy.get("/invoices/2", &[]);
    let after = s.envoy.admin("/stats/prometheus").body;
    for (name, moved_by) in [
        ("agentgate_allowed", 1),
        ("agentgate_denied_missing_token", 1),
        ("agentgate_rule_read_invoice_allowed", 1),
        ("agentgate_token_cache_hit", 1),
    ] {
        let (b, a) = (metric(&before, name), metric(&after, name));
        assert!(b.is_some() && a == b.map(|b| b + moved_by), "{name}: {b:?} -> {a:?}\n{after}");
    }
    assert_eq!(metric(&after, "agentgate_token_cache_miss"), Some(1));
}

#[test]
fn envoy_offers_everything_the_filter_probes_for() {
    // A policy that needs peer certificates and single-use tokens loads in Envoy (the probes
    // find shared data and the peer-certificate properties), and a plain-TCP client has no
    // peer to bind to.
    let signer = Signer::es256("es-1", 1);
    let mut rule = read_invoice_rule();
    rule[0]["require"]["bind_mtls_peer"] = json!(true);
    let mut p: Value = serde_json::from_str(&policy(&signer.jwks(), &rule, "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    p["providers"][0]["max_lifetime_seconds"] = json!(3600);
    let upstream = Upstream::start();
    let envoy = Envoy::start(&p.to_string(), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let logs = envoy.logs();
    assert!(!logs.contains("cannot run on this host") && !logs.contains("per worker VM"), "{logs}");
    let token = signer.sign(&agent_claims("spiffe://corp.example/agent/a", "invoices:read", now()));
    let r = envoy.get("/invoices/42", &[("authorization", &bearer(&token))]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(envoy.audit_records().last().map(|r| r["reason"].clone()), Some(json!("peer_mismatch")));
}

#[test]
fn a_header_that_is_not_utf8_gets_an_answer_and_the_filter_lives_on() {
    // HTTP allows obs-text (bytes 0x80-0xFF) in header values, and Envoy passes them on. The
    // SDK's header reader panicked on them: one such request aborted the worker's VM.
    let s = start();
    let no_token = b"GET /invoices/42 HTTP/1.1\r\nHost: api\r\nX-Note: \xff\xfe\r\nConnection: close\r\n\r\n";
    assert_eq!(s.envoy.raw(no_token), 401, "{}", s.envoy.logs());
    let token = s.signer.sign(&agent_claims("agent-7", "invoices:read", now()));
    let mut latin1 =
        format!("GET /invoices/42 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n").into_bytes();
    latin1.extend_from_slice(b"X-Note: caf\xe9\r\nConnection: close\r\n\r\n");
    assert_ne!(s.envoy.raw(&latin1), 0);
    assert_eq!(s.envoy.audit_records().last().map(|r| r["decision"].clone()), Some(json!("allow")));
    let r = s.envoy.get("/invoices/42", &[("authorization", &bearer(&token))]);
    assert_eq!(r.status, 200, "the VM is still there: {}", s.envoy.logs());
    assert!(!s.envoy.logs().contains("panicked"), "{}", s.envoy.logs());
}

/// Raw HTTP/1.1, so that no client library normalizes the spelling on the way.
fn raw_request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("{method} {target} HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 0\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("connection: close\r\n\r\n");
    request.into_bytes()
}

#[test]
fn other_spellings_of_an_operation_meet_its_rule_in_envoy() {
    let signer = Signer::es256("es-1", 1);
    let rules = json!([
        {"name": "approve", "match": {"methods": ["POST"], "path": "/invoices/{id}/approve"},
         "require": {"scopes": ["invoices:approve"]}},
        {"name": "read-any", "match": {"path": "/invoices/{*rest}"}, "require": {"scopes": ["invoices:read"]}},
        {"name": "public", "match": {"path": "/public/{*rest}"}},
    ]);
    let mut p: Value = serde_json::from_str(&policy(&signer.jwks(), &rules, "enforce")).unwrap_or_default();
    p["revoked"] = json!({"subjects": ["agent-13"]});
    let upstream = Upstream::start();
    let envoy = Envoy::start(&p.to_string(), upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let auth = bearer(&signer.sign(&agent_claims("agent-7", "invoices:read", now())));
    let status = |method: &str, target: &str| envoy.raw(&raw_request(method, target, &[("authorization", &auth)]));

    assert_eq!(status("GET", "/invoices/42"), 200, "the read rule still allows reads");
    assert_eq!(status("POST", "/invoices/42/approve"), 403);
    for target in [
        "/invoices/42/%61pprove",
        "/invoices/42/APPROVE",
        "/invoices/42/approve/",
        "/invoices/42/approve;x",
        "/invoices/42/approve.",
        "/invoices/42/%2561pprove",
        "/invoices/42/appro%C5%BFe",
    ] {
        let got = status("POST", target);
        assert!(got == 400 || got == 403, "POST {target}: {got}");
    }
    assert_eq!(status("post", "/invoices/42/approve"), 400, "a case variant of POST");
    for target in
        ["/public/..;/invoices/42/approve", "/public/%252e%252e/invoices/1", "/public/%c0%ae%c0%ae/invoices/1"]
    {
        let got = status("POST", target);
        assert!(got == 400 || got == 403, "POST {target}: {got}");
    }
    let records = envoy.audit_records();
    assert!(records.iter().all(|r| r["decision"] == "deny" || r["rule"] == "read-any"), "{records:?}");
    assert!(records.iter().any(|r| r["reason"] == "non_canonical_path"), "the filter saw raw spellings: {records:?}");

    // A revoked agent acting for someone else is still revoked; forged audit headers in the
    // underscore spelling never reach the upstream.
    let mut delegated = agent_claims("alice", "invoices:read", now());
    delegated["act"] = json!({"sub": "agent-13"});
    let r = envoy.get("/invoices/42", &[("authorization", &bearer(&signer.sign(&delegated)))]);
    assert_eq!(r.status, 403);
    let r = envoy.get("/invoices/42", &[("authorization", &auth), ("x_agent_on_behalf_of", "ceo")]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.upstream_header("x_agent_on_behalf_of"), None);
}

/// The worker thread of each audit record, from Envoy's log line (`[time][thread][level]`).
fn audit_threads(envoy: &Envoy, agent: &str) -> Vec<String> {
    envoy
        .logs()
        .lines()
        .filter(|l| l.contains("agentgate audit") && l.contains(&format!("\"agent\":\"{agent}\"")))
        .filter_map(|l| l.split(']').nth(1).map(|t| t.trim_start_matches('[').to_string()))
        .collect()
}

#[test]
fn an_agent_straying_across_two_workers_is_quarantined_after_max_denials_in_all() {
    let signer = Signer::es256("es-1", 1);
    let mut p: Value =
        serde_json::from_str(&policy(&signer.jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["quarantine"] = json!({"window_seconds": 60, "max_denials": 4, "cool_off_seconds": 2});
    let upstream = Upstream::start();
    let envoy = Envoy::start_workers(&p.to_string(), upstream.port, 2).unwrap_or_else(|e| panic!("{e}"));
    // New connections spread over the workers; try agents until one's denials landed on both.
    for n in 0..6 {
        let agent = format!("agent-{n}");
        let stray = bearer(&signer.sign(&agent_claims(&agent, "invoices:list", now())));
        let good = bearer(&signer.sign(&agent_claims(&agent, "invoices:read", now())));
        for _ in 0..4 {
            assert_eq!(envoy.raw(&raw_request("GET", "/invoices/42", &[("authorization", &stray)])), 403);
        }
        let mut threads = audit_threads(&envoy, &agent);
        threads.sort();
        threads.dedup();
        if threads.len() < 2 {
            continue;
        }
        // Counted together: the fourth denial, on either worker, quarantined the agent everywhere.
        for _ in 0..4 {
            assert_eq!(envoy.raw(&raw_request("GET", "/invoices/42", &[("authorization", &good)])), 403);
        }
        let reasons: Vec<Value> =
            envoy.audit_records().iter().filter(|r| r["agent"] == agent).map(|r| r["reason"].clone()).collect();
        assert_eq!(reasons.iter().filter(|r| **r == json!("quarantined")).count(), 4, "{reasons:?}");
        assert!(envoy.logs().contains(&format!("agentgate quarantine {{\"agent\":\"{agent}\"")));
        // The cool-off ends.
        std::thread::sleep(std::time::Duration::from_millis(2200));
        assert_eq!(envoy.raw(&raw_request("GET", "/invoices/42", &[("authorization", &good)])), 200);
        return;
    }
    panic!("no agent's requests reached both workers");
}
