//! MCP tool calls authorized by tool, argument and task; each agent sees only its own tools;
//! RFC 9728 discovery. The core as a host drives it: body in, decision out.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer, AUDIENCE};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;
const RESOURCE: &str = "https://api.example.com/mcp";

fn signer() -> Signer {
    Signer::es256("es-1", 1)
}

fn gate() -> Gate {
    let rules = json!([
        {"name": "pay", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "pay_invoice"}},
         "require": {"scopes": ["invoices:pay"],
                     "task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{args.invoice_id}"},
                     "arguments": [{"path": "amount.value", "lte": 500}, {"path": "amount.currency", "equals": "EUR"}]}},
        {"name": "read", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "read_*"}},
         "require": {"scopes": ["invoices:read"]}},
        {"name": "admin", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "delete_*"}},
         "require": {"scopes": ["admin"]}},
        {"name": "session", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"method": "*"}}},
        {"name": "rest", "match": {"methods": ["GET"], "path": "/invoices/{id}"}, "require": {"scopes": ["invoices:read"]}},
    ]);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap();
    p["providers"][0]["audiences"] = json!([AUDIENCE, RESOURCE]);
    p["resource_metadata"] = json!({
        "resource": RESOURCE,
        "authorization_servers": ["https://idp.example.com"],
        "scopes_supported": ["invoices:read", "invoices:pay"],
        "resource_name": "Invoices"
    });
    p["limits"] = json!({"max_body_bytes": 4096});
    p["audit"] = json!({"log_arguments": ["invoice_id"]});
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn token(scope: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut c = agent_claims("agent-7", scope, NOW);
    c["aud"] = json!(RESOURCE);
    c["authorization_details"] = json!([{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]);
    edit(&mut c);
    signer().sign(&c)
}

fn post(gate: &Gate, token: Option<&str>, body: &str, extra: &[(&str, &str)]) -> Decision {
    let mut headers = vec![(":authority".to_string(), "api.example.com".to_string())];
    if let Some(token) = token {
        headers.push(("authorization".to_string(), format!("Bearer {token}")));
    }
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    assert_eq!(gate.body_limit("POST", "/mcp"), Some(4096));
    gate.evaluate(&Request { body: Some(body.as_bytes()), ..Request::new("POST", "/mcp", &headers, NOW) })
}

fn call(tool: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": "c-1", "method": "tools/call", "params": {"name": tool, "arguments": arguments}})
        .to_string()
}

fn pay(invoice: &str, value: f64) -> String {
    call("pay_invoice", json!({"invoice_id": invoice, "amount": {"value": value, "currency": "EUR"}}))
}

fn response(d: &Decision) -> (u16, Value, String) {
    match &d.action {
        Action::Respond { status, headers, body } => {
            let challenge = headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.clone());
            (*status, serde_json::from_str(body).unwrap_or(Value::Null), challenge.unwrap_or_default())
        }
        Action::Continue { .. } => (200, Value::Null, String::new()),
    }
}

#[test]
fn a_tool_call_is_allowed_by_tool_argument_and_task() {
    let g = gate();
    let t = token("invoices:pay", |_| {});
    let ok = post(&g, Some(&t), &pay("42", 120.0), &[]);
    assert!(ok.allowed, "{:?}", ok.reason);
    assert_eq!(ok.rule.as_deref(), Some("pay"));
    assert_eq!(ok.audit.task_identifier.as_deref(), Some("42"));
    assert_eq!(
        (ok.audit.mcp_method.as_deref(), ok.audit.mcp_tool.as_deref()),
        (Some("tools/call"), Some("pay_invoice"))
    );
    assert_eq!(ok.audit.mcp_arguments, json!({"invoice_id": "42"}).as_object().cloned(), "only listed arguments");
    let Action::Continue { set, .. } = &ok.action else { panic!() };
    assert!(set.contains(&("x-agent-mcp-tool".to_string(), "pay_invoice".to_string())));

    for (body, reason) in [
        (pay("43", 120.0), Reason::TaskMismatch),
        (pay("42", 501.0), Reason::ArgumentMismatch),
        (
            call("pay_invoice", json!({"invoice_id": "42", "amount": {"value": 1, "currency": "USD"}})),
            Reason::ArgumentMismatch,
        ),
        (call("pay_invoice", json!({"amount": {"value": 1, "currency": "EUR"}})), Reason::TaskMismatch),
        (
            call("pay_invoice", json!({"invoice_id": {"id": "42"}, "amount": {"value": 1, "currency": "EUR"}})),
            Reason::TaskMismatch,
        ),
    ] {
        let d = post(&g, Some(&t), &body, &[]);
        assert_eq!(d.reason, Some(reason), "{body}");
        let (status, rpc, challenge) = response(&d);
        assert_eq!(status, 403);
        assert_eq!((rpc["id"].clone(), rpc["error"]["code"].clone()), (json!("c-1"), json!(-32003)), "{rpc}");
        assert!(
            challenge
                .contains(r#"resource_metadata="https://api.example.com/.well-known/oauth-protected-resource/mcp""#),
            "{challenge}"
        );
    }
    // A read-only token is told which scope the tool needs.
    let d = post(&g, Some(&token("invoices:read", |_| {})), &pay("42", 1.0), &[]);
    let (status, _, challenge) = response(&d);
    assert_eq!((status, d.reason), (403, Some(Reason::InsufficientScope)));
    assert!(
        challenge.contains(r#"error="insufficient_scope""#) && challenge.contains(r#"scope="invoices:pay""#),
        "{challenge}"
    );
}

#[test]
fn bodies_two_readers_could_read_differently_are_refused_with_a_json_rpc_error() {
    let g = gate();
    let t = token("invoices:read admin", |_| {});
    let dup = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"read_invoice","name":"delete_all"}}"#;
    for (body, reason, status, code) in [
        (dup.to_string(), Reason::McpParseError, 400, -32700),
        (
            "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}]".to_string(),
            Reason::McpInvalidRequest,
            400,
            -32600,
        ),
        (
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"read_x\"".to_string(),
            Reason::McpParseError,
            400,
            -32700,
        ),
        (
            format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"params\":{{\"x\":\"{}\"}}}}",
                "a".repeat(5000)
            ),
            Reason::BodyTooLarge,
            413,
            -32600,
        ),
        (String::new(), Reason::McpParseError, 400, -32700),
    ] {
        let d = post(&g, Some(&t), &body, &[]);
        assert_eq!(d.reason, Some(reason), "{}", &body[..body.len().min(80)]);
        let (got, rpc, _) = response(&d);
        assert_eq!((got, rpc["error"]["code"].clone()), (status, json!(code)));
    }
    let headers_lie = post(
        &g,
        Some(&t),
        &call("delete_all", json!({})),
        &[("Mcp-Method", "tools/call"), ("Mcp-Name", "read_invoice")],
    );
    assert_eq!(headers_lie.reason, Some(Reason::McpHeaderMismatch));
    assert_eq!(response(&headers_lie).1["error"]["code"], -32020);
    let headers_agree = post(
        &g,
        Some(&t),
        &call("read_invoice", json!({})),
        &[("mcp-method", "tools/call"), ("mcp-name", "read_invoice")],
    );
    assert!(headers_agree.allowed);
}

#[test]
fn an_mcp_rule_needs_the_resource_as_audience_and_challenges_name_the_metadata() {
    let g = gate();
    let other = token("invoices:read", |c| c["aud"] = json!(AUDIENCE));
    let d = post(&g, Some(&other), &call("read_invoice", json!({})), &[]);
    assert_eq!(d.reason, Some(Reason::AudienceMismatch));
    let (status, rpc, challenge) = response(&d);
    assert_eq!((status, rpc["error"]["code"].clone()), (401, json!(-32001)));
    assert!(
        challenge.starts_with(r#"Bearer error="invalid_token""#) && challenge.contains("resource_metadata="),
        "{challenge}"
    );
    let anonymous = post(&g, None, &call("read_invoice", json!({})), &[]);
    let (status, _, challenge) = response(&anonymous);
    assert_eq!(status, 401);
    assert_eq!(
        challenge,
        r#"Bearer resource_metadata="https://api.example.com/.well-known/oauth-protected-resource/mcp""#
    );
    // REST routes are not MCP's: no body is read, and the provider's audiences still count.
    assert_eq!(g.body_limit("GET", "/invoices/1"), None);
    assert_eq!(g.body_limit("POST", "/invoices/1"), None);
}

#[test]
fn the_protected_resource_metadata_is_served_at_both_well_known_paths() {
    let g = gate();
    for path in ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"] {
        let headers = vec![];
        let d = g.evaluate(&Request::new("GET", path, &headers, NOW));
        let Action::Respond { status, body, .. } = &d.action else { panic!("{path} forwarded") };
        let doc: Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!((*status, doc["resource"].as_str()), (200, Some(RESOURCE)), "{path}");
        assert_eq!(doc["resource_name"], "Invoices");
    }
}

#[test]
fn each_agent_sees_only_the_tools_it_could_call() {
    let g = gate();
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    let reader = post(&g, Some(&token("invoices:read", |c| c["authorization_details"] = json!([]))), &list, &[]);
    assert_eq!(reader.rule.as_deref(), Some("session"));
    let filter = reader.list_filter.clone().expect("a list call is filtered");
    let tools = json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
        {"name": "read_invoice"}, {"name": "pay_invoice"}, {"name": "delete_all"}, {"name": "unknown"}
    ]}});
    let names = |body: Vec<u8>| -> Vec<String> {
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        v["result"]["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    };
    let body = tools.to_string();
    // delete_all needs admin; pay_invoice needs its scope and task; "unknown" has only the
    // catch-all session rule, which allows it.
    assert_eq!(names(g.filter_list(&filter, body.as_bytes(), false)), ["read_invoice", "unknown"]);
    // A payer whose task covers some invoice keeps pay_invoice: its arguments decide later.
    let payer = post(&g, Some(&token("invoices:read invoices:pay", |_| {})), &list, &[]);
    let filter = payer.list_filter.clone().unwrap();
    assert_eq!(names(g.filter_list(&filter, body.as_bytes(), false)), ["read_invoice", "pay_invoice", "unknown"]);
    // Another call, or a denied list, is not filtered.
    assert!(post(&g, Some(&token("invoices:read", |_| {})), &call("read_x", json!({})), &[]).list_filter.is_none());
}
