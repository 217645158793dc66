//! The response to an allowed `tools/list` is filtered for the agent that asked, on each
//! host as it passes responses (Envoy: chunks buffered while the filter asks; Kong: one
//! pause buffers up to its response buffers; APISIX: no way to replace a body, so list calls
//! are refused there). What cannot be filtered never reaches the client: it becomes a
//! JSON-RPC error.

use agentgate_test_harness::host::{Delivered, Host, Outcome, Upstream, KONG_RESPONSE_BUFFER_BYTES};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::es256("es-list", 5)
}

fn list_policy() -> String {
    let mcp = |tool: &str| json!({"methods": ["POST"], "path": "/mcp", "mcp": {"tool": tool}});
    let rules = json!([
        {"name": "pay", "match": mcp("pay_invoice"), "require": {"scopes": ["invoices:pay"]}},
        {"name": "read", "match": mcp("get_*"), "require": {"scopes": ["invoices:read"]}},
        {"name": "list", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"method": "tools/list"}}}
    ]);
    policy(&signer().jwks(), &rules, "enforce")
}

fn host(name: &str) -> Host {
    let policy = list_policy();
    match name {
        "kong" => Host::kong(&policy),
        "apisix" => Host::apisix(&policy),
        _ => Host::new(&policy),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#;

/// A tools/list result naming `tools`, padded with a description of `pad` bytes each.
fn tools_result(tools: &[&str], pad: usize) -> Vec<u8> {
    let tools: Vec<Value> =
        tools.iter().map(|name| json!({"name": name, "description": "x".repeat(pad), "inputSchema": {}})).collect();
    json!({"jsonrpc": "2.0", "id": 4, "result": {"tools": tools}}).to_string().into_bytes()
}

/// The upstream's answer in three chunks.
fn upstream(content_type: &str, body: &[u8]) -> Upstream {
    let third = body.len() / 3;
    let (a, rest) = body.split_at(third);
    let (b, c) = rest.split_at(third);
    Upstream {
        headers: vec![
            (":status".into(), "200".into()),
            ("content-type".into(), content_type.into()),
            ("content-length".into(), body.len().to_string()),
        ],
        chunks: vec![a.to_vec(), b.to_vec(), c.to_vec()],
    }
}

fn exchange(host: &mut Host, name: &str, scope: &str, body: &str, answer: &Upstream) -> (Outcome, Option<Delivered>) {
    let auth = format!("Bearer {}", signer().sign(&agent_claims("agent-7", scope, host.now())));
    let length = body.len().to_string();
    let headers = [
        (":method", "POST"),
        (":path", "/mcp"),
        (":authority", "api.example.com"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("accept-encoding", "gzip"),
        ("content-length", length.as_str()),
    ];
    host.exchange(&headers, body.as_bytes(), answer).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn names(json: &Value) -> Vec<String> {
    json["result"]["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

fn delivered(name: &str, outcome: &Outcome, delivered: Option<Delivered>) -> Delivered {
    assert_eq!(outcome.status(), 200, "{name}: {outcome:?}");
    delivered.unwrap_or_else(|| panic!("{name}: no response delivered"))
}

#[test]
fn each_agent_sees_only_its_tools_in_a_json_list() {
    for name in ["envoy", "kong"] {
        let mut host = host(name);
        let body = tools_result(&["get_invoice", "pay_invoice", "delete_all"], 200);
        let (outcome, out) = exchange(&mut host, name, "invoices:read", LIST, &upstream("application/json", &body));
        // The upstream is asked for an uncompressed list (on Kong emptied: nginx forwards the name).
        assert!(outcome.header("accept-encoding").is_none_or(str::is_empty), "{name}: {outcome:?}");
        let out = delivered(name, &outcome, out);
        let json: Value = serde_json::from_slice(&out.body).unwrap_or(Value::Null);
        assert_eq!(names(&json), ["get_invoice"], "{name}: {json}");
        assert_eq!(json["id"], 4, "{name}");
        assert_eq!(out.header("content-length"), None, "{name}: the length changed, the host frames the body");
        assert!(!out.reset, "{name}");

        let (outcome, out) =
            exchange(&mut host, name, "invoices:read invoices:pay", LIST, &upstream("application/json", &body));
        let json: Value = serde_json::from_slice(&delivered(name, &outcome, out).body).unwrap_or(Value::Null);
        assert_eq!(names(&json), ["get_invoice", "pay_invoice"], "{name}: {json}");
        assert!(host.logs_at(4).is_empty(), "{name}: {:?}", host.logs_at(4));
    }
}

#[test]
fn an_event_stream_list_is_filtered_event_by_event() {
    for name in ["envoy", "kong"] {
        let mut host = host(name);
        let result = String::from_utf8(tools_result(&["pay_invoice", "get_invoice"], 10)).unwrap_or_default();
        let sse = format!("event: message\r\ndata: {result}\r\n\r\n");
        let (outcome, out) =
            exchange(&mut host, name, "invoices:read", LIST, &upstream("text/event-stream", sse.as_bytes()));
        let text = String::from_utf8(delivered(name, &outcome, out).body).unwrap_or_default();
        let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
        let json: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        assert_eq!(names(&json), ["get_invoice"], "{name}: {text}");
        assert!(text.starts_with("event: message\n") && text.ends_with("\n\n"), "{name}: {text:?}");
    }
}

#[test]
fn a_list_that_cannot_be_read_becomes_a_json_rpc_error() {
    for name in ["envoy", "kong"] {
        let mut host = host(name);
        let garbage = br#"{"jsonrpc":"2.0","id":4,"result":{"tools":[{"name":"pay_invoice"#;
        let (outcome, out) = exchange(&mut host, name, "invoices:read", LIST, &upstream("application/json", garbage));
        let body = delivered(name, &outcome, out).body;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(json["error"]["code"], -32603, "{name}: {}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("pay_invoice"), "{name}");
    }
}

#[test]
fn a_list_larger_than_kongs_response_buffers_is_refused_there_and_filtered_on_envoy() {
    let tools: Vec<String> = (0..40).map(|i| format!("get_{i}")).chain(["pay_invoice".to_string()]).collect();
    let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
    let body = tools_result(&tools, 1000);
    assert!(body.len() > 2 * KONG_RESPONSE_BUFFER_BYTES);
    let answer = upstream("application/json", &body);

    let mut envoy = host("envoy");
    let (outcome, out) = exchange(&mut envoy, "envoy", "invoices:read", LIST, &answer);
    let json: Value = serde_json::from_slice(&delivered("envoy", &outcome, out).body).unwrap_or(Value::Null);
    assert_eq!(names(&json).len(), 40, "envoy keeps every get_* tool and drops pay_invoice");

    let mut kong = host("kong");
    let (outcome, out) = exchange(&mut kong, "kong", "invoices:read", LIST, &answer);
    let out = delivered("kong", &outcome, out);
    let text = String::from_utf8_lossy(&out.body);
    // The error, then a space for each later chunk (nginx keeps the chunk that ends the response).
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(json["error"]["code"], -32603, "kong: {text}");
    assert!(!text.contains("get_0") && !text.contains("pay_invoice"), "kong: nothing of the list gets through");
    let logs = kong.logs_at(4).join("\n");
    assert!(logs.contains("wasm_response_body_buffers"), "kong: the log says what to raise: {logs}");
}

#[test]
fn a_list_over_the_filters_bound_is_refused_on_envoy() {
    let mut envoy = host("envoy");
    let body = tools_result(&["get_invoice", "pay_invoice"], 600 * 1024);
    let (outcome, out) = exchange(&mut envoy, "envoy", "invoices:read", LIST, &upstream("application/json", &body));
    let out = delivered("envoy", &outcome, out);
    let json: Value = serde_json::from_slice(&out.body).unwrap_or(Value::Null);
    assert_eq!(json["error"]["code"], -32603, "{}", String::from_utf8_lossy(&out.body[..out.body.len().min(300)]));
    assert!(envoy.logs_at(4).join("\n").contains("larger than 1048576 bytes"));
}

#[test]
fn apisix_cannot_replace_a_body_so_list_calls_are_refused_and_tool_calls_pass() {
    let mut apisix = host("apisix");
    let body = tools_result(&["get_invoice", "pay_invoice"], 10);
    let (outcome, out) = exchange(&mut apisix, "apisix", "invoices:read", LIST, &upstream("application/json", &body));
    assert!(out.is_none(), "the upstream is never asked");
    let Outcome::Responded { status, body, .. } = &outcome else { panic!("forwarded: {outcome:?}") };
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert_eq!((*status, json["id"].clone(), json["error"]["code"].clone()), (500, json!(4), json!(-32603)), "{body}");
    assert!(apisix.logs_at(4).join("\n").contains("cannot filter MCP list responses"));

    let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_invoice","arguments":{}}}"#;
    let result = br#"{"jsonrpc":"2.0","id":5,"result":{"content":[]}}"#;
    let (outcome, out) = exchange(&mut apisix, "apisix", "invoices:read", call, &upstream("application/json", result));
    assert_eq!(delivered("apisix", &outcome, out).body, result.to_vec());
}

#[test]
fn other_responses_pass_untouched() {
    for name in ["envoy", "kong"] {
        let mut host = host(name);
        let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_invoice","arguments":{}}}"#;
        let result = br#"{"jsonrpc":"2.0","id":5,"result":{"content":[{"type":"text","text":"pay_invoice"}]}}"#;
        let (outcome, out) = exchange(&mut host, name, "invoices:read", call, &upstream("application/json", result));
        let out = delivered(name, &outcome, out);
        assert_eq!(out.body, result.to_vec(), "{name}");
        assert_eq!(out.header("content-length"), Some(result.len().to_string().as_str()), "{name}");
        assert_eq!(outcome.header("accept-encoding"), Some("gzip"), "{name}: only list calls lose it");
    }
}
