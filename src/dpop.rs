//! DPoP (RFC 9449) at the resource server: the checks of §4.3 on a proof JWS, and the RFC 7638
//! thumbprint that binds it to an access token's `cnf.jkt` (§6.1). Pure functions: the caller
//! passes the `DPoP` header values, the request as the client addressed it (`:method`,
//! `:scheme`, `:authority`, `:path`), the access token, its `cnf.jkt` and the time, and keeps
//! the returned `jti` in its replay store. A proof that passes here makes a stolen token
//! useless without the private key.

use crate::canonical::canonical_host;
use crate::host_crypto::{verify_key, HostCrypto};
use crate::keys::{parse_jwk, Alg};
use crate::replay::{token_id, TokenId};
use base64ct::{Base64UrlUnpadded, Encoding};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Why a proof, or its binding to the token, was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpopError {
    /// No `DPoP` header with a DPoP-scheme token.
    ProofMissing,
    /// More than one `DPoP` header, or several proofs in one.
    MultipleProofs,
    /// Larger than the limit.
    ProofTooLarge,
    /// Not a well-formed proof: segments, base64url, JSON, `typ`, `crit`, missing or mistyped
    /// claims.
    ProofInvalid,
    /// `none`, an HMAC algorithm, or one the policy does not allow.
    AlgNotAllowed,
    /// The header's `jwk` has private members (`d`, `p`, `q`, …) or is a symmetric key.
    PrivateKey,
    /// The header's `jwk` is missing, unsupported or does not fit `alg`.
    BadKey,
    /// Not signed by the header's `jwk`.
    BadSignature,
    HtmMismatch,
    /// `htu` is not an absolute http(s) URI without query and fragment.
    HtuInvalid,
    HtuMismatch,
    /// `iat` older than the window, or too far in the future.
    IatOutOfWindow,
    /// `ath` absent, or the hash of another access token.
    AthMismatch,
    /// `jti` absent, empty or longer than the limit.
    JtiInvalid,
    /// The server wants a nonce the proof does not carry (RFC 9449 §8).
    UseNonce,
    /// The access token carries no `cnf.jkt`: it is not DPoP-bound.
    TokenNotBound,
    /// The proof's key is not the one the access token is bound to.
    KeyMismatch,
    /// The host's crypto, found sound at load, failed to answer for the proof's signature.
    CryptoUnavailable,
}

impl DpopError {
    /// The precise reason, for audit records and metrics.
    pub const fn code(self) -> &'static str {
        match self {
            DpopError::ProofMissing => "dpop_proof_missing",
            DpopError::MultipleProofs => "dpop_multiple_proofs",
            DpopError::ProofTooLarge => "dpop_proof_too_large",
            DpopError::ProofInvalid => "dpop_proof_invalid",
            DpopError::AlgNotAllowed => "dpop_alg_not_allowed",
            DpopError::PrivateKey => "dpop_private_key",
            DpopError::BadKey => "dpop_bad_key",
            DpopError::BadSignature => "dpop_bad_signature",
            DpopError::HtmMismatch => "dpop_htm_mismatch",
            DpopError::HtuInvalid => "dpop_htu_invalid",
            DpopError::HtuMismatch => "dpop_htu_mismatch",
            DpopError::IatOutOfWindow => "dpop_iat_out_of_window",
            DpopError::AthMismatch => "dpop_ath_mismatch",
            DpopError::JtiInvalid => "dpop_jti_invalid",
            DpopError::UseNonce => "dpop_use_nonce",
            DpopError::TokenNotBound => "dpop_token_not_bound",
            DpopError::KeyMismatch => "dpop_key_mismatch",
            DpopError::CryptoUnavailable => "dpop_crypto_unavailable",
        }
    }

    /// The `error` of the `WWW-Authenticate: DPoP` challenge (RFC 9449 §7.1, §8, §12.2): the
    /// token itself is at fault when it is not bound or bound to another key.
    pub const fn challenge_error(self) -> &'static str {
        match self {
            DpopError::UseNonce => "use_dpop_nonce",
            DpopError::TokenNotBound | DpopError::KeyMismatch => "invalid_token",
            _ => "invalid_dpop_proof",
        }
    }
}

/// What the policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopOptions {
    /// Asymmetric algorithms accepted for proofs; HMAC ones are refused even if listed.
    pub algorithms: Vec<Alg>,
    /// Oldest accepted `iat`, in seconds before now: the replay store keeps `jti`s this long.
    pub max_age_seconds: i64,
    /// Accepted clock skew of a client ahead of us.
    pub max_future_seconds: i64,
    pub max_proof_bytes: usize,
    pub max_jti_bytes: usize,
    /// Server nonces (RFC 9449 §8, §9), when the deployment uses them: proofs must carry a
    /// current one.
    pub nonce: Option<NonceKey>,
}

impl Default for DpopOptions {
    fn default() -> Self {
        DpopOptions {
            algorithms: vec![Alg::Es256, Alg::EdDsa, Alg::Ps256, Alg::Rs256],
            max_age_seconds: 120,
            max_future_seconds: 30,
            max_proof_bytes: 8 * 1024,
            max_jti_bytes: 256,
            nonce: None,
        }
    }
}

/// The request the proof must be for, as the client addressed it.
#[derive(Debug, Clone, Copy)]
pub struct DpopRequest<'a> {
    pub method: &'a str,
    /// `http` or `https` (Envoy's `:scheme`).
    pub scheme: &'a str,
    /// `host[:port]` (`:authority` / `Host`).
    pub authority: &'a str,
    /// The request target (`:path`); its query and fragment are ignored.
    pub path: &'a str,
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// RFC 7638 thumbprint of the proof's key (equal to the token's `cnf.jkt`).
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
    pub alg: Alg,
    /// The proof's nonce is from an earlier time slot than the current one: the client gets
    /// the current nonce on the response (RFC 9449 §8.2).
    pub nonce_stale: bool,
}

impl VerifiedProof {
    /// The replay-store key: the `jti` under its key's thumbprint (`jti`s are chosen by
    /// clients, so one client cannot burn another's).
    pub fn replay_id(&self) -> TokenId {
        token_id(&format!("dpop:{}", self.jkt), &self.jti)
    }

    /// Until when the `jti` must be remembered: after that the `iat` check refuses it anyway.
    pub fn remember_until(&self, options: &DpopOptions) -> i64 {
        self.iat.saturating_add(options.max_age_seconds)
    }
}

#[derive(Deserialize)]
struct ProofHeader {
    typ: Option<String>,
    alg: String,
    jwk: Option<Value>,
    crit: Option<Value>,
    b64: Option<Value>,
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<i64>,
    ath: Option<String>,
    nonce: Option<String>,
}

/// A JSON number of seconds (fractions dropped); anything else is an error.
fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    let value = serde_json::Number::deserialize(deserializer)?;
    match (value.as_i64(), value.as_f64()) {
        (Some(i), _) => Ok(Some(i)),
        // `as` saturates; a saturated iat fails the window check.
        (None, Some(f)) if f.is_finite() => Ok(Some(f.floor() as i64)),
        _ => Err(serde::de::Error::custom("iat out of range")),
    }
}

/// JWK members that only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4;
/// RFC 8037 §2).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Checks the DPoP proof(s) sent with `access_token` on `request` (RFC 9449 §4.3 and §7.1):
/// exactly one proof, `typ`, an allowed asymmetric `alg`, the signature by the header's public
/// `jwk`, `htm`, `htu`, `iat` within the window, `ath`, `jti`, the nonce if one is required,
/// and the key's thumbprint equal to the token's `cnf.jkt`. Replay of the `jti` is the
/// caller's to check ([`VerifiedProof::replay_id`]).
pub fn check(
    proofs: &[&str],
    request: &DpopRequest<'_>,
    access_token: &str,
    cnf_jkt: Option<&str>,
    options: &DpopOptions,
    now: i64,
) -> Result<VerifiedProof, DpopError> {
    check_with(proofs, request, access_token, cnf_jkt, options, now, None)
}

/// [`check`], with the proof's signature checked by the host's crypto where it takes the
/// algorithm.
pub fn check_with(
    proofs: &[&str],
    request: &DpopRequest<'_>,
    access_token: &str,
    cnf_jkt: Option<&str>,
    options: &DpopOptions,
    now: i64,
    host: Option<&HostCrypto>,
) -> Result<VerifiedProof, DpopError> {
    let proof = check_proof_with(proofs, request, access_token, options, now, host)?;
    match cnf_jkt {
        None => Err(DpopError::TokenNotBound),
        Some(jkt) if jkt == proof.jkt => Ok(proof),
        Some(_) => Err(DpopError::KeyMismatch),
    }
}

/// The checks on the proof alone (everything of [`check`] but the token's binding).
pub fn check_proof(
    proofs: &[&str],
    request: &DpopRequest<'_>,
    access_token: &str,
    options: &DpopOptions,
    now: i64,
) -> Result<VerifiedProof, DpopError> {
    check_proof_with(proofs, request, access_token, options, now, None)
}

/// [`check_proof`], with the proof's signature checked by the host's crypto where it takes
/// the algorithm (every proof is new, so this is the cost of DPoP on a hot token).
fn check_proof_with(
    proofs: &[&str],
    request: &DpopRequest<'_>,
    access_token: &str,
    options: &DpopOptions,
    now: i64,
    host: Option<&HostCrypto>,
) -> Result<VerifiedProof, DpopError> {
    let proof = match proofs {
        [] => return Err(DpopError::ProofMissing),
        // A proxy may have folded two headers into one with a comma, which no JWS contains.
        [one] if one.contains(',') => return Err(DpopError::MultipleProofs),
        [one] => one.trim(),
        _ => return Err(DpopError::MultipleProofs),
    };
    if proof.is_empty() {
        return Err(DpopError::ProofMissing);
    }
    if proof.len() > options.max_proof_bytes {
        return Err(DpopError::ProofTooLarge);
    }
    let mut segments = proof.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(DpopError::ProofInvalid);
    };
    let decode = |segment: &str| Base64UrlUnpadded::decode_vec(segment).map_err(|_| DpopError::ProofInvalid);
    let header: ProofHeader = serde_json::from_slice(&decode(header_b64)?).map_err(|_| DpopError::ProofInvalid)?;
    if !header.typ.as_deref().is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
        || header.crit.is_some()
        || header.b64.is_some()
    {
        return Err(DpopError::ProofInvalid);
    }

    // The algorithm must be allowed by the policy before the key is even looked at.
    let alg = proof_alg(&header.alg)
        .filter(|alg| !alg.is_symmetric() && options.algorithms.contains(alg))
        .ok_or(DpopError::AlgNotAllowed)?;
    let jwk = header.jwk.as_ref().filter(|jwk| jwk.is_object()).ok_or(DpopError::BadKey)?;
    if PRIVATE_MEMBERS.iter().any(|member| jwk.get(member).is_some()) {
        return Err(DpopError::PrivateKey);
    }
    let key = match parse_jwk(jwk, &[alg]) {
        Ok(Some(key)) if key.accepts(alg) => key,
        _ => return Err(DpopError::BadKey),
    };
    let signature = decode(signature_b64)?;
    let signed = proof.get(..header_b64.len() + 1 + claims_b64.len()).ok_or(DpopError::ProofInvalid)?;
    // A host that cannot answer refuses the proof: it never falls back to allowing.
    let verified =
        verify_key(host, &key, alg, signed.as_bytes(), &signature).map_err(|_| DpopError::CryptoUnavailable)?;
    if !verified {
        return Err(DpopError::BadSignature);
    }

    let claims: ProofClaims = serde_json::from_slice(&decode(claims_b64)?).map_err(|_| DpopError::ProofInvalid)?;
    let jti = claims.jti.filter(|j| !j.is_empty() && j.len() <= options.max_jti_bytes).ok_or(DpopError::JtiInvalid)?;
    if claims.htm.as_deref() != Some(request.method) {
        return Err(DpopError::HtmMismatch);
    }
    let htu = claims.htu.as_deref().and_then(normalize_htu).ok_or(DpopError::HtuInvalid)?;
    if request_uri(request.scheme, request.authority, request.path).as_deref() != Some(htu.as_str()) {
        return Err(DpopError::HtuMismatch);
    }
    let iat = claims.iat.ok_or(DpopError::ProofInvalid)?;
    if iat < now.saturating_sub(options.max_age_seconds) || iat > now.saturating_add(options.max_future_seconds) {
        return Err(DpopError::IatOutOfWindow);
    }
    if claims.ath.as_deref() != Some(ath(access_token).as_str()) {
        return Err(DpopError::AthMismatch);
    }
    let nonce_stale = match &options.nonce {
        None => false,
        Some(nonces) => claims.nonce.as_deref().and_then(|n| nonces.age(n, now)).ok_or(DpopError::UseNonce)? > 0,
    };
    let jkt = jwk_thumbprint(jwk).ok_or(DpopError::BadKey)?;
    Ok(VerifiedProof { jkt, jti, iat, alg, nonce_stale })
}

/// Stateless server nonces: the nonce is a time slot and a MAC of it under a key every
/// instance of a deployment is configured with, so any worker of any instance accepts what
/// any other issued, with nothing shared at run time. One is accepted during its own slot
/// and the next (and the one before, for an instance whose clock runs a little ahead): it
/// lives one to two `lifetime`s. Nobody without the key can make one, so a proof cannot be
/// made before its slot began (RFC 9449 §11.1); replay is still the `jti` store's to stop.
#[derive(Clone, PartialEq, Eq)]
pub struct NonceKey {
    key: [u8; 32],
    lifetime: i64,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey").field("lifetime", &self.lifetime).finish_non_exhaustive()
    }
}

/// Slot (8 bytes, big-endian) and the MAC's first 16 bytes, base64url: 32 characters.
const NONCE_MAC_BYTES: usize = 16;

impl NonceKey {
    /// A key from the configured secret (hashed: any length and alphabet); `lifetime` in
    /// seconds, at least 1.
    pub fn new(secret: &[u8], lifetime: i64) -> NonceKey {
        let mut hash = Sha256::new();
        hash.update(b"agentgate dpop nonce key\0");
        hash.update(secret);
        NonceKey { key: hash.finalize().into(), lifetime: lifetime.max(1) }
    }

    fn slot(&self, now: i64) -> i64 {
        now.div_euclid(self.lifetime)
    }

    fn mac(&self, slot: i64) -> Option<[u8; NONCE_MAC_BYTES]> {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).ok()?;
        mac.update(&slot.to_be_bytes());
        mac.finalize().into_bytes().get(..NONCE_MAC_BYTES)?.try_into().ok()
    }

    /// The nonce of the current slot.
    pub fn issue(&self, now: i64) -> String {
        let slot = self.slot(now);
        let mut bytes = slot.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.mac(slot).unwrap_or_default());
        Base64UrlUnpadded::encode_string(&bytes)
    }

    /// How many slots ago `nonce` was issued (-1 to 1), or `None` when it is no nonce of this
    /// key, or too old.
    pub fn age(&self, nonce: &str, now: i64) -> Option<i64> {
        let mut bytes = [0u8; 8 + NONCE_MAC_BYTES];
        let decoded = Base64UrlUnpadded::decode(nonce, &mut bytes).ok()?;
        let (slot, mac) = decoded.split_first_chunk::<8>()?;
        let slot = i64::from_be_bytes(*slot);
        let age = self.slot(now).checked_sub(slot).filter(|age| (-1..=1).contains(age))?;
        let expected = self.mac(slot)?;
        // Constant time: the MAC is the secret part.
        let differs =
            expected.iter().zip(mac).fold(mac.len() ^ NONCE_MAC_BYTES, |acc, (a, b)| acc | usize::from(a ^ b));
        (differs == 0).then_some(age)
    }
}

/// A proof's `alg`: the JOSE names, plus RFC 9864's fully-specified `Ed25519` (sent by the
/// npm `dpop` client, among others) for EdDSA over Ed25519.
fn proof_alg(name: &str) -> Option<Alg> {
    if name == "Ed25519" {
        return Some(Alg::EdDsa);
    }
    Alg::from_name(name)
}

/// base64url(SHA-256(access token)): the proof's `ath` (RFC 9449 §4.2).
pub fn ath(access_token: &str) -> String {
    Base64UrlUnpadded::encode_string(&Sha256::digest(access_token.as_bytes()))
}

/// The RFC 7638 JWK thumbprint (SHA-256, base64url) of a public EC P-256/P-384, RSA or OKP
/// key: its required members, in lexicographic order, as compact JSON.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let member = |name: &str| jwk.get(name).and_then(Value::as_str).map(|v| Value::from(v).to_string());
    let canonical = match jwk.get("kty").and_then(Value::as_str)? {
        "EC" => format!(r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#, member("crv")?, member("x")?, member("y")?),
        "RSA" => format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, member("e")?, member("n")?),
        "OKP" => format!(r#"{{"crv":{},"kty":"OKP","x":{}}}"#, member("crv")?, member("x")?),
        _ => return None,
    };
    Some(Base64UrlUnpadded::encode_string(&Sha256::digest(canonical.as_bytes())))
}

/// The request's URI as a proof's `htu` names it: `scheme://authority/path`, query and
/// fragment dropped, normalized like [`normalize_htu`].
pub fn request_uri(scheme: &str, authority: &str, target: &str) -> Option<String> {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    normalize(scheme, authority, path)
}

/// An `htu` after RFC 3986 syntax- and scheme-based normalization (§6.2.2, §6.2.3): scheme and
/// host in lower case, a host's trailing dot and the scheme's default port dropped, an empty
/// path as `/`, percent-escapes of unreserved characters decoded and the others in upper
/// case, dot segments removed. `None` for anything but an absolute http(s) URI without
/// userinfo, query or fragment.
pub fn normalize_htu(htu: &str) -> Option<String> {
    let (scheme, rest) = htu.split_once("://")?;
    if rest.contains(['?', '#']) {
        return None;
    }
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    normalize(scheme, authority, path)
}

fn normalize(scheme: &str, authority: &str, path: &str) -> Option<String> {
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    if authority.contains('@') {
        return None;
    }
    let host = canonical_host(authority)?;
    let port = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((before, port)) if !port.contains(']') && (!authority.starts_with('[') || before.ends_with(']')) => {
            Some(port.parse::<u16>().ok()?)
        }
        _ => None,
    };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let port = port.filter(|&p| p != default_port).map(|p| format!(":{p}")).unwrap_or_default();
    if !path.is_empty() && !path.starts_with('/') {
        return None;
    }
    let path = remove_dot_segments(&normalize_escapes(path)?);
    Some(format!("{scheme}://{host}{port}{path}"))
}

/// Percent-escapes of unreserved characters decoded, the others' hex digits in upper case.
fn normalize_escapes(path: &str) -> Option<String> {
    let mut out = String::with_capacity(path.len());
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let (high, low) = (chars.next()?.to_digit(16)?, chars.next()?.to_digit(16)?);
        let byte = u8::try_from(high * 16 + low).ok()?;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    Some(out)
}

/// RFC 3986 §5.2.4 on an absolute path (or none: `/`).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
        // `/a/.` and `/a/..` name a directory: keep the trailing slash.
        if last && matches!(segment, "." | "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_test_harness::tokens::{b64, Signer};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;
    const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2ln";

    fn request() -> DpopRequest<'static> {
        DpopRequest { method: "POST", scheme: "https", authority: "api.example.com", path: "/invoices/42/pay?x=1" }
    }

    /// The signer's public key as a proof header carries it (no kid, use or alg).
    fn public_jwk(signer: &Signer) -> Value {
        let mut jwk = signer.jwk();
        if let Some(members) = jwk.as_object_mut() {
            for name in ["kid", "use", "alg"] {
                members.remove(name);
            }
        }
        jwk
    }

    fn claims() -> Value {
        json!({
            "jti": "e1j3V_bKic8-LAEB",
            "htm": "POST",
            "htu": "https://api.example.com/invoices/42/pay",
            "iat": NOW,
            "ath": ath(TOKEN),
        })
    }

    fn header(signer: &Signer) -> Value {
        json!({"typ": "dpop+jwt", "alg": signer.alg, "jwk": public_jwk(signer)})
    }

    fn proof(signer: &Signer, claims: &Value) -> String {
        signer.sign_with_header(&header(signer), claims)
    }

    fn run(proof: &str) -> Result<VerifiedProof, DpopError> {
        check_proof(&[proof], &request(), TOKEN, &DpopOptions::default(), NOW)
    }

    fn es256() -> Signer {
        Signer::es256("client", 11)
    }

    #[test]
    fn proofs_of_each_key_type_verify_and_bind() {
        for signer in [es256(), Signer::eddsa("c", 12), Signer::rs256("c", 13), Signer::ps256("c", 14)] {
            let verified = run(&proof(&signer, &claims())).unwrap_or_else(|e| panic!("{}: {e:?}", signer.alg));
            assert_eq!(verified.jti, "e1j3V_bKic8-LAEB");
            assert_eq!(verified.iat, NOW);
            let jkt = jwk_thumbprint(&public_jwk(&signer));
            assert_eq!(Some(verified.jkt.clone()), jkt);
            let bound =
                check(&[&proof(&signer, &claims())], &request(), TOKEN, jkt.as_deref(), &Default::default(), NOW);
            assert_eq!(bound.map(|p| p.jkt), Ok(verified.jkt));
        }
    }

    #[test]
    fn the_binding_to_the_token_is_checked() {
        let p = proof(&es256(), &claims());
        let other = jwk_thumbprint(&public_jwk(&Signer::es256("x", 99)));
        let opts = DpopOptions::default();
        assert_eq!(check(&[&p], &request(), TOKEN, other.as_deref(), &opts, NOW), Err(DpopError::KeyMismatch));
        assert_eq!(check(&[&p], &request(), TOKEN, None, &opts, NOW), Err(DpopError::TokenNotBound));
        assert_eq!(DpopError::KeyMismatch.challenge_error(), "invalid_token");
    }

    #[test]
    fn thumbprints_match_the_rfc_examples_and_an_independent_implementation() {
        // RFC 7638 §3.1.
        let rsa = json!({
            "kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        });
        assert_eq!(jwk_thumbprint(&rsa).as_deref(), Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"));
        // RFC 8037 §A.3.
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(jwk_thumbprint(&ed).as_deref(), Some("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"));
        // A P-256 key, against RFC 7638's byte form written out here (npm `dpop` computes the
        // same for real keys in test-harness/tests/oidc_provider_dpop.rs).
        let jwk = public_jwk(&es256());
        let (x, y) = (jwk["x"].as_str().unwrap_or_default(), jwk["y"].as_str().unwrap_or_default());
        let text = ["{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"", x, "\",\"y\":\"", y, "\"}"].concat();
        assert_eq!(jwk_thumbprint(&jwk), Some(b64(&Sha256::digest(text.as_bytes()))));
        assert_eq!(jwk_thumbprint(&json!({"kty": "oct", "k": "AA"})), None);
        assert_eq!(jwk_thumbprint(&json!({"kty": "EC", "crv": "P-256", "x": "AA"})), None);
    }

    #[test]
    fn hostile_algorithms_are_refused() {
        let signer = es256();
        let unsigned = format!(
            "{}.{}.",
            b64(json!({"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(&signer)}).to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        assert_eq!(run(&unsigned), Err(DpopError::AlgNotAllowed));
        // `none` signed anyway, and its case variants.
        for none in ["none", "None", "NONE"] {
            let mut header = header(&signer);
            header["alg"] = json!(none);
            assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::AlgNotAllowed), "{none}");
        }

        // HS256 keyed with the public key's bytes: refused even by a policy that lists HS256.
        use hmac::{Hmac, KeyInit, Mac};
        let jwk = public_jwk(&signer);
        let signed = format!(
            "{}.{}",
            b64(json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}).to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(jwk.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        mac.update(signed.as_bytes());
        let hs = format!("{signed}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(run(&hs), Err(DpopError::AlgNotAllowed));
        let lax = DpopOptions { algorithms: vec![Alg::Hs256, Alg::Es256], ..Default::default() };
        assert_eq!(check_proof(&[&hs], &request(), TOKEN, &lax, NOW), Err(DpopError::AlgNotAllowed));

        // An allowed algorithm the key does not fit, and one the policy does not allow.
        let mut header = header(&signer);
        header["alg"] = json!("RS256");
        assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::BadKey));
        let es_only = DpopOptions { algorithms: vec![Alg::Es256], ..Default::default() };
        let ed = proof(&Signer::eddsa("c", 12), &claims());
        assert_eq!(check_proof(&[&ed], &request(), TOKEN, &es_only, NOW), Err(DpopError::AlgNotAllowed));
    }

    #[test]
    fn a_private_or_symmetric_jwk_is_refused() {
        let signer = es256();
        let mut header = header(&signer);
        header["jwk"]["d"] = json!(b64(&[7u8; 32]));
        assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::PrivateKey));
        let rsa = Signer::rs256("c", 13);
        let mut header = self::header(&rsa);
        header["jwk"]["p"] = json!("AQAB");
        assert_eq!(run(&rsa.sign_with_header(&header, &claims())), Err(DpopError::PrivateKey));
        let mut header = self::header(&signer);
        header["jwk"] = json!({"kty": "oct", "k": b64(&[1; 32])});
        assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::PrivateKey));
        header["jwk"] = Value::Null;
        assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::BadKey));
    }

    /// A host's P-256 verifier (SPKI DER ends with the 65-byte point), counting its calls,
    /// or one that cannot answer.
    struct HostP256(std::sync::Arc<std::sync::atomic::AtomicUsize>, bool);

    impl crate::host_crypto::HostVerifier for HostP256 {
        fn verify(
            &self,
            _: crate::host_crypto::HashFunction,
            spki: &[u8],
            der: &[u8],
            text: &[u8],
        ) -> Result<bool, String> {
            use p256::ecdsa::signature::Verifier;
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if !self.1 {
                return Err("status 10".into());
            }
            let point = spki.get(spki.len().saturating_sub(65)..).unwrap_or_default();
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|e| e.to_string())?;
            let signature = p256::ecdsa::DerSignature::from_bytes(der).map_err(|e| e.to_string())?;
            Ok(key.verify(text, &signature).is_ok())
        }
    }

    #[test]
    fn the_proof_signature_goes_to_the_host_crypto_which_never_allows_when_it_fails() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let host = |answers| HostCrypto {
            verifier: Box::new(HostP256(std::sync::Arc::clone(&calls), answers)),
            algorithms: vec![Alg::Es256],
        };
        let (sound, failing) = (host(true), host(false));
        let opts = DpopOptions::default();
        let good = proof(&es256(), &claims());
        let check = |p: &str, host: &HostCrypto| check_proof_with(&[p], &request(), TOKEN, &opts, NOW, Some(host));
        assert!(check(&good, &sound).is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "verified by the host");
        let (signed, _) = good.rsplit_once('.').unwrap_or_default();
        let other = proof(&Signer::es256("client", 12), &claims());
        let forged = format!("{signed}.{}", other.rsplit_once('.').unwrap_or_default().1);
        assert_eq!(check(&forged, &sound).err(), Some(DpopError::BadSignature));
        assert_eq!(check(&good, &failing).err(), Some(DpopError::CryptoUnavailable));
    }

    #[test]
    fn a_proof_signed_by_another_key_than_its_jwk_is_refused() {
        let (victim, attacker) = (es256(), Signer::es256("attacker", 66));
        let forged = attacker.sign_with_header(&header(&victim), &claims());
        assert_eq!(run(&forged), Err(DpopError::BadSignature));
        // And a valid proof with one flipped bit anywhere in the signed part.
        let good = proof(&victim, &claims());
        let (signed, signature) = good.rsplit_once('.').unwrap_or_default();
        let mut bytes = signed.as_bytes().to_vec();
        bytes[signed.len() / 2] ^= 1;
        let flipped = format!("{}.{signature}", String::from_utf8_lossy(&bytes));
        assert!(run(&flipped).is_err());
    }

    #[test]
    fn the_header_must_be_a_dpop_proof() {
        let signer = es256();
        for typ in [json!("JWT"), json!("at+jwt"), Value::Null] {
            let mut header = header(&signer);
            header["typ"] = typ;
            assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::ProofInvalid));
        }
        let mut header = header(&signer);
        header["crit"] = json!(["exp"]);
        assert_eq!(run(&signer.sign_with_header(&header, &claims())), Err(DpopError::ProofInvalid));
        for malformed in ["", "a.b", "a.b.c.d", "!!.e30.AA"] {
            assert!(matches!(run(malformed), Err(DpopError::ProofMissing | DpopError::ProofInvalid)), "{malformed}");
        }
    }

    #[test]
    fn exactly_one_proof() {
        let p = proof(&es256(), &claims());
        let opts = DpopOptions::default();
        assert_eq!(check_proof(&[], &request(), TOKEN, &opts, NOW), Err(DpopError::ProofMissing));
        assert_eq!(check_proof(&[&p, &p], &request(), TOKEN, &opts, NOW), Err(DpopError::MultipleProofs));
        assert_eq!(check_proof(&[&format!("{p},{p}")], &request(), TOKEN, &opts, NOW), Err(DpopError::MultipleProofs));
        let huge = format!("{p}{}", "A".repeat(9000));
        assert_eq!(run(&huge), Err(DpopError::ProofTooLarge));
    }

    fn with(claim: &str, value: Value) -> String {
        let mut claims = claims();
        claims[claim] = value;
        proof(&es256(), &claims)
    }

    #[test]
    fn htm_must_be_the_method() {
        assert_eq!(run(&with("htm", json!("GET"))), Err(DpopError::HtmMismatch));
        assert_eq!(run(&with("htm", json!("post"))), Err(DpopError::HtmMismatch));
    }

    #[test]
    fn htu_is_compared_after_normalization() {
        for same in [
            "HTTPS://API.Example.COM/invoices/42/pay",
            "https://api.example.com.:443/invoices/42/pay",
            "https://api.example.com/invoices/%34%32/pay",
            "https://api.example.com/invoices/x/../42/./pay",
        ] {
            assert!(run(&with("htu", json!(same))).is_ok(), "{same}");
        }
        for other in [
            "https://evil.example.com/invoices/42/pay",
            "https://api.example.com.evil.com/invoices/42/pay",
            "http://api.example.com/invoices/42/pay",
            "https://api.example.com:8443/invoices/42/pay",
            "https://api.example.com/invoices/43/pay",
            "https://api.example.com/Invoices/42/pay",
        ] {
            assert_eq!(run(&with("htu", json!(other))), Err(DpopError::HtuMismatch), "{other}");
        }
        for invalid in [
            json!("https://api.example.com/invoices/42/pay?x=1"),
            json!("https://api.example.com/invoices/42/pay#f"),
            json!("https://user@api.example.com/invoices/42/pay"),
            json!("ftp://api.example.com/invoices/42/pay"),
            json!("/invoices/42/pay"),
            json!("https://api.example.com/invoices/%4/pay"),
            json!(42),
        ] {
            let expected = if invalid.is_string() { Err(DpopError::HtuInvalid) } else { Err(DpopError::ProofInvalid) };
            assert_eq!(run(&with("htu", invalid.clone())), expected, "{invalid}");
        }
    }

    #[test]
    fn the_request_side_is_normalized_too() {
        let p = proof(&es256(), &claims());
        let opts = DpopOptions::default();
        for (scheme, authority) in
            [("HTTPS", "Api.Example.com"), ("https", "api.example.com.:443"), ("https", "api.example.com:443")]
        {
            let request = DpopRequest { scheme, authority, ..request() };
            assert!(check_proof(&[&p], &request, TOKEN, &opts, NOW).is_ok(), "{scheme} {authority}");
        }
        let request = DpopRequest { authority: "api.example.com:8443", ..request() };
        assert_eq!(check_proof(&[&p], &request, TOKEN, &opts, NOW), Err(DpopError::HtuMismatch));
        assert_eq!(request_uri("http", "[::1]:8080", "/a?b").as_deref(), Some("http://[::1]:8080/a"));
        assert_eq!(request_uri("http", "[::1]:80", "").as_deref(), Some("http://[::1]/"));
        assert_eq!(normalize_htu("https://a.example/b/%7e%2f").as_deref(), Some("https://a.example/b/~%2F"));
        assert_eq!(request_uri("https", "a.example:99999", "/"), None);
    }

    #[test]
    fn iat_must_be_recent_and_not_in_the_future() {
        assert!(run(&with("iat", json!(NOW - 120))).is_ok());
        assert!(run(&with("iat", json!(NOW + 30))).is_ok());
        assert_eq!(run(&with("iat", json!(NOW - 121))), Err(DpopError::IatOutOfWindow));
        assert_eq!(run(&with("iat", json!(NOW + 31))), Err(DpopError::IatOutOfWindow));
        assert_eq!(run(&with("iat", json!(NOW + 10 * 365 * 86_400))), Err(DpopError::IatOutOfWindow));
        assert_eq!(run(&with("iat", json!(1e300))), Err(DpopError::IatOutOfWindow));
        assert_eq!(run(&with("iat", json!("1800000000"))), Err(DpopError::ProofInvalid));
        assert_eq!(run(&with("iat", Value::Null)), Err(DpopError::ProofInvalid));
    }

    #[test]
    fn ath_must_be_the_hash_of_this_token() {
        assert_eq!(run(&with("ath", json!(ath("another.access.token")))), Err(DpopError::AthMismatch));
        assert_eq!(run(&with("ath", Value::Null)), Err(DpopError::AthMismatch));
        // RFC 9449 §7.1's example token and ath.
        assert_eq!(ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
    }

    #[test]
    fn jti_is_required_and_bounded() {
        assert_eq!(run(&with("jti", Value::Null)), Err(DpopError::JtiInvalid));
        assert_eq!(run(&with("jti", json!(""))), Err(DpopError::JtiInvalid));
        assert_eq!(run(&with("jti", json!("j".repeat(257)))), Err(DpopError::JtiInvalid));
        let verified = run(&with("jti", json!("j".repeat(256)))).unwrap_or_else(|e| panic!("{e:?}"));
        let again = run(&with("jti", json!("j".repeat(256)))).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(verified.replay_id(), again.replay_id());
        assert_eq!(verified.remember_until(&DpopOptions::default()), NOW + 120);
        let other_key = run(&proof(&Signer::es256("c", 12), &claims())).unwrap_or_else(|e| panic!("{e:?}"));
        let same_jti = run(&proof(&es256(), &claims())).unwrap_or_else(|e| panic!("{e:?}"));
        assert_ne!(other_key.replay_id(), same_jti.replay_id());
    }

    #[test]
    fn a_required_nonce_must_be_carried() {
        let key = NonceKey::new(b"a secret shared by the fleet", 60);
        let opts = DpopOptions { nonce: Some(key.clone()), ..Default::default() };
        let run_nonce = |p: &str| check_proof(&[p], &request(), TOKEN, &opts, NOW);
        assert_eq!(run_nonce(&proof(&es256(), &claims())), Err(DpopError::UseNonce));
        assert_eq!(run_nonce(&with("nonce", json!("n-0"))), Err(DpopError::UseNonce));
        let current = run_nonce(&with("nonce", json!(key.issue(NOW)))).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(!current.nonce_stale);
        let previous = run_nonce(&with("nonce", json!(key.issue(NOW - 60)))).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(previous.nonce_stale, "the response carries the current one");
        assert_eq!(DpopError::UseNonce.challenge_error(), "use_dpop_nonce");
        // Without a required nonce, one the client sent anyway is ignored.
        assert!(run(&with("nonce", json!("n-0"))).is_ok());
    }

    #[test]
    fn nonces_expire_and_cannot_be_forged() {
        let key = NonceKey::new(b"a secret shared by the fleet", 60);
        let nonce = key.issue(NOW);
        assert_eq!(nonce.len(), 32);
        // Issued anywhere with the same secret, at any second of the slot: the same nonce.
        assert_eq!(NonceKey::new(b"a secret shared by the fleet", 60).issue(NOW - NOW % 60 + 59), nonce);
        assert_eq!(key.age(&nonce, NOW), Some(0));
        assert_eq!(key.age(&nonce, NOW + 60), Some(1));
        assert_eq!(key.age(&nonce, NOW - 60), Some(-1), "an instance whose clock is a little behind");
        assert_eq!(key.age(&nonce, NOW + 120), None, "expired");
        assert_eq!(key.age(&nonce, NOW - 120), None);
        // Another key's nonce, a slot moved forward under the old MAC, bit flips, garbage.
        assert_eq!(NonceKey::new(b"another deployment's secret", 60).age(&nonce, NOW), None);
        let mut bytes = Base64UrlUnpadded::decode_vec(&nonce).unwrap_or_default();
        bytes[7] ^= 1;
        let moved = Base64UrlUnpadded::encode_string(&bytes);
        assert_eq!(key.age(&moved, NOW), None);
        bytes[7] ^= 1;
        bytes[20] ^= 0x80;
        assert_eq!(key.age(&Base64UrlUnpadded::encode_string(&bytes), NOW), None);
        for garbage in ["", "AAAA", &nonce[..31], &format!("{nonce}AA"), "!!!!", &"A".repeat(4096)] {
            assert_eq!(key.age(garbage, NOW), None, "{garbage}");
        }
        assert!(!format!("{key:?}").contains("key:"), "the key is not logged");
    }

    #[test]
    fn codes_are_distinct() {
        use DpopError::*;
        let all = [
            ProofMissing,
            MultipleProofs,
            ProofTooLarge,
            ProofInvalid,
            AlgNotAllowed,
            PrivateKey,
            BadKey,
            BadSignature,
            HtmMismatch,
            HtuInvalid,
            HtuMismatch,
            IatOutOfWindow,
            AthMismatch,
            JtiInvalid,
            UseNonce,
            TokenNotBound,
            KeyMismatch,
            CryptoUnavailable,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert!(codes.iter().all(|c| c.starts_with("dpop_")));
    }
}
