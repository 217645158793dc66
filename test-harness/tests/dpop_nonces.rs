//! DPoP server nonces (RFC 9449 §8, §9) in the built filter: the 401 `use_dpop_nonce` round
//! trip, the rotated nonce added to the upstream's response, and nonces that workers and
//! separate hosts given the same `nonce_key` accept from each other with nothing shared.

use agentgate_test_harness::host::{Host, Outcome, Process};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

const URL: &str = "https://api.example.com/invoices/7";

fn issuer() -> Signer {
    Signer::es256("es-nonce", 6)
}

fn nonce_policy(key: &str) -> String {
    let mut p: Value =
        serde_json::from_str(&policy(&issuer().jwks(), &read_invoice_rule(), "enforce")).unwrap_or_default();
    p["dpop"] = json!({"use_dpop_nonce": true, "nonce_key": key, "nonce_lifetime_seconds": 60});
    p.to_string()
}

const KEY: &str = "the fleet's nonce key, 32 bytes or more";

fn get(host: &mut Host, token: &str, proof: &str) -> Outcome {
    let auth = format!("DPoP {token}");
    host.request(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/invoices/7"),
        (":authority", "api.example.com"),
        ("authorization", &auth),
        ("dpop", proof),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn nonce_of(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Responded { headers, .. } => headers.iter().find(|(n, _)| n == "dpop-nonce").map(|(_, v)| v.clone()),
        _ => None,
    }
}

#[test]
fn the_nonce_round_trip_works_across_workers_and_hosts_with_one_key() {
    let client = Signer::es256("client", 21);
    let process = Process::new();
    let mut first = Host::in_process(&nonce_policy(KEY), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Host::in_process(&nonce_policy(KEY), &process).unwrap_or_else(|e| panic!("{e}"));
    let mut elsewhere = Host::new(&nonce_policy(KEY)).unwrap_or_else(|e| panic!("{e}"));
    let now = first.now();
    // Line the clocks up on the start of a nonce slot, so the test crosses slots when it means to.
    let slot = now - now % 60 + 60;
    for host in [&mut first, &mut second, &mut elsewhere] {
        host.set_clock(slot);
    }
    let mut claims = agent_claims("agent-7", "invoices:read", slot);
    claims["cnf"] = json!({"jkt": client.jkt()});
    let token = issuer().sign(&claims);

    let refused = get(&mut first, &token, &client.dpop_proof(&token, "GET", URL, "p-1", slot, None));
    assert_eq!(refused.status(), 401);
    let Outcome::Responded { headers, .. } = &refused else { panic!("{refused:?}") };
    let challenge = headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.as_str());
    assert!(challenge.is_some_and(|c| c.starts_with("DPoP error=\"use_dpop_nonce\"")), "{headers:?}");
    let nonce = nonce_of(&refused).expect("a DPoP-Nonce header");
    assert!(first.logs().join("\n").contains("\"detail\":\"dpop_use_nonce\""));

    // The retry with it passes on another worker and on another host; the nonce is current,
    // so no response brings a new one.
    let retried = get(&mut second, &token, &client.dpop_proof(&token, "GET", URL, "p-2", slot, Some(&nonce)));
    assert_eq!(retried.status(), 200, "{retried:?}\n{}", second.logs().join("\n"));
    assert_eq!(second.response_headers(), []);
    let there = get(&mut elsewhere, &token, &client.dpop_proof(&token, "GET", URL, "p-3", slot, Some(&nonce)));
    assert_eq!(there.status(), 200);

    // A slot later the nonce still passes, and the upstream's response carries the new one.
    first.set_clock(slot + 61);
    let rotated = get(&mut first, &token, &client.dpop_proof(&token, "GET", URL, "p-4", slot + 61, Some(&nonce)));
    assert_eq!(rotated.status(), 200);
    let added = first.response_headers();
    let fresh = added.iter().find(|(n, _)| n == "dpop-nonce").map(|(_, v)| v.clone()).expect("a rotated nonce");
    assert_ne!(fresh, nonce);
    let ok = get(&mut first, &token, &client.dpop_proof(&token, "GET", URL, "p-5", slot + 61, Some(&fresh)));
    assert_eq!((ok.status(), first.response_headers()), (200, Vec::new()));
    // Two slots on it has expired: refused with a fresh one.
    first.set_clock(slot + 121);
    let expired = get(&mut first, &token, &client.dpop_proof(&token, "GET", URL, "p-6", slot + 121, Some(&nonce)));
    assert_eq!(expired.status(), 401);
    assert!(nonce_of(&expired).is_some_and(|n| n != nonce));

    // A host with another key issues and accepts other nonces.
    let mut foreign = Host::new(&nonce_policy("another deployment's key, 32+ bytes")).unwrap_or_else(|e| panic!("{e}"));
    foreign.set_clock(slot);
    let d = get(&mut foreign, &token, &client.dpop_proof(&token, "GET", URL, "p-7", slot, Some(&nonce)));
    assert_eq!(d.status(), 401);
    assert!(nonce_of(&d).is_some_and(|n| n != nonce));
}
