//! Rate limits per agent: a token bucket of `requests` per `per_seconds`, per rule or for the
//! whole policy. The arithmetic is here; where buckets live is the host's (shared data in
//! Envoy, so all workers count together; memory elsewhere).

use crate::replay::{token_id, GuardError, TokenId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u32,
}

impl RateLimit {
    fn refill_per_second(&self) -> f64 {
        f64::from(self.requests) / f64::from(self.per_seconds.max(1))
    }
}

/// What a bucket remembers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub updated: i64,
}

/// One request against a bucket: the new bucket, and `Err(retry_after_seconds)` when over.
pub fn take(bucket: Option<Bucket>, limit: &RateLimit, now: i64) -> (Bucket, Result<(), u64>) {
    let capacity = f64::from(limit.requests);
    let rate = limit.refill_per_second();
    let tokens = match bucket {
        None => capacity,
        Some(b) => (b.tokens + (now.saturating_sub(b.updated).max(0) as f64) * rate).min(capacity),
    };
    if tokens >= 1.0 {
        (Bucket { tokens: tokens - 1.0, updated: now }, Ok(()))
    } else {
        let wait = ((1.0 - tokens) / rate).ceil().max(1.0) as u64;
        (Bucket { tokens, updated: now }, Err(wait))
    }
}

/// Where buckets live.
pub trait RateLimiter {
    /// Counts one request of `agent` under `scope` (a rule name, or `*` for the policy).
    /// `Ok(Err(seconds))`: over the limit, retry after that long.
    fn admit(&self, scope: &str, agent: &str, limit: &RateLimit, now: i64) -> Result<Result<(), u64>, GuardError>;
}

/// Buckets in this process, bounded: buckets that have refilled completely carry no state
/// and are dropped when room is needed.
#[derive(Debug)]
pub struct MemoryLimiter {
    buckets: Mutex<HashMap<(String, String), (Bucket, RateLimit)>>,
    capacity: AtomicUsize,
}

impl MemoryLimiter {
    /// A new policy may bound the same memory differently.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub fn new(capacity: usize) -> MemoryLimiter {
        MemoryLimiter { buckets: Mutex::new(HashMap::new()), capacity: AtomicUsize::new(capacity) }
    }
}

fn is_full(bucket: &Bucket, limit: &RateLimit, now: i64) -> bool {
    take(Some(*bucket), limit, now).0.tokens + 1.0 >= f64::from(limit.requests)
}

impl RateLimiter for MemoryLimiter {
    fn admit(&self, scope: &str, agent: &str, limit: &RateLimit, now: i64) -> Result<Result<(), u64>, GuardError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope.to_string(), agent.to_string());
        if !buckets.contains_key(&key) && buckets.len() >= self.capacity.load(Ordering::Relaxed) {
            buckets.retain(|_, (bucket, limit)| !is_full(bucket, limit, now));
            if buckets.len() >= self.capacity.load(Ordering::Relaxed) {
                return Err(GuardError::Full);
            }
        }
        let (bucket, verdict) = take(buckets.get(&key).map(|(b, _)| *b), limit, now);
        buckets.insert(key, (bucket, *limit));
        Ok(verdict)
    }
}

/// Shared storage: each (scope, agent) hashes to one of `SLOTS` slots, a slot holding up to
/// `SLOT_ENTRIES` buckets of 32 bytes (id, tokens, updated). Full buckets are dropped first,
/// then the least recently used: memory stays bounded whatever the number of agents.
pub const SLOTS: u16 = 512;
pub const SLOT_ENTRIES: usize = 128;

pub fn slot_key(scope: &str, agent: &str) -> (String, TokenId) {
    let id = token_id(scope, agent);
    let slot = u16::from_le_bytes([id[0], id[1]]) % SLOTS;
    (format!("agentgate/rate/{slot}"), id)
}

/// One request against the bucket `id` inside a slot's bytes: the slot's new bytes and the verdict.
pub fn admit_in_slot(slot: Option<&[u8]>, id: &TokenId, limit: &RateLimit, now: i64) -> (Vec<u8>, Result<(), u64>) {
    let mut entries: Vec<(TokenId, Bucket)> = slot
        .unwrap_or(&[])
        .chunks_exact(32)
        .filter_map(|chunk| {
            let (id, rest) = chunk.split_first_chunk::<16>()?;
            let (tokens, rest) = rest.split_first_chunk::<8>()?;
            let updated = rest.first_chunk::<8>()?;
            Some((*id, Bucket { tokens: f64::from_le_bytes(*tokens), updated: i64::from_le_bytes(*updated) }))
        })
        .collect();
    let existing = entries.iter().position(|(entry, _)| entry == id);
    let (bucket, verdict) = take(existing.and_then(|i| entries.get(i)).map(|(_, b)| *b), limit, now);
    match existing.and_then(|i| entries.get_mut(i)) {
        Some(entry) => entry.1 = bucket,
        None => {
            if entries.len() >= SLOT_ENTRIES {
                entries.retain(|(_, b)| !is_full(b, limit, now));
            }
            if entries.len() >= SLOT_ENTRIES {
                if let Some(oldest) = entries.iter().enumerate().min_by_key(|(_, (_, b))| b.updated).map(|(i, _)| i) {
                    entries.swap_remove(oldest);
                }
            }
            entries.push((*id, bucket));
        }
    }
    let mut bytes = Vec::with_capacity(entries.len() * 32);
    for (id, bucket) in &entries {
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(&bucket.tokens.to_le_bytes());
        bytes.extend_from_slice(&bucket.updated.to_le_bytes());
    }
    (bytes, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit { requests: 3, per_seconds: 60 };

    #[test]
    fn bucket_allows_the_burst_then_refills() {
        let limiter = MemoryLimiter::new(10);
        for _ in 0..3 {
            assert_eq!(limiter.admit("r", "a", &LIMIT, 100), Ok(Ok(())));
        }
        assert_eq!(limiter.admit("r", "a", &LIMIT, 100), Ok(Err(20)));
        assert_eq!(limiter.admit("r", "b", &LIMIT, 100), Ok(Ok(())), "agents are counted apart");
        assert_eq!(limiter.admit("other", "a", &LIMIT, 100), Ok(Ok(())), "and rules apart");
        assert_eq!(limiter.admit("r", "a", &LIMIT, 120), Ok(Ok(())), "one request refilled after 20 s");
        assert_eq!(limiter.admit("r", "a", &LIMIT, 121), Ok(Err(19)));
    }

    #[test]
    fn slot_bytes_round_trip_and_stay_bounded() {
        let (_, a) = slot_key("r", "a");
        let (mut slot, verdict) = admit_in_slot(None, &a, &LIMIT, 100);
        assert_eq!(verdict, Ok(()));
        for _ in 0..2 {
            slot = admit_in_slot(Some(&slot), &a, &LIMIT, 100).0;
        }
        assert_eq!(admit_in_slot(Some(&slot), &a, &LIMIT, 100).1, Err(20));
        for i in 0..(SLOT_ENTRIES as u32 * 2) {
            slot = admit_in_slot(Some(&slot), &token_id("r", &i.to_string()), &LIMIT, 100).0;
        }
        assert!(slot.len() <= SLOT_ENTRIES * 32);
    }
}
