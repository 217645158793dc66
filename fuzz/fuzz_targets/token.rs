//! Any bytes as the bearer token (and as a query-string token), through the whole pipeline
//! of a policy with every kind of key: must never panic.
#![no_main]

use agentgate::{Gate, Request};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const POLICY: &str = include_str!("../seeds/fuzz-policy.json");

fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate::from_json(POLICY).expect("fuzz policy compiles"))
}

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    let headers = vec![
        ("authorization".to_string(), format!("Bearer {token}")),
        ("cookie".to_string(), format!("agent_token={token}")),
    ];
    let path = format!("/invoices/{}?access_token={token}", data.len());
    for now in [0, 1_800_000_000, i64::MAX] {
        let _ = gate().evaluate(&Request { method: "GET", path: &path, headers: &headers, now, source: None, peer_uri_san: None });
    }
});
