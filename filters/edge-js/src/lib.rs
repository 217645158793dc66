//! agentgate for JS edge runtimes (Workers, Deno, Node): the same core as the proxy-wasm
//! filter, compiled with wasm-bindgen. Request in as JSON, decision out as JSON; the JS
//! wrapper (`index.js`) gives it its API. No policy logic here.

use agentgate::gate::ListFilter;
use agentgate::jwks::{discovery_url, split_url, Fetch, KeyRecord, Next, RemoteJwks, Stage};
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

/// How the edge gets the keys of a provider with `jwks_uri` or `discovery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKeys {
    /// Refused: keys must be inline (`jwks`).
    Refuse,
    /// The JS side fetches them with the runtime's `fetch` (`keys.js`) or gives them with
    /// `setKeys`; `cluster`, an Envoy upstream, is not needed.
    Fetched,
}

/// The `cluster` a provider that fetches its keys must name for the core: at the edge the
/// runtime's `fetch` reaches the identity provider, so a missing one is filled in.
const EDGE_CLUSTER: &str = "edge-fetch";

/// A policy the edge refuses, with the JSON path of what is wrong (empty: the document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "invalid policy: {}", self.message)
        } else {
            write!(f, "invalid policy: {}: {}", self.path, self.message)
        }
    }
}

/// Compiles `policy_json`, refusing what an edge runtime cannot do.
pub fn create(policy_json: &str, remote: RemoteKeys) -> Result<Gate, PolicyError> {
    // The cluster is filled in either way: refused, such a policy is told what to do instead.
    let filled = with_edge_clusters(policy_json);
    let gate = Gate::from_json(filled.as_deref().unwrap_or(policy_json))
        .map_err(|e| PolicyError { path: e.path, message: e.message })?;
    let providers = &gate.policy().providers;
    if let (Some((index, provider, source)), RemoteKeys::Refuse) = (gate.remote_providers().next(), remote) {
        return Err(PolicyError {
            path: format!("providers[{index}].{}", if source.jwks_uri.is_some() { "jwks_uri" } else { "discovery" }),
            message: format!(
                "provider {:?} fetches its keys: create the gate with {{ keys: 'fetch' }} (or 'manual' and setKeys), or give them inline (jwks)",
                provider.name
            ),
        });
    }
    if gate.policy().needs_shared_single_use() {
        let shared = |p: &&agentgate::policy::Provider| {
            p.single_use_ring.is_some() && p.single_use_scope == agentgate::config::SingleUseScope::Gateway
        };
        if let Some(index) = providers.iter().position(|p| shared(&p)) {
            return Err(PolicyError {
                path: format!("providers[{index}].single_use_scope"),
                message: "single use across the gateway needs storage shared by every isolate, which this build does not have: set \"single_use_scope\": \"worker\" to accept each token once per isolate".into(),
            });
        }
    }
    // `bind_mtls_peer` stays allowed: the runtime passes `peerUriSan` when it terminates mTLS;
    // without it such a rule denies.
    Ok(gate)
}

/// `policy_json` with [`EDGE_CLUSTER`] as the `cluster` of each provider that fetches its
/// keys and names none; `None` when nothing changes (or the text is no JSON object: the
/// core then says what is wrong with it).
fn with_edge_clusters(policy_json: &str) -> Option<String> {
    let mut policy: Value = serde_json::from_str(policy_json).ok()?;
    let mut changed = false;
    for provider in policy.get_mut("providers")?.as_array_mut()?.iter_mut().filter_map(Value::as_object_mut) {
        let fetches = provider.contains_key("jwks_uri") || provider.get("discovery") == Some(&Value::Bool(true));
        if fetches && !provider.contains_key("cluster") {
            provider.insert("cluster".into(), Value::from(EDGE_CLUSTER));
            changed = true;
        }
    }
    changed.then(|| policy.to_string())
}

/// A gate, the list filters of its recent `tools/list` decisions by handle (the caller
/// passes the response back with the handle), and this isolate's key state of each provider
/// that fetches its keys. Pending lists are bounded: a caller that never filters cannot grow
/// them, and an unknown handle is an error (the caller must not pass the list unfiltered).
pub struct EdgeGate {
    gate: Gate,
    pending: VecDeque<(u32, ListFilter)>,
    next: u32,
    /// By provider index: the core's record of when to fetch and what was fetched.
    records: Vec<(usize, KeyRecord)>,
}

const MAX_PENDING_LISTS: usize = 256;

impl EdgeGate {
    pub fn new(policy_json: &str, remote: RemoteKeys) -> Result<EdgeGate, PolicyError> {
        let gate = create(policy_json, remote)?;
        let records = gate.remote_providers().map(|(index, _, _)| (index, KeyRecord::default())).collect();
        Ok(EdgeGate { gate, pending: VecDeque::new(), next: 1, records })
    }

    /// Decides a request; a list call's decision carries `listFilter`, a handle for
    /// [`EdgeGate::filter_list`].
    pub fn evaluate(&mut self, request_json: &str) -> Result<String, String> {
        let (decision, mut out) = evaluate(&self.gate, request_json)?;
        if let Some(object) = out.as_object_mut() {
            let provider = decision.awaiting_keys.and_then(|i| self.gate.policy().providers.get(i));
            object.insert("awaitingKeys".into(), provider.map_or(Value::Null, |p| Value::from(p.name.as_str())));
            if let Some(filter) = decision.list_filter {
                let handle = self.next;
                self.next = self.next.wrapping_add(1).max(1);
                if self.pending.len() >= MAX_PENDING_LISTS {
                    self.pending.pop_front();
                }
                self.pending.push_back((handle, filter));
                object.insert("listFilter".into(), Value::from(handle));
            }
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

    /// `agentgate eval`'s explanation of `request_json`: each requirement of the rule the
    /// gate applies, in order, and whether it held (`checks`), or why no rule was reached
    /// (`reason`). Nothing is counted or consumed.
    pub fn explain(&self, request_json: &str) -> Result<String, String> {
        with_request(request_json, |request| match self.gate.explain(request) {
            Ok(checks) => {
                let checks: Vec<Value> = checks
                    .iter()
                    .map(|(requirement, result)| {
                        let reason = result.err();
                        json!({
                            "requirement": requirement,
                            "held": reason.is_none(),
                            "reason": reason.map(|r| r.code()),
                        })
                    })
                    .collect();
                json!({"checks": checks, "reason": null})
            }
            Err(reason) => json!({"checks": null, "reason": reason.code()}),
        })
        .map(|out| out.to_string())
    }

    /// The fetches to start at `now` (a JSON array): each scheduled one that is due, or for
    /// `forced` (a provider whose token names a key it does not have) one early fetch, at most
    /// once per `min_refetch_seconds`. Each is leased until its answer is given to
    /// [`EdgeGate::key_response`] (or the lease runs out): no second fetch starts meanwhile.
    pub fn key_fetches(&mut self, now: f64, forced: Option<&str>) -> Result<String, String> {
        let now = seconds(now)?;
        let providers = &self.gate.policy().providers;
        let mut fetches = Vec::new();
        for (index, record) in &mut self.records {
            let Some((provider, remote)) = providers.get(*index).and_then(|p| Some((p, p.remote.as_ref()?))) else {
                continue;
            };
            let force = match forced {
                Some(name) if name != provider.name => continue,
                Some(_) => true,
                None => false,
            };
            if let Some((claimed, fetch)) = record.claim(remote, now, force) {
                fetches.push(fetch_json(&provider.name, remote, &claimed, &fetch));
                *record = claimed;
            }
        }
        Ok(Value::Array(fetches).to_string())
    }

    /// Records the answer to a fetch of `provider` at `stage` (`status` and `body`, or
    /// `error` when there was none) and installs a new key set. JSON: `fetch`, the next
    /// fetch (discovery found the JWKS URL); `updated`, the number of keys now in use; or
    /// `error`, why it failed (the last good keys stay until `max_stale_seconds`).
    pub fn key_response(
        &mut self,
        provider: &str,
        stage: &str,
        answer: Result<(u16, &[u8]), String>,
        now: f64,
        jitter: f64,
    ) -> Result<String, String> {
        let now = seconds(now)?;
        let stage = stage_of(stage)?;
        let (index, remote, record) = record_of(&self.gate, &mut self.records, provider)?;
        let (updated, next) = record.record_response(remote, stage, answer, now, jitter);
        *record = updated;
        let out = match next {
            Next::Fetch(fetch) => {
                json!({"fetch": fetch_json(provider, remote, record, &fetch), "updated": null, "error": null})
            }
            Next::Updated(count) => {
                self.gate.install_keys(index, record);
                json!({"fetch": null, "updated": count, "error": null})
            }
            Next::Failed(error) => json!({"fetch": null, "updated": null, "error": error}),
        };
        Ok(out.to_string())
    }

    /// Installs `jwks_json` as the keys of `provider`, fetched at `now` (from a store, a
    /// scheduled job, a test): checked and scheduled as a fetched JWKS is. Returns how many
    /// keys are in use.
    pub fn set_keys(&mut self, provider: &str, jwks_json: &str, now: f64) -> Result<usize, String> {
        let now = seconds(now)?;
        let (index, remote, record) = record_of(&self.gate, &mut self.records, provider)?;
        match record.record_response(remote, Stage::Jwks, Ok((200, jwks_json.as_bytes())), now, 0.0) {
            (updated, Next::Updated(count)) => {
                *record = updated;
                self.gate.install_keys(index, record);
                Ok(count)
            }
            (_, Next::Failed(error)) => Err(format!("keys of {provider:?} not set: {error}")),
            (_, Next::Fetch(_)) => Err(format!("keys of {provider:?} not set")),
        }
    }

    /// Each provider that fetches its keys: what this isolate holds and when it fetches next.
    pub fn key_status(&self) -> String {
        let providers = &self.gate.policy().providers;
        let status: Vec<Value> = self
            .records
            .iter()
            .filter_map(|(index, record)| {
                let provider = providers.get(*index)?;
                let remote = provider.remote.as_ref()?;
                let installed = provider.keys.current();
                Some(json!({
                    "provider": provider.name,
                    "version": record.version,
                    "keys": installed.keys.len(),
                    "fetchedAt": record.fetched_at,
                    "usableUntil": installed.usable_until,
                    "nextAttempt": record.next_attempt,
                    "fetchingUntil": (record.lease_until > 0).then_some(record.lease_until),
                    "failures": record.failures,
                    "lastError": record.last_error,
                    "discoveredUri": record.discovered_uri,
                    "waitMs": remote.wait_ms,
                }))
            })
            .collect();
        Value::Array(status).to_string()
    }
}

/// The index, fetch settings and key record of `provider`.
fn record_of<'a>(
    gate: &'a Gate,
    records: &'a mut [(usize, KeyRecord)],
    provider: &str,
) -> Result<(usize, &'a RemoteJwks, &'a mut KeyRecord), String> {
    let providers = &gate.policy().providers;
    let found = records.iter_mut().find_map(|(index, record)| {
        let p = providers.get(*index).filter(|p| p.name == provider)?;
        Some((*index, p.remote.as_ref()?, record))
    });
    found.ok_or_else(|| format!("no provider {provider:?} with jwks_uri or discovery in this policy"))
}

/// A fetch for JS: the provider, the stage to report back, the URL, and its limits.
fn fetch_json(provider: &str, remote: &RemoteJwks, record: &KeyRecord, fetch: &Fetch) -> Value {
    json!({
        "provider": provider,
        "stage": stage_name(fetch.stage),
        "url": url_of(remote, record, fetch),
        "timeoutMs": remote.timeout_ms,
        "maxBytes": remote.max_bytes,
    })
}

/// The URL the core split into `fetch` (it keeps host and path only: Envoy's cluster knows
/// the scheme), with its scheme.
fn url_of(remote: &RemoteJwks, record: &KeyRecord, fetch: &Fetch) -> String {
    let source = match fetch.stage {
        Stage::Jwks => remote.jwks_uri.clone().or_else(|| record.discovered_uri.clone()),
        stage => Some(discovery_url(&remote.issuer, stage)),
    };
    source
        .filter(|url| split_url(url).is_ok_and(|(authority, path)| authority == fetch.authority && path == fetch.path))
        .unwrap_or_else(|| format!("https://{}{}", fetch.authority, fetch.path))
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::OpenIdDiscovery => "openid_discovery",
        Stage::OAuthDiscovery => "oauth_discovery",
        Stage::Jwks => "jwks",
    }
}

fn stage_of(name: &str) -> Result<Stage, String> {
    match name {
        "openid_discovery" => Ok(Stage::OpenIdDiscovery),
        "oauth_discovery" => Ok(Stage::OAuthDiscovery),
        "jwks" => Ok(Stage::Jwks),
        other => Err(format!("unknown fetch stage {other:?}")),
    }
}

/// Unix seconds from JS; a clock that is no number would make every lifetime meaningless.
fn seconds(now: f64) -> Result<i64, String> {
    if now.is_finite() {
        Ok(now.floor() as i64)
    } else {
        Err("invalid request: now must be a finite number of Unix seconds".into())
    }
}

/// Decides `request_json` (an [`EdgeRequest`]): the decision, and its JSON for JS.
pub fn evaluate(gate: &Gate, request_json: &str) -> Result<(Decision, Value), String> {
    with_request(request_json, |request| {
        let decision = gate.evaluate(request);
        let out = outcome(&decision);
        (decision, out)
    })
}

/// Runs `f` on the core's request for `request_json` (an [`EdgeRequest`]).
fn with_request<T>(request_json: &str, f: impl FnOnce(&Request<'_>) -> T) -> Result<T, String> {
    let request: EdgeRequest = serde_json::from_str(request_json).map_err(|e| format!("invalid request: {e}"))?;
    let headers: Vec<(String, String)> =
        request.headers.iter().map(|(name, value)| (name.to_ascii_lowercase(), header_text(value))).collect();
    let now = seconds(request.now)?;
    Ok(f(&Request {
        source: request.source_ip.as_deref(),
        peer_uri_san: request.peer_uri_san.as_deref(),
        peer_certificate_sha256: None,
        body: request.body.as_deref().map(str::as_bytes),
        method: &request.method,
        path: &request.path,
        headers: &headers,
        now,
    }))
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
    use super::{EdgeGate, RemoteKeys};
    use wasm_bindgen::prelude::*;

    /// A compiled policy. JS: `new Gate(policyJson, fetchesKeys)`, `gate.evaluateJson(requestJson)`,
    /// `gate.filterList(handle, body, eventStream)`, `gate.bodyLimit(method, path)`,
    /// `gate.explainJson(requestJson)`, and for providers that fetch their keys
    /// `keyFetches`, `keyResponse`, `setKeys`, `keyStatus` (driven by `keys.js`).
    #[wasm_bindgen(js_name = Gate)]
    pub struct Bound(EdgeGate);

    fn remote(fetches_keys: bool) -> RemoteKeys {
        if fetches_keys {
            RemoteKeys::Fetched
        } else {
            RemoteKeys::Refuse
        }
    }

    #[wasm_bindgen(js_class = Gate)]
    impl Bound {
        #[wasm_bindgen(constructor)]
        pub fn new(policy_json: &str, fetches_keys: bool) -> Result<Bound, JsError> {
            EdgeGate::new(policy_json, remote(fetches_keys)).map(Bound).map_err(|e| JsError::new(&e.to_string()))
        }

        #[wasm_bindgen(js_name = evaluateJson)]
        pub fn evaluate_json(&mut self, request_json: &str) -> Result<String, JsError> {
            self.0.evaluate(request_json).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = explainJson)]
        pub fn explain_json(&self, request_json: &str) -> Result<String, JsError> {
            self.0.explain(request_json).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = filterList)]
        pub fn filter_list(&mut self, handle: u32, body: &str, event_stream: bool) -> Result<String, JsError> {
            self.0.filter_list(handle, body, event_stream).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = bodyLimit)]
        pub fn body_limit(&self, method: &str, path: &str) -> Option<u32> {
            self.0.body_limit(method, path).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        }

        #[wasm_bindgen(js_name = keyFetches)]
        pub fn key_fetches(&mut self, now: f64, forced: Option<String>) -> Result<String, JsError> {
            self.0.key_fetches(now, forced.as_deref()).map_err(|e| JsError::new(&e))
        }

        /// `error` set: the fetch got no answer (`status` and `body` are ignored).
        #[wasm_bindgen(js_name = keyResponse)]
        #[allow(clippy::too_many_arguments)]
        pub fn key_response(
            &mut self,
            provider: &str,
            stage: &str,
            status: u16,
            body: &[u8],
            error: Option<String>,
            now: f64,
            jitter: f64,
        ) -> Result<String, JsError> {
            let answer = match error {
                Some(error) => Err(error),
                None => Ok((status, body)),
            };
            self.0.key_response(provider, stage, answer, now, jitter).map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = setKeys)]
        pub fn set_keys(&mut self, provider: &str, jwks_json: &str, now: f64) -> Result<u32, JsError> {
            self.0
                .set_keys(provider, jwks_json, now)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .map_err(|e| JsError::new(&e))
        }

        #[wasm_bindgen(js_name = keyStatus)]
        pub fn key_status(&self) -> String {
            self.0.key_status()
        }
    }

    /// The first thing wrong with a policy as JSON `{path, message}` (the JSON path, empty
    /// for the document itself), or `undefined` when the edge accepts it.
    #[wasm_bindgen(js_name = policyError)]
    pub fn policy_error(policy_json: &str, fetches_keys: bool) -> Option<String> {
        super::create(policy_json, remote(fetches_keys))
            .err()
            .map(|e| serde_json::json!({"path": e.path, "message": e.message}).to_string())
    }
}
