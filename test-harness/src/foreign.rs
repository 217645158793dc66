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
