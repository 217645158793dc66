//! Signature checks by the host's own crypto, where it has some: Envoy registers the foreign
//! function `verify_signature` (BoringSSL's EVP verify, RSA PKCS#1 v1.5 and ECDSA), which
//! is several times faster than verifying in wasm. The core prepares what such a host needs
//! (each key's SubjectPublicKeyInfo, ECDSA signatures as DER) and decides, by probing with
//! known answers, which algorithms go to it; everything else stays with the pure-Rust
//! verifiers in [`crate::keys`]. A host that fails to answer denies the token, never allows.

use crate::keys::{Alg, Key};
use std::fmt;

/// The hash a host verifies with, by the name Envoy takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashFunction {
    Sha256,
    Sha384,
    Sha512,
}

impl HashFunction {
    pub const fn name(self) -> &'static str {
        match self {
            HashFunction::Sha256 => "sha256",
            HashFunction::Sha384 => "sha384",
            HashFunction::Sha512 => "sha512",
        }
    }
}

/// A host's signature check: `Ok(verdict)`, or `Err` when the host could not answer (a
/// refused call, an answer that does not parse).
pub trait HostVerifier {
    fn verify(&self, hash: HashFunction, spki_der: &[u8], signature: &[u8], text: &[u8]) -> Result<bool, String>;
}

/// The algorithms a host's crypto may take, and how: its hash, and for ECDSA the size of `r`
/// and `s` (the JWS signature is `r || s`; hosts want DER).
pub const fn host_form(alg: Alg) -> Option<(HashFunction, Option<usize>)> {
    match alg {
        Alg::Rs256 => Some((HashFunction::Sha256, None)),
        Alg::Rs384 => Some((HashFunction::Sha384, None)),
        Alg::Rs512 => Some((HashFunction::Sha512, None)),
        Alg::Es256 => Some((HashFunction::Sha256, Some(32))),
        // PSS needs padding parameters the foreign function does not take; EdDSA takes no
        // separate hash; HMAC is no public-key signature.
        _ => None,
    }
}

/// Checks a JWS `signature` over `signed` with the host, for a key given as SPKI DER.
pub fn verify_with_host(
    host: &dyn HostVerifier,
    alg: Alg,
    spki_der: &[u8],
    signed: &[u8],
    signature: &[u8],
) -> Result<bool, String> {
    let Some((hash, ecdsa)) = host_form(alg) else { return Err(format!("{} is not for the host", alg.name())) };
    match ecdsa {
        // A signature that is not two in-range-looking halves is no signature: no host call.
        Some(size) => match ecdsa_der(signature, size) {
            Some(der) => host.verify(hash, spki_der, &der, signed),
            None => Ok(false),
        },
        None => host.verify(hash, spki_der, signature, signed),
    }
}

/// Checks `signature` over `signed` by `key`: with the host's crypto where it takes `alg`
/// (and the key has its SPKI), else in wasm. `Err` when the host could not answer: the
/// caller refuses, it never falls back to allowing.
pub fn verify_key(
    host: Option<&HostCrypto>,
    key: &Key,
    alg: Alg,
    signed: &[u8],
    signature: &[u8],
) -> Result<bool, String> {
    match (host.filter(|h| h.takes(alg)), key.spki.as_deref()) {
        (Some(host), Some(spki)) => verify_with_host(host.verifier.as_ref(), alg, spki, signed, signature),
        _ => Ok(key.material.verify(alg, signed, signature)),
    }
}

/// A JWS ECDSA signature (`r || s`, each `size` bytes: RFC 7518 §3.4) as the DER
/// `Ecdsa-Sig-Value` hosts verify. `None` for a wrong length or a zero `r` or `s`.
pub fn ecdsa_der(raw: &[u8], size: usize) -> Option<Vec<u8>> {
    if raw.len() != size.checked_mul(2)? {
        return None;
    }
    let (r, s) = raw.split_at(size);
    let (r, s) = (der_integer(r)?, der_integer(s)?);
    let body_len = r.len() + s.len();
    let mut der = Vec::with_capacity(body_len + 3);
    der.push(0x30);
    push_length(&mut der, body_len);
    der.extend_from_slice(&r);
    der.extend_from_slice(&s);
    Some(der)
}

/// A positive big-endian integer as a minimal DER INTEGER; `None` for zero.
fn der_integer(bytes: &[u8]) -> Option<Vec<u8>> {
    let start = bytes.iter().position(|&b| b != 0)?;
    let digits = bytes.get(start..)?;
    let pad = digits.first().is_some_and(|&b| b & 0x80 != 0);
    let mut out = Vec::with_capacity(digits.len() + 3);
    out.push(0x02);
    push_length(&mut out, digits.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
    Some(out)
}

fn push_length(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    push_length(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// `AlgorithmIdentifier` of P-256 keys: id-ecPublicKey, prime256v1 (RFC 5480).
const P256_ALGORITHM: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
    0x01, 0x07,
];
/// `AlgorithmIdentifier` of RSA keys: rsaEncryption, NULL (RFC 3279).
const RSA_ALGORITHM: &[u8] =
    &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];

fn spki(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(key.len() + 1);
    bits.push(0);
    bits.extend_from_slice(key);
    der(0x30, &[algorithm, &der(0x03, &bits)].concat())
}

/// The SubjectPublicKeyInfo of a P-256 key from its SEC1 uncompressed point.
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    spki(P256_ALGORITHM, point)
}

/// The SubjectPublicKeyInfo of an RSA key from its modulus and exponent (big-endian).
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    let key = der(0x30, &[der_integer(n)?, der_integer(e)?].concat());
    Some(spki(RSA_ALGORITHM, &key))
}

/// A known answer: a key, a text and a valid signature over it.
struct Probe {
    alg: Alg,
    spki: fn() -> Option<Vec<u8>>,
    signature: &'static str,
}

const PROBE_TEXT: &[u8] = b"agentgate host crypto probe";

fn b64(text: &str) -> Vec<u8> {
    use base64ct::{Base64UrlUnpadded, Encoding};
    Base64UrlUnpadded::decode_vec(text).unwrap_or_default()
}

const PROBE_P256_X: &str = "Rxw-dYxJBChbun5TEY7Q9SSt6wdX0lvS-Oew1236cUw";
const PROBE_P256_Y: &str = "3VIPesqKi5F6zDf1HejwybvjrYWDgucC3CWhLQn3qFg";
const PROBE_RSA_N: &str = "wUscP1XNxmW8vKDs0xD6idAxKptbb6tekvxlULdMY550Hud1PjK2yzz20HNXldZFlZu3xzVe0oxEVaY4v-R1PNV9VCnjIooN7GkZ0s6dAGxIy80H4CpWyMgRscGVblJh8ajg773Q0JC5Ez7I-vEGC818kafzHtFs2fqQYOPb0wRq33ZQ1vCKONCX_LjOp4OAx0P2lVsMRrezYbL0nbhpjpn0tdY31e7jkqYzvyKzjTyMcWjW0UrddR_-DVqnD0gj7WucBlBDd3vkV0OqY1RFNF2cDd70L6RvbFQcNxV4NQdM9gC3ztSLpzqNfBm0kcCfi1YwL8TIjAYklS3CVXJ34w";

fn probe_p256() -> Option<Vec<u8>> {
    Some(p256_spki(&[&[0x04][..], &b64(PROBE_P256_X), &b64(PROBE_P256_Y)].concat()))
}

fn probe_rsa() -> Option<Vec<u8>> {
    rsa_spki(&b64(PROBE_RSA_N), &[1, 0, 1])
}

const PROBES: [Probe; 2] = [
    Probe {
        alg: Alg::Es256,
        spki: probe_p256,
        signature: "M3LFxddp3ZLpefL8J9VLI7oR0gDnr0UBu4yv58E5ZiGYMuUiC6QnVe4sCp7cFlIBciSWsifPU8nsyVdeJUmuYw",
    },
    Probe {
        alg: Alg::Rs256,
        spki: probe_rsa,
        signature: "STDrylcXCmty6vZkMNNZyZhT6BwA-I0antdM3rJ4xskYB_5uuby2FK46u_T5xYbZ19RdMHVDQVFT_3KNMuHh3J1XeC9ZwR7KJfKQXYbhio-8I6sLZ0x1D4HK5x5VudSeOocYCxBjQxg0Y0dfdXArrB5ri6tskMMztfzJ88ZiWIi59bYyOPBUDjUlbB7g8qKKB94ADK_4NHJBxpNEskV4Ga7VDkFFVOXFEDX-j0yl_XN4n3azpdcNOpoqD4dQDNNOfMn7_DJybUk6LjMNCTGWz3qniHgpUu9qpggYxY-CGvmu09DqmZSkImxid0fkSOe-ONL7SZfUV5cngaGk1iHtSg",
    },
];

/// The algorithms `host` verifies correctly: per family (ECDSA P-256; RSA PKCS#1 v1.5, for
/// RS256/384/512 alike), a known-good signature must verify and the same signature with one
/// bit flipped must not. A host that answers anything else keeps the pure-Rust verifiers.
pub fn probe(host: &dyn HostVerifier) -> Vec<Alg> {
    let mut algorithms = Vec::new();
    for probe in &PROBES {
        let (Some(spki), good) = ((probe.spki)(), b64(probe.signature)) else { continue };
        let mut bad = good.clone();
        if let Some(byte) = bad.get_mut(good.len() / 2) {
            *byte ^= 0x01;
        }
        let answers = |sig: &[u8]| verify_with_host(host, probe.alg, &spki, PROBE_TEXT, sig);
        if answers(&good) == Ok(true) && answers(&bad) == Ok(false) {
            algorithms.push(probe.alg);
            if probe.alg == Alg::Rs256 {
                algorithms.extend([Alg::Rs384, Alg::Rs512]);
            }
        }
    }
    algorithms
}

/// The host's crypto and the algorithms it verifies, as the probe found them.
pub struct HostCrypto {
    pub verifier: Box<dyn HostVerifier + Send + Sync>,
    pub algorithms: Vec<Alg>,
}

impl fmt::Debug for HostCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCrypto").field("algorithms", &self.algorithms).finish()
    }
}

impl HostCrypto {
    /// Probes `verifier`; `None` when it verifies none of the algorithms right.
    pub fn probed(verifier: Box<dyn HostVerifier + Send + Sync>) -> Option<HostCrypto> {
        let algorithms = probe(verifier.as_ref());
        (!algorithms.is_empty()).then_some(HostCrypto { verifier, algorithms })
    }

    pub fn takes(&self, alg: Alg) -> bool {
        self.algorithms.contains(&alg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{parse_jwk, KeyMaterial};
    use serde_json::json;

    /// The pure-Rust verifiers behind the host interface: the known answers must hold there.
    struct Native;

    impl HostVerifier for Native {
        fn verify(&self, hash: HashFunction, spki: &[u8], signature: &[u8], text: &[u8]) -> Result<bool, String> {
            let jwk = if spki == probe_p256().unwrap_or_default() {
                use p256::ecdsa::signature::Verifier;
                let sig = p256::ecdsa::DerSignature::from_bytes(signature).map_err(|e| e.to_string())?;
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
                    &[&[0x04][..], &b64(PROBE_P256_X), &b64(PROBE_P256_Y)].concat(),
                )
                .map_err(|e| e.to_string())?;
                return Ok(hash == HashFunction::Sha256 && key.verify(text, &sig).is_ok());
            } else {
                json!({"kty": "RSA", "n": PROBE_RSA_N, "e": "AQAB"})
            };
            let key = parse_jwk(&jwk, &[Alg::Rs256]).ok().flatten().ok_or("no key")?;
            Ok(hash == HashFunction::Sha256 && key.material.verify(Alg::Rs256, text, signature))
        }
    }

    struct Broken(Result<bool, String>);

    impl HostVerifier for Broken {
        fn verify(&self, _: HashFunction, _: &[u8], _: &[u8], _: &[u8]) -> Result<bool, String> {
            self.0.clone()
        }
    }

    #[test]
    fn the_known_answers_are_right_and_a_correct_host_gets_ecdsa_and_rsa() {
        assert_eq!(probe(&Native), vec![Alg::Es256, Alg::Rs256, Alg::Rs384, Alg::Rs512]);
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": PROBE_P256_X, "y": PROBE_P256_Y});
        let key = parse_jwk(&jwk, &[Alg::Es256]).ok().flatten();
        assert!(key.is_some_and(|k| matches!(k.material, KeyMaterial::P256(_))
            && k.material.verify(Alg::Es256, PROBE_TEXT, &b64(PROBES[0].signature))));
    }

    #[test]
    fn a_host_that_says_yes_no_or_fails_to_everything_gets_nothing() {
        for answer in [Ok(true), Ok(false), Err("unimplemented".to_string())] {
            assert_eq!(probe(&Broken(answer.clone())), vec![], "{answer:?}");
            assert!(HostCrypto::probed(Box::new(Broken(answer))).is_none());
        }
    }

    #[test]
    fn spki_encodings_match_openssl() {
        let p256 = "3059301306072a8648ce3d020106082a8648ce3d03010703420004471c3e758c4904285bba7e53118ed0f524adeb0757d25bd2f8e7b0d76dfa714cdd520f7aca8a8b917acc37f51de8f0c9bbe3ad858382e702dc25a12d09f7a858";
        assert_eq!(hex(&probe_p256().unwrap_or_default()), p256);
        let rsa = probe_rsa().unwrap_or_default();
        assert!(hex(&rsa).starts_with("30820122300d06092a864886f70d01010105000382010f003082010a0282010100c14b1c3f"));
        assert!(hex(&rsa).ends_with("77e30203010001"));
        assert_eq!(rsa.len(), 294);
    }

    #[test]
    fn ecdsa_signatures_become_strict_der() {
        let mut raw = vec![0u8; 64];
        raw[31] = 1;
        raw[32] = 0x80;
        assert_eq!(ecdsa_der(&raw, 32).map(|d| hex(&d)), Some(format!("3026020101022100{}{}", "80", "00".repeat(31))));
        assert_eq!(ecdsa_der(&[0; 64], 32), None, "r = s = 0");
        assert_eq!(ecdsa_der(&[1; 63], 32), None, "short");
        assert_eq!(ecdsa_der(&[1; 65], 32), None, "long");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
