//! Stage 2: verify the token: parse (with limits), issuer → provider, key selection and
//! signature, then the claims (time, audience, lifetime, type, subject).

use crate::jws::{self, Claims, Header, Limits, Parsed};
use crate::keys::Alg;
use crate::policy::{normalize_type, Policy, Provider};
use crate::reason::Reason;

/// What a verified token tells us about the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// Index of the provider in `policy.providers`.
    pub provider_index: usize,
    pub issuer: String,
    pub provider: String,
    pub subject: Option<String>,
    pub jti: Option<String>,
    pub scopes: Vec<String>,
    pub issued_at: Option<i64>,
    pub not_before: Option<i64>,
    pub expires_at: i64,
}

/// Verifies `token` against `policy` at `now` (Unix seconds).
pub fn verify(policy: &Policy, token: &str, now: i64) -> Result<VerifiedToken, Reason> {
    let verified = verify_untimed(policy, token)?;
    check_time_in(policy, &verified, now)?;
    Ok(verified)
}

/// Every check that does not depend on the clock: the result may be cached for the token,
/// as long as [`check_time_in`] runs on each use.
pub fn verify_untimed(policy: &Policy, token: &str) -> Result<VerifiedToken, Reason> {
    let parsed = jws::parse(token, &policy.limits)?;
    // The issuer is read before the signature is checked only to pick whose keys to check it with.
    let (index, provider) = parsed
        .claims
        .iss
        .as_deref()
        .and_then(|iss| policy.providers.iter().enumerate().find(|(_, p)| p.issuer == iss))
        .ok_or(Reason::UnknownIssuer)?;
    check_signature(provider, &parsed)?;
    check_header(provider, &parsed.header)?;
    accept(index, provider, parsed.claims)
}

/// [`check_time`] with the token's own provider.
pub fn check_time_in(policy: &Policy, token: &VerifiedToken, now: i64) -> Result<(), Reason> {
    let provider = policy.providers.get(token.provider_index).ok_or(Reason::UnknownIssuer)?;
    check_time(provider, token, now)
}

/// Checks only the signature of `token` with `provider`'s keys: no claim is looked at.
pub fn verify_signature(provider: &Provider, token: &str, limits: &Limits) -> Result<(), Reason> {
    check_signature(provider, &jws::parse(token, limits)?)
}

fn check_signature(provider: &Provider, parsed: &Parsed<'_>) -> Result<(), Reason> {
    let alg = Alg::from_name(&parsed.header.alg).filter(|alg| provider.algorithms.contains(alg)).ok_or(Reason::AlgNotAllowed)?;
    let kid = parsed.header.kid.as_deref();
    // A token with a `kid` is checked with that key only; one without is tried against every
    // key that accepts its algorithm.
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
    let signed = parsed.signed.as_bytes();
    if fitting.any(|key| key.material.verify(alg, signed, &parsed.signature)) {
        Ok(())
    } else {
        Err(Reason::BadSignature)
    }
}

fn check_header(provider: &Provider, header: &Header) -> Result<(), Reason> {
    match (&provider.token_types, &header.typ) {
        (None, _) => Ok(()),
        (Some(allowed), Some(typ)) if allowed.contains(&normalize_type(typ)) => Ok(()),
        (Some(_), _) => Err(Reason::TypeNotAllowed),
    }
}

/// The checks that do not depend on the time; their result can be cached with the token.
fn accept(provider_index: usize, provider: &Provider, claims: Claims) -> Result<VerifiedToken, Reason> {
    let expires_at = claims.exp.ok_or(Reason::MissingExp)?;
    if !claims.aud.as_ref().is_some_and(|aud| aud.intersects(&provider.audiences)) {
        return Err(Reason::AudienceMismatch);
    }
    if let Some(patterns) = &provider.subjects {
        let sub = claims.sub.as_deref().ok_or(Reason::SubjectNotAllowed)?;
        if !patterns.iter().any(|p| p.matches(sub)) {
            return Err(Reason::SubjectNotAllowed);
        }
    }
    if let (Some(max), Some(iat)) = (provider.max_lifetime_seconds, claims.iat) {
        if expires_at.saturating_sub(iat) > i64::try_from(max).unwrap_or(i64::MAX) {
            return Err(Reason::LifetimeTooLong);
        }
    }
    let scopes = match (claims.scope, claims.scp) {
        (Some(scope), _) => scope.split_ascii_whitespace().map(str::to_string).collect(),
        (None, Some(scp)) => scp,
        (None, None) => Vec::new(),
    };
    Ok(VerifiedToken {
        provider_index,
        issuer: provider.issuer.clone(),
        provider: provider.name.clone(),
        subject: claims.sub,
        jti: claims.jti,
        scopes,
        issued_at: claims.iat,
        not_before: claims.nbf,
        expires_at,
    })
}

/// The checks against the clock, run on every use of a token, cached or not.
pub fn check_time(provider: &Provider, token: &VerifiedToken, now: i64) -> Result<(), Reason> {
    let skew = i64::try_from(provider.clock_skew_seconds).unwrap_or(i64::MAX);
    if now >= token.expires_at.saturating_add(skew) {
        return Err(Reason::Expired);
    }
    let in_future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(skew));
    if in_future(token.not_before) || in_future(token.issued_at) {
        return Err(Reason::NotYetValid);
    }
    if let Some(max) = provider.max_lifetime_seconds {
        // Also without `iat`: a token may not live longer than the maximum from now on.
        if token.expires_at.saturating_sub(now) > i64::try_from(max).unwrap_or(i64::MAX).saturating_add(skew) {
            return Err(Reason::LifetimeTooLong);
        }
    }
    Ok(())
}
