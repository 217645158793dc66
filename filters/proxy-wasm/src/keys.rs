//! Remote keys in the filter: the I/O around `agentgate::jwks`. The root context refreshes
//! keys from `on_tick`; a request whose keys are missing fetches them itself, from its own
//! context, and is decided when its own callout answers: no request is ever resumed from
//! another context (Kong's `set_effective_context` is a no-op there, and reading a request
//! from the root context crashes its worker).

use crate::host::{Host, Level, Map};
use crate::shared::update_shared;
use crate::Shared;
use agentgate::jwks::{discovery_url, split_url, Fetch, KeyRecord, Next, RemoteJwks, Response, Stage};
use agentgate::Gate;

/// The fetch settings of provider `index`, when its keys are fetched.
fn remote_of(gate: &Gate, index: usize) -> Option<&RemoteJwks> {
    gate.policy().providers.get(index).and_then(|p| p.remote.as_ref())
}

fn record_of(host: &dyn Host, key: &str) -> KeyRecord {
    let bytes = host.get_shared_data(key).ok().and_then(|(bytes, _)| bytes);
    KeyRecord::from_bytes(bytes.as_deref())
}

/// Installs the shared record's keys for `index` when newer; true if it did.
pub fn sync(host: &dyn Host, gate: &Gate, index: usize) -> bool {
    let Some(remote) = remote_of(gate, index) else { return false };
    gate.install_keys(index, &record_of(host, &remote.store_key)).is_some()
}

/// Takes the lease for a fetch of `index` when one is due (`forced`: early, for an unknown
/// `kid`); `Err(true)` when another fetch is in flight somewhere.
fn claim(host: &dyn Host, gate: &Gate, index: usize, forced: bool, now: i64) -> Result<Fetch, bool> {
    let Some(remote) = remote_of(gate, index) else { return Err(false) };
    // Either this worker takes the lease, or the record read says whether another has it.
    let claimed = update_shared(host, &remote.store_key, |bytes| {
        let record = KeyRecord::from_bytes(bytes);
        Ok(match record.claim(remote, now, forced) {
            Some((leased, fetch)) => (Some(leased.to_bytes()), Ok(fetch)),
            None => (None, Err(record.fetching(now))),
        })
    });
    claimed.unwrap_or(Err(false))
}

/// The fetch a request makes when another one is in flight already (it cannot be woken by
/// that one's answer): the same document, without the lease.
fn follow(host: &dyn Host, remote: &RemoteJwks) -> Option<Fetch> {
    let record = record_of(host, &remote.store_key);
    let (stage, url) = match remote.jwks_uri.clone().or(record.discovered_uri) {
        Some(uri) => (Stage::Jwks, uri),
        None => (Stage::OpenIdDiscovery, discovery_url(&remote.issuer, Stage::OpenIdDiscovery)),
    };
    let (authority, path) = split_url(&url).ok()?;
    Some(Fetch { stage, authority, path })
}

/// What a request that needs `index`'s keys does: `Some` (the fetch to make from its own
/// context, and how long to wait) when a fetch is due or in flight and the provider waits
/// (`wait_ms` > 0). Without waiting, the provider is marked for an early fetch on the next
/// tick, so the next request finds the new keys.
pub fn for_request(host: &dyn Host, shared: &Shared, index: usize, now: i64) -> Option<(Fetch, u64)> {
    let remote = remote_of(&shared.gate, index)?;
    if remote.wait_ms == 0 {
        let record = record_of(host, &remote.store_key);
        if record.fetching(now) || record.claim(remote, now, true).is_some() {
            shared.wanted.borrow_mut().insert(index);
        }
        return None;
    }
    match claim(host, &shared.gate, index, true, now) {
        Ok(fetch) => Some((fetch, remote.wait_ms)),
        Err(true) => follow(host, remote).map(|fetch| (fetch, remote.wait_ms)),
        Err(false) => None,
    }
}

/// The root context's tick: adopts key sets other workers fetched, starts the fetches that
/// are due (or wanted early). Returns the fetches to dispatch from the root context.
pub fn tick(host: &dyn Host, shared: &Shared, now: i64) -> Vec<(usize, Fetch)> {
    let gate = &shared.gate;
    let mut due = Vec::new();
    for (index, _, _) in gate.remote_providers() {
        // New keys (another worker's fetch) make a wanted early fetch moot.
        let adopted = sync(host, gate, index);
        let forced = shared.wanted.borrow_mut().remove(&index) && !adopted;
        if let Ok(fetch) = claim(host, gate, index, forced, now) {
            due.push((index, fetch));
        }
    }
    due
}

/// Dispatches `fetch` for provider `index`; the callout's token, or `None` when the host
/// refused it (recorded as a failed fetch). `wait_ms` caps the timeout of a request's fetch.
pub fn dispatch(
    host: &dyn Host,
    shared: &Shared,
    index: usize,
    fetch: &Fetch,
    wait_ms: Option<u64>,
    now: i64,
) -> Option<u32> {
    let remote = remote_of(&shared.gate, index)?;
    let headers = [
        (":method", "GET"),
        (":path", fetch.path.as_str()),
        (":authority", fetch.authority.as_str()),
        ("accept", "application/json"),
        ("user-agent", "agentgate"),
    ];
    let timeout = wait_ms.map_or(remote.timeout_ms, |wait| wait.min(remote.timeout_ms));
    match host.http_call(&remote.cluster, &headers, u32::try_from(timeout).unwrap_or(u32::MAX)) {
        Ok(token) => Some(token),
        Err(status) => {
            let error = format!("cannot call upstream {:?}: status {status}", remote.cluster);
            // A refused follow-up leaves nothing to dispatch: the failure is recorded.
            let _ = settle(host, shared, index, fetch.stage, Err(error), now);
            None
        }
    }
}

/// Handles a callout's answer: records it, installs new keys; `Some` when another fetch
/// follows (discovery found the JWKS URL).
pub fn on_response(
    host: &dyn Host,
    shared: &Shared,
    index: usize,
    stage: Stage,
    body_size: usize,
    now: i64,
) -> Option<Fetch> {
    let max_bytes = remote_of(&shared.gate, index)?.max_bytes;
    let status = host
        .header_map(Map::CallResponseHeaders)
        .and_then(|headers| headers.into_iter().find(|(n, _)| n == ":status"))
        .and_then(|(_, v)| v.parse::<u16>().ok());
    // Read no more than the limit: a larger body is refused without copying it.
    let body = if body_size > max_bytes {
        vec![0; max_bytes.saturating_add(1)]
    } else {
        host.call_response_body(body_size).unwrap_or_default()
    };
    let response: Response<'_> = match status {
        Some(status) => Ok((status, &body)),
        None => Err("no response (timeout, or the upstream is unreachable)".to_string()),
    };
    settle(host, shared, index, stage, response, now)
}

/// Records a fetch's outcome in the shared record, installs new keys, logs and counts.
fn settle(
    host: &dyn Host,
    shared: &Shared,
    index: usize,
    stage: Stage,
    response: Response<'_>,
    now: i64,
) -> Option<Fetch> {
    let (gate, metrics) = (&shared.gate, &shared.metrics);
    let provider = gate.policy().providers.get(index)?;
    let remote = provider.remote.as_ref()?;
    let jitter = f64::from(crate::subsec_nanos(host) % 1000) / 1000.0;
    let next = update_shared(host, &remote.store_key, |bytes| {
        let record = KeyRecord::from_bytes(bytes);
        let (updated, next) = record.record_response(remote, stage, response.clone(), now, jitter);
        Ok((Some(updated.to_bytes()), (next, updated)))
    });
    let name = &provider.name;
    match next {
        Ok((Next::Fetch(fetch), _)) => Some(fetch),
        Ok((Next::Updated(count), record)) => {
            metrics.count_fetch(host, index, true);
            host.log(Level::Info, &format!("agentgate: provider {name}: fetched {count} signing keys"));
            gate.install_keys(index, &record);
            None
        }
        Ok((Next::Failed(error), record)) => {
            metrics.count_fetch(host, index, false);
            let kept = match record.fetched_at {
                Some(at) => format!(
                    "keeping the keys fetched at {at} until {} (max_stale_seconds)",
                    at.saturating_add(remote.max_stale_seconds)
                ),
                None => "no keys yet: its tokens are refused".to_string(),
            };
            host.log(
                Level::Warn,
                &format!(
                    "agentgate: provider {name}: key fetch failed: {error}; {kept}; next attempt at {}",
                    record.next_attempt
                ),
            );
            None
        }
        Err(_) => {
            host.log(Level::Warn, &format!("agentgate: provider {name}: cannot update the shared key record"));
            None
        }
    }
}
