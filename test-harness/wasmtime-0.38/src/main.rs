//! Runs dist/agentgate.wasm on wasmtime 0.38.1 — the runtime api7/wasm-nginx-module (APISIX's
//! wasm host) pins — through the proxy-wasm ABI 0.2.1, answering the way that host does: no
//! proxy-wasm clock, ticks, shared data or queues (Unimplemented), so the filter reads time from
//! WASI's clock, which this host sets; metrics calls succeed and do nothing; `set_property` fails
//! (nginx has no variable by that name); no properties at all (no `source.address`).
//!
//! For each clock value it starts a fresh VM (after a trap the SDK's state stays borrowed and the
//! VM is useless, as in nginx) and runs the decision table: a valid token continues with the
//! audit headers and an audit record carrying that time; an expired one gets 401, a wrong scope
//! 403, no token 401. Before tools/wasm-fixup, every time whose hundreds digit is odd trapped in
//! serde_json/itoa while writing the audit record's `"time"`.
//!
//! `agentgate-wasmtime-038 MODULE FIXTURE [--quick]`: ends with "N passed, N failed" and exits 1
//! on any failure. --quick: the clock every 100 s over 2,000 s and 1796005715 (22 values) instead
//! of every 100 s over the fixture's whole window, every second over 200 s and 1796005715.

use std::collections::HashMap;
use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store, Trap, TypedFunc};

const ROOT_CONTEXT: i32 = 1;
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const UNIMPLEMENTED: i32 = 12;
const MAP_REQUEST_HEADERS: i32 = 0;
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

type Headers = Vec<(String, String)>;

struct State {
    plugin_configuration: Vec<u8>,
    now_nanos: u64,
    rng: u64,
    logs: Vec<String>,
    request_headers: Headers,
    local_response: Option<(i32, Headers, String)>,
}

fn trap(message: impl Into<String>) -> Trap {
    Trap::new(message)
}

fn memory(c: &mut Caller<'_, State>) -> Result<Memory, Trap> {
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(trap("guest has no memory export")),
    }
}

fn read(c: &mut Caller<'_, State>, ptr: i32, len: i32) -> Result<Vec<u8>, Trap> {
    let mut buf = vec![0u8; len as u32 as usize];
    memory(c)?.read(&*c, ptr as u32 as usize, &mut buf).map_err(|e| trap(e.to_string()))?;
    Ok(buf)
}

fn read_string(c: &mut Caller<'_, State>, ptr: i32, len: i32) -> Result<String, Trap> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut Caller<'_, State>, ptr: i32, bytes: &[u8]) -> Result<(), Trap> {
    memory(c)?.write(&mut *c, ptr as u32 as usize, bytes).map_err(|e| trap(e.to_string()))
}

/// Copies `data` into memory the guest allocates and stores its pointer and size.
fn return_bytes(c: &mut Caller<'_, State>, data: &[u8], ptr_out: i32, size_out: i32) -> Result<i32, Trap> {
    let alloc = match c.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f.typed::<i32, i32, _>(&*c).map_err(|e| trap(e.to_string()))?,
        _ => return Err(trap("guest has no proxy_on_memory_allocate")),
    };
    let size = data.len() as i32;
    let ptr = alloc.call(&mut *c, size)?;
    write(c, ptr, data)?;
    write(c, ptr_out, &ptr.to_le_bytes())?;
    write(c, size_out, &size.to_le_bytes())?;
    Ok(OK)
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

fn deserialize_map(bytes: &[u8]) -> Headers {
    let word = |at: usize| bytes.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let count = word(0);
    let mut at = 4 + count * 8;
    let mut out = Vec::new();
    for i in 0..count {
        let (klen, vlen) = (word(4 + i * 8), word(8 + i * 8));
        let text = |from: usize, len: usize| String::from_utf8_lossy(bytes.get(from..from + len).unwrap_or_default()).into_owned();
        out.push((text(at, klen), text(at + klen + 1, vlen)));
        at += klen + vlen + 2;
    }
    out
}

fn define_imports(linker: &mut Linker<State>) -> anyhow::Result<()> {
    const ENV: &str = "env";
    const WASI: &str = "wasi_snapshot_preview1";
    linker.func_wrap(ENV, "proxy_log", |mut c: Caller<'_, State>, _level: i32, ptr: i32, len: i32| {
        let line = read_string(&mut c, ptr, len)?;
        c.data_mut().logs.push(line);
        Ok(OK)
    })?;
    // What wasm-nginx-module does not implement.
    linker.func_wrap(ENV, "proxy_get_current_time_nanoseconds", |_: Caller<'_, State>, _out: i32| UNIMPLEMENTED)?;
    linker.func_wrap(ENV, "proxy_set_tick_period_milliseconds", |_: Caller<'_, State>, _ms: i32| UNIMPLEMENTED)?;
    linker.func_wrap(ENV, "proxy_get_shared_data", |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32, _: i32| {
        UNIMPLEMENTED
    })?;
    linker.func_wrap(ENV, "proxy_set_shared_data", |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32, _: i32| {
        UNIMPLEMENTED
    })?;
    linker.func_wrap(ENV, "proxy_register_shared_queue", |_: Caller<'_, State>, _: i32, _: i32, _: i32| UNIMPLEMENTED)?;
    linker.func_wrap(ENV, "proxy_dequeue_shared_queue", |_: Caller<'_, State>, _: i32, _: i32, _: i32| UNIMPLEMENTED)?;
    // Metrics: accepted, and nothing happens.
    linker.func_wrap(ENV, "proxy_define_metric", |mut c: Caller<'_, State>, _kind: i32, _p: i32, _l: i32, id_out: i32| {
        write(&mut c, id_out, &0u32.to_le_bytes())?;
        Ok(OK)
    })?;
    linker.func_wrap(ENV, "proxy_increment_metric", |_: Caller<'_, State>, _id: i32, _by: i64| OK)?;
    // Properties are nginx variables: none of the filter's exist.
    linker.func_wrap(ENV, "proxy_get_property", |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32| NOT_FOUND)?;
    linker.func_wrap(ENV, "proxy_set_property", |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32| BAD_ARGUMENT)?;
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, State>, kind: i32, start: i32, max: i32, ptr_out: i32, size_out: i32| {
            let data = match kind {
                BUFFER_PLUGIN_CONFIGURATION => c.data().plugin_configuration.clone(),
                BUFFER_VM_CONFIGURATION => Vec::new(),
                _ => return Ok(BAD_ARGUMENT),
            };
            let start = (start as u32 as usize).min(data.len());
            let end = start.saturating_add(max as u32 as usize).min(data.len());
            let slice = data[start..end].to_vec();
            if slice.is_empty() {
                return Ok(NOT_FOUND);
            }
            return_bytes(&mut c, &slice, ptr_out, size_out)
        },
    )?;
    linker.func_wrap(ENV, "proxy_get_header_map_pairs", |mut c: Caller<'_, State>, map: i32, ptr_out: i32, size_out: i32| {
        if map != MAP_REQUEST_HEADERS {
            return Ok(BAD_ARGUMENT);
        }
        let pairs = serialize_map(&c.data().request_headers);
        return_bytes(&mut c, &pairs, ptr_out, size_out)
    })?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, State>, map: i32, kptr: i32, klen: i32, ptr_out: i32, size_out: i32| {
            if map != MAP_REQUEST_HEADERS {
                return Ok(BAD_ARGUMENT);
            }
            let key = read_string(&mut c, kptr, klen)?.to_ascii_lowercase();
            let value = c.data().request_headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            match value {
                Some(v) => return_bytes(&mut c, v.as_bytes(), ptr_out, size_out),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(ENV, "proxy_remove_header_map_value", |mut c: Caller<'_, State>, map: i32, kptr: i32, klen: i32| {
        if map != MAP_REQUEST_HEADERS {
            return Ok(BAD_ARGUMENT);
        }
        let key = read_string(&mut c, kptr, klen)?.to_ascii_lowercase();
        c.data_mut().request_headers.retain(|(k, _)| *k != key);
        Ok(OK)
    })?;
    for (name, replace) in [("proxy_replace_header_map_value", true), ("proxy_add_header_map_value", false)] {
        linker.func_wrap(
            ENV,
            name,
            move |mut c: Caller<'_, State>, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
                if map != MAP_REQUEST_HEADERS {
                    return Ok(BAD_ARGUMENT);
                }
                let key = read_string(&mut c, kptr, klen)?.to_ascii_lowercase();
                let value = read_string(&mut c, vptr, vlen)?;
                let headers = &mut c.data_mut().request_headers;
                if replace {
                    headers.retain(|(k, _)| *k != key);
                }
                headers.push((key, value));
                Ok(OK)
            },
        )?;
    }
    linker.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_, State>,
         status: i32,
         _dptr: i32,
         _dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         _grpc: i32| {
            let body = String::from_utf8_lossy(&read(&mut c, bptr, blen)?).into_owned();
            let headers = deserialize_map(&read(&mut c, hptr, hlen)?);
            c.data_mut().local_response = Some((status, headers, body));
            Ok(OK)
        },
    )?;
    linker.func_wrap(ENV, "proxy_continue_stream", |_: Caller<'_, State>, _stream: i32| OK)?;
    linker.func_wrap(ENV, "proxy_close_stream", |_: Caller<'_, State>, _stream: i32| OK)?;
    linker.func_wrap(ENV, "proxy_set_effective_context", |_: Caller<'_, State>, _context: i32| OK)?;
    linker.func_wrap(ENV, "proxy_done", |_: Caller<'_, State>| OK)?;
    // The filter probes for callouts with an empty upstream at configure; nothing is dispatched
    // with an inline key set, so a real callout fails the run.
    linker.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: Caller<'_, State>, uptr: i32, ulen: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            match read_string(&mut c, uptr, ulen)?.as_str() {
                "" => Ok(BAD_ARGUMENT),
                upstream => Err(trap(format!("unexpected HTTP callout to {upstream}"))),
            }
        },
    )?;
    let unexpected = |name: &str| trap(format!("unexpected host call {name}"));
    linker.func_wrap(ENV, "proxy_get_status", move |_: Caller<'_, State>, _: i32, _: i32, _: i32| -> Result<i32, Trap> {
        Err(unexpected("proxy_get_status"))
    })?;
    linker.func_wrap(ENV, "proxy_set_header_map_pairs", move |_: Caller<'_, State>, _: i32, _: i32, _: i32| -> Result<i32, Trap> {
        Err(unexpected("proxy_set_header_map_pairs"))
    })?;
    linker.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        move |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32, _: i32| -> Result<i32, Trap> {
            Err(unexpected("proxy_set_buffer_bytes"))
        },
    )?;
    linker.func_wrap(ENV, "proxy_grpc_send", |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32| UNIMPLEMENTED)?;
    linker.func_wrap(ENV, "proxy_grpc_cancel", |_: Caller<'_, State>, _: i32| UNIMPLEMENTED)?;
    linker.func_wrap(ENV, "proxy_grpc_close", |_: Caller<'_, State>, _: i32| UNIMPLEMENTED)?;
    // wasm-nginx-module defines it and answers Unimplemented (ngx_http_wasm_api.c).
    linker.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |_: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| UNIMPLEMENTED,
    )?;

    // WASI: the clock is the test's.
    linker.func_wrap(WASI, "clock_time_get", |mut c: Caller<'_, State>, _id: i32, _precision: i64, out: i32| {
        let now = c.data().now_nanos;
        write(&mut c, out, &now.to_le_bytes())?;
        Ok(0)
    })?;
    linker.func_wrap(WASI, "random_get", |mut c: Caller<'_, State>, ptr: i32, len: i32| {
        let mut bytes = Vec::with_capacity(len as u32 as usize);
        while bytes.len() < len as u32 as usize {
            let state = &mut c.data_mut().rng;
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            bytes.push(*state as u8);
        }
        write(&mut c, ptr, &bytes)?;
        Ok(0)
    })?;
    linker.func_wrap(WASI, "fd_write", |mut c: Caller<'_, State>, _fd: i32, iovs: i32, count: i32, written_out: i32| {
        let mut text = Vec::new();
        for i in 0..count {
            let iov = read(&mut c, iovs + i * 8, 8)?;
            let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
            let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            text.extend(read(&mut c, ptr, len)?);
        }
        let written = text.len() as u32;
        c.data_mut().logs.push(String::from_utf8_lossy(&text).trim_end().to_string());
        write(&mut c, written_out, &written.to_le_bytes())?;
        Ok(0)
    })?;
    linker.func_wrap(WASI, "environ_sizes_get", |mut c: Caller<'_, State>, count_out: i32, size_out: i32| {
        write(&mut c, count_out, &0u32.to_le_bytes())?;
        write(&mut c, size_out, &0u32.to_le_bytes())?;
        Ok(0)
    })?;
    linker.func_wrap(WASI, "environ_get", |_: Caller<'_, State>, _: i32, _: i32| 0)?;
    linker.func_wrap(WASI, "proc_exit", |_: Caller<'_, State>, code: i32| -> Result<(), Trap> {
        Err(trap(format!("proc_exit({code})")))
    })?;
    Ok(())
}

/// One VM (one nginx worker) with its root context configured.
struct Vm {
    store: Store<State>,
    instance: Instance,
    next_context: i32,
}

impl Vm {
    fn start(engine: &Engine, module: &Module, linker: &Linker<State>, policy: &str, now: i64) -> Result<Vm, String> {
        let state = State {
            plugin_configuration: policy.as_bytes().to_vec(),
            now_nanos: now as u64 * 1_000_000_000 + 250_000_000,
            rng: 0x2545_f491_4f6c_dd1d,
            logs: Vec::new(),
            request_headers: Vec::new(),
            local_response: None,
        };
        let mut store = Store::new(engine, state);
        let instance = linker.instantiate(&mut store, module).map_err(|e| format!("instantiate: {e}"))?;
        let mut vm = Vm { store, instance, next_context: ROOT_CONTEXT + 1 };
        vm.call::<(), ()>("_initialize", ())?;
        vm.call::<(i32, i32), ()>("proxy_on_context_create", (ROOT_CONTEXT, 0))?;
        let started = vm.call::<(i32, i32), i32>("proxy_on_vm_start", (ROOT_CONTEXT, 0))?;
        let configured = vm.call::<(i32, i32), i32>("proxy_on_configure", (ROOT_CONTEXT, policy.len() as i32))?;
        if started == 0 || configured == 0 {
            return Err(format!("refused its configuration: {}", vm.store.data().logs.join(" | ")));
        }
        Ok(vm)
    }

    fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(&mut self, name: &str, params: P) -> Result<R, String> {
        let func: TypedFunc<P, R> =
            self.instance.get_typed_func(&mut self.store, name).map_err(|e| format!("export {name}: {e}"))?;
        func.call(&mut self.store, params).map_err(|e| format!("{name} trapped: {e}"))
    }

    /// One request through the filter: `Ok(None)` when it continued upstream (with the headers
    /// then in `request_headers`), `Ok(Some(status))` when the filter answered.
    fn request(&mut self, token: Option<&str>) -> Result<Option<i32>, String> {
        let context = self.next_context;
        self.next_context += 1;
        let mut headers: Headers = vec![
            (":method".into(), "GET".into()),
            (":path".into(), "/invoices/7".into()),
            (":authority".into(), "api".into()),
            ("x-request-id".into(), format!("r-{context}")),
        ];
        if let Some(token) = token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        let count = headers.len() as i32;
        {
            let state = self.store.data_mut();
            state.request_headers = headers;
            state.local_response = None;
            state.logs.clear();
        }
        self.call::<(i32, i32), ()>("proxy_on_context_create", (context, ROOT_CONTEXT))?;
        let action = self.call::<(i32, i32, i32), i32>("proxy_on_request_headers", (context, count, 1))?;
        self.call::<i32, i32>("proxy_on_done", context)?;
        self.call::<i32, ()>("proxy_on_log", context)?;
        self.call::<i32, ()>("proxy_on_delete", context)?;
        match (&self.store.data().local_response, action) {
            (Some((status, _, _)), _) => Ok(Some(*status)),
            (None, 0) => Ok(None),
            (None, other) => Err(format!("paused the request (action {other}) without answering it")),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.store.data().request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The decision table at Unix time `now` on a fresh VM: the failures, if any.
fn decisions(engine: &Engine, module: &Module, linker: &Linker<State>, fixture: &HashMap<String, String>, now: i64) -> Vec<String> {
    let mut failures = Vec::new();
    let mut vm = match Vm::start(engine, module, linker, &fixture["policy"], now) {
        Ok(vm) => vm,
        Err(e) => return vec![e],
    };
    fn expect(failures: &mut Vec<String>, name: &str, token: Option<&str>, want: Option<i32>, vm: &mut Vm) -> bool {
        match vm.request(token) {
            Ok(got) if got == want => true,
            Ok(got) => {
                failures.push(format!("{name}: {got:?} (want {want:?}); logs: {}", vm.store.data().logs.join(" | ")));
                false
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                false
            }
        }
    }
    if expect(&mut failures, "valid token", Some(&fixture["valid"]), None, &mut vm) {
        let time = format!("\"time\":{now}");
        let audit = vm.store.data().logs.iter().find(|l| l.starts_with("agentgate audit ")).cloned().unwrap_or_default();
        if !audit.contains(&time) {
            failures.push(format!("valid token: no audit record with {time}: {audit:?}"));
        }
        if vm.header("x-agent-id") != Some("agent-7") || vm.header("x-agent-rule") != Some("read-invoice") {
            failures.push(format!("valid token: audit headers missing: {:?}", vm.store.data().request_headers));
        }
        if vm.header("authorization").is_some() {
            failures.push("valid token: the Authorization header reached the upstream".into());
        }
    }
    // A VM that trapped stays broken in nginx: each case after a trap gets a fresh one here,
    // so every failure is its own.
    if !failures.is_empty() {
        if let Ok(fresh) = Vm::start(engine, module, linker, &fixture["policy"], now) {
            vm = fresh;
        }
    }
    expect(&mut failures, "expired token", Some(&fixture["expired"]), Some(401), &mut vm);
    expect(&mut failures, "wrong scope", Some(&fixture["wrong_scope"]), Some(403), &mut vm);
    expect(&mut failures, "no token", None, Some(401), &mut vm);
    failures
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (wasm, fixture_path) = match (args.get(0), args.get(1)) {
        (Some(w), Some(f)) => (w.clone(), f.clone()),
        _ => anyhow::bail!("usage: agentgate-wasmtime-038 MODULE FIXTURE [--quick]"),
    };
    let quick = args.iter().any(|a| a == "--quick");
    let fixture: HashMap<String, String> = std::fs::read_to_string(&fixture_path)?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for key in ["from", "to", "policy", "valid", "expired", "wrong_scope"] {
        anyhow::ensure!(fixture.contains_key(key), "{fixture_path}: no {key}");
    }
    let (from, to): (i64, i64) = (fixture["from"].parse()?, fixture["to"].parse()?);

    let mut clocks: Vec<i64> = if quick {
        (0..=20).map(|k| from + 100 * k).collect()
    } else {
        let mut c: Vec<i64> = (from..=to).step_by(100).collect();
        c.extend(from + 5600..from + 5800);
        c
    };
    clocks.push(1_796_005_715);
    clocks.sort_unstable();
    clocks.dedup();
    anyhow::ensure!(clocks.iter().all(|t| (from..=to).contains(t)), "clock values outside the fixture's window");

    let started = std::time::Instant::now();
    let engine = Engine::default();
    let module = Module::from_file(&engine, &wasm)?;
    let compiled = started.elapsed();
    let mut linker = Linker::new(&engine);
    define_imports(&mut linker)?;

    let (mut passed, mut failed) = (0usize, 0usize);
    for &now in &clocks {
        let failures = decisions(&engine, &module, &linker, &fixture, now);
        if failures.is_empty() {
            passed += 1;
        } else {
            failed += 1;
            if failed <= 10 {
                for f in &failures {
                    let f: String = f.chars().take(400).collect();
                    println!("t={now}: {f}");
                }
            }
        }
    }
    println!(
        "wasmtime 0.38.1, {wasm}: decision table at {} clock values ({}..={}); compile {:.1?}, total {:.1?}",
        clocks.len(),
        clocks.first().copied().unwrap_or(0),
        clocks.last().copied().unwrap_or(0),
        compiled,
        started.elapsed()
    );
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
