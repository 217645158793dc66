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
mod crypto;
mod filter;
mod host;
mod keys;
mod list;
mod metrics;
#[cfg(test)]
mod mock;
mod shared;
#[cfg(test)]
mod tests;

use agentgate::jwks::{Fetch, Stage};
use agentgate::keys::Alg;
use agentgate::{Gate, Reason};
use capabilities::Capabilities;
use host::{Host, Level};
use list::ListResponse;
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
    /// Whether the gate has been given the host's crypto, where the host has any.
    crypto_settled: Cell<bool>,
}

#[derive(Default, Clone)]
struct Root {
    shared: Option<Rc<Shared>>,
    /// Counters before any policy (requests refused as `not_configured`).
    metrics: Rc<Metrics>,
    /// The policy was refused on a host that configures at a request (see `Vm::refuse`).
    refused: bool,
}

#[derive(Clone)]
struct Stream {
    shared: Option<Rc<Shared>>,
    metrics: Rc<Metrics>,
    refused: bool,
    /// How many request headers the host said the request has.
    announced: usize,
    /// Whether the headers ended the request (Envoy; other hosts say yes or no regardless).
    end_of_stream: bool,
    /// The body limit of a request held for its body (an MCP route).
    awaiting_body: Option<usize>,
    /// The body read for the decision, up to the limit and one byte more.
    body: Option<Rc<[u8]>>,
    /// An allowed list call: its response is filtered for this agent.
    list: Option<Rc<ListResponse>>,
    /// The decision was applied (forwarded or answered): later body chunks pass.
    decided: bool,
    /// Headers for the upstream's response, from the decision.
    response_headers: Rc<RefCell<Vec<(String, String)>>>,
}

/// Which proxy-wasm host this is, told apart at the first request by properties that are
/// safe to read there: what the hosts differ in beyond their capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Envoy, or any host that behaves as it does.
    Envoy,
    /// Kong's ngx_wasm_module (`ngx.*` properties).
    NgxWasmModule,
    /// APISIX's wasm-nginx-module: properties are nginx variables (`nginx_version`).
    WasmNginxModule,
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
    /// Which host this is, asked at the first request.
    kind: Cell<Option<HostKind>>,
    /// Whether the host started the VM (`proxy_on_vm_start`): Envoy and Kong do, at load;
    /// APISIX never does, and configures at the first request of each worker.
    started: Cell<bool>,
    /// The policy configured last on any root context: APISIX configures a new root
    /// context for a changed route, and what this VM remembers must carry over to it.
    latest: RefCell<Option<Rc<Shared>>>,
    /// The refusal logged last: a host that configures per request is not logged at per request.
    refusal: RefCell<Option<String>>,
    /// Whether the host keeps filter state (false once a write failed).
    filter_state: Cell<bool>,
    /// The algorithms the host's crypto verifies, once probed (Envoy only).
    host_crypto: RefCell<Option<Vec<Alg>>>,
}

impl<H: Host> Vm<H> {
    pub fn new(host: H) -> Vm<H> {
        Vm {
            host,
            roots: RefCell::default(),
            streams: RefCell::default(),
            calls: RefCell::default(),
            kind: Cell::new(None),
            started: Cell::new(false),
            latest: RefCell::default(),
            refusal: RefCell::default(),
            filter_state: Cell::new(true),
            host_crypto: RefCell::default(),
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
        let stream = Stream {
            shared: root.shared,
            metrics: root.metrics,
            refused: root.refused,
            announced: 0,
            end_of_stream: true,
            awaiting_body: None,
            body: None,
            list: None,
            decided: false,
            response_headers: Rc::default(),
        };
        self.streams.borrow_mut().insert(id, stream);
    }

    pub fn on_vm_start(&self, root: u32) -> bool {
        self.started.set(true);
        let metrics = Rc::new(Metrics::define(&self.host, None));
        self.roots.borrow_mut().entry(root).or_default().metrics = metrics;
        true
    }

    /// Returning false makes the host refuse the plugin: a bad policy never serves traffic.
    pub fn on_configure(&self, root: u32) -> bool {
        match self.configure(root) {
            Ok(shared) => {
                *self.latest.borrow_mut() = Some(Rc::clone(&shared));
                let mut roots = self.roots.borrow_mut();
                let entry = roots.entry(root).or_default();
                entry.shared = Some(shared);
                entry.refused = false;
                true
            }
            Err(message) => self.refuse(root, &message),
        }
    }

    /// Logs a refusal (once per VM: a host that configures per request asks again per
    /// request) and refuses the plugin. On a host that configures at a request (no
    /// `proxy_on_vm_start`: APISIX, which would answer a bare 503 and configure again at each
    /// request), the root context is kept with the policy refused, and its requests get a
    /// 503 that says so.
    fn refuse(&self, root: u32, message: &str) -> bool {
        let message = format!("agentgate: {message}");
        if self.started.get() || self.refusal.borrow().as_deref() != Some(message.as_str()) {
            let answer = if self.started.get() { "" } else { "; every request of this route is answered 503" };
            self.host.log(Level::Error, &format!("{message}{answer}"));
            *self.refusal.borrow_mut() = Some(message);
        }
        if self.started.get() {
            return false;
        }
        let mut roots = self.roots.borrow_mut();
        let entry = roots.entry(root).or_default();
        entry.shared = None;
        entry.refused = true;
        true
    }

    fn configure(&self, root: u32) -> Result<Rc<Shared>, String> {
        let host = &self.host;
        let config = match host.plugin_configuration() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err("no policy configured (set the plugin configuration)".into()),
            Err(status) => return Err(format!("cannot read the plugin configuration: status {status}")),
        };
        let json = std::str::from_utf8(&config).map_err(|_| "the plugin configuration is not UTF-8".to_string())?;
        let mut gate = Gate::from_json(json).map_err(|error| format!("invalid policy: {error}"))?;
        let previous = self.root(root).shared.or_else(|| self.latest.borrow().clone());
        let ticking = previous.as_ref().is_some_and(|old| old.gate.remote_providers().next().is_some());
        let caps = Capabilities::probe(host, &gate, if ticking { TICK_MS } else { 0 }, !self.started.get());
        if let Some(why) = caps.refusal(&gate) {
            return Err(format!("policy cannot run on this host: {why}"));
        }
        // Used single-use tokens and rate-limit counts stay with the VM, whatever the policy.
        if let Some(previous) = &previous {
            gate.inherit_state(&previous.gate);
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
            return Err("remote keys (jwks_uri, discovery) need timer ticks, which this host refused".into());
        }
        // A host known (by an earlier request) to verify signatures itself does so at once.
        let probed = self.host_crypto.borrow().clone();
        if let Some(algorithms) = &probed {
            crypto::attach(host, &gate, algorithms);
        }
        let crypto_settled = Cell::new(probed.is_some());
        Ok(Rc::new(Shared { gate, metrics, caps, wanted: RefCell::default(), crypto_settled }))
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

    pub fn on_request_headers(&self, id: u32, announced: usize, end_of_stream: bool) -> u32 {
        let stream = self.streams.borrow_mut().get_mut(&id).map(|s| {
            s.announced = announced;
            s.end_of_stream = end_of_stream;
            s.clone()
        });
        let Some(stream) = stream else {
            // A context the host never created: nothing to decide with, so fail closed.
            return filter::refuse_request(&self.host, &Metrics::default(), Reason::HostError);
        };
        self.decide(id, &stream, true)
    }

    /// The body of a request held for it: read up to its limit and one byte more, then
    /// decided. Hosts hand it over differently: Envoy in chunks it buffers while the filter
    /// asks for more; Kong and APISIX whole, once, with `end_of_stream`.
    pub fn on_request_body(&self, id: u32, size: usize, end_of_stream: bool) -> u32 {
        let Some(stream) = self.streams.borrow().get(&id).cloned() else { return CONTINUE };
        let Some(limit) = stream.awaiting_body else {
            // Envoy (headers held with StopIteration) hands over the body of a request that
            // waits for keys: continuing here would forward it undecided. It stays buffered.
            return if stream.decided { CONTINUE } else { PAUSE };
        };
        let over = size > limit;
        if !end_of_stream && !over {
            // Envoy: buffer until the end of the stream or the limit.
            return PAUSE;
        }
        let body: Rc<[u8]> = if over {
            // Too large whatever it says: nothing to read (Kong cannot hand over a body that
            // nginx buffered to a file), the core answers 413.
            vec![0; limit.saturating_add(1)].into()
        } else if size == 0 {
            Rc::from(&[][..])
        } else {
            match self.host.request_body(size) {
                Some(bytes) => bytes.into(),
                None => {
                    self.host.log(
                        Level::Error,
                        "agentgate: the host did not hand over the request body (on Kong: raise nginx's client_body_buffer_size to the policy's max_body_bytes): refused",
                    );
                    return filter::refuse_request(&self.host, &stream.metrics, Reason::HostError);
                }
            }
        };
        let stream = {
            let mut streams = self.streams.borrow_mut();
            let Some(held) = streams.get_mut(&id) else { return CONTINUE };
            held.awaiting_body = None;
            held.body = Some(body);
            held.clone()
        };
        self.decide(id, &stream, true)
    }

    /// Decides request `id` (the current one) and applies the decision; with `may_wait`, a
    /// request whose keys are missing fetches them and waits for its own callout.
    fn decide(&self, id: u32, stream: &Stream, may_wait: bool) -> u32 {
        let host = &self.host;
        if stream.refused {
            return filter::policy_refused(host);
        }
        let Some(shared) = &stream.shared else {
            // Fail closed: without a policy nothing can be verified.
            return filter::refuse_request(host, &stream.metrics, Reason::NotConfigured);
        };
        let kind = self.kind();
        if !shared.crypto_settled.get() {
            self.settle_crypto(shared, kind);
        }
        let context = filter::Context {
            announced: stream.announced,
            kind,
            filter_state: &self.filter_state,
            response_headers: &stream.response_headers,
        };
        match filter::decide(host, shared, &context, stream.body.as_deref(), may_wait) {
            filter::Step::Wait { provider, fetch, wait_ms, now } => {
                if self.dispatch(Owner::Stream(id), shared, provider, &fetch, Some(wait_ms), now) {
                    return PAUSE;
                }
                self.decide(id, stream, false)
            }
            filter::Step::ReadBody { limit, declared } => self.await_body(id, stream, kind, limit, declared),
            filter::Step::Done(action) => {
                if let Some(held) = self.streams.borrow_mut().get_mut(&id) {
                    held.decided = true;
                }
                action
            }
            filter::Step::Filter(list) => {
                if let Some(held) = self.streams.borrow_mut().get_mut(&id) {
                    held.decided = true;
                    held.list = Some(Rc::new(ListResponse::new(Rc::clone(shared), *list)));
                }
                CONTINUE
            }
        }
    }

    /// Holds request `id` for its body, as the host allows: Envoy pauses the headers; Kong
    /// yields for good on a pause with nothing pending, and hands the body over before it
    /// proxies, so the headers continue (a request with no body declared is decided at
    /// once: Kong calls no body callback for an empty body); APISIX hands it over only when
    /// asked through `wasm_process_req_body`, and crashes its worker on a pause without a
    /// callout.
    fn await_body(&self, id: u32, stream: &Stream, kind: HostKind, limit: usize, declared: bool) -> u32 {
        let (wait, action) = match kind {
            HostKind::Envoy => (!stream.end_of_stream, PAUSE),
            HostKind::NgxWasmModule => (declared, CONTINUE),
            HostKind::WasmNginxModule => {
                if !self.host.set_property("wasm_process_req_body", b"1") {
                    self.host.log(
                        Level::Error,
                        "agentgate: this host did not take wasm_process_req_body: the body of an MCP request cannot be read: refused",
                    );
                    return filter::refuse_request(&self.host, &stream.metrics, Reason::HostError);
                }
                (true, CONTINUE)
            }
        };
        let mut stream = stream.clone();
        if wait {
            stream.awaiting_body = Some(limit);
        } else {
            stream.body = Some(Rc::from(&[][..]));
        }
        if let Some(held) = self.streams.borrow_mut().get_mut(&id) {
            *held = stream.clone();
        }
        if wait {
            return action;
        }
        self.decide(id, &stream, true)
    }

    /// Gives the policy in force the host's crypto where the host is Envoy: probed once per
    /// VM, at the first request, because only a request tells Envoy from Kong safely (Kong
    /// logs an error for a scoped property read at configure time and traps on a
    /// `verify_signature` call, see `crypto`).
    fn settle_crypto(&self, shared: &Shared, kind: HostKind) {
        if kind != HostKind::Envoy {
            shared.crypto_settled.set(true);
            return;
        }
        // Asked again, as a call Kong traps on must never be made there by mistake: only a
        // host that says plainly it has no nginx qualifies. A read that fails (Kong's, with no
        // request current) is no answer, and the next request asks again.
        match self.host.get_property(&["ngx", "nginx_version"]) {
            Ok(None) => shared.crypto_settled.set(true),
            Ok(Some(_)) => return shared.crypto_settled.set(true),
            Err(_) => return,
        }
        let probed = self.host_crypto.borrow().clone();
        let algorithms = probed.unwrap_or_else(|| {
            let algorithms = crypto::probe(&self.host);
            *self.host_crypto.borrow_mut() = Some(algorithms.clone());
            algorithms
        });
        crypto::attach(&self.host, &shared.gate, &algorithms);
    }

    /// Which host this is, asked once, within a request (where Kong and APISIX allow it).
    fn kind(&self) -> HostKind {
        if let Some(known) = self.kind.get() {
            return known;
        }
        let found = |path: &[&str]| matches!(self.host.get_property(path), Ok(Some(v)) if !v.is_empty());
        let kind = if found(&["ngx", "nginx_version"]) {
            HostKind::NgxWasmModule
        } else if found(&["nginx_version"]) {
            HostKind::WasmNginxModule
        } else {
            HostKind::Envoy
        };
        self.kind.set(Some(kind));
        kind
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

    fn list(&self, id: u32) -> Option<Rc<ListResponse>> {
        self.streams.borrow().get(&id).and_then(|s| s.list.clone())
    }

    /// The upstream's response headers: the headers the decision asked for are added, and
    /// an allowed list call's response is prepared for filtering (a request answered
    /// locally never gets here).
    pub fn on_response_headers(&self, id: u32, end_of_stream: bool) -> u32 {
        let headers = self.streams.borrow().get(&id).map(|s| s.response_headers.take()).unwrap_or_default();
        for (name, value) in &headers {
            self.host.add_response_header(name, value);
        }
        if let Some(list) = self.list(id) {
            list.on_headers(&self.host, end_of_stream);
        }
        CONTINUE
    }

    pub fn on_response_body(&self, id: u32, size: usize, end_of_stream: bool) -> u32 {
        match self.list(id) {
            Some(list) => list.on_body(&self.host, self.kind(), size, end_of_stream),
            None => CONTINUE,
        }
    }

    pub fn on_response_trailers(&self, id: u32) -> u32 {
        if let Some(list) = self.list(id) {
            list.on_trailers(&self.host);
        }
        CONTINUE
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
