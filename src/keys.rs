//! Signing algorithms and verification keys: JWKs decoded once at configure time, and the
//! signature check itself (the RustCrypto crates: p256, p384, rsa, ed25519-dalek, hmac).

use base64ct::{Base64UrlUnpadded, Encoding};
use hmac::{EagerHash, Hmac, KeyInit, Mac};
use rsa::{BoxedUint, Pkcs1v15Sign, Pss, PublicKey as RsaPublicKey};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::sync::{Arc, RwLock};

/// A JWS algorithm agentgate verifies. The algorithm used for a token is always one of the
/// provider's allowed algorithms and must fit the selected key: never taken from the token
/// alone (so `none` and HS256-with-a-public-key confusion cannot happen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alg {
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    EdDsa,
    Hs256,
    Hs384,
    Hs512,
}

impl Alg {
    pub const ALL: [Alg; 12] = [
        Alg::Es256,
        Alg::Es384,
        Alg::Rs256,
        Alg::Rs384,
        Alg::Rs512,
        Alg::Ps256,
        Alg::Ps384,
        Alg::Ps512,
        Alg::EdDsa,
        Alg::Hs256,
        Alg::Hs384,
        Alg::Hs512,
    ];

    /// The JOSE name (RFC 7518), matched exactly: `none`, `NONE` or `es256` are not algorithms.
    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|alg| alg.name() == name)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::EdDsa => "EdDSA",
            Alg::Hs256 => "HS256",
            Alg::Hs384 => "HS384",
            Alg::Hs512 => "HS512",
        }
    }

    /// HMAC algorithms use a shared secret: a provider must list them explicitly.
    pub const fn is_symmetric(self) -> bool {
        matches!(self, Alg::Hs256 | Alg::Hs384 | Alg::Hs512)
    }

    const fn is_rsa(self) -> bool {
        matches!(self, Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512)
    }

    /// RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
    const fn min_secret_bytes(self) -> usize {
        match self {
            Alg::Hs384 => 48,
            Alg::Hs512 => 64,
            _ => 32,
        }
    }
}

/// Why ES384 is refused by a build without it (the filter leaves P-384 out by default: its
/// arithmetic is a sixth of the module).
pub const ES384_MISSING: &str = "ES384 (P-384) is not in this build of agentgate: build it with the es384 feature \
                                 (`make build FEATURES=es384`)";

/// Decoded key material.
#[derive(Debug)]
pub enum KeyMaterial {
    /// 2048 to 8192 bits, checked at configure time.
    Rsa(RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    #[cfg(feature = "es384")]
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    /// An `oct` secret for HS256/384/512.
    Secret(Vec<u8>),
}

impl KeyMaterial {
    /// Whether this key can verify `alg` at all (RFC 7518 key type per algorithm).
    pub fn fits(&self, alg: Alg) -> bool {
        match self {
            KeyMaterial::Rsa(_) => alg.is_rsa(),
            KeyMaterial::P256(_) => alg == Alg::Es256,
            #[cfg(feature = "es384")]
            KeyMaterial::P384(_) => alg == Alg::Es384,
            KeyMaterial::Ed25519(_) => alg == Alg::EdDsa,
            KeyMaterial::Secret(secret) => alg.is_symmetric() && secret.len() >= alg.min_secret_bytes(),
        }
    }

    /// Checks `signature` over `signed` (the token's `header.payload`) with `alg`.
    pub fn verify(&self, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
        if !self.fits(alg) {
            return false;
        }
        match self {
            KeyMaterial::Rsa(key) => verify_rsa(key, alg, signed, signature),
            KeyMaterial::P256(key) => {
                use p256::ecdsa::signature::Verifier;
                // Parsing rejects out-of-range values such as r = s = 0.
                p256::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify(signed, &sig).is_ok())
            }
            #[cfg(feature = "es384")]
            KeyMaterial::P384(key) => {
                use p384::ecdsa::signature::Verifier;
                p384::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify(signed, &sig).is_ok())
            }
            // Strict: no small-order keys or non-canonical signatures (RFC 8032 section 5.1.7).
            KeyMaterial::Ed25519(key) => {
                ed25519_dalek::Signature::from_slice(signature).is_ok_and(|sig| key.verify_strict(signed, &sig).is_ok())
            }
            KeyMaterial::Secret(secret) => match alg {
                Alg::Hs256 => verify_hmac::<Sha256>(secret, signed, signature),
                Alg::Hs384 => verify_hmac::<Sha384>(secret, signed, signature),
                _ => verify_hmac::<Sha512>(secret, signed, signature),
            },
        }
    }
}

/// HMAC over `signed`, compared in constant time.
fn verify_hmac<D: EagerHash>(secret: &[u8], signed: &[u8], signature: &[u8]) -> bool {
    let Ok(mut mac) = <Hmac<D> as KeyInit>::new_from_slice(secret) else { return false };
    mac.update(signed);
    mac.verify_slice(signature).is_ok()
}

/// RSASSA-PKCS1-v1_5 (RS*) or RSASSA-PSS (PS*, salt as long as the hash: RFC 7518 section
/// 3.5) over the SHA-2 digest of `signed`.
fn verify_rsa(key: &RsaPublicKey, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
    let result = match alg {
        Alg::Rs256 => key.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(signed), signature),
        Alg::Rs384 => key.verify(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(signed), signature),
        Alg::Rs512 => key.verify(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(signed), signature),
        Alg::Ps256 => key.verify(Pss::<Sha256>::new(), &Sha256::digest(signed), signature),
        Alg::Ps384 => key.verify(Pss::<Sha384>::new(), &Sha384::digest(signed), signature),
        Alg::Ps512 => key.verify(Pss::<Sha512>::new(), &Sha512::digest(signed), signature),
        _ => return false,
    };
    result.is_ok()
}

/// A verification key from a JWKS, with the metadata that selects it.
#[derive(Debug)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWK pins one.
    pub alg: Option<Alg>,
    pub material: KeyMaterial,
    /// SubjectPublicKeyInfo (DER) of RSA and P-256 keys, for a host that verifies itself
    /// (see `host_crypto`).
    pub spki: Option<Vec<u8>>,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Alg) -> bool {
        self.alg.is_none_or(|pinned| pinned == alg) && self.material.fits(alg)
    }
}

/// The JWK members that select a key; the key material itself is decoded per key type below.
#[derive(Deserialize)]
struct JwkMeta {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    crv: Option<String>,
    d: Option<Value>,
}

/// Decodes one JWK. `Ok(None)` for keys meant for encryption (`"use": "enc"`), which a JWKS
/// may legitimately contain next to signing keys. `allowed` is the provider's algorithm list.
pub fn parse_jwk(jwk: &Value, allowed: &[Alg]) -> Result<Option<Key>, String> {
    let meta: JwkMeta = serde_json::from_value(jwk.clone()).map_err(|e| e.to_string())?;
    if meta.usage.as_deref() == Some("enc") {
        return Ok(None);
    }
    let symmetric = meta.kty.as_deref() == Some("oct");
    if meta.d.is_some() && !symmetric {
        return Err("is a private key (has \"d\"); publish only the public key".into());
    }
    let alg = match meta.alg.as_deref() {
        None => None,
        Some(name) => match Alg::from_name(name) {
            Some(alg) if allowed.contains(&alg) => Some(alg),
            Some(_) => return Err(format!("alg {name} is not in the provider's algorithms")),
            None => return Err(format!("unsupported alg {name:?}")),
        },
    };
    let (material, spki) = decode_material(jwk, meta.kty.as_deref(), meta.crv.as_deref())?;
    if let KeyMaterial::Secret(secret) = &material {
        if let Some(alg) = alg.filter(|alg| secret.len() < alg.min_secret_bytes()) {
            return Err(format!(
                "oct key is shorter than {} bits, the minimum for {}",
                alg.min_secret_bytes() * 8,
                alg.name()
            ));
        }
    }
    let key = Key { kid: meta.kid, alg, material, spki };
    if !allowed.iter().any(|&alg| key.accepts(alg)) {
        return Err(if symmetric {
            "oct key fits none of the provider's algorithms (list HS256/HS384/HS512 explicitly; the secret must be at least as long as the hash)".into()
        } else {
            "fits none of the provider's algorithms".into()
        });
    }
    Ok(Some(key))
}

fn base64_member(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let text = jwk.get(name).and_then(Value::as_str).ok_or_else(|| format!("missing {name}"))?;
    Base64UrlUnpadded::decode_vec(text).map_err(|_| format!("{name} is not unpadded base64url"))
}

/// The key material, and its SubjectPublicKeyInfo where a host may verify with it.
fn decode_material(
    jwk: &Value,
    kty: Option<&str>,
    crv: Option<&str>,
) -> Result<(KeyMaterial, Option<Vec<u8>>), String> {
    match (kty, crv) {
        (Some("RSA"), _) => decode_rsa(jwk),
        (Some("EC"), Some("P-256")) => {
            let point = ec_point(jwk, 32, "P-256")?;
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map(|key| (KeyMaterial::P256(key), Some(crate::host_crypto::p256_spki(&point))))
                .map_err(|_| "invalid key: not a point on P-256".to_string())
        }
        #[cfg(not(feature = "es384"))]
        (Some("EC"), Some("P-384")) => Err(ES384_MISSING.into()),
        #[cfg(feature = "es384")]
        (Some("EC"), Some("P-384")) => {
            let point = ec_point(jwk, 48, "P-384")?;
            p384::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map(|key| (KeyMaterial::P384(key), None))
                .map_err(|_| "invalid key: not a point on P-384".to_string())
        }
        (Some("OKP"), Some("Ed25519")) => {
            let x = base64_member(jwk, "x")?;
            let x: &[u8; 32] = x.as_slice().try_into().map_err(|_| "invalid key: Ed25519 x must be 32 bytes")?;
            ed25519_dalek::VerifyingKey::from_bytes(x)
                .map(|key| (KeyMaterial::Ed25519(key), None))
                .map_err(|_| "invalid key: not an Ed25519 point".to_string())
        }
        (Some("oct"), _) => base64_member(jwk, "k").map(|k| (KeyMaterial::Secret(k), None)),
        (Some("EC" | "OKP"), crv) => Err(format!("unsupported curve {crv:?} (supported: P-256, P-384, Ed25519)")),
        (None, _) => Err("missing kty".into()),
        (kty, _) => Err(format!("unsupported kty {kty:?} (supported: RSA, EC, OKP, oct)")),
    }
}

/// An RSA key from `n` and `e` (RFC 7518 section 6.3.1): 2048 to 8192 bits, odd modulus,
/// exponent checked by `rsa`.
fn decode_rsa(jwk: &Value) -> Result<(KeyMaterial, Option<Vec<u8>>), String> {
    let (n_bytes, e_bytes) = (base64_member(jwk, "n")?, base64_member(jwk, "e")?);
    let spki = crate::host_crypto::rsa_spki(&n_bytes, &e_bytes);
    let (n, e) = (BoxedUint::from_be_slice_vartime(&n_bytes), BoxedUint::from_be_slice_vartime(&e_bytes));
    RsaPublicKey::new_with_size_limits(n, e, 2048..=8192).map(|key| (KeyMaterial::Rsa(key), spki)).map_err(
        |e| match e {
            rsa::Error::ModulusTooSmall => "RSA key is shorter than 2048 bits".to_string(),
            e => format!("invalid key: {e}"),
        },
    )
}

/// The SEC1 uncompressed point `04 || x || y` of an EC JWK whose coordinates are `size` bytes.
fn ec_point(jwk: &Value, size: usize, curve: &str) -> Result<Vec<u8>, String> {
    let (x, y) = (base64_member(jwk, "x")?, base64_member(jwk, "y")?);
    if x.len() != size || y.len() != size {
        return Err(format!("invalid key: {curve} coordinates must be {size} bytes"));
    }
    Ok([&[0x04][..], &x, &y].concat())
}

/// A provider's keys: fixed at configure time, or replaced whenever its JWKS is refetched.
/// Readers take a snapshot; an install swaps it whole.
#[derive(Debug, Default)]
pub struct KeySet {
    current: RwLock<Arc<Installed>>,
}

/// One key set as installed.
#[derive(Debug, Default)]
pub struct Installed {
    pub keys: Vec<Key>,
    /// Fetched keys are not used past this (Unix seconds); fixed keys have no limit.
    pub usable_until: Option<i64>,
    /// The shared record's version the keys came from (0: none yet, or fixed).
    pub version: u64,
    /// SHA-256 of the JWKS document the keys came from (zeros for fixed keys): a refresh
    /// that brings the same document changes nothing that was verified.
    pub digest: [u8; 32],
}

impl KeySet {
    pub fn fixed(keys: Vec<Key>) -> KeySet {
        KeySet { current: RwLock::new(Arc::new(Installed { keys, usable_until: None, version: 0, digest: [0; 32] })) }
    }

    pub fn current(&self) -> Arc<Installed> {
        let guard = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&guard)
    }

    pub fn install(&self, installed: Installed) {
        let mut guard = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Arc::new(installed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // RFC 8037 appendix A.2 Ed25519 public key.
    fn ed_jwk() -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    }

    #[test]
    fn algorithm_names_are_exact() {
        assert_eq!(Alg::from_name("ES256"), Some(Alg::Es256));
        assert_eq!(Alg::from_name("EdDSA"), Some(Alg::EdDsa));
        for bogus in ["none", "None", "NONE", "es256", "hs256", "ES512", ""] {
            assert_eq!(Alg::from_name(bogus), None, "{bogus}");
        }
    }

    #[test]
    fn okp_key_fits_only_eddsa() {
        let key = parse_jwk(&ed_jwk(), &[Alg::EdDsa]).ok().flatten();
        let key = key.unwrap_or_else(|| panic!("Ed25519 key rejected"));
        assert!(key.accepts(Alg::EdDsa));
        assert!(!key.accepts(Alg::Es256));
        assert!(!key.accepts(Alg::Rs256));
    }

    #[test]
    fn key_for_no_allowed_algorithm_is_refused() {
        let e = parse_jwk(&ed_jwk(), &[Alg::Es256]).err().unwrap_or_default();
        assert_eq!(e, "fits none of the provider's algorithms");
    }

    #[test]
    fn key_alg_outside_allowlist_is_refused() {
        let mut jwk = ed_jwk();
        jwk["alg"] = json!("EdDSA");
        let e = parse_jwk(&jwk, &[Alg::Es256]).err().unwrap_or_default();
        assert_eq!(e, "alg EdDSA is not in the provider's algorithms");
    }

    #[test]
    fn private_key_is_refused() {
        let mut jwk = ed_jwk();
        jwk["d"] = json!("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A");
        let e = parse_jwk(&jwk, &[Alg::EdDsa]).err().unwrap_or_default();
        assert!(e.contains("private key"), "{e}");
    }

    #[test]
    fn encryption_keys_are_skipped() {
        let mut jwk = ed_jwk();
        jwk["use"] = json!("enc");
        assert!(matches!(parse_jwk(&jwk, &[Alg::EdDsa]), Ok(None)));
    }

    #[test]
    fn short_rsa_key_is_refused() {
        let n = format!("{}8", "_".repeat(170)); // 2^1024 - 1
        let jwk = json!({"kty": "RSA", "n": n, "e": "AQAB"});
        let e = parse_jwk(&jwk, &[Alg::Rs256]).err().unwrap_or_default();
        assert_eq!(e, "RSA key is shorter than 2048 bits");
    }

    #[test]
    fn malformed_key_material_is_refused_with_the_reason() {
        let b64 = |bytes: &[u8]| Base64UrlUnpadded::encode_string(bytes);
        let off_curve = json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[2; 32])});
        assert_eq!(parse_jwk(&off_curve, &[Alg::Es256]).err().unwrap_or_default(), "invalid key: not a point on P-256");
        let short = json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[2; 32])});
        assert!(parse_jwk(&short, &[Alg::Es256]).is_err_and(|e| e.contains("must be 32 bytes")));
        let ed_short = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&[1; 31])});
        assert!(parse_jwk(&ed_short, &[Alg::EdDsa]).is_err_and(|e| e.contains("must be 32 bytes")));
        let even = json!({"kty": "RSA", "n": b64(&[0xaa; 256]), "e": "AQAB"});
        assert!(parse_jwk(&even, &[Alg::Rs256]).is_err_and(|e| e.starts_with("invalid key")));
        let no_e = json!({"kty": "RSA", "n": b64(&[0xab; 256])});
        assert!(parse_jwk(&no_e, &[Alg::Rs256]).is_err_and(|e| e == "missing e"));
    }

    #[test]
    fn unsupported_curve_is_named() {
        let jwk = json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"});
        let e = parse_jwk(&jwk, &[Alg::Es256]).err().unwrap_or_default();
        assert!(e.contains("unsupported curve"), "{e}");
    }
}

#[cfg(test)]
mod symmetric_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn oct_key_needs_hs_listed_and_a_long_enough_secret() {
        let k32 = Base64UrlUnpadded::encode_string(&[7u8; 32]);
        let jwk = json!({"kty": "oct", "k": k32});
        assert!(parse_jwk(&jwk, &[Alg::Es256, Alg::Rs256]).is_err_and(|e| e.contains("list HS256")));
        let key = parse_jwk(&jwk, &[Alg::Hs256, Alg::Hs512]).ok().flatten();
        assert!(key.as_ref().is_some_and(|k| k.accepts(Alg::Hs256) && !k.accepts(Alg::Hs512)));
        let pinned = json!({"kty": "oct", "k": k32, "alg": "HS512"});
        assert!(parse_jwk(&pinned, &[Alg::Hs512]).is_err_and(|e| e.contains("shorter than 512 bits")));
    }

    #[test]
    fn hmac_key_never_verifies_an_asymmetric_algorithm() {
        let secret = KeyMaterial::Secret(vec![1; 64]);
        for alg in [Alg::Es256, Alg::Rs256, Alg::EdDsa] {
            assert!(!secret.fits(alg));
            assert!(!secret.verify(alg, b"x", &[0; 64]));
        }
    }
}
