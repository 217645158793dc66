//! A real MCP server and a real MCP client, both the official Python SDK (PyPI `mcp`, in the
//! project's virtualenv), through a real Envoy running agentgate: the client lists tools and
//! sees only its own, calls an allowed tool and gets its result, calls a tool with an
//! argument outside its task and gets an MCP error while the server is never called, and
//! with a token for another audience is refused 401 with `resource_metadata`.

use agentgate_test_harness::envoy::{workspace_root, Envoy};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer, AUDIENCE};
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RESOURCE: &str = "https://api.example.com/mcp";

fn signer() -> Signer {
    Signer::es256("es-sdk", 9)
}

fn mcp_policy() -> String {
    let tool = |name: &str| json!({"methods": ["POST"], "path": "/mcp", "mcp": {"tool": name}});
    let method = |name: &str| json!({"methods": ["POST"], "path": "/mcp", "mcp": {"method": name}});
    let rules = json!([
        {"name": "pay", "match": tool("pay_invoice"),
         "require": {"scopes": ["invoices:pay"],
                     "task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{args.invoice_id}"}}},
        {"name": "read", "match": tool("get_*"), "require": {"scopes": ["invoices:read"]}},
        {"name": "admin", "match": tool("delete_*"), "require": {"scopes": ["admin"]}},
        {"name": "initialize", "match": method("initialize")},
        {"name": "notifications", "match": method("notifications/*")},
        {"name": "list", "match": method("tools/list")},
        // The SDK opens a server-to-client stream and ends its session.
        {"name": "session", "match": {"methods": ["GET", "DELETE"], "path": "/mcp"}}
    ]);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap_or_default();
    p["providers"][0]["audiences"] = json!([AUDIENCE, RESOURCE]);
    p["resource_metadata"] = json!({
        "resource": RESOURCE,
        "authorization_servers": ["https://idp.example.com"],
        "scopes_supported": ["invoices:read", "invoices:pay"]
    });
    p.to_string()
}

fn token(audience: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let mut claims = agent_claims("agent-7", "invoices:read invoices:pay", now);
    claims["aud"] = json!(audience);
    claims["authorization_details"] = json!([{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]);
    signer().sign(&claims)
}

fn python() -> std::path::PathBuf {
    workspace_root().join(".venv/bin/python")
}

/// The SDK's server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(calls: &std::path::Path) -> (Server, u16) {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
    let child = Command::new(python())
        .arg(workspace_root().join("test-harness/mcp/server.py"))
        .arg(port.to_string())
        .arg(calls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the MCP server ({}; run `make venv`): {e}", python().display()));
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the MCP server did not start on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port)
}

/// Runs the SDK's client; one JSON value per line it printed.
fn client(envoy: &Envoy, url: &str, token: &str, calls: &[&str]) -> Vec<Value> {
    let out = Command::new(python())
        .arg(workspace_root().join("test-harness/mcp/client.py"))
        .args([url, token])
        .args(calls)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the MCP client: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = stderr.get(stderr.len().saturating_sub(1500)..).unwrap_or_default();
    assert!(out.status.success(), "client failed:\n{stdout}\n{tail}\nenvoy:\n{}\n{:?}", envoy.logs(), envoy.audit_records());
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// An `initialize` POSTed by hand: the status and the response head.
fn post(port: u16, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(request.as_bytes());
        let _ = stream.read_to_string(&mut answer);
    }
    let head = answer.split("\r\n\r\n").next().unwrap_or_default().to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head)
}

#[test]
fn the_official_sdk_client_sees_its_tools_calls_within_its_task_and_is_refused_outside_it() {
    let dir = agentgate_test_harness::envoy::scratch_dir();
    let calls = dir.join("calls.jsonl");
    let (_server, port) = start_server(&calls);
    let envoy = Envoy::start(&mcp_policy(), port).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://127.0.0.1:{}/mcp", envoy.port);

    let lines = client(
        &envoy,
        &url,
        &token(RESOURCE),
        &[r#"get_invoice={"invoice_id": "42"}"#, r#"pay_invoice={"invoice_id": "43", "amount": 10}"#],
    );
    let logs = envoy.logs();
    assert_eq!(lines.len(), 3, "{lines:?}\n{logs}");
    // delete_all_invoices needs a scope the token lacks; pay_invoice depends on its arguments.
    assert_eq!(lines[0]["tools"], json!(["get_invoice", "pay_invoice"]), "{logs}");
    assert_eq!(lines[1]["is_error"], false, "{:?}", lines[1]);
    assert_eq!(lines[1]["text"], "invoice 42: 120 EUR, open");
    // Invoice 43 is outside the token's task: an MCP error (the gateway's JSON-RPC error for
    // the call's id), and the server never saw the call.
    assert_eq!(lines[2]["code"], -32003, "{:?}", lines[2]);
    let server_saw: Vec<Value> = std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(server_saw, [json!({"tool": "get_invoice", "arguments": {"invoice_id": "42"}})]);
    let audit = envoy.audit_records();
    assert!(audit.iter().any(|r| r["reason"] == "task_mismatch"), "{audit:?}");

    // A token for the API, not for this MCP server (RFC 8707): the client is refused with
    // the gateway's JSON-RPC error, and the HTTP answer is 401 naming the metadata.
    let refused = client(&envoy, &url, &token(AUDIENCE), &[]);
    assert_eq!(refused.first().map(|r| r["refused_with"].clone()), Some(json!(-32001)), "{refused:?}");
    let (status, head) = post(envoy.port, &token(AUDIENCE));
    assert_eq!(status, 401, "{head}");
    assert!(
        head.contains(r#"resource_metadata="https://api.example.com/.well-known/oauth-protected-resource/mcp""#),
        "{head}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
