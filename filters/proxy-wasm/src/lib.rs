//! agentgate as a proxy-wasm HTTP filter: host calls in, the core's decision out.
//!
//! `abi` holds the proxy-wasm exports; they hand each call to one [`Vm`], which keeps the
//! contexts and calls the host only through [`host::Host`] (raw imports in the module, a
//! mock in the tests). Nothing here panics on what a host answers, and no state is borrowed
//! across a host call: a host call that traps leaves every later call working (APISIX keeps
//! using a VM after a trap).

#[cfg(target_arch = "wasm32")]
mod abi;
mod capabilities;
mod filter;
mod host;
mod keys;
mod metrics;
#[cfg(test)]
mod mock;
mod shared;
#[cfg(test)]
mod tests;

use agentgate::jwks::{Fetch, Stage};
use agentgate::{Gate, Reason};
use capabilities::Capabilities;
use host::{Host, Level};
use metrics::Metrics;
use shared::prepare_replay_buckets;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// What the root context and its requests share: the policy in force, its counters and
/// the providers wanted early. A reconfiguration replaces it whole; requests in flight keep theirs.
pub struct Shared {
    gate: Gate,
    metrics: Metrics,
    caps: Capabilities,
    /// Providers a request wants fetched early (a `kid` the keys lack, `wait_ms` 0).
    wanted: RefCell<HashSet<usize>>,
}

#[derive(Default, Clone)]
struct Root {
    shared: Option<Rc<Shared>>,
    /// Counters before any policy (requests refused as `not_configured`).
    metrics: Rc<Metrics>,
}

#[derive(Clone)]
struct Stream {
    shared: Option<Rc<Shared>>,
    metrics: Rc<Metrics>,
    /// How many request headers the host said the request has.
    announced: usize,
}

/// Who made a callout: its answer comes back to that context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Root,
    Stream(u32),
}

struct Call {
    owner: Owner,
    shared: Rc<Shared>,
    provider: usize,
    stage: Stage,
    wait_ms: Option<u64>,
}

/// proxy-wasm actions.
pub const CONTINUE: u32 = 0;
pub const PAUSE: u32 = 1;

/// Fetched keys are checked this often, in milliseconds (and due fetches started).
const TICK_MS: u32 = 100;

/// One VM's filter: its contexts and callouts. Each method is one proxy-wasm callback.
pub struct Vm<H: Host> {
    host: H,
    roots: RefCell<HashMap<u32, Root>>,
    streams: RefCell<HashMap<u32, Stream>>,
    calls: RefCell<HashMap<u32, Call>>,
    /// Whether the host is nginx (ngx_wasm_module), asked at the first request.
    nginx: Cell<Option<bool>>,
}

impl<H: Host> Vm<H> {
    pub fn new(host: H) -> Vm<H> {
        Vm {
            host,
            roots: RefCell::default(),
            streams: RefCell::default(),
            calls: RefCell::default(),
            nginx: Cell::new(None),
        }
    }

    fn root(&self, id: u32) -> Root {
        self.roots.borrow().get(&id).cloned().unwrap_or_default()
    }

    pub fn on_context_create(&self, id: u32, parent: u32) {
        if parent == 0 {
            self.roots.borrow_mut().insert(id, Root::default());
            return;
        }
        let root = self.root(parent);
        let stream = Stream { shared: root.shared, metrics: root.metrics, announced: 0 };
        self.streams.borrow_mut().insert(id, stream);
    }

    pub fn on_vm_start(&self, root: u32) -> bool {
        let metrics = Rc::new(Metrics::define(&self.host, None));
        self.roots.borrow_mut().entry(root).or_default().metrics = metrics;
        true
    }

    /// Returning false makes the host refuse the plugin: a bad policy never serves traffic.
    pub fn on_configure(&self, root: u32) -> bool {
        let host = &self.host;
        let config = match host.plugin_configuration() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return refuse(host, "no policy configured (set the plugin configuration)"),
            Err(status) => return refuse(host, &format!("cannot read the plugin configuration: status {status}")),
        };
        let Ok(json) = std::str::from_utf8(&config) else {
            return refuse(host, "the plugin configuration is not UTF-8");
        };
        let gate = match Gate::from_json(json) {
            Ok(gate) => gate,
            Err(error) => return refuse(host, &format!("invalid policy: {error}")),
        };
        let ticking = self.root(root).shared.is_some_and(|old| old.gate.remote_providers().next().is_some());
        let caps = Capabilities::probe(host, &gate, if ticking { TICK_MS } else { 0 });
        if let Some(why) = caps.refusal(&gate) {
            return refuse(host, &format!("policy cannot run on this host: {why}"));
        }
        for note in caps.degradations() {
            host.log(Level::Warn, &format!("agentgate: {note}"));
        }
        let metrics = Metrics::define(host, Some(&gate));
        if !metrics.available() {
            host.log(Level::Warn, "agentgate: no metrics on this host: the audit log is the record of decisions");
        }
        let policy = gate.policy();
        host.log(
            Level::Info,
            &format!(
                "agentgate: policy loaded ({} providers, {} rules, mode {:?})",
                policy.providers.len(),
                policy.rules.len(),
                policy.mode
            ),
        );
        if caps.shared_data {
            prepare_replay_buckets(host, &gate);
        }
        let remote: Vec<usize> = gate.remote_providers().map(|(i, _, _)| i).collect();
        for &index in &remote {
            // Keys another worker (or the previous configuration) already fetched.
            keys::sync(host, &gate, index);
        }
        if !remote.is_empty() && !host.set_tick_period(TICK_MS) {
            return refuse(host, "remote keys (jwks_uri, discovery) need timer ticks, which this host refused");
        }
        let shared = Rc::new(Shared { gate, metrics, caps, wanted: RefCell::default() });
        self.roots.borrow_mut().entry(root).or_default().shared = Some(shared);
        true
    }

    pub fn on_tick(&self, root: u32) {
        let Some(shared) = self.root(root).shared else { return };
        let Some(now) = host::now_ms(&self.host).map(seconds) else { return };
        for (provider, fetch) in keys::tick(&self.host, &shared, now) {
            self.dispatch(Owner::Root, &shared, provider, &fetch, None, now);
        }
    }

    /// Dispatches a key fetch whose answer comes back to `owner`; false when the host refused.
    fn dispatch(
        &self,
        owner: Owner,
        shared: &Rc<Shared>,
        provider: usize,
        fetch: &Fetch,
        wait_ms: Option<u64>,
        now: i64,
    ) -> bool {
        let Some(token) = keys::dispatch(&self.host, shared, provider, fetch, wait_ms, now) else { return false };
        let call = Call { owner, shared: Rc::clone(shared), provider, stage: fetch.stage, wait_ms };
        self.calls.borrow_mut().insert(token, call);
        true
    }

    pub fn on_request_headers(&self, id: u32, announced: usize) -> u32 {
        let stream = self.streams.borrow_mut().get_mut(&id).map(|s| {
            s.announced = announced;
            s.clone()
        });
        let Some(stream) = stream else {
            // A context the host never created: nothing to decide with, so fail closed.
            return filter::refuse_request(&self.host, &Metrics::default(), Reason::HostError);
        };
        self.decide(id, &stream, true)
    }

    /// Decides request `id` (the current one) and applies the decision; with `may_wait`, a
    /// request whose keys are missing fetches them and waits for its own callout.
    fn decide(&self, id: u32, stream: &Stream, may_wait: bool) -> u32 {
        let host = &self.host;
        let Some(shared) = &stream.shared else {
            // Fail closed: without a policy nothing can be verified.
            return filter::refuse_request(host, &stream.metrics, Reason::NotConfigured);
        };
        let nginx = self.nginx();
        match filter::decide(host, shared, stream.announced, nginx, may_wait) {
            filter::Step::Wait { provider, fetch, wait_ms, now } => {
                if self.dispatch(Owner::Stream(id), shared, provider, &fetch, Some(wait_ms), now) {
                    return PAUSE;
                }
                self.decide(id, stream, false)
            }
            filter::Step::Done(action) => action,
        }
    }

    /// Whether the host is nginx, asked once, within a request (where Kong allows it).
    fn nginx(&self) -> bool {
        if let Some(known) = self.nginx.get() {
            return known;
        }
        let nginx = matches!(self.host.get_property(&["ngx", "nginx_version"]), Ok(Some(v)) if !v.is_empty());
        self.nginx.set(Some(nginx));
        nginx
    }

    pub fn on_http_call_response(&self, id: u32, token: u32, body_size: usize) {
        let Some(call) = self.calls.borrow_mut().remove(&token) else {
            self.host
                .log(Level::Warn, &format!("agentgate: an answer to callout {token}, which this filter did not make"));
            return;
        };
        let now = host::now_ms(&self.host).map_or(0, seconds);
        let host = &self.host;
        if let Some(next) = keys::on_response(host, &call.shared, call.provider, call.stage, body_size, now) {
            if self.dispatch(call.owner, &call.shared, call.provider, &next, call.wait_ms, now) {
                return;
            }
        }
        let Owner::Stream(owner) = call.owner else { return };
        let stream = self.streams.borrow().get(&owner).cloned();
        // The request may be gone (the client left): the keys are installed all the same.
        let Some(stream) = stream else { return };
        // Hosts answer on the root context (`id`): Envoy makes the request current on asking
        // (and refuses a request that is gone); Kong answers a request's own callout with that
        // request current already and ignores the call. No other request is ever touched.
        if id != owner && !host.set_effective_context(owner) {
            return;
        }
        if self.decide(owner, &stream, false) == CONTINUE {
            host.continue_request();
        }
    }

    pub fn on_delete(&self, id: u32) {
        self.streams.borrow_mut().remove(&id);
        self.roots.borrow_mut().remove(&id);
    }
}

fn seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

/// Sub-second nanoseconds of the clock, for jitter (0 without a clock).
fn subsec_nanos(host: &dyn Host) -> u32 {
    let nanos = host.host_clock_nanos().or_else(|| host.wasi_clock_nanos()).unwrap_or(0);
    u32::try_from(nanos % 1_000_000_000).unwrap_or(0)
}

fn refuse(host: &dyn Host, message: &str) -> bool {
    host.log(Level::Error, &format!("agentgate: {message}"));
    false
}
