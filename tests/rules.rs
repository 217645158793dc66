//! The rule language, one requirement kind per test, each with both outcomes.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn gate(rules: Value) -> Gate {
    gate_with(rules, |_| {})
}

fn gate_with(rules: Value, edit: impl FnOnce(&mut Value)) -> Gate {
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap();
    edit(&mut p);
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn token(edit: impl FnOnce(&mut Value)) -> String {
    let mut c = agent_claims("agent-7", "invoices:read", NOW);
    edit(&mut c);
    signer().sign(&c)
}

fn eval(gate: &Gate, method: &str, authority: &str, path: &str, token: &str) -> Decision {
    let headers = vec![
        (":authority".to_string(), authority.to_string()),
        ("authorization".to_string(), format!("Bearer {token}")),
    ];
    gate.evaluate(&Request::new(method, path, &headers, NOW))
}

fn reason(gate: &Gate, path: &str, token: &str) -> Option<Reason> {
    eval(gate, "POST", "api.example.com", path, token).reason
}

fn pay_rule(extra: Value) -> Value {
    let mut require = json!({"task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{id}"}});
    require.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    json!([{"name": "pay-invoice", "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"}, "require": require}])
}

fn pay_task(identifier: &str) -> Value {
    json!([{"type": "invoice_processing", "actions": ["read", "pay"], "identifier": identifier}])
}

#[test]
fn task_identifier_is_bound_to_the_path() {
    let g = gate(pay_rule(json!({})));
    let t = token(|c| c["authorization_details"] = pay_task("42"));
    assert_eq!(reason(&g, "/invoices/42/pay", &t), None);
    let d = eval(&g, "POST", "api", "/invoices/43/pay", &t);
    assert_eq!(d.reason, Some(Reason::TaskMismatch));
    assert_eq!(d.audit.task_identifier.as_deref(), Some("43"));
}

#[test]
fn task_needs_the_type_and_every_action() {
    let g = gate(pay_rule(json!({})));
    let read_only = token(|c| {
        c["authorization_details"] = json!([{"type": "invoice_processing", "actions": ["read"], "identifier": "42"}])
    });
    assert_eq!(reason(&g, "/invoices/42/pay", &read_only), Some(Reason::TaskMismatch));
    let other_type = token(|c| {
        c["authorization_details"] = json!([{"type": "payment_initiation", "actions": ["pay"], "identifier": "42"}])
    });
    assert_eq!(reason(&g, "/invoices/42/pay", &other_type), Some(Reason::TaskMismatch));
    let none = token(|_| {});
    assert_eq!(reason(&g, "/invoices/42/pay", &none), Some(Reason::TaskMismatch));
    let garbage = token(|c| c["authorization_details"] = json!("pay everything"));
    assert_eq!(reason(&g, "/invoices/42/pay", &garbage), Some(Reason::TaskMismatch));
}

#[test]
fn task_locations_and_datatypes_must_be_granted() {
    let rules = json!([{"name": "r", "match": {"path": "/accounts/{id}"}, "require": {"task": {
        "type": "account_information", "actions": ["read"], "locations": ["https://api.example.com"], "datatypes": ["balances"]}}}]);
    let g = gate(rules);
    let grant = |datatypes: Value| {
        token(
            |c| c["authorization_details"] = json!([{"type": "account_information", "actions": ["read"], "locations": ["https://api.example.com"], "datatypes": datatypes}]),
        )
    };
    assert_eq!(reason(&g, "/accounts/1", &grant(json!(["balances", "transactions"]))), None);
    assert_eq!(reason(&g, "/accounts/1", &grant(json!(["transactions"]))), Some(Reason::TaskMismatch));
}

#[test]
fn task_claim_reads_tasks_from_a_custom_claim() {
    let g = gate_with(pay_rule(json!({})), |p| p["providers"][0]["task_claim"] = json!("https://corp.example/tasks"));
    let t = token(|c| c["https://corp.example/tasks"] = pay_task("42"));
    assert_eq!(reason(&g, "/invoices/42/pay", &t), None);
    let in_standard_claim = token(|c| c["authorization_details"] = pay_task("42"));
    assert_eq!(reason(&g, "/invoices/42/pay", &in_standard_claim), Some(Reason::TaskMismatch));
}

#[test]
fn identifier_must_name_a_path_parameter() {
    let rules = json!([{"name": "r", "match": {"path": "/invoices/{id}"}, "require": {"task": {"type": "t", "identifier": "{invoice}"}}}]);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap();
    p["mode"] = json!("enforce");
    let e = Gate::from_json(&p.to_string()).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(e, "rules[0].require.task.identifier: {invoice} is not a parameter of match.path (/invoices/{id})");
}

#[test]
fn any_scopes_needs_one_of_them() {
    let g = gate(json!([{"name": "r", "match": {"path": "/x"}, "require": {"any_scopes": ["a", "b"]}}]));
    assert_eq!(reason(&g, "/x", &token(|c| c["scope"] = json!("z b"))), None);
    assert_eq!(reason(&g, "/x", &token(|c| c["scope"] = json!("z"))), Some(Reason::InsufficientScope));
}

#[test]
fn hosts_are_matched_without_port() {
    let g = gate(json!([{"name": "r", "match": {"hosts": ["*.Example.com"], "path": "/x"}}]));
    let t = token(|_| {});
    assert_eq!(eval(&g, "GET", "api.example.com:8443", "/x", &t).reason, None);
    assert_eq!(eval(&g, "GET", "API.EXAMPLE.COM", "/x", &t).reason, None);
    assert_eq!(eval(&g, "GET", "example.org", "/x", &t).reason, Some(Reason::NoMatchingRule));
}

fn delegated(actors: &[&str]) -> Value {
    actors.iter().rev().fold(Value::Null, |inner, sub| {
        let mut act = json!({"sub": sub});
        if !inner.is_null() {
            act["act"] = inner;
        }
        act
    })
}

#[test]
fn agents_match_the_acting_party() {
    let g =
        gate(json!([{"name": "r", "match": {"path": "/x"}, "require": {"agents": ["spiffe://corp.example/agent/*"]}}]));
    let direct = token(|c| c["sub"] = json!("spiffe://corp.example/agent/billing"));
    assert_eq!(reason(&g, "/x", &direct), None);
    let user = token(|c| c["sub"] = json!("alice"));
    assert_eq!(reason(&g, "/x", &user), Some(Reason::AgentNotAllowed));
    let for_user = token(|c| {
        c["sub"] = json!("alice");
        c["act"] = delegated(&["spiffe://corp.example/agent/billing"]);
    });
    let d = eval(&g, "GET", "api", "/x", &for_user);
    assert_eq!(d.reason, None);
    assert_eq!(d.audit.agent.as_deref(), Some("spiffe://corp.example/agent/billing"));
    assert_eq!(d.audit.on_behalf_of.as_deref(), Some("alice"));
    match &d.action {
        Action::Continue { set, .. } => {
            assert!(set.contains(&("x-agent-id".to_string(), "spiffe://corp.example/agent/billing".to_string())));
            assert!(set.contains(&("x-agent-on-behalf-of".to_string(), "alice".to_string())));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn delegation_depth_and_actors() {
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"max_delegation_depth": 1, "actors": ["orchestrator-*"]}}]),
    );
    let chain = |actors: &[&str]| token(|c| c["act"] = delegated(actors));
    assert_eq!(reason(&g, "/x", &token(|_| {})), None, "no delegation at all");
    assert_eq!(reason(&g, "/x", &chain(&["orchestrator-1"])), None);
    assert_eq!(reason(&g, "/x", &chain(&["orchestrator-1", "planner"])), Some(Reason::DelegationNotAllowed));
    assert_eq!(reason(&g, "/x", &chain(&["rogue"])), Some(Reason::DelegationNotAllowed));
}

#[test]
fn may_act_limits_who_can_act() {
    let g = gate(json!([{"name": "r", "match": {"path": "/x"}}]));
    let t = |actor: &str| {
        token(|c| {
            c["may_act"] = json!({"sub": "orchestrator-1"});
            c["act"] = delegated(&[actor]);
        })
    };
    assert_eq!(reason(&g, "/x", &t("orchestrator-1")), None);
    assert_eq!(reason(&g, "/x", &t("orchestrator-2")), Some(Reason::DelegationNotAllowed));
}

#[test]
fn approval_requires_a_recent_human_approved_acr() {
    let g = gate(pay_rule(json!({"approval": {"acr_values": ["urn:corp:human-approved"], "max_age_seconds": 300}})));
    let t = |acr: Option<&str>, age: i64| {
        token(|c| {
            c["authorization_details"] = pay_task("42");
            if let Some(acr) = acr {
                c["acr"] = json!(acr);
            }
            c["auth_time"] = json!(NOW - age);
        })
    };
    assert_eq!(reason(&g, "/invoices/42/pay", &t(Some("urn:corp:human-approved"), 60)), None);
    for (acr, age) in [(None, 60), (Some("urn:corp:mfa"), 60), (Some("urn:corp:human-approved"), 301)] {
        let d = eval(&g, "POST", "api", "/invoices/42/pay", &t(acr, age));
        assert_eq!(d.reason, Some(Reason::ApprovalRequired), "{acr:?} {age}");
        match &d.action {
            Action::Respond { status, headers, .. } => {
                assert_eq!(*status, 401);
                let challenge = &headers.iter().find(|(n, _)| *n == "www-authenticate").unwrap().1;
                assert!(challenge.starts_with("Bearer error=\"insufficient_user_authentication\""), "{challenge}");
                assert!(challenge.ends_with("acr_values=\"urn:corp:human-approved\", max_age=300"), "{challenge}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Approval is asked for last: a token that lacks the task is refused as such.
    let no_task = token(|c| c["acr"] = json!("urn:corp:human-approved"));
    assert_eq!(reason(&g, "/invoices/42/pay", &no_task), Some(Reason::TaskMismatch));
}

#[test]
fn revoked_agents_actors_and_tokens_are_refused_at_once() {
    let g = gate_with(json!([{"name": "r", "match": {"path": "/x"}}]), |p| {
        p["revoked"] = json!({"subjects": ["agent-13*"], "actors": ["rogue-*"], "jtis": ["stolen-1"]});
    });
    assert_eq!(reason(&g, "/x", &token(|_| {})), None);
    assert_eq!(reason(&g, "/x", &token(|c| c["sub"] = json!("agent-137"))), Some(Reason::Revoked));
    assert_eq!(reason(&g, "/x", &token(|c| c["act"] = delegated(&["ok", "rogue-2"]))), Some(Reason::Revoked));
    let d = eval(&g, "GET", "api", "/x", &token(|c| c["jti"] = json!("stolen-1")));
    assert_eq!(d.reason, Some(Reason::Revoked));
    assert_eq!(d.audit.agent.as_deref(), Some("agent-7"));
    assert!(matches!(d.action, Action::Respond { status: 403, .. }));
}

#[test]
fn a_rule_in_dry_run_forwards_while_the_rest_enforce() {
    let rules = json!([
        {"name": "new-rule", "mode": "dry_run", "match": {"path": "/new"}, "require": {"scopes": ["new:write"]}},
        {"name": "old-rule", "match": {"path": "/old"}, "require": {"scopes": ["old:write"]}},
    ]);
    let g = gate(rules);
    let t = token(|_| {});
    let new = eval(&g, "GET", "api", "/new", &t);
    assert_eq!((new.reason, new.dry_run), (Some(Reason::InsufficientScope), true));
    assert!(matches!(new.action, Action::Continue { .. }));
    let old = eval(&g, "GET", "api", "/old", &t);
    assert!(matches!(old.action, Action::Respond { status: 403, .. }));
}

fn eval_from(
    gate: &Gate,
    path: &str,
    token: &str,
    source: Option<&str>,
    extra: &[(&str, &str)],
    now: i64,
) -> Option<Reason> {
    let mut headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    gate.evaluate(&Request { source, ..Request::new("GET", path, &headers, now) }).reason
}

#[test]
fn source_cidrs_fail_closed_on_unknown_sources() {
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"source_cidrs": ["10.0.0.0/8", "2001:db8::/32"]}}]),
    );
    let t = token(|_| {});
    assert_eq!(eval_from(&g, "/x", &t, Some("10.2.3.4:5000"), &[], NOW), None);
    assert_eq!(eval_from(&g, "/x", &t, Some("[2001:db8::7]:443"), &[], NOW), None);
    assert_eq!(eval_from(&g, "/x", &t, Some("192.168.0.1:5000"), &[], NOW), Some(Reason::SourceNotAllowed));
    assert_eq!(eval_from(&g, "/x", &t, None, &[], NOW), Some(Reason::SourceNotAllowed));
    assert!(g.policy().needs_source);
}

#[test]
fn header_conditions() {
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"headers": [{"name": "X-Tenant", "in": ["acme"]}, {"name": "x-debug", "present": false}]}}]),
    );
    let t = token(|_| {});
    assert_eq!(eval_from(&g, "/x", &t, None, &[("x-tenant", "acme")], NOW), None);
    assert_eq!(eval_from(&g, "/x", &t, None, &[("x-tenant", "initech")], NOW), Some(Reason::HeaderMismatch));
    assert_eq!(eval_from(&g, "/x", &t, None, &[], NOW), Some(Reason::HeaderMismatch));
    assert_eq!(
        eval_from(&g, "/x", &t, None, &[("x-tenant", "acme"), ("x-debug", "1")], NOW),
        Some(Reason::HeaderMismatch)
    );
}

#[test]
fn time_windows_in_utc() {
    // 2027-01-04 10:00 UTC was a Monday.
    let monday_10 = 1_799_056_800;
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"time": {"days": ["mon", "tue", "wed", "thu", "fri"], "from_hour": 9, "to_hour": 17}}}]),
    );
    let t = |now: i64| {
        let mut c = agent_claims("agent-7", "", now);
        c["exp"] = json!(now + 60);
        signer().sign(&c)
    };
    assert_eq!(eval_from(&g, "/x", &t(monday_10), None, &[], monday_10), None);
    let evening = monday_10 + 8 * 3600;
    assert_eq!(eval_from(&g, "/x", &t(evening), None, &[], evening), Some(Reason::OutsideTimeWindow));
    let sunday = monday_10 - 86_400;
    assert_eq!(eval_from(&g, "/x", &t(sunday), None, &[], sunday), Some(Reason::OutsideTimeWindow));
}

#[test]
fn claim_conditions() {
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"claims": [{"path": "trust_score", "gte": 0.7}, {"path": "tenant.id", "equals": "acme"}]}}]),
    );
    let t = |score: Value, tenant: &str| {
        token(|c| {
            c["trust_score"] = score;
            c["tenant"] = json!({"id": tenant});
        })
    };
    assert_eq!(reason(&g, "/x", &t(json!(0.9), "acme")), None);
    assert_eq!(reason(&g, "/x", &t(json!(0.5), "acme")), Some(Reason::ClaimMismatch));
    assert_eq!(reason(&g, "/x", &t(json!("0.9"), "acme")), Some(Reason::ClaimMismatch));
    assert_eq!(reason(&g, "/x", &t(json!(0.9), "globex")), Some(Reason::ClaimMismatch));
    assert_eq!(reason(&g, "/x", &token(|_| {})), Some(Reason::ClaimMismatch));
}

#[test]
fn context_config_errors_name_their_path() {
    let err = |require: Value| {
        let rules = json!([{"name": "r", "match": {"path": "/x"}, "require": require}]);
        Gate::from_json(&policy(&signer().jwks(), &rules, "enforce")).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(err(json!({"source_cidrs": ["10.0.0.0/40"]}))
        .starts_with("rules[0].require.source_cidrs[0]: \"10.0.0.0/40\" is not a CIDR"));
    assert!(err(json!({"headers": [{"path": "x"}]})).starts_with("rules[0].require.headers[0]: give `name` (only)"));
    assert!(err(json!({"claims": [{"path": "a"}]})).starts_with("rules[0].require.claims[0]: give at least one of"));
    assert!(err(json!({"time": {"days": ["someday"]}})).starts_with("rules[0].require.time: \"someday\" is not a day"));
    assert!(err(json!({"time": {"from_hour": 9, "to_hour": 9}})).starts_with("rules[0].require.time: hours must be"));
}

#[test]
fn rate_limits_per_agent_per_rule_and_for_the_policy() {
    let rules = json!([
        {"name": "search", "match": {"path": "/search"}, "rate_limit": {"requests": 2, "per_seconds": 60}},
        {"name": "other", "match": {"path": "/other"}},
    ]);
    let g = gate(rules);
    let a = token(|_| {});
    let b = token(|c| c["sub"] = json!("agent-8"));
    assert_eq!(reason(&g, "/search", &a), None);
    assert_eq!(reason(&g, "/search", &a), None);
    let limited = eval(&g, "GET", "api", "/search", &a);
    assert_eq!(limited.reason, Some(Reason::RateLimited));
    match &limited.action {
        Action::Respond { status, headers, .. } => {
            assert_eq!(*status, 429);
            assert!(headers.contains(&("retry-after".to_string(), "30".to_string())), "{headers:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reason(&g, "/search", &b), None, "another agent has its own bucket");
    assert_eq!(reason(&g, "/other", &a), None, "another rule is not limited");

    let policy_wide = gate_with(json!([{"name": "any", "match": {}}]), |p| {
        p["rate_limit"] = json!({"requests": 1, "per_seconds": 10})
    });
    assert_eq!(reason(&policy_wide, "/x", &a), None);
    assert_eq!(reason(&policy_wide, "/y", &a), Some(Reason::RateLimited));
}

#[test]
fn denied_requests_do_not_use_up_a_rules_limit() {
    let g = gate(
        json!([{"name": "r", "match": {"path": "/x"}, "require": {"scopes": ["x"]}, "rate_limit": {"requests": 1, "per_seconds": 60}}]),
    );
    let without = token(|_| {});
    for _ in 0..3 {
        assert_eq!(reason(&g, "/x", &without), Some(Reason::InsufficientScope));
    }
    assert_eq!(reason(&g, "/x", &token(|c| c["scope"] = json!("x"))), None);
}

#[test]
fn bind_mtls_peer_requires_the_agent_to_be_the_tls_peer() {
    let g = gate(json!([{"name": "r", "match": {"path": "/x"}, "require": {"bind_mtls_peer": true}}]));
    assert!(g.policy().needs_peer);
    let t = token(|c| c["sub"] = json!("spiffe://corp.example/agent/a"));
    let with_peer = |peer: Option<&str>| {
        let headers = vec![("authorization".to_string(), format!("Bearer {t}"))];
        g.evaluate(&Request { peer_uri_san: peer, ..Request::new("GET", "/x", &headers, NOW) }).reason
    };
    assert_eq!(with_peer(Some("spiffe://corp.example/agent/a")), None);
    assert_eq!(with_peer(Some("spiffe://corp.example/agent/b")), Some(Reason::PeerMismatch));
    assert_eq!(with_peer(None), Some(Reason::PeerMismatch));
}
