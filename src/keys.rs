//! Signing algorithms and verification keys: JWKs decoded once at configure time, and the
//! signature check itself (jwt-compact's algorithms on RustCrypto keys).

use jwt_compact::alg::{Ed25519, Es256, Rsa, StrongAlg, StrongKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature};
use rsa::RsaPublicKey;
use serde::Deserialize;
use serde_json::Value;

/// A JWS algorithm agentgate verifies. The algorithm used for a token is always one of the
/// provider's allowed algorithms and must fit the selected key: never taken from the token
/// alone (so `none` and HS256-with-a-public-key confusion cannot happen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alg {
    Es256,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    EdDsa,
}

impl Alg {
    pub const ALL: [Alg; 8] =
        [Alg::Es256, Alg::Rs256, Alg::Rs384, Alg::Rs512, Alg::Ps256, Alg::Ps384, Alg::Ps512, Alg::EdDsa];

    /// The JOSE name (RFC 7518), matched exactly: `none`, `NONE` or `es256` are not algorithms.
    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|alg| alg.name() == name)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn rsa(self) -> Option<Rsa> {
        match self {
            Alg::Rs256 => Some(Rsa::rs256()),
            Alg::Rs384 => Some(Rsa::rs384()),
            Alg::Rs512 => Some(Rsa::rs512()),
            Alg::Ps256 => Some(Rsa::ps256()),
            Alg::Ps384 => Some(Rsa::ps384()),
            Alg::Ps512 => Some(Rsa::ps512()),
            Alg::Es256 | Alg::EdDsa => None,
        }
    }
}

/// Decoded public key material.
#[derive(Debug)]
pub enum KeyMaterial {
    /// At least 2048 bits, checked at configure time.
    Rsa(StrongKey<RsaPublicKey>),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl KeyMaterial {
    /// Whether this key can verify `alg` at all (RFC 7518 key type per algorithm).
    pub fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (KeyMaterial::P256(_), Alg::Es256)
                | (KeyMaterial::Ed25519(_), Alg::EdDsa)
                | (KeyMaterial::Rsa(_), Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512)
        )
    }

    /// Checks `signature` over `signed` (the token's `header.payload`) with `alg`.
    pub fn verify(&self, alg: Alg, signed: &[u8], signature: &[u8]) -> bool {
        match (self, alg.rsa()) {
            (KeyMaterial::Rsa(key), Some(rsa)) => check(&StrongAlg(rsa), key, signed, signature),
            (KeyMaterial::P256(key), None) if alg == Alg::Es256 => check(&Es256, key, signed, signature),
            (KeyMaterial::Ed25519(key), None) if alg == Alg::EdDsa => check(&Ed25519, key, signed, signature),
            _ => false,
        }
    }
}

fn check<A: Algorithm>(alg: &A, key: &A::VerifyingKey, signed: &[u8], signature: &[u8]) -> bool {
    if let Some(len) = A::Signature::LENGTH {
        if signature.len() != len.get() {
            return false;
        }
    }
    // Parsing rejects out-of-range values such as an ECDSA signature with r = s = 0.
    match A::Signature::try_from_slice(signature) {
        Ok(signature) => alg.verify_signature(&signature, key, signed),
        Err(_) => false,
    }
}

/// A verification key from a JWKS, with the metadata that selects it.
#[derive(Debug)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWK pins one.
    pub alg: Option<Alg>,
    pub material: KeyMaterial,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Alg) -> bool {
        self.alg.is_none_or(|pinned| pinned == alg) && self.material.fits(alg)
    }
}

/// The JWK members that select a key; the key material itself is read by jwt-compact.
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
    if meta.d.is_some() {
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
    let material = decode_material(jwk, meta.kty.as_deref(), meta.crv.as_deref())?;
    let key = Key { kid: meta.kid, alg, material };
    if !allowed.iter().any(|&alg| key.accepts(alg)) {
        return Err("fits none of the provider's algorithms".into());
    }
    Ok(Some(key))
}

fn decode_material(jwk: &Value, kty: Option<&str>, crv: Option<&str>) -> Result<KeyMaterial, String> {
    match (kty, crv) {
        (Some("RSA"), _) | (Some("EC"), Some("P-256")) | (Some("OKP"), Some("Ed25519")) => {}
        (Some("EC" | "OKP"), crv) => return Err(format!("unsupported curve {crv:?} (supported: P-256, Ed25519)")),
        (None, _) => return Err("missing kty".into()),
        (kty, _) => return Err(format!("unsupported kty {kty:?} (supported: RSA, EC, OKP)")),
    }
    let parsed: JsonWebKey<'_> = serde_json::from_value(jwk.clone()).map_err(|e| format!("invalid key: {e}"))?;
    let invalid = |e: jwt_compact::jwk::JwkError| format!("invalid key: {e}");
    match &parsed {
        JsonWebKey::Rsa { .. } => {
            let key = RsaPublicKey::try_from(&parsed).map_err(invalid)?;
            StrongKey::try_from(key)
                .map(KeyMaterial::Rsa)
                .map_err(|_| "RSA key is shorter than 2048 bits".to_string())
        }
        JsonWebKey::EllipticCurve { .. } => {
            p256::ecdsa::VerifyingKey::try_from(&parsed).map(KeyMaterial::P256).map_err(invalid)
        }
        _ => ed25519_dalek::VerifyingKey::try_from(&parsed).map(KeyMaterial::Ed25519).map_err(invalid),
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
        for bogus in ["none", "None", "NONE", "es256", "HS256", ""] {
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
    fn unsupported_curve_is_named() {
        let jwk = json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"});
        let e = parse_jwk(&jwk, &[Alg::Es256]).err().unwrap_or_default();
        assert!(e.contains("unsupported curve"), "{e}");
    }
}
