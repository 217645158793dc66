//! One request through the core: the host's view of it in, the decision applied out. What
//! hosts differ in is evened out here, before the core sees the request: header names in
//! any case (nginx keeps the client's), the Host header over a derived `:authority`, an
//! audit id where the host gives none; and where a host cannot strip a header (nginx marks
//! a removed header, and its proxy module still forwards it) the gate says so and refuses
//! what it cannot make safe.

use crate::host::{self, Host, Level, Map};
use crate::metrics::Metrics;
use crate::shared::SharedDataGuard;
use crate::{keys, seconds, HostKind, Shared, CONTINUE, PAUSE};
use agentgate::gate::ListFilter;
use agentgate::jwks::Fetch;
use agentgate::{mcp, Action, Reason, Request};
use std::cell::Cell;

pub enum Step {
    /// Keys are missing: fetch them from the request's own context and wait.
    Wait { provider: usize, fetch: Fetch, wait_ms: u64, now: i64 },
    /// The route decides on the body (MCP): read it, up to `limit` and one byte more.
    /// `declared`: the headers announce a body (a Content-Length above 0).
    ReadBody { limit: usize, declared: bool },
    /// The proxy-wasm action for the request.
    Done(u32),
    /// An allowed list call, continued: its response is filtered for this agent.
    Filter(Box<ListFilter>),
}

/// What the VM knows about the request and the host beyond the policy.
pub struct Context<'a> {
    /// The header count the host gave with the request.
    pub announced: usize,
    pub kind: HostKind,
    /// Whether the host keeps filter state; cleared at the first write it refuses.
    pub filter_state: &'a Cell<bool>,
    /// Headers the decision adds to the upstream's response (a rotated `DPoP-Nonce`).
    pub response_headers: &'a std::cell::RefCell<Vec<(String, String)>>,
}

const REQUEST_ID: &str = "x-request-id";

/// The request's headers as the core wants them: names in lower case; the Host header as
/// `:authority` when the host sent both (nginx derives `:authority` from its server name);
/// an `x-request-id` generated when the host gave none, so every record has an audit id.
/// Works in place: the headers are the host's copy, already this VM's.
pub fn normalized(host: &dyn Host, mut seen: Vec<(String, String)>) -> Vec<(String, String)> {
    for (name, _) in &mut seen {
        name.make_ascii_lowercase();
    }
    if let Some(host_header) = seen.iter().find(|(name, _)| name == "host").map(|(_, v)| v.clone()) {
        seen.retain(|(name, _)| name != ":authority");
        seen.push((":authority".to_string(), host_header));
    }
    if !seen.iter().any(|(name, _)| name == REQUEST_ID) {
        seen.push((REQUEST_ID.to_string(), request_id(host)));
    }
    seen
}

/// 128 random bits in hex (the clock's nanoseconds where the host has no randomness).
fn request_id(host: &dyn Host) -> String {
    let mut bytes = [0u8; 16];
    if !host.random(&mut bytes) {
        let nanos = host.host_clock_nanos().or_else(|| host.wasi_clock_nanos()).unwrap_or(0);
        bytes = u128::from(nanos).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decides the current request; `body` is its body once read (a route that needs it and
/// has none yet asks for it with [`Step::ReadBody`]).
pub fn decide(host: &dyn Host, shared: &Shared, context: &Context<'_>, body: Option<&[u8]>, may_wait: bool) -> Step {
    let (gate, metrics) = (&shared.gate, &shared.metrics);
    let (announced, nginx) = (context.announced, context.kind == HostKind::NgxWasmModule);
    let (Some(headers), Some(now_ms)) = (host.header_map(Map::RequestHeaders), host::now_ms(host)) else {
        // Fail closed: without headers or a clock nothing can be verified.
        return Step::Done(refuse_request(host, metrics, Reason::HostError));
    };
    if nginx {
        // ngx_wasm_module passes the first 100 headers only: a header past them could be a
        // second token or a forged audit header that the gate can neither see nor strip.
        let passed = headers.iter().filter(|(name, _)| !name.starts_with(':')).count();
        if passed < announced {
            host.log(
                Level::Error,
                &format!("agentgate: the host passed {passed} of the request's {announced} headers: refused"),
            );
            return Step::Done(refuse_request(host, metrics, Reason::TooManyHeaders));
        }
    }
    let seen = normalized(host, headers);
    let pseudo = |name: &str| seen.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str());
    if body.is_none() {
        if let Some(limit) = gate.body_limit(pseudo(":method"), pseudo(":path")) {
            // Kong calls no body callback for an empty body: only a Content-Length above 0
            // (and no other framing) is a body it will hand over.
            let declared = !seen.iter().any(|(n, _)| n == "transfer-encoding")
                && pseudo("content-length").trim().parse::<u64>().is_ok_and(|length| length > 0);
            return Step::ReadBody { limit, declared };
        }
    }
    let policy = gate.policy();
    // The client address goes into every audit record; the peer certificate only when a rule reads it.
    let source = property(host, true, &["source", "address"]);
    let peer = property(host, policy.needs_peer, &["connection", "uri_san_peer_certificate"]);
    // RFC 8705: the client certificate's SHA-256, only where a provider checks certificate-bound tokens.
    let certificate = property(host, policy.needs_peer_certificate, &["connection", "sha256_peer_certificate_digest"]);
    let now = seconds(now_ms);
    let request = Request {
        source: source.as_deref(),
        peer_uri_san: peer.as_deref(),
        peer_certificate_sha256: certificate.as_deref(),
        method: pseudo(":method"),
        path: pseudo(":path"),
        headers: &seen,
        now,
        body,
    };
    // Without shared data, single-use and rate-limit state lives in this VM (logged at configure).
    let evaluate = || {
        if shared.caps.shared_data {
            gate.evaluate_with(&request, &SharedDataGuard(host))
        } else {
            gate.evaluate(&request)
        }
    };
    let mut decision = evaluate();
    // Another worker may have fetched these keys since this one's last tick: adopt them from
    // shared data and decide again (nothing was counted or logged for the first decision).
    if let Some(provider) = decision.awaiting_keys {
        if shared.caps.shared_data && keys::sync(host, gate, provider) {
            decision = evaluate();
        }
    }
    if let (Some(provider), true) = (decision.awaiting_keys, may_wait) {
        if let Some((fetch, wait_ms)) = keys::for_request(host, shared, provider, now) {
            return Step::Wait { provider, fetch, wait_ms, now };
        }
    }
    if let (true, Action::Continue { remove, .. }) = (nginx, &decision.action) {
        // nginx cannot strip a repeated header (only its first copy is replaced in place).
        // (Counted in the normalized headers: names in lower case, the Host header kept.)
        if let Some(name) =
            remove.iter().find(|name| seen.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count() > 1)
        {
            host.log(
                Level::Error,
                &format!("agentgate: header {name} sent more than once cannot be stripped on this host: refused"),
            );
            return Step::Done(refuse_request(host, metrics, Reason::RepeatedHeader));
        }
    }
    let mut line = String::from("agentgate audit ");
    decision.audit.write_json(&mut line);
    host.log(policy.audit.log_level.into(), &line);
    if let Some(event) = &decision.quarantine {
        host.log(Level::Warn, &format!("agentgate quarantine {}", event.to_json()));
        metrics.count_quarantine(host);
    }
    metrics.count(host, decision.reason, decision.dry_run);
    metrics.count_rule(host, decision.rule_index, decision.allowed);
    if policy.audit.filter_state {
        set_filter_state(host, context, &decision.audit.log_fields());
    }
    if decision.audit.issuer.is_some() {
        metrics.count_cache(host, decision.cache_hit, decision.shared_cache_hit);
    }
    if let (Some("tools/call"), Some(tool)) = (decision.audit.mcp_method.as_deref(), decision.audit.mcp_tool.as_deref())
    {
        metrics.count_tool(host, tool, decision.rule_index.is_some(), decision.allowed);
    }
    context.response_headers.replace(decision.response_headers);
    match (decision.list_filter, &decision.action) {
        (Some(list), Action::Continue { remove, set }) => {
            if context.kind == HostKind::WasmNginxModule {
                // wasm-nginx-module cannot replace a response body (proxy_set_buffer_bytes is
                // unimplemented): the list would reach the agent unfiltered.
                host.log(
                    Level::Error,
                    "agentgate: this host cannot filter MCP list responses (no response body replacement): list call refused",
                );
                metrics.count(host, Some(Reason::HostError), false);
                let body = mcp::error_body(body.and_then(mcp::request_id).as_ref(), Reason::HostError);
                let headers = vec![("content-type".to_string(), "application/json".to_string())];
                let status = Reason::HostError.status();
                return Step::Done(apply(host, &Action::Respond { status, headers, body }, false));
            }
            // The list is read to be filtered: ask the upstream for it uncompressed.
            let mut remove = remove.clone();
            remove.push("accept-encoding".to_string());
            apply(host, &Action::Continue { remove, set: set.clone() }, nginx);
            Step::Filter(Box::new(list))
        }
        (_, action) => Step::Done(apply(host, action, nginx)),
    }
}

/// The filter-state names of the audit record's fields (`AuditRecord::log_fields`),
/// spelled out once rather than formatted per request.
const PROPERTIES: [(&str, &str); 6] = [
    ("decision", "agentgate.decision"),
    ("reason", "agentgate.reason"),
    ("rule", "agentgate.rule"),
    ("agent", "agentgate.agent"),
    ("on_behalf_of", "agentgate.on_behalf_of"),
    ("task_identifier", "agentgate.task_identifier"),
];

/// Writes the decision as filter state where the host keeps it. APISIX's properties are
/// nginx variables, which a filter cannot declare: each write fails with an error line of
/// the host's own, so none is tried there, and on any host writes stop at the first refusal.
fn set_filter_state<V: AsRef<str>>(host: &dyn Host, context: &Context<'_>, fields: &[(&str, V)]) {
    if context.kind == HostKind::WasmNginxModule || !context.filter_state.get() {
        return;
    }
    for (field, value) in fields {
        let path = PROPERTIES.iter().find(|(f, _)| f == field).map(|&(_, path)| path);
        let path = path.map_or_else(|| format!("agentgate.{field}").into(), std::borrow::Cow::Borrowed);
        if !host.set_property(&path, value.as_ref().as_bytes()) {
            context.filter_state.set(false);
            host.log(Level::Warn, "agentgate: this host keeps no filter state (audit.filter_state): not written again");
            return;
        }
    }
}

/// The answer on a host that configures at a request when the policy was refused (logged
/// once at configure): a 503 that says so, rather than the host's bare error page.
pub fn policy_refused(host: &dyn Host) -> u32 {
    let body = r#"{"error":"server_error","error_description":"the gateway's agentgate policy cannot run on this host; its error log says why"}"#;
    let headers = [("content-type".to_string(), "application/json".to_string())];
    apply(host, &Action::Respond { status: 503, headers: headers.to_vec(), body: body.to_string() }, false)
}

pub fn refuse_request(host: &dyn Host, metrics: &Metrics, reason: Reason) -> u32 {
    host.log(Level::Error, &format!("agentgate: request denied: {reason}"));
    metrics.count(host, Some(reason), false);
    apply(host, &Action::deny(reason, None), false)
}

/// A host property as text, fetched only when `wanted`.
fn property(host: &dyn Host, wanted: bool, path: &[&str]) -> Option<String> {
    if !wanted {
        return None;
    }
    host.get_property(path).ok().flatten().and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Applies an action to the current request; the proxy-wasm action to return.
fn apply(host: &dyn Host, action: &Action, nginx: bool) -> u32 {
    match action {
        Action::Continue { remove, set } => {
            for name in remove {
                // A header that is set anyway is replaced in place (all of it, on Envoy).
                if set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    continue;
                }
                // nginx forwards a removed header: its value is emptied in place first, so
                // what reaches the upstream is the name with an empty value.
                if nginx {
                    host.replace_request_header(name, "");
                }
                host.remove_request_header(name);
            }
            for (name, value) in set {
                host.replace_request_header(name, value);
            }
            CONTINUE
        }
        Action::Respond { status, headers, body } => {
            if !host.send_response(*status, headers, body) {
                // The host could not answer for us: stop the stream rather than let it through.
                host.close_request();
            }
            PAUSE
        }
    }
}
