//! DPoP through the gate (RFC 9449): a token bound to a key is useless without that key —
//! sent as Bearer, with a proof for another request, replayed, or proven by another key.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::dpop::{ath, jwk_thumbprint};
use agentgate::{Action, Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, read_invoice_rule, Signer};
use base64ct::Encoding;
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn issuer() -> Signer {
    Signer::es256("es-1", 1)
}

/// The client's proof key as a public JWK (members of the harness's JWK without `kid`).
fn public(client: &Signer) -> Value {
    let mut jwk = client.jwk();
    if let Some(o) = jwk.as_object_mut() {
        o.remove("kid");
        o.remove("alg");
        o.remove("use");
    }
    jwk
}

fn gate(edit: impl FnOnce(&mut Value)) -> Gate {
    let mut p: Value = serde_json::from_str(&policy(&issuer().jwks(), &read_invoice_rule(), "enforce")).unwrap();
    edit(&mut p);
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn bound_token(client: &Signer) -> String {
    let mut c = agent_claims("agent-7", "invoices:read", NOW);
    c["cnf"] = json!({"jkt": jwk_thumbprint(&public(client)).unwrap()});
    issuer().sign(&c)
}

fn proof(client: &Signer, token: &str, jti: &str, htu: &str) -> String {
    let header = json!({"typ": "dpop+jwt", "alg": client.alg, "jwk": public(client)});
    client.sign_with_header(&header, &json!({"jti": jti, "htm": "GET", "htu": htu, "iat": NOW, "ath": ath(token)}))
}

const URL: &str = "https://api.example.com/invoices/42";

fn get(gate: &Gate, authorization: &str, dpop: Option<&str>) -> Decision {
    let mut headers = vec![
        (":authority".to_string(), "api.example.com".to_string()),
        (":scheme".to_string(), "https".to_string()),
        ("authorization".to_string(), authorization.to_string()),
    ];
    if let Some(proof) = dpop {
        headers.push(("DPoP".to_string(), proof.to_string()));
    }
    gate.evaluate(&Request::new("GET", "/invoices/42?page=1", &headers, NOW))
}

fn challenge(d: &Decision) -> String {
    match &d.action {
        Action::Respond { headers, .. } => {
            headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.clone()).unwrap_or_default()
        }
        Action::Continue { .. } => String::new(),
    }
}

#[test]
fn a_bound_token_with_its_proof_passes_and_neither_reaches_the_upstream() {
    let (g, client) = (gate(|_| {}), Signer::es256("client", 11));
    let token = bound_token(&client);
    let d = get(&g, &format!("DPoP {token}"), Some(&proof(&client, &token, "p-1", URL)));
    assert!(d.allowed, "{:?} {:?}", d.reason, d.audit.detail);
    let Action::Continue { remove, .. } = &d.action else { panic!() };
    assert!(remove.iter().any(|h| h == "authorization") && remove.iter().any(|h| h == "DPoP"), "{remove:?}");
}

#[test]
fn a_stolen_bound_token_is_useless() {
    let (g, client, thief) = (gate(|_| {}), Signer::es256("client", 11), Signer::es256("thief", 66));
    let token = bound_token(&client);
    let cases: Vec<(String, Option<String>, Reason, &str)> = vec![
        (format!("Bearer {token}"), None, Reason::DpopBindingMismatch, "dpop_bound_token_as_bearer"),
        (format!("DPoP {token}"), None, Reason::DpopProofInvalid, "dpop_proof_missing"),
        (
            format!("DPoP {token}"),
            Some(proof(&thief, &token, "t-1", URL)),
            Reason::DpopBindingMismatch,
            "dpop_key_mismatch",
        ),
        (
            format!("DPoP {token}"),
            Some(proof(&client, &token, "p-2", "https://api.example.com/invoices/43")),
            Reason::DpopProofInvalid,
            "dpop_htu_mismatch",
        ),
        (
            format!("DPoP {token}"),
            Some(proof(&client, &bound_token(&Signer::es256("other", 12)), "p-3", URL)),
            Reason::DpopProofInvalid,
            "dpop_ath_mismatch",
        ),
    ];
    for (authorization, dpop, reason, detail) in cases {
        let d = get(&g, &authorization, dpop.as_deref());
        assert_eq!((d.reason, d.audit.detail), (Some(reason), Some(detail)), "{detail}");
        assert_eq!(reason.status(), 401);
        let c = challenge(&d);
        assert!(c.starts_with("DPoP error=") && c.contains(r#"algs="ES256 EdDSA PS256 RS256""#), "{c}");
    }
    // A proof is good once.
    let once = proof(&client, &token, "p-9", URL);
    assert!(get(&g, &format!("DPoP {token}"), Some(&once)).allowed);
    let replay = get(&g, &format!("DPoP {token}"), Some(&once));
    assert_eq!(
        (replay.reason, challenge(&replay).contains(r#"error="invalid_dpop_proof""#)),
        (Some(Reason::DpopReplayed), true)
    );
}

#[test]
fn unbound_tokens_are_bearer_only_and_a_provider_can_require_binding() {
    let client = Signer::es256("client", 11);
    let plain = issuer().sign(&agent_claims("agent-7", "invoices:read", NOW));
    let g = gate(|_| {});
    assert!(get(&g, &format!("Bearer {plain}"), None).allowed);
    let as_dpop = get(&g, &format!("DPoP {plain}"), Some(&proof(&client, &plain, "u-1", URL)));
    assert_eq!(
        (as_dpop.reason, as_dpop.audit.detail),
        (Some(Reason::DpopBindingMismatch), Some("dpop_token_not_bound"))
    );
    let strict = gate(|p| p["providers"][0]["require_dpop"] = json!(true));
    assert_eq!(get(&strict, &format!("Bearer {plain}"), None).reason, Some(Reason::DpopRequired));
    let token = bound_token(&client);
    assert!(get(&strict, &format!("DPoP {token}"), Some(&proof(&client, &token, "b-1", URL))).allowed);
    let rule = gate(|p| p["rules"][0]["require"]["dpop"] = json!(true));
    assert_eq!(get(&rule, &format!("Bearer {plain}"), None).reason, Some(Reason::DpopRequired));
}

/// RFC 8705 certificate-bound tokens.
fn cert_request(gate: &Gate, token: &str, digest: Option<&str>) -> Decision {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    gate.evaluate(&Request { peer_certificate_sha256: digest, ..Request::new("GET", "/invoices/42", &headers, NOW) })
}

#[test]
fn a_certificate_bound_token_needs_its_certificate() {
    // x5t#S256 is the base64url SHA-256 of the certificate; Envoy gives the same digest in hex.
    let digest = [0xabu8; 32];
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let x5t = base64ct::Base64UrlUnpadded::encode_string(&digest);
    let mut claims = agent_claims("agent-7", "invoices:read", NOW);
    claims["cnf"] = json!({"x5t#S256": x5t});
    let token = issuer().sign(&claims);
    let checked = gate(|p| p["providers"][0]["certificate_bound"] = json!(true));
    assert!(checked.policy().needs_peer_certificate);
    assert!(cert_request(&checked, &token, Some(&hex)).allowed);
    assert!(cert_request(&checked, &token, Some(&hex.to_uppercase())).allowed);
    for (digest, detail) in [
        (None, "no_client_certificate"),
        (Some("00".repeat(32)), "certificate_thumbprint_mismatch"),
        (Some("zz".into()), "no_client_certificate"),
    ] {
        let d = cert_request(&checked, &token, digest.as_deref());
        assert_eq!((d.reason, d.audit.detail), (Some(Reason::CertificateMismatch), Some(detail)));
        assert!(challenge(&d).starts_with(r#"Bearer error="invalid_token""#));
    }
    // A provider that does not check certificate binding refuses such tokens outright.
    let unchecked = gate(|_| {});
    assert_eq!(cert_request(&unchecked, &token, Some(&hex)).audit.detail, Some("certificate_binding_not_enabled"));
}
