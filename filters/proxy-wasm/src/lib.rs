//! agentgate as a proxy-wasm HTTP filter: host calls in, the core's decision out.
//! Only `proxy_wasm::hostcalls` are used: the SDK's trait helpers unwrap host statuses and a
//! panic would abort the VM (and every request on that worker).

use agentgate::ratelimit::{admit_in_slot, slot_key, RateLimit, RateLimiter};
use agentgate::replay::{
    bucket_key, bucket_name, record_in_bucket, GuardError, ReplayGuard, ReplayScope, TokenId, SHARDS,
};
use agentgate::{Action, Gate, Reason, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as HostAction, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// Counters, defined once per VM. A failed definition leaves the counter out (metrics must
/// never stop a request).
#[derive(Default)]
struct Metrics {
    allowed: Option<u32>,
    dry_run_denied: Option<u32>,
    cache_hits: Option<u32>,
    cache_misses: Option<u32>,
    denied: Vec<(Reason, u32)>,
    /// Per rule, in policy order: (allowed, denied).
    rules: Vec<(Option<u32>, Option<u32>)>,
}

impl Metrics {
    /// The counters for `gate`'s policy (per-rule ones included). Envoy hands back the same
    /// counter for a name defined again, so a reconfiguration keeps counting.
    fn define(gate: Option<&Gate>) -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let rules = gate.map_or(&[][..], |g| &g.policy().rules[..]);
        Metrics {
            allowed: counter("agentgate.allowed"),
            dry_run_denied: counter("agentgate.dry_run.denied"),
            cache_hits: counter("agentgate.token_cache.hit"),
            cache_misses: counter("agentgate.token_cache.miss"),
            denied: Reason::ALL.iter().filter_map(|&r| counter(&r.metric()).map(|id| (r, id))).collect(),
            rules: rules
                .iter()
                .map(|rule| {
                    let name = rule_metric(&rule.name);
                    (counter(&format!("{name}.allowed")), counter(&format!("{name}.denied")))
                })
                .collect(),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn count_cache(&self, hit: bool) {
        Metrics::bump(if hit { self.cache_hits } else { self.cache_misses });
    }

    fn count_rule(&self, index: Option<usize>, allowed: bool) {
        if let Some(&(allow, deny)) = index.and_then(|i| self.rules.get(i)) {
            Metrics::bump(if allowed { allow } else { deny });
        }
    }

    fn count(&self, reason: Option<Reason>, dry_run: bool) {
        let bump = Metrics::bump;
        match reason {
            None => bump(self.allowed),
            Some(reason) => {
                bump(self.denied.iter().find(|(r, _)| *r == reason).map(|&(_, id)| id));
                if dry_run {
                    bump(self.dry_run_denied);
                }
            }
        }
    }
}

#[derive(Default)]
struct Root {
    gate: Option<Rc<Gate>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

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
                prepare_replay_buckets(&gate);
                self.metrics = Rc::new(Metrics::define(Some(&gate)));
                self.gate = Some(Rc::new(gate));
                true
            }
            Err(error) => refuse(&format!("invalid policy: {error}")),
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { gate: self.gate.clone(), metrics: Rc::clone(&self.metrics) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A rule's counter prefix: Envoy stat names keep `[A-Za-z0-9_-]`; anything else becomes `_`.
fn rule_metric(rule: &str) -> String {
    let name: String = rule.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("agentgate.rule.{name}")
}

fn refuse(message: &str) -> bool {
    log(LogLevel::Error, &format!("agentgate: {message}"));
    false
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

struct Filter {
    gate: Option<Rc<Gate>>,
    metrics: Rc<Metrics>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> HostAction {
        let headers = hostcalls::get_map(MapType::HttpRequestHeaders);
        let now = hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        // Fail closed: without a policy, headers or a clock nothing can be verified.
        let (gate, headers, now) = match (&self.gate, headers, now) {
            (Some(gate), Ok(headers), Some(now)) => (gate, headers, now),
            (None, _, _) => return self.refuse_request(Reason::NotConfigured),
            _ => return self.refuse_request(Reason::HostError),
        };
        let pseudo = |name: &str| headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str());
        // Extra host calls only for policies that use them.
        let policy = gate.policy();
        // The client address goes into every audit record.
        let source = property(true, vec!["source", "address"]);
        let peer = property(policy.needs_peer, vec!["connection", "uri_san_peer_certificate"]);
        let request = Request {
            source: source.as_deref(),
            peer_uri_san: peer.as_deref(),
            method: pseudo(":method"),
            path: pseudo(":path"),
            headers: &headers,
            now: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        };
        let decision = gate.evaluate_with(&request, &SharedDataGuard);
        log(LogLevel::Info, &format!("agentgate audit {}", decision.audit.to_json()));
        self.metrics.count(decision.reason, decision.dry_run);
        self.metrics.count_rule(decision.rule_index, decision.allowed);
        if policy.audit.filter_state {
            for (field, value) in decision.audit.log_fields() {
                let _ = hostcalls::set_property(vec![&format!("agentgate.{field}")], Some(value.as_bytes()));
            }
        }
        if decision.audit.issuer.is_some() {
            self.metrics.count_cache(decision.cache_hit);
        }
        apply(&decision.action)
    }
}

impl Filter {
    fn refuse_request(&self, reason: Reason) -> HostAction {
        log(LogLevel::Error, &format!("agentgate: request denied: {reason}"));
        self.metrics.count(Some(reason), false);
        apply(&Action::deny(reason, None))
    }
}

/// A host property as text, fetched only when `wanted`.
fn property(wanted: bool, path: Vec<&str>) -> Option<String> {
    if !wanted {
        return None;
    }
    hostcalls::get_property(path).ok().flatten().and_then(|bytes| String::from_utf8(bytes).ok())
}

fn apply(action: &Action) -> HostAction {
    match action {
        Action::Continue { remove, set } => {
            for name in remove {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
            }
            for (name, value) in set {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value.as_str()));
            }
            HostAction::Continue
        }
        Action::Respond { status, headers, body } => {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            if hostcalls::send_http_response(u32::from(*status), headers, Some(body.as_bytes())).is_err() {
                // The host could not answer for us: stop the stream rather than let it through.
                let _ = hostcalls::reset_http_request();
            }
            HostAction::Pause
        }
    }
}

/// Single-use `jti`s and rate-limit buckets in the host's shared data, so every worker VM
/// of the proxy agrees.
struct SharedDataGuard;

const CAS_RETRIES: usize = 16;

/// Reads `key`, lets `update` compute the new value (`None`: nothing to write) and an
/// answer, and writes with the host's compare-and-swap, retrying when another worker won.
fn update_shared<T>(
    key: &str,
    update: impl Fn(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), GuardError>,
) -> Result<T, GuardError> {
    for _ in 0..CAS_RETRIES {
        let (current, cas) = hostcalls::get_shared_data(key).map_err(|_| GuardError::Unavailable)?;
        let (updated, answer) = update(current.as_deref())?;
        let Some(updated) = updated else { return Ok(answer) };
        match hostcalls::set_shared_data(key, Some(&updated), cas) {
            Ok(()) => return Ok(answer),
            Err(Status::CasMismatch) => continue,
            Err(_) => return Err(GuardError::Unavailable),
        }
    }
    Err(GuardError::Unavailable)
}

impl ReplayGuard for SharedDataGuard {
    fn first_use(&self, scope: ReplayScope<'_>, id: &TokenId, expires_at: i64, _now: i64) -> Result<bool, GuardError> {
        let (key, window) = bucket_key(scope.provider, id, expires_at, scope.ring);
        update_shared(&key, |bucket| {
            Ok(match record_in_bucket(bucket, window, id)? {
                Some(updated) => (Some(updated), true),
                None => (None, false),
            })
        })
    }
}

impl RateLimiter for SharedDataGuard {
    fn admit(&self, scope: &str, agent: &str, limit: &RateLimit, now: i64) -> Result<Result<(), u64>, GuardError> {
        let (key, id) = slot_key(scope, agent);
        update_shared(&key, |slot| {
            let (updated, verdict) = admit_in_slot(slot, &id, limit, now);
            Ok((Some(updated), verdict))
        })
    }
}

/// Creates every bucket a single-use provider may use, empty, unless another VM already
/// did: later updates then always carry a CAS, so two workers can never both record the
/// same `jti` as new.
fn prepare_replay_buckets(gate: &Gate) {
    for provider in &gate.policy().providers {
        let Some(ring) = provider.single_use_ring else { continue };
        for slot in 0..ring {
            for shard in 0..SHARDS {
                let key = bucket_name(&provider.name, slot, shard);
                if let Ok((None, _)) = hostcalls::get_shared_data(&key) {
                    let _ = hostcalls::set_shared_data(&key, Some(&[0xff; 8]), None);
                }
            }
        }
    }
}
