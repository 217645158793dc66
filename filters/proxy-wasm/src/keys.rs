//! Remote keys in the filter: the I/O around `agentgate::jwks`. Only the root context fetches
//! (an HTTP context's callouts die with its request); requests whose keys are missing wait in
//! [`Fetcher::waiting`] until keys arrive, the fetch fails, or their deadline passes.

use crate::host;
use crate::metrics::Metrics;
use crate::shared::update_shared;
use agentgate::jwks::{Fetch, KeyRecord, Next, RemoteJwks, Response, Stage};
use agentgate::Gate;
use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A request held until its provider's keys arrive.
pub struct Waiter {
    pub context_id: u32,
    pub provider: usize,
    /// Unix milliseconds.
    pub deadline_ms: u64,
}

/// One VM's side of key fetching, shared by the root context and its requests.
#[derive(Default)]
pub struct Fetcher {
    /// Callouts in flight: token → (provider index, stage).
    calls: HashMap<u32, (usize, Stage)>,
    /// Providers a waiting request wants refetched now (a `kid` the keys do not have).
    wanted: HashSet<usize>,
    pub waiting: Vec<Waiter>,
}

fn record_of(key: &str) -> KeyRecord {
    let bytes = hostcalls::get_shared_data(key).ok().and_then(|(bytes, _)| bytes);
    KeyRecord::from_bytes(bytes.as_deref())
}

/// The fetch settings of provider `index`, when its keys are fetched.
fn remote_of(gate: &Gate, index: usize) -> Option<&RemoteJwks> {
    gate.policy().providers.get(index).and_then(|p| p.remote.as_ref())
}

fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

impl Fetcher {
    /// How long a request for `provider`'s keys should wait (`wait_ms`), when a fetch is in
    /// flight somewhere or one may start now; marks the provider for a fetch on the next tick.
    pub fn should_wait(&mut self, gate: &Gate, provider: usize, now: i64) -> Option<u64> {
        let remote = remote_of(gate, provider).filter(|r| r.wait_ms > 0)?;
        let record = record_of(&remote.store_key);
        let fetch_possible = record.fetching(now) || record.claim(remote, now, true).is_some();
        fetch_possible.then(|| {
            self.wanted.insert(provider);
            remote.wait_ms
        })
    }

    /// Adopts key sets other workers fetched; starts the fetches that are due (or wanted).
    /// Returns the providers whose keys changed or whose wanted fetch cannot happen, so
    /// their waiting requests can be decided.
    pub fn tick(&mut self, gate: &Gate, metrics: &Metrics, now: i64) -> Vec<usize> {
        let mut settled = Vec::new();
        let remote: Vec<usize> = gate.remote_providers().map(|(i, _, _)| i).collect();
        for index in remote {
            // New keys (another worker's fetch) settle the waiting requests: no forced fetch.
            let adopted = sync(gate, index);
            let forced = self.wanted.remove(&index) && !adopted;
            if adopted {
                settled.push(index);
            }
            let in_flight = self.start(gate, metrics, index, forced, now);
            if forced && !in_flight {
                settled.push(index);
            }
        }
        settled
    }

    /// Claims and dispatches a fetch for `index` if one is due; true when one is in flight
    /// afterwards (this worker's or another's).
    fn start(&mut self, gate: &Gate, metrics: &Metrics, index: usize, forced: bool, now: i64) -> bool {
        let Some(remote) = remote_of(gate, index) else { return false };
        // Either this worker takes the lease, or the record read says whether another has it.
        let claimed = update_shared(&remote.store_key, |bytes| {
            let record = KeyRecord::from_bytes(bytes);
            Ok(match record.claim(remote, now, forced) {
                Some((leased, fetch)) => (Some(leased.to_bytes()), Ok(fetch)),
                None => (None, Err(record.fetching(now))),
            })
        });
        match claimed {
            Ok(Ok(fetch)) => self.dispatch(gate, metrics, index, fetch, now),
            Ok(Err(fetching_elsewhere)) => fetching_elsewhere,
            Err(_) => false,
        }
    }

    fn dispatch(&mut self, gate: &Gate, metrics: &Metrics, index: usize, fetch: Fetch, now: i64) -> bool {
        let Some(remote) = remote_of(gate, index) else { return false };
        let headers = vec![
            (":method", "GET"),
            (":path", fetch.path.as_str()),
            (":authority", fetch.authority.as_str()),
            ("accept", "application/json"),
            ("user-agent", "agentgate"),
        ];
        let timeout = Duration::from_millis(remote.timeout_ms);
        match hostcalls::dispatch_http_call(&remote.cluster, headers, None, vec![], timeout) {
            Ok(token) => {
                self.calls.insert(token, (index, fetch.stage));
                true
            }
            Err(status) => {
                let error = format!("cannot call upstream {:?}: {status:?}", remote.cluster);
                self.settle(gate, metrics, index, fetch.stage, Err(error), now);
                false
            }
        }
    }

    /// Handles a callout's answer. Returns the provider when its waiting requests can be
    /// decided (new keys, or a failed fetch).
    pub fn on_response(
        &mut self,
        gate: &Gate,
        metrics: &Metrics,
        token: u32,
        body_size: usize,
        now: i64,
    ) -> Option<usize> {
        let (index, stage) = self.calls.remove(&token)?;
        let max_bytes = remote_of(gate, index)?.max_bytes;
        let status = host::header_map(host::CALL_RESPONSE_HEADERS)
            .and_then(|headers| headers.into_iter().find(|(n, _)| n == ":status"))
            .and_then(|(_, v)| v.parse::<u16>().ok());
        // Read no more than the limit: a larger body is refused without copying it.
        let body = if body_size > max_bytes {
            Some(vec![0; max_bytes.saturating_add(1)])
        } else {
            hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, 0, body_size).ok().flatten()
        };
        let body = body.unwrap_or_default();
        let response: Response<'_> = match status {
            Some(status) => Ok((status, &body)),
            None => Err("no response (timeout, or the upstream is unreachable)".to_string()),
        };
        self.settle(gate, metrics, index, stage, response, now)
    }

    /// Records a fetch's outcome in the shared record, installs new keys, logs and counts.
    fn settle(
        &mut self,
        gate: &Gate,
        metrics: &Metrics,
        index: usize,
        stage: Stage,
        response: Response<'_>,
        now: i64,
    ) -> Option<usize> {
        let provider = gate.policy().providers.get(index)?;
        let remote = provider.remote.as_ref()?;
        let jitter = f64::from(host::subsec_nanos() % 1000) / 1000.0;
        let next = update_shared(&remote.store_key, |bytes| {
            let record = KeyRecord::from_bytes(bytes);
            let (updated, next) = record.record_response(remote, stage, response.clone(), now, jitter);
            Ok((Some(updated.to_bytes()), (next, updated)))
        });
        let name = &provider.name;
        match next {
            Ok((Next::Fetch(fetch), _)) => {
                self.dispatch(gate, metrics, index, fetch, now);
                None
            }
            Ok((Next::Updated(count), record)) => {
                metrics.count_fetch(index, true);
                log(LogLevel::Info, &format!("agentgate: provider {name}: fetched {count} signing keys"));
                gate.install_keys(index, &record);
                Some(index)
            }
            Ok((Next::Failed(error), record)) => {
                metrics.count_fetch(index, false);
                let kept = match record.fetched_at {
                    Some(at) => format!(
                        "keeping the keys fetched at {at} until {} (max_stale_seconds)",
                        at.saturating_add(remote.max_stale_seconds)
                    ),
                    None => "no keys yet: its tokens are refused".to_string(),
                };
                log(
                    LogLevel::Warn,
                    &format!(
                        "agentgate: provider {name}: key fetch failed: {error}; {kept}; next attempt at {}",
                        record.next_attempt
                    ),
                );
                Some(index)
            }
            Err(_) => {
                log(LogLevel::Warn, &format!("agentgate: provider {name}: cannot update the shared key record"));
                None
            }
        }
    }
}

/// Installs the shared record's keys for `index` when newer; true if it did.
pub fn sync(gate: &Gate, index: usize) -> bool {
    let Some(remote) = remote_of(gate, index) else { return false };
    gate.install_keys(index, &record_of(&remote.store_key)).is_some()
}
