//! Keys that rotate: a provider's JWKS fetched from its identity provider (directly, or by
//! OIDC / RFC 8414 discovery), refreshed, shared between a proxy's workers, and kept through
//! outages for a bounded time.
//!
//! Hosts own the I/O; this module owns the decisions. All workers of a proxy share one
//! [`KeyRecord`] per provider (proxy-wasm shared data, updated with compare-and-swap): the
//! last good JWKS, when it was fetched, and a lease so that only one worker fetches at a time.

use crate::keys::{parse_jwk, Alg, Key};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where a provider's keys come from, when they are fetched (compiled from the policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    /// The provider's issuer (discovery starts from it) and accepted algorithms.
    pub issuer: String,
    pub algorithms: Vec<Alg>,
    /// The JWKS URL; `None`: found by discovery from the issuer.
    pub jwks_uri: Option<String>,
    /// The upstream that reaches the identity provider (an Envoy cluster, or host:port).
    pub cluster: String,
    pub refresh_seconds: i64,
    pub max_stale_seconds: i64,
    pub min_refetch_seconds: i64,
    pub timeout_ms: u64,
    pub max_bytes: usize,
    /// How long a request may wait for keys that are being fetched.
    pub wait_ms: u64,
    /// The shared-data key of this provider's [`KeyRecord`].
    pub store_key: String,
}

pub const DEFAULT_REFRESH_SECONDS: u64 = 300;
pub const DEFAULT_MAX_STALE_SECONDS: u64 = 86_400;
pub const DEFAULT_MIN_REFETCH_SECONDS: u64 = 30;
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024;
pub const DEFAULT_WAIT_MS: u64 = 2_000;

/// The longest pause between attempts while the identity provider fails.
const MAX_BACKOFF_SECONDS: i64 = 60;

/// What to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub stage: Stage,
    /// `host[:port]` for the `:authority` header.
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `{issuer}/.well-known/openid-configuration`.
    OpenIdDiscovery,
    /// RFC 8414 `/.well-known/oauth-authorization-server{issuer path}`, tried when OpenID
    /// discovery fails.
    OAuthDiscovery,
    Jwks,
}

/// One provider's key state, shared by every worker of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Bumped on every new key set, so workers know when to re-read it.
    pub version: u64,
    /// The last good JWKS document and when it was fetched (Unix seconds).
    pub jwks: Option<String>,
    pub fetched_at: Option<i64>,
    /// The JWKS URL discovery found.
    pub discovered_uri: Option<String>,
    /// A worker is fetching until then; others wait instead of fetching too.
    pub lease_until: i64,
    /// No scheduled fetch before then (the refresh period, or backoff after failures).
    pub next_attempt: i64,
    pub failures: u32,
    /// The last fetch forced by a token with an unknown `kid` (rate-limited).
    pub last_forced: i64,
    /// The last failure, for logs.
    pub last_error: Option<String>,
}

/// The answer to a fetch: the status and body, or why there was none.
pub type Response<'a> = Result<(u16, &'a [u8]), String>;

/// What follows a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Fetch this too (discovery found the JWKS URL, or OpenID discovery failed).
    Fetch(Fetch),
    /// A new key set is in the record (with this many usable keys).
    Updated(usize),
    /// The fetch failed; the last good keys, if any, stay.
    Failed(String),
}

impl KeyRecord {
    pub fn from_bytes(bytes: Option<&[u8]>) -> KeyRecord {
        bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether a fetch is in flight somewhere.
    pub fn fetching(&self, now: i64) -> bool {
        self.lease_until > now
    }

    /// Takes the lease when a fetch is due: scheduled (`forced` false), or early for a token
    /// whose `kid` is unknown (`forced`, at most once per `min_refetch_seconds`). Returns the
    /// record to store (with compare-and-swap: if another worker won, it fetches) and what
    /// to fetch.
    pub fn claim(&self, remote: &RemoteJwks, now: i64, forced: bool) -> Option<(KeyRecord, Fetch)> {
        if self.fetching(now) {
            return None;
        }
        let due = if forced {
            now >= self.last_forced.saturating_add(remote.min_refetch_seconds)
        } else {
            now >= self.next_attempt
        };
        if !due {
            return None;
        }
        let fetch = self.first_fetch(remote)?;
        let mut claimed = self.clone();
        claimed.lease_until = now.saturating_add(lease_seconds(remote));
        if forced {
            claimed.last_forced = now;
        }
        Some((claimed, fetch))
    }

    fn first_fetch(&self, remote: &RemoteJwks) -> Option<Fetch> {
        match remote.jwks_uri.as_deref().or(self.discovered_uri.as_deref()) {
            Some(uri) => fetch_of(Stage::Jwks, uri).ok(),
            None => fetch_of(Stage::OpenIdDiscovery, &discovery_url(&remote.issuer, Stage::OpenIdDiscovery)).ok(),
        }
    }

    /// Records the answer to `stage`'s fetch. `jitter` in `[0, 1)` spreads the retries of
    /// many proxies after an outage.
    pub fn record_response(
        &self,
        remote: &RemoteJwks,
        stage: Stage,
        response: Response<'_>,
        now: i64,
        jitter: f64,
    ) -> (KeyRecord, Next) {
        let mut next = self.clone();
        let result = match stage {
            Stage::OpenIdDiscovery | Stage::OAuthDiscovery => {
                let found = discovered_jwks_uri(response, remote.max_bytes, &remote.issuer)
                    .and_then(|uri| fetch_of(Stage::Jwks, &uri).map(|fetch| (Some(uri), fetch)));
                // OpenID discovery failed: RFC 8414's document is tried before giving up.
                let follow = match (found, stage) {
                    (Err(error), Stage::OpenIdDiscovery) => {
                        fetch_of(Stage::OAuthDiscovery, &discovery_url(&remote.issuer, Stage::OAuthDiscovery))
                            .map(|fetch| (None, fetch))
                            .map_err(|_| error)
                    }
                    (found, _) => found,
                };
                match follow {
                    Ok((uri, fetch)) => {
                        next.discovered_uri = uri.or(next.discovered_uri);
                        next.lease_until = now.saturating_add(lease_seconds(remote));
                        return (next, Next::Fetch(fetch));
                    }
                    Err(error) => Err(format!("discovery: {error}")),
                }
            }
            Stage::Jwks => checked_body(response, remote.max_bytes).and_then(|body| {
                let keys = parse_jwks(body, &remote.algorithms)?;
                let text = std::str::from_utf8(body).map_err(|_| "the JWKS is not UTF-8".to_string())?;
                Ok((keys.len(), text.to_string()))
            }),
        };
        next.lease_until = 0;
        match result {
            Ok((count, text)) => {
                next.version = next.version.wrapping_add(1);
                next.jwks = Some(text);
                next.fetched_at = Some(now);
                next.failures = 0;
                next.last_error = None;
                next.next_attempt = now.saturating_add(remote.refresh_seconds);
                (next, Next::Updated(count))
            }
            Err(error) => {
                next.failures = next.failures.saturating_add(1);
                next.next_attempt = now.saturating_add(backoff(next.failures, remote.refresh_seconds, jitter));
                // The discovered URL may be what changed: discover again next time.
                if remote.jwks_uri.is_none() && stage == Stage::Jwks {
                    next.discovered_uri = None;
                }
                next.last_error = Some(error.clone());
                (next, Next::Failed(error))
            }
        }
    }

    /// The key set to verify with, and until when it may be used; `None` without one.
    pub fn keys(&self, remote: &RemoteJwks) -> Option<(Vec<Key>, i64)> {
        let keys = parse_jwks(self.jwks.as_deref()?.as_bytes(), &remote.algorithms).ok()?;
        Some((keys, self.fetched_at?.saturating_add(remote.max_stale_seconds)))
    }
}

/// A fetch holds the lease for its timeout (twice, with discovery) plus a margin; a worker
/// that dies mid-fetch only delays the next one.
fn lease_seconds(remote: &RemoteJwks) -> i64 {
    i64::try_from(remote.timeout_ms.saturating_mul(2) / 1000).unwrap_or(i64::MAX).saturating_add(2)
}

/// Exponential, capped by the refresh period and a minute, jittered ±50 %, at least 1 s.
fn backoff(failures: u32, refresh_seconds: i64, jitter: f64) -> i64 {
    let base = 1_i64.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(MAX_BACKOFF_SECONDS);
    let capped = base.min(MAX_BACKOFF_SECONDS).min(refresh_seconds.max(1));
    // Float to integer conversion saturates; the value is small and positive anyway.
    let jittered = (capped as f64 * (0.5 + jitter.clamp(0.0, 1.0))) as i64;
    jittered.max(1)
}

fn checked_body<'a>(response: Response<'a>, max_bytes: usize) -> Result<&'a [u8], String> {
    match response {
        Err(error) => Err(error),
        Ok((status, body)) if !(200..300).contains(&status) => Err(match proxy_failure(body) {
            Some(what) => format!("no answer from the identity provider: {what} (the proxy's own {status})"),
            None => format!("the identity provider answered {status}"),
        }),
        Ok((_, body)) if body.len() > max_bytes => Err(format!("the response exceeds {max_bytes} bytes")),
        Ok((_, body)) => Ok(body),
    }
}

/// The `jwks_uri` of a discovery document, which must be for `issuer` exactly (OpenID
/// Connect Discovery §4.3, RFC 8414 §3.3): another issuer's document is an impersonation.
/// What went wrong when the answer is the proxy's own (Envoy answers a callout it could not
/// deliver with a 503 and one of these bodies), so the log points at the connection, not at
/// the identity provider.
fn proxy_failure(body: &[u8]) -> Option<&'static str> {
    let text = std::str::from_utf8(body.get(..body.len().min(200))?).ok()?;
    if text.starts_with("upstream connect error") {
        Some(if text.contains("timeout") { "connection timed out" } else { "no connection (refused or reset)" })
    } else if text.starts_with("no healthy upstream") {
        Some("no healthy host in the cluster")
    } else if text.starts_with("upstream request timeout") {
        Some("request timed out")
    } else {
        None
    }
}

fn discovered_jwks_uri(response: Response<'_>, max_bytes: usize, issuer: &str) -> Result<String, String> {
    let body = checked_body(response, max_bytes)?;
    let document: Value = serde_json::from_slice(body).map_err(|e| format!("discovery document: {e}"))?;
    match document.get("issuer").and_then(Value::as_str) {
        Some(stated) if stated == issuer => {}
        stated => return Err(format!("the discovery document is for issuer {stated:?}, not {issuer:?}")),
    }
    document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "the discovery document has no jwks_uri".to_string())
}

/// The usable signing keys of a JWKS document. Keys this provider cannot use (other
/// algorithms, encryption keys, unsupported types) are skipped; none usable is an error.
pub fn parse_jwks(body: &[u8], algorithms: &[Alg]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Jwks {
        keys: Vec<Value>,
    }
    let jwks: Jwks = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys: Vec<Key> = Vec::new();
    for jwk in &jwks.keys {
        if let Ok(Some(key)) = parse_jwk(jwk, algorithms) {
            // Two keys under one kid: the first wins, as a token names only one.
            if key.kid.is_none() || keys.iter().all(|k| k.kid != key.kid) {
                keys.push(key);
            }
        }
    }
    if keys.is_empty() {
        return Err(format!("no usable signing key among {} keys", jwks.keys.len()));
    }
    Ok(keys)
}

/// Splits an `http(s)://authority/path` URL.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => (rest.get(..at).unwrap_or(""), rest.get(at..).unwrap_or("/")),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    if authority.is_empty() || authority.contains(['@', ' ', '#']) {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok((authority.to_string(), path))
}

fn fetch_of(stage: Stage, url: &str) -> Result<Fetch, String> {
    let (authority, path) = split_url(url)?;
    Ok(Fetch { stage, authority, path })
}

/// The discovery document's URL for `issuer`: OpenID Connect Discovery appends the
/// well-known suffix; RFC 8414 inserts it between host and path.
pub fn discovery_url(issuer: &str, stage: Stage) -> String {
    let issuer = issuer.trim_end_matches('/');
    match stage {
        Stage::OAuthDiscovery => {
            let scheme_end = issuer.find("://").map_or(0, |i| i + 3);
            let host_end = issuer.get(scheme_end..).and_then(|r| r.find('/')).map_or(issuer.len(), |i| i + scheme_end);
            let (origin, path) = issuer.split_at(host_end.min(issuer.len()));
            format!("{origin}/.well-known/oauth-authorization-server{path}")
        }
        _ => format!("{issuer}/.well-known/openid-configuration"),
    }
}

/// The shared-data key of a provider's record: its name plus a digest of where the keys come
/// from, so a reconfiguration that points elsewhere starts afresh.
pub fn store_key(provider: &str, issuer: &str, jwks_uri: Option<&str>, cluster: &str) -> String {
    let digest = Sha256::digest(format!("{issuer}\n{}\n{cluster}", jwks_uri.unwrap_or("")).as_bytes());
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("agentgate.jwks.{provider}.{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(uri: Option<&str>) -> RemoteJwks {
        RemoteJwks {
            issuer: "https://idp.example.com".into(),
            algorithms: vec![Alg::Es256],
            jwks_uri: uri.map(str::to_string),
            cluster: "idp".into(),
            refresh_seconds: 300,
            max_stale_seconds: 3600,
            min_refetch_seconds: 30,
            timeout_ms: 1000,
            max_bytes: 1024,
            wait_ms: 500,
            store_key: "k".into(),
        }
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(split_url("https://idp.example.com/keys?x=1"), Ok(("idp.example.com".into(), "/keys?x=1".into())));
        assert_eq!(split_url("http://127.0.0.1:8080"), Ok(("127.0.0.1:8080".into(), "/".into())));
        assert!(split_url("ftp://x/y").is_err());
        assert!(split_url("https:///path").is_err());
    }

    #[test]
    fn discovery_urls_follow_both_specs() {
        let openid = discovery_url("https://idp.example.com/tenant/", Stage::OpenIdDiscovery);
        assert_eq!(openid, "https://idp.example.com/tenant/.well-known/openid-configuration");
        let oauth = discovery_url("https://idp.example.com/tenant", Stage::OAuthDiscovery);
        assert_eq!(oauth, "https://idp.example.com/.well-known/oauth-authorization-server/tenant");
        let bare = discovery_url("https://idp.example.com", Stage::OAuthDiscovery);
        assert_eq!(bare, "https://idp.example.com/.well-known/oauth-authorization-server");
    }

    #[test]
    fn one_lease_at_a_time_and_forced_fetches_are_rate_limited() {
        let r = remote(Some("https://idp/keys"));
        let (leased, fetch) = KeyRecord::default().claim(&r, 100, false).unwrap();
        assert_eq!(fetch.path, "/keys");
        assert!(leased.claim(&r, 101, false).is_none(), "another worker is fetching");
        assert!(leased.claim(&r, 101, true).is_none());
        let (done, _) = leased.record_response(&r, Stage::Jwks, Err("down".into()), 101, 0.0);
        let (forced, _) = done.claim(&r, 101, true).unwrap();
        let released = KeyRecord { lease_until: 0, ..forced };
        assert!(released.claim(&r, 120, true).is_none(), "within min_refetch_seconds");
        assert!(released.claim(&r, 131, true).is_some());
    }

    #[test]
    fn failures_back_off_and_keep_the_last_good_keys() {
        let r = remote(Some("https://idp/keys"));
        let good = KeyRecord { jwks: Some("{}".into()), fetched_at: Some(50), version: 3, ..KeyRecord::default() };
        let (failed, next) = good.record_response(&r, Stage::Jwks, Ok((503, b"busy")), 100, 0.5);
        assert_eq!(next, Next::Failed("the identity provider answered 503".into()));
        assert_eq!((failed.version, failed.fetched_at, failed.failures), (3, Some(50), 1));
        assert_eq!(failed.next_attempt, 101);
        let (again, _) = failed.record_response(&r, Stage::Jwks, Ok((200, b"[")), 101, 0.5);
        assert_eq!((again.failures, again.next_attempt), (2, 103));
        assert_eq!(backoff(30, 300, 0.99), 89);
        assert_eq!(backoff(30, 10, 0.0), 5);
    }

    #[test]
    fn oversized_and_keyless_documents_are_failures() {
        let r = remote(Some("https://idp/keys"));
        let big = vec![b' '; 2048];
        let (_, next) = KeyRecord::default().record_response(&r, Stage::Jwks, Ok((200, &big)), 1, 0.0);
        assert_eq!(next, Next::Failed("the response exceeds 1024 bytes".into()));
        let empty = br#"{"keys": [{"kty": "RSA", "use": "enc"}]}"#;
        let (_, next) = KeyRecord::default().record_response(&r, Stage::Jwks, Ok((200, empty)), 1, 0.0);
        assert_eq!(next, Next::Failed("no usable signing key among 1 keys".into()));
    }

    #[test]
    fn discovery_finds_the_jwks_uri_and_falls_back_to_rfc_8414() {
        let r = remote(None);
        let (leased, fetch) = KeyRecord::default().claim(&r, 1, false).unwrap();
        assert_eq!(fetch.stage, Stage::OpenIdDiscovery);
        assert_eq!(fetch.path, "/.well-known/openid-configuration");
        let (fallback, next) = leased.record_response(&r, Stage::OpenIdDiscovery, Ok((404, b"")), 1, 0.0);
        let Next::Fetch(oauth) = next else { panic!("{next:?}") };
        assert_eq!(oauth.path, "/.well-known/oauth-authorization-server");
        let doc = br#"{"issuer": "https://idp.example.com", "jwks_uri": "https://keys.example.com/jwks"}"#;
        let (found, next) = fallback.record_response(&r, Stage::OAuthDiscovery, Ok((200, doc)), 1, 0.0);
        assert_eq!(
            next,
            Next::Fetch(Fetch { stage: Stage::Jwks, authority: "keys.example.com".into(), path: "/jwks".into() })
        );
        assert_eq!(found.discovered_uri.as_deref(), Some("https://keys.example.com/jwks"));
        assert!(found.fetching(2), "the lease covers the next step");
    }

    #[test]
    fn the_proxys_own_answer_is_named_as_such() {
        let r = remote(Some("https://idp.example.com/keys"));
        let (leased, _) = KeyRecord::default().claim(&r, 1, false).unwrap();
        let refused = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure";
        let (_, next) = leased.record_response(&r, Stage::Jwks, Ok((503, refused)), 1, 0.0);
        assert_eq!(
            next,
            Next::Failed(
                "no answer from the identity provider: no connection (refused or reset) (the proxy's own 503)".into()
            )
        );
        let (_, next) = leased.record_response(&r, Stage::Jwks, Ok((503, b"maintenance")), 1, 0.0);
        assert_eq!(next, Next::Failed("the identity provider answered 503".into()));
    }

    #[test]
    fn a_discovery_document_for_another_issuer_is_refused() {
        let r = remote(None);
        let (leased, _) = KeyRecord::default().claim(&r, 1, false).unwrap();
        for doc in [
            &br#"{"issuer": "https://evil.example.com", "jwks_uri": "https://evil.example.com/jwks"}"#[..],
            br#"{"jwks_uri": "https://evil.example.com/jwks"}"#,
            br#"{"issuer": "https://idp.example.com/", "jwks_uri": "https://evil.example.com/jwks"}"#,
        ] {
            let (_, next) = leased.record_response(&r, Stage::OAuthDiscovery, Ok((200, doc)), 1, 0.0);
            assert!(matches!(&next, Next::Failed(e) if e.contains("not \"https://idp.example.com\"")), "{next:?}");
        }
    }
}
