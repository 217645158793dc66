//! `make soak`: agentgate in a real Envoy 1.40 (two workers) under wrk at full rate for
//! SOAK_SECONDS (default 600; `make test` runs 30), with a fixed mix of request classes, each
//! with the statuses it may get, while the identity provider rotates keys, fails, hangs and
//! serves garbage, and the policy is pushed again and again (ECDS from a watched file).
//!
//! wrk runs in chunks of a few seconds (test-harness/soak/soak.lua), each giving requests/s,
//! p99 and per-class status counts; Envoy's RSS and stats are sampled every 2 s. Passes when no
//! request got a status outside its class's set (none of a refused class was let through), no
//! 5xx, no socket errors, no VM failure in Envoy's log, and RSS flat after warm-up. Writes
//! target/soak/results.json and target/soak/soak.png (matplotlib, test-harness/soak/plot.py).

use agentgate_test_harness::envoy::{scratch_dir, workspace_root, Envoy};
use agentgate_test_harness::fleet::{render, write_filter_config, FILTER_FILE};
use agentgate_test_harness::idp::{Behaviour, Idp};
use agentgate_test_harness::tokens::{now, Signer, AUDIENCE, ISSUER};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The single-use provider's issuer (inline keys: no identity provider involved).
const ONCE_ISSUER: &str = "https://once.example.com";
const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 32;
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// A class of requests: what it sends and which statuses it may get.
struct Class {
    name: String,
    weight: u32,
    expect: Vec<u16>,
    /// For allowed answers: the agent the upstream must have been told (`x-agent-id`).
    agent: Option<&'static str>,
    /// Raw HTTP/1.1 requests, sent in turn; empty for a pooled class (fresh tokens per chunk).
    requests: Vec<String>,
}

impl Class {
    fn new(name: &str, weight: u32, expect: &[u16], agent: Option<&'static str>, requests: Vec<String>) -> Class {
        Class { name: name.to_string(), weight, expect: expect.to_vec(), agent, requests }
    }

    /// Refused: no allowed status is expected.
    fn refused(&self) -> bool {
        self.expect.iter().all(|s| !(200..300).contains(s))
    }
}

/// A raw request of `class`.
fn raw(class: &str, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: api.example.com\r\nx-soak-class: {class}\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("Authorization", format!("Bearer {token}"))]
}

fn claims(iss: &str, sub: &str, scope: &str, iat: i64, exp: i64, jti: &str) -> Value {
    json!({"iss": iss, "aud": AUDIENCE, "sub": sub, "scope": scope, "iat": iat, "exp": exp, "jti": jti})
}

/// A Lua string literal: any bytes, escaped.
fn lua_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for b in text.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

fn lua_list(items: &[String]) -> String {
    format!("{{{}}}", items.iter().map(|r| lua_string(r)).collect::<Vec<_>>().join(",\n"))
}

struct Keys {
    /// Always published: hot and never-seen tokens.
    a: Signer,
    /// Published in some phases only (a key that rotates in and out).
    r: Signer,
    /// Never published.
    x: Signer,
    /// Kid `key-a`, another key: forged.
    forged: Signer,
    /// The single-use provider's key (inline in the policy).
    once: Signer,
}

fn policy(idp_port: u16, once: &Signer, flip_revoked: bool) -> String {
    let mut revoked = vec!["agent-revoked"];
    if flip_revoked {
        revoked.push("agent-flip");
    }
    json!({
        "providers": [
            {"name": "corp-idp", "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
             "jwks_uri": format!("http://127.0.0.1:{idp_port}/keys"), "cluster": "idp",
             "jwks_fetch": {"refresh_seconds": 2, "max_stale_seconds": 3600, "min_refetch_seconds": 1,
                            "timeout_ms": 500, "wait_ms": 300}},
            {"name": "once", "issuer": ONCE_ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"],
             "jwks": once.jwks(), "single_use": true, "max_lifetime_seconds": 3600}
        ],
        "revoked": {"subjects": revoked},
        // Audit records at debug: Envoy logs wasm at info, so the soak's log stays small.
        "audit": {"log_level": "debug"},
        "rules": [
            {"name": "approve", "match": {"methods": ["POST"], "path": "/invoices/{id}/approve"},
             "require": {"scopes": ["invoices:approve"]}},
            {"name": "read", "match": {"methods": ["GET"], "path": "/invoices/{*rest}"},
             "require": {"scopes": ["invoices:read"]}},
            {"name": "admin", "match": {"path": "/admin/{*rest}"}, "require": {"scopes": ["admin"]}},
            {"name": "public", "match": {"path": "/public/{*rest}"}},
            {"name": "limited", "match": {"methods": ["GET"], "path": "/limited/{id}"},
             "rate_limit": {"requests": 1, "per_seconds": 86400}},
            {"name": "mcp-read", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "read_*"}},
             "require": {"scopes": ["invoices:read"]}},
            {"name": "mcp-pay", "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "pay_invoice"}},
             "require": {"scopes": ["invoices:pay"]}}
        ]
    })
    .to_string()
}

fn mcp_call(tool: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": tool, "arguments": {"invoice_id": "42"}}})
    .to_string()
}

/// The fixed classes, and the single-use tokens the runner spends before the load (their
/// replays are a class).
fn classes(keys: &Keys, until: i64) -> (Vec<Class>, Vec<String>) {
    let t = now();
    let read = "invoices:read";
    let hot: Vec<String> =
        (0..4).map(|i| keys.a.sign(&claims(ISSUER, "agent-hot", read, t, until, &format!("hot-{i}")))).collect();
    let get = |class: &str, path: &str, token: &str| raw(class, "GET", path, &bearer(token), "");
    let each = |class: &str, tokens: &[String]| tokens.iter().map(|tk| get(class, "/invoices/42", tk)).collect();
    let mint = |signer: &Signer, sub: &str, iat: i64, exp: i64, n: usize| -> Vec<String> {
        (0..n).map(|i| signer.sign(&claims(ISSUER, sub, read, iat, exp, &format!("{sub}-{i}")))).collect()
    };
    let spent: Vec<String> = (0..64)
        .map(|i| keys.once.sign(&claims(ONCE_ISSUER, "agent-once", read, t, until, &format!("spent-{t}-{i}"))))
        .collect();
    let greedy = keys.a.sign(&claims(ISSUER, "agent-greedy", read, t, until, "greedy"));
    let mut hostile = bearer(&hot[0]);
    hostile.extend([
        ("x-agent-id", "root".to_string()),
        ("X_Agent_Id", "root".to_string()),
        ("X-AGENT-DECISION", "allow".to_string()),
        ("x-agent-on-behalf-of", "ceo".to_string()),
        ("x-forwarded-for", "10.0.0.1".to_string()),
    ]);
    let mut two = bearer(&hot[0]);
    two.extend(bearer(&hot[1]));
    let mut list = vec![
        Class::new("hot", 30, &[200], Some("agent-hot"), each("hot", &hot)),
        Class::new("never_seen", 3, &[200], Some("agent-new"), Vec::new()),
        // Its key comes and goes with the identity provider's phases.
        Class::new(
            "rotating_kid",
            2,
            &[200, 401],
            Some("agent-rot"),
            each("rotating_kid", &mint(&keys.r, "agent-rot", t, until, 4)),
        ),
        Class::new("unknown_kid", 2, &[401], None, each("unknown_kid", &mint(&keys.x, "agent-x", t, until, 4))),
        Class::new("expired", 3, &[401], None, each("expired", &mint(&keys.a, "agent-old", t - 900, t - 600, 4))),
        Class::new("forged", 3, &[401], None, each("forged", &mint(&keys.forged, "agent-hot", t, until, 4))),
        Class::new("revoked", 3, &[403], None, each("revoked", &mint(&keys.a, "agent-revoked", t, until, 4))),
        // Revoked and released by the policy pushes.
        Class::new(
            "revoked_flip",
            3,
            &[200, 403],
            Some("agent-flip"),
            each("revoked_flip", &mint(&keys.a, "agent-flip", t, until, 4)),
        ),
        Class::new("single_use", 2, &[200], Some("agent-once"), Vec::new()),
        Class::new("replayed", 3, &[401], None, spent.iter().map(|tk| get("replayed", "/invoices/42", tk)).collect()),
        Class::new("rate_limited", 3, &[429], None, vec![get("rate_limited", "/limited/1", &greedy)]),
        Class::new(
            "hostile_headers",
            3,
            &[200],
            Some("agent-hot"),
            vec![raw("hostile_headers", "GET", "/invoices/42", &hostile, "")],
        ),
        // Envoy hands the filter both values joined by a comma: one malformed token.
        Class::new(
            "two_authorizations",
            1,
            &[401],
            None,
            vec![raw("two_authorizations", "GET", "/invoices/42", &two, "")],
        ),
        Class::new("no_token", 1, &[401], None, vec![raw("no_token", "GET", "/invoices/42", &[], "")]),
        Class::new(
            "alg_none",
            1,
            &[401],
            None,
            vec![get("alg_none", "/invoices/42", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZ2VudC1ob3QifQ.")],
        ),
        Class::new("oversized", 1, &[401], None, vec![get("oversized", "/invoices/42", &"A".repeat(9000))]),
    ];
    // Spellings that reach a rule the token does not satisfy (403) or that the gate cannot
    // bring to one form (400); tests/bypass.rs has them all.
    let paths: [(&str, &str, &str, u16); 8] = [
        ("path_encoded_approve", "POST", "/invoices/42/%61pprove", 403),
        ("path_case_approve", "POST", "/Invoices/42/APPROVE", 403),
        ("path_case_admin", "GET", "/ADMIN/users", 403),
        // Envoy resolves `..;` as a dot segment first: the admin rule refuses it.
        ("path_dot_params", "GET", "/public/..;/admin/users", 403),
        ("path_double_encoded", "GET", "/public/%252e%252e/admin/users", 400),
        ("path_segment_params", "GET", "/admin;x/users", 400),
        ("path_overlong_dots", "GET", "/public/%c0%ae%c0%ae/admin/users", 400),
        ("path_fullwidth", "POST", "/invoices/42/%EF%BD%81pprove", 400),
    ];
    // MCP bodies, read by the gate (Envoy needs allow_on_headers_stop_iteration for that).
    list.extend([
        Class::new("mcp_allowed", 2, &[200], Some("agent-hot"), vec![raw("mcp_allowed", "POST", "/mcp", &bearer(&hot[2]), &mcp_call("read_invoice"))]),
        Class::new("mcp_denied", 2, &[403], None, vec![raw("mcp_denied", "POST", "/mcp", &bearer(&hot[2]), &mcp_call("pay_invoice"))]),
        Class::new("mcp_duplicate_key", 1, &[400], None, vec![raw(
        "mcp_duplicate_key", "POST", "/mcp", &bearer(&hot[3]),
        r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"read_invoice","name":"pay_invoice"}}"#,
        )]),
    ]);
    for (name, method, path, status) in paths {
        list.push(Class::new(name, 1, &[status], None, vec![raw(name, method, path, &bearer(&hot[1]), "")]));
    }
    (list, spent)
}

/// Fresh tokens for one chunk: never-seen ones (verified for the first time) and single-use
/// ones (each sent once).
fn write_pool(dir: &Path, chunk: usize, keys: &Keys, count: usize, until: i64) -> Result<(), String> {
    let t = now();
    let never_seen: Vec<String> = (0..count)
        .map(|i| {
            let token =
                keys.a.sign(&claims(ISSUER, "agent-new", "invoices:read", t, until, &format!("new-{chunk}-{i}-{t}")));
            raw("never_seen", "GET", "/invoices/42", &bearer(&token), "")
        })
        .collect();
    let single_use: Vec<String> = (0..count)
        .map(|i| {
            // Expiries spread over 10 minutes: the replay store's buckets are per 20 s of expiry.
            let exp = until.min(t + 3000) - (i % 600) as i64;
            let token = keys.once.sign(&claims(
                ONCE_ISSUER,
                "agent-once",
                "invoices:read",
                t,
                exp,
                &format!("once-{chunk}-{i}-{t}"),
            ));
            raw("single_use", "GET", "/invoices/42", &bearer(&token), "")
        })
        .collect();
    let text =
        format!("return {{\nnever_seen = {},\nsingle_use = {}\n}}\n", lua_list(&never_seen), lua_list(&single_use));
    std::fs::write(dir.join(format!("pool-{chunk}.lua")), text).map_err(|e| e.to_string())
}

fn write_classes(dir: &Path, classes: &[Class]) -> Result<(), String> {
    let mut text = String::from("return {\n");
    for c in classes {
        let expect: Vec<String> = c.expect.iter().map(u16::to_string).collect();
        text.push_str(&format!(
            "{{ name = {}, weight = {}, expect = {{{}}}, agent = {}, requests = {} }},\n",
            lua_string(&c.name),
            c.weight,
            expect.join(","),
            c.agent.map_or("nil".to_string(), lua_string),
            lua_list(&c.requests)
        ));
    }
    text.push_str("}\n");
    std::fs::write(dir.join("classes.lua"), text).map_err(|e| e.to_string())
}

/// Sends one raw request on its own connection; the status of the answer (0: none within 5 s).
fn send(envoy: &Envoy, request: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", envoy.port)) else { return 0 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    // The status line is enough (Envoy keeps the connection open).
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

#[derive(Default)]
struct Totals {
    /// Per class: status -> count.
    statuses: BTreeMap<String, BTreeMap<String, u64>>,
    wrong: BTreeMap<String, u64>,
    wraps: BTreeMap<String, u64>,
    samples: Vec<String>,
    errors: BTreeMap<&'static str, u64>,
}

struct Chunk {
    t: f64,
    seconds: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Reads one chunk's output (soak.lua's `done`) into `totals`.
fn read_chunk(text: &str, totals: &mut Totals, t: f64) -> Option<Chunk> {
    let mut chunk = None;
    let mut latency = (0.0, 0.0, 0.0);
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match f.first().copied() {
            Some("summary") => {
                for (i, name) in ["connect", "read", "write", "status", "timeout"].into_iter().enumerate() {
                    *totals.errors.entry(name).or_default() += num(3 + i) as u64;
                }
                chunk = Some((num(1) / 1e6, num(2) as u64));
            }
            Some("latency") => latency = (num(1) / 1e3, num(2) / 1e3, num(4) / 1e3),
            Some("count") if f.len() == 4 => {
                let (key, class, n) = (f[1], f[2].to_string(), num(3) as u64);
                match key {
                    "wrong" => *totals.wrong.entry(class).or_default() += n,
                    "wraps" => *totals.wraps.entry(class).or_default() += n,
                    status => *totals.statuses.entry(class).or_default().entry(status.to_string()).or_default() += n,
                }
            }
            Some("sample") if totals.samples.len() < 40 => totals.samples.push(f[1..].join(" ")),
            _ => {}
        }
    }
    let (seconds, requests) = chunk?;
    Some(Chunk { t, seconds, requests, p50_ms: latency.0, p99_ms: latency.1, max_ms: latency.2 })
}

/// One sample of Envoy: seconds into the run, RSS (MiB), the watched stats.
type Sample = (f64, f64, BTreeMap<String, f64>);

/// VmRSS of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The stats the soak watches, from Envoy's admin interface.
fn stats(envoy: &Envoy) -> BTreeMap<String, f64> {
    let text = envoy.admin("/stats").body;
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| {
            [
                "wasmcustom.agentgate.",
                "wasm.",
                "server.memory",
                "cluster.idp.upstream_rq_total",
                "http.agents.downstream_rq_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
        .collect()
}

fn main() {
    let seconds = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(600u64);
    match run(seconds) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("soak FAILED (see above and target/soak/)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("soak could not run: {e}");
            std::process::exit(2);
        }
    }
}

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

fn run(seconds: u64) -> Result<bool, String> {
    let out = workspace_root().join("target/soak");
    let data = out.join("data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let keys = Keys {
        a: Signer::es256("key-a", 1),
        r: Signer::es256("key-r", 2),
        x: Signer::es256("key-x", 3),
        forged: Signer::es256("key-a", 4),
        once: Signer::es256("once-1", 5),
    };
    let until = now() + seconds as i64 + 900;
    let idp = Idp::start(Behaviour::Serve(jwks(&[&keys.a, &keys.r])));
    let filter_dir = scratch_dir();
    let version = 1;
    write_filter_config(&filter_dir, version, &policy(idp.port, &keys.once, false));
    let config = render(
        "soak.yaml",
        &[
            ("LISTEN_PORT", "0".to_string()),
            ("ADMIN_PORT", "0".to_string()),
            ("IDP_PORT", idp.port.to_string()),
            ("FILTER_CONFIG", filter_dir.join(FILTER_FILE).display().to_string()),
            ("FILTER_CONFIG_DIR", filter_dir.display().to_string()),
        ],
    );
    let envoy = Envoy::start_config_with(&config, 2)?;
    let (classes, spent) = classes(&keys, until);
    write_classes(&data, &classes)?;

    // Before the load: the first keys fetched (a loaded machine may take longer than wait_ms),
    // single-use tokens spent once, the greedy agent's one request used,
    // and every fixed class answering as expected.
    let hot = classes.first().and_then(|c| c.requests.first()).ok_or("no hot class")?;
    let ready = Instant::now();
    while send(&envoy, hot) != 200 {
        if ready.elapsed() > Duration::from_secs(15) {
            return Err(format!("no keys fetched within 15 s:\n{}", envoy.logs()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for token in &spent {
        let status = send(&envoy, &raw("spend", "GET", "/invoices/42", &bearer(token), ""));
        if status != 200 {
            return Err(format!("spending a single-use token got {status}:\n{}", envoy.logs()));
        }
    }
    let greedy = classes
        .iter()
        .find(|c| c.name == "rate_limited")
        .and_then(|c| c.requests.first())
        .ok_or("no rate_limited class")?;
    match send(&envoy, greedy) {
        200 => {}
        status => return Err(format!("the rate-limited agent's first request got {status}")),
    }
    let mut mismatches = Vec::new();
    for class in &classes {
        if let Some(request) = class.requests.first() {
            // At start a worker may not have adopted the keys another fetched yet (SOAK.md).
            let mut status = send(&envoy, request);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !class.expect.contains(&status) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                status = send(&envoy, request);
            }
            if !class.expect.contains(&status) {
                mismatches.push(format!(
                    "class {} answers {status} before the load, expected {:?}",
                    class.name, class.expect
                ));
            }
        }
    }
    if !mismatches.is_empty() {
        let denied: Vec<String> = stats(&envoy)
            .into_iter()
            .filter(|(k, v)| k.contains("denied.") && *v > 0.0)
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        return Err(format!("{}\n{}", mismatches.join("\n"), denied.join("\n")));
    }
    let total_weight: u32 = classes.iter().map(|c| c.weight).sum();
    let pooled_share = 3.0 / f64::from(total_weight);

    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let events: Mutex<Vec<(f64, String)>> = Mutex::default();
    let samples: Mutex<Vec<Sample>> = Mutex::default();
    let pid = envoy.pid();
    let mut totals = Totals::default();
    let mut chunks: Vec<Chunk> = Vec::new();
    let chunk_seconds: u64 = if seconds >= 120 { 5 } else { 3 };
    let script = workspace_root().join("test-harness/soak/soak.lua");
    let port = envoy.port;
    let base_idp_requests = idp.requests();

    std::thread::scope(|scope| -> Result<(), String> {
        // Samples Envoy's memory and stats.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let entry = (start.elapsed().as_secs_f64(), rss_mib(pid), stats(&envoy));
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        // The faults: one cycle of six phases of the identity provider (a minute, or the
        // whole run when shorter), and policy pushes that revoke and release agent-flip.
        scope.spawn(|| {
            let cycle = seconds.min(60) as f64;
            let phase_len = cycle / 6.0;
            let mut phase = 0usize;
            let mut flipped = false;
            let mut version = version;
            while !stop.load(Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                let (round, index) = ((t / cycle) as usize, ((t % cycle) / phase_len) as usize);
                let current = round * 6 + index;
                if current != phase || t < 0.05 {
                    phase = current;
                    let new_kid = Signer::es256(&format!("key-n{round}"), 100 + round as u64);
                    let (behaviour, what) = match index {
                        0 => (Behaviour::Serve(jwks(&[&keys.a, &keys.r])), "IdP serves a+r".to_string()),
                        1 => (Behaviour::Fail(503), "IdP answers 503".to_string()),
                        2 => (
                            Behaviour::Slow(Duration::from_secs(3), jwks(&[&keys.a, &keys.r])),
                            "IdP hangs (3 s)".to_string(),
                        ),
                        3 => (Behaviour::Garbage, "IdP serves garbage".to_string()),
                        4 => (
                            Behaviour::Serve(jwks(&[&new_kid, &keys.a])),
                            format!("IdP rotates: a+n{round}, r withdrawn"),
                        ),
                        _ => (Behaviour::Serve(jwks(&[&keys.a, &keys.r, &new_kid])), "IdP recovers: a+r+n".to_string()),
                    };
                    idp.set(behaviour);
                    let mut log = events.lock().unwrap_or_else(|e| e.into_inner());
                    log.push((t, what));
                    // A push during the outage, one after the rotation, one after recovery.
                    if matches!(index, 1 | 4 | 5) && t > 0.05 {
                        flipped = !flipped;
                        version += 1;
                        write_filter_config(&filter_dir, version, &policy(idp.port, &keys.once, flipped));
                        log.push((
                            t,
                            format!("policy v{version}: agent-flip {}", if flipped { "revoked" } else { "released" }),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let result = (|| -> Result<(), String> {
            let mut rate = 8000.0;
            let mut chunk = 0;
            while start.elapsed().as_secs() + 1 < seconds {
                let chunk_seconds = chunk_seconds.min(seconds.saturating_sub(start.elapsed().as_secs())).max(1);
                let pool = (rate * chunk_seconds as f64 * pooled_share * 2.0) as usize + 200;
                write_pool(&data, chunk, &keys, pool, until)?;
                let t = start.elapsed().as_secs_f64();
                let result_file = data.join(format!("out-{chunk}.tsv"));
                let wrk = Command::new("wrk")
                    .args([
                        format!("-t{WRK_THREADS}"),
                        format!("-c{WRK_CONNECTIONS}"),
                        format!("-d{chunk_seconds}s"),
                        "--timeout".into(),
                        "5s".into(),
                        "-s".into(),
                    ])
                    .arg(&script)
                    .arg(format!("http://127.0.0.1:{port}"))
                    .arg("--")
                    .arg(&data)
                    .arg(chunk.to_string())
                    .arg(WRK_THREADS.to_string())
                    .arg(&result_file)
                    .output()
                    .map_err(|e| format!("cannot run wrk (`make wrk` installs it): {e}"))?;
                let text = std::fs::read_to_string(&result_file).unwrap_or_default();
                let parsed = read_chunk(&text, &mut totals, t).ok_or_else(|| {
                    format!(
                        "wrk gave no results:\n{}{}",
                        String::from_utf8_lossy(&wrk.stdout),
                        String::from_utf8_lossy(&wrk.stderr)
                    )
                })?;
                rate = parsed.requests as f64 / parsed.seconds.max(0.1);
                eprintln!("[{:>5.0} s] {:>7.0} req/s  p99 {:>6.2} ms", t, rate, parsed.p99_ms);
                chunks.push(parsed);
                let _ = std::fs::remove_file(data.join(format!("pool-{chunk}.lua")));
                chunk += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;

    report(
        &out,
        seconds,
        &envoy,
        &idp,
        base_idp_requests,
        &classes,
        &totals,
        &chunks,
        &samples.into_inner().unwrap_or_default(),
        &events.into_inner().unwrap_or_default(),
    )
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    out: &Path,
    seconds: u64,
    envoy: &Envoy,
    idp: &Idp,
    base_idp_requests: usize,
    classes: &[Class],
    totals: &Totals,
    chunks: &[Chunk],
    samples: &[Sample],
    events: &[(f64, String)],
) -> Result<bool, String> {
    let mut failures: Vec<String> = Vec::new();
    println!("\n| class | expected | requests | statuses | wrong |\n|---|---|---|---|---|");
    let mut fives = 0;
    for class in classes {
        let statuses = totals.statuses.get(&class.name).cloned().unwrap_or_default();
        let count: u64 = statuses.values().sum();
        fives += statuses.iter().filter(|(s, _)| s.starts_with('5')).map(|(_, n)| n).sum::<u64>();
        let wrong = totals.wrong.get(&class.name).copied().unwrap_or(0);
        let list: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let expect: Vec<String> = class.expect.iter().map(u16::to_string).collect();
        println!("| {} | {} | {count} | {} | {wrong} |", class.name, expect.join(" or "), list.join(", "));
        if wrong > 0 {
            failures.push(format!("{wrong} requests of class {} got an unexpected status", class.name));
        }
        if class.refused() && statuses.keys().any(|s| s.starts_with('2')) {
            failures.push(format!("a request of refused class {} was allowed", class.name));
        }
        if count == 0 {
            failures.push(format!("class {} sent no request", class.name));
        }
    }
    if let Some(untagged) = totals.statuses.get("(untagged)") {
        failures.push(format!("answers without a class: {untagged:?}"));
    }
    for sample in &totals.samples {
        println!("  e.g. {sample}");
    }
    if fives > 0 {
        failures.push(format!("{fives} answers were 5xx"));
    }
    let socket_errors: u64 = totals.errors.iter().filter(|(k, _)| **k != "status").map(|(_, n)| n).sum();
    if socket_errors > 0 {
        failures.push(format!("socket errors: {:?}", totals.errors));
    }
    let reused: u64 = ["never_seen", "single_use"].iter().filter_map(|c| totals.wraps.get(*c)).sum();
    if reused > 0 {
        println!("note: a token pool ran out {reused} times (its turns went to the next class)");
    }

    // Envoy's log: the VM never failed, nothing panicked.
    let logs = envoy.logs();
    let bad: Vec<&str> = logs
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["panicked", "unreachable", "vm failed", "failed to", "abort", "[critical]", "restart"]
                .iter()
                .any(|p| l.contains(p))
        })
        .take(5)
        .collect();
    if !bad.is_empty() {
        failures.push(format!("Envoy's log shows VM trouble:\n{}", bad.join("\n")));
    }
    let mut envoy_alive = true;
    if envoy.admin("/ready").status != 200 {
        envoy_alive = false;
        failures.push("Envoy is not ready after the run".into());
    }

    // Memory after warm-up: the last tenth of the run against the second (for ten minutes:
    // the last minute against the second). A short run only warms up: it must stay within
    // the bound plus what a warm-up can still add.
    let window = |from: f64, to: f64| mean(samples.iter().filter(|s| s.0 >= from && s.0 < to).map(|s| s.1));
    let total = seconds as f64;
    let (second, last) = (window(total / 10.0, total / 5.0), window(total * 0.9, total + 60.0));
    let allowed = if seconds >= 300 { second * 1.10 } else { second * 1.10 + 16.0 };
    println!(
        "\nRSS: {:.1} MiB in the second tenth, {:.1} MiB in the last (limit {:.1}); peak {:.1} MiB",
        second,
        last,
        allowed,
        samples.iter().map(|s| s.1).fold(0.0, f64::max)
    );
    if last > allowed {
        failures.push(format!("RSS grew: {second:.1} -> {last:.1} MiB"));
    }
    // No VM failed and was reloaded, and no VM piled up (Envoy creates, and drops, one more
    // VM for the first pushed configuration).
    let stat = |s: &BTreeMap<String, f64>, name: &str| s.get(name).copied().unwrap_or(0.0);
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let reloads = stat(&last.2, "wasm.agentgate.vm_reload") + stat(&last.2, "wasm.agentgate.vm_reload_failure");
        if reloads > 0.0 {
            failures.push(format!("wasm VM reloads (a VM failed): {reloads}"));
        }
        let active = "wasm.envoy.wasm.runtime.v8.active";
        if stat(&last.2, active) > stat(&first.2, active) {
            failures.push(format!("active wasm VMs grew: {} -> {}", stat(&first.2, active), stat(&last.2, active)));
        }
        println!(
            "wasm VMs active {} -> {}, reloads {reloads}; token cache hits {} / misses {} / shared hits {}",
            stat(&first.2, active),
            stat(&last.2, active),
            stat(&last.2, "wasmcustom.agentgate.token_cache.hit"),
            stat(&last.2, "wasmcustom.agentgate.token_cache.miss"),
            stat(&last.2, "wasmcustom.agentgate.token_cache.shared_hit")
        );
    }

    let requests: u64 = chunks.iter().map(|c| c.requests).sum();
    let busy: f64 = chunks.iter().map(|c| c.seconds).sum();
    let p99 = chunks.iter().map(|c| c.p99_ms).fold(0.0, f64::max);
    let idp_calls = idp.requests().saturating_sub(base_idp_requests);
    println!(
        "{requests} requests in {busy:.0} s ({:.0} req/s); p99 per chunk {:.2}..{p99:.2} ms; identity provider asked {idp_calls} times ({:.1}/s); {} policy pushes",
        requests as f64 / busy.max(1.0),
        chunks.iter().map(|c| c.p99_ms).fold(f64::MAX, f64::min),
        idp_calls as f64 / busy.max(1.0),
        events.iter().filter(|e| e.1.starts_with("policy")).count()
    );

    let result = json!({
        "seconds": seconds,
        "passed": failures.is_empty(),
        "envoy_alive": envoy_alive,
        "requests": requests,
        "idp_requests": idp_calls,
        "chunks": chunks.iter().map(|c| json!({"t": c.t, "seconds": c.seconds, "requests": c.requests,
            "rps": c.requests as f64 / c.seconds.max(0.1), "p50_ms": c.p50_ms, "p99_ms": c.p99_ms, "max_ms": c.max_ms})).collect::<Vec<_>>(),
        "samples": samples.iter().map(|(t, rss, stats)| json!({"t": t, "rss_mib": rss, "stats": stats})).collect::<Vec<_>>(),
        "events": events.iter().map(|(t, what)| json!({"t": t, "what": what})).collect::<Vec<_>>(),
        "classes": classes.iter().map(|c| json!({"name": c.name, "expect": c.expect,
            "statuses": totals.statuses.get(&c.name), "wrong": totals.wrong.get(&c.name).copied().unwrap_or(0)})).collect::<Vec<_>>(),
        "errors": totals.errors,
        "samples_of_wrong": totals.samples,
    });
    let results = out.join("results.json");
    std::fs::write(&results, serde_json::to_string_pretty(&result).unwrap_or_default()).map_err(|e| e.to_string())?;
    let python = workspace_root().join(".venv/bin/python");
    let plot = Command::new(&python)
        .arg(workspace_root().join("test-harness/soak/plot.py"))
        .arg(&results)
        .arg(out.join("soak.png"))
        .status();
    match plot {
        Ok(status) if status.success() => println!("plot: {}", out.join("soak.png").display()),
        _ => failures.push(format!("could not plot with {} (make soak installs matplotlib)", python.display())),
    }
    for failure in &failures {
        println!("FAIL: {failure}");
    }
    Ok(failures.is_empty())
}
