//! Envoy's foreign function `verify_signature` (source/extensions/common/wasm/foreign.cc),
//! natively, for the harness's Envoy profile and the filter's mock: the same protobuf in and
//! out, the same answers. Arguments that do not parse or a key that does not import:
//! BadArgument; an unknown hash: `result` false with "… is not supported."; a signature that
//! does not verify: `result` false with BoringSSL's "Failed to verify digest. Error code: 0".
//! RSA keys verify PKCS#1 v1.5 (EVP's default padding), P-256 keys ECDSA over a DER
//! `Ecdsa-Sig-Value`. Written from the .proto and foreign.cc, not from the filter's code.

use p256::pkcs8::DecodePublicKey;

pub const BAD_ARGUMENT: i32 = 2;

/// `VerifySignatureArguments`, as far as this host reads it.
#[derive(Debug, Default)]
struct Arguments {
    hash_function: String,
    public_key: Vec<u8>,
    signature: Vec<u8>,
    text: Vec<u8>,
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn parse(bytes: &[u8]) -> Option<Arguments> {
    let mut args = Arguments::default();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        if key & 7 != 2 {
            return None;
        }
        let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
        let value = bytes.get(at..at.checked_add(len)?)?.to_vec();
        at += len;
        match key >> 3 {
            1 => args.hash_function = String::from_utf8(value).ok()?,
            2 => args.public_key = value,
            3 => args.signature = value,
            4 => args.text = value,
            // public_key_pem (5) and anything else: not used by agentgate.
            _ => {}
        }
    }
    Some(args)
}

/// `VerifySignatureResult { bool result = 1; string error = 2; }` as protobuf writes it
/// (defaults left out).
pub fn result(verified: bool, error: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if verified {
        out.extend_from_slice(&[0x08, 0x01]);
    }
    if !error.is_empty() {
        out.push(0x12);
        let mut len = error.len();
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(error.as_bytes());
    }
    out
}

pub const MISMATCH: &str = "Failed to verify digest. Error code: 0";

enum Key {
    Rsa(rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// The foreign function: the serialized result, or the status Envoy answers.
pub fn verify_signature(arguments: &[u8]) -> Result<Vec<u8>, i32> {
    let args = parse(arguments).ok_or(BAD_ARGUMENT)?;
    let key = rsa::RsaPublicKey::from_public_key_der(&args.public_key)
        .map(Key::Rsa)
        .or_else(|_| p256::ecdsa::VerifyingKey::from_public_key_der(&args.public_key).map(Key::P256))
        .map_err(|_| BAD_ARGUMENT)?;
    use rsa::sha2::{Sha256, Sha384, Sha512};
    use rsa::signature::Verifier;
    let verified = match (key, args.hash_function.as_str()) {
        (_, hash) if !matches!(hash, "sha256" | "sha384" | "sha512") => {
            return Ok(result(false, &format!("{hash} is not supported.")));
        }
        (Key::Rsa(key), hash) => {
            let Ok(sig) = rsa::pkcs1v15::Signature::try_from(args.signature.as_slice()) else {
                return Ok(result(false, MISMATCH));
            };
            match hash {
                "sha256" => rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key).verify(&args.text, &sig).is_ok(),
                "sha384" => rsa::pkcs1v15::VerifyingKey::<Sha384>::new(key).verify(&args.text, &sig).is_ok(),
                _ => rsa::pkcs1v15::VerifyingKey::<Sha512>::new(key).verify(&args.text, &sig).is_ok(),
            }
        }
        (Key::P256(key), "sha256") => p256::ecdsa::DerSignature::from_bytes(&args.signature)
            .is_ok_and(|sig| p256::ecdsa::signature::Verifier::verify(&key, &args.text, &sig).is_ok()),
        // ECDSA P-256 over another hash: no JWS algorithm uses it.
        (Key::P256(_), _) => false,
    };
    Ok(if verified { result(true, "") } else { result(false, MISMATCH) })
}

/// The conformance vectors (tests/vectors/jwt_verify_lib.json) as one dry-run policy (a
/// provider per issuer, every supported key of its cases, every asymmetric algorithm) and
/// the tokens to send: each vector's token, its signature with one bit flipped per byte,
/// cut short and lengthened, and hostile tokens. Sent through two backends, every token
/// must get the same verdict.
pub fn vector_policy_and_tokens() -> (String, Vec<(String, String)>) {
    use crate::tokens::b64;
    use base64ct::{Base64UrlUnpadded, Encoding};
    use serde_json::{json, Value};
    let path = crate::envoy::workspace_root().join("tests/vectors/jwt_verify_lib.json");
    let vectors: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default();
    let part = |token: &str, at: usize| -> Value {
        let segment = token.split('.').nth(at).unwrap_or_default();
        serde_json::from_slice(&Base64UrlUnpadded::decode_vec(segment).unwrap_or_default()).unwrap_or_default()
    };
    let supported = |key: &Value| {
        matches!(
            (key["kty"].as_str(), key["crv"].as_str()),
            (Some("RSA"), _) | (Some("EC"), Some("P-256")) | (Some("OKP"), Some("Ed25519"))
        )
    };
    let mut issuers: Vec<(String, Vec<Value>)> = Vec::new();
    let mut tokens = Vec::new();
    for case in vectors["cases"].as_array().into_iter().flatten() {
        let (name, token) = (case["name"].as_str().unwrap_or_default(), case["token"].as_str().unwrap_or_default());
        let Some(issuer) = part(token, 1)["iss"].as_str().map(String::from) else { continue };
        if !matches!(
            part(token, 0)["alg"].as_str(),
            Some("ES256" | "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" | "EdDSA")
        ) {
            continue;
        }
        let at = match issuers.iter().position(|(i, _)| *i == issuer) {
            Some(at) => at,
            None => {
                issuers.push((issuer, Vec::new()));
                issuers.len() - 1
            }
        };
        for key in case["jwks"]["keys"].as_array().into_iter().flatten().filter(|k| supported(k)) {
            // Cases of one issuer reuse kids for other keys: the first one stays.
            let kid_taken = key.get("kid").is_some() && issuers[at].1.iter().any(|k| k.get("kid") == key.get("kid"));
            if !issuers[at].1.contains(key) && !kid_taken {
                issuers[at].1.push(key.clone());
            }
        }
        tokens.push((name.to_string(), token.to_string()));
        let (signed, signature) = token.rsplit_once('.').unwrap_or_default();
        let signature = Base64UrlUnpadded::decode_vec(signature).unwrap_or_default();
        let with = |sig: &[u8]| format!("{signed}.{}", Base64UrlUnpadded::encode_string(sig));
        for byte in 0..signature.len() {
            let mut flipped = signature.clone();
            flipped[byte] ^= 1 << (byte % 8);
            tokens.push((format!("{name}: bit {} flipped", byte * 8 + byte % 8), with(&flipped)));
        }
        for cut in [0, 1, signature.len() / 2, signature.len().saturating_sub(1)] {
            tokens.push((format!("{name}: signature cut to {cut} bytes"), with(&signature[..cut])));
        }
        tokens.push((format!("{name}: a byte more"), with(&[signature.as_slice(), &[0]].concat())));
        tokens.push((format!("{name}: a zero byte first"), with(&[&[0], signature.as_slice()].concat())));
    }
    let claims = b64(br#"{"iss":"https://example.com","exp":4102444800}"#);
    for (name, header, signature) in [
        ("alg none", r#"{"alg":"none"}"#, vec![]),
        ("ES256 all zero", r#"{"alg":"ES256"}"#, vec![0; 64]),
        ("ES256 r = s = n", r#"{"alg":"ES256"}"#, [P256_ORDER, P256_ORDER].concat()),
        (
            "ES256 DER signature",
            r#"{"alg":"ES256"}"#,
            [&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01][..], &[0; 56]].concat(),
        ),
        ("RS256 all ones", r#"{"alg":"RS256"}"#, vec![0xff; 256]),
        ("RS256 zero", r#"{"alg":"RS256"}"#, vec![0; 256]),
        ("HS256 confusion", r#"{"alg":"HS256"}"#, vec![7; 32]),
    ] {
        tokens.push((format!("hostile: {name}"), format!("{}.{claims}.{}", b64(header.as_bytes()), b64(&signature))));
    }
    let providers: Vec<Value> = issuers
        .iter()
        .enumerate()
        .map(|(n, (issuer, keys))| {
            json!({
                "name": format!("vectors-{n}"),
                "issuer": issuer,
                "audiences": ["example_service", "http://myservice.com/myapi", "aud1"],
                "algorithms": ["ES256", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"],
                "jwks": {"keys": keys},
            })
        })
        .collect();
    let policy = json!({
        "mode": "dry_run",
        "providers": providers,
        "rules": [{"name": "any", "match": {"path": "/v"}, "require": {}}],
    });
    (policy.to_string(), tokens)
}

/// The order of P-256's group: an `r` or `s` equal to it is out of range.
const P256_ORDER: &[u8] = &[
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa,
    0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
