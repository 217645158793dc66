//! The filter's own cost per request inside wasm (wasmtime, not V8): the hot path (one token
//! reused), the cold path (a new token every request) per algorithm, and a denial without a
//! token. Run with `cargo run --release -p agentgate-test-harness --bin filter-cost`.

use agentgate_test_harness::host::Host;
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::json;

const N: u32 = 300;

fn request(token: Option<&str>) -> Vec<(String, String)> {
    let mut headers =
        vec![(":method".to_string(), "GET".to_string()), (":path".to_string(), "/invoices/42".to_string())];
    if let Some(token) = token {
        headers.push(("authorization".to_string(), format!("Bearer {token}")));
    }
    headers
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signers = [Signer::es256("es", 1), Signer::rs256("rs", 1), Signer::eddsa("ed", 1)];
    let jwks = json!({"keys": signers.iter().map(Signer::jwk).collect::<Vec<_>>()});
    let mut host = Host::new(&policy(&jwks, &read_invoice_rule(), "enforce"))?;
    let now = host.now();
    println!("{:<28} {:>12}", "case", "µs/request");
    let no_token = vec![request(None); N as usize];
    println!("{:<28} {:>12.1}", "deny, no token", host.time_requests(&no_token)?.as_secs_f64() * 1e6);
    for signer in &signers {
        let hot = signer.sign(&agent_claims("agent-7", "invoices:read", now));
        let hot = vec![request(Some(&hot)); N as usize];
        let cold: Vec<_> = (0..N)
            .map(|i| request(Some(&signer.sign(&agent_claims(&format!("agent-{i}"), "invoices:read", now)))))
            .collect();
        println!(
            "{:<28} {:>12.1}",
            format!("{} hot (token reused)", signer.alg),
            host.time_requests(&hot)?.as_secs_f64() * 1e6
        );
        println!(
            "{:<28} {:>12.1}",
            format!("{} cold (new token)", signer.alg),
            host.time_requests(&cold)?.as_secs_f64() * 1e6
        );
    }
    println!("linear memory: {} KiB", host.memory_bytes() / 1024);
    Ok(())
}
