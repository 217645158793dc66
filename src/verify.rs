//! Stage 2: verify the token: parse (with limits), issuer → provider, key selection and
//! signature, then the claims (time, audience, lifetime, type, subject).

use crate::host_crypto::{verify_key, HostCrypto};
use crate::jws::{self, Actor, Claims, Header, Limits, Parsed};
use crate::keys::{Alg, Key};
use crate::policy::{normalize_type, Policy, Provider};
use crate::reason::Reason;
use serde_json::Value;

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
    /// `aud`, for rules that need a particular resource (MCP, RFC 8707).
    pub audiences: Vec<String>,
    /// `cnf.jkt`: the token is DPoP-bound to this key thumbprint (RFC 9449).
    pub cnf_jkt: Option<String>,
    /// `cnf["x5t#S256"]`: the token is bound to this client certificate (RFC 8705).
    pub cnf_x5t: Option<String>,
    pub issued_at: Option<i64>,
    pub not_before: Option<i64>,
    pub expires_at: i64,
    /// The delegation chain from `act`, current actor first; empty when not delegated.
    pub actors: Vec<String>,
    /// The `sub`s named by `may_act`, when the token has one.
    pub may_act: Option<Vec<String>>,
    /// RFC 9396 task entries (from `authorization_details` or the provider's `task_claim`).
    pub tasks: Vec<Task>,
    pub acr: Option<String>,
    pub auth_time: Option<i64>,
    /// Every claim, kept only when the policy has claim conditions.
    pub claims: Option<serde_json::Map<String, Value>>,
}

impl VerifiedToken {
    /// Who is acting: the current actor of a delegated token, else the subject.
    pub fn agent(&self) -> Option<&str> {
        self.actors.first().map(String::as_str).or(self.subject.as_deref())
    }

    /// On whose behalf, when someone else is acting: the subject of a delegated token.
    pub fn on_behalf_of(&self) -> Option<&str> {
        if self.actors.is_empty() {
            None
        } else {
            self.subject.as_deref()
        }
    }
}

/// One RFC 9396 `authorization_details` entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Task {
    pub kind: String,
    pub actions: Vec<String>,
    pub locations: Vec<String>,
    pub datatypes: Vec<String>,
    pub identifier: Option<String>,
}

/// Entries that are not objects with a string `type` are skipped: a malformed entry grants
/// nothing (and a rule that needs a task then fails closed).
fn tasks_from(value: &Value) -> Vec<Task> {
    let strings = |entry: &Value, key: &str| -> Vec<String> {
        entry
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let entries = match value {
        Value::Array(entries) => entries.as_slice(),
        single @ Value::Object(_) => std::slice::from_ref(single),
        _ => &[],
    };
    entries
        .iter()
        .filter_map(|entry| {
            let kind = entry.get("type")?.as_str()?.to_string();
            Some(Task {
                kind,
                actions: strings(entry, "actions"),
                locations: strings(entry, "locations"),
                datatypes: strings(entry, "datatypes"),
                identifier: entry.get("identifier").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect()
}

/// The delegation chain, current actor first. An actor without a `sub` names nobody that
/// rules, revocation or the audit trail could hold to account: the token is malformed.
fn actor_chain(act: Option<&Actor>) -> Result<Vec<String>, Reason> {
    let mut chain = Vec::new();
    let mut current = act;
    while let Some(actor) = current {
        let sub = actor.sub.as_deref().filter(|s| !s.is_empty()).ok_or(Reason::Malformed)?;
        chain.push(sub.to_string());
        current = actor.act.as_deref();
    }
    Ok(chain)
}

/// A token without `kid` is tried against at most this many keys; with more candidates it
/// must name its key (`unknown_kid`), so a key-less token cannot cost many signature checks.
pub const MAX_KEYS_WITHOUT_KID: usize = 4;

fn may_act_subjects(value: &Value) -> Vec<String> {
    let sub = |v: &Value| v.get("sub").and_then(Value::as_str).map(str::to_string);
    match value {
        Value::Array(entries) => entries.iter().filter_map(sub).collect(),
        other => sub(other).into_iter().collect(),
    }
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
    verify_untimed_with(policy, token, None)
}

/// How the signature of a token is dealt with.
#[derive(Debug, Clone, Copy)]
pub enum Signature<'a> {
    /// Checked, by the host's crypto for the algorithms it takes.
    Check(Option<&'a HostCrypto>),
    /// Already checked by a worker of this proxy under the same policy and keys (the shared
    /// verified-token cache): everything else is checked again.
    CheckedElsewhere,
}

/// [`verify_untimed`], with signatures of the algorithms `host` takes checked by the host.
pub fn verify_untimed_with(policy: &Policy, token: &str, host: Option<&HostCrypto>) -> Result<VerifiedToken, Reason> {
    verify_untimed_as(policy, token, Signature::Check(host))
}

pub fn verify_untimed_as(policy: &Policy, token: &str, signature: Signature<'_>) -> Result<VerifiedToken, Reason> {
    let parsed = jws::parse(token, &policy.limits)?;
    // The issuer is read before the signature is checked only to pick whose keys to check it with.
    let (index, provider) = parsed
        .claims
        .iss
        .as_deref()
        .and_then(|iss| policy.providers.iter().enumerate().find(|(_, p)| p.issuer == iss))
        .ok_or(Reason::UnknownIssuer)?;
    if let Signature::Check(host) = signature {
        check_signature(provider, &parsed, host)?;
    }
    check_header(provider, &parsed.header)?;
    // A Txn-Token is its own type, whatever `token_types` lists.
    if provider.transaction_tokens
        && parsed.header.typ.as_deref().map(normalize_type).as_deref() != Some("txntoken+jwt")
    {
        return Err(Reason::TypeNotAllowed);
    }
    let all_claims = if policy.needs_claims || provider.transaction_tokens {
        Some(
            serde_json::from_slice::<serde_json::Map<String, Value>>(&parsed.claims_json)
                .map_err(|_| Reason::Malformed)?,
        )
    } else {
        None
    };
    let tasks = match &provider.task_claim {
        None => parsed.claims.authorization_details.as_ref().map(tasks_from).unwrap_or_default(),
        Some(name) => serde_json::from_slice::<serde_json::Map<String, Value>>(&parsed.claims_json)
            .ok()
            .and_then(|claims| claims.get(name).map(tasks_from))
            .unwrap_or_default(),
    };
    let mut verified = accept(index, provider, parsed.claims, tasks)?;
    verified.claims = all_claims;
    Ok(verified)
}

/// [`check_time`] with the token's own provider.
pub fn check_time_in(policy: &Policy, token: &VerifiedToken, now: i64) -> Result<(), Reason> {
    let provider = policy.providers.get(token.provider_index).ok_or(Reason::UnknownIssuer)?;
    // Fetched keys past their limit verify nothing, not even tokens checked while they were fresh.
    if provider.keys.current().usable_until.is_some_and(|until| now >= until) {
        return Err(Reason::KeysUnavailable);
    }
    check_time(provider, token, now)
}

/// Checks only the signature of `token` with `provider`'s keys: no claim is looked at.
pub fn verify_signature(provider: &Provider, token: &str, limits: &Limits) -> Result<(), Reason> {
    check_signature(provider, &jws::parse(token, limits)?, None)
}

/// [`verify_signature`] through the host's crypto for the algorithms it takes.
pub fn verify_signature_with(
    provider: &Provider,
    token: &str,
    limits: &Limits,
    host: Option<&HostCrypto>,
) -> Result<(), Reason> {
    check_signature(provider, &jws::parse(token, limits)?, host)
}

fn check_signature(provider: &Provider, parsed: &Parsed<'_>, host: Option<&HostCrypto>) -> Result<(), Reason> {
    let alg = Alg::from_name(&parsed.header.alg)
        .filter(|alg| provider.algorithms.contains(alg))
        .ok_or(Reason::AlgNotAllowed)?;
    let kid = parsed.header.kid.as_deref();
    let installed = provider.keys.current();
    if installed.keys.is_empty() {
        // Only fetched keys can be missing: none fetched yet (or the last fetch is too old).
        return Err(Reason::KeysUnavailable);
    }
    // A token with a `kid` is checked with that key only; one without is tried against every
    // key that accepts its algorithm.
    let mut candidates = installed.keys.iter().filter(|key| kid.is_none() || key.kid.as_deref() == kid).peekable();
    if candidates.peek().is_none() {
        return Err(Reason::UnknownKid);
    }
    let mut fitting = candidates.filter(|key| key.accepts(alg)).peekable();
    if fitting.peek().is_none() {
        // The key the token names exists but is not for this algorithm: an algorithm
        // confusion attempt, or a misissued token.
        return Err(if kid.is_some() { Reason::AlgNotAllowed } else { Reason::UnknownKid });
    }
    if kid.is_none() && installed.keys.iter().filter(|key| key.accepts(alg)).count() > MAX_KEYS_WITHOUT_KID {
        return Err(Reason::UnknownKid);
    }
    let signed = parsed.signed.as_bytes();
    // A host that cannot answer denies the token: it never falls back to allowing.
    let verifies =
        |key: &Key| verify_key(host, key, alg, signed, &parsed.signature).map_err(|_| Reason::CryptoUnavailable);
    for key in fitting {
        if verifies(key)? {
            return Ok(());
        }
    }
    Err(Reason::BadSignature)
}

fn check_header(provider: &Provider, header: &Header) -> Result<(), Reason> {
    match (&provider.token_types, &header.typ) {
        (None, _) => Ok(()),
        (Some(allowed), Some(typ)) if allowed.contains(&normalize_type(typ)) => Ok(()),
        (Some(_), _) => Err(Reason::TypeNotAllowed),
    }
}

/// The checks that do not depend on the time; their result can be cached with the token.
fn accept(
    provider_index: usize,
    provider: &Provider,
    claims: Claims,
    tasks: Vec<Task>,
) -> Result<VerifiedToken, Reason> {
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
    // A delegated token says on whose behalf its actors act: without a `sub` it says nothing.
    if claims.act.is_some() && claims.sub.as_deref().is_none_or(str::is_empty) {
        return Err(Reason::Malformed);
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
        audiences: claims.aud.as_ref().map(|aud| aud.to_vec()).unwrap_or_default(),
        cnf_jkt: claims.cnf.as_ref().and_then(|c| c.jkt.clone()),
        cnf_x5t: claims.cnf.as_ref().and_then(|c| c.x5t_s256.clone()),
        issued_at: claims.iat,
        not_before: claims.nbf,
        expires_at,
        actors: actor_chain(claims.act.as_ref())?,
        may_act: claims.may_act.as_ref().map(may_act_subjects),
        tasks,
        acr: claims.acr,
        auth_time: claims.auth_time,
        claims: None,
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
