//! One request through the core: the host's view of it in, the decision applied out. What
//! hosts differ in is evened out here, before the core sees the request: header names in
//! any case (nginx keeps the client's), the Host header over a derived `:authority`, an
//! audit id where the host gives none; and where a host cannot strip a header (nginx marks
//! a removed header, and its proxy module still forwards it) the gate says so and refuses
//! what it cannot make safe.

use crate::host::{self, Host, Level, Map};
use crate::metrics::Metrics;
use crate::shared::SharedDataGuard;
use crate::{keys, seconds, Shared, CONTINUE, PAUSE};
use agentgate::jwks::Fetch;
use agentgate::{Action, Reason, Request};

pub enum Step {
    /// Keys are missing: fetch them from the request's own context and wait.
    Wait { provider: usize, fetch: Fetch, wait_ms: u64, now: i64 },
    /// The proxy-wasm action for the request.
    Done(u32),
}

const REQUEST_ID: &str = "x-request-id";

/// The request's headers as the core wants them: names in lower case; the Host header as
/// `:authority` when the host sent both (nginx derives `:authority` from its server name);
/// an `x-request-id` generated when the host gave none, so every record has an audit id.
pub fn normalized(host: &dyn Host, headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> =
        headers.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.clone())).collect();
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

/// Decides the current request. `announced` is the header count the host gave with the
/// request; `nginx` whether the host is ngx_wasm_module.
pub fn decide(host: &dyn Host, shared: &Shared, announced: usize, nginx: bool, may_wait: bool) -> Step {
    let (gate, metrics) = (&shared.gate, &shared.metrics);
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
            return Step::Done(refuse_request(host, metrics, Reason::HostError));
        }
    }
    let seen = normalized(host, &headers);
    let pseudo = |name: &str| seen.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str());
    let policy = gate.policy();
    // The client address goes into every audit record; the peer certificate only when a rule reads it.
    let source = property(host, true, &["source", "address"]);
    let peer = property(host, policy.needs_peer, &["connection", "uri_san_peer_certificate"]);
    let now = seconds(now_ms);
    let request = Request {
        source: source.as_deref(),
        peer_uri_san: peer.as_deref(),
        peer_certificate_sha256: None,
        body: None,
        method: pseudo(":method"),
        path: pseudo(":path"),
        headers: &seen,
        now,
    };
    // Without shared data, single-use and rate-limit state lives in this VM (logged at configure).
    let decision = if shared.caps.shared_data {
        gate.evaluate_with(&request, &SharedDataGuard(host))
    } else {
        gate.evaluate(&request)
    };
    if let (Some(provider), true) = (decision.awaiting_keys, may_wait) {
        if let Some((fetch, wait_ms)) = keys::for_request(host, shared, provider, now) {
            return Step::Wait { provider, fetch, wait_ms, now };
        }
    }
    if let (true, Action::Continue { remove, .. }) = (nginx, &decision.action) {
        // nginx cannot strip a repeated header (only its first copy is replaced in place).
        if let Some(name) =
            remove.iter().find(|name| headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count() > 1)
        {
            host.log(
                Level::Error,
                &format!("agentgate: header {name} sent more than once cannot be stripped on this host: refused"),
            );
            return Step::Done(refuse_request(host, metrics, Reason::HostError));
        }
    }
    host.log(Level::Info, &format!("agentgate audit {}", decision.audit.to_json()));
    metrics.count(host, decision.reason, decision.dry_run);
    metrics.count_rule(host, decision.rule_index, decision.allowed);
    if policy.audit.filter_state {
        for (field, value) in decision.audit.log_fields() {
            host.set_property(&format!("agentgate.{field}"), value.as_bytes());
        }
    }
    if decision.audit.issuer.is_some() {
        metrics.count_cache(host, decision.cache_hit);
    }
    Step::Done(apply(host, &decision.action, nginx))
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
