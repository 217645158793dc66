//! `agentgate`: the same core as the filter, from the command line.
//!
//! * `agentgate eval --config POLICY.json --method GET --path /invoices/1 [--header 'name: value']... [--now SECS]`
//!   prints the decision as JSON; exit 0 on allow, 1 on deny, 2 on usage or policy error.
//!   `--url https://api.example.com/invoices/1` instead of `--path` gives the scheme and host
//!   too (`:scheme`, `:authority`), as a DPoP proof's `htu` and `hosts` rules need them.
//! * `agentgate check-config POLICY.json` validates a policy; exit 0, or 2 with the error.

use agentgate::policy::Policy;
use agentgate::{Action, Gate, Request};
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(name = "agentgate", version, about = "Evaluate and check agentgate policies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decide one request against a policy, exactly as the filter would.
    Eval {
        /// The policy file (JSON).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request path, query string included if any.
        #[arg(long, required_unless_present = "url", conflicts_with = "url")]
        path: Option<String>,
        /// The full request URL as the client used it (`https://host[:port]/path?query`): its
        /// scheme and authority become `:scheme` and `:authority`, for DPoP proofs' `htu`.
        #[arg(long)]
        url: Option<String>,
        /// A request header as 'name: value'; repeatable.
        #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The time to decide at, in Unix seconds (default: now).
        #[arg(long)]
        now: Option<i64>,
        /// The client address, as `ip:port` or `ip` (for `source_cidrs`).
        #[arg(long)]
        source: Option<String>,
        /// The mTLS peer certificate's URI SAN (for `bind_mtls_peer`).
        #[arg(long)]
        peer_uri_san: Option<String>,
        /// The client certificate's SHA-256 in hex (for certificate-bound tokens, RFC 8705).
        #[arg(long)]
        peer_certificate_sha256: Option<String>,
        /// The request body (for MCP rules): a file, or `-` for standard input.
        #[arg(long)]
        body: Option<PathBuf>,
    },
    /// Validate a policy file.
    CheckConfig {
        /// The policy file (JSON).
        policy: PathBuf,
    },
    /// Print the policy's JSON Schema.
    Schema,
    /// Run a policy's test cases: exit 0 if all pass, 1 if any fails.
    Test {
        /// The policy file (JSON).
        #[arg(long)]
        config: PathBuf,
        /// The test file (JSON): `{"now": SECS, "cases": [...]}`.
        tests: PathBuf,
    },
}

const EXIT_DENY: u8 = 1;
const EXIT_ERROR: u8 = 2;

fn parse_header(raw: &str) -> Result<(String, String), String> {
    let (name, value) = raw.split_once(':').ok_or("expected 'name: value'")?;
    let name = name.trim();
    if name.is_empty() {
        return Err("empty header name".into());
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_string()))
}

/// Loads a policy; `jwks_file`s are read relative to the policy file.
fn load(path: &Path) -> Result<Gate, String> {
    let json = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{file}: {e}"));
    let policy = Policy::from_json_with(&json, &read).map_err(|e| format!("{}: {e}", path.display()))?;
    for warning in &policy.warnings {
        eprintln!("{}: warning: {warning}", path.display());
    }
    Ok(Gate::new(policy))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { policy } => match load(&policy) {
            Ok(gate) => {
                let p = gate.policy();
                println!("{}: ok ({} providers, {} rules)", policy.display(), p.providers.len(), p.rules.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_ERROR)
            }
        },
        Command::Schema => {
            println!("{:#}", agentgate::config::schema());
            ExitCode::SUCCESS
        }
        Command::Test { config, tests } => {
            let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
            let results = read(&config)
                .and_then(|policy| read(&tests).and_then(|tests| agentgate::policy_test::run(&policy, &tests)));
            match results {
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_ERROR)
                }
                Ok(results) => {
                    for result in &results {
                        match &result.failure {
                            None => println!("PASS {}", result.name),
                            Some(why) => println!("FAIL {}: {why}", result.name),
                        }
                    }
                    let failed = results.iter().filter(|r| r.failure.is_some()).count();
                    println!("agentgate test {}: {} passed, {failed} failed", tests.display(), results.len() - failed);
                    if failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_DENY)
                    }
                }
            }
        }
        Command::Eval {
            config,
            method,
            path,
            url,
            mut headers,
            now,
            source,
            peer_uri_san,
            peer_certificate_sha256,
            body,
        } => {
            let path = match (path, url.as_deref().map(split_url)) {
                (Some(path), _) => path,
                (None, Some(Ok((scheme, authority, target)))) => {
                    // The URL says where the request went: it wins over such headers given too.
                    headers.retain(|(n, _)| !matches!(n.as_str(), ":scheme" | ":authority" | "host"));
                    headers.push((":scheme".into(), scheme));
                    headers.push((":authority".into(), authority));
                    target
                }
                (None, Some(Err(e))) => {
                    eprintln!("--url: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
                (None, None) => {
                    eprintln!("--path or --url is required");
                    return ExitCode::from(EXIT_ERROR);
                }
            };
            let body = match body.as_deref().map(read_body).transpose() {
                Ok(body) => body,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            };
            let gate = match load(&config) {
                Ok(gate) => gate,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            };
            let now = now.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            });
            let request = Request {
                method: &method,
                path: &path,
                headers: &headers,
                now,
                source: source.as_deref(),
                peer_uri_san: peer_uri_san.as_deref(),
                peer_certificate_sha256: peer_certificate_sha256.as_deref(),
                body: body.as_deref(),
            };
            let decision = gate.evaluate(&request);
            let checks = gate.explain(&request).ok().map(|checks| {
                checks
                    .iter()
                    .map(|(requirement, result)| {
                        json!({"requirement": requirement, "held": result.is_ok(), "reason": result.err().map(|r| r.code())})
                    })
                    .collect::<Vec<_>>()
            });
            let (status, headers, removed) = match &decision.action {
                Action::Continue { set, remove } => (200, set, &remove[..]),
                Action::Respond { status, headers, .. } => (*status, headers, &[][..]),
            };
            let headers: Map<String, Value> = headers.iter().map(|(n, v)| (n.to_string(), json!(v))).collect();
            let out = json!({
                "decision": decision.audit.decision,
                "status": status,
                "reason": decision.reason.map(|r| r.code()),
                "rule": decision.rule,
                "dry_run": decision.dry_run,
                "headers": headers,
                "remove_headers": removed,
                "checks": checks,
                "audit": decision.audit,
            });
            println!("{out:#}");
            if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENY)
            }
        }
    }
}

/// An absolute http(s) URL as (scheme, authority, path with query); the fragment, which no
/// client sends, is dropped.
fn split_url(url: &str) -> Result<(String, String, String), String> {
    let (scheme, rest) = url.split_once("://").ok_or("expected an absolute URL, as https://host/path")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme {scheme:?} is not http or https"));
    }
    let rest = rest.split('#').next().unwrap_or(rest);
    let at = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(at);
    if authority.is_empty() || authority.contains('@') {
        return Err("expected a host (and no user info) after the scheme".into());
    }
    let target = if target.starts_with('/') { target.to_string() } else { format!("/{target}") };
    Ok((scheme, authority.to_string(), target))
}

/// A request body from a file, or standard input for `-`.
fn read_body(path: &Path) -> Result<Vec<u8>, String> {
    if path == Path::new("-") {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut body).map_err(|e| format!("stdin: {e}"))?;
        return Ok(body);
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}
