//! What a VM and its workers remember: used single-use tokens across a reconfiguration on a
//! host without shared data, and the verified-token cache shared by workers through shared
//! data (a token one VM verified costs another no signature check).

use agentgate_test_harness::host::{Host, Outcome, Process};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

fn signer() -> Signer {
    Signer::es256("es-shared", 6)
}

fn single_use_policy(scope: &str, rule_name: &str) -> String {
    let mut rules = read_invoice_rule();
    rules[0]["name"] = json!(rule_name);
    let mut p: Value = serde_json::from_str(&policy(&signer().jwks(), &rules, "enforce")).unwrap_or_default();
    p["providers"][0]["single_use"] = json!(true);
    p["providers"][0]["single_use_scope"] = json!(scope);
    p["providers"][0]["max_lifetime_seconds"] = json!(600);
    p.to_string()
}

fn get(host: &mut Host, token: &str) -> Outcome {
    let auth = format!("Bearer {token}");
    host.request(&[(":method", "GET"), (":path", "/invoices/7"), (":authority", "api"), ("authorization", &auth)])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_used_single_use_token_stays_used_across_a_reconfiguration_without_shared_data() {
    let lacking = ["proxy_get_shared_data", "proxy_set_shared_data"];
    let mut host = Host::lacking(&single_use_policy("worker", "read"), &lacking).unwrap_or_else(|e| panic!("{e}"));
    let token = signer().sign(&agent_claims("agent-7", "invoices:read", host.now()));
    assert_eq!(get(&mut host, &token).status(), 200);
    host.reconfigure(&single_use_policy("worker", "read-renamed")).unwrap_or_else(|e| panic!("{e}"));
    let replayed = get(&mut host, &token);
    assert_eq!(replayed.status(), 401, "the new policy remembers what the old one saw: {replayed:?}");
    assert!(host.logs().join("\n").contains("\"reason\":\"replayed\""));
}

#[test]
fn a_second_worker_verifies_no_signature_for_a_token_the_first_verified() {
    let process = Process::new();
    let p = policy(&signer().jwks(), &read_invoice_rule(), "enforce");
    let mut first = Host::in_process(&p, &process).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Host::in_process(&p, &process).unwrap_or_else(|e| panic!("{e}"));
    let token = signer().sign(&agent_claims("agent-7", "invoices:read", first.now()));
    assert_eq!(get(&mut first, &token).status(), 200);
    assert_eq!(process.metric("agentgate.token_cache.shared_hit"), Some(0));
    assert_eq!(get(&mut second, &token).status(), 200);
    assert_eq!(process.metric("agentgate.token_cache.shared_hit"), Some(1), "verified by the first worker");
    assert_eq!(process.metric("agentgate.token_cache.miss"), Some(2), "a local miss in each worker");
    // The second worker's own cache has it now: a local hit, not a shared one.
    assert_eq!(get(&mut second, &token).status(), 200);
    assert_eq!(process.metric("agentgate.token_cache.shared_hit"), Some(1));
    assert_eq!(process.metric("agentgate.token_cache.hit"), Some(1));
    // A token nobody verified is checked, and a forged one is still refused.
    let other = signer().sign(&agent_claims("agent-8", "invoices:read", first.now()));
    let forged = format!("{}x", other.trim_end_matches(|c: char| c != '.'));
    assert_eq!(get(&mut second, &forged).status(), 401);
    assert_eq!(process.metric("agentgate.token_cache.shared_hit"), Some(1));
}

#[test]
fn an_agent_straying_on_two_workers_is_quarantined_on_both_and_garbage_never_counts() {
    let process = Process::new();
    let mut p: Value =
        serde_json::from_str(&policy(&signer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["quarantine"] = json!({"window_seconds": 60, "max_denials": 3, "cool_off_seconds": 900});
    let p = p.to_string();
    let mut first = Host::in_process(&p, &process).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Host::in_process(&p, &process).unwrap_or_else(|e| panic!("{e}"));
    let now = first.now();
    // A forged token in the victim's name, many times, on both workers: no count.
    let forged = Signer::es256("es-shared", 99).sign(&agent_claims("victim", "invoices:read", now));
    for _ in 0..5 {
        assert_eq!(get(&mut first, &forged).status(), 401);
        assert_eq!(get(&mut second, &forged).status(), 401);
    }
    assert_eq!(get(&mut second, &signer().sign(&agent_claims("victim", "invoices:read", now))).status(), 200);
    // agent-7 asks without the scope: two denials on one worker, one on the other.
    let no_scope = signer().sign(&agent_claims("agent-7", "invoices:list", now));
    assert_eq!(get(&mut first, &no_scope).status(), 403);
    assert_eq!(get(&mut first, &no_scope).status(), 403);
    assert_eq!(get(&mut second, &no_scope).status(), 403);
    assert_eq!(process.metric("agentgate.quarantine.started"), Some(1));
    let logs = second.logs().join("\n");
    assert!(logs.contains("agentgate quarantine {\"agent\":\"agent-7\""), "{logs}");
    // Now even a token that would be allowed is refused, on either worker.
    let good = signer().sign(&agent_claims("agent-7", "invoices:read", now));
    for host in [&mut first, &mut second] {
        let refused = get(host, &good);
        assert_eq!(refused.status(), 403, "{refused:?}");
    }
    assert!(first.logs().join("\n").contains("\"reason\":\"quarantined\""));
}
