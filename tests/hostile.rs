//! Hostile tokens, each a test: every one is refused with a precise reason, none panics.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, b64, policy, read_invoice_rule, Signer};
use base64ct::{Base64, Encoding};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn gate_for(signers: &[&Signer], algorithms: &[&str], limits: Value) -> Gate {
    let jwks = json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()});
    let mut p: Value = serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap();
    p["providers"][0]["algorithms"] = json!(algorithms);
    p["limits"] = limits;
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn es() -> Signer {
    Signer::es256("es-1", 1)
}

fn gate() -> Gate {
    gate_for(&[&es(), &Signer::rs256("rs-1", 1), &Signer::eddsa("ed-1", 1)], &["ES256", "RS256", "EdDSA"], json!({}))
}

fn eval(gate: &Gate, token: &str) -> Decision {
    let headers = vec![("authorization".to_string(), format!("Bearer {token}"))];
    gate.evaluate(&Request::new("GET", "/invoices/1", &headers, NOW))
}

fn reason(gate: &Gate, token: &str) -> Option<Reason> {
    eval(gate, token).reason
}

fn claims() -> Value {
    agent_claims("agent-7", "invoices:read", NOW)
}

/// `header.payload.signature` from raw JSON texts and signature bytes.
fn raw(header: &str, claims: &str, signature: &[u8]) -> String {
    format!("{}.{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()), b64(signature))
}

#[test]
fn valid_control_token_is_allowed() {
    assert_eq!(reason(&gate(), &es().sign(&claims())), None);
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    // The classic key-confusion attack: HMAC keyed with the public key's bytes.
    use hmac::{Hmac, KeyInit, Mac};
    let rs = Signer::rs256("rs-1", 1);
    let public = rs.jwk().to_string();
    let signed = format!(
        "{}.{}",
        b64(json!({"alg": "HS256", "kid": "rs-1"}).to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(public.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    let token = format!("{signed}.{}", b64(&mac.finalize().into_bytes()));
    assert_eq!(reason(&gate(), &token), Some(Reason::AlgNotAllowed));
    // Even with HS256 allowed, the RSA key cannot serve as an HMAC secret.
    let both = gate_for(&[&rs], &["RS256", "HS256"], json!({}));
    assert_eq!(reason(&both, &token), Some(Reason::AlgNotAllowed));
}

#[test]
fn hostile_kids_find_no_key() {
    for kid in ["../../etc/passwd", "es-1' OR '1'='1", "es-1\u{0}", "/dev/null", "es-1 ", "ES-1", ""] {
        let token = es().sign_with_header(&json!({"alg": "ES256", "kid": kid}), &claims());
        assert_eq!(reason(&gate(), &token), Some(Reason::UnknownKid), "{kid:?}");
    }
}

#[test]
fn keys_offered_by_the_token_are_never_used() {
    let attacker = Signer::es256("es-1", 666);
    for extra in [
        json!({"jwk": attacker.jwk()}),
        json!({"jku": "https://attacker.example/jwks.json"}),
        json!({"x5u": "https://attacker.example/cert.pem"}),
        json!({"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]}),
    ] {
        let mut header = json!({"alg": "ES256", "kid": "es-1"});
        header.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        assert_eq!(
            reason(&gate(), &attacker.sign_with_header(&header, &claims())),
            Some(Reason::BadSignature),
            "{header}"
        );
    }
}

#[test]
fn unknown_crit_extension_is_rejected() {
    let token = es()
        .sign_with_header(&json!({"alg": "ES256", "kid": "es-1", "crit": ["urn:x:ext"], "urn:x:ext": 1}), &claims());
    assert_eq!(reason(&gate(), &token), Some(Reason::Malformed));
}

#[test]
fn psychic_ecdsa_signature_is_rejected() {
    // CVE-2022-21449: r = s = 0 must never verify.
    let token = raw(&json!({"alg": "ES256", "kid": "es-1"}).to_string(), &claims().to_string(), &[0u8; 64]);
    assert_eq!(reason(&gate(), &token), Some(Reason::BadSignature));
}

#[test]
fn ed25519_signature_of_the_wrong_length_is_rejected() {
    let token = Signer::eddsa("ed-1", 1).sign(&claims());
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let sig = base64ct::Base64UrlUnpadded::decode_vec(sig).unwrap();
    for len in [63, 65] {
        let mut wrong = sig.clone();
        wrong.resize(len, 0);
        assert_eq!(reason(&gate(), &format!("{signed}.{}", b64(&wrong))), Some(Reason::BadSignature), "{len}");
    }
}

#[test]
fn broken_structure_and_encoding_are_malformed() {
    let token = es().sign(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let padded = Base64::encode_string(claims().to_string().as_bytes());
    for bad in [
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.{s}"),
        format!(".{p}.{s}"),
        format!("{h}..{s}"),
        format!("{h}.{p}."),
        format!("{h}.{padded}.{s}"),
        format!("{h}.{p}=.{s}"),
        format!("{h}.{}.{s}", p.replacen(|c: char| c.is_ascii_alphanumeric(), "+", 1)),
        format!("{h}.{}.{s}", p.replacen(|c: char| c.is_ascii_alphanumeric(), "/", 1)),
        format!("{h}.{} .{s}", p),
        format!("{h}.{}\t.{s}", p),
    ] {
        assert_eq!(reason(&gate(), &bad), Some(Reason::Malformed), "{bad}");
    }
}

#[test]
fn duplicate_json_members_are_rejected() {
    let c = claims();
    let dup_claims = format!(r#"{{"exp":1,{}"#, c.to_string().trim_start_matches('{'));
    let signed = es().sign_with_header(&json!({"alg": "ES256", "kid": "es-1"}), &json!({}));
    let header = signed.split('.').next().unwrap().to_string();
    let token = format!("{header}.{}.{}", b64(dup_claims.as_bytes()), signed.rsplit('.').next().unwrap());
    assert_eq!(reason(&gate(), &token), Some(Reason::Malformed));
    let dup_header = r#"{"alg":"none","alg":"ES256","kid":"es-1"}"#;
    assert_eq!(reason(&gate(), &raw(dup_header, &c.to_string(), &[1; 64])), Some(Reason::Malformed));
}

#[test]
fn time_claims_of_the_wrong_type_or_range() {
    let with = |key: &str, value: Value| {
        let mut c = claims();
        c[key] = value;
        es().sign(&c)
    };
    let g = gate();
    for (key, value, want) in [
        ("exp", json!("1800000300"), Some(Reason::Malformed)),
        ("nbf", json!("0"), Some(Reason::Malformed)),
        ("iat", json!(true), Some(Reason::Malformed)),
        ("exp", json!(NOW as f64 + 100.5), None),
        ("exp", json!(-1), Some(Reason::Expired)),
        ("exp", json!(1e300), None),
        ("exp", json!(u64::MAX), None),
        ("nbf", json!(-1e300), None),
        ("iat", json!(1e300), Some(Reason::NotYetValid)),
    ] {
        assert_eq!(reason(&g, &with(key, value.clone())), want, "{key}: {value}");
    }
}

#[test]
fn deeply_nested_json_is_refused_cheaply() {
    let mut c = claims();
    c["nested"] = serde_json::from_str(&format!("{}1{}", "[".repeat(100), "]".repeat(100))).unwrap();
    let token = es().sign(&c);
    assert_eq!(reason(&gate(), &token), Some(Reason::TokenTooLarge));
    // 10,000 deep (well over serde_json's own recursion limit), with the size limit raised.
    let deep = format!(r#"{{"iss":"x","a":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let roomy = gate_for(&[&es()], &["ES256"], json!({"max_token_bytes": 100_000}));
    assert_eq!(reason(&roomy, &raw(r#"{"alg":"ES256"}"#, &deep, &[1; 64])), Some(Reason::TokenTooLarge));
}

#[test]
fn a_megabyte_token_is_refused_before_parsing() {
    let token = "a".repeat(1 << 20);
    assert_eq!(reason(&gate(), &token), Some(Reason::TokenTooLarge));
}

#[test]
fn too_many_claims_are_refused() {
    let mut c = claims();
    for i in 0..200 {
        c[format!("c{i}")] = json!(i);
    }
    assert_eq!(reason(&gate(), &es().sign(&c)), Some(Reason::TokenTooLarge));
}
