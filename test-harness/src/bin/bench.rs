//! `make bench`: the same Envoy 1.40 (one worker, pinned to core 0) in turn with no filter,
//! a no-op wasm filter, Envoy's native jwt_authn + RBAC, and agentgate, each driven by wrk
//! (pinned to core 1) with ES256, RS256 and EdDSA tokens, hot (one token reused) and cold
//! (every token new); and with two workers (`--concurrency 2`, both on core 0) native and
//! agentgate on replayed tokens (every new token sent twice in a row, so the second copy
//! often lands on the other worker: agentgate's shared verified-token cache, counted by
//! `agentgate.token_cache.shared_hit`). Configurations alternate over rounds; the table
//! shows medians.
//!
//! Environment: BENCH_ROUNDS (default 3), BENCH_SECONDS per run (default 4),
//! BENCH_OUT (a markdown copy of the table, default target/bench/results.md), and to rerun a
//! part: BENCH_ALGS (default `ES256,RS256,EdDSA`), BENCH_PATTERNS (default `hot,cold,replay,mcp`;
//! `replay`: each new token sent twice, with two workers, for the shared verified-token cache;
//! `mcp`: a hot MCP `tools/call` POST with a 1 KiB body, through the no-op filter and
//! through agentgate reading the body and checking an argument).
//! BENCH_DPOP=no skips the DPoP row (ES256 hot token, a new proof per request).

use agentgate_test_harness::envoy::{envoy_binary, filter_wasm, workspace_root};
use agentgate_test_harness::tokens::{Signer, AUDIENCE, ISSUER};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    Passthrough,
    NoopWasm,
    Native,
    Agentgate,
    /// agentgate with a quarantine configured: what watching conduct costs a well-behaved agent.
    AgentgateQuarantine,
    /// The no-op filter, sent the MCP tools/call.
    NoopWasmMcp,
    /// agentgate on an MCP route: the body read, the tool matched, an argument checked.
    AgentgateMcp,
    /// agentgate with every signature verified in wasm: the same module, its foreign
    /// function's name altered so that Envoy does not know it (see `wasm_crypto_module`).
    AgentgateWasmCrypto,
    /// agentgate with a DPoP-bound token (reused) and a new ES256 proof on every request:
    /// what proof of possession costs (a proof signature, its checks, a replay-store write).
    AgentgateDpop,
    /// Native with two workers.
    NativeTwo,
    /// agentgate with two workers: the shared verified-token cache.
    AgentgateTwo,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Passthrough => "no filter",
            Config::NoopWasm => "no-op wasm",
            Config::Native => "jwt_authn+RBAC",
            Config::Agentgate => "agentgate",
            Config::AgentgateQuarantine => "agentgate+quarantine",
            Config::NoopWasmMcp => "no-op wasm+buffer, MCP call",
            Config::AgentgateMcp => "agentgate, MCP call",
            Config::AgentgateWasmCrypto => "agentgate, crypto in wasm",
            Config::AgentgateDpop => "agentgate+DPoP",
            Config::NativeTwo => "jwt_authn+RBAC ×2 workers",
            Config::AgentgateTwo => "agentgate ×2 workers",
        }
    }

    fn workers(self) -> u32 {
        match self {
            Config::NativeTwo | Config::AgentgateTwo => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Pattern {
    Hot,
    Cold,
    /// Every new token sent twice in a row (two workers).
    Replay,
}

struct Sample {
    rps: f64,
    p99_ms: f64,
    requests: u64,
    /// agentgate's token-cache counters after the run: (local misses, shared hits).
    cache: Option<(u64, u64)>,
}

/// Above any cold rate seen here (native RS256 reached 16k/s); a run that goes faster
/// reuses tokens, and says so.
const COLD_TOKENS_PER_SECOND: u64 = 20_000;

/// Whether `item` is in the comma-separated list `name` (everything when unset).
fn selected(name: &str, item: &str) -> bool {
    std::env::var(name).map_or(true, |list| list.split(',').any(|i| i.trim().eq_ignore_ascii_case(item)))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let rounds = env_u64("BENCH_ROUNDS", 3);
    let seconds = env_u64("BENCH_SECONDS", 4);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let all = [Signer::es256("bench-es", 1), Signer::rs256("bench-rs", 2), Signer::eddsa("bench-ed", 3)];
    let jwks = json!({"keys": all.iter().map(Signer::jwk).collect::<Vec<_>>()});
    let signers: Vec<&Signer> = all.iter().filter(|s| selected("BENCH_ALGS", s.alg)).collect();
    let patterns: Vec<Pattern> = [(Pattern::Hot, "hot"), (Pattern::Cold, "cold"), (Pattern::Replay, "replay")]
        .into_iter()
        .filter(|(_, n)| selected("BENCH_PATTERNS", n))
        .map(|(p, _)| p)
        .collect();
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs())
        .unwrap_or(i64::MAX);

    // Cold runs need a token never seen before for every request: enough for the fastest
    // configuration at this length, minted up front on every core.
    let cold_count = usize::try_from(seconds.saturating_mul(COLD_TOKENS_PER_SECOND)).unwrap_or(100_000);
    let started = Instant::now();
    let mut scripts = BTreeMap::new();
    for &signer in &signers {
        let hot = signer.sign(&claims("agent-hot", now));
        let hot_script = dir.join(format!("hot-{}.lua", signer.alg));
        std::fs::write(&hot_script, format!("wrk.headers[\"Authorization\"] = \"Bearer {hot}\"\n"))
            .map_err(|e| e.to_string())?;
        scripts.insert((signer.alg, Pattern::Hot), hot_script);
        if patterns.contains(&Pattern::Cold) || patterns.contains(&Pattern::Replay) {
            let tokens = dir.join(format!("cold-{}.txt", signer.alg));
            let lines = mint(signer, now, cold_count, &tokens)?;
            scripts.insert((signer.alg, Pattern::Cold), cold_script(&dir, signer.alg, "cold", &tokens)?);
            // The same tokens, each twice in a row (half as many distinct ones).
            let replayed = dir.join(format!("replay-{}.txt", signer.alg));
            let twice: Vec<&str> = lines.iter().take(cold_count / 2).flat_map(|t| [t.as_str(), t.as_str()]).collect();
            std::fs::write(&replayed, twice.join("\n") + "\n").map_err(|e| e.to_string())?;
            scripts.insert((signer.alg, Pattern::Replay), cold_script(&dir, signer.alg, "replay", &replayed)?);
        }
    }
    println!("minted {cold_count} cold tokens per algorithm in {:.0?}", started.elapsed());

    let noop = workspace_root().join("dist/noop.wasm");
    let mut results: BTreeMap<(Config, &str, Pattern), Vec<Sample>> = BTreeMap::new();
    for round in 1..=rounds {
        println!("round {round}/{rounds}");
        // The filterless and no-op runs do not depend on the token; they use the hot ES256 script.
        let es_hot = scripts.values().next().cloned().unwrap_or_default();
        for config in [Config::Passthrough, Config::NoopWasm] {
            let sample = measure(&dir, &envoy_config(config, &jwks, &noop), &es_hot, seconds, 1)?;
            report(config, "-", Pattern::Hot, &sample);
            results.entry((config, "-", Pattern::Hot)).or_default().push(sample);
        }
        for signer in &signers {
            for &pattern in &patterns {
                let script = scripts.get(&(signer.alg, pattern)).cloned().unwrap_or_default();
                // Alternate which goes first, so none always runs on a warmer machine.
                let order: &[Config] = match (pattern, round % 2 == 0) {
                    (Pattern::Replay, true) => &[Config::AgentgateTwo, Config::NativeTwo],
                    (Pattern::Replay, false) => &[Config::NativeTwo, Config::AgentgateTwo],
                    (_, true) => &[Config::Agentgate, Config::AgentgateWasmCrypto, Config::AgentgateQuarantine, Config::Native],
                    (_, false) => &[Config::Native, Config::AgentgateQuarantine, Config::AgentgateWasmCrypto, Config::Agentgate],
                };
                // Crypto in wasm differs from agentgate only where a signature is checked
                // by the host: cold ES256 and RS256.
                let host_crypto = pattern == Pattern::Cold && signer.alg != "EdDSA";
                for &config in order.iter().filter(|&&c| c != Config::AgentgateWasmCrypto || host_crypto) {
                    let sample =
                        measure(&dir, &envoy_config(config, &jwks, &noop), &script, seconds, config.workers())?;
                    report(config, signer.alg, pattern, &sample);
                    if pattern != Pattern::Hot && sample.requests > cold_count as u64 {
                        println!("    (more requests than cold tokens: some were reused)");
                    }
                    results.entry((config, signer.alg, pattern)).or_default().push(sample);
                }
                if signer.alg == "ES256" && pattern == Pattern::Hot && selected("BENCH_DPOP", "yes") {
                    // Proofs are single-use and recent: minted afresh for every run.
                    let script = dpop_script(&dir, signer, cold_count)?;
                    let config = Config::AgentgateDpop;
                    let sample = measure(&dir, &envoy_config(config, &jwks, &noop), &script, seconds, config.workers())?;
                    report(config, signer.alg, pattern, &sample);
                    results.entry((config, signer.alg, pattern)).or_default().push(sample);
                }
            }
        }
    }
    if selected("BENCH_PATTERNS", "mcp") {
        if let Some(signer) = signers.first() {
            let script = mcp_script(&dir, &signer.sign(&claims("agent-mcp", now)))?;
            for round in 1..=rounds {
                println!("MCP round {round}/{rounds}");
                let order = if round % 2 == 0 {
                    [Config::AgentgateMcp, Config::NoopWasmMcp]
                } else {
                    [Config::NoopWasmMcp, Config::AgentgateMcp]
                };
                for config in order {
                    let sample = measure(&dir, &envoy_config(config, &jwks, &noop), &script, seconds, config.workers())?;
                    report(config, signer.alg, Pattern::Hot, &sample);
                    results.entry((config, signer.alg, Pattern::Hot)).or_default().push(sample);
                }
            }
        }
    }
    let table = table(&results, rounds, seconds);
    println!("\n{table}");
    let out = std::env::var_os("BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| dir.join("results.md"));
    std::fs::write(&out, &table).map_err(|e| e.to_string())?;
    println!("table written to {}", out.display());
    Ok(())
}

fn claims(sub: &str, now: i64) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": "invoices:read",
        "iat": now, "exp": now + 3600, "jti": sub,
        "authorization_details": [{"type": "invoice_processing", "actions": ["read"], "identifier": "42"}],
    })
}

/// `count` distinct tokens (distinct `sub` and `jti`), one per line, minted on every core.
fn mint(signer: &Signer, now: i64, count: usize, file: &Path) -> Result<Vec<String>, String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per = count.div_ceil(cores);
    let lines: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|core| {
                scope.spawn(move || {
                    (core * per..((core + 1) * per).min(count))
                        .map(|i| signer.sign(&claims(&format!("agent-{}-{i}", signer.alg), now)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    std::fs::write(file, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    Ok(lines)
}

/// A wrk script POSTing one MCP tools/call of about 1 KiB to /mcp with a hot `token`.
fn mcp_script(dir: &Path, token: &str) -> Result<PathBuf, String> {
    let mut call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "pay_invoice", "arguments": {"invoice_id": "42", "amount": 120, "note": ""}}});
    let size = call.to_string().len();
    call["params"]["arguments"]["note"] = json!("n".repeat(1024usize.saturating_sub(size)));
    let script = dir.join("mcp.lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.path = \"/mcp\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n",
        Value::String(call.to_string())
    );
    std::fs::write(&script, lua).map_err(|e| e.to_string())?;
    Ok(script)
}

/// A wrk script that gives every request the next token of `tokens`.
fn cold_script(dir: &Path, alg: &str, name: &str, tokens: &Path) -> Result<PathBuf, String> {
    let script = dir.join(format!("{name}-{alg}.lua"));
    let lua = format!(
        r#"local tokens = {{}}
for line in io.lines("{}") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format("GET", "/invoices/42", {{["Authorization"] = "Bearer " .. tokens[i]}})
end
"#,
        tokens.display()
    );
    std::fs::write(&script, lua).map_err(|e| e.to_string())?;
    Ok(script)
}

/// A wrk script whose every request carries one DPoP-bound ES256 token and the next of
/// `count` proofs made now by the client's key (`Host: api.example.com`, which the proofs'
/// `htu` names, whatever port Envoy listens on).
fn dpop_script(dir: &Path, signer: &Signer, count: usize) -> Result<PathBuf, String> {
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs())
        .unwrap_or(i64::MAX);
    let client = Signer::es256("bench-dpop-client", 9);
    let mut bound = claims("agent-dpop", now);
    bound["cnf"] = json!({"jkt": client.jkt()});
    let token = signer.sign(&bound);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per = count.div_ceil(cores);
    let (token_ref, client_ref) = (&token, &client);
    let proofs: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|core| {
                scope.spawn(move || {
                    (core * per..((core + 1) * per).min(count))
                        .map(|i| {
                            let jti = format!("bench-{now}-{i}");
                            client_ref.dpop_proof(
                                token_ref,
                                "GET",
                                "http://api.example.com/invoices/42",
                                &jti,
                                now,
                                None,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let file = dir.join("dpop-proofs.txt");
    std::fs::write(&file, proofs.join("\n") + "\n").map_err(|e| e.to_string())?;
    let script = dir.join("dpop-ES256.lua");
    let lua = format!(
        r#"local proofs = {{}}
for line in io.lines("{}") do proofs[#proofs + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #proofs then i = 1 end
  return wrk.format("GET", "/invoices/42", {{["Host"] = "api.example.com", ["Authorization"] = "DPoP {token}", ["DPoP"] = proofs[i]}})
end
"#,
        file.display()
    );
    std::fs::write(&script, lua).map_err(|e| e.to_string())?;
    Ok(script)
}

/// The Envoy configuration for one measurement: one listener, the filters of `config`, and a
/// direct response (no upstream), so only the gateway's own work is measured.
fn envoy_config(config: Config, jwks: &Value, noop: &Path) -> String {
    let wasm = |name: &str, file: &Path, configuration: &str| {
        json!({
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": name, "root_id": name,
                    // Headers held while an MCP body is read (see envoy-config/demo.yaml).
                    "allow_on_headers_stop_iteration": true,
                    "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                                  "code": {"local": {"filename": file.display().to_string()}}},
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration}
                }
            }
        })
    };
    let mut filters = match config {
        Config::Passthrough => vec![],
        Config::NoopWasm => vec![wasm("noop", noop, "")],
        Config::Agentgate | Config::AgentgateDpop | Config::AgentgateTwo => {
            vec![wasm("agentgate", &filter_wasm(), &agentgate_policy(jwks).to_string())]
        }
        Config::AgentgateQuarantine => {
            let mut policy = agentgate_policy(jwks);
            policy["quarantine"] = json!({"window_seconds": 60, "max_denials": 5, "cool_off_seconds": 900});
            vec![wasm("agentgate", &filter_wasm(), &policy.to_string())]
        }
        Config::AgentgateWasmCrypto => {
            vec![wasm("agentgate", &wasm_crypto_module(), &agentgate_policy(jwks).to_string())]
        }
        Config::Native | Config::NativeTwo => native_filters(jwks),
        // Envoy's buffer filter reads the body before the route answers, as agentgate does:
        // a direct response before the body is read closes the connection, which would make
        // the baseline pay for new connections.
        Config::NoopWasmMcp => vec![
            wasm("noop", noop, ""),
            json!({"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 1_048_576}}),
        ],
        Config::AgentgateMcp => {
            let mut policy = agentgate_policy(jwks);
            policy["rules"] = json!([{
                "name": "pay-invoice",
                "match": {"methods": ["POST"], "path": "/mcp", "mcp": {"tool": "pay_invoice"}},
                "require": {"scopes": ["invoices:read"],
                            "task": {"type": "invoice_processing", "actions": ["read"], "identifier": "{args.invoice_id}"},
                            "arguments": [{"path": "amount", "lte": 500}]}
            }]);
            vec![wasm("agentgate", &filter_wasm(), &policy.to_string())]
        }
    };
    filters.push(json!({"name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": "bench",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "bench",
                    "route_config": {"virtual_hosts": [{"name": "api", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok"}}
                    }]}]},
                    "http_filters": filters
                }
            }]}]
        }]}
    })
    .to_string()
}

/// The policy both filters enforce: issuer, audience, GET /invoices/*, scope invoices:read;
/// agentgate also checks the RFC 9396 task for the invoice in the path.
fn agentgate_policy(jwks: &Value) -> Value {
    json!({
        "providers": [{"name": "idp", "issuer": ISSUER, "audiences": [AUDIENCE],
                       "algorithms": ["ES256", "RS256", "EdDSA"], "jwks": jwks}],
        "rules": [{
            "name": "read-invoice",
            "match": {"methods": ["GET"], "path": "/invoices/{id}"},
            "require": {"scopes": ["invoices:read"],
                        "task": {"type": "invoice_processing", "actions": ["read"], "identifier": "{id}"}}
        }]
    })
}

fn native_filters(jwks: &Value) -> Vec<Value> {
    vec![
        json!({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"idp": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": jwks.to_string()},
                    "payload_in_metadata": "jwt_payload",
                    "jwt_cache_config": {"jwt_cache_size": 1000}
                }},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]
            }
        }),
        json!({
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": "ALLOW", "policies": {"read-invoice": {
                    "permissions": [{"and_rules": {"rules": [
                        {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                        {"url_path": {"path": {"prefix": "/invoices/"}}}
                    ]}}],
                    "principals": [{"metadata": {
                        "filter": "envoy.filters.http.jwt_authn",
                        "path": [{"key": "jwt_payload"}, {"key": "scope"}],
                        "value": {"string_match": {"safe_regex": {"regex": "(.* )?invoices:read( .*)?"}}}
                    }}]
                }}}
            }
        }),
    ]
}

/// Starts Envoy with `config` and `workers` worker threads on core 0, runs wrk on core 1,
/// reads agentgate's token-cache counters, and stops Envoy.
fn measure(dir: &Path, config: &str, script: &Path, seconds: u64, workers: u32) -> Result<Sample, String> {
    let config_file = dir.join("envoy.json");
    std::fs::write(&config_file, config).map_err(|e| e.to_string())?;
    let admin_file = dir.join("admin-address");
    let _ = std::fs::remove_file(&admin_file);
    let log = std::fs::File::create(dir.join("envoy.log")).map_err(|e| e.to_string())?;
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(envoy_binary())
        .arg("-c")
        .arg(&config_file)
        .args(["--concurrency", &workers.to_string(), "--disable-hot-restart", "-l", "error", "--admin-address-path"])
        .arg(&admin_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start envoy: {e}"))?;
    let envoy = Running(child);
    let port = listener_port(&admin_file)?;
    let url = format!("http://127.0.0.1:{port}/invoices/42");
    let output = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "-c16", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(&url)
        .output()
        .map_err(|e| format!("cannot run wrk (make bench installs it): {e}"))?;
    let cache = cache_counters(&admin_file);
    drop(envoy);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let sample = parse_wrk(&text).ok_or_else(|| format!("unexpected wrk output:\n{text}"))?;
    Ok(Sample { cache, ..sample })
}

/// agentgate's `token_cache.miss` and `token_cache.shared_hit` counters (all workers), when
/// the filter defined them.
fn cache_counters(admin_file: &Path) -> Option<(u64, u64)> {
    let admin = std::fs::read_to_string(admin_file).ok()?;
    let stats = ureq_get(&format!("http://{}/stats?filter=agentgate.token_cache", admin.trim()))?;
    // Custom wasm stats may carry Envoy's `wasmcustom.` prefix.
    let counter = |name: &str| {
        stats.lines().find_map(|line| {
            let (stat, value) = line.trim().split_once(": ")?;
            let stat = stat.strip_prefix("wasmcustom.").unwrap_or(stat);
            (stat == name).then(|| value.trim().parse().ok()).flatten()
        })
    };
    Some((counter("agentgate.token_cache.miss")?, counter("agentgate.token_cache.shared_hit")?))
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listener_port(admin_file: &Path) -> Result<u16, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(admin) = std::fs::read_to_string(admin_file).ok().filter(|a| !a.trim().is_empty()) {
            let listeners = ureq_get(&format!("http://{}/listeners?format=json", admin.trim()));
            let port = listeners
                .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                .and_then(|l| l["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0);
            if let Some(port) = port {
                return Ok(port);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("envoy did not start (see target/bench/envoy.log)".into())
}

fn ureq_get(url: &str) -> Option<String> {
    ureq::get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// Requests/s, and the 99th percentile latency in ms, from `wrk --latency`; `None` when any
/// request failed (a non-2xx answer means the configuration does not allow the traffic).
fn parse_wrk(text: &str) -> Option<Sample> {
    if text.contains("Non-2xx or 3xx responses") || text.contains("Socket errors") {
        return None;
    }
    let rps = text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:"))?.trim().parse().ok()?;
    let requests = text.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())?;
    let p99 = text.lines().find_map(|l| l.trim().strip_prefix("99%"))?.trim();
    let p99_ms = if let Some(us) = p99.strip_suffix("us") {
        us.parse::<f64>().ok()? / 1000.0
    } else if let Some(ms) = p99.strip_suffix("ms") {
        ms.parse().ok()?
    } else {
        p99.strip_suffix('s')?.parse::<f64>().ok()? * 1000.0
    };
    Some(Sample { rps, p99_ms, requests, cache: None })
}

fn report(config: Config, alg: &str, pattern: Pattern, sample: &Sample) {
    println!(
        "  {:<15} {:<6} {:<5} {:>9.0} req/s  p99 {:>7.2} ms",
        config.label(),
        alg,
        format!("{pattern:?}").to_lowercase(),
        sample.rps,
        sample.p99_ms
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values.get(mid).copied().unwrap_or(0.0),
        _ => (values.get(mid - 1).copied().unwrap_or(0.0) + values.get(mid).copied().unwrap_or(0.0)) / 2.0,
    }
}

fn table(results: &BTreeMap<(Config, &str, Pattern), Vec<Sample>>, rounds: u64, seconds: u64) -> String {
    let med = |key: &(Config, &str, Pattern)| {
        results
            .get(key)
            .map(|s| (median(s.iter().map(|x| x.rps).collect()), median(s.iter().map(|x| x.p99_ms).collect())))
    };
    let noop = med(&(Config::NoopWasm, "-", Pattern::Hot)).map_or(0.0, |m| m.0);
    let mut out = format!(
        "Medians of {rounds} rounds of {seconds} s; Envoy 1.40 with one worker on core 0 (×2 workers: two \
         workers, both on core 0), wrk -t1 -c16 on core 1; \
         direct response, no upstream. dist/agentgate.wasm: {} bytes.\n\n\
         | configuration | token | pattern | req/s | p99 ms | agentgate / native | agentgate / no-op |\n\
         |---|---|---|---:|---:|---:|---:|\n",
        std::fs::metadata(filter_wasm()).map_or(0, |m| m.len())
    );
    for config in [Config::Passthrough, Config::NoopWasm] {
        if let Some((rps, p99)) = med(&(config, "-", Pattern::Hot)) {
            out.push_str(&format!("| {} | - | - | {rps:.0} | {p99:.2} | | |\n", config.label()));
        }
    }
    let mut notes = String::new();
    for alg in ["ES256", "RS256", "EdDSA"] {
        for pattern in [Pattern::Hot, Pattern::Cold, Pattern::Replay] {
            let (native_config, ours_config) = match pattern {
                Pattern::Replay => (Config::NativeTwo, Config::AgentgateTwo),
                _ => (Config::Native, Config::Agentgate),
            };
            let native = med(&(native_config, alg, pattern));
            let ours = med(&(ours_config, alg, pattern));
            let name = format!("{pattern:?}").to_lowercase();
            if let Some((rps, p99)) = native {
                out.push_str(&format!("| {} | {alg} | {name} | {rps:.0} | {p99:.2} | | |\n", native_config.label()));
            }
            let guarded = med(&(Config::AgentgateQuarantine, alg, pattern));
            let in_wasm = med(&(Config::AgentgateWasmCrypto, alg, pattern));
            let dpop = med(&(Config::AgentgateDpop, alg, pattern));
            for (config, row) in [
                (ours_config, ours),
                (Config::AgentgateWasmCrypto, in_wasm),
                (Config::AgentgateQuarantine, guarded),
                (Config::AgentgateDpop, dpop),
            ] {
                let Some((rps, p99)) = row else { continue };
                let vs_native = native.map_or(String::new(), |n| format!("{:.2}×", rps / n.0));
                // The no-op floor was measured with one worker: no ratio for two.
                let vs_noop =
                    if noop > 0.0 && config.workers() == 1 { format!("{:.2}×", rps / noop) } else { String::new() };
                out.push_str(&format!(
                    "| **{}** | {alg} | {name} | {rps:.0} | {p99:.2} | {vs_native} | {vs_noop} |\n",
                    config.label()
                ));
            }
            if pattern == Pattern::Replay {
                let counted: Vec<(u64, u64)> =
                    results.get(&(ours_config, alg, pattern)).into_iter().flatten().filter_map(|s| s.cache).collect();
                if !counted.is_empty() {
                    let misses: u64 = counted.iter().map(|c| c.0).sum();
                    let shared: u64 = counted.iter().map(|c| c.1).sum();
                    notes.push_str(&format!(
                        "- {alg} replay, agentgate ×2 workers: {shared} of {misses} local cache misses were shared hits \
                         (verified by the other worker: no signature check), over {} rounds.\n",
                        counted.len()
                    ));
                }
            }
        }
    }
    let noop_mcp = results.keys().find(|k| k.0 == Config::NoopWasmMcp).and_then(&med).map_or(0.0, |m| m.0);
    for key in results.keys().filter(|k| matches!(k.0, Config::NoopWasmMcp | Config::AgentgateMcp)) {
        let Some((rps, p99)) = med(key) else { continue };
        let vs_noop = if key.0 == Config::AgentgateMcp && noop_mcp > 0.0 {
            format!("{:.2}× (vs no-op, same body)", rps / noop_mcp)
        } else {
            String::new()
        };
        out.push_str(&format!("| {} | {} | hot, 1 KiB body | {rps:.0} | {p99:.2} | | {vs_noop} |\n", key.0.label(), key.1));
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes);
    }
    out
}

/// dist/agentgate.wasm with the name of Envoy's foreign function `verify_signature` altered
/// (same length): Envoy answers NotFound, the filter's probe fails and every signature is
/// verified in wasm, by the very same code otherwise.
fn wasm_crypto_module() -> PathBuf {
    let out = workspace_root().join("target/bench/agentgate-wasm-crypto.wasm");
    let mut bytes = std::fs::read(filter_wasm()).unwrap_or_default();
    let (from, to) = (b"verify_signature", b"verify_signaturX");
    let mut at = 0;
    while let Some(found) = bytes.get(at..).and_then(|rest| rest.windows(from.len()).position(|w| w == from)) {
        bytes[at + found..at + found + from.len()].copy_from_slice(to);
        at += found + from.len();
    }
    let _ = std::fs::write(&out, bytes);
    out
}
