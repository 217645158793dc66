//! `make demo`: the release filter in a real Envoy in front of an echo upstream, on the demo
//! policy (`envoy-config/demo-policy.json`) with a signing key generated for this run. Sends
//! a scripted set of agent requests, shows what the client and the upstream saw, and exits
//! non-zero if any decision is not the expected one.

use agentgate_test_harness::envoy::{workspace_root, Envoy, Response};
use agentgate_test_harness::tokens::{agent_claims, now, Signer};
use agentgate_test_harness::upstream::Upstream;
use serde_json::{json, Value};
use std::process::ExitCode;

struct Step {
    title: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    expect: u16,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, String> {
    let policy_path = workspace_root().join("envoy-config/demo-policy.json");
    let mut policy: Value = serde_json::from_str(&std::fs::read_to_string(&policy_path).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", policy_path.display()))?;
    let signer = Signer::generate_es256("demo-key-1");
    policy["providers"][0]["jwks"] = signer.jwks();

    let upstream = Upstream::start();
    let envoy = Envoy::start(&policy.to_string(), upstream.port)?;
    println!(
        "agentgate demo: Envoy 1.40 + dist/agentgate.wasm on 127.0.0.1:{}, echo upstream on 127.0.0.1:{}",
        envoy.port, upstream.port
    );
    println!("policy: envoy-config/demo-policy.json, with an ES256 key generated for this run (kid demo-key-1)\n");

    let t = now();
    let bearer = |claims: &Value| format!("Bearer {}", signer.sign(claims));
    let valid = agent_claims("invoice-agent-7", "invoices:read", t);
    let mut expired = agent_claims("invoice-agent-7", "invoices:read", t - 3600);
    expired["exp"] = json!(t - 1800);
    let wrong_scope = agent_claims("support-agent-3", "tickets:read", t);
    let stranger = Signer::generate_es256("demo-key-1");

    let steps = [
        Step {
            title: "valid agent token, scope invoices:read",
            path: "/invoices/42",
            headers: vec![("authorization", bearer(&valid))],
            expect: 200,
        },
        Step {
            title: "valid token + forged x-agent-id header",
            path: "/invoices/42",
            headers: vec![("authorization", bearer(&valid)), ("x-agent-id", "admin".into())],
            expect: 200,
        },
        Step {
            title: "expired token",
            path: "/invoices/42",
            headers: vec![("authorization", bearer(&expired))],
            expect: 401,
        },
        Step {
            title: "token without the required scope",
            path: "/invoices/42",
            headers: vec![("authorization", bearer(&wrong_scope))],
            expect: 403,
        },
        Step {
            title: "token signed by an unknown key",
            path: "/invoices/42",
            headers: vec![("authorization", format!("Bearer {}", stranger.sign(&valid)))],
            expect: 401,
        },
        Step { title: "no token at all", path: "/invoices/42", headers: vec![], expect: 401 },
    ];

    let mut all_as_expected = true;
    for (i, step) in steps.iter().enumerate() {
        let headers: Vec<(&str, &str)> = step.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = envoy.get(step.path, &headers);
        let ok = response.status == step.expect;
        all_as_expected &= ok;
        println!(
            "{}. {:<42} GET {} -> {}{}",
            i + 1,
            step.title,
            step.path,
            response.status,
            if ok { "" } else { "  (UNEXPECTED)" }
        );
        describe(&response);
    }

    println!("\naudit records logged by the filter:");
    for record in envoy.audit_records() {
        println!("  {record}");
    }
    println!("\nEnvoy access log (agentgate's fields from filter state):");
    for line in envoy.access_log(steps.len()) {
        let field = |name: &str| match &line[name] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!(
            "  {} {} -> {}  decision={} reason={} rule={} agent={}",
            field("method"),
            field("path"),
            field("status"),
            field("agentgate_decision"),
            field("agentgate_reason"),
            field("agentgate_rule"),
            field("agentgate_agent")
        );
    }
    let stats = envoy.admin("/stats?filter=agentgate").body;
    println!("\ncounters (Envoy /stats):");
    for line in stats.lines().filter(|l| !l.ends_with(": 0")) {
        println!("  {line}");
    }
    println!(
        "\n{}",
        if all_as_expected { "every decision was as expected" } else { "SOME DECISIONS WERE NOT AS EXPECTED" }
    );
    Ok(all_as_expected)
}

fn describe(response: &Response) {
    if response.status == 200 {
        let audit: Vec<String> = ["x-agent-id", "x-agent-decision", "x-agent-rule", "x-agent-audit-id"]
            .iter()
            .filter_map(|h| response.upstream_header(h).map(|v| format!("{h}: {v}")))
            .collect();
        println!("   upstream received  {}", audit.join(" | "));
    } else {
        println!("   client received    www-authenticate: {}", response.header("www-authenticate").unwrap_or("-"));
        println!(
            "                      x-agent-audit-id: {}  body: {}",
            response.header("x-agent-audit-id").unwrap_or("-"),
            response.body
        );
    }
}
