//! Signature verification and key selection against the test vectors of google/jwt_verify_lib
//! (the library inside Envoy's jwt_authn), plus every single-bit flip and truncation of each
//! valid signature. Where agentgate deliberately differs, the case says why.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::host_crypto::{HashFunction, HostCrypto, HostVerifier};
use agentgate::jws::Limits;
use agentgate::keys::{parse_jwk, Alg, Key, KeySet};
use agentgate::policy::Provider;
use agentgate::Reason;
use base64ct::{Base64UrlUnpadded, Encoding};
use serde_json::Value;

const VECTORS: &str = include_str!("vectors/jwt_verify_lib.json");

/// One vector (LongClaimsWithCorrectKidOk) is an 11 KB token: over agentgate's default 8 KiB
/// limit, which jwt_verify_lib does not have. The limit itself is tested elsewhere.
fn limits() -> Limits {
    Limits { max_token_bytes: 64 * 1024, ..Limits::default() }
}

fn verify_signature(provider: &Provider, token: &str) -> Result<(), Reason> {
    agentgate::verify::verify_signature(provider, token, &limits())
}

/// A provider trusting every key of the case's JWKS that agentgate supports, with every
/// algorithm allowed (HS* included, as a policy must list them explicitly).
fn provider(jwks: &Value) -> Provider {
    let keys = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|jwk| parse_jwk(jwk, &Alg::ALL).ok().flatten())
        .collect();
    let keys = KeySet::fixed(keys);
    Provider {
        name: "vectors".into(),
        issuer: "https://example.com".into(),
        audiences: vec![],
        algorithms: Alg::ALL.to_vec(),
        keys,
        remote: None,
        clock_skew_seconds: 30,
        max_lifetime_seconds: None,
        token_types: None,
        subjects: None,
        single_use_ring: None,
        single_use_scope: Default::default(),
        require_dpop: false,
        certificate_bound: false,
        transaction_tokens: false,
        task_claim: None,
    }
}

fn header_alg(token: &str) -> String {
    let header = token.split('.').next().and_then(|h| Base64UrlUnpadded::decode_vec(h).ok()).unwrap_or_default();
    serde_json::from_slice::<Value>(&header)
        .map(|h| h["alg"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// What agentgate answers for a case.
fn expected(name: &str, token: &str, upstream: &str) -> Result<(), Reason> {
    if Alg::from_name(&header_alg(token)).is_none() {
        // ES512 (P-521) is not supported; its key in these vectors is also one byte short.
        return Err(Reason::AlgNotAllowed);
    }
    if name.ends_with(":PubkeyNoKidOK") {
        // The token names kid "abc"; the keys have no kid. jwt_verify_lib lets a kid-less key
        // match any kid; agentgate uses only the key the token names.
        return Err(Reason::UnknownKid);
    }
    match upstream {
        "ok" => Ok(()),
        "JwksKidAlgMismatch" => Err(Reason::UnknownKid),
        "JwtVerificationFail" => Err(Reason::BadSignature),
        other => panic!("{name}: unknown expectation {other}"),
    }
}

fn cases() -> Vec<Value> {
    let vectors: Value = serde_json::from_str(VECTORS).expect("vectors parse");
    vectors["cases"].as_array().cloned().unwrap_or_default()
}

#[test]
fn jwt_verify_lib_vectors() {
    let cases = cases();
    assert_eq!(cases.len(), 36);
    for case in &cases {
        let name = case["name"].as_str().unwrap_or_default();
        let token = case["token"].as_str().unwrap_or_default();
        let want = expected(name, token, case["expect"].as_str().unwrap_or_default());
        assert_eq!(verify_signature(&provider(&case["jwks"]), token), want, "{name}");
    }
}

#[test]
fn every_bit_flip_and_truncation_of_a_valid_signature_fails() {
    let mut checked = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap_or_default();
        let token = case["token"].as_str().unwrap_or_default();
        if expected(name, token, case["expect"].as_str().unwrap_or_default()).is_err() {
            continue;
        }
        let provider = provider(&case["jwks"]);
        let (signed, signature) = token.rsplit_once('.').expect("three segments");
        let signature = Base64UrlUnpadded::decode_vec(signature).expect("signature base64");
        let with = |sig: &[u8]| format!("{signed}.{}", Base64UrlUnpadded::encode_string(sig));
        for bit in 0..signature.len() * 8 {
            let mut flipped = signature.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(verify_signature(&provider, &with(&flipped)), Err(Reason::BadSignature), "{name}: bit {bit}");
        }
        assert_eq!(verify_signature(&provider, &with(&[])), Err(Reason::Malformed), "{name}: no signature");
        for len in [1, signature.len() / 2, signature.len() - 1] {
            assert_eq!(
                verify_signature(&provider, &with(&signature[..len])),
                Err(Reason::BadSignature),
                "{name}: truncated to {len}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} valid cases");
}

/// A host verifier as Envoy's: keys arrive as SubjectPublicKeyInfo DER, ECDSA signatures as
/// DER. It finds the key by its SPKI and parses the signature with the `ecdsa` crate's strict
/// DER decoder, so what the core sends a host is checked independently of the core.
struct SpkiHost(Vec<Key>);

impl HostVerifier for SpkiHost {
    fn verify(&self, hash: HashFunction, spki: &[u8], signature: &[u8], text: &[u8]) -> Result<bool, String> {
        let key = self.0.iter().find(|k| k.spki.as_deref() == Some(spki)).ok_or("unknown SPKI")?;
        let raw;
        let (alg, signature) = match (&key.material, hash) {
            (agentgate::keys::KeyMaterial::P256(_), HashFunction::Sha256) => {
                let Ok(sig) = p256::ecdsa::Signature::from_der(signature) else { return Ok(false) };
                raw = sig.to_bytes().to_vec();
                (Alg::Es256, raw.as_slice())
            }
            (_, HashFunction::Sha256) => (Alg::Rs256, signature),
            (_, HashFunction::Sha384) => (Alg::Rs384, signature),
            (_, HashFunction::Sha512) => (Alg::Rs512, signature),
        };
        Ok(key.material.verify(alg, text, signature))
    }
}

fn host_for(jwks: &Value, answer: Option<String>) -> HostCrypto {
    let keys = jwks["keys"].as_array().into_iter().flatten().filter_map(|jwk| parse_jwk(jwk, &Alg::ALL).ok().flatten());
    let verifier: Box<dyn HostVerifier + Send + Sync> = match answer {
        None => Box::new(SpkiHost(keys.collect())),
        Some(error) => Box::new(Failing(error)),
    };
    HostCrypto { verifier, algorithms: vec![Alg::Es256, Alg::Rs256, Alg::Rs384, Alg::Rs512] }
}

struct Failing(String);

impl HostVerifier for Failing {
    fn verify(&self, _: HashFunction, _: &[u8], _: &[u8], _: &[u8]) -> Result<bool, String> {
        Err(self.0.clone())
    }
}

#[test]
fn the_host_path_gives_every_vector_and_every_bit_flip_the_same_verdict() {
    let mut through_host = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap_or_default();
        let token = case["token"].as_str().unwrap_or_default();
        let provider = provider(&case["jwks"]);
        let host = host_for(&case["jwks"], None);
        let with_host = |t: &str| agentgate::verify::verify_signature_with(&provider, t, &limits(), Some(&host));
        assert_eq!(with_host(token), verify_signature(&provider, token), "{name}");
        if !matches!(header_alg(token).as_str(), "ES256" | "RS256" | "RS384" | "RS512") || with_host(token).is_err() {
            continue;
        }
        through_host += 1;
        let (signed, signature) = token.rsplit_once('.').expect("three segments");
        let signature = Base64UrlUnpadded::decode_vec(signature).expect("signature base64");
        for bit in 0..signature.len() * 8 {
            let mut flipped = signature.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let token = format!("{signed}.{}", Base64UrlUnpadded::encode_string(&flipped));
            assert_eq!(with_host(&token), Err(Reason::BadSignature), "{name}: bit {bit}");
        }
        // A host that cannot answer denies: never the pure-Rust verdict, never an allow.
        let failing = host_for(&case["jwks"], Some("status 12".into()));
        let verdict = agentgate::verify::verify_signature_with(&provider, token, &limits(), Some(&failing));
        assert_eq!(verdict, Err(Reason::CryptoUnavailable), "{name}");
    }
    assert!(through_host >= 8, "only {through_host} valid ES256/RS* cases went through the host");
}
