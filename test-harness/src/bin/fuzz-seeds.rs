//! Writes the fuzzing policy and seed corpora under `fuzz/seeds/` (committed; rerun after
//! changing the token fixtures): `cargo run -p agentgate-test-harness --bin fuzz-seeds`.

use agentgate_test_harness::envoy::workspace_root;
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn main() -> std::io::Result<()> {
    let seeds = workspace_root().join("fuzz/seeds");
    let signers = [Signer::es256("es", 1), Signer::rs256("rs", 1), Signer::eddsa("ed", 1)];
    let mut keys: Vec<Value> = signers.iter().map(Signer::jwk).collect();
    keys.push(json!({"kty": "oct", "kid": "hs", "k": "c2VjcmV0LXNoYXJlZC13aXRoLWJpbGxpbmctMzItYnl0ZXM"}));
    let mut p: Value = serde_json::from_str(&policy(&json!({"keys": keys}), &read_invoice_rule(), "enforce"))?;
    p["providers"][0]["algorithms"] = json!(["ES256", "RS256", "EdDSA", "HS256"]);
    p["token_sources"] =
        json!([{"header": "authorization", "prefix": "Bearer "}, {"cookie": "agent_token"}, {"query": "access_token"}]);
    std::fs::write(seeds.join("fuzz-policy.json"), serde_json::to_string_pretty(&p)?)?;
    std::fs::write(seeds.join("policy/fuzz-policy.json"), p.to_string())?;
    std::fs::write(
        seeds.join("policy/demo-policy.json"),
        std::fs::read(workspace_root().join("envoy-config/demo-policy.json"))?,
    )?;
    for (i, signer) in signers.iter().enumerate() {
        let token = signer.sign(&agent_claims("agent-7", "invoices:read", NOW));
        std::fs::write(seeds.join(format!("token/{}-{i}", signer.alg)), token)?;
    }
    let odd = signers[0].sign_with_header(
        &json!({"alg": "ES256", "kid": "es", "crit": ["x"]}),
        &json!({"iss": "x", "exp": 1.5e9, "aud": ["a"]}),
    );
    std::fs::write(seeds.join("token/crit"), odd)?;
    println!("seeds written under {}", seeds.display());
    Ok(())
}
