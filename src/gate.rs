//! The pipeline: extract → verify → authorize → audit, and the decision a host applies.

use crate::audit::{self, AuditRecord, HeaderNames};
use crate::authorize::{authorize, check_revoked, explain, Authorization, Explanation, Target};
use crate::canonical::strip_query;
use crate::config::{ConfigError, Mode};
use crate::extract::{dpop_proofs, find_token, presented_as_dpop, strip_tokens};
use crate::host_crypto::HostCrypto;
use crate::jwks::{KeyRecord, RemoteJwks};
use crate::keys::Installed;
use crate::mcp::{self, McpCall};
use crate::policy::{Policy, Provider};
use crate::quarantine::{ConductStore, QuarantineEvent, Update};
use crate::ratelimit::{MemoryLimiter, RateLimit, RateLimiter};
use crate::reason::Reason;
use crate::replay::{token_id, GuardError, MemoryGuard, ReplayGuard, ReplayScope};
use crate::shared_cache::{self, CacheId};
use crate::verify::{check_time_in, verify_untimed_as, Signature, VerifiedToken};
use base64ct::Encoding;
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// A request as any host sees it. Header names may come in any case (Envoy lower-cases
/// them, nginx-based hosts pass the client's): the core compares them case-insensitively.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as sent (`:path`), query included.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    /// Unix seconds.
    pub now: i64,
    /// The client's address (`ip:port`), for `source_cidrs`; hosts fill it when
    /// `policy().needs_source` (it may cost a host call).
    pub source: Option<&'a str>,
    /// The mTLS peer certificate's URI SAN, for `bind_mtls_peer`; hosts fill it when
    /// `policy().needs_peer`.
    pub peer_uri_san: Option<&'a str>,
    /// The client certificate's SHA-256 in hex (Envoy's
    /// `connection.sha256_peer_certificate_digest`), for certificate-bound tokens; hosts fill
    /// it when `policy().needs_peer_certificate`.
    pub peer_certificate_sha256: Option<&'a str>,
    /// The request body, read by hosts where [`Gate::body_limit`] asks for it (MCP routes);
    /// `None` counts as empty there.
    pub body: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// A request with nothing but its method, target, headers and time: no client address,
    /// peer identity or body (set those fields where a host has them).
    pub fn new(method: &'a str, path: &'a str, headers: &'a [(String, String)], now: i64) -> Request<'a> {
        Request {
            method,
            path,
            headers,
            now,
            source: None,
            peer_uri_san: None,
            peer_certificate_sha256: None,
            body: None,
        }
    }

    /// What the rules look at.
    fn target<'t>(&'t self, mcp: Option<&'t McpCall>, dpop: bool, txn: Option<&'t VerifiedToken>) -> Target<'t> {
        Target {
            mcp,
            dpop,
            txn,
            method: self.method,
            headers: self.headers,
            source: self.source,
            peer_uri_san: self.peer_uri_san,
            authority: authority(self.headers),
            path: self.path,
            now: self.now,
        }
    }
}

/// What the host must do with the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Forward upstream after removing `remove` and setting `set`.
    Continue { remove: Vec<String>, set: Vec<(String, String)> },
    /// Answer locally; the request never reaches the upstream.
    Respond { status: u16, headers: Vec<(String, String)>, body: String },
}

impl Action {
    /// The local response for a denial, for hosts without a policy to take header names from.
    pub fn deny(reason: Reason, audit_id: Option<&str>) -> Action {
        Action::deny_full(&HeaderNames::default(), reason, audit_id, None, None, None)
    }

    /// The local response for a denial: status, challenge (with RFC 9470 step-up, RFC 9728
    /// and scope attributes in `challenge_extra`), `Retry-After` for rate limits, the audit
    /// id, and the body (a JSON-RPC error for MCP calls) — nothing else that would help an
    /// attacker.
    fn deny_full(
        names: &HeaderNames,
        reason: Reason,
        audit_id: Option<&str>,
        challenge_extra: Option<&str>,
        retry_after: Option<u64>,
        body: Option<String>,
    ) -> Action {
        let spec = reason.spec();
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(seconds) = retry_after {
            headers.push(("retry-after".to_string(), seconds.to_string()));
        }
        if let Some(challenge) = reason.challenge() {
            let challenge = match challenge_extra {
                // Auth-params follow the bare scheme after a space, the first error after a comma.
                Some(extra) if challenge == "Bearer" => format!("{challenge} {extra}"),
                Some(extra) => format!("{challenge}, {extra}"),
                None => challenge,
            };
            headers.push(("www-authenticate".to_string(), challenge));
        }
        if let Some(id) = audit_id {
            headers.push((names.audit_id.clone(), audit::header_value(id)));
        }
        let error = spec.error.unwrap_or(match spec.status {
            401 => "unauthorized",
            429 => "too_many_requests",
            _ => "server_error",
        });
        let body = body
            .unwrap_or_else(|| serde_json::json!({"error": error, "error_description": spec.description}).to_string());
        Action::Respond { status: spec.status, headers, body }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The policy's verdict, even when dry run lets a denied request through.
    pub allowed: bool,
    pub reason: Option<Reason>,
    pub rule: Option<String>,
    /// Index into `policy().rules` of the matched rule.
    pub rule_index: Option<usize>,
    /// The token's provider fetches its keys and has none for it (yet): the index of that
    /// provider. A host that can fetch may hold the request until new keys arrive and decide
    /// again; the decision as it stands is the answer without waiting.
    pub awaiting_keys: Option<usize>,
    pub dry_run: bool,
    /// The token was verified earlier and came from the cache: no signature was checked.
    pub cache_hit: bool,
    /// The token was verified by another worker (the shared cache): no signature was checked.
    pub shared_cache_hit: bool,
    pub action: Action,
    pub audit: AuditRecord,
    /// An allowed MCP list call (`tools/list`, ...): the host passes the response body to
    /// [`Gate::filter_list`], so the agent sees only what it may call.
    pub list_filter: Option<ListFilter>,
    /// Headers for the response the upstream sends back (a rotated `DPoP-Nonce`): hosts
    /// that can add response headers do.
    pub response_headers: Vec<(String, String)>,
    /// This request's denial put its agent into quarantine: the host logs
    /// `agentgate quarantine {json}` and counts it.
    pub quarantine: Option<QuarantineEvent>,
}

/// What filtering a list response for one agent needs, kept from its request.
#[derive(Debug, Clone, PartialEq)]
pub struct ListFilter {
    kind: mcp::ListKind,
    token: Arc<VerifiedToken>,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    source: Option<String>,
    peer_uri_san: Option<String>,
    now: i64,
}

/// Verified tokens by their text: a reused token costs a lookup, not a signature check nor
/// a hash of the token. Bounded (least recently used entries go first); the time checks run
/// on every hit, so an entry is never used past `exp`.
type TokenCache = Mutex<Option<LruCache<TokenKey, Seen>>>;

/// A cached token's text, compared eight bytes at a time: every hit compares the whole
/// token, and wasm's `memcmp` goes byte by byte.
#[derive(Debug, Clone)]
struct TokenKey(Box<str>);

impl PartialEq for TokenKey {
    fn eq(&self, other: &TokenKey) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let word = |chunk: &[u8]| <[u8; 8]>::try_from(chunk).map_or(0, u64::from_ne_bytes);
        a.len() == b.len()
            && a.chunks_exact(8).zip(b.chunks_exact(8)).all(|(x, y)| word(x) == word(y))
            && a.chunks_exact(8).remainder() == b.chunks_exact(8).remainder()
    }
}

impl Eq for TokenKey {}

impl std::hash::Hash for TokenKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// A verified token with its fingerprint for the audit record.
#[derive(Debug, Clone)]
struct Seen {
    token: Arc<VerifiedToken>,
    fingerprint: Arc<str>,
}

/// A token looked up or verified: the result and the token's fingerprint.
struct Lookup {
    verified: Result<Arc<VerifiedToken>, Reason>,
    fingerprint: Arc<str>,
    cache_hit: bool,
    shared_cache_hit: bool,
}

/// What extraction, verification and authorization found out about a request.
struct Checked {
    token: Option<Arc<VerifiedToken>>,
    fingerprint: Option<String>,
    cache_hit: bool,
    shared_cache_hit: bool,
    awaiting_keys: Option<usize>,
    /// The issuer a token that failed verification named, when it is a provider's.
    claimed_issuer: Option<String>,
    /// The `txn` of a valid Txn-Token that came along: one agent task across every hop.
    txn: Option<String>,
    /// The DPoP proof's nonce is from an earlier slot: the response brings the current one.
    nonce_stale: bool,
    authorization: Authorization,
    /// Seconds to wait, when rate limited.
    retry_after: Option<u64>,
}

/// A compiled policy, ready to decide requests.
#[derive(Debug)]
pub struct Gate {
    policy: Policy,
    cache: TokenCache,
    /// For hosts that bring no shared store of their own; kept across reconfigurations.
    memory: Arc<MemoryState>,
    /// The host's own signature checks, for the algorithms its probe passed. Set once, possibly
    /// after the gate is in use: a host is known for what it is only at its first request.
    host_crypto: OnceLock<HostCrypto>,
}

/// What a host shares between its workers: single-use `jti`s, rate-limit buckets, and
/// which tokens a worker verified.
pub trait SharedState: ReplayGuard + RateLimiter {
    /// Whether a worker verified token `id` under `stamp` (see `shared_cache`).
    fn verified_elsewhere(&self, _id: &CacheId, _stamp: u64) -> bool {
        false
    }

    /// Remembers that token `id` verified under `stamp`, for the other workers.
    fn record_verified(&self, _id: &CacheId, _stamp: u64) {}

    /// Where quarantine state is kept; `None`: nowhere, and quarantine fails open.
    fn conduct(&self) -> Option<&dyn ConductStore> {
        None
    }
}

impl SharedState for MemoryState {
    fn conduct(&self) -> Option<&dyn ConductStore> {
        Some(&self.conduct)
    }
}

/// Quarantine state in this process: a few fixed keys (see `quarantine`).
#[derive(Debug, Default)]
struct MemoryConduct(Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl ConductStore for MemoryConduct {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>, GuardError> {
        Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned())
    }

    fn update(&self, key: &str, update: &Update<'_>) -> Result<(), GuardError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(new) = update(map.get(key).map(Vec::as_slice)) {
            map.insert(key.to_string(), new);
        }
        Ok(())
    }
}

/// Shared state in this process only (the CLI, single-worker hosts).
#[derive(Debug)]
pub struct MemoryState {
    replay: MemoryGuard,
    limits: MemoryLimiter,
    conduct: MemoryConduct,
}

impl ReplayGuard for MemoryState {
    fn first_use(
        &self,
        scope: ReplayScope<'_>,
        id: &crate::replay::TokenId,
        expires_at: i64,
        now: i64,
    ) -> Result<bool, GuardError> {
        self.replay.first_use(scope, id, expires_at, now)
    }
}

impl RateLimiter for MemoryState {
    fn admit(&self, scope: &str, agent: &str, limit: &RateLimit, now: i64) -> Result<Result<(), u64>, GuardError> {
        self.limits.admit(scope, agent, limit, now)
    }
}

/// The scope of the policy-wide rate limit (rule names cannot be empty, so no clash).
const POLICY_SCOPE: &str = "";

/// Where DPoP proof `jti`s are remembered, next to single-use tokens (provider names are
/// compiled as given; `dpop` in brackets cannot clash with a rule or provider key).
pub const DPOP_REPLAY_SCOPE: &str = "[dpop]";

/// The server nonce's header (RFC 9449 §8.1), in Envoy's lower case.
pub const DPOP_NONCE: &str = "dpop-nonce";

impl Gate {
    pub fn from_json(json: &str) -> Result<Gate, ConfigError> {
        Policy::from_json(json).map(Gate::new)
    }

    pub fn new(policy: Policy) -> Gate {
        let cache = NonZeroUsize::new(policy.token_cache_entries).map(LruCache::new);
        let memory = MemoryState {
            replay: MemoryGuard::new(policy.single_use_entries),
            limits: MemoryLimiter::new(policy.single_use_entries),
            conduct: MemoryConduct::default(),
        };
        Gate { policy, cache: Mutex::new(cache), memory: Arc::new(memory), host_crypto: OnceLock::new() }
    }

    /// Verifies the algorithms `crypto` takes with the host's crypto from now on; false (and
    /// nothing changed) when the gate has its host crypto already.
    pub fn use_host_crypto(&self, crypto: HostCrypto) -> bool {
        self.host_crypto.set(crypto).is_ok()
    }

    /// The host's crypto in use, if any: which algorithms it verifies.
    pub fn host_crypto(&self) -> Option<&HostCrypto> {
        self.host_crypto.get()
    }

    /// Takes over what `previous` remembers in memory (single-use `jti`s, rate-limit
    /// buckets), so that replacing the policy forgets no used token. Call before serving.
    pub fn inherit_state(&mut self, previous: &Gate) {
        let entries = self.policy.single_use_entries;
        previous.memory.replay.set_capacity(entries);
        previous.memory.limits.set_capacity(entries);
        self.memory = Arc::clone(&previous.memory);
    }

    /// A verified token for `token` at `now`: from this worker's cache when it was seen
    /// before, else verified — without the signature check when another worker verified it
    /// under the same policy and keys (`state`'s shared cache).
    fn verified(&self, token: &str, now: i64, state: &dyn SharedState) -> Lookup {
        // No lock is held across a host call (shared data, host crypto): a call that traps
        // ends the wasm call without unwinding, and a lock left taken would stop every later
        // request of the VM.
        let seen = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
            .and_then(|c| c.get(&TokenKey(token.into())).cloned());
        if let Some(seen) = seen {
            let verified = check_time_in(&self.policy, &seen.token, now).map(|()| seen.token);
            return Lookup { verified, fingerprint: seen.fingerprint, cache_hit: true, shared_cache_hit: false };
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let fingerprint: Arc<str> = audit::fingerprint(&digest).into();
        let (id, stamp) = (shared_cache::cache_id(&digest), self.stamp());
        let shared_cache_hit = state.verified_elsewhere(&id, stamp);
        let signature =
            if shared_cache_hit { Signature::CheckedElsewhere } else { Signature::Check(self.host_crypto.get()) };
        let verified = verify_untimed_as(&self.policy, token, signature).map(Arc::new);
        if let Ok(verified) = &verified {
            if let Some(cache) = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_mut() {
                cache.put(
                    TokenKey(token.into()),
                    Seen { token: Arc::clone(verified), fingerprint: Arc::clone(&fingerprint) },
                );
            }
            if !shared_cache_hit {
                state.record_verified(&id, stamp);
            }
        }
        let verified = verified.and_then(|t| check_time_in(&self.policy, &t, now).map(|()| t));
        Lookup { verified, fingerprint, cache_hit: false, shared_cache_hit }
    }

    /// What shared-cache entries are valid under: this policy and its key sets as installed.
    fn stamp(&self) -> u64 {
        shared_cache::stamp(&self.policy.digest, self.policy.providers.iter().map(|p| p.keys.current().digest))
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The providers whose keys are fetched, with their index.
    pub fn remote_providers(&self) -> impl Iterator<Item = (usize, &Provider, &RemoteJwks)> {
        self.policy.providers.iter().enumerate().filter_map(|(i, p)| p.remote.as_ref().map(|r| (i, p, r)))
    }

    /// Installs the keys of `record` for provider `index` when they are newer than the ones
    /// in use; returns how many. When the key set changed, verified tokens are forgotten: a
    /// key dropped from the set must stop verifying at once. A refresh that brings the same
    /// document only extends how long the keys may be used.
    pub fn install_keys(&self, index: usize, record: &KeyRecord) -> Option<usize> {
        let provider = self.policy.providers.get(index)?;
        let remote = provider.remote.as_ref()?;
        let current = provider.keys.current();
        if record.version == current.version {
            return None;
        }
        let (keys, usable_until) = record.keys(remote)?;
        let digest: [u8; 32] = Sha256::digest(record.jwks.as_deref().unwrap_or_default().as_bytes()).into();
        let count = keys.len();
        provider.keys.install(Installed { keys, usable_until: Some(usable_until), version: record.version, digest });
        if digest != current.digest {
            if let Some(cache) = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_mut() {
                cache.clear();
            }
        }
        Some(count)
    }

    /// The provider the (unverified) issuer of `token` names, by index: a token that failed
    /// after its issuer picked the keys still says whose keys, for the audit record and for
    /// waiting on a fetch.
    fn provider_of(&self, token: &str) -> Option<usize> {
        let iss = crate::jws::parse(token, &self.policy.limits).ok()?.claims.iss?;
        self.policy.providers.iter().position(|p| p.issuer == iss)
    }

    /// Decides `request`, remembering single-use tokens in this process.
    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        self.evaluate_with(request, self.memory.as_ref())
    }

    /// Counts the request against `limit` for the acting agent; `Err` with the reason, and
    /// the seconds to wait when over.
    fn check_rate(
        &self,
        state: &dyn SharedState,
        scope: &str,
        limit: Option<&RateLimit>,
        token: &VerifiedToken,
        now: i64,
    ) -> Result<(), (Reason, Option<u64>)> {
        let Some(limit) = limit else { return Ok(()) };
        let agent = token.agent().unwrap_or("");
        match state.admit(scope, agent, limit, now) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(retry_after)) => Err((Reason::RateLimited, Some(retry_after))),
            // Rate limits protect capacity, not identity: a failing store lets traffic through
            // rather than take the API down with it.
            Err(_) => Ok(()),
        }
    }

    /// Single-use tokens are accepted once per token lifetime; `Err` fails closed.
    fn check_single_use(&self, token: &VerifiedToken, guard: &dyn ReplayGuard, now: i64) -> Result<(), Reason> {
        let provider = self.policy.providers.get(token.provider_index).ok_or(Reason::UnknownIssuer)?;
        let Some(ring) = provider.single_use_ring else { return Ok(()) };
        let jti = token.jti.as_deref().filter(|j| !j.is_empty()).ok_or(Reason::MissingJti)?;
        let scope = ReplayScope { provider: &provider.name, ring };
        match guard.first_use(scope, &token_id(&token.issuer, jti), token.expires_at, now) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Reason::Replayed),
            Err(GuardError::Full | GuardError::Unavailable) => Err(Reason::ReplayStoreUnavailable),
        }
    }

    /// Everything after verification, in order: single use, the kill switch, the policy-wide
    /// rate limit, the rules, the matched rule's rate limit. A replayed, revoked or limited
    /// token is still recorded with who it names. The `u64` is the wait when rate limited.
    #[allow(clippy::too_many_arguments)]
    fn authorize_verified(
        &self,
        token: &VerifiedToken,
        raw: &str,
        request: &Request<'_>,
        mcp: Option<&Result<McpCall, Reason>>,
        txn: Option<&VerifiedToken>,
        state: &dyn SharedState,
    ) -> (Authorization, Option<u64>, bool) {
        let now = request.now;
        // A body that cannot be read is refused before a single-use token is spent on it.
        let call = match mcp {
            Some(Err(reason)) => return (Authorization::denied(*reason), None, false),
            Some(Ok(call)) => Some(call),
            None => None,
        };
        // Proof of possession before anything is counted or spent: a stolen token stops here.
        if let Err(detail) = self.check_certificate(token, request) {
            return (
                Authorization { detail: Some(detail), ..Authorization::denied(Reason::CertificateMismatch) },
                None,
                false,
            );
        }
        let (dpop, nonce_stale) = match self.check_dpop(token, raw, request, state) {
            Ok(None) => (false, false),
            Ok(Some(proof)) => (true, proof.nonce_stale),
            Err((reason, detail)) => {
                return (Authorization { detail: Some(detail), ..Authorization::denied(reason) }, None, false);
            }
        };
        if let Err(reason) = self
            .check_single_use(token, state, now)
            .and_then(|()| check_revoked(&self.policy, token))
            .and_then(|()| self.check_quarantine(token, state, now))
        {
            return (Authorization::denied(reason), None, nonce_stale);
        }
        if let Err((reason, wait)) = self.check_rate(state, POLICY_SCOPE, self.policy.rate_limit.as_ref(), token, now) {
            return (Authorization::denied(reason), wait, nonce_stale);
        }
        let mut authorization = authorize(&self.policy, &request.target(call, dpop, txn), token);
        let rule = authorization.rule.and_then(|i| self.policy.rules.get(i));
        if let (Ok(()), Some(max)) = (&authorization.result, rule.and_then(|r| r.max_recent_denials)) {
            if self.recent_denials(token, state, now) > max {
                authorization.result = Err(Reason::RecentDenials);
                return (authorization, None, nonce_stale);
            }
        }
        if let (Ok(()), Some(rule)) = (&authorization.result, rule) {
            if let Err((reason, wait)) = self.check_rate(state, &rule.name, rule.rate_limit.as_ref(), token, now) {
                authorization.result = Err(reason);
                return (authorization, wait, nonce_stale);
            }
        }
        (authorization, None, nonce_stale)
    }

    /// The `Txn-Token` that came along (draft-ietf-oauth-transaction-tokens), verified like an
    /// access token but only from a transaction-token provider; `None` without one.
    fn transaction_token(
        &self,
        request: &Request<'_>,
        state: &dyn SharedState,
    ) -> Option<Result<Arc<VerifiedToken>, Reason>> {
        let mut values = request.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("txn-token"));
        let (_, first) = values.next()?;
        if values.next().is_some() {
            return Some(Err(Reason::MultipleTokens));
        }
        let verified = self.verified(first.trim(), request.now, state).verified;
        Some(verified.and_then(|t| {
            let from_service = self.policy.providers.get(t.provider_index).is_some_and(|p| p.transaction_tokens);
            if from_service {
                Ok(t)
            } else {
                Err(Reason::TypeNotAllowed)
            }
        }))
    }

    /// RFC 8705: a token bound to a certificate is accepted only on a connection whose client
    /// certificate has that SHA-256, and only where its provider says such tokens are checked.
    fn check_certificate(&self, token: &VerifiedToken, request: &Request<'_>) -> Result<(), &'static str> {
        let Some(bound) = token.cnf_x5t.as_deref() else { return Ok(()) };
        if !self.policy.providers.get(token.provider_index).is_some_and(|p| p.certificate_bound) {
            return Err("certificate_binding_not_enabled");
        }
        let presented = request.peer_certificate_sha256.and_then(decode_hex).ok_or("no_client_certificate")?;
        let expected =
            base64ct::Base64UrlUnpadded::decode_vec(bound).map_err(|_| "certificate_thumbprint_malformed")?;
        if presented == expected {
            Ok(())
        } else {
            Err("certificate_thumbprint_mismatch")
        }
    }

    /// RFC 9449: a token bound to a key (`cnf.jkt`) is accepted only with the DPoP scheme and
    /// a proof by that key for this request, each proof once; an unbound token is not
    /// accepted with the DPoP scheme, nor at all where its provider requires binding.
    /// `Ok(Some)`: bound and proven.
    fn check_dpop(
        &self,
        token: &VerifiedToken,
        raw: &str,
        request: &Request<'_>,
        state: &dyn SharedState,
    ) -> Result<Option<crate::dpop::VerifiedProof>, (Reason, &'static str)> {
        let as_dpop = presented_as_dpop(request.headers);
        let Some(jkt) = token.cnf_jkt.as_deref() else {
            if as_dpop {
                return Err((Reason::DpopBindingMismatch, "dpop_token_not_bound"));
            }
            let required = self.policy.providers.get(token.provider_index).is_some_and(|p| p.require_dpop);
            return if required { Err((Reason::DpopRequired, "dpop_required")) } else { Ok(None) };
        };
        if !as_dpop {
            return Err((Reason::DpopBindingMismatch, "dpop_bound_token_as_bearer"));
        }
        let authority = authority(request.headers);
        let target = crate::dpop::DpopRequest {
            method: request.method,
            scheme: header(request.headers, ":scheme").unwrap_or("https"),
            authority,
            path: request.path,
        };
        let options = &self.policy.dpop;
        let proof = crate::dpop::check_with(
            &dpop_proofs(request.headers),
            &target,
            raw,
            Some(jkt),
            options,
            request.now,
            self.host_crypto(),
        )
        .map_err(|e| {
            let reason = match e {
                crate::dpop::DpopError::TokenNotBound | crate::dpop::DpopError::KeyMismatch => {
                    Reason::DpopBindingMismatch
                }
                crate::dpop::DpopError::UseNonce => Reason::DpopNonceRequired,
                crate::dpop::DpopError::CryptoUnavailable => Reason::CryptoUnavailable,
                _ => Reason::DpopProofInvalid,
            };
            (reason, e.code())
        })?;
        let scope = ReplayScope { provider: DPOP_REPLAY_SCOPE, ring: crate::replay::RING };
        match state.first_use(scope, &proof.replay_id(), proof.remember_until(options), request.now) {
            Ok(true) => Ok(Some(proof)),
            Ok(false) => Err((Reason::DpopReplayed, "dpop_replayed")),
            Err(_) => Err((Reason::ReplayStoreUnavailable, "dpop_replay_store_unavailable")),
        }
    }

    /// Quarantine holds for every identity of the token (subject and every actor), like the
    /// kill switch. A store that cannot answer lets the request on to the rules.
    fn check_quarantine(&self, token: &VerifiedToken, state: &dyn SharedState, now: i64) -> Result<(), Reason> {
        let (Some(quarantine), Some(store)) = (&self.policy.quarantine, state.conduct()) else { return Ok(()) };
        let identities: Vec<&str> = token.subject.iter().chain(&token.actors).map(String::as_str).collect();
        match quarantine.blocks(store, &identities, &self.policy.digest, now) {
            Ok(true) => Err(Reason::Quarantined),
            _ => Ok(()),
        }
    }

    fn recent_denials(&self, token: &VerifiedToken, state: &dyn SharedState, now: i64) -> u32 {
        let (Some(quarantine), Some(store), Some(agent)) = (&self.policy.quarantine, state.conduct(), token.agent())
        else {
            return 0;
        };
        quarantine.recent_denials(store, agent, now).unwrap_or(0)
    }

    /// Counts a denial of a verified token against its acting agent (and, where the policy
    /// says so, its subject); the event when it starts a quarantine.
    fn count_denial(
        &self,
        token: &VerifiedToken,
        reason: Reason,
        state: &dyn SharedState,
        now: i64,
    ) -> Option<QuarantineEvent> {
        let (quarantine, store) = (self.policy.quarantine.as_ref()?, state.conduct()?);
        let delegator = token.on_behalf_of().filter(|_| quarantine.count_delegators);
        let mut event = None;
        for agent in token.agent().into_iter().chain(delegator) {
            if let Ok(Some(started)) = quarantine.count(store, agent, reason, &self.policy.digest, now) {
                event = event.or(Some(started));
            }
        }
        event
    }

    /// For tooling (`agentgate eval`): each requirement of the rule the gate applies to
    /// `request`, in order, and whether it held; `Err` with the reason there is none (no
    /// verified token, a non-canonical request, no matching rule). Routes exactly as the
    /// gate does, with no side effects: nothing is counted or consumed.
    pub fn explain(&self, request: &Request<'_>) -> Result<Explanation, Reason> {
        let token =
            find_token(&self.policy.token_sources, request.headers, request.path, self.policy.limits.max_token_bytes)
                .and_then(|t| self.verified(t, request.now, self.memory.as_ref()).verified)?;
        let call = self.read_mcp(request).transpose()?;
        // Offline, a bound token's proof is taken as given: eval explains the rules.
        let txn = self.transaction_token(request, self.memory.as_ref()).and_then(Result::ok);
        explain(&self.policy, &request.target(call.as_ref(), token.cnf_jkt.is_some(), txn.as_deref()), &token)
    }

    /// The largest body a host must read for this request and pass as [`Request::body`]:
    /// `Some` for a POST to a route of an MCP rule, `None` where the gate decides on headers.
    pub fn body_limit(&self, method: &str, path: &str) -> Option<usize> {
        // Called for every request: most are no POST to an MCP route, and cost no more.
        if method != "POST" || self.policy.mcp_routes.is_empty() {
            return None;
        }
        let path = crate::canonical::canonical_path(path, self.policy.path_parameters).ok()?;
        self.policy.mcp_routes.first_match(&path, |_| true).map(|_| self.policy.max_body_bytes)
    }

    /// The MCP message of a request on an MCP route (`None` elsewhere), or why it is refused.
    fn read_mcp(&self, request: &Request<'_>) -> Option<Result<McpCall, Reason>> {
        let limit = self.body_limit(request.method, request.path)?;
        let body = request.body.unwrap_or_default();
        if body.len() > limit {
            return Some(Err(Reason::BodyTooLarge));
        }
        Some(mcp::parse(body).and_then(|call| mcp::check_headers(&call, request.headers).map(|()| call)))
    }

    /// A front tier's only work: name the acting agent of the token — read, not verified:
    /// routing is not trust; a forged token lands somewhere and is refused there, a genuine
    /// one always lands on its owner — in `header`, for the proxy's hash policy.
    fn route(&self, request: &Request<'_>, header: &str) -> Action {
        let remove =
            request.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(header)).map(|(n, _)| n.clone()).collect();
        let agent =
            find_token(&self.policy.token_sources, request.headers, request.path, self.policy.limits.max_token_bytes)
                .ok()
                .and_then(|token| crate::jws::parse(token, &self.policy.limits).ok())
                .and_then(|parsed| {
                    let actor = parsed.claims.act.as_ref().and_then(|a| a.sub.clone());
                    actor.or(parsed.claims.sub)
                });
        let set = agent.map(|agent| vec![(header.to_string(), audit::header_value(&agent))]).unwrap_or_default();
        Action::Continue { remove, set }
    }

    /// RFC 9728: the protected-resource metadata document, served by the gate itself.
    fn metadata_response(&self, request: &Request<'_>) -> Option<Action> {
        let metadata = self.policy.resource_metadata.as_ref()?;
        let path = crate::canonical::strip_query(request.path);
        (matches!(request.method, "GET" | "HEAD") && metadata.paths.iter().any(|p| p == path)).then(|| {
            let headers = vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("cache-control".to_string(), "max-age=3600".to_string()),
            ];
            Action::Respond { status: 200, headers, body: metadata.document.clone() }
        })
    }

    /// Stages 1-3: the token found, verified (or from the cache) and authorized.
    fn check(&self, request: &Request<'_>, mcp: Option<&Result<McpCall, Reason>>, state: &dyn SharedState) -> Checked {
        let found =
            find_token(&self.policy.token_sources, request.headers, request.path, self.policy.limits.max_token_bytes);
        let (verified, fingerprint, cache_hit, shared_cache_hit) = match found {
            Err(reason) => (Err(reason), None, false, false),
            Ok(token) => {
                let lookup = self.verified(token, request.now, state);
                (lookup.verified, Some(lookup.fingerprint.to_string()), lookup.cache_hit, lookup.shared_cache_hit)
            }
        };
        // A Txn-Token is no access token.
        let verified = verified.and_then(|t| {
            let txn_provider = self.policy.providers.get(t.provider_index).is_some_and(|p| p.transaction_tokens);
            if txn_provider {
                Err(Reason::TypeNotAllowed)
            } else {
                Ok(t)
            }
        });
        let txn = self.transaction_token(request, state).and_then(Result::ok);
        // Reasons given after the issuer selected a provider's keys.
        let claimed_provider = match (&verified, found) {
            (Err(reason), Ok(t))
                if !matches!(reason, Reason::Malformed | Reason::TokenTooLarge | Reason::UnknownIssuer) =>
            {
                self.provider_of(t)
            }
            _ => None,
        };
        let awaiting_keys = claimed_provider.filter(|&i| {
            matches!(verified, Err(Reason::UnknownKid | Reason::KeysUnavailable))
                && self.policy.providers.get(i).is_some_and(|p| p.remote.is_some())
        });
        let (token, authorization, retry_after, nonce_stale) = match verified {
            Err(reason) => (None, Authorization::denied(reason), None, false),
            Ok(token) => {
                let raw = found.unwrap_or_default();
                let (authorization, retry_after, nonce_stale) =
                    self.authorize_verified(&token, raw, request, mcp, txn.as_deref(), state);
                (Some(token), authorization, retry_after, nonce_stale)
            }
        };
        let claimed_issuer = claimed_provider.and_then(|i| self.policy.providers.get(i)).map(|p| p.issuer.clone());
        let txn = txn.and_then(|t| t.claims.as_ref()?.get("txn")?.as_str().map(str::to_string));
        Checked {
            token,
            fingerprint,
            cache_hit,
            shared_cache_hit,
            awaiting_keys,
            claimed_issuer,
            txn,
            nonce_stale,
            authorization,
            retry_after,
        }
    }

    /// Decides `request` with a host's shared state (single-use tokens, rate limits).
    pub fn evaluate_with(&self, request: &Request<'_>, state: &dyn SharedState) -> Decision {
        if let Some(header) = &self.policy.front_tier {
            return self.served(request, self.route(request, header));
        }
        if let Some(action) = self.metadata_response(request) {
            return self.served(request, action);
        }
        let mcp = self.read_mcp(request);
        let checked = self.check(request, mcp.as_ref(), state);
        let call = mcp.as_ref().and_then(|m| m.as_ref().ok());
        let matched = checked.authorization.rule.and_then(|i| self.policy.rules.get(i));
        let reason = checked.authorization.result.err();
        // A rule's own mode wins over the policy's: one rule can be rolled out in dry run.
        let dry_run = matched.and_then(|r| r.mode).unwrap_or(self.policy.mode) == Mode::DryRun;
        let forwarded = reason.is_none() || dry_run;
        // Token parameters leave the path before anything sees it: the log, and (unless
        // forwarded) the upstream. Worked out only when one of them needs it.
        let stripped = (self.policy.audit.log_query || (forwarded && !self.policy.forward_token))
            .then(|| strip_tokens(&self.policy.token_sources, request.headers, request.path));
        let mut audit = self.record(request, &checked, matched, dry_run, stripped.as_ref());
        audit.note_mcp(call, &self.policy.audit.log_arguments);
        // Only a verified token's denials count: garbage in a victim's name counts for no one.
        let quarantine = match (reason, &checked.token) {
            (Some(reason), Some(token)) if reason != Reason::Quarantined => {
                self.count_denial(token, reason, state, request.now)
            }
            _ => None,
        };
        let action = match reason {
            Some(reason) if !dry_run => {
                audit.status = Some(reason.status());
                // An MCP client gets a JSON-RPC error for its request id, with the HTTP status.
                let body = mcp.as_ref().map(|m| {
                    let id =
                        m.as_ref().ok().and_then(|c| c.id.clone()).or_else(|| request.body.and_then(mcp::request_id));
                    mcp::error_body(id.as_ref(), reason)
                });
                let mut action = self.denial(reason, matched, checked.retry_after, audit.audit_id.as_deref(), body);
                // RFC 9449 §9: a DPoP challenge brings the nonce to retry with.
                if let (Action::Respond { headers, .. }, Some(nonces)) = (&mut action, &self.policy.dpop.nonce) {
                    if reason.scheme() == "DPoP" {
                        headers.push((DPOP_NONCE.to_string(), nonces.issue(request.now)));
                    }
                }
                action
            }
            _ => self.forward(request.headers, &audit, stripped),
        };
        // §8.2: a proof with last slot's nonce passed; the client gets this slot's for its next.
        let response_headers = match &self.policy.dpop.nonce {
            Some(nonces) if checked.nonce_stale && matches!(action, Action::Continue { .. }) => {
                vec![(DPOP_NONCE.to_string(), nonces.issue(request.now))]
            }
            _ => Vec::new(),
        };
        let list_filter = match (call.and_then(|c| c.method.as_deref()).and_then(mcp::list_kind), &checked.token) {
            (Some(kind), Some(token)) if reason.is_none() => Some(ListFilter {
                kind,
                token: Arc::clone(token),
                method: request.method.to_string(),
                path: request.path.to_string(),
                headers: request.headers.to_vec(),
                source: request.source.map(str::to_string),
                peer_uri_san: request.peer_uri_san.map(str::to_string),
                now: request.now,
            }),
            _ => None,
        };
        Decision {
            list_filter,
            quarantine,
            response_headers,
            allowed: reason.is_none(),
            reason,
            rule: matched.map(|r| r.name.clone()),
            rule_index: checked.authorization.rule,
            awaiting_keys: checked.awaiting_keys,
            dry_run,
            cache_hit: checked.cache_hit,
            shared_cache_hit: checked.shared_cache_hit,
            action,
            audit,
        }
    }

    /// Stage 4: the audit record of the decision.
    fn record(
        &self,
        request: &Request<'_>,
        checked: &Checked,
        matched: Option<&crate::policy::Rule>,
        dry_run: bool,
        stripped: Option<&StrippedTokens>,
    ) -> AuditRecord {
        let settings = &self.policy.audit;
        let subject = |s: &str| settings.subject(s);
        let token = checked.token.as_deref();
        let reason = checked.authorization.result.err();
        let logged_path = match stripped {
            Some((_, rewrites)) if settings.log_query => {
                rewrites.iter().find(|(n, _)| *n == ":path").map_or(request.path, |(_, p)| p.as_str())
            }
            _ => strip_query(request.path),
        };
        AuditRecord {
            time: request.now,
            audit_id: header(request.headers, audit::REQUEST_ID).map(str::to_string),
            decision: if reason.is_none() { "allow" } else { "deny" },
            reason: reason.map(Reason::code),
            detail: checked.authorization.detail,
            rule: matched.map(|r| r.name.clone()),
            agent: token.and_then(|t| t.agent().map(subject)),
            on_behalf_of: token.and_then(|t| t.on_behalf_of().map(subject)),
            actors: token.map(|t| t.actors.iter().map(|a| subject(a)).collect()).unwrap_or_default(),
            task_type: matched.and_then(|r| r.task.as_ref()).map(|t| t.kind.clone()),
            task_identifier: checked.authorization.task_identifier.clone(),
            issuer: token.map(|t| t.issuer.clone()).or_else(|| checked.claimed_issuer.clone()),
            txn: checked.txn.clone(),
            jti: token.and_then(|t| t.jti.clone()),
            token_fingerprint: checked.fingerprint.clone(),
            method: request.method.to_string(),
            path: logged_path.to_string(),
            source: request.source.map(str::to_string),
            dry_run,
            status: None,
            ..AuditRecord::default()
        }
    }

    /// The local answer to a denied request, with RFC 9470 step-up attributes when the rule
    /// wants human approval, the scopes an MCP rule needs, where the RFC 9728 metadata is,
    /// and `Retry-After` when rate limited.
    fn denial(
        &self,
        reason: Reason,
        matched: Option<&crate::policy::Rule>,
        retry_after: Option<u64>,
        audit_id: Option<&str>,
        body: Option<String>,
    ) -> Action {
        let mut extra: Vec<String> = Vec::new();
        if let Some(approval) = matched.and_then(|r| r.approval.as_ref()).filter(|_| reason == Reason::ApprovalRequired)
        {
            extra.push(format!("acr_values=\"{}\"", approval.acr_values.join(" ")));
            if let Some(max_age) = approval.max_age_seconds {
                extra.push(format!("max_age={max_age}"));
            }
        }
        // MCP step-up: the client learns which scopes to ask for.
        if let Some(rule) = matched.filter(|r| r.mcp.is_some() && !r.scopes.is_empty()) {
            if reason == Reason::InsufficientScope {
                extra.push(format!("scope=\"{}\"", rule.scopes.join(" ")));
            }
        }
        if reason.scheme() == "DPoP" {
            let algs: Vec<&str> = self.policy.dpop.algorithms.iter().map(|a| a.name()).collect();
            extra.push(format!("algs=\"{}\"", algs.join(" ")));
        }
        if let Some(metadata) = &self.policy.resource_metadata {
            extra.push(format!("resource_metadata=\"{}\"", metadata.url));
        }
        let extra = (!extra.is_empty()).then(|| extra.join(", "));
        let retry_after = retry_after.filter(|_| reason == Reason::RateLimited);
        Action::deny_full(&self.policy.audit.headers, reason, audit_id, extra.as_deref(), retry_after, body)
    }

    /// A request the gate handled without deciding anything (the RFC 9728 document, a front
    /// tier's routing).
    fn served(&self, request: &Request<'_>, action: Action) -> Decision {
        let audit = AuditRecord {
            time: request.now,
            audit_id: header(request.headers, audit::REQUEST_ID).map(str::to_string),
            decision: "allow",
            method: request.method.to_string(),
            path: strip_query(request.path).to_string(),
            source: request.source.map(str::to_string),
            status: matches!(action, Action::Respond { .. }).then_some(200),
            ..AuditRecord::default()
        };
        Decision {
            allowed: true,
            reason: None,
            rule: None,
            rule_index: None,
            awaiting_keys: None,
            dry_run: false,
            cache_hit: false,
            shared_cache_hit: false,
            action,
            audit,
            list_filter: None,
            quarantine: None,
            response_headers: Vec::new(),
        }
    }

    /// The response `body` of an allowed list call with only the tools (prompts, resources)
    /// this agent could call under the policy: one whose rule can never hold for its token is
    /// removed; one whose rule depends on the arguments stays. `event_stream`: the body is
    /// `text/event-stream`.
    pub fn filter_list(&self, filter: &ListFilter, body: &[u8], event_stream: bool) -> Vec<u8> {
        let keep = |name: &str| {
            let call = McpCall {
                id: None,
                method: Some(filter.kind.call.to_string()),
                name: Some(name.to_string()),
                arguments: serde_json::Value::Null,
            };
            let target = Target {
                method: &filter.method,
                headers: &filter.headers,
                source: filter.source.as_deref(),
                peer_uri_san: filter.peer_uri_san.as_deref(),
                authority: authority(&filter.headers),
                path: &filter.path,
                now: filter.now,
                mcp: Some(&call),
                // The list call itself passed the proof check a bound token needs.
                dpop: filter.token.cnf_jkt.is_some(),
                txn: None,
            };
            crate::authorize::could_hold(&self.policy, &target, &filter.token)
        };
        mcp::filter_list_body(body, event_stream, filter.kind, &keep)
    }

    /// Forwarding: forged audit headers out, the real ones in, and the credentials stay at
    /// the gate unless the policy forwards them.
    fn forward(&self, headers: &[(String, String)], audit: &AuditRecord, stripped: Option<StrippedTokens>) -> Action {
        let names = &self.policy.audit.headers;
        let mut remove = forged_headers(names, headers);
        let mut set = audit.upstream_headers(names);
        if let Some((token_headers, token_rewrites)) = stripped.filter(|_| !self.policy.forward_token) {
            remove.extend(token_headers);
            // A DPoP proof is a credential too: it stays at the gate with the token.
            for (name, _) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("dpop")) {
                if !remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                    remove.push(name.clone());
                }
            }
            set.extend(token_rewrites.into_iter().map(|(n, v)| (n.to_string(), v)));
        }
        Action::Continue { remove, set }
    }
}

/// Headers to remove and to rewrite so that no token reaches the upstream.
type StrippedTokens = (Vec<String>, Vec<(&'static str, String)>);

/// Bytes from hex (either case); `None` for anything else.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u32> = text.chars().map(|c| c.to_digit(16)).collect::<Option<_>>()?;
    (digits.len() % 2 == 0)
        .then(|| digits.chunks_exact(2).map(|p| (p.iter().fold(0, |acc, d| acc * 16 + d)) as u8).collect())
}

/// The request's authority as sent: `:authority`, or `host` for HTTP/1 hosts.
fn authority(headers: &[(String, String)]) -> &str {
    header(headers, ":authority").or_else(|| header(headers, "host")).unwrap_or("")
}

/// The first value of header `name`, compared case-insensitively.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Client-sent headers in agentgate's namespace, in every spelling: removed so nobody can
/// forge them.
fn forged_headers(ours: &HeaderNames, headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _) in headers.iter().filter(|(name, _)| ours.owns(name)) {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.clone());
        }
    }
    names
}
