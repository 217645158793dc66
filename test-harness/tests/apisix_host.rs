//! The release filter on the APISIX host model (`Host::apisix`, apisix.md and
//! wasm-nginx-module's source): configured at the first request of each worker, a policy it
//! cannot run refused once per worker with a 503 that says so, no filter state written where
//! nginx variables cannot take it, no client address, the audit record at the policy's level.

use agentgate_test_harness::host::{Host, Outcome};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::es256("es-apisix", 2)
}

fn inline_policy(edit: impl FnOnce(&mut Value)) -> String {
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    edit(&mut p);
    p.to_string()
}

fn apisix(policy: &str) -> Host {
    Host::apisix(policy).unwrap_or_else(|e| panic!("{e}"))
}

fn get(host: &mut Host) -> Outcome {
    let auth = format!("Bearer {}", signer().sign(&agent_claims("agent-7", "invoices:read", host.now())));
    host.request(&[(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn refused_three_times(policy: &str, needle: &str) -> String {
    let mut host = apisix(policy);
    for n in 0..3 {
        let outcome = get(&mut host);
        assert_eq!(outcome.status(), 503, "request {n}: {outcome:?}");
        let Outcome::Responded { body, .. } = &outcome else { panic!("{outcome:?}") };
        assert!(body.contains("cannot run on this host"), "a body that says why: {body}");
    }
    let logs = host.logs();
    let refusals: Vec<&String> = logs.iter().filter(|l| l.contains(needle)).collect();
    assert_eq!(refusals.len(), 1, "logged once per worker, not per request: {logs:?}");
    refusals[0].clone()
}

#[test]
fn apisix_configures_at_the_first_request_not_at_load() {
    let mut host = apisix(&inline_policy(|_| {}));
    assert!(host.logs().is_empty(), "nothing runs at load: {:?}", host.logs());
    assert_eq!(get(&mut host).status(), 200);
    let logs = host.logs().join("\n");
    assert!(logs.contains("policy loaded") && logs.contains("using the WASI clock"), "{logs}");
    assert_eq!(host.tick_period_ms(), 0);
    assert_eq!(get(&mut host).status(), 200);
    assert_eq!(host.logs().iter().filter(|l| l.contains("policy loaded")).count(), 1, "configured once");
}

#[test]
fn a_policy_apisix_cannot_run_is_refused_once_per_worker_with_a_clear_503() {
    let remote = inline_policy(|p| {
        if let Some(provider) = p["providers"][0].as_object_mut() {
            provider.remove("jwks");
            provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys.json"));
            provider.insert("cluster".into(), json!("idp.example.com:443"));
        }
    });
    let line = refused_three_times(&remote, "fetches its keys");
    assert!(line.contains("inline (jwks)") && !line.contains("jwks_file"), "only what the host can do: {line}");
    assert!(line.contains("answered 503"), "{line}");
}

#[test]
fn source_cidrs_is_refused_on_apisix_which_gives_no_client_address() {
    let limited = inline_policy(|p| p["rules"][0]["require"]["source_cidrs"] = json!(["10.0.0.0/8"]));
    let line = refused_three_times(&limited, "source_cidrs");
    assert!(line.contains("no client address"), "{line}");
}

#[test]
fn gateway_wide_single_use_is_refused_on_apisix_and_worker_scope_runs() {
    let single_use = |scope: Option<&str>| {
        inline_policy(|p| {
            p["providers"][0]["single_use"] = json!(true);
            p["providers"][0]["max_lifetime_seconds"] = json!(600);
            if let Some(scope) = scope {
                p["providers"][0]["single_use_scope"] = json!(scope);
            }
        })
    };
    let line = refused_three_times(&single_use(None), "single_use_scope");
    assert!(line.contains("\"single_use_scope\": \"worker\""), "{line}");
    let mut host = apisix(&single_use(Some("worker")));
    assert_eq!(get(&mut host).status(), 200);
}

#[test]
fn no_filter_state_is_written_and_no_error_is_logged_per_request() {
    let mut host = apisix(&inline_policy(|_| {}));
    for _ in 0..3 {
        assert_eq!(get(&mut host).status(), 200);
    }
    let logs = host.logs();
    assert!(!logs.iter().any(|l| l.contains("not found for writing")), "{logs:?}");
    assert!(host.logs_at(4).is_empty(), "no error line at all: {:?}", host.logs_at(4));
}

#[test]
fn metrics_calls_succeed_and_keep_nothing() {
    let mut host = apisix(&inline_policy(|_| {}));
    assert_eq!(get(&mut host).status(), 200);
    assert!(!host.logs().join("\n").contains("no metrics"), "the filter cannot tell: {:?}", host.logs());
    assert_eq!(host.metric("agentgate.allowed"), None);
}

#[test]
fn the_audit_record_is_logged_at_the_policy_level() {
    let audit =
        |host: &Host, level: i32| host.logs_at(level).iter().filter(|l| l.starts_with("agentgate audit ")).count();
    let mut default = apisix(&inline_policy(|_| {}));
    assert_eq!(get(&mut default).status(), 200);
    assert_eq!((audit(&default, 2), audit(&default, 3)), (1, 0), "info by default: dropped at APISIX's warn");
    let mut warn = apisix(&inline_policy(|p| p["audit"] = json!({"log_level": "warn"})));
    assert_eq!(get(&mut warn).status(), 200);
    assert_eq!(audit(&warn, 3), 1, "at warn: kept by APISIX's default error_log_level");
    let record: Value = warn
        .logs()
        .iter()
        .find_map(|l| l.strip_prefix("agentgate audit ").and_then(|j| serde_json::from_str(j).ok()))
        .unwrap_or(Value::Null);
    assert_eq!(record["source"], Value::Null, "no client address on this host: {record}");
}
