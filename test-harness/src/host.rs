//! A proxy-wasm host of our own on wasmtime: loads the real release filter in-process and
//! drives it the way Envoy does (ABI 0.2.1), with a clock the test controls, scripted HTTP
//! callouts, shared data and metrics shared between "worker" VMs. Any import the harness does
//! not implement, and any trap or panic inside the filter, is an `Err` — never silently
//! ignored.

use crate::envoy::filter_wasm;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store, TypedFunc};

const ROOT_CONTEXT: i32 = 1;

// proxy-wasm ABI constants.
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const CAS_MISMATCH: i32 = 8;
const INTERNAL_FAILURE: i32 = 10;
const UNIMPLEMENTED: i32 = 12;
const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: i32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: i32 = 4;
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

/// Why driving the filter failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The filter trapped (a Rust panic aborts into a trap), or the host trapped on a call.
    Trap(String),
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false: the host would refuse the plugin.
    Refused { logs: Vec<String> },
    /// The module could not be loaded: an import this host does not define, or no module.
    Setup(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Trap(e) => write!(f, "filter trapped: {e}"),
            HostError::Refused { logs } => write!(f, "filter refused its configuration; logs:\n{}", logs.join("\n")),
            HostError::Setup(e) => write!(f, "harness setup: {e}"),
        }
    }
}

impl std::error::Error for HostError {}

/// What happened to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded upstream with these headers.
    Continued { upstream_headers: Vec<(String, String)> },
    /// Answered by the filter.
    Responded { status: u32, headers: Vec<(String, String)>, body: String },
    /// Held by the filter (waiting for a callout, say), with this context id.
    Paused { context: i32 },
}

impl Outcome {
    /// The status a client would see: the local response's, or 200 from the upstream.
    pub fn status(&self) -> u32 {
        match self {
            Outcome::Responded { status, .. } => *status,
            Outcome::Continued { .. } => 200,
            Outcome::Paused { .. } => 0,
        }
    }

    /// A header of the local response, or of the request as forwarded upstream.
    pub fn header(&self, name: &str) -> Option<&str> {
        let headers = match self {
            Outcome::Responded { headers, .. } => headers,
            Outcome::Continued { upstream_headers } => upstream_headers,
            Outcome::Paused { .. } => return None,
        };
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An HTTP callout the filter dispatched and the test has not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    /// The context that dispatched it: its answer goes there.
    pub context: i32,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// What several VMs of one proxy share, as Envoy's workers do: shared data and stats.
#[derive(Default)]
pub struct Process {
    shared_data: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    metrics: Mutex<Vec<(String, i64)>>,
}

impl Process {
    pub fn new() -> Arc<Process> {
        Arc::new(Process::default())
    }

    /// A counter or gauge by name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        lock(&self.metrics).iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Headers = Vec<(String, String)>;

/// Which host the harness behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Envoy 1.40 (and, with calls taken away by [`Host::lacking`], weaker hosts).
    Envoy,
    /// Kong's ngx_wasm_module as observed (`../shared/notes/kong.md`): see [`Host::kong`].
    Kong,
    /// APISIX's wasm-nginx-module as observed and read (apisix.md): see [`Host::apisix`].
    Apisix,
}

/// The callback the host is in, for hosts that allow a call only in some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    Start,
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    CallResponse,
    ResponseHeaders,
    ResponseBody,
    Other,
}

/// An upstream's response, in the chunks it arrives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<Vec<u8>>,
}

/// What the client received of an upstream's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The filter reset the stream (`proxy_close_stream`).
    pub reset: bool,
}

impl Delivered {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A request header as the host holds it. nginx removes a header by marking it, and its
/// proxy module (nginx 1.22.1) still forwards a marked one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    name: String,
    value: String,
    removed: bool,
}

/// How the harness answers one host call, for [`Host::answer_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This status, doing nothing.
    Status(i32),
    /// Ok, with a pointer the filter did not hand out (where the call returns data).
    GarbagePointer,
    /// Ok, with a size larger than the buffer (where the call returns data).
    GarbageSize,
}

/// Every status of the proxy-wasm ABI 0.2.1, and one it does not have.
pub const ALL_STATUSES: &[i32] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99];

/// The name Kong's `:authority` carries: nginx's server name and port, not the Host header.
pub const KONG_SERVER_NAME: &str = "kong.internal:8000";

/// ngx_wasm_module passes at most this many request headers (pseudo-headers first).
pub const KONG_MAX_HEADERS: usize = 100;

/// Kong's `client_body_buffer_size` (8k): nginx writes a larger body to a file, which
/// ngx_wasm_module cannot hand to a filter.
pub const KONG_BODY_BUFFER_BYTES: usize = 8192;

/// Kong's response buffers (ngx_wasm_module's `wasm_response_body_buffers`, default 4 × 4k):
/// what a filter that pauses in `on_response_body` gets at most in one piece.
pub const KONG_RESPONSE_BUFFER_BYTES: usize = 4 * 4096;

/// The nginx version APISIX's host reports as the `nginx_version` variable.
pub const APISIX_NGINX_VERSION: &str = "1.21.4";

/// What wasm-nginx-module logs for a write to an nginx variable that was not declared
/// (`proxy_set_property` then answers NotFound).
pub fn apisix_set_variable_error(name: &str) -> String {
    format!("[error] variable \"{name}\" not found for writing; maybe it is a built-in variable that is not changeable or you forgot to use \"set ${name} '';\" in the config file to define it first")
}

/// What APISIX answers when its wasm plugin could not be configured (its own error page).
pub const APISIX_CONFIGURE_FAILED: &str =
    "<html><head><title>503 Service Temporarily Unavailable</title></head></html>";

struct State {
    profile: Profile,
    phase: Callback,
    /// The context of the callback running now (the root context outside requests).
    current: i32,
    answers: HashMap<&'static str, Answer>,
    /// The next call of this import traps (as a host that aborts on bad usage).
    trap_next: Option<&'static str>,
    /// Garbage to return from the import being called (set by `imposed`).
    garbage: Option<Answer>,
    process: Arc<Process>,
    plugin_configuration: Vec<u8>,
    now_nanos: u64,
    rng: ChaCha8Rng,
    logs: Vec<(i32, String)>,
    request_headers: Vec<Header>,
    local_response: Option<(u32, Headers, Vec<u8>)>,
    properties: HashMap<String, Vec<u8>>,
    /// What the filter set with `proxy_set_property` during the last request (Envoy's
    /// filter state), by dotted path.
    filter_state: HashMap<String, Vec<u8>>,

    /// Host calls this host answers with Unimplemented, as weaker hosts do.
    lacking: Vec<&'static str>,
    /// The request body as the host holds it now (what `proxy_get_buffer_bytes` returns).
    request_body: Vec<u8>,
    /// APISIX: the nginx variables its properties are (declared ones only; reset per request).
    ngx_vars: HashMap<String, Vec<u8>>,
    /// APISIX: whether `proxy_on_configure` succeeded (it runs at the first request).
    configured: bool,
    /// Headers of requests the filter paused, by context id.
    parked: HashMap<i32, Vec<Header>>,
    /// How paused requests ended, once the filter resumed or answered them.
    finished: HashMap<i32, Outcome>,
    tick_period_ms: u32,
    calls: Vec<HttpCall>,
    next_call: u32,
    call_response: Option<(Headers, Vec<u8>)>,
    /// The upstream's response headers as the filter changes them.
    response_headers: Headers,
    /// The response body the host holds for the filter now (Envoy: all it buffered; Kong:
    /// the chunk, or its buffers).
    response_body: Vec<u8>,
    /// The filter reset the stream.
    reset: bool,
    /// What `verify_signature` answers instead of verifying (see [`Host::foreign_answer`]).
    foreign_answer: Option<Vec<u8>>,
    /// How many foreign-function calls the filter made.
    foreign_calls: usize,
    /// With [`count_instructions`]: each host call since [`Host::start_trace`], with the
    /// wasm instructions (fuel) the filter ran since the previous one.
    trace: Option<Vec<(&'static str, u64)>>,
    /// Fuel left at the previous host call.
    fuel_mark: u64,
}

/// Fuel the harness gives a VM: more than any test spends.
const FUEL: u64 = u64::MAX / 4;

static FUEL_ON: AtomicBool = AtomicBool::new(false);

/// Makes every VM of this process count the wasm instructions it runs (wasmtime fuel: about
/// one unit per wasm instruction), for [`Host::start_trace`]. Call before the first VM: the
/// engine is shared and compiled once.
pub fn count_instructions() {
    FUEL_ON.store(true, Ordering::SeqCst);
}

fn engine_and_module() -> Result<&'static (Engine, Module), HostError> {
    static LOADED: OnceLock<Result<(Engine, Module), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.consume_fuel(FUEL_ON.load(Ordering::SeqCst));
            let engine = Engine::new(&config).map_err(|e| e.to_string())?;
            let path = filter_wasm();
            let module =
                Module::from_file(&engine, &path).map_err(|e| format!("{}: {e} (run `make build`)", path.display()))?;
            Ok((engine, module))
        })
        .as_ref()
        .map_err(|e| HostError::Setup(e.clone()))
}

/// What APISIX's wasm host (wasm-nginx-module) answers Unimplemented to (src/http/
/// ngx_http_wasm_api.c): the clock, ticks, shared data. Its metrics calls answer Ok and do
/// nothing (the id is not even written), which [`Host::apisix`] models apart.
pub const APISIX_UNIMPLEMENTED: &[&str] = &[
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
];

/// One VM running the filter with one root context (one Envoy worker).
pub struct Host {
    store: Store<State>,
    instance: Instance,
    memory: Memory,
    next_context: i32,
}

/// What a request callback's return came to, on the host in use.
enum Step {
    Answered(Outcome),
    /// Continued: on to the next step (the body, the upstream).
    Forwarded,
    /// Waiting for a callout it made.
    Parked,
    /// Paused with nothing pending.
    Pending,
}

fn trap(e: wasmtime::Error) -> HostError {
    HostError::Trap(format!("{e:?}"))
}

impl Host {
    /// A VM configured with `policy`, in a process of its own.
    pub fn new(policy: &str) -> Result<Host, HostError> {
        Host::in_process(policy, &Process::new())
    }

    /// A VM on a host without the host calls (or property families) in `lacking` (see
    /// [`Host::lack`]), configured with `policy`: the weaker hosts (APISIX, Kong).
    pub fn lacking(policy: &str, lacking: &[&'static str]) -> Result<Host, HostError> {
        Host::start(policy, &Process::new(), lacking, Profile::Envoy)
    }

    /// A VM configured with `policy` that shares `process` with other VMs.
    pub fn in_process(policy: &str, process: &Arc<Process>) -> Result<Host, HostError> {
        Host::start(policy, process, &[], Profile::Envoy)
    }

    /// A VM on a host that behaves as Kong's ngx_wasm_module was seen to (kong.md): header
    /// names in the client's case; the first [`KONG_MAX_HEADERS`] headers passed (pseudo-headers
    /// first) while the count given is of all the client's headers; `:authority` the server
    /// name ([`KONG_SERVER_NAME`]) beside the client's `Host`; `:path` percent-decoded; no
    /// `x-request-id` unless sent; `proxy_http_call` outside request headers/body, ticks and
    /// callout answers a fatal trap; `set_effective_context` a no-op; request headers read
    /// with no current request a trap (a SIGSEGV of the worker there); a dotted property read
    /// outside a request an error log and InternalFailure; a removed header marked and still
    /// forwarded, a replaced one replaced in place (its first copy; later copies marked).
    pub fn kong(policy: &str) -> Result<Host, HostError> {
        Host::start(policy, &Process::new(), &[], Profile::Kong)
    }

    /// A VM on a host that behaves as APISIX's wasm-nginx-module (newest, read in its source
    /// and seen in apisix.md): no `proxy_on_vm_start`; the root context created and
    /// configured at the first request, with no request current (property, header and
    /// callout calls answer BadArgument there), a failed configuration answered 503 by APISIX
    /// and tried again at the next request; no proxy-wasm clock, ticks nor shared data
    /// ([`APISIX_UNIMPLEMENTED`]); metrics calls Ok and doing nothing; properties are nginx
    /// variables: a dotted path (`source.address`) is not found, `nginx_version` is, and a
    /// write to a variable nginx.conf did not declare logs an error and answers NotFound
    /// (only `wasm_process_req_body` and `wasm_process_resp_body` are declared); header names
    /// lower case, `:authority` absent (the Host header is there); request headers with
    /// no header count and `end_of_stream` 1; the body passed whole, once, only when the
    /// filter set `wasm_process_req_body`; a pause with no callout registered crashes the worker.
    pub fn apisix(policy: &str) -> Result<Host, HostError> {
        let mut host = Host::start(policy, &Process::new(), APISIX_UNIMPLEMENTED, Profile::Apisix)?;
        host.store.data_mut().ngx_vars.insert("nginx_version".into(), APISIX_NGINX_VERSION.into());
        Ok(host)
    }

    fn start(
        policy: &str,
        process: &Arc<Process>,
        lacking: &[&'static str],
        profile: Profile,
    ) -> Result<Host, HostError> {
        let (engine, module) = engine_and_module()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let state = State {
            profile,
            phase: Callback::Start,
            current: ROOT_CONTEXT,
            answers: HashMap::new(),
            trap_next: None,
            garbage: None,
            process: Arc::clone(process),
            plugin_configuration: policy.as_bytes().to_vec(),
            now_nanos: now,
            rng: ChaCha8Rng::seed_from_u64(7),
            logs: Vec::new(),
            request_headers: Vec::new(),
            local_response: None,
            properties: HashMap::new(),
            filter_state: HashMap::new(),
            lacking: lacking.to_vec(),
            request_body: Vec::new(),
            ngx_vars: HashMap::new(),
            configured: false,
            parked: HashMap::new(),
            finished: HashMap::new(),
            tick_period_ms: 0,
            calls: Vec::new(),
            next_call: 1,
            call_response: None,
            response_headers: Vec::new(),
            response_body: Vec::new(),
            reset: false,
            foreign_answer: None,
            foreign_calls: 0,
            trace: None,
            fuel_mark: FUEL,
        };
        let mut store = Store::new(engine, state);
        if FUEL_ON.load(Ordering::SeqCst) {
            store.set_fuel(FUEL).map_err(|e| HostError::Setup(e.to_string()))?;
        }
        let mut linker = Linker::new(engine);
        define_proxy_wasm(&mut linker, profile).map_err(|e| HostError::Setup(e.to_string()))?;
        define_wasi(&mut linker).map_err(|e| HostError::Setup(e.to_string()))?;
        // An import the host does not define fails the module's loading, as on every real
        // host (Envoy, ngx_wasm_module, wasm-nginx-module link by name).
        let instance = linker.instantiate(&mut store, module).map_err(|e| HostError::Setup(format!("{e:?}")))?;
        let memory =
            instance.get_memory(&mut store, "memory").ok_or_else(|| HostError::Setup("no memory export".into()))?;
        let mut host = Host { store, instance, memory, next_context: ROOT_CONTEXT + 1 };
        host.call::<(), ()>("_initialize", ())?;
        if profile == Profile::Apisix {
            // Configured at the first request.
            return Ok(host);
        }
        host.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT_CONTEXT, 0))?;
        let started = host.call::<(i32, i32), i32>("proxy_on_vm_start", (ROOT_CONTEXT, 0))?;
        let configured = started != 0 && {
            let size = i32::try_from(policy.len()).unwrap_or(i32::MAX);
            host.store.data_mut().phase = Callback::Configure;
            host.call::<(i32, i32), i32>("proxy_on_configure", (ROOT_CONTEXT, size))? != 0
        };
        if !configured {
            return Err(HostError::Refused { logs: host.logs() });
        }
        Ok(host)
    }

    /// Delivers a new plugin configuration, as Envoy does on an ECDS update.
    pub fn reconfigure(&mut self, policy: &str) -> Result<(), HostError> {
        self.enter(Callback::Configure, ROOT_CONTEXT);
        self.store.data_mut().plugin_configuration = policy.as_bytes().to_vec();
        let size = i32::try_from(policy.len()).unwrap_or(i32::MAX);
        if self.call::<(i32, i32), i32>("proxy_on_configure", (ROOT_CONTEXT, size))? == 0 {
            return Err(HostError::Refused { logs: self.logs() });
        }
        Ok(())
    }

    fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
        params: P,
    ) -> Result<R, HostError> {
        let func: TypedFunc<P, R> = self
            .instance
            .get_typed_func(&mut self.store, name)
            .map_err(|e| HostError::Setup(format!("export {name}: {e}")))?;
        func.call(&mut self.store, params).map_err(trap)
    }

    /// Sends a request's headers (pseudo-headers included) through the filter, with no body.
    /// On Kong, the `:authority` given is the client's Host header, and names keep the case given.
    pub fn request(&mut self, headers: &[(&str, &str)]) -> Result<Outcome, HostError> {
        Ok(self.send(headers, None, None)?.0)
    }

    /// Sends a request with a body, as each host hands a body over: Envoy in two chunks it
    /// buffers while the filter pauses; Kong whole, once, before proxying, only when the
    /// body is not empty; APISIX whole, once, only when the filter asked for it.
    pub fn request_with_body(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Result<Outcome, HostError> {
        Ok(self.send(headers, Some(body), None)?.0)
    }

    /// Sends a request with a body and, if it is forwarded, the `upstream`'s response back
    /// through the filter, as each host passes a response: Envoy's headers with end of
    /// stream when there is no body, then each chunk, buffered while the filter answers
    /// StopIterationAndBuffer (the next call gives all of it); Kong's headers with end of
    /// stream false, a pause in `on_response_body` buffering the chunks up to
    /// [`KONG_RESPONSE_BUFFER_BYTES`] and calling again once (end of stream, or buffers
    /// full), a body set with size 0 prepended; APISIX's headers with no count and end of
    /// stream true, its body calls only when `wasm_process_resp_body` is set, and no way to
    /// replace a body (`proxy_set_buffer_bytes` unimplemented).
    pub fn exchange(
        &mut self,
        headers: &[(&str, &str)],
        body: &[u8],
        upstream: &Upstream,
    ) -> Result<(Outcome, Option<Delivered>), HostError> {
        self.send(headers, Some(body), Some(upstream))
    }

    fn send(
        &mut self,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        answer: Option<&Upstream>,
    ) -> Result<(Outcome, Option<Delivered>), HostError> {
        let profile = self.store.data().profile;
        if profile == Profile::Apisix {
            if let Some(refused) = self.configure_at_request()? {
                return Ok((refused, None));
            }
        }
        let context = self.next_context;
        self.next_context += 1;
        let (held, announced) = received(profile, headers);
        {
            let state = self.store.data_mut();
            state.request_headers = held;
            state.local_response = None;
            state.response_headers.clear();
            state.filter_state.clear();
            state.request_body.clear();
            state.ngx_vars.insert("wasm_process_req_body".into(), Vec::new());
            state.ngx_vars.insert("wasm_process_resp_body".into(), Vec::new());
        }
        self.enter(Callback::Other, context);
        self.call::<(i32, i32), ()>("proxy_on_context_create", (context, ROOT_CONTEXT))?;
        self.enter(Callback::RequestHeaders, context);
        let (count, end_of_stream) = match profile {
            Profile::Envoy => (announced, body.is_none_or(<[u8]>::is_empty)),
            // ngx_wasm_module: eof 0 always.
            Profile::Kong => (announced, false),
            // wasm-nginx-module: no count, eof 1, whatever the request.
            Profile::Apisix => (0, true),
        };
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        let calls = self.store.data().calls.len();
        let action =
            self.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (context, count, i32::from(end_of_stream)))?;
        let mut step = self.step(context, action, calls, "on_request_headers")?;
        let body = body.unwrap_or_default();
        if let Step::Pending = step {
            step = match profile {
                Profile::Envoy if !end_of_stream => self.envoy_body(context, body)?,
                Profile::Kong | Profile::Apisix => self.whole_body(context, body, Step::Pending)?,
                Profile::Envoy => Step::Pending,
            };
        } else if let Step::Forwarded = step {
            step = match profile {
                Profile::Kong | Profile::Apisix => self.whole_body(context, body, Step::Forwarded)?,
                Profile::Envoy => Step::Forwarded,
            };
        }
        let state = self.store.data_mut();
        let outcome = match step {
            Step::Answered(outcome) => outcome,
            Step::Forwarded => Outcome::Continued { upstream_headers: upstream(profile, &state.request_headers) },
            // Envoy and Kong hold a request paused with nothing pending until the client
            // leaves (Kong: a yield nothing resumes); APISIX crashed already (see `step`).
            Step::Parked | Step::Pending => {
                if let Step::Pending = step {
                    let headers = std::mem::take(&mut state.request_headers);
                    state.parked.insert(context, headers);
                    state.current = ROOT_CONTEXT;
                }
                return Ok((Outcome::Paused { context }, None));
            }
        };
        let delivered = match (answer, &outcome) {
            (Some(answer), Outcome::Continued { .. }) => Some(self.response(context, answer)?),
            _ => None,
        };
        if let (None, Outcome::Continued { .. }) = (&delivered, &outcome) {
            // The upstream answers with no headers of its own: they pass the filter, which
            // may add some (`response_headers`).
            self.enter(Callback::ResponseHeaders, context);
            self.call::<(i32, i32, i32), i32>("proxy_on_response_headers", (context, 1, 0))?;
        }
        self.finish(context)?;
        Ok((outcome, delivered))
    }

    /// The upstream's response through the filter of request `context` (see [`Host::exchange`]).
    fn response(&mut self, context: i32, upstream: &Upstream) -> Result<Delivered, HostError> {
        let profile = self.store.data().profile;
        {
            let state = self.store.data_mut();
            state.response_headers = upstream.headers.clone();
            state.response_body.clear();
            state.reset = false;
        }
        let chunks: Vec<&Vec<u8>> = upstream.chunks.iter().filter(|c| !c.is_empty()).collect();
        let (count, end_of_stream) = match profile {
            Profile::Envoy => (upstream.headers.len(), chunks.is_empty()),
            Profile::Kong => (upstream.headers.len(), false),
            Profile::Apisix => (0, true),
        };
        self.enter(Callback::ResponseHeaders, context);
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        self.call::<(i32, i32, i32), i32>("proxy_on_response_headers", (context, count, i32::from(end_of_stream)))?;
        let mut delivered = Vec::new();
        // Kong: buffering requested, and whether it already happened (once per response).
        let (mut buffering, mut buffered_once) = (false, false);
        let mut held: Vec<u8> = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            let last = index + 1 == chunks.len();
            if self.store.data().reset {
                break;
            }
            match profile {
                Profile::Envoy => {
                    held.extend_from_slice(chunk);
                    match self.response_body_call(context, &held, last)? {
                        (1, _) if last => {
                            return Err(HostError::Trap(
                                "on_response_body paused at the end of the stream: the response never completes".into(),
                            ))
                        }
                        (1, _) => {}
                        (_, out) => {
                            delivered.extend_from_slice(&out);
                            held.clear();
                        }
                    }
                }
                Profile::Kong => {
                    if buffering {
                        held.extend_from_slice(chunk);
                        if held.len() < KONG_RESPONSE_BUFFER_BYTES && !last {
                            continue;
                        }
                        // End of stream, or the buffers are full (the rest of this chunk
                        // is passed on with them).
                        buffering = false;
                        let (action, out) = self.response_body_call(context, &held, last)?;
                        self.kong_pause_after_buffering(action);
                        delivered.extend_from_slice(&out);
                        held.clear();
                        continue;
                    }
                    let (action, out) = self.response_body_call(context, chunk, last)?;
                    if action == 1 && !buffered_once {
                        buffering = true;
                        buffered_once = true;
                        held = out;
                        if last {
                            buffering = false;
                            let (action, out) = self.response_body_call(context, &held, true)?;
                            self.kong_pause_after_buffering(action);
                            delivered.extend_from_slice(&out);
                            held.clear();
                        }
                        continue;
                    }
                    self.kong_pause_after_buffering(if buffered_once { action } else { 0 });
                    delivered.extend_from_slice(&out);
                }
                Profile::Apisix => {
                    let asked =
                        self.store.data().ngx_vars.get("wasm_process_resp_body").is_some_and(|v| !v.is_empty());
                    if asked {
                        self.response_body_call(context, chunk, last)?;
                    }
                    delivered.extend_from_slice(chunk);
                }
            }
        }
        let state = self.store.data_mut();
        Ok(Delivered { headers: std::mem::take(&mut state.response_headers), body: delivered, reset: state.reset })
    }

    /// Calls `on_response_body` with `body` held by the host: the action, and the body the
    /// host holds after the call (the filter may have replaced it).
    fn response_body_call(&mut self, context: i32, body: &[u8], last: bool) -> Result<(i32, Vec<u8>), HostError> {
        self.store.data_mut().response_body = body.to_vec();
        self.enter(Callback::ResponseBody, context);
        let size = i32::try_from(body.len()).unwrap_or(i32::MAX);
        let action = self.call::<(i32, i32, i32), i32>("proxy_on_response_body", (context, size, i32::from(last)))?;
        Ok((action, std::mem::take(&mut self.store.data_mut().response_body)))
    }

    /// ngx_wasm_module: a pause after buffering is logged and taken as continue.
    fn kong_pause_after_buffering(&mut self, action: i32) {
        if action == 1 {
            self.store.data_mut().logs.push((
                4,
                "[error] invalid \"on_response_body\" return action (PAUSE): response body buffering already requested"
                    .into(),
            ));
        }
    }

    /// What a request callback's return means on this host. `calls` is the number of
    /// callouts before the callback (a new one means the filter waits for it).
    fn step(&mut self, context: i32, action: i32, calls: usize, callback: &str) -> Result<Step, HostError> {
        let state = self.store.data_mut();
        if let Some((status, headers, body)) = state.local_response.take() {
            let body = String::from_utf8_lossy(&body).into_owned();
            return Ok(Step::Answered(Outcome::Responded { status, headers, body }));
        }
        if action == 0 {
            return Ok(Step::Forwarded);
        }
        if state.calls.len() > calls {
            let headers = std::mem::take(&mut state.request_headers);
            state.parked.insert(context, headers);
            state.current = ROOT_CONTEXT;
            return Ok(Step::Parked);
        }
        match state.profile {
            // wasm-nginx-module reads a pause as "an HTTP call is due" and dereferences the
            // callout the filter never registered.
            Profile::Apisix => Err(HostError::Trap(format!(
                "wasm-nginx-module: {callback} paused with no HTTP call registered: the nginx worker crashes (NULL callout)"
            ))),
            _ => Ok(Step::Pending),
        }
    }

    /// Envoy: the body in two chunks; each pause buffers (StopIterationAndBuffer) and the
    /// next call gives the size buffered so far.
    fn envoy_body(&mut self, context: i32, body: &[u8]) -> Result<Step, HostError> {
        let half = body.len() / 2;
        for (end, last) in [(half, false), (body.len(), true)] {
            if end == 0 && !last {
                continue;
            }
            self.store.data_mut().request_body = body.get(..end).unwrap_or_default().to_vec();
            self.enter(Callback::RequestBody, context);
            let size = i32::try_from(end).unwrap_or(i32::MAX);
            let calls = self.store.data().calls.len();
            let action =
                self.call::<(i32, i32, i32), i32>("proxy_on_request_body", (context, size, i32::from(last)))?;
            match self.step(context, action, calls, "on_request_body")? {
                Step::Pending if !last => continue,
                step => return Ok(step),
            }
        }
        Ok(Step::Pending)
    }

    /// Kong and APISIX: the body whole, once, with end of stream. Kong reads it before
    /// proxying and calls the filter only for a body that is not empty; APISIX only when
    /// the filter set `wasm_process_req_body`, empty or not. `before` is what the headers'
    /// callback left (forwarded, or paused with nothing pending).
    fn whole_body(&mut self, context: i32, body: &[u8], before: Step) -> Result<Step, HostError> {
        let state = self.store.data();
        let called = match state.profile {
            Profile::Kong => !body.is_empty(),
            Profile::Apisix => state.ngx_vars.get("wasm_process_req_body").is_some_and(|v| !v.is_empty()),
            Profile::Envoy => false,
        };
        if let (Step::Pending, Profile::Kong) = (&before, state.profile) {
            // A pause in request headers yields until something pending resumes it.
            return Ok(Step::Pending);
        }
        if !called {
            return Ok(before);
        }
        self.store.data_mut().request_body = body.to_vec();
        self.enter(Callback::RequestBody, context);
        let size = i32::try_from(body.len()).unwrap_or(i32::MAX);
        let calls = self.store.data().calls.len();
        let action = self.call::<(i32, i32, i32), i32>("proxy_on_request_body", (context, size, 1))?;
        self.step(context, action, calls, "on_request_body")
    }

    /// APISIX: the root context is created and configured at a request, with none current.
    /// A refusal is answered 503 by APISIX, the context freed (done, deleted), and the next
    /// request configures again.
    fn configure_at_request(&mut self) -> Result<Option<Outcome>, HostError> {
        if self.store.data().configured {
            return Ok(None);
        }
        self.enter(Callback::Other, ROOT_CONTEXT);
        self.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT_CONTEXT, 0))?;
        self.enter(Callback::Configure, ROOT_CONTEXT);
        let size = i32::try_from(self.store.data().plugin_configuration.len()).unwrap_or(i32::MAX);
        if self.call::<(i32, i32), i32>("proxy_on_configure", (ROOT_CONTEXT, size))? != 0 {
            self.store.data_mut().configured = true;
            return Ok(None);
        }
        self.store.data_mut().logs.push((4, "[error] failed to configure plugin context 1, rc: 0".into()));
        self.enter(Callback::Other, ROOT_CONTEXT);
        self.call::<i32, i32>("proxy_on_done", ROOT_CONTEXT)?;
        self.call::<i32, ()>("proxy_on_delete", ROOT_CONTEXT)?;
        self.store
            .data_mut()
            .logs
            .push((4, "[error] wasm: failed to fetch wasm plugin ctx: failed to run proxy_on_configure".into()));
        Ok(Some(Outcome::Responded { status: 503, headers: Vec::new(), body: APISIX_CONFIGURE_FAILED.into() }))
    }

    /// Enters a callback of `context`: on Kong, what the filter may call depends on it.
    fn enter(&mut self, phase: Callback, context: i32) {
        let state = self.store.data_mut();
        state.phase = phase;
        state.current = context;
    }

    /// From now on, answers host call `import` with `answer` (see [`ALL_STATUSES`]).
    pub fn answer_with(&mut self, import: &'static str, answer: Answer) {
        self.store.data_mut().answers.insert(import, answer);
    }

    /// Answers every host call as the host would again.
    pub fn answer_normally(&mut self) {
        self.store.data_mut().answers.clear();
    }

    /// The next call of `import` traps, as when a host aborts the call.
    pub fn trap_next(&mut self, import: &'static str) {
        self.store.data_mut().trap_next = Some(import);
    }

    /// Fires the root context's timer while the host is in `callback` (to show what a host
    /// allows where: Kong traps a callout outside request headers, ticks and callout answers).
    pub fn tick_during(&mut self, callback: Callback) -> Result<(), HostError> {
        self.enter(callback, ROOT_CONTEXT);
        self.call::<i32, ()>("proxy_on_tick", ROOT_CONTEXT)
    }

    /// Delivers a request's headers while no request is current, as a host does when a
    /// filter works on a request from the root context (Kong's `set_effective_context` is a
    /// no-op, so the request is never current there).
    pub fn request_headers_from_root(&mut self, headers: &[(&str, &str)]) -> Result<i32, HostError> {
        let context = self.next_context;
        self.next_context += 1;
        let (held, announced) = received(self.store.data().profile, headers);
        self.store.data_mut().request_headers = held;
        self.enter(Callback::Other, context);
        self.call::<(i32, i32), ()>("proxy_on_context_create", (context, ROOT_CONTEXT))?;
        self.enter(Callback::RequestHeaders, ROOT_CONTEXT);
        let count = i32::try_from(announced).unwrap_or(i32::MAX);
        self.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (context, count, 1))
    }

    /// The host's profile.
    pub fn profile(&self) -> Profile {
        self.store.data().profile
    }

    /// How a paused request ended, once the filter resumed or answered it.
    pub fn outcome(&mut self, context: i32) -> Option<Outcome> {
        self.store.data_mut().finished.remove(&context)
    }

    /// From now on, answers the host call `import` with Unimplemented (WASI's `clock_time_get`
    /// with ENOSYS): `proxy_set_property`, `proxy_get_current_time_nanoseconds`,
    /// `proxy_set_tick_period_milliseconds`, `proxy_get_shared_data` and
    /// `proxy_set_shared_data`, `proxy_http_call`, `proxy_define_metric` and
    /// `proxy_increment_metric`, `clock_time_get`; `peer_certificates`
    /// takes away the `connection.*_peer_certificate` properties.
    pub fn lack(&mut self, import: &'static str) {
        self.store.data_mut().lacking.push(import);
    }

    /// From now on, Envoy's `verify_signature` answers `result` (any bytes: a serialized
    /// `VerifySignatureResult` or garbage) whatever it is asked; `None`: it verifies again.
    pub fn foreign_answer(&mut self, result: Option<Vec<u8>>) {
        self.store.data_mut().foreign_answer = result;
    }

    /// How many times the filter called `proxy_call_foreign_function`.
    pub fn foreign_calls(&self) -> usize {
        self.store.data().foreign_calls
    }

    /// The client of a paused request goes away: the host deletes its context.
    pub fn cancel(&mut self, context: i32) -> Result<(), HostError> {
        self.store.data_mut().parked.remove(&context);
        self.finish(context)
    }

    /// Requests the filter holds now.
    pub fn paused(&self) -> usize {
        self.store.data().parked.len()
    }

    fn finish(&mut self, context: i32) -> Result<(), HostError> {
        self.enter(Callback::Other, context);
        self.call::<i32, i32>("proxy_on_done", context)?;
        self.call::<i32, ()>("proxy_on_log", context)?;
        self.call::<i32, ()>("proxy_on_delete", context)
    }

    /// Calls `proxy_on_request_headers` for a context that was never created: the filter
    /// must answer it (fail closed), not trap. The local response, if any.
    pub fn request_on_unknown_context(&mut self) -> Result<Option<u32>, HostError> {
        self.store.data_mut().local_response = None;
        self.enter(Callback::RequestHeaders, 9999);
        self.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (9999, 0, 1))?;
        Ok(self.store.data_mut().local_response.take().map(|(status, _, _)| status))
    }

    /// The headers the filter added to the upstream's response of the last request it forwarded.
    pub fn response_headers(&self) -> Headers {
        self.store.data().response_headers.clone()
    }

    /// Moves the VM's clock forward.
    pub fn advance_clock(&mut self, by: Duration) {
        self.store.data_mut().now_nanos += by.as_nanos() as u64;
    }

    /// Sets the VM's clock to `unix_seconds`.
    pub fn set_clock(&mut self, unix_seconds: i64) {
        self.store.data_mut().now_nanos = u64::try_from(unix_seconds).unwrap_or(0) * 1_000_000_000;
    }

    /// The VM's clock, Unix seconds.
    pub fn now(&self) -> i64 {
        (self.store.data().now_nanos / 1_000_000_000) as i64
    }

    /// Fires the root context's timer, as the host does every tick period.
    pub fn tick(&mut self) -> Result<(), HostError> {
        self.enter(Callback::Tick, ROOT_CONTEXT);
        self.call::<i32, ()>("proxy_on_tick", ROOT_CONTEXT)
    }

    /// The tick period the filter asked for, in milliseconds (0: none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    pub fn pending_http_calls(&self) -> Vec<HttpCall> {
        self.store.data().calls.clone()
    }

    /// Answers the callout `token` with `status` and `body`.
    pub fn respond(&mut self, token: u32, status: u16, body: &[u8]) -> Result<(), HostError> {
        self.answer(token, vec![(":status".to_string(), status.to_string())], body)
    }

    /// Ends the callout `token` without a response, as Envoy does on a timeout or a
    /// connection failure.
    pub fn fail_call(&mut self, token: u32) -> Result<(), HostError> {
        self.answer(token, Vec::new(), b"")
    }

    /// Delivers a callout's answer as both hosts do: on the root context. Envoy leaves the
    /// root context current (the filter asks for its request with `set_effective_context`);
    /// Kong answers a request's callout with that request current.
    fn answer(&mut self, token: u32, headers: Headers, body: &[u8]) -> Result<(), HostError> {
        let state = self.store.data_mut();
        let owner = state.calls.iter().find(|c| c.token == token).map_or(ROOT_CONTEXT, |c| c.context);
        state.calls.retain(|c| c.token != token);
        let headers_count = headers.len();
        state.call_response = Some((headers, body.to_vec()));
        let current = match state.profile {
            Profile::Kong | Profile::Apisix => owner,
            Profile::Envoy => ROOT_CONTEXT,
        };
        state.request_headers = state.parked.get(&current).cloned().unwrap_or_default();
        self.enter(Callback::CallResponse, current);
        let body_size = i32::try_from(body.len()).unwrap_or(i32::MAX);
        let result = self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            (ROOT_CONTEXT, token as i32, i32::try_from(headers_count).unwrap_or(0), body_size, 0),
        );
        let state = self.store.data_mut();
        state.call_response = None;
        let current = state.current;
        if let Some(held) = state.parked.get_mut(&current) {
            *held = std::mem::take(&mut state.request_headers);
        }
        result?;
        if owner != ROOT_CONTEXT && self.store.data().finished.contains_key(&owner) {
            self.finish(owner)?;
        }
        self.enter(Callback::Other, ROOT_CONTEXT);
        Ok(())
    }

    /// Sets a host property such as `source.address` (path segments joined with '.').
    pub fn set_property(&mut self, path: &str, value: &[u8]) {
        self.store.data_mut().properties.insert(path.replace('.', "\0"), value.to_vec());
    }

    /// A value the filter set as filter state during the last request (`agentgate.decision`).
    pub fn filter_state(&self, path: &str) -> Option<String> {
        self.store.data().filter_state.get(path).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The lines logged at proxy-wasm log level `level` (2 info, 3 warn, 4 error) and above.
    pub fn logs_at(&self, level: i32) -> Vec<String> {
        self.store.data().logs.iter().filter(|(l, _)| *l >= level).map(|(_, line)| line.clone()).collect()
    }

    /// Every line the filter logged (WASI stdout/stderr included), oldest first.
    pub fn logs(&self) -> Vec<String> {
        self.store.data().logs.iter().map(|(_, line)| line.clone()).collect()
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        self.store.data().process.metric(name)
    }

    /// Bytes of linear memory the VM uses now.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// Starts recording host calls (see [`count_instructions`]).
    pub fn start_trace(&mut self) {
        let fuel = self.store.get_fuel().unwrap_or(0);
        let state = self.store.data_mut();
        state.trace = Some(Vec::new());
        state.fuel_mark = fuel;
    }

    /// The host calls since [`Host::start_trace`], each with the wasm instructions run before
    /// it, and the instructions after the last one; recording stops.
    pub fn take_trace(&mut self) -> (Vec<(&'static str, u64)>, u64) {
        let fuel = self.store.get_fuel().unwrap_or(0);
        let state = self.store.data_mut();
        (state.trace.take().unwrap_or_default(), state.fuel_mark.saturating_sub(fuel))
    }

    /// Mean wall time per request of sending each of `requests` once through the filter,
    /// after one warm-up request. The same token in every request measures the hot path; a
    /// new token in each, the cold one.
    pub fn time_requests(&mut self, requests: &[Vec<(String, String)>]) -> Result<Duration, HostError> {
        fn as_refs(r: &[(String, String)]) -> Vec<(&str, &str)> {
            r.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
        }
        if let Some(first) = requests.first() {
            self.request(&as_refs(first))?;
        }
        let start = Instant::now();
        for request in requests {
            self.request(&as_refs(request))?;
        }
        Ok(start.elapsed() / u32::try_from(requests.len()).unwrap_or(u32::MAX).max(1))
    }
}

// ---- guest memory -------------------------------------------------------------------------

fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::Error::msg("guest has no memory export")),
    }
}

fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as u32 as usize];
    memory(caller)?.read(&*caller, ptr as u32 as usize, &mut buf)?;
    Ok(buf)
}

fn read_string(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write(caller: &mut Caller<'_, State>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    memory(caller)?.write(caller, ptr as u32 as usize, bytes)?;
    Ok(())
}

/// Copies `data` into guest memory it allocates, and stores the pointer and size (or garbage
/// in their place, when the test asked for it).
fn return_bytes(caller: &mut Caller<'_, State>, data: &[u8], ptr_out: i32, size_out: i32) -> wasmtime::Result<i32> {
    let alloc = match caller.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f.typed::<i32, i32>(&*caller)?,
        _ => return Err(wasmtime::Error::msg("guest has no proxy_on_memory_allocate")),
    };
    let size = i32::try_from(data.len())?;
    let ptr = alloc.call(&mut *caller, size)?;
    write(caller, ptr, data)?;
    let (ptr, size) = match caller.data_mut().garbage.take() {
        Some(Answer::GarbagePointer) => (ptr.wrapping_add(8), size),
        Some(Answer::GarbageSize) => (ptr, size.saturating_add(4096)),
        _ => (ptr, size),
    };
    write(caller, ptr_out, &ptr.to_le_bytes())?;
    write(caller, size_out, &size.to_le_bytes())?;
    Ok(OK)
}

/// What the test imposes on `import`: a trap, a status, or garbage in what it returns.
fn imposed(c: &mut Caller<'_, State>, import: &'static str) -> wasmtime::Result<Option<i32>> {
    traced(c, import);
    let state = c.data_mut();
    state.garbage = None;
    if state.trap_next == Some(import) {
        state.trap_next = None;
        return Err(wasmtime::Error::msg(format!("host trap in {import} (injected)")));
    }
    match state.answers.get(import) {
        Some(Answer::Status(status)) => Ok(Some(*status)),
        Some(garbage) => {
            state.garbage = Some(*garbage);
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Records host call `import` when tracing (with the filter's instructions since the last one).
fn traced(c: &mut Caller<'_, State>, import: &'static str) {
    if c.data().trace.is_none() {
        return;
    }
    let fuel = c.get_fuel().unwrap_or(0);
    let state = c.data_mut();
    let spent = state.fuel_mark.saturating_sub(fuel);
    state.fuel_mark = fuel;
    if let Some(trace) = &mut state.trace {
        trace.push((import, spent));
    }
}

/// What a host holds for a request the client sent as `headers`, and the header count it
/// gives the filter. Envoy lower-cases names and counts every entry; Kong keeps the case,
/// puts its pseudo-headers first (`:authority` its server name, the client's authority in
/// `Host`, `:path` decoded) and counts the client's headers.
fn received(profile: Profile, headers: &[(&str, &str)]) -> (Vec<Header>, usize) {
    let header = |name: &str, value: &str| Header { name: name.to_string(), value: value.to_string(), removed: false };
    match profile {
        Profile::Envoy => {
            let held: Vec<Header> = headers.iter().map(|(n, v)| header(&n.to_ascii_lowercase(), v)).collect();
            let count = held.len();
            (held, count)
        }
        Profile::Apisix => {
            // Lower-cased headers, then :path, :method, :scheme; the authority is the Host header.
            let mut held = Vec::new();
            let mut pseudo = Vec::new();
            for (name, value) in headers {
                match *name {
                    ":authority" => held.insert(0, header("host", value)),
                    _ if name.starts_with(':') => pseudo.push(header(name, value)),
                    _ => held.push(header(&name.to_ascii_lowercase(), value)),
                }
            }
            let count = held.len();
            held.extend(pseudo);
            held.push(header(":scheme", "http"));
            (held, count)
        }
        Profile::Kong => {
            let mut pseudo = Vec::new();
            let mut regular = Vec::new();
            for (name, value) in headers {
                match *name {
                    ":path" => pseudo.push(header(name, &percent_decoded_path(value))),
                    ":authority" => regular.insert(0, header("Host", value)),
                    _ if name.starts_with(':') => pseudo.push(header(name, value)),
                    _ => regular.push(header(name, value)),
                }
            }
            pseudo.push(header(":scheme", "http"));
            pseudo.push(header(":authority", KONG_SERVER_NAME));
            let count = regular.len();
            pseudo.extend(regular);
            (pseudo, count)
        }
    }
}

/// nginx's `r->uri`: the path percent-decoded (the query as sent).
fn percent_decoded_path(target: &str) -> String {
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    let path = String::from_utf8_lossy(&out).into_owned();
    query.map_or(path.clone(), |q| format!("{path}?{q}"))
}

/// The headers the filter sees: not removed; on Kong the first [`KONG_MAX_HEADERS`].
fn visible(profile: Profile, headers: &[Header]) -> Vec<(String, String)> {
    let limit = if profile == Profile::Kong { KONG_MAX_HEADERS } else { usize::MAX };
    headers.iter().filter(|h| !h.removed).take(limit).map(|h| (h.name.clone(), h.value.clone())).collect()
}

/// What the upstream receives: on Kong (nginx 1.22.1) removed headers too.
fn upstream(profile: Profile, headers: &[Header]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|h| profile == Profile::Kong || !h.removed)
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect()
}

/// Whether `name` names `header` on this host (Envoy: lower case only; nginx: any case).
fn names(profile: Profile, header: &Header, name: &str) -> bool {
    match profile {
        Profile::Envoy | Profile::Apisix => header.name == name.to_ascii_lowercase(),
        Profile::Kong => header.name.eq_ignore_ascii_case(name),
    }
}

/// Removes `name`: Envoy drops it; nginx marks every copy (and still forwards them).
fn remove_header(profile: Profile, headers: &mut Vec<Header>, name: &str) {
    for header in headers.iter_mut().filter(|h| names(profile, h, name)) {
        header.removed = true;
    }
    if profile != Profile::Kong {
        headers.retain(|h| !h.removed);
    }
}

/// Sets `name` to `value`: Envoy replaces every copy with one; nginx replaces the first live
/// copy in place (name and value) and marks the others; either adds it when absent.
fn replace_header(profile: Profile, headers: &mut Vec<Header>, name: &str, value: &str) {
    let name = if profile == Profile::Kong { name.to_string() } else { name.to_ascii_lowercase() };
    let mut replaced = false;
    for header in headers.iter_mut().filter(|h| !h.removed && names(profile, h, &name)) {
        match (profile, replaced) {
            (Profile::Kong, false) => {
                header.name = name.clone();
                header.value = value.to_string();
                replaced = true;
            }
            _ => header.removed = true,
        }
    }
    headers.retain(|h| profile == Profile::Kong || !h.removed);
    if !replaced {
        headers.push(Header { name, value: value.to_string(), removed: false });
    }
}

/// APISIX's `proxy_get_property`: an nginx variable by the path as one name (a dotted path
/// such as `source.address` names none), with a request only (`plugin_root_id` aside).
fn apisix_property(vars: &HashMap<String, Vec<u8>>, in_request: bool, path: &str) -> Result<Vec<u8>, i32> {
    match path {
        "plugin_root_id" => Ok(b"agentgate".to_vec()),
        _ if !in_request => Err(BAD_ARGUMENT),
        _ => vars.get(&path.to_ascii_lowercase()).cloned().ok_or(NOT_FOUND),
    }
}

/// APISIX's `proxy_set_property`: writes an nginx variable that nginx.conf declared (APISIX
/// declares `wasm_process_req_body` and `wasm_process_resp_body`); any other name logs the
/// error lua-resty-core gives and answers NotFound (InternalFailure for other failures).
fn apisix_set_variable(
    vars: &mut HashMap<String, Vec<u8>>,
    logs: &mut Vec<(i32, String)>,
    in_request: bool,
    name: &str,
    value: Vec<u8>,
) -> i32 {
    if !in_request {
        return BAD_ARGUMENT;
    }
    let name = name.to_ascii_lowercase();
    if name.starts_with("wasm_process_") && vars.contains_key(&name) {
        vars.insert(name, value);
        return OK;
    }
    logs.push((4, apisix_set_variable_error(&name)));
    NOT_FOUND
}

/// APISIX: calls that need a request answer BadArgument without one (`must_get_req`).
fn apisix_without_request(c: &Caller<'_, State>) -> bool {
    c.data().profile == Profile::Apisix && c.data().current == ROOT_CONTEXT
}

/// Kong: request headers exist only within a request; the worker dies otherwise.
fn current_request(c: &Caller<'_, State>) -> wasmtime::Result<bool> {
    let state = c.data();
    let in_request = state.current != ROOT_CONTEXT;
    if state.profile == Profile::Kong && !in_request {
        return Err(wasmtime::Error::msg(
            "request headers read with no current request: the nginx worker crashes (SIGSEGV)",
        ));
    }
    Ok(in_request)
}

fn serialize_map(map: &[(String, String)]) -> Vec<u8> {
    let mut out = (map.len() as u32).to_le_bytes().to_vec();
    for (k, v) in map {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn deserialize_map(bytes: &[u8]) -> Vec<(String, String)> {
    let word = |at: usize| bytes.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let count = word(0);
    let mut at = 4 + count * 8;
    let mut out = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let (klen, vlen) = (word(4 + i * 8), word(8 + i * 8));
        let text = |from: usize, len: usize| {
            String::from_utf8_lossy(bytes.get(from..from.saturating_add(len)).unwrap_or_default()).into_owned()
        };
        out.push((text(at, klen), text(at + klen + 1, vlen)));
        at += klen + vlen + 2;
    }
    out
}

// ---- proxy-wasm ABI 0.2.1 -------------------------------------------------------------------

/// Phases in which Kong allows `proxy_http_call`.
const KONG_CALLOUT_PHASES: &[Callback] =
    &[Callback::RequestHeaders, Callback::RequestBody, Callback::Tick, Callback::CallResponse];

/// ngx_wasm_module's answer to a function it lists as not yet implemented
/// (`ngx_proxy_wasm_hfuncs_nop`): a trap, which fails the filter.
fn kong_nyi(c: &Caller<'_, State>, import: &str) -> wasmtime::Result<()> {
    if c.data().profile == Profile::Kong {
        return Err(wasmtime::Error::msg(format!("host trap (function not yet implemented): {import}")));
    }
    Ok(())
}

fn define_proxy_wasm(linker: &mut Linker<State>, profile: Profile) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, State>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let line = read_string(&mut c, ptr, len)?;
            c.data_mut().logs.push((level, line));
            Ok(imposed(&mut c, "proxy_log")?.unwrap_or(OK))
        },
    )?;
    // wasm-nginx-module does not define it (a module importing it does not load there);
    // ngx_wasm_module lists it as not yet implemented.
    if profile != Profile::Apisix {
        linker.func_wrap(
            "env",
            "proxy_get_log_level",
            |mut c: Caller<'_, State>, out: i32| -> wasmtime::Result<i32> {
                kong_nyi(&c, "proxy_get_log_level")?;
                traced(&mut c, "proxy_get_log_level");
                write(&mut c, out, &0i32.to_le_bytes())?;
                Ok(OK)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, State>, out: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_get_current_time_nanoseconds")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_get_current_time_nanoseconds") {
                return Ok(UNIMPLEMENTED);
            }
            let now = if c.data().garbage.is_some() { u64::MAX } else { c.data().now_nanos };
            write(&mut c, out, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, State>, period: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_set_tick_period_milliseconds")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_set_tick_period_milliseconds") {
                return Ok(UNIMPLEMENTED);
            }
            c.data_mut().tick_period_ms = period as u32;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, State>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_out: i32,
         size_out: i32|
         -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_get_buffer_bytes")? {
                return Ok(status);
            }
            let data = match kind {
                BUFFER_HTTP_REQUEST_BODY => {
                    let state = c.data_mut();
                    let in_body = state.phase == Callback::RequestBody;
                    match state.profile {
                        Profile::Kong if !matches!(state.phase, Callback::RequestHeaders | Callback::RequestBody) => {
                            return Err(wasmtime::Error::msg(
                                "host trap (bad usage): can only get request body during \"on_request_body\", \"on_log\"",
                            ))
                        }
                        Profile::Kong if state.request_body.len() > KONG_BODY_BUFFER_BYTES => {
                            state.logs.push((4, "[error] cannot read request body buffered to file".into()));
                            return Ok(NOT_FOUND);
                        }
                        Profile::Apisix if max <= 0 => return Ok(BAD_ARGUMENT),
                        _ if !in_body => return Ok(NOT_FOUND),
                        _ => state.request_body.clone(),
                    }
                }
                BUFFER_HTTP_RESPONSE_BODY if c.data().phase == Callback::ResponseBody => c.data().response_body.clone(),
                BUFFER_HTTP_RESPONSE_BODY => return Ok(NOT_FOUND),
                BUFFER_PLUGIN_CONFIGURATION => c.data().plugin_configuration.clone(),
                BUFFER_VM_CONFIGURATION => Vec::new(),
                BUFFER_HTTP_CALL_RESPONSE_BODY => match &c.data().call_response {
                    Some((_, body)) => body.clone(),
                    None => return Ok(NOT_FOUND),
                },
                _ => return Ok(BAD_ARGUMENT),
            };
            let start = (start as u32 as usize).min(data.len());
            let end = start.saturating_add(max as u32 as usize).min(data.len());
            let slice = data.get(start..end).unwrap_or_default().to_vec();
            if slice.is_empty() {
                return Ok(NOT_FOUND);
            }
            return_bytes(&mut c, &slice, ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, State>, map: i32, ptr_out: i32, size_out: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_get_header_map_pairs")? {
                return Ok(status);
            }
            if apisix_without_request(&c) {
                return Ok(BAD_ARGUMENT);
            }
            let pairs = match map {
                MAP_REQUEST_HEADERS => {
                    if !current_request(&c)? {
                        return Ok(NOT_FOUND);
                    }
                    visible(c.data().profile, &c.data().request_headers)
                }
                MAP_HTTP_CALL_RESPONSE_HEADERS => {
                    c.data().call_response.as_ref().map(|(h, _)| h.clone()).unwrap_or_default()
                }
                MAP_RESPONSE_HEADERS if matches!(c.data().phase, Callback::ResponseHeaders | Callback::ResponseBody) => {
                    c.data().response_headers.clone()
                }
                _ => return Ok(BAD_ARGUMENT),
            };
            return_bytes(&mut c, &serialize_map(&pairs), ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, State>,
         map: i32,
         kptr: i32,
         klen: i32,
         ptr_out: i32,
         size_out: i32|
         -> wasmtime::Result<i32> {
            if map != MAP_REQUEST_HEADERS || !current_request(&c)? {
                return Ok(BAD_ARGUMENT);
            }
            let key = read_string(&mut c, kptr, klen)?;
            let profile = c.data().profile;
            let value = c
                .data()
                .request_headers
                .iter()
                .find(|h| !h.removed && names(profile, h, &key))
                .map(|h| h.value.clone());
            match value {
                Some(v) => return_bytes(&mut c, v.as_bytes(), ptr_out, size_out),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, State>, map: i32, kptr: i32, klen: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_remove_header_map_value")? {
                return Ok(status);
            }
            if map == MAP_RESPONSE_HEADERS && c.data().phase == Callback::ResponseHeaders {
                // Hosts send the response headers once on_response_headers returns.
                let key = read_string(&mut c, kptr, klen)?;
                c.data_mut().response_headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&key));
                return Ok(OK);
            }
            if map != MAP_REQUEST_HEADERS || !current_request(&c)? {
                return Ok(BAD_ARGUMENT);
            }
            let key = read_string(&mut c, kptr, klen)?;
            let state = c.data_mut();
            remove_header(state.profile, &mut state.request_headers, &key);
            Ok(OK)
        },
    )?;
    for (name, replace) in [("proxy_replace_header_map_value", true), ("proxy_add_header_map_value", false)] {
        linker.func_wrap(
            "env",
            name,
            move |mut c: Caller<'_, State>,
                  map: i32,
                  kptr: i32,
                  klen: i32,
                  vptr: i32,
                  vlen: i32|
                  -> wasmtime::Result<i32> {
                if let Some(status) = imposed(&mut c, name)? {
                    return Ok(status);
                }
                if map == MAP_RESPONSE_HEADERS && c.data().phase == Callback::ResponseHeaders {
                    let key = read_string(&mut c, kptr, klen)?;
                    let value = read_string(&mut c, vptr, vlen)?;
                    let added = &mut c.data_mut().response_headers;
                    if replace {
                        added.retain(|(n, _)| !n.eq_ignore_ascii_case(&key));
                    }
                    added.push((key, value));
                    return Ok(OK);
                }
                if map != MAP_REQUEST_HEADERS || !current_request(&c)? {
                    return Ok(BAD_ARGUMENT);
                }
                let key = read_string(&mut c, kptr, klen)?;
                let value = read_string(&mut c, vptr, vlen)?;
                let state = c.data_mut();
                if replace {
                    replace_header(state.profile, &mut state.request_headers, &key, &value);
                } else {
                    state.request_headers.push(Header { name: key, value, removed: false });
                }
                Ok(OK)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, State>,
         status: i32,
         _dptr: i32,
         _dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         _grpc: i32|
         -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_send_local_response")? {
                return Ok(status);
            }
            let body = read(&mut c, bptr, blen)?;
            let headers = deserialize_map(&read(&mut c, hptr, hlen)?);
            let state = c.data_mut();
            if state.parked.remove(&state.current).is_some() {
                let body = String::from_utf8_lossy(&body).into_owned();
                state.finished.insert(state.current, Outcome::Responded { status: status as u32, headers, body });
            } else {
                state.local_response = Some((status as u32, headers, body));
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, State>, pptr: i32, plen: i32, ptr_out: i32, size_out: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_get_property")? {
                return Ok(status);
            }
            let path = read_string(&mut c, pptr, plen)?;
            let state = c.data_mut();
            if state.profile == Profile::Kong && state.current == ROOT_CONTEXT && path.contains('\0') {
                state.logs.push((4, "[error] cannot get scoped properties outside of a request".into()));
                return Ok(INTERNAL_FAILURE);
            }
            if path.ends_with("_peer_certificate") && state.lacking.contains(&"peer_certificates") {
                return Ok(UNIMPLEMENTED);
            }
            if state.profile == Profile::Apisix {
                return match apisix_property(&state.ngx_vars, state.current != ROOT_CONTEXT, &path) {
                    Ok(value) if !value.is_empty() => return_bytes(&mut c, &value, ptr_out, size_out),
                    Ok(_) => {
                        write(&mut c, ptr_out, &0i32.to_le_bytes())?;
                        write(&mut c, size_out, &0i32.to_le_bytes())?;
                        Ok(OK)
                    }
                    Err(status) => Ok(status),
                };
            }
            let value = match (state.profile, path.as_str()) {
                (Profile::Kong, "ngx\0nginx_version") => Some(b"1.22.1".to_vec()),
                _ => state.properties.get(&path).cloned(),
            };
            match value {
                Some(value) => return_bytes(&mut c, &value, ptr_out, size_out),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, State>, pptr: i32, plen: i32, vptr: i32, vlen: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_set_property")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_set_property") {
                return Ok(UNIMPLEMENTED);
            }
            if c.data().profile == Profile::Apisix {
                let name = read_string(&mut c, pptr, plen)?;
                let value = read(&mut c, vptr, vlen)?;
                let state = c.data_mut();
                let in_request = state.current != ROOT_CONTEXT;
                return Ok(apisix_set_variable(&mut state.ngx_vars, &mut state.logs, in_request, &name, value));
            }
            let path = read_string(&mut c, pptr, plen)?.replace('\0', ".");
            let value = read(&mut c, vptr, vlen)?;
            c.data_mut().filter_state.insert(path, value);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, State>,
         kptr: i32,
         klen: i32,
         ptr_out: i32,
         size_out: i32,
         cas_out: i32|
         -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_get_shared_data")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_get_shared_data") {
                return Ok(UNIMPLEMENTED);
            }
            let key = read_string(&mut c, kptr, klen)?;
            let entry = lock(&c.data().process.shared_data).get(&key).cloned();
            match entry {
                Some((value, cas)) => {
                    write(&mut c, cas_out, &cas.to_le_bytes())?;
                    if value.is_empty() {
                        write(&mut c, ptr_out, &0i32.to_le_bytes())?;
                        write(&mut c, size_out, &0i32.to_le_bytes())?;
                        return Ok(OK);
                    }
                    return_bytes(&mut c, &value, ptr_out, size_out)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, State>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_set_shared_data")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_set_shared_data") {
                return Ok(UNIMPLEMENTED);
            }
            let key = read_string(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let mut store = lock(&c.data().process.shared_data);
            let current = store.get(&key).map_or(0, |(_, cas)| *cas);
            if cas != 0 && cas as u32 != current {
                return Ok(CAS_MISMATCH);
            }
            store.insert(key, (value, current + 1));
            Ok(OK)
        },
    )?;
    // Every host defines the import (a module that imports what a host lacks does not load);
    // what it does differs. Envoy: its foreign functions (`verify_signature` natively here),
    // NotFound for other names. Kong (ngx_wasm_module, ngx_proxy_wasm_host.c): only
    // `resolve_lua`, any other name a trap that fails the filter. APISIX (wasm-nginx-module,
    // ngx_http_wasm_api.c): Unimplemented.
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, State>,
         nptr: i32,
         nlen: i32,
         aptr: i32,
         alen: i32,
         ptr_out: i32,
         size_out: i32|
         -> wasmtime::Result<i32> {
            c.data_mut().foreign_calls += 1;
            if let Some(status) = imposed(&mut c, "proxy_call_foreign_function")? {
                return Ok(status);
            }
            let name = read_string(&mut c, nptr, nlen)?;
            match c.data().profile {
                Profile::Kong if name != "resolve_lua" => {
                    return Err(wasmtime::Error::msg("host trap (internal error): unknown foreign function"))
                }
                Profile::Apisix => return Ok(UNIMPLEMENTED),
                _ if c.data().lacking.contains(&"proxy_call_foreign_function") => return Ok(UNIMPLEMENTED),
                _ if name != "verify_signature" => return Ok(NOT_FOUND),
                _ => {}
            }
            let arguments = read(&mut c, aptr, alen)?;
            let answer = match c.data().foreign_answer.clone() {
                Some(bytes) => Ok(bytes),
                None => crate::foreign::verify_signature(&arguments),
            };
            match answer {
                Ok(bytes) => return_bytes(&mut c, &bytes, ptr_out, size_out),
                Err(status) => Ok(status),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, State>, _kind: i32, nptr: i32, nlen: i32, id_out: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_define_metric")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_define_metric") {
                return Ok(UNIMPLEMENTED);
            }
            if c.data().profile == Profile::Apisix {
                // Ok, and the id is not written.
                return Ok(OK);
            }
            let name = read_string(&mut c, nptr, nlen)?;
            let id = {
                let mut metrics = lock(&c.data().process.metrics);
                match metrics.iter().position(|(n, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        metrics.push((name, 0));
                        metrics.len() - 1
                    }
                }
            };
            let id = if c.data().garbage.is_some() { u32::MAX } else { id as u32 };
            write(&mut c, id_out, &id.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Caller<'_, State>, id: i32, offset: i64| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_increment_metric")? {
                return Ok(status);
            }
            if c.data().lacking.contains(&"proxy_increment_metric") {
                return Ok(UNIMPLEMENTED);
            }
            if c.data().profile == Profile::Apisix {
                return Ok(OK);
            }
            Ok(match lock(&c.data().process.metrics).get_mut(id as u32 as usize) {
                Some((_, value)) => {
                    *value += offset;
                    OK
                }
                None => NOT_FOUND,
            })
        },
    )?;
    linker.func_wrap("env", "proxy_record_metric", |c: Caller<'_, State>, id: i32, value: i64| -> i32 {
        match lock(&c.data().process.metrics).get_mut(id as u32 as usize) {
            Some((_, v)) => {
                *v = value;
                OK
            }
            None => NOT_FOUND,
        }
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, State>, id: i32, out: i32| -> wasmtime::Result<i32> {
            let value = lock(&c.data().process.metrics).get(id as u32 as usize).map(|&(_, v)| v);
            match value {
                Some(v) => {
                    write(&mut c, out, &(v as u64).to_le_bytes())?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, State>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         _tptr: i32,
         _tlen: i32,
         timeout: i32,
         token_out: i32|
         -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_http_call")? {
                return Ok(status);
            }
            let state = c.data();
            if state.profile == Profile::Kong && !KONG_CALLOUT_PHASES.contains(&state.phase) {
                return Err(wasmtime::Error::msg(
                    "host trap (bad usage): can only send HTTP dispatch during \"on_request_headers\", \"on_request_body\", \"on_tick\", \"on_dispatch_response\", \"on_foreign_function\"",
                ));
            }
            if state.lacking.contains(&"proxy_http_call") {
                return Ok(UNIMPLEMENTED);
            }
            if apisix_without_request(&c) {
                return Ok(BAD_ARGUMENT);
            }
            let upstream = read_string(&mut c, uptr, ulen)?;
            if upstream.is_empty() {
                // Envoy: no such cluster.
                return Ok(BAD_ARGUMENT);
            }
            let headers = deserialize_map(&read(&mut c, hptr, hlen)?);
            let body = read(&mut c, bptr, blen)?;
            let garbage = c.data().garbage.is_some();
            let state = c.data_mut();
            let token = state.next_call;
            state.next_call += 1;
            let context = state.current;
            state.calls.push(HttpCall { token, context, upstream, headers, body, timeout_ms: timeout as u32 });
            let token = if garbage { token.wrapping_add(1000) } else { token };
            write(&mut c, token_out, &token.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, State>, context: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_set_effective_context")? {
                return Ok(status);
            }
            let state = c.data_mut();
            // Kong: a no-op that says Ok.
            if state.profile != Profile::Envoy || context == ROOT_CONTEXT || context == state.current {
                return Ok(OK);
            }
            // Envoy answers BadArgument for a context that is gone (the client left).
            let Some(headers) = state.parked.get(&context).cloned() else { return Ok(BAD_ARGUMENT) };
            if let Some(saved) = state.parked.get_mut(&state.current) {
                *saved = std::mem::take(&mut state.request_headers);
            }
            state.request_headers = headers;
            state.local_response = None;
            state.current = context;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, State>, _stream: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_continue_stream")? {
                return Ok(status);
            }
            let state = c.data_mut();
            if state.parked.remove(&state.current).is_some() {
                let upstream_headers = upstream(state.profile, &state.request_headers);
                state.finished.insert(state.current, Outcome::Continued { upstream_headers });
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, State>, _stream: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_close_stream")? {
                return Ok(status);
            }
            kong_nyi(&c, "proxy_close_stream")?;
            let state = c.data_mut();
            state.reset = true;
            state.parked.remove(&state.current);
            state
                .finished
                .insert(state.current, Outcome::Responded { status: 0, headers: Vec::new(), body: "reset".into() });
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, State>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            if let Some(status) = imposed(&mut c, "proxy_set_buffer_bytes")? {
                return Ok(status);
            }
            let data = read(&mut c, ptr, len)?;
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            let state = c.data_mut();
            if kind != BUFFER_HTTP_RESPONSE_BODY {
                return Ok(BAD_ARGUMENT);
            }
            let body = &mut state.response_body;
            match state.profile {
                // wasm-nginx-module: src/http/ngx_http_wasm_api.c answers Unimplemented.
                Profile::Apisix => return Ok(UNIMPLEMENTED),
                Profile::Kong if state.phase != Callback::ResponseBody => {
                    return Err(wasmtime::Error::msg(
                        "host trap (bad usage): can only set response body during \"on_response_body\"",
                    ))
                }
                // ngx_wasm_module: start and size 0 prepend; otherwise the chunk is cut at
                // `start` and at most `size` bytes of the data written there.
                Profile::Kong if start == 0 && size == 0 && !data.is_empty() => {
                    body.splice(0..0, data);
                }
                Profile::Kong => {
                    body.truncate(start);
                    body.extend_from_slice(data.get(..size.min(data.len())).unwrap_or_default());
                }
                // Envoy (context.cc Buffer::copyFrom): start 0 drains `size` bytes and
                // prepends; a start at or past the end appends; anything else is refused.
                Profile::Envoy if state.phase != Callback::ResponseBody => return Ok(NOT_FOUND),
                Profile::Envoy if start == 0 => {
                    body.drain(..size.min(body.len()));
                    body.splice(0..0, data);
                }
                Profile::Envoy if start >= body.len() => body.extend_from_slice(&data),
                Profile::Envoy => return Ok(BAD_ARGUMENT),
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |_: Caller<'_, State>| -> i32 { OK })?;
    Ok(())
}

// ---- the WASI preview1 calls a Rust wasip1 module makes -------------------------------------

fn define_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    const WASI: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: Caller<'_, State>, fd: i32, iovs: i32, count: i32, written_out: i32| -> wasmtime::Result<i32> {
            let mut text = Vec::new();
            for i in 0..count {
                let iov = read(&mut c, iovs + i * 8, 8)?;
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                text.extend(read(&mut c, ptr, len)?);
            }
            let written = text.len() as u32;
            c.data_mut().logs.push((-fd, String::from_utf8_lossy(&text).trim_end().to_string()));
            write(&mut c, written_out, &written.to_le_bytes())?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut c: Caller<'_, State>, count_out: i32, size_out: i32| -> wasmtime::Result<i32> {
            write(&mut c, count_out, &0u32.to_le_bytes())?;
            write(&mut c, size_out, &0u32.to_le_bytes())?;
            Ok(0)
        },
    )?;
    linker.func_wrap(WASI, "environ_get", |_: Caller<'_, State>, _a: i32, _b: i32| -> i32 { 0 })?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: Caller<'_, State>, _id: i32, _precision: i64, out: i32| -> wasmtime::Result<i32> {
            if let Some(errno) = imposed(&mut c, "clock_time_get")? {
                return Ok(errno);
            }
            if c.data().lacking.contains(&"clock_time_get") {
                return Ok(52); // ENOSYS
            }
            let now = c.data().now_nanos;
            write(&mut c, out, &now.to_le_bytes())?;
            Ok(0)
        },
    )?;
    linker.func_wrap(WASI, "random_get", |mut c: Caller<'_, State>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
        if let Some(errno) = imposed(&mut c, "random_get")? {
            return Ok(errno);
        }
        let mut bytes = vec![0u8; len as u32 as usize];
        c.data_mut().rng.fill_bytes(&mut bytes);
        write(&mut c, ptr, &bytes)?;
        Ok(0)
    })?;
    linker.func_wrap(WASI, "proc_exit", |_: Caller<'_, State>, code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::msg(format!("proc_exit({code})")))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(headers: &[Header]) -> Vec<(&str, &str, bool)> {
        headers.iter().map(|h| (h.name.as_str(), h.value.as_str(), h.removed)).collect()
    }

    #[test]
    fn kong_passes_names_in_the_client_case_and_its_own_authority() {
        let (held, count) = received(
            Profile::Kong,
            &[(":method", "GET"), (":path", "/a"), (":authority", "api.example.com"), ("Authorization", "Bearer t")],
        );
        let view = visible(Profile::Kong, &held);
        assert!(view.contains(&("Authorization".into(), "Bearer t".into())));
        assert!(view.contains(&(":authority".into(), KONG_SERVER_NAME.into())));
        assert!(view.contains(&("Host".into(), "api.example.com".into())));
        assert!(!view.iter().any(|(n, _)| n.eq_ignore_ascii_case("x-request-id")), "none unless sent");
        assert_eq!(count, 2, "the client's headers");
        let (held, _) = received(Profile::Envoy, &[("Authorization", "Bearer t")]);
        assert_eq!(visible(Profile::Envoy, &held), vec![("authorization".to_string(), "Bearer t".to_string())]);
    }

    #[test]
    fn kong_passes_the_first_100_headers_pseudo_headers_first() {
        let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
        let mut sent: Vec<(&str, &str)> = vec![(":method", "GET"), (":path", "/a")];
        sent.extend(names.iter().map(|n| (n.as_str(), "v")));
        let (held, count) = received(Profile::Kong, &sent);
        let view = visible(Profile::Kong, &held);
        assert_eq!(view.len(), KONG_MAX_HEADERS);
        assert_eq!(count, 120);
        assert!(view.first().is_some_and(|(n, _)| n.starts_with(':')));
        assert!(!view.iter().any(|(n, _)| n == "x-h119"), "a header past the limit is not seen");
    }

    fn apisix_vars() -> HashMap<String, Vec<u8>> {
        [("nginx_version", APISIX_NGINX_VERSION), ("wasm_process_req_body", ""), ("wasm_process_resp_body", "")]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn apisix_properties_are_nginx_variables_with_no_client_address() {
        let vars = apisix_vars();
        assert_eq!(apisix_property(&vars, true, "nginx_version"), Ok(APISIX_NGINX_VERSION.as_bytes().to_vec()));
        assert_eq!(apisix_property(&vars, true, "source\0address"), Err(NOT_FOUND), "no source.address");
        assert_eq!(apisix_property(&vars, true, "ngx\0nginx_version"), Err(NOT_FOUND), "not Kong's ngx.*");
        assert_eq!(apisix_property(&vars, false, "nginx_version"), Err(BAD_ARGUMENT), "no request at configure");
        assert_eq!(apisix_property(&vars, false, "plugin_root_id"), Ok(b"agentgate".to_vec()));
    }

    #[test]
    fn apisix_fails_each_write_to_an_undeclared_variable_with_not_found_and_an_error_line() {
        let (mut vars, mut logs) = (apisix_vars(), Vec::new());
        for _ in 0..2 {
            assert_eq!(
                apisix_set_variable(&mut vars, &mut logs, true, "agentgate.decision", b"allow".to_vec()),
                NOT_FOUND
            );
        }
        assert_eq!(logs.len(), 2, "one error line per write, per request");
        assert!(logs[0].1.contains("variable \"agentgate.decision\" not found for writing"), "{logs:?}");
        assert_eq!(apisix_set_variable(&mut vars, &mut logs, true, "wasm_process_req_body", b"1".to_vec()), OK);
        assert_eq!(vars.get("wasm_process_req_body").map(Vec::as_slice), Some(&b"1"[..]));
        assert_eq!(
            apisix_set_variable(&mut vars, &mut logs, false, "wasm_process_req_body", b"1".to_vec()),
            BAD_ARGUMENT
        );
        assert_eq!(logs.len(), 2);
    }

    #[test]
    fn apisix_passes_lower_case_names_and_the_host_header_but_no_authority() {
        let (held, _) =
            received(Profile::Apisix, &[(":method", "POST"), (":path", "/mcp"), (":authority", "api"), ("X-A", "1")]);
        let view = visible(Profile::Apisix, &held);
        assert!(view.contains(&("host".into(), "api".into())) && view.contains(&("x-a".into(), "1".into())));
        assert!(!view.iter().any(|(n, _)| n == ":authority"), "{view:?}");
        assert!(view.contains(&(":path".into(), "/mcp".into())) && view.contains(&(":scheme".into(), "http".into())));
    }

    #[test]
    fn kong_decodes_the_path() {
        assert_eq!(percent_decoded_path("/invoices/42/%61pprove?q=%2F"), "/invoices/42/approve?q=%2F");
        let (held, _) = received(Profile::Kong, &[(":path", "/caf%C3%A9")]);
        assert!(visible(Profile::Kong, &held).contains(&(":path".into(), "/café".into())));
    }

    #[test]
    fn kong_marks_a_removed_header_and_still_forwards_it() {
        let mut headers = received(Profile::Kong, &[("Authorization", "Bearer t"), ("X-Agent-Id", "root")]).0;
        remove_header(Profile::Kong, &mut headers, "authorization");
        assert!(!visible(Profile::Kong, &headers).iter().any(|(n, _)| n == "Authorization"), "hidden from the filter");
        assert!(
            upstream(Profile::Kong, &headers).contains(&("Authorization".into(), "Bearer t".into())),
            "but forwarded"
        );
        let mut envoy = received(Profile::Envoy, &[("Authorization", "Bearer t")]).0;
        remove_header(Profile::Envoy, &mut envoy, "authorization");
        assert!(upstream(Profile::Envoy, &envoy).is_empty());
    }

    #[test]
    fn kong_replaces_the_first_copy_in_place_and_marks_the_rest() {
        let mut headers = received(Profile::Kong, &[("X-Agent-Id", "root"), ("x-agent-id", "admin")]).0;
        replace_header(Profile::Kong, &mut headers, "x-agent-id", "agent-7");
        let kept: Vec<_> =
            pairs(&headers).into_iter().filter(|(n, _, _)| n.eq_ignore_ascii_case("x-agent-id")).collect();
        assert_eq!(kept, vec![("x-agent-id", "agent-7", false), ("x-agent-id", "admin", true)]);
        assert!(
            upstream(Profile::Kong, &headers).contains(&("x-agent-id".into(), "admin".into())),
            "the marked copy still arrives"
        );
        let mut envoy = received(Profile::Envoy, &[("x-agent-id", "root"), ("x-agent-id", "admin")]).0;
        replace_header(Profile::Envoy, &mut envoy, "x-agent-id", "agent-7");
        assert_eq!(upstream(Profile::Envoy, &envoy), vec![("x-agent-id".to_string(), "agent-7".to_string())]);
    }
}
