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

/// Server nonces (RFC 9449 §8, §9), stateless: a MAC of the time slot under `nonce_key`.
const NONCE_KEY: &str = "a fleet-wide secret of 32+ bytes, from openssl rand";

fn nonce_gate(key: &str) -> Gate {
    gate(|p| p["dpop"] = json!({"use_dpop_nonce": true, "nonce_key": key, "nonce_lifetime_seconds": 60}))
}

fn proof_with(client: &Signer, token: &str, jti: &str, iat: i64, nonce: Option<&str>) -> String {
    let header = json!({"typ": "dpop+jwt", "alg": client.alg, "jwk": public(client)});
    let mut claims = json!({"jti": jti, "htm": "GET", "htu": URL, "iat": iat, "ath": ath(token)});
    if let Some(nonce) = nonce {
        claims["nonce"] = json!(nonce);
    }
    client.sign_with_header(&header, &claims)
}

fn get_at(gate: &Gate, token: &str, proof: &str, now: i64) -> Decision {
    let headers = vec![
        (":authority".to_string(), "api.example.com".to_string()),
        (":scheme".to_string(), "https".to_string()),
        ("authorization".to_string(), format!("DPoP {token}")),
        ("dpop".to_string(), proof.to_string()),
    ];
    gate.evaluate(&Request::new("GET", "/invoices/42", &headers, now))
}

fn response_header(d: &Decision, name: &str) -> Option<String> {
    match &d.action {
        Action::Respond { headers, .. } => headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()),
        Action::Continue { .. } => d.response_headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()),
    }
}

#[test]
fn a_nonce_is_issued_and_then_required() {
    let (g, client) = (nonce_gate(NONCE_KEY), Signer::es256("client", 11));
    let token = bound_token(&client);
    // The first proof has no nonce: 401 use_dpop_nonce with one to retry with.
    let first = get_at(&g, &token, &proof_with(&client, &token, "n-1", NOW, None), NOW);
    assert_eq!((first.reason, first.audit.detail), (Some(Reason::DpopNonceRequired), Some("dpop_use_nonce")));
    assert_eq!(first.reason.map(Reason::status), Some(401));
    let c = challenge(&first);
    assert!(c.starts_with(r#"DPoP error="use_dpop_nonce""#) && c.contains("algs="), "{c}");
    let nonce = response_header(&first, "dpop-nonce").expect("a DPoP-Nonce header");
    // The retry with it passes; the refused proof's jti was not spent; a current nonce is not re-sent.
    let retry = get_at(&g, &token, &proof_with(&client, &token, "n-1", NOW, Some(&nonce)), NOW + 1);
    assert!(retry.allowed, "{:?} {:?}", retry.reason, retry.audit.detail);
    assert!(retry.response_headers.is_empty());
    // A wrong or forged nonce is the same answer as none.
    for bad in ["n-0", &nonce.replace(&nonce[..2], "AB"), &"A".repeat(32)] {
        let d = get_at(&g, &token, &proof_with(&client, &token, "n-2", NOW, Some(bad)), NOW);
        assert_eq!(d.reason, Some(Reason::DpopNonceRequired), "{bad}");
        assert!(response_header(&d, "dpop-nonce").is_some());
    }
    // Other DPoP challenges bring a nonce too (the client needs one anyway); Bearer ones do not.
    let bearer = get_at(&g, "not-a-token", &proof_with(&client, &token, "n-3", NOW, None), NOW);
    assert_eq!(response_header(&bearer, "dpop-nonce"), None);
    let replayed = get_at(&g, &token, &proof_with(&client, &token, "n-1", NOW, Some(&nonce)), NOW + 2);
    assert_eq!(replayed.reason, Some(Reason::DpopReplayed));
    assert!(response_header(&replayed, "dpop-nonce").is_some());
}

#[test]
fn nonces_rotate_expire_and_are_shared_by_instances_with_one_key() {
    let (g, client) = (nonce_gate(NONCE_KEY), Signer::es256("client", 11));
    let token = bound_token(&client);
    let slot = NOW - NOW % 60;
    let nonce = |gate: &Gate, now: i64| {
        let d = get_at(gate, &token, &proof_with(&client, &token, &format!("x-{now}"), now, None), now);
        response_header(&d, "dpop-nonce").expect("a nonce")
    };
    let old = nonce(&g, slot);
    // Another instance (another worker, another host) with the same key: the same nonce,
    // accepted there with nothing shared at run time.
    let other = nonce_gate(NONCE_KEY);
    assert_eq!(nonce(&other, slot + 59), old);
    assert!(get_at(&other, &token, &proof_with(&client, &token, "s-1", slot + 5, Some(&old)), slot + 5).allowed);
    // In the next slot it still passes, and the response carries the new one (§8.2).
    let next = get_at(&g, &token, &proof_with(&client, &token, "s-2", slot + 61, Some(&old)), slot + 61);
    assert!(next.allowed, "{:?}", next.audit.detail);
    let new = response_header(&next, "dpop-nonce").expect("the rotated nonce on the response");
    assert_ne!(new, old);
    assert_eq!(new, nonce(&g, slot + 61));
    // Two slots on, it has expired.
    let late = get_at(&g, &token, &proof_with(&client, &token, "s-3", slot + 121, Some(&old)), slot + 121);
    assert_eq!(late.reason, Some(Reason::DpopNonceRequired));
    // An instance with another key accepts none of these.
    let foreign = nonce_gate("another deployment's secret, 32+ bytes");
    let d = get_at(&foreign, &token, &proof_with(&client, &token, "s-4", slot + 5, Some(&old)), slot + 5);
    assert_eq!(d.reason, Some(Reason::DpopNonceRequired));
}

#[test]
fn nonce_settings_are_checked() {
    let mut p: Value = serde_json::from_str(&policy(&issuer().jwks(), &read_invoice_rule(), "enforce")).unwrap();
    for (dpop, error) in [
        (json!({"use_dpop_nonce": true}), "dpop.nonce_key"),
        (json!({"use_dpop_nonce": true, "nonce_key": "short"}), "dpop.nonce_key"),
        (
            json!({"use_dpop_nonce": true, "nonce_key": NONCE_KEY, "nonce_lifetime_seconds": 5}),
            "dpop.nonce_lifetime_seconds",
        ),
    ] {
        p["dpop"] = dpop;
        let e = Gate::from_json(&p.to_string()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(error), "{e}");
    }
}

/// The issue's hostile proofs, through the gate, each with its audit detail.
#[test]
fn hostile_proofs_are_refused_with_a_precise_reason() {
    use hmac::{Hmac, KeyInit, Mac};
    let (g, client) = (gate(|_| {}), Signer::es256("client", 11));
    let token = bound_token(&client);
    let b64 = |v: &Value| base64ct::Base64UrlUnpadded::encode_string(v.to_string().as_bytes());
    let claims = |jti: &str| json!({"jti": jti, "htm": "GET", "htu": URL, "iat": NOW, "ath": ath(&token)});
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": public(&client)});
    let with_header = |edit: &dyn Fn(&mut Value), jti: &str| {
        let mut h = header.clone();
        edit(&mut h);
        client.sign_with_header(&h, &claims(jti))
    };
    let with_claim = |name: &str, value: Value, jti: &str| {
        let mut c = claims(jti);
        c[name] = value;
        client.sign_with_header(&header, &c)
    };
    let none =
        format!("{}.{}.", b64(&json!({"typ": "dpop+jwt", "alg": "none", "jwk": public(&client)})), b64(&claims("h-1")));
    let hs = {
        let signed = format!(
            "{}.{}",
            b64(&json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": public(&client)})),
            b64(&claims("h-2"))
        );
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(public(&client).to_string().as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", base64ct::Base64UrlUnpadded::encode_string(&mac.finalize().into_bytes()))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "dpop_alg_not_allowed"),
        ("HS256 keyed with the public key", hs, "dpop_alg_not_allowed"),
        ("private jwk", with_header(&|h| h["jwk"]["d"] = json!("AAAA"), "h-3"), "dpop_private_key"),
        ("htu with a query", with_claim("htu", json!(format!("{URL}?page=1")), "h-4"), "dpop_htu_invalid"),
        (
            "htu host look-alike",
            with_claim("htu", json!("https://api.example.com.evil.test/invoices/42"), "h-5"),
            "dpop_htu_mismatch",
        ),
        (
            "htu host with two trailing dots",
            with_claim("htu", json!("https://api.example.com../invoices/42"), "h-6"),
            "dpop_htu_invalid",
        ),
        (
            "htu host percent-encoded",
            with_claim("htu", json!("https://api.example.%63om/invoices/42"), "h-7"),
            "dpop_htu_invalid",
        ),
        ("huge jti", with_claim("jti", json!("j".repeat(4000)), "h-8"), "dpop_jti_invalid"),
        ("iat far in the future", with_claim("iat", json!(NOW + 86_400 * 365), "h-9"), "dpop_iat_out_of_window"),
        ("iat long ago", with_claim("iat", json!(NOW - 3600), "h-10"), "dpop_iat_out_of_window"),
        ("ath for another token", with_claim("ath", json!(ath("another.access.token")), "h-11"), "dpop_ath_mismatch"),
        ("htm of another method", with_claim("htm", json!("DELETE"), "h-12"), "dpop_htm_mismatch"),
        ("typ of an access token", with_header(&|h| h["typ"] = json!("at+jwt"), "h-13"), "dpop_proof_invalid"),
    ];
    for (what, proof, detail) in cases {
        let d = get(&g, &format!("DPoP {token}"), Some(&proof));
        assert_eq!((d.reason, d.audit.detail), (Some(Reason::DpopProofInvalid), Some(detail)), "{what}");
        assert!(challenge(&d).starts_with(r#"DPoP error="invalid_dpop_proof""#), "{what}");
    }
    // A case-changed or trailing-dot host names the same origin (RFC 3986 §6.2.2.1, §6.2.3;
    // RFC 9449 §4.3 compares after normalization): accepted, on either side.
    for (i, htu) in ["https://API.Example.COM/invoices/42", "https://api.example.com./invoices/42"].iter().enumerate() {
        let d = get(&g, &format!("DPoP {token}"), Some(&with_claim("htu", json!(htu), &format!("same-{i}"))));
        assert!(d.allowed, "{htu}: {:?}", d.audit.detail);
    }
}
