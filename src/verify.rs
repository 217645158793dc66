//! Stage 2: verify the token: issuer → provider, key selection, signature, then claims.

use crate::keys::Alg;
use crate::policy::{Policy, Provider};
use crate::reason::Reason;
use jwt_compact::{Claims, UntrustedToken};
use serde::Deserialize;

/// What a verified token tells us about the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    pub issuer: String,
    pub provider: String,
    pub subject: Option<String>,
    pub jti: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}

/// The claims agentgate reads; `exp`, `nbf` and `iat` come from jwt-compact's `Claims`.
#[derive(Deserialize)]
struct AgentClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    jti: Option<String>,
    /// RFC 8693 / RFC 9068: space-delimited.
    scope: Option<String>,
    /// The array form some issuers use instead.
    scp: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn intersects(&self, allowed: &[String]) -> bool {
        match self {
            Audience::One(aud) => allowed.contains(aud),
            Audience::Many(auds) => auds.iter().any(|aud| allowed.contains(aud)),
        }
    }
}

/// Verifies `token` against `policy` at `now` (Unix seconds).
pub fn verify(policy: &Policy, token: &str, now: i64) -> Result<VerifiedToken, Reason> {
    let untrusted = UntrustedToken::new(token).map_err(|_| Reason::Malformed)?;
    let claims: Claims<AgentClaims> =
        untrusted.deserialize_claims_unchecked().map_err(|_| Reason::Malformed)?;
    // The issuer is read before the signature is checked only to pick whose keys to check it with.
    let provider = claims
        .custom
        .iss
        .as_deref()
        .and_then(|iss| policy.provider_for(iss))
        .ok_or(Reason::UnknownIssuer)?;
    check_signature(provider, &untrusted, token)?;
    check_claims(provider, &claims, now)?;

    let custom = claims.custom;
    let scopes = match (custom.scope, custom.scp) {
        (Some(scope), _) => scope.split_ascii_whitespace().map(str::to_string).collect(),
        (None, Some(scp)) => scp,
        (None, None) => Vec::new(),
    };
    Ok(VerifiedToken {
        issuer: provider.issuer.clone(),
        provider: provider.name.clone(),
        subject: custom.sub,
        jti: custom.jti,
        scopes,
        expires_at: claims.expiration.map_or(0, |exp| exp.timestamp()),
    })
}

/// Checks only the signature of `token` with `provider`'s keys: no claim is looked at.
pub fn verify_signature(provider: &Provider, token: &str) -> Result<(), Reason> {
    let untrusted = UntrustedToken::new(token).map_err(|_| Reason::Malformed)?;
    check_signature(provider, &untrusted, token)
}

fn check_signature(provider: &Provider, untrusted: &UntrustedToken<'_>, token: &str) -> Result<(), Reason> {
    let alg = Alg::from_name(untrusted.algorithm())
        .filter(|alg| provider.algorithms.contains(alg))
        .ok_or(Reason::AlgNotAllowed)?;
    let signed = token.rsplit_once('.').map(|(signed, _)| signed).ok_or(Reason::Malformed)?;
    select_and_check(provider, alg, untrusted.header().key_id.as_deref(), signed.as_bytes(), untrusted.signature_bytes())
}

/// A token with a `kid` is checked with that key only; one without is tried against every
/// key that accepts its algorithm.
fn select_and_check(provider: &Provider, alg: Alg, kid: Option<&str>, signed: &[u8], signature: &[u8]) -> Result<(), Reason> {
    let mut candidates = provider.keys.iter().filter(|key| kid.is_none() || key.kid.as_deref() == kid).peekable();
    if candidates.peek().is_none() {
        return Err(Reason::UnknownKid);
    }
    let mut fitting = candidates.filter(|key| key.accepts(alg)).peekable();
    if fitting.peek().is_none() {
        // The key the token names exists but is not for this algorithm: an algorithm
        // confusion attempt, or a misissued token.
        return Err(if kid.is_some() { Reason::AlgNotAllowed } else { Reason::UnknownKid });
    }
    if fitting.any(|key| key.material.verify(alg, signed, signature)) {
        Ok(())
    } else {
        Err(Reason::BadSignature)
    }
}

fn check_claims(provider: &Provider, claims: &Claims<AgentClaims>, now: i64) -> Result<(), Reason> {
    let skew = i64::try_from(provider.clock_skew_seconds).unwrap_or(i64::MAX);
    let exp = claims.expiration.ok_or(Reason::MissingExp)?.timestamp();
    if now >= exp.saturating_add(skew) {
        return Err(Reason::Expired);
    }
    let not_before = |t: Option<chrono::DateTime<chrono::Utc>>| t.is_some_and(|t| t.timestamp() > now.saturating_add(skew));
    if not_before(claims.not_before) || not_before(claims.issued_at) {
        return Err(Reason::NotYetValid);
    }
    if !claims.custom.aud.as_ref().is_some_and(|aud| aud.intersects(&provider.audiences)) {
        return Err(Reason::AudienceMismatch);
    }
    Ok(())
}
