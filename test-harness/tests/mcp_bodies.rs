//! MCP routes read the request body, on each host as it hands bodies over (Envoy: chunks
//! buffered while the filter pauses; Kong: whole before proxying; APISIX: whole when asked):
//! a tools/call allowed or denied by its arguments, a body over the limit answered 413, a
//! malformed one 400 with a JSON-RPC error for the request's id; routes that need no body
//! stay header-only.

use agentgate_test_harness::host::{Host, Outcome, KONG_BODY_BUFFER_BYTES};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::es256("es-mcp", 5)
}

fn mcp_policy() -> String {
    let rules = json!([
        {
            "name": "pay-small",
            "match": {"path": "/mcp", "mcp": {"tool": "pay_invoice"}},
            "require": {"scopes": ["invoices:pay"], "arguments": [{"path": "amount", "lte": 500}]}
        },
        {
            "name": "read-invoice",
            "match": {"methods": ["GET"], "path": "/invoices/{id}"},
            "require": {"scopes": ["invoices:read"]}
        }
    ]);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap_or_default();
    p["limits"] = json!({"max_body_bytes": 512});
    p.to_string()
}

fn hosts() -> Vec<(&'static str, Host)> {
    let policy = mcp_policy();
    let start = |name: &str| match name {
        "kong" => Host::kong(&policy),
        "apisix" => Host::apisix(&policy),
        _ => Host::new(&policy),
    };
    ["envoy", "kong", "apisix"]
        .into_iter()
        .map(|name| (name, start(name).unwrap_or_else(|e| panic!("{name}: {e}"))))
        .collect()
}

fn call(id: u64, amount: u64) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "pay_invoice", "arguments": {"invoice_id": "42", "amount": amount}}})
    .to_string()
    .into_bytes()
}

fn post(host: &mut Host, name: &str, body: &[u8], extra: &[(&str, &str)]) -> Outcome {
    let auth = format!("Bearer {}", signer().sign(&agent_claims("agent-7", "invoices:pay invoices:read", host.now())));
    let length = body.len().to_string();
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/mcp"),
        (":authority", "api.example.com"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("content-length", length.as_str()),
    ];
    headers.extend_from_slice(extra);
    host.request_with_body(&headers, body).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn rpc_error(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Responded { body, .. } => serde_json::from_str(body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

#[test]
fn a_tool_call_is_allowed_or_denied_by_its_arguments_on_every_host() {
    for (name, mut host) in hosts() {
        let allowed = post(&mut host, name, &call(1, 100), &[]);
        assert_eq!(allowed.status(), 200, "{name}: {allowed:?}\n{:?}", host.logs());
        assert_eq!(allowed.header("x-agent-id"), Some("agent-7"), "{name}");
        // Stripped (on Kong emptied in place: nginx still forwards a removed header's name).
        assert!(allowed.header("authorization").is_none_or(str::is_empty), "{name}: the token is stripped");

        let denied = post(&mut host, name, &call(2, 900), &[]);
        assert_eq!(denied.status(), 403, "{name}: {denied:?}");
        let error = rpc_error(&denied);
        assert_eq!(error["id"], 2, "{name}: the JSON-RPC error answers the request: {error}");
        assert_eq!(error["error"]["code"], -32003, "{name}: {error}");
        let logs = host.logs().join("\n");
        assert!(logs.contains("\"reason\":\"argument_mismatch\""), "{name}: {logs}");
        assert!(!logs.contains("crash") && !logs.contains("trap"), "{name}: {logs}");
    }
}

#[test]
fn a_body_over_the_limit_is_413_and_a_malformed_one_400_with_the_request_id() {
    for (name, mut host) in hosts() {
        // Over max_body_bytes (512): a valid message padded with spaces.
        let mut large = call(3, 100);
        large.extend(std::iter::repeat_n(b' ', 600));
        let outcome = post(&mut host, name, &large, &[]);
        assert_eq!(outcome.status(), 413, "{name}: {outcome:?}");

        // JSON, but not JSON-RPC 2.0: refused with the request's id.
        let malformed = br#"{"jsonrpc":"1.0","id":77,"method":"tools/call","params":{"name":"pay_invoice"}}"#;
        let outcome = post(&mut host, name, malformed, &[]);
        assert_eq!(outcome.status(), 400, "{name}: {outcome:?}");
        let error = rpc_error(&outcome);
        assert_eq!(
            (error["id"].clone(), error["error"]["code"].clone()),
            (json!(77), json!(-32600)),
            "{name}: {error}"
        );

        // Mcp-Name disagrees with the body.
        let outcome = post(&mut host, name, &call(5, 100), &[("mcp-name", "read_invoice")]);
        assert_eq!((outcome.status(), rpc_error(&outcome)["id"].clone()), (400, json!(5)), "{name}: {outcome:?}");

        // Not JSON at all: a parse error, id null.
        let outcome = post(&mut host, name, b"{\"jsonrpc\":", &[]);
        assert_eq!(outcome.status(), 400, "{name}: {outcome:?}");
        assert_eq!(rpc_error(&outcome)["error"]["code"], -32700, "{name}");
    }
}

#[test]
fn an_mcp_post_without_a_body_is_decided_as_empty_and_other_routes_stay_header_only() {
    for (name, mut host) in hosts() {
        let auth = format!("Bearer {}", signer().sign(&agent_claims("agent-7", "invoices:read", host.now())));
        // No body at all (Kong calls no body callback then): decided at once, never forwarded.
        let headers =
            [(":method", "POST"), (":path", "/mcp"), (":authority", "api.example.com"), ("authorization", &auth)];
        let outcome = host.request(&headers).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(outcome.status(), 400, "{name}: {outcome:?}");
        // A route without MCP is decided on its headers.
        let headers = [(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)];
        let outcome = host.request(&headers).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(outcome.status(), 200, "{name}: {outcome:?}");
    }
}

#[test]
fn on_kong_a_body_nginx_wrote_to_a_file_is_refused_not_forwarded() {
    let mut p: Value = serde_json::from_str(&mcp_policy()).unwrap_or_default();
    p["limits"] = json!({"max_body_bytes": 65536});
    let mut host = Host::kong(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let mut large = call(8, 100);
    large.extend(std::iter::repeat_n(b' ', KONG_BODY_BUFFER_BYTES));
    let outcome = post(&mut host, "kong", &large, &[]);
    assert_eq!(outcome.status(), 500, "{outcome:?}");
    let logs = host.logs().join("\n");
    assert!(logs.contains("client_body_buffer_size"), "says what to raise: {logs}");
}

#[test]
fn tool_calls_are_counted_per_tool_within_a_bound() {
    let mut p: Value = serde_json::from_str(&mcp_policy()).unwrap_or_default();
    if let Some(rules) = p["rules"].as_array_mut() {
        rules.push(json!({"name": "t-tools", "match": {"path": "/mcp", "mcp": {"tool": "t-*"}},
                          "require": {"scopes": ["invoices:pay"]}}));
    }
    let mut host = Host::new(&p.to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(post(&mut host, "envoy", &call(1, 100), &[]).status(), 200);
    assert_eq!(post(&mut host, "envoy", &call(2, 900), &[]).status(), 403);
    assert_eq!(host.metric("agentgate.mcp.pay_invoice.allowed"), Some(1));
    assert_eq!(host.metric("agentgate.mcp.pay_invoice.denied"), Some(1));
    // A tool no rule matches is not named in a counter (clients choose tool names).
    let unknown = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "evil.tool"}});
    assert_eq!(post(&mut host, "envoy", unknown.to_string().as_bytes(), &[]).status(), 403);
    assert_eq!(host.metric("agentgate.mcp._other.denied"), Some(1));
    assert_eq!(host.metric("agentgate.mcp.evil_tool.denied"), None);
    // At most 64 tools by name per VM (pay_invoice and _other are two of them).
    for n in 0..70 {
        let named = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": format!("t-{n}")}});
        assert_eq!(post(&mut host, "envoy", named.to_string().as_bytes(), &[]).status(), 200, "t-{n}");
    }
    assert_eq!(host.metric("agentgate.mcp.t-61.allowed"), Some(1));
    assert_eq!(host.metric("agentgate.mcp.t-62.allowed"), None);
    assert_eq!(host.metric("agentgate.mcp._other.allowed"), Some(8));
}
