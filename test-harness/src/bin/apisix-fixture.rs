//! Writes the policy and the signed tokens that the wasmtime-0.38 host (APISIX's runtime,
//! test-harness/wasmtime-0.38) runs the filter with: that host is built with Rust 1.62 and
//! signs nothing itself. The tokens hold over the window [FROM, TO] of Unix times the host
//! sets its clock to. Deterministic (fixed keys, EdDSA): rerunning it gives the same file.
//!
//! One `name value` per line, so that the host needs no JSON parser (and no dependency that
//! would have to build with Rust 1.62):
//! `cargo run -p agentgate-test-harness --no-default-features --bin apisix-fixture > test-harness/wasmtime-0.38/fixture.txt`

use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::json;

/// The clock window: on wasmtime 0.38 the filter trapped for every time whose hundreds digit
/// is odd, 1796005715 among them.
const FROM: i64 = 1_796_000_000;
const TO: i64 = 1_796_010_000;

fn main() {
    let signer = Signer::eddsa("ed-1", 4);
    let claims = |scope: &str, iat: i64, exp: i64| {
        let mut c = agent_claims("agent-7", scope, iat);
        c["exp"] = json!(exp);
        c
    };
    let lines = [
        ("from", FROM.to_string()),
        ("to", TO.to_string()),
        ("policy", policy(&signer.jwks(), &read_invoice_rule(), "enforce")),
        ("valid", signer.sign(&claims("invoices:read", FROM - 60, TO + 60))),
        ("wrong_scope", signer.sign(&claims("invoices:write", FROM - 60, TO + 60))),
        ("expired", signer.sign(&claims("invoices:read", FROM - 3600, FROM - 600))),
    ];
    for (name, value) in lines {
        println!("{name} {value}");
    }
}
