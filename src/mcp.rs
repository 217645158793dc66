//! Model Context Protocol requests (JSON-RPC 2.0 over Streamable HTTP, spec 2025-11-25): the
//! body of a POST to an MCP route is one JSON-RPC message, read strictly so that the gate and
//! the server can never read two different calls out of it — duplicate keys at any depth,
//! batches, bad UTF-8, deep nesting and anything but one message are refused.

use crate::pattern::Pattern;
use crate::reason::Reason;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use std::fmt;

/// The largest body read by default (1 MiB); larger ones get 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Deeper nesting than this in a message is refused before it is parsed.
pub const MAX_DEPTH: usize = 32;

/// One JSON-RPC message from the client.
#[derive(Debug, Clone, PartialEq)]
pub struct McpCall {
    /// The request's `id` (absent for a notification or a response).
    pub id: Option<Value>,
    /// The method; `None` for a response to a server's request (sampling, elicitation).
    pub method: Option<String>,
    /// `params.name` of `tools/call` and `prompts/get`, `params.uri` of `resources/read`.
    pub name: Option<String>,
    /// `params.arguments` (`Null` when absent).
    pub arguments: Value,
}

/// The methods whose `params` name what they act on, and the member that names it.
pub fn name_member(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
        _ => None,
    }
}

/// Reads one JSON-RPC 2.0 message. `Err` is the reason: `mcp_parse_error` (not JSON, not
/// UTF-8, duplicate keys, too deep) or `mcp_invalid_request` (a batch, not JSON-RPC 2.0, a
/// wrong member type).
pub fn parse(body: &[u8]) -> Result<McpCall, Reason> {
    if nesting(body) > MAX_DEPTH {
        return Err(Reason::McpParseError);
    }
    let value = match serde_json::from_slice::<Strict>(body) {
        Ok(Strict(value)) => value,
        Err(_) => return Err(Reason::McpParseError),
    };
    // Batching was removed in 2025-06-18: an array is no message.
    let Value::Object(message) = value else { return Err(Reason::McpInvalidRequest) };
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(Reason::McpInvalidRequest);
    }
    let id = match message.get("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id.clone()),
        Some(_) => return Err(Reason::McpInvalidRequest),
    };
    let method = match message.get("method") {
        Some(Value::String(method)) => Some(method.clone()),
        Some(_) => return Err(Reason::McpInvalidRequest),
        // A response carries `result` or `error` and an id instead.
        None if id.is_some() && (message.contains_key("result") || message.contains_key("error")) => None,
        None => return Err(Reason::McpInvalidRequest),
    };
    let params = match message.get("params") {
        None => None,
        Some(Value::Object(params)) => Some(params),
        Some(_) => return Err(Reason::McpInvalidRequest),
    };
    let name = match (method.as_deref().and_then(name_member), params) {
        (Some(member), Some(params)) => match params.get(member) {
            Some(Value::String(name)) => Some(name.clone()),
            _ => return Err(Reason::McpInvalidRequest),
        },
        (Some(_), None) => return Err(Reason::McpInvalidRequest),
        (None, _) => None,
    };
    let arguments = match params.and_then(|p| p.get("arguments")) {
        None => Value::Null,
        Some(arguments @ Value::Object(_)) => arguments.clone(),
        Some(_) => return Err(Reason::McpInvalidRequest),
    };
    Ok(McpCall { id, method, name, arguments })
}

/// The `id` of a message refused as not JSON-RPC (`mcp_invalid_request`) or for its
/// headers, when the body is one JSON object with an id of the right type: the client's
/// error then answers its request. A body that is not (strict) JSON has none (null).
pub fn request_id(body: &[u8]) -> Option<Value> {
    if nesting(body) > MAX_DEPTH {
        return None;
    }
    match serde_json::from_slice::<Strict>(body).ok()?.0 {
        Value::Object(message) => message.get("id").filter(|id| id.is_string() || id.is_number()).cloned(),
        _ => None,
    }
}

/// The deepest nesting of arrays and objects in `json`, strings skipped.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (_, byte) in crate::jws::structure(json) {
        match byte {
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A JSON value that refuses duplicate object keys at any depth.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A rule's `match.mcp`: the method and, for methods that name what they act on, the name.
#[derive(Debug, Clone)]
pub struct McpMatch {
    pub method: Pattern,
    pub name: Option<Pattern>,
}

impl McpMatch {
    pub fn matches(&self, call: &McpCall) -> bool {
        let Some(method) = call.method.as_deref() else { return false };
        self.method.matches(method)
            && self.name.as_ref().is_none_or(|name| call.name.as_deref().is_some_and(|n| name.matches(n)))
    }
}

/// The JSON-RPC error code of a refused MCP message.
pub fn error_code(reason: Reason) -> i64 {
    match reason {
        Reason::McpParseError => -32700,
        Reason::McpInvalidRequest | Reason::BodyTooLarge => -32600,
        // The 2026-07-28 revision's HeaderMismatch.
        Reason::McpHeaderMismatch => -32020,
        other => match other.status() {
            401 => -32001,
            403 => -32003,
            _ => -32603,
        },
    }
}

/// The JSON-RPC error response to `id` for `reason`.
pub fn error_body(id: Option<&Value>, reason: Reason) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": error_code(reason), "message": reason.spec().description},
    })
    .to_string()
}

/// The 2026-07-28 headers that repeat the body (`Mcp-Method`, `Mcp-Name`) must agree with
/// it: a server executes the body, so a gate trusting the headers would enforce nothing.
pub fn check_headers(call: &McpCall, headers: &[(String, String)]) -> Result<(), Reason> {
    let header = |name: &str| -> Vec<&str> {
        headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    };
    let agrees = |values: Vec<&str>, body: Option<&str>| match values.as_slice() {
        [] => true,
        [one] => Some(one.trim()) == body,
        _ => false,
    };
    if agrees(header("mcp-method"), call.method.as_deref()) && agrees(header("mcp-name"), call.name.as_deref()) {
        Ok(())
    } else {
        Err(Reason::McpHeaderMismatch)
    }
}

/// The text of an argument for a template (`{args.invoice_id}`): strings as they are,
/// numbers as JSON writes them; anything else binds nothing.
pub fn argument_text(arguments: &Value, path: &str) -> Option<String> {
    let mut current = arguments;
    for part in path.split('.') {
        current = current.get(part)?;
    }
    match current {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A list method whose result the gate filters per agent: the result's array, the call each
/// item stands for, and the item member that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListKind {
    pub items: &'static str,
    pub call: &'static str,
    pub name: &'static str,
}

pub fn list_kind(method: &str) -> Option<ListKind> {
    let kind = |items, call, name| Some(ListKind { items, call, name });
    match method {
        "tools/list" => kind("tools", "tools/call", "name"),
        "prompts/list" => kind("prompts", "prompts/get", "name"),
        "resources/list" => kind("resources", "resources/read", "uri"),
        _ => None,
    }
}

/// The list response `body` (one JSON-RPC message, or a `text/event-stream` carrying it)
/// with only the items `keep` accepts by name; other messages pass unchanged. A body that
/// cannot be read becomes a JSON-RPC error: an unfiltered list would show every tool.
pub fn filter_list_body(body: &[u8], event_stream: bool, kind: ListKind, keep: &dyn Fn(&str) -> bool) -> Vec<u8> {
    if !event_stream {
        return filter_message(body, kind, keep).unwrap_or_else(|| unfilterable_body(false));
    }
    let Ok(text) = std::str::from_utf8(body) else { return unfilterable_body(true) };
    let text = text.replace("\r\n", "\n");
    let mut out = String::with_capacity(text.len());
    // SSE events end at a blank line; `data:` lines of one event join with newlines.
    for event in text.split_inclusive("\n\n") {
        let data: Vec<&str> =
            event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
        if data.is_empty() {
            out.push_str(event);
            continue;
        }
        let Some(filtered) = filter_message(data.join("\n").as_bytes(), kind, keep) else {
            out.push_str(&format!("data: {}\n\n", unfilterable()));
            continue;
        };
        for line in event.lines().filter(|l| !l.starts_with("data:") && !l.is_empty()) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&String::from_utf8_lossy(&filtered));
        out.push_str("\n\n");
    }
    out.into_bytes()
}

/// One JSON-RPC message with its list filtered; `None` when it is not JSON.
fn filter_message(json: &[u8], kind: ListKind, keep: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut message: Value = serde_json::from_slice(json).ok()?;
    if let Some(items) = message.pointer_mut(&format!("/result/{}", kind.items)).and_then(Value::as_array_mut) {
        items.retain(|item| item.get(kind.name).and_then(Value::as_str).is_some_and(keep));
    }
    serde_json::to_vec(&message).ok()
}

fn unfilterable() -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32603, "message": "the gateway could not read the list"}})
        .to_string()
}

/// What replaces a list response that cannot be filtered (unreadable, or over the bound a
/// host buffers): a JSON-RPC error, as one SSE event for an `event_stream`.
pub fn unfilterable_body(event_stream: bool) -> Vec<u8> {
    if event_stream {
        format!("event: message\ndata: {}\n\n", unfilterable()).into_bytes()
    } else {
        unfilterable().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(body: &str) -> Result<McpCall, Reason> {
        parse(body.as_bytes())
    }

    #[test]
    fn a_tool_call_is_read_with_its_name_and_arguments() {
        let c = call(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"pay","arguments":{"id":"42","amount":{"value":500}}}}"#,
        );
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.method.as_deref(), c.name.as_deref(), c.id), (Some("tools/call"), Some("pay"), Some(7.into())));
        assert_eq!(argument_text(&c.arguments, "id").as_deref(), Some("42"));
        assert_eq!(argument_text(&c.arguments, "amount.value").as_deref(), Some("500"));
        assert_eq!(argument_text(&c.arguments, "amount"), None);
        let read = call(r#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}"#);
        assert_eq!(read.map(|c| c.name), Ok(Some("file:///x".into())));
        let note = call(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(note.map(|c| c.id), Ok(None));
        let response = call(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        assert_eq!(response.map(|c| c.method), Ok(None));
    }

    #[test]
    fn a_refused_message_keeps_its_id_only_when_it_is_strict_json_with_a_valid_id() {
        assert_eq!(request_id(br#"{"jsonrpc":"1.0","id":9,"method":"tools/call"}"#), Some(9.into()));
        assert_eq!(request_id(br#"{"jsonrpc":"2.0","id":"r-1","params":"x"}"#), Some("r-1".into()));
        assert_eq!(request_id(br#"{"jsonrpc":"2.0","id":1,"id":2}"#), None, "which one?");
        assert_eq!(request_id(br#"{"jsonrpc":"2.0","id":{"a":1}}"#), None);
        assert_eq!(request_id(b"[1]"), None);
        assert_eq!(request_id(b"{"), None);
    }

    #[test]
    fn anything_two_parsers_could_read_differently_is_refused() {
        for (body, reason) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","name":"pay"}}"#,
                Reason::McpParseError,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1,"x":2}}}"#,
                Reason::McpParseError,
            ),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}"#, Reason::McpParseError),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\ud800"}}"#, Reason::McpParseError),
            (r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#, Reason::McpInvalidRequest),
            (r#"{"jsonrpc":"1.0","id":1,"method":"tools/list"}"#, Reason::McpInvalidRequest),
            (r#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#, Reason::McpInvalidRequest),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#, Reason::McpInvalidRequest),
            (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#, Reason::McpInvalidRequest),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[1]}}"#,
                Reason::McpInvalidRequest,
            ),
            ("", Reason::McpParseError),
        ] {
            assert_eq!(parse(body.as_bytes()), Err(reason), "{body}");
        }
        assert_eq!(
            parse(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"t\xff\"}"),
            Err(Reason::McpParseError),
            "not UTF-8"
        );
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":{{"a":{}1{}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(call(&deep), Err(Reason::McpParseError));
    }

    #[test]
    fn headers_must_repeat_the_body() {
        let c = call(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        assert_eq!(check_headers(&c, &h(&[])), Ok(()));
        assert_eq!(check_headers(&c, &h(&[("Mcp-Method", "tools/call"), ("mcp-name", "pay")])), Ok(()));
        assert_eq!(check_headers(&c, &h(&[("mcp-name", "read")])), Err(Reason::McpHeaderMismatch));
        assert_eq!(check_headers(&c, &h(&[("mcp-method", "tools/list")])), Err(Reason::McpHeaderMismatch));
        assert_eq!(check_headers(&c, &h(&[("mcp-name", "pay"), ("mcp-name", "pay")])), Err(Reason::McpHeaderMismatch));
    }

    #[test]
    fn lists_keep_only_what_the_agent_may_call() {
        let kind = list_kind("tools/list").unwrap_or(ListKind { items: "", call: "", name: "" });
        let keep = |name: &str| name.starts_with("read");
        let body = br#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"read_invoice"},{"name":"pay_invoice"},{"title":"nameless"}],"nextCursor":"c"}}"#;
        let filtered: Value = serde_json::from_slice(&filter_list_body(body, false, kind, &keep)).unwrap_or_default();
        assert_eq!(filtered["result"]["tools"], serde_json::json!([{"name": "read_invoice"}]));
        assert_eq!((filtered["id"].clone(), filtered["result"]["nextCursor"].clone()), (3.into(), "c".into()));

        let sse = "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"tools\":[{\"name\":\"pay_invoice\"},{\"name\":\"read_x\"}]}}\n\n";
        let out = String::from_utf8(filter_list_body(sse.as_bytes(), true, kind, &keep)).unwrap_or_default();
        let crlf = String::from_utf8(filter_list_body(sse.replace('\n', "\r\n").as_bytes(), true, kind, &keep));
        assert_eq!(crlf.as_deref(), Ok(out.as_str()), "CRLF line ends as sse-starlette writes them");
        assert!(
            out.contains("notifications/progress") && out.contains("read_x") && !out.contains("pay_invoice"),
            "{out}"
        );
        assert!(out.contains("event: message\nid: 1\n"), "{out}");

        let garbage = String::from_utf8(filter_list_body(b"{not json", false, kind, &keep)).unwrap_or_default();
        assert!(garbage.contains("-32603") && !garbage.contains("not json"), "{garbage}");
    }

    #[test]
    fn errors_carry_the_request_id() {
        let body = error_body(Some(&Value::from("req-1")), Reason::TaskMismatch);
        let parsed: Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(parsed["id"], "req-1");
        assert_eq!(parsed["error"]["code"], -32003);
        assert_eq!(error_code(Reason::McpParseError), -32700);
    }
}
