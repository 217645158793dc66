//! State every worker VM of a proxy shares: proxy-wasm shared data, updated with
//! compare-and-swap: single-use `jti`s, rate-limit slots, and which tokens a worker verified.

use crate::host::{Host, CAS_MISMATCH};
use agentgate::quarantine::{ConductStore, Update};
use agentgate::ratelimit::{admit_in_slot, slot_key, RateLimit, RateLimiter};
use agentgate::replay::{
    bucket_key, bucket_name, record_in_bucket, GuardError, ReplayGuard, ReplayScope, TokenId, SHARDS,
};
use agentgate::shared_cache::{self, CacheId};
use agentgate::Gate;

/// Single-use `jti`s and rate-limit buckets in the host's shared data, so every worker VM
/// of the proxy agrees.
pub struct SharedDataGuard<'a>(pub &'a dyn Host);

const CAS_RETRIES: usize = 16;

/// Reads `key`, lets `update` compute the new value (`None`: nothing to write) and an
/// answer, and writes with the host's compare-and-swap, retrying when another worker won.
pub fn update_shared<T>(
    host: &dyn Host,
    key: &str,
    update: impl Fn(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T), GuardError>,
) -> Result<T, GuardError> {
    for _ in 0..CAS_RETRIES {
        let (current, cas) = host.get_shared_data(key).map_err(|_| GuardError::Unavailable)?;
        let (updated, answer) = update(current.as_deref())?;
        let Some(updated) = updated else { return Ok(answer) };
        match host.set_shared_data(key, &updated, cas) {
            Ok(()) => return Ok(answer),
            Err(CAS_MISMATCH) => continue,
            Err(_) => return Err(GuardError::Unavailable),
        }
    }
    Err(GuardError::Unavailable)
}

/// The verified-token cache's second level: a token one worker verified costs the others a
/// lookup instead of a signature check (every other check still runs).
impl agentgate::gate::SharedState for SharedDataGuard<'_> {
    fn verified_elsewhere(&self, id: &CacheId, stamp: u64) -> bool {
        let bucket = self.0.get_shared_data(&shared_cache::bucket_name(id)).ok().and_then(|(bytes, _)| bytes);
        shared_cache::contains(bucket.as_deref(), id, stamp)
    }

    fn record_verified(&self, id: &CacheId, stamp: u64) {
        // A bucket two workers create at once may lose one entry (a later miss that
        // verifies again): unlike a single-use record, nothing depends on it being kept.
        let _ = update_shared(self.0, &shared_cache::bucket_name(id), |bucket| {
            Ok((shared_cache::insert(bucket, id, stamp), ()))
        });
    }

    fn conduct(&self) -> Option<&dyn ConductStore> {
        Some(self)
    }
}

/// Quarantine counts and the quarantine list, in shared data: every worker sees them.
impl ConductStore for SharedDataGuard<'_> {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>, GuardError> {
        self.0.get_shared_data(key).map(|(bytes, _)| bytes).map_err(|_| GuardError::Unavailable)
    }

    fn update(&self, key: &str, update: &Update<'_>) -> Result<(), GuardError> {
        update_shared(self.0, key, |current| Ok((update(current), ())))
    }
}

impl ReplayGuard for SharedDataGuard<'_> {
    fn first_use(&self, scope: ReplayScope<'_>, id: &TokenId, expires_at: i64, _now: i64) -> Result<bool, GuardError> {
        let (key, window) = bucket_key(scope.provider, id, expires_at, scope.ring);
        update_shared(self.0, &key, |bucket| {
            Ok(match record_in_bucket(bucket, window, id)? {
                Some(updated) => (Some(updated), true),
                None => (None, false),
            })
        })
    }
}

impl RateLimiter for SharedDataGuard<'_> {
    fn admit(&self, scope: &str, agent: &str, limit: &RateLimit, now: i64) -> Result<Result<(), u64>, GuardError> {
        let (key, id) = slot_key(scope, agent);
        update_shared(self.0, &key, |slot| {
            let (updated, verdict) = admit_in_slot(slot, &id, limit, now);
            Ok((Some(updated), verdict))
        })
    }
}

/// Creates every bucket a single-use provider may use, empty, unless another VM already
/// did: later updates then always carry a CAS, so two workers can never both record the
/// same `jti` as new.
pub fn prepare_replay_buckets(host: &dyn Host, gate: &Gate) {
    let policy = gate.policy();
    let single_use = policy.providers.iter().filter_map(|p| p.single_use_ring.map(|ring| (p.name.as_str(), ring)));
    // DPoP proof jtis go next to them where the policy expects DPoP-bound tokens.
    let dpop = policy.expects_dpop().then_some((agentgate::gate::DPOP_REPLAY_SCOPE, agentgate::replay::RING));
    for (scope, ring) in single_use.chain(dpop) {
        for slot in 0..ring {
            for shard in 0..SHARDS {
                let key = bucket_name(scope, slot, shard);
                if let Ok((None, _)) = host.get_shared_data(&key) {
                    let _ = host.set_shared_data(&key, &[0xff; 8], 0);
                }
            }
        }
    }
}
