//! Regression tests for the authorization bypasses a security review found: every other
//! spelling of an operation, and every other role of an identity, must meet the rule meant
//! for it — never a broader one. Each case failed before the fix.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn gate_with(rules: Value, edit: impl FnOnce(&mut Value)) -> Gate {
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap();
    edit(&mut p);
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn token_with(scope: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut c = agent_claims("agent-7", scope, NOW);
    edit(&mut c);
    signer().sign(&c)
}

fn request(gate: &Gate, method: &str, path: &str, headers: &[(&str, &str)]) -> Decision {
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    gate.evaluate(&Request::new(method, path, &headers, NOW))
}

fn call(gate: &Gate, method: &str, path: &str, token: &str) -> Decision {
    let auth = format!("Bearer {token}");
    request(gate, method, path, &[(":authority", "api.example.com"), ("authorization", &auth)])
}

/// `approve` needs its own scope; everything else under /invoices only `invoices:read`.
fn invoices() -> Gate {
    gate_with(
        json!([
            {"name": "approve", "match": {"methods": ["POST"], "path": "/invoices/{id}/approve"},
             "require": {"scopes": ["invoices:approve"]}},
            {"name": "read-any", "match": {"path": "/invoices/{*rest}"}, "require": {"scopes": ["invoices:read"]}},
        ]),
        |_| {},
    )
}

/// `/admin` needs `admin`; `/public` any agent.
fn admin_public() -> Gate {
    gate_with(
        json!([
            {"name": "admin", "match": {"path": "/admin/{*rest}"}, "require": {"scopes": ["admin"]}},
            {"name": "public", "match": {"path": "/public/{*rest}"}},
        ]),
        |_| {},
    )
}

/// A spelling is safe when it reaches the rule meant for it, or is refused with 400.
fn assert_safe(d: &Decision, meant: &str, spelling: &str, family: &str) {
    let refused = d.reason.is_some_and(|r| r.status() == 400);
    let reached = d.rule.as_deref() == Some(meant) && !d.allowed;
    assert!(refused || reached, "{family}: {spelling:?} got {:?} under {:?}", d.reason, d.rule);
}

/// What a family of backends routes to `POST /invoices/42/approve`, and to `/admin/users`.
const BACKENDS: &[(&str, &[&str], &[&str])] = &[
    (
        "RFC 3986 normalizers (percent-escapes of unreserved characters, hex case)",
        &["/invoices/42/%61pprove", "/invoices/42/%61%70%70%72%6f%76%65", "/invoices/%34%32/approve"],
        &["/public/%2e%2e/admin/users", "/public/%2E%2E/admin/users", "/public/./../admin/users"],
    ),
    (
        "Express (case-insensitive routes, a trailing slash ignored)",
        &["/invoices/42/APPROVE", "/Invoices/42/Approve", "/invoices/42/approve/", "/INVOICES/42/approve/"],
        &["/ADMIN/users", "/Admin/users/"],
    ),
    (
        "Spring (decodes, strips ; parameters, trims)",
        &["/invoices/42/approve;x", "/invoices/42;v=1/approve", "/invoices/42/approve%3Bx", "/invoices/42/approve%20"],
        &["/public/..;/admin/users", "/admin;x/users", "/public/%2e%2e;/admin/users"],
    ),
    (
        "Tomcat and Jetty (resolve ..; and decoded dot segments)",
        &[],
        &["/public/..;/admin/users", "/public/..;x=1/admin/users"],
    ),
    (
        "double decoders and lenient UTF-8 decoders",
        &["/invoices/42/%2561pprove"],
        &[
            "/public/%252e%252e/admin/users",
            "/public/%c0%ae%c0%ae/admin/users",
            "/public/%e0%80%ae%e0%80%ae/admin/users",
        ],
    ),
    (
        "IIS and Windows (%u escapes, trailing dots, backslashes, fullwidth forms)",
        &["/invoices/42/approve.", "/invoices/42/%u0061pprove", "/invoices/42/\u{ff41}pprove"],
        &["/public/%u002e%u002e/admin/users", "/public\\..\\admin/users", "/public/%5c../admin/users", "/admin./users"],
    ),
    (
        "clients and proxies that forward a fragment or whitespace",
        &["/invoices/42/approve#x", "/invoices/42/approve%09", "/invoices/42/approve%00"],
        &["/public/x#/../../admin/users", "/public/%09/../admin/users"],
    ),
    (
        "Unicode case folding (Java equalsIgnoreCase, .NET OrdinalIgnoreCase)",
        &["/invoices/42/appro\u{17f}e"],
        &["/\u{212a}admin/users", "/adm\u{131}n/users"],
    ),
];

#[test]
fn every_backend_spelling_of_an_operation_meets_its_rule() {
    let (invoices, admin) = (invoices(), admin_public());
    let read_only = token_with("invoices:read", |_| {});
    for (family, approve_spellings, admin_spellings) in BACKENDS {
        for spelling in *approve_spellings {
            assert_safe(&call(&invoices, "POST", spelling, &read_only), "approve", spelling, family);
        }
        for spelling in *admin_spellings {
            assert_safe(&call(&admin, "GET", spelling, &read_only), "admin", spelling, family);
        }
    }
    // The canonical spellings themselves reach their rules.
    let approve = call(&invoices, "POST", "/invoices/42/approve", &read_only);
    assert_eq!((approve.rule.as_deref(), approve.reason), (Some("approve"), Some(Reason::InsufficientScope)));
    let admin_call = call(&admin, "GET", "/admin/users", &read_only);
    assert_eq!((admin_call.rule.as_deref(), admin_call.reason), (Some("admin"), Some(Reason::InsufficientScope)));
}

#[test]
fn refused_spellings_are_400_invalid_request() {
    let read_only = token_with("invoices:read", |_| {});
    for spelling in ["/invoices/42/approve;x", "/public/%252e%252e/admin/users", "/invoices/42/approve#x"] {
        let d = call(&invoices(), "POST", spelling, &read_only);
        assert_eq!(d.reason, Some(Reason::NonCanonicalPath), "{spelling}");
        let Action::Respond { status, headers, .. } = &d.action else { panic!("{spelling} forwarded") };
        assert_eq!(*status, 400);
        let challenge = headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.as_str());
        assert!(challenge.is_some_and(|c| c.contains("invalid_request")), "{challenge:?}");
    }
}

#[test]
fn plain_requests_keep_working() {
    let gate = gate_with(
        json!([{"name": "files", "match": {"methods": ["GET"], "path": "/files/{name}"},
                "require": {"task": {"type": "file", "identifier": "{name}"}}}]),
        |_| {},
    );
    let token = token_with("", |c| c["authorization_details"] = json!([{"type": "file", "identifier": "café"}]));
    for path in ["/files/caf%C3%A9", "/files/caf%c3%a9?dir=a%2Fb&x=%25", "/files/café", "/FILES/caf%C3%A9/"] {
        let d = call(&gate, "GET", path, &token);
        assert!(d.allowed, "{path}: {:?}", d.reason);
        assert_eq!(d.audit.task_identifier.as_deref(), Some("café"), "{path}");
    }
    // Parameter values keep their case: CAFÉ is another resource.
    assert_eq!(call(&gate, "GET", "/files/CAF%C3%89", &token).reason, Some(Reason::TaskMismatch));
}

#[test]
fn ignored_path_parameters_match_without_them_and_still_refuse_dot_segments() {
    let gate = gate_with(
        json!([
            {"name": "admin", "match": {"path": "/admin/{*rest}"}, "require": {"scopes": ["admin"]}},
            {"name": "public", "match": {"path": "/public/{*rest}"}},
        ]),
        |p| p["path_parameters"] = json!("ignore"),
    );
    let token = token_with("invoices:read", |_| {});
    assert!(call(&gate, "GET", "/public/page;jsessionid=1", &token).allowed);
    let admin = call(&gate, "GET", "/admin;x/users", &token);
    assert_eq!((admin.rule.as_deref(), admin.reason), (Some("admin"), Some(Reason::InsufficientScope)));
    assert_eq!(call(&gate, "GET", "/public/..;/admin/users", &token).reason, Some(Reason::NonCanonicalPath));
}

#[test]
fn a_case_variant_of_a_method_is_refused_not_unknown() {
    let read_only = token_with("invoices:read", |_| {});
    for method in ["post", "Post", "pOST"] {
        let d = call(&invoices(), method, "/invoices/42/approve", &read_only);
        assert_eq!(d.reason, Some(Reason::NonCanonicalMethod), "{method}");
        assert_eq!(d.reason.map(Reason::status), Some(400));
    }
    // An extension method is no variant: it matches rules for any method.
    assert!(call(&invoices(), "PROPFIND", "/invoices/42", &read_only).allowed);
}

#[test]
fn a_host_spelling_cannot_dodge_a_hosts_rule() {
    let gate = gate_with(
        json!([
            {"name": "admin-host", "match": {"hosts": ["admin.example.com"]}, "require": {"scopes": ["admin"]}},
            {"name": "anything", "match": {}},
        ]),
        |_| {},
    );
    let token = format!("Bearer {}", token_with("invoices:read", |_| {}));
    for authority in ["admin.example.com", "ADMIN.example.com", "admin.example.com.", "Admin.Example.Com.:8443"] {
        let d = request(&gate, "GET", "/x", &[(":authority", authority), ("authorization", &token)]);
        assert_eq!((d.rule.as_deref(), d.reason), (Some("admin-host"), Some(Reason::InsufficientScope)), "{authority}");
    }
    for authority in ["admin.example.com..", "%61dmin.example.com", "admin example.com"] {
        let d = request(&gate, "GET", "/x", &[(":authority", authority), ("authorization", &token)]);
        assert_eq!(d.reason, Some(Reason::NonCanonicalHost), "{authority}");
    }
    let d = request(&gate, "GET", "/x", &[("Host", "ADMIN.example.com."), ("Authorization", &token)]);
    assert_eq!(d.rule.as_deref(), Some("admin-host"), "HTTP/1 Host in the client's case");
}

fn any_agent(edit: impl FnOnce(&mut Value)) -> Gate {
    gate_with(json!([{"name": "any", "match": {}}]), edit)
}

fn delegated(sub: &str, actors: &[&str]) -> String {
    let act = actors.iter().rev().fold(Value::Null, |inner, actor| {
        let mut a = json!({"sub": actor});
        if !inner.is_null() {
            a["act"] = inner;
        }
        a
    });
    let mut c = agent_claims(sub, "invoices:read", NOW);
    c["act"] = act;
    signer().sign(&c)
}

#[test]
fn a_revoked_identity_is_revoked_in_every_role() {
    for list in ["subjects", "actors"] {
        let gate = any_agent(|p| p["revoked"] = json!({ list: ["agent-13"] }));
        for token in [
            token_with("", |c| c["sub"] = json!("agent-13")),
            delegated("alice", &["agent-13"]),
            delegated("alice", &["agent-2", "agent-13"]),
            delegated("agent-13", &["agent-2"]),
        ] {
            assert_eq!(call(&gate, "GET", "/x", &token).reason, Some(Reason::Revoked), "revoked.{list}");
        }
        assert!(call(&gate, "GET", "/x", &delegated("alice", &["agent-2"])).allowed);
    }
}

#[test]
fn every_actor_of_a_chain_must_be_allowed() {
    let gate = gate_with(json!([{"name": "r", "match": {}, "require": {"actors": ["agent-*"]}}]), |_| {});
    assert!(call(&gate, "GET", "/x", &delegated("alice", &["agent-2", "agent-1"])).allowed);
    let d = call(&gate, "GET", "/x", &delegated("alice", &["agent-2", "mallory"]));
    assert_eq!(d.reason, Some(Reason::DelegationNotAllowed), "an unlisted prior actor");
}

#[test]
fn an_act_without_sub_is_malformed() {
    let gate = any_agent(|_| {});
    let no_subject = token_with("", |c| {
        c.as_object_mut().unwrap().remove("sub");
        c["act"] = json!({"sub": "agent-2"});
    });
    let nameless_actor = token_with("", |c| c["act"] = json!({"act": {"sub": "agent-1"}}));
    let nameless_prior = token_with("", |c| c["act"] = json!({"sub": "agent-2", "act": {"iss": "x"}}));
    for token in [no_subject, nameless_actor, nameless_prior] {
        assert_eq!(call(&gate, "GET", "/x", &token).reason, Some(Reason::Malformed));
    }
}

#[test]
fn forged_audit_headers_are_removed_in_every_spelling() {
    let token = format!("Bearer {}", token_with("", |_| {}));
    let d = request(
        &any_agent(|_| {}),
        "GET",
        "/x",
        &[
            ("authorization", &token),
            ("x_agent_on_behalf_of", "ceo"),
            ("X-Agent-Id", "root"),
            ("x-agent_id", "root"),
            ("X_AGENT_RULE", "admin"),
        ],
    );
    let Action::Continue { remove, .. } = &d.action else { panic!("{:?}", d.reason) };
    for forged in ["x_agent_on_behalf_of", "X-Agent-Id", "x-agent_id", "X_AGENT_RULE"] {
        assert!(remove.iter().any(|r| r == forged), "{forged} not removed: {remove:?}");
    }
}

#[test]
fn a_header_condition_holds_for_every_value_of_a_repeated_header() {
    let gate = gate_with(
        json!([{"name": "r", "match": {}, "require": {"headers": [{"name": "X-Tenant", "equals": "acme"}]}}]),
        |_| {},
    );
    let token = format!("Bearer {}", token_with("", |_| {}));
    let with = |tenants: &[&str]| {
        let mut headers = vec![("authorization", token.as_str())];
        headers.extend(tenants.iter().map(|t| ("x-tenant", *t)));
        request(&gate, "GET", "/x", &headers).reason
    };
    assert_eq!(with(&["acme"]), None);
    assert_eq!(with(&["acme", "acme"]), None);
    assert_eq!(with(&["acme", "evil"]), Some(Reason::HeaderMismatch));
    assert_eq!(with(&["evil", "acme"]), Some(Reason::HeaderMismatch));
    let d = request(&gate, "GET", "/x", &[("Authorization", &token), ("X-TENANT", "acme")]);
    assert_eq!(d.reason, None, "header names in the client's case");
}

#[test]
fn a_path_parameter_is_never_expanded_as_a_template() {
    let gate = gate_with(
        json!([{"name": "r", "match": {"path": "/orgs/{org}/invoices/{id}"},
                "require": {"task": {"type": "invoice", "identifier": "{id}@{org}"}}}]),
        |_| {},
    );
    let token = token_with("", |c| c["authorization_details"] = json!([{"type": "invoice", "identifier": "7@ac7e"}]));
    let d = call(&gate, "GET", "/orgs/ac%7Bid%7De/invoices/7", &token);
    assert_eq!(d.audit.task_identifier.as_deref(), Some("7@ac{id}e"));
    assert_eq!(d.reason, Some(Reason::TaskMismatch));
}

#[test]
fn explain_routes_exactly_as_the_gate() {
    let read_only = token_with("invoices:read", |_| {});
    let headers = vec![("authorization".to_string(), format!("Bearer {read_only}"))];
    let explain = |method: &str, path: &str| invoices().explain(&Request::new(method, path, &headers, NOW));
    assert_eq!(explain("POST", "/invoices/42/%2e%2e/x"), Err(Reason::NonCanonicalPath));
    assert_eq!(explain("post", "/invoices/42"), Err(Reason::NonCanonicalMethod));
    let checks = explain("POST", "/invoices/42/APPROVE").unwrap();
    assert_eq!(checks, vec![("scopes", Err(Reason::InsufficientScope))], "the approve rule, not read-any");
}

#[test]
fn access_log_fields_are_escaped_like_headers() {
    let gate = any_agent(|_| {});
    let token = token_with("", |c| c["sub"] = json!("agent\n7\" x=\u{e9}"));
    let fields = call(&gate, "GET", "/x", &token).audit.log_fields();
    let agent = fields.iter().find(|(n, _)| *n == "agent").map(|(_, v)| v.as_str());
    assert_eq!(agent, Some("agent%0A7\" x=%C3%A9"));
}

fn single_use(lifetime: u64, skew: u64) -> Gate {
    any_agent(|p| {
        p["providers"][0]["single_use"] = json!(true);
        p["providers"][0]["max_lifetime_seconds"] = json!(lifetime);
        p["providers"][0]["clock_skew_seconds"] = json!(skew);
    })
}

#[test]
fn a_used_token_stays_used_across_a_reconfiguration() {
    let first = single_use(600, 30);
    let token = token_with("", |c| c["jti"] = json!("once"));
    assert!(call(&first, "GET", "/x", &token).allowed);
    // The replaced policy changes lifetime and skew: memory and shared buckets must not move.
    let mut second = single_use(900, 60);
    second.inherit_state(&first);
    assert_eq!(call(&second, "GET", "/x", &token).reason, Some(Reason::Replayed));
    let rings = |g: &Gate| g.policy().providers[0].single_use_ring;
    assert_eq!(rings(&first), rings(&second), "shared-data buckets are where the first policy left them");
    assert!(second.policy().needs_shared_single_use());
    let per_worker = any_agent(|p| {
        p["providers"][0]["single_use"] = json!(true);
        p["providers"][0]["max_lifetime_seconds"] = json!(600);
        p["providers"][0]["single_use_scope"] = json!("worker");
    });
    assert!(!per_worker.policy().needs_shared_single_use());
}
