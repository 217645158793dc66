//! agentgate for JS edge runtimes (Workers, Deno, Node): the same core as the proxy-wasm
//! filter, compiled with wasm-bindgen. Request in as JSON, decision out as JSON; the JS
//! wrapper (`index.js`) gives it its API. No policy logic here.

use agentgate::gate::ListFilter;
use agentgate::{Action, Decision, Gate, Request};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;

/// What `gate.evaluate()` takes (camelCase, as JS writes it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EdgeRequest {
    method: String,
    /// Path and query, as sent.
    path: String,
    /// Header name to value (a list of values is joined with ", ").
    #[serde(default)]
    headers: Map<String, Value>,
    source_ip: Option<String>,
    /// The mTLS client's URI SAN, when the runtime terminates mTLS and exposes it.
    peer_uri_san: Option<String>,
    /// The request body as text, for MCP routes (see `gate.bodyLimit`).
    body: Option<String>,
    /// Unix seconds (the wrapper fills in the runtime's clock).
    now: f64,
}

/// Compiles `policy_json`, refusing what an edge runtime cannot do.
pub fn create(policy_json: &str) -> Result<Gate, String> {
    let gate = Gate::from_json(policy_json).map_err(|e| format!("invalid policy: {e}"))?;
    if let Some((_, provider, _)) = gate.remote_providers().next() {
        return Err(format!(
            "invalid policy: provider {:?} fetches its keys (jwks_uri or discovery), which this build cannot: give them inline (jwks)",
            provider.name
        ));
    }
    if let Some(provider) = gate.policy().providers.iter().find(|p| p.single_use_ring.is_some()) {
        if gate.policy().needs_shared_single_use() {
            return Err(format!(
                "invalid policy: provider {:?} is single_use across the gateway, which needs storage shared by every isolate that this build does not have: set \"single_use_scope\": \"worker\" to accept each token once per isolate",
                provider.name
            ));
        }
    }
    // `bind_mtls_peer` stays allowed: the runtime passes `peerUriSan` when it terminates mTLS;
    // without it such a rule denies.
    Ok(gate)
}

/// A gate and the list filters of its recent `tools/list` decisions, by handle: the caller
/// passes the response back with the handle. Bounded: a caller that never filters cannot
/// grow it, and an unknown handle is an error (the caller must not pass the list unfiltered).
pub struct EdgeGate {
    gate: Gate,
    pending: VecDeque<(u32, ListFilter)>,
    next: u32,
}

const MAX_PENDING_LISTS: usize = 256;

impl EdgeGate {
    pub fn new(policy_json: &str) -> Result<EdgeGate, String> {
        create(policy_json).map(|gate| EdgeGate { gate, pending: VecDeque::new(), next: 1 })
    }

    /// Decides a request; a list call's decision carries `listFilter`, a handle for
    /// [`EdgeGate::filter_list`].
    pub fn evaluate(&mut self, request_json: &str) -> Result<String, String> {
        let (decision, mut out) = evaluate(&self.gate, request_json)?;
        if let (Some(filter), Some(object)) = (decision.list_filter, out.as_object_mut()) {
            let handle = self.next;
            self.next = self.next.wrapping_add(1).max(1);
            if self.pending.len() >= MAX_PENDING_LISTS {
                self.pending.pop_front();
            }
            self.pending.push_back((handle, filter));
            object.insert("listFilter".into(), Value::from(handle));
        }
        Ok(out.to_string())
    }

    /// The list response `body` with only this agent's tools; consumes the handle.
    pub fn filter_list(&mut self, handle: u32, body: &str, event_stream: bool) -> Result<String, String> {
        let at = self.pending.iter().position(|(h, _)| *h == handle).ok_or("unknown or expired list filter")?;
        let (_, filter) = self.pending.remove(at).ok_or("unknown list filter")?;
        Ok(String::from_utf8_lossy(&self.gate.filter_list(&filter, body.as_bytes(), event_stream)).into_owned())
    }

    /// The body size to read for this request (MCP routes), or `None`.
    pub fn body_limit(&self, method: &str, path: &str) -> Option<usize> {
        self.gate.body_limit(method, path)
    }
}

/// Decides `request_json` (an [`EdgeRequest`]): the decision, and its JSON for JS.
pub fn evaluate(gate: &Gate, request_json: &str) -> Result<(Decision, Value), String> {
    let request: EdgeRequest = serde_json::from_str(request_json).map_err(|e| format!("invalid request: {e}"))?;
    let headers: Vec<(String, String)> =
        request.headers.iter().map(|(name, value)| (name.to_ascii_lowercase(), header_text(value))).collect();
    // A clock that is no number would make every lifetime check meaningless.
    if !request.now.is_finite() {
        return Err("invalid request: now must be a finite number of Unix seconds".into());
    }
    let now = request.now.floor() as i64;
    let decision = gate.evaluate(&Request {
        source: request.source_ip.as_deref(),
        peer_uri_san: request.peer_uri_san.as_deref(),
        peer_certificate_sha256: None,
        body: request.body.as_deref().map(str::as_bytes),
        method: &request.method,
        path: &request.path,
        headers: &headers,
        now,
    });
    let out = outcome(&decision);
    Ok((decision, out))
}

fn header_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(values) => values.iter().map(header_text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// `{decision, status, reason, dryRun, headers, removeHeaders, body, audit}`: on allow,
/// `headers` go onto the upstream request and `removeHeaders` off it (`status` is null); on
/// deny, answer with `status`, `headers` and `body`.
fn outcome(decision: &Decision) -> Value {
    let audit: Value = serde_json::from_str(&decision.audit.to_json()).unwrap_or(Value::Null);
    let reason = decision.reason.map(|r| r.code());
    match &decision.action {
        Action::Continue { remove, set } => json!({
            "decision": "allow",
            "status": null,
            "reason": reason,
            "dryRun": decision.dry_run,
            "headers": object(set),
            "removeHeaders": remove,
            "body": null,
            "audit": audit,
        }),
        Action::Respond { status, headers, body } => json!({
            "decision": "deny",
            "status": status,
            "reason": reason,
            "dryRun": false,
            "headers": object(headers),
            "removeHeaders": [],
            "body": body,
            "audit": audit,
        }),
    }
}

fn object(pairs: &[(String, String)]) -> Map<String, Value> {
    pairs.iter().map(|(name, value)| (name.clone(), Value::from(value.as_str()))).collect()
}

#[cfg(target_arch = "wasm32")]
mod bindings {
    use wasm_bindgen::prelude::*;

    /// A compiled policy. JS: `new Gate(policyJson)`, `gate.evaluateJson(requestJson)`,
    /// `gate.filterList(handle, body, eventStream)`, `gate.bodyLimit(method, path)`.
    #[wasm_bindgen(js_name = Gate)]
    pub struct Bound(super::EdgeGate);

    #[wasm_bindgen(js_class = Gate)]
    impl Bound {
        #[wasm_bindgen(constructor)]
        pub fn new(policy_json: &str) -> Result<Bound, JsError> {
            super::EdgeGate::new(policy_json).map(Bound).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = evaluateJson)]
        pub fn evaluate_json(&mut self, request_json: &str) -> Result<String, JsError> {
            self.0.evaluate(request_json).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = filterList)]
        pub fn filter_list(&mut self, handle: u32, body: &str, event_stream: bool) -> Result<String, JsError> {
            self.0.filter_list(handle, body, event_stream).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = bodyLimit)]
        pub fn body_limit(&self, method: &str, path: &str) -> Option<u32> {
            self.0.body_limit(method, path).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        }
    }
}
