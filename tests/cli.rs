//! `agentgate eval` and `agentgate check-config`: the same core as the filter, with exit
//! codes a CI job can use.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const NOW: i64 = 1_800_000_000;

fn write_policy(name: &str, policy: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, policy).expect("write policy");
    path
}

fn agentgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentgate")).args(args).output().expect("run agentgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn eval(policy_file: &Path, path: &str, token: Option<&str>) -> (i32, Value) {
    let config = policy_file.to_string_lossy().to_string();
    let now = NOW.to_string();
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec![
        "eval",
        "--config",
        &config,
        "--method",
        "GET",
        "--path",
        path,
        "--now",
        &now,
        "--header",
        "x-request-id: cli-1",
    ];
    if let Some(auth) = &auth {
        args.extend(["--header", auth]);
    }
    let (code, stdout, stderr) = agentgate(&args);
    (code, serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}")))
}

#[test]
fn eval_allows_with_the_upstream_headers() {
    let signer = Signer::es256("k", 1);
    let file = write_policy("allow.json", &policy(&signer.jwks(), &read_invoice_rule(), "enforce"));
    let (code, out) = eval(&file, "/invoices/1", Some(&signer.sign(&agent_claims("agent-7", "invoices:read", NOW))));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["decision"], "allow");
    assert_eq!(out["status"], 200);
    assert_eq!(out["reason"], Value::Null);
    assert_eq!(out["rule"], "read-invoice");
    assert_eq!(out["headers"]["x-agent-id"], "agent-7");
    assert_eq!(out["headers"]["x-agent-audit-id"], "cli-1");
    // What is stripped before the upstream is shown too: the token stays at the gate.
    assert_eq!(out["remove_headers"], serde_json::json!(["authorization"]));
}

#[test]
fn eval_reports_the_precise_reason_on_deny() {
    let signer = Signer::es256("k", 1);
    let file = write_policy("deny.json", &policy(&signer.jwks(), &read_invoice_rule(), "enforce"));
    let mut expired = agent_claims("agent-7", "invoices:read", NOW - 1000);
    expired["exp"] = json!(NOW - 500);
    let (code, out) = eval(&file, "/invoices/1", Some(&signer.sign(&expired)));
    assert_eq!(code, 1);
    assert_eq!(
        (out["decision"].clone(), out["status"].clone(), out["reason"].clone()),
        (json!("deny"), json!(401), json!("expired"))
    );
    assert!(out["headers"]["www-authenticate"].as_str().is_some_and(|c| c.contains("invalid_token")));

    let (code, out) = eval(&file, "/invoices/1", None);
    assert_eq!(
        (code, out["reason"].clone(), out["headers"]["www-authenticate"].clone()),
        (1, json!("missing_token"), json!("Bearer"))
    );
}

#[test]
fn eval_with_a_bad_policy_exits_2_naming_the_path() {
    let file = write_policy("bad.json", r#"{"providers": [], "rules": []}"#);
    let (code, stdout, stderr) = agentgate(&["eval", "--config", &file.to_string_lossy(), "--path", "/x"]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert!(stderr.contains("providers: at least one token provider is required"), "{stderr}");
}

#[test]
fn check_config_accepts_a_valid_policy_and_names_the_error_in_a_bad_one() {
    let signer = Signer::eddsa("k", 1);
    let good = write_policy("good.json", &policy(&signer.jwks(), &read_invoice_rule(), "enforce"));
    let (code, stdout, _) = agentgate(&["check-config", &good.to_string_lossy()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("ok (1 providers, 1 rules)"), "{stdout}");

    let rules = json!([{"name": "r", "match": {"methods": []}}]);
    let bad = write_policy("bad-methods.json", &policy(&signer.jwks(), &rules, "enforce"));
    let (code, _, stderr) = agentgate(&["check-config", &bad.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("rules[0].match.methods: is empty"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(agentgate(&["eval"]).0, 2);
    assert_eq!(agentgate(&["eval", "--config", "x", "--path", "/", "--header", "no-colon"]).0, 2);
    assert_eq!(agentgate(&["check-config", "/nonexistent/policy.json"]).0, 2);
}

#[test]
fn jwks_file_is_read_relative_to_the_policy() {
    let signer = Signer::es256("k", 1);
    write_policy("keys.json", &signer.jwks().to_string());
    let mut p: Value = serde_json::from_str(&policy(&json!({"keys": []}), &read_invoice_rule(), "enforce")).unwrap();
    let provider = p["providers"][0].as_object_mut().unwrap();
    provider.remove("jwks");
    provider.insert("jwks_file".into(), json!("keys.json"));
    let file = write_policy("with-file.json", &p.to_string());
    let (code, out) = eval(&file, "/invoices/1", Some(&signer.sign(&agent_claims("agent-7", "invoices:read", NOW))));
    assert_eq!((code, out["decision"].clone()), (0, json!("allow")));

    provider_file(&mut p, "missing.json");
    let file = write_policy("missing-file.json", &p.to_string());
    let (code, _, stderr) = agentgate(&["check-config", &file.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("providers[0].jwks_file: missing.json:"), "{stderr}");
}

fn provider_file(policy: &mut Value, file: &str) {
    policy["providers"][0]["jwks_file"] = json!(file);
}

#[test]
fn example_policy_passes_its_own_tests() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/invoice-agents");
    let (code, stdout, stderr) =
        agentgate(&["test", "--config", &format!("{dir}/policy.json"), &format!("{dir}/policy_tests.json")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with("15 passed, 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mcp-tools");
    let (code, stdout, stderr) =
        agentgate(&["test", "--config", &format!("{dir}/policy.json"), &format!("{dir}/policy_tests.json")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with("7 passed, 0 failed"), "{stdout}");
}

#[test]
fn a_failing_policy_test_is_reported_and_exits_1() {
    let signer = Signer::es256("k", 1);
    let file = write_policy("tested.json", &policy(&signer.jwks(), &read_invoice_rule(), "enforce"));
    let tests = write_policy(
        "tested_tests.json",
        &json!({"now": NOW, "cases": [
            {"name": "reads", "request": {"path": "/invoices/1"}, "token": {"sub": "a", "scope": "invoices:read"}, "expect": {"decision": "allow", "rule": "read-invoice"}},
            {"name": "wrong expectation", "request": {"path": "/invoices/1"}, "token": {"sub": "a", "scope": "x"}, "expect": {"decision": "allow"}}
        ]})
        .to_string(),
    );
    let (code, stdout, _) = agentgate(&["test", "--config", &file.to_string_lossy(), &tests.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(stdout.contains("PASS reads"), "{stdout}");
    assert!(stdout.contains("FAIL wrong expectation: got decision deny (reason insufficient_scope)"), "{stdout}");
    assert!(stdout.trim_end().ends_with("1 passed, 1 failed"), "{stdout}");
}

#[test]
fn eval_explains_each_requirement_of_the_matched_rule() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/invoice-agents");
    let example = std::fs::read_to_string(format!("{dir}/policy.json")).unwrap();
    // The example policy's key is a public test vector; sign with our own key instead.
    let signer = Signer::eddsa("corp-ed-1", 3);
    let mut p: Value = serde_json::from_str(&example).unwrap();
    p["providers"][0]["jwks"] = signer.jwks();
    let file = write_policy("explained.json", &p.to_string());
    let claims = json!({
        "iss": "https://idp.corp.example", "aud": "https://api.corp.example", "iat": NOW, "exp": NOW + 300,
        "sub": "spiffe://corp.example/agent/invoice-7", "trust_score": 0.9,
        "authorization_details": [{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]
    });
    let auth = format!("authorization: Bearer {}", signer.sign(&claims));
    let config = file.to_string_lossy().to_string();
    let now = NOW.to_string();
    let (code, stdout, _) = agentgate(&[
        "eval",
        "--config",
        &config,
        "--method",
        "POST",
        "--path",
        "/invoices/43/pay",
        "--now",
        &now,
        "--header",
        &auth,
    ]);
    assert_eq!(code, 1);
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["rule"], "pay-invoice");
    assert_eq!(out["reason"], "task_mismatch");
    assert_eq!(
        out["checks"],
        json!([
            {"requirement": "agents", "held": true, "reason": null},
            {"requirement": "task", "held": false, "reason": "task_mismatch"},
            {"requirement": "claims", "held": true, "reason": null},
            {"requirement": "approval", "held": false, "reason": "approval_required"}
        ])
    );
}

#[test]
fn policies_with_remote_keys_are_tested_with_the_test_key_and_evaluated_fail_closed() {
    let mut remote: Value =
        serde_json::from_str(&policy(&json!({"keys": []}), &read_invoice_rule(), "enforce")).unwrap();
    let provider = remote["providers"][0].as_object_mut().unwrap();
    provider.remove("jwks");
    provider.insert("discovery".into(), json!(true));
    provider.insert("cluster".into(), json!("idp"));
    let file = write_policy("remote.json", &remote.to_string());
    let tests = write_policy(
        "remote_tests.json",
        &json!({"now": NOW, "cases": [
            {"name": "reads", "request": {"path": "/invoices/1"}, "token": {"sub": "a", "scope": "invoices:read"}, "expect": {"decision": "allow"}}
        ]})
        .to_string(),
    );
    let (code, stdout, stderr) = agentgate(&["test", "--config", &file.to_string_lossy(), &tests.to_string_lossy()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // The CLI fetches nothing: a real token of a remote provider cannot be verified here.
    let token = Signer::es256("k", 1).sign(&agent_claims("a", "invoices:read", NOW));
    let (code, out) = eval(&file, "/invoices/1", Some(&token));
    assert_eq!((code, out["reason"].clone()), (1, json!("keys_unavailable")), "{out}");
}

#[test]
fn eval_reads_an_mcp_body_and_explains_the_argument_conditions() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mcp-tools");
    let example = std::fs::read_to_string(format!("{dir}/policy.json")).unwrap();
    let signer = Signer::eddsa("corp-ed-1", 3);
    let mut p: Value = serde_json::from_str(&example).unwrap();
    p["providers"][0]["jwks"] = signer.jwks();
    let file = write_policy("mcp.json", &p.to_string());
    let claims = json!({
        "iss": "https://idp.corp.example", "aud": "https://tools.corp.example/mcp", "iat": NOW, "exp": NOW + 300,
        "sub": "spiffe://corp.example/agent/invoice-7", "scope": "invoices:pay",
        "authorization_details": [{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}]
    });
    let body = write_policy(
        "mcp-call.json",
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "pay_invoice", "arguments": {"invoice_id": "42", "amount": {"value": 900, "currency": "EUR"}}}})
        .to_string(),
    );
    let (config, body, now) = (file.to_string_lossy().to_string(), body.to_string_lossy().to_string(), NOW.to_string());
    let auth = format!("authorization: Bearer {}", signer.sign(&claims));
    let (code, stdout, stderr) = agentgate(&[
        "eval", "--config", &config, "--method", "POST", "--path", "/mcp", "--now", &now, "--header", &auth, "--body",
        &body,
    ]);
    assert_eq!(code, 1, "{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((out["rule"].clone(), out["reason"].clone()), (json!("pay-invoice"), json!("argument_mismatch")));
    assert!(out["checks"]
        .as_array()
        .unwrap()
        .contains(&json!({"requirement": "arguments", "held": false, "reason": "argument_mismatch"})));
    assert_eq!(out["audit"]["mcp_tool"], "pay_invoice");
    assert_eq!(out["audit"]["mcp_arguments"], json!({"invoice_id": "42"}));
    let (code, _, stderr) =
        agentgate(&["eval", "--config", &config, "--method", "POST", "--path", "/mcp", "--body", "/no/such/file"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn a_verbatim_copy_of_the_idps_jwks_loads_like_a_fetched_one_with_a_warning() {
    let (es, rs) = (Signer::es256("es-1", 1), Signer::rs256("rs-1", 2));
    // The IdP publishes an RS256 key too; this policy trusts only ES256.
    let document = json!({"keys": [es.jwk(), rs.jwk()]});
    write_policy("idp-keys.json", &document.to_string());
    let mut p: Value = serde_json::from_str(&policy(&json!({"keys": []}), &read_invoice_rule(), "enforce")).unwrap();
    p["providers"][0]["algorithms"] = json!(["ES256"]);
    provider_file(&mut p, "idp-keys.json");
    p["providers"][0].as_object_mut().unwrap().remove("jwks");
    let file = write_policy("copy.json", &p.to_string());
    let (code, stdout, stderr) = agentgate(&["check-config", &file.to_string_lossy()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("warning: providers[0].jwks_file(idp-keys.json).keys[1]: skipped:"), "{stderr}");
    let (code, out) = eval(&file, "/invoices/1", Some(&es.sign(&agent_claims("agent-7", "invoices:read", NOW))));
    assert_eq!((code, out["decision"].clone()), (0, json!("allow")));
    // The filter's fetch reads the same document the same way.
    let fetched = agentgate::jwks::parse_jwks(document.to_string().as_bytes(), &[agentgate::keys::Alg::Es256]);
    assert_eq!(fetched.map(|keys| keys.len()), Ok(1));
}

/// A DPoP proof checked offline: `--url` gives the scheme and host its `htu` names.
#[test]
fn eval_checks_a_dpop_proof_against_the_full_url() {
    use agentgate::dpop::{ath, jwk_thumbprint};
    let (issuer, client) = (Signer::es256("k", 1), Signer::es256("client", 11));
    let mut jwk = client.jwk();
    for member in ["kid", "alg", "use"] {
        jwk.as_object_mut().unwrap().remove(member);
    }
    let mut claims = agent_claims("agent-7", "invoices:read", NOW);
    claims["cnf"] = json!({"jkt": jwk_thumbprint(&jwk).unwrap()});
    let token = issuer.sign(&claims);
    let url = "https://api.example.com/invoices/42";
    let proof = |jti: &str| {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
        let claims = json!({"jti": jti, "htm": "GET", "htu": url, "iat": NOW, "ath": ath(&token)});
        client.sign_with_header(&header, &claims)
    };
    let config = write_policy("dpop.json", &policy(&issuer.jwks(), &read_invoice_rule(), "enforce"));
    let config = config.to_string_lossy().to_string();
    let (now, auth) = (NOW.to_string(), format!("Authorization: DPoP {token}"));
    let run = |target: &[&str], jti: &str| {
        let dpop = format!("DPoP: {}", proof(jti));
        let mut args = vec!["eval", "--config", &config, "--now", &now, "--header", &auth, "--header", &dpop];
        args.extend(target);
        let (code, stdout, stderr) = agentgate(&args);
        (code, serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}")))
    };
    // The query is no part of htu; scheme and host are compared after normalization.
    let (code, out) = run(&["--url", "https://API.example.com/invoices/42?page=2#top"], "c-1");
    assert_eq!((code, &out["decision"]), (0, &json!("allow")), "{out}");
    assert!(out["remove_headers"].as_array().unwrap().contains(&json!("dpop")), "{out}");
    for (target, detail) in [
        ("http://api.example.com/invoices/42", "dpop_htu_mismatch"),
        ("https://api.example.com:8443/invoices/42", "dpop_htu_mismatch"),
        ("https://other.example.com/invoices/42", "dpop_htu_mismatch"),
    ] {
        let (code, out) = run(&["--url", target], "c-2");
        assert_eq!((code, &out["reason"], &out["audit"]["detail"]), (1, &json!("dpop_proof_invalid"), &json!(detail)));
        assert!(out["headers"]["www-authenticate"].as_str().unwrap().starts_with("DPoP error=\"invalid_dpop_proof\""));
    }
    // --path alone has no scheme or host to hold the proof against (a host would give them).
    let (code, out) = run(&["--path", "/invoices/42"], "c-3");
    assert_eq!((code, &out["audit"]["detail"]), (1, &json!("dpop_htu_mismatch")), "{out}");
    // Usage errors: both, neither, a URL that is not one.
    for bad in [
        &["--url", url, "--path", "/invoices/42"][..],
        &[][..],
        &["--url", "/invoices/42"][..],
        &["--url", "ftp://api.example.com/x"][..],
        &["--url", "https:///x"][..],
    ] {
        let mut args = vec!["eval", "--config", &config];
        args.extend(bad);
        assert_eq!(agentgate(&args).0, 2, "{bad:?}");
    }
}

/// A certificate-bound token offline: the certificate's SHA-256 as Envoy gives it (hex).
#[test]
fn eval_checks_a_certificate_bound_token_with_the_peer_certificate_digest() {
    use base64ct::Encoding;
    let issuer = Signer::es256("k", 1);
    let digest = [0x5au8; 32];
    let mut claims = agent_claims("agent-7", "invoices:read", NOW);
    claims["cnf"] = json!({"x5t#S256": base64ct::Base64UrlUnpadded::encode_string(&digest)});
    let token = issuer.sign(&claims);
    let mut p: Value = serde_json::from_str(&policy(&issuer.jwks(), &read_invoice_rule(), "enforce")).unwrap();
    p["providers"][0]["certificate_bound"] = json!(true);
    let config = write_policy("mtls.json", &p.to_string()).to_string_lossy().to_string();
    let (now, auth) = (NOW.to_string(), format!("Authorization: Bearer {token}"));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let run = |extra: &[&str]| {
        let mut args = vec!["eval", "--config", &config, "--now", &now, "--header", &auth, "--path", "/invoices/42"];
        args.extend(extra);
        let (code, stdout, _) = agentgate(&args);
        (code, serde_json::from_str::<Value>(&stdout).unwrap_or(Value::Null))
    };
    assert_eq!(run(&["--peer-certificate-sha256", &hex]).0, 0);
    let (code, out) = run(&[]);
    assert_eq!((code, &out["audit"]["detail"]), (1, &json!("no_client_certificate")));
    let (code, out) = run(&["--peer-certificate-sha256", &"00".repeat(32)]);
    assert_eq!((code, &out["audit"]["detail"]), (1, &json!("certificate_thumbprint_mismatch")));
}
