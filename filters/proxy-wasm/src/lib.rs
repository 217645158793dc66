//! agentgate as a proxy-wasm HTTP filter: host calls in, the core's decision out.
//! Host calls go through `host` (raw imports, statuses as integers) wherever the SDK would
//! panic on a status or a header it does not expect; the rest through `proxy_wasm::hostcalls`,
//! never the SDK's trait helpers, which unwrap. A panic aborts the VM (and every request on
//! that worker).

mod capabilities;
mod host;
mod keys;
mod metrics;
mod shared;

use agentgate::{Action, Gate, Reason, Request};
use capabilities::Capabilities;
use keys::{Fetcher, Waiter};
use metrics::Metrics;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as HostAction, BufferType, ContextType, LogLevel};
use shared::{prepare_replay_buckets, SharedDataGuard};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// What the root context and its requests share: the policy in force, its counters and
/// the key fetching state. A reconfiguration replaces it whole; requests in flight keep theirs.
struct Shared {
    gate: Gate,
    metrics: Metrics,
    fetcher: RefCell<Fetcher>,
    caps: Capabilities,
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<Shared>>,
    /// Counters before any policy (requests refused as `not_configured`).
    metrics: Rc<Metrics>,
}

/// Fetched keys are checked this often, in milliseconds (and due fetches started).
const TICK_MS: u32 = 100;

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(shared) = self.shared.clone() else { return };
        let now = host::now_ms().map_or(0, seconds);
        let settled = shared.fetcher.borrow_mut().on_response(&shared.gate, &shared.metrics, token_id, body_size, now);
        if let Some(provider) = settled {
            resume(&shared, |w| w.provider == provider);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.metrics = Rc::new(Metrics::define(None));
        true
    }

    /// Returning false makes Envoy refuse the plugin: a bad policy never serves traffic.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return refuse("no policy configured (set the plugin configuration)"),
            Err(status) => return refuse(&format!("cannot read the plugin configuration: {status:?}")),
        };
        let Ok(json) = std::str::from_utf8(&config) else {
            return refuse("the plugin configuration is not UTF-8");
        };
        match Gate::from_json(json) {
            Ok(gate) => {
                let ticking = self.shared.as_ref().is_some_and(|old| old.gate.remote_providers().next().is_some());
                let caps = Capabilities::probe(if ticking { TICK_MS } else { 0 });
                if let Some(why) = caps.refusal(&gate) {
                    return refuse(&format!("policy cannot run on this host: {why}"));
                }
                for note in caps.degradations() {
                    log(LogLevel::Warn, &format!("agentgate: {note}"));
                }
                let metrics = Metrics::define(Some(&gate));
                if !metrics.available() {
                    log(LogLevel::Warn, "agentgate: no metrics on this host: the audit log is the record of decisions");
                }
                let policy = gate.policy();
                log(
                    LogLevel::Info,
                    &format!(
                        "agentgate: policy loaded ({} providers, {} rules, mode {:?})",
                        policy.providers.len(),
                        policy.rules.len(),
                        policy.mode
                    ),
                );
                if caps.shared_data {
                    prepare_replay_buckets(&gate);
                }
                let remote: Vec<usize> = gate.remote_providers().map(|(i, _, _)| i).collect();
                for &index in &remote {
                    // Keys another worker (or the previous configuration) already fetched.
                    keys::sync(&gate, index);
                }
                if !remote.is_empty() && !host::set_tick_period(TICK_MS) {
                    return refuse("remote keys (jwks_uri, discovery) need timer ticks, which this host refused");
                }
                // Requests waiting under the old policy are decided by it now.
                if let Some(old) = self.shared.take() {
                    resume(&old, |_| true);
                }
                self.shared = Some(Rc::new(Shared { gate, metrics, fetcher: RefCell::default(), caps }));
                true
            }
            Err(error) => refuse(&format!("invalid policy: {error}")),
        }
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        let Some(now_ms) = host::now_ms() else { return };
        let settled = shared.fetcher.borrow_mut().tick(&shared.gate, &shared.metrics, seconds(now_ms));
        resume(&shared, |w| settled.contains(&w.provider) || w.deadline_ms <= now_ms);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { shared: self.shared.clone(), metrics: Rc::clone(&self.metrics), context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Decides the waiting requests `which` selects, without further waiting, and lets each go on
/// or answers it.
fn resume(shared: &Shared, which: impl Fn(&Waiter) -> bool) {
    let ready: Vec<Waiter> = {
        let mut fetcher = shared.fetcher.borrow_mut();
        let (ready, still) = std::mem::take(&mut fetcher.waiting).into_iter().partition(|w| which(w));
        fetcher.waiting = still;
        ready
    };
    for waiter in ready {
        // The request may be gone (the client left): nothing to do then.
        if hostcalls::set_effective_context(waiter.context_id).is_err() {
            continue;
        }
        if let HostAction::Continue = decide(shared, None) {
            let _ = hostcalls::resume_http_request();
        }
    }
}

fn seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

fn refuse(message: &str) -> bool {
    log(LogLevel::Error, &format!("agentgate: {message}"));
    false
}

fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

struct Filter {
    shared: Option<Rc<Shared>>,
    metrics: Rc<Metrics>,
    context_id: u32,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> HostAction {
        match &self.shared {
            Some(shared) => decide(shared, Some(self.context_id)),
            // Fail closed: without a policy nothing can be verified.
            None => refuse_request(&self.metrics, Reason::NotConfigured),
        }
    }
}

/// Decides the current request and applies the decision. With `wait_as` (the request's
/// context id), a request whose token needs keys being fetched is held instead.
fn decide(shared: &Shared, wait_as: Option<u32>) -> HostAction {
    let headers = host::header_map(host::REQUEST_HEADERS);
    let (Some(headers), Some(now_ms)) = (headers, host::now_ms()) else {
        // Fail closed: without headers or a clock nothing can be verified.
        return refuse_request(&shared.metrics, Reason::HostError);
    };
    let (gate, metrics) = (&shared.gate, &shared.metrics);
    let pseudo = |name: &str| headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str());
    let policy = gate.policy();
    // The client address goes into every audit record; the peer certificate only when a rule reads it.
    let source = property(true, &["source", "address"]);
    let peer = property(policy.needs_peer, &["connection", "uri_san_peer_certificate"]);
    let request = Request {
        source: source.as_deref(),
        peer_uri_san: peer.as_deref(),
        body: None,
        method: pseudo(":method"),
        path: pseudo(":path"),
        headers: &headers,
        now: seconds(now_ms),
    };
    // Without shared data, single-use and rate-limit state lives in this VM (logged at configure).
    let decision =
        if shared.caps.shared_data { gate.evaluate_with(&request, &SharedDataGuard) } else { gate.evaluate(&request) };
    if let (Some(provider), Some(context_id)) = (decision.awaiting_keys, wait_as) {
        let mut fetcher = shared.fetcher.borrow_mut();
        if let Some(wait_ms) = fetcher.should_wait(gate, provider, request.now) {
            fetcher.waiting.push(Waiter { context_id, provider, deadline_ms: now_ms.saturating_add(wait_ms) });
            return HostAction::Pause;
        }
    }
    log(LogLevel::Info, &format!("agentgate audit {}", decision.audit.to_json()));
    metrics.count(decision.reason, decision.dry_run);
    metrics.count_rule(decision.rule_index, decision.allowed);
    if policy.audit.filter_state {
        for (field, value) in decision.audit.log_fields() {
            host::set_property(&format!("agentgate.{field}"), value.as_bytes());
        }
    }
    if decision.audit.issuer.is_some() {
        metrics.count_cache(decision.cache_hit);
    }
    apply(&decision.action)
}

fn refuse_request(metrics: &Metrics, reason: Reason) -> HostAction {
    log(LogLevel::Error, &format!("agentgate: request denied: {reason}"));
    metrics.count(Some(reason), false);
    apply(&Action::deny(reason, None))
}

/// A host property as text, fetched only when `wanted`.
fn property(wanted: bool, path: &[&str]) -> Option<String> {
    if !wanted {
        return None;
    }
    host::get_property(path).ok().flatten().and_then(|bytes| String::from_utf8(bytes).ok())
}

fn apply(action: &Action) -> HostAction {
    match action {
        Action::Continue { remove, set } => {
            for name in remove {
                host::remove_request_header(name);
            }
            for (name, value) in set {
                host::set_request_header(name, value);
            }
            HostAction::Continue
        }
        Action::Respond { status, headers, body } => {
            if !host::send_response(*status, headers, body) {
                // The host could not answer for us: stop the stream rather than let it through.
                host::close_request();
            }
            HostAction::Pause
        }
    }
}
