//! The filter's own cost per request inside wasm (wasmtime, not V8): the hot path (one token
//! reused), the cold path (a new token every request) per algorithm, and a denial without a
//! token. Run with `cargo run --release -p agentgate-test-harness --bin filter-cost`; with the
//! argument `instructions`, wasm instructions per request instead of time (wasmtime fuel:
//! repeatable, unlike time on a shared machine), and a hot request's host calls, each with
//! the instructions the filter ran before it.

use agentgate_test_harness::host::{count_instructions, Host, HostError};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::json;

const N: u32 = 300;

fn request(token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), "GET".to_string()),
        (":path".to_string(), "/invoices/42".to_string()),
        (":authority".to_string(), "api.example.com".to_string()),
        ("x-request-id".to_string(), "7f3c9a2e-5b1d-4e8a-9c6f-2d4b8e1a3f5c".to_string()),
    ];
    if let Some(token) = token {
        headers.push(("authorization".to_string(), format!("Bearer {token}")));
    }
    headers
}

/// Wasm instructions per request of `requests` (after one warm-up request).
fn instructions(host: &mut Host, requests: &[Vec<(String, String)>]) -> Result<f64, HostError> {
    if let Some(first) = requests.first() {
        host.time_requests(std::slice::from_ref(first))?;
    }
    host.start_trace();
    for request in requests {
        let refs: Vec<(&str, &str)> = request.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        host.request(&refs)?;
    }
    let (calls, after) = host.take_trace();
    let total = calls.iter().map(|(_, fuel)| fuel).sum::<u64>() + after;
    Ok(total as f64 / f64::from(u32::try_from(requests.len()).unwrap_or(u32::MAX).max(1)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counting = std::env::args().nth(1).as_deref() == Some("instructions");
    if counting {
        count_instructions();
    }
    let signers = [Signer::es256("es", 1), Signer::rs256("rs", 1), Signer::eddsa("ed", 1)];
    let jwks = json!({"keys": signers.iter().map(Signer::jwk).collect::<Vec<_>>()});
    let mut host = Host::new(&policy(&jwks, &read_invoice_rule(), "enforce"))?;
    let now = host.now();
    let unit = if counting { "wasm instr./request" } else { "µs/request" };
    let measure = |host: &mut Host, requests: &[Vec<(String, String)>]| -> Result<String, HostError> {
        Ok(if counting {
            format!("{:>12.0}", instructions(host, requests)?)
        } else {
            format!("{:>12.1}", host.time_requests(requests)?.as_secs_f64() * 1e6)
        })
    };
    println!("{:<28} {unit:>12}", "case");
    let no_token = vec![request(None); N as usize];
    println!("{:<28} {}", "deny, no token", measure(&mut host, &no_token)?);
    for signer in &signers {
        let hot = signer.sign(&agent_claims("agent-7", "invoices:read", now));
        let hot = vec![request(Some(&hot)); N as usize];
        let cold: Vec<_> = (0..N)
            .map(|i| request(Some(&signer.sign(&agent_claims(&format!("agent-{i}"), "invoices:read", now)))))
            .collect();
        println!("{:<28} {}", format!("{} hot (token reused)", signer.alg), measure(&mut host, &hot)?);
        println!("{:<28} {}", format!("{} cold (new token)", signer.alg), measure(&mut host, &cold)?);
    }
    if counting {
        // One hot request, call by call: where the instructions go between host calls.
        let token = signers[0].sign(&agent_claims("agent-7", "invoices:read", now));
        let hot = request(Some(&token));
        let refs: Vec<(&str, &str)> = hot.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        host.request(&refs)?;
        host.start_trace();
        host.request(&refs)?;
        let (calls, after) = host.take_trace();
        println!("\nES256 hot request: {} host calls; wasm instructions before each", calls.len());
        for (import, fuel) in &calls {
            println!("  {fuel:>8}  {import}");
        }
        println!("  {after:>8}  (after the last call)");
    }
    println!("linear memory: {} KiB", host.memory_bytes() / 1024);
    Ok(())
}
