//! Single-use tokens (`single_use: true`): a `jti` is accepted once within the token's
//! lifetime — a key that melts after one use. The core decides *what* to remember; a host
//! decides *where*: in this process ([`MemoryGuard`]), or in storage its workers share
//! (the proxy-wasm filter uses shared data, with [`record_in_bucket`]).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A single-use token's identity: a digest of its issuer and `jti`.
pub type TokenId = [u8; 16];

pub fn token_id(issuer: &str, jti: &str) -> TokenId {
    let digest = Sha256::new().chain_update(issuer).chain_update([0]).chain_update(jti).finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    id
}

/// Why a replay check could not be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardError {
    /// Storage is at its bound with live entries.
    Full,
    /// The host's storage failed or kept changing under us.
    Unavailable,
}

/// Which provider's single-use tokens, and the size of its bucket ring.
#[derive(Debug, Clone, Copy)]
pub struct ReplayScope<'a> {
    pub provider: &'a str,
    pub ring: i64,
}

/// Remembers single-use tokens until they expire.
pub trait ReplayGuard {
    /// Records `id`, which stays relevant until `expires_at`. `Ok(true)` on first use,
    /// `Ok(false)` if it was recorded before.
    fn first_use(&self, scope: ReplayScope<'_>, id: &TokenId, expires_at: i64, now: i64) -> Result<bool, GuardError>;
}

/// In-process memory, for hosts with one worker (the CLI, JS runtimes) or without shared
/// storage. Bounded: expired entries are dropped when it fills up; if it is still full, new
/// single-use tokens are refused (fail closed).
#[derive(Debug)]
pub struct MemoryGuard {
    seen: Mutex<HashMap<TokenId, i64>>,
    capacity: AtomicUsize,
}

impl MemoryGuard {
    /// A new policy may bound the same memory differently.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub fn new(capacity: usize) -> MemoryGuard {
        MemoryGuard { seen: Mutex::new(HashMap::new()), capacity: AtomicUsize::new(capacity) }
    }
}

impl ReplayGuard for MemoryGuard {
    fn first_use(&self, _scope: ReplayScope<'_>, id: &TokenId, expires_at: i64, now: i64) -> Result<bool, GuardError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains_key(id) {
            return Ok(false);
        }
        if seen.len() >= self.capacity.load(Ordering::Relaxed) {
            seen.retain(|_, &mut expiry| expiry >= now);
            if seen.len() >= self.capacity.load(Ordering::Relaxed) {
                return Err(GuardError::Full);
            }
        }
        seen.insert(*id, expires_at);
        Ok(true)
    }
}

/// Shared storage is split by expiry window and by id, into a fixed ring of buckets: a
/// bucket is reused once every token it held has expired, so memory stays bounded without
/// any deletion, and each request touches one small bucket.
pub const WINDOW_SECONDS: i64 = 20;
pub const SHARDS: u8 = 32;
/// Entries per bucket (16 bytes each).
pub const BUCKET_CAPACITY: usize = 4096;

/// The longest lifetime a single-use token may have: single use is for short-lived,
/// task-specific credentials, and it bounds the memory remembered `jti`s take.
pub const MAX_SINGLE_USE_LIFETIME_SECONDS: u64 = 3600;

/// The windows of the bucket ring: enough that no two live windows share a slot, since
/// tokens reach the guard only with `now - skew <= exp <= now + max_lifetime + skew`. One
/// ring for every policy: a reconfiguration (another lifetime or skew) finds every `jti`
/// remembered before where it left it.
pub const RING: i64 =
    (MAX_SINGLE_USE_LIFETIME_SECONDS + 2 * crate::config::MAX_CLOCK_SKEW_SECONDS) as i64 / WINDOW_SECONDS + 3;

/// The storage key of one bucket.
pub fn bucket_name(provider: &str, slot: i64, shard: u8) -> String {
    format!("agentgate/jti/{provider}/{slot}/{shard}")
}

/// The storage key of `id`'s bucket, and the window it belongs to.
pub fn bucket_key(provider: &str, id: &TokenId, expires_at: i64, ring: i64) -> (String, i64) {
    let window = expires_at.div_euclid(WINDOW_SECONDS);
    let slot = window.rem_euclid(ring.max(1));
    let shard = id.first().copied().unwrap_or(0) % SHARDS;
    (bucket_name(provider, slot, shard), window)
}

/// Adds `id` to a bucket (8-byte window, then 16-byte ids). A bucket of another window is
/// stale — every token in it has expired — and starts over. `Ok(None)`: already present.
pub fn record_in_bucket(bucket: Option<&[u8]>, window: i64, id: &TokenId) -> Result<Option<Vec<u8>>, GuardError> {
    let live = bucket.filter(|b| b.get(..8).is_some_and(|w| w == window.to_le_bytes()));
    let entries = live.and_then(|b| b.get(8..)).unwrap_or(&[]);
    if entries.chunks_exact(16).any(|entry| entry == id) {
        return Ok(None);
    }
    if entries.len() / 16 >= BUCKET_CAPACITY {
        return Err(GuardError::Full);
    }
    let mut updated = Vec::with_capacity(8 + entries.len() + 16);
    updated.extend_from_slice(&window.to_le_bytes());
    updated.extend_from_slice(entries);
    updated.extend_from_slice(id);
    Ok(Some(updated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_guard_accepts_once_and_stays_bounded() {
        let guard = MemoryGuard::new(2);
        let scope = ReplayScope { provider: "p", ring: 3 };
        let (a, b, c) = (token_id("i", "a"), token_id("i", "b"), token_id("i", "c"));
        assert_eq!(guard.first_use(scope, &a, 100, 0), Ok(true));
        assert_eq!(guard.first_use(scope, &a, 100, 0), Ok(false));
        assert_eq!(guard.first_use(scope, &b, 50, 0), Ok(true));
        assert_eq!(guard.first_use(scope, &c, 100, 10), Err(GuardError::Full));
        // Once b has expired its room is reused.
        assert_eq!(guard.first_use(scope, &c, 100, 60), Ok(true));
        assert_eq!(guard.first_use(scope, &a, 100, 60), Ok(false));
    }

    #[test]
    fn token_ids_depend_on_issuer_and_jti() {
        assert_ne!(token_id("i1", "j"), token_id("i2", "j"));
        assert_ne!(token_id("ab", "c"), token_id("a", "bc"));
    }

    #[test]
    fn bucket_records_once_and_resets_when_stale() {
        let id = token_id("i", "j");
        let first = record_in_bucket(None, 7, &id).ok().flatten().unwrap_or_default();
        assert_eq!(first.len(), 24);
        assert_eq!(record_in_bucket(Some(&first), 7, &id), Ok(None));
        let other = token_id("i", "k");
        let second = record_in_bucket(Some(&first), 7, &other).ok().flatten().unwrap_or_default();
        assert_eq!(second.len(), 40);
        // The slot now serves window 9: window 7's tokens are all expired.
        let reused = record_in_bucket(Some(&second), 9, &id).ok().flatten().unwrap_or_default();
        assert_eq!(reused.len(), 24);
    }

    #[test]
    fn live_windows_never_share_a_slot() {
        let ring = RING;
        let id = token_id("i", "j");
        let now = 1_800_000_000;
        let (max, skew) = (MAX_SINGLE_USE_LIFETIME_SECONDS as i64, crate::config::MAX_CLOCK_SKEW_SECONDS as i64);
        let slots: Vec<String> = (now - skew..=now + max + skew)
            .step_by(WINDOW_SECONDS as usize)
            .map(|exp| bucket_key("p", &id, exp, ring).0)
            .collect();
        let mut unique = slots.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), slots.len());
    }
}
