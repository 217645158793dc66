//! Test identity provider: deterministic keys, public JWKs, and tokens minted with any
//! header and claims (including hostile ones).

use base64ct::{Base64UrlUnpadded, Encoding};
use jwt_compact::alg::{Ed25519, Es256, Rsa};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmSignature};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub const ISSUER: &str = "https://idp.example.com";
pub const AUDIENCE: &str = "https://api.example.com";

enum SigningKey {
    Es256(p256::ecdsa::SigningKey),
    Rsa(Rsa, Box<rsa::RsaPrivateKey>),
    Ed25519(ed25519_dalek::SigningKey),
}

/// A signing key with its `kid`. Keys are derived from `seed`, so two signers with the same
/// algorithm and seed hold the same key.
pub struct Signer {
    pub alg: &'static str,
    pub kid: String,
    key: SigningKey,
}

fn rsa_key(seed: u64) -> rsa::RsaPrivateKey {
    static CACHE: OnceLock<Mutex<HashMap<u64, rsa::RsaPrivateKey>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(seed)
        .or_insert_with(|| {
            rsa::RsaPrivateKey::new(&mut ChaCha8Rng::seed_from_u64(seed), 2048).expect("RSA key generation")
        })
        .clone()
}

fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut bytes = [7u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes
}

impl Signer {
    pub fn es256(kid: &str, seed: u64) -> Signer {
        let key = p256::ecdsa::SigningKey::from_slice(&seed_bytes(seed)).expect("P-256 scalar");
        Signer { alg: "ES256", kid: kid.into(), key: SigningKey::Es256(key) }
    }

    /// A fresh P-256 key from the operating system's randomness.
    pub fn generate_es256(kid: &str) -> Signer {
        let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        Signer { alg: "ES256", kid: kid.into(), key: SigningKey::Es256(key) }
    }

    pub fn rs256(kid: &str, seed: u64) -> Signer {
        Signer { alg: "RS256", kid: kid.into(), key: SigningKey::Rsa(Rsa::rs256(), Box::new(rsa_key(seed))) }
    }

    pub fn ps256(kid: &str, seed: u64) -> Signer {
        Signer { alg: "PS256", kid: kid.into(), key: SigningKey::Rsa(Rsa::ps256(), Box::new(rsa_key(seed))) }
    }

    pub fn eddsa(kid: &str, seed: u64) -> Signer {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed_bytes(seed));
        Signer { alg: "EdDSA", kid: kid.into(), key: SigningKey::Ed25519(key) }
    }

    /// The public JWK, with `kid`, `alg` and `use`, as an identity provider publishes it.
    pub fn jwk(&self) -> Value {
        let jwk = match &self.key {
            SigningKey::Es256(k) => serde_json::to_value(JsonWebKey::from(k.verifying_key())),
            SigningKey::Rsa(_, k) => serde_json::to_value(JsonWebKey::from(&k.to_public_key())),
            SigningKey::Ed25519(k) => serde_json::to_value(JsonWebKey::from(&k.verifying_key())),
        };
        let mut value = jwk.expect("JWK serializes");
        value["kid"] = json!(self.kid);
        value["alg"] = json!(self.alg);
        value["use"] = json!("sig");
        value
    }

    /// A JWKS holding this key only.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk()]})
    }

    /// A token with the standard header (`alg`, `typ`, `kid`) and `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({"alg": self.alg, "typ": "JWT", "kid": self.kid}), claims)
    }

    /// A token with exactly this header, signed with this key whatever the header says.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        format!("{signed}.{}", b64(&self.signature(signed.as_bytes())))
    }

    fn signature(&self, message: &[u8]) -> Vec<u8> {
        match &self.key {
            SigningKey::Es256(k) => Es256.sign(k, message).as_bytes().into_owned(),
            SigningKey::Rsa(alg, k) => alg.sign(k, message).as_bytes().into_owned(),
            SigningKey::Ed25519(k) => Ed25519.sign(k, message).as_bytes().into_owned(),
        }
    }
}

/// DPoP (RFC 9449) client side, with jwt-compact's RFC 7638 thumbprint and sha2: not the
/// core's code.
impl Signer {
    /// The public key as a DPoP proof's header carries it (no `kid`, `alg` or `use`).
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.jwk();
        if let Some(members) = jwk.as_object_mut() {
            for name in ["kid", "alg", "use"] {
                members.remove(name);
            }
        }
        jwk
    }

    /// The key's RFC 7638 thumbprint: a bound token's `cnf.jkt`.
    pub fn jkt(&self) -> String {
        use sha2::Sha256;
        let thumbprint = match &self.key {
            SigningKey::Es256(k) => JsonWebKey::from(k.verifying_key()).thumbprint::<Sha256>(),
            SigningKey::Rsa(_, k) => JsonWebKey::from(&k.to_public_key()).thumbprint::<Sha256>(),
            SigningKey::Ed25519(k) => JsonWebKey::from(&k.verifying_key()).thumbprint::<Sha256>(),
        };
        b64(&thumbprint)
    }

    /// A DPoP proof by this key for `htm` `htu` with `token`, at `iat`, with a server nonce.
    pub fn dpop_proof(&self, token: &str, htm: &str, htu: &str, jti: &str, iat: i64, nonce: Option<&str>) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk()});
        let mut claims = json!({"jti": jti, "htm": htm, "htu": htu, "iat": iat, "ath": ath(token)});
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        self.sign_with_header(&header, &claims)
    }
}

/// base64url(SHA-256(token)): a DPoP proof's `ath`.
pub fn ath(token: &str) -> String {
    use sha2::Digest;
    b64(&sha2::Sha256::digest(token.as_bytes()))
}

pub fn b64(bytes: &[u8]) -> String {
    Base64UrlUnpadded::encode_string(bytes)
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Claims of a valid agent token issued at `now`, living five minutes.
pub fn agent_claims(sub: &str, scope: &str, now: i64) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "scope": scope,
        "iat": now,
        "exp": now + 300,
        "jti": format!("{sub}-{now}"),
    })
}

/// A policy with one provider (the test issuer and audience, ES256/RS256/PS256/EdDSA, the
/// given JWKS) and the given rules, in `mode`.
pub fn policy(jwks: &Value, rules: &Value, mode: &str) -> String {
    json!({
        "mode": mode,
        "providers": [{
            "name": "corp-idp",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["ES256", "RS256", "PS256", "EdDSA"],
            "jwks": jwks,
        }],
        "rules": rules,
    })
    .to_string()
}

/// The rule of the foundation example: GET /invoices/{id} needs `invoices:read`.
pub fn read_invoice_rule() -> Value {
    json!([{
        "name": "read-invoice",
        "match": {"methods": ["GET"], "path": "/invoices/{id}"},
        "require": {"scopes": ["invoices:read"]}
    }])
}
