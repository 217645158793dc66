//! The second level of the verified-token cache: a digest of every token one worker verified,
//! in storage all workers of the proxy share (proxy-wasm shared data), so that with N workers a
//! token's signature is checked once, not N times. A hit saves only the signature check: the
//! token is parsed again and every other check (expiry, audience, revocation, rules) runs as
//! on a miss.
//!
//! An entry is valid under a stamp — the policy and the key sets in force when it was
//! verified — so a reconfiguration or a key rotation makes every older entry a miss. Memory is
//! bounded: a fixed set of buckets, each keeping its newest entries.

use sha2::{Digest, Sha256};

/// A token's identity in the shared cache: the first 16 bytes of its SHA-256.
pub type CacheId = [u8; 16];

/// Buckets, by the id's first byte.
pub const SHARDS: u8 = 64;
/// Entries per bucket: 64 × 128 tokens, 24 bytes each (about 200 KB in all).
pub const BUCKET_ENTRIES: usize = 128;
const ENTRY_BYTES: usize = 24;

pub fn cache_id(digest: &[u8; 32]) -> CacheId {
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    id
}

/// The storage key of `id`'s bucket.
pub fn bucket_name(id: &CacheId) -> String {
    format!("agentgate/verified/{}", id.first().copied().unwrap_or(0) % SHARDS)
}

/// The stamp of a policy (its JSON text) with its providers' key sets (their digests).
pub fn stamp(policy_digest: &[u8; 32], key_sets: impl Iterator<Item = [u8; 32]>) -> u64 {
    let mut hash = Sha256::new().chain_update(policy_digest);
    for key_set in key_sets {
        hash.update(key_set);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(first)
}

fn entry(id: &CacheId, stamp: u64) -> [u8; ENTRY_BYTES] {
    let mut bytes = [0u8; ENTRY_BYTES];
    let (head, tail) = bytes.split_at_mut(16);
    head.copy_from_slice(id);
    tail.copy_from_slice(&stamp.to_le_bytes());
    bytes
}

/// Whether `bucket` holds `id` verified under `stamp`.
pub fn contains(bucket: Option<&[u8]>, id: &CacheId, stamp: u64) -> bool {
    let wanted = entry(id, stamp);
    bucket.is_some_and(|b| b.chunks_exact(ENTRY_BYTES).any(|e| e == wanted))
}

/// `bucket` with `id` added as its newest entry (the oldest dropped when full); `None` when
/// it is there already.
pub fn insert(bucket: Option<&[u8]>, id: &CacheId, stamp: u64) -> Option<Vec<u8>> {
    if contains(bucket, id, stamp) {
        return None;
    }
    let entries = bucket.unwrap_or_default();
    let whole = entries.len() - entries.len() % ENTRY_BYTES;
    let keep = whole.min((BUCKET_ENTRIES - 1) * ENTRY_BYTES);
    let mut updated = Vec::with_capacity(keep + ENTRY_BYTES);
    updated.extend_from_slice(entries.get(whole - keep..whole).unwrap_or_default());
    updated.extend_from_slice(&entry(id, stamp));
    Some(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> CacheId {
        [n; 16]
    }

    #[test]
    fn an_entry_is_found_under_its_stamp_only() {
        let bucket = insert(None, &id(1), 7);
        assert!(contains(bucket.as_deref(), &id(1), 7));
        assert!(!contains(bucket.as_deref(), &id(1), 8), "another policy or key set");
        assert!(!contains(bucket.as_deref(), &id(2), 7));
        assert_eq!(insert(bucket.as_deref(), &id(1), 7), None, "already there");
        assert!(!contains(None, &id(1), 7));
        assert!(!contains(Some(&[1, 2, 3]), &id(1), 7), "garbage is a miss");
    }

    #[test]
    fn a_full_bucket_forgets_its_oldest_entries() {
        let mut bucket: Option<Vec<u8>> = None;
        for n in 0..=BUCKET_ENTRIES as u8 {
            bucket = insert(bucket.as_deref(), &id(n), 1).or(bucket);
        }
        let bucket = bucket.unwrap_or_default();
        assert_eq!(bucket.len(), BUCKET_ENTRIES * ENTRY_BYTES);
        assert!(!contains(Some(&bucket), &id(0), 1), "the oldest went first");
        assert!(contains(Some(&bucket), &id(1), 1) && contains(Some(&bucket), &id(BUCKET_ENTRIES as u8), 1));
    }

    #[test]
    fn stamps_change_with_the_policy_and_every_key_set() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(stamp(&a, [a, b].into_iter()), stamp(&a, [a, b].into_iter()));
        assert_ne!(stamp(&a, [a, b].into_iter()), stamp(&b, [a, b].into_iter()));
        assert_ne!(stamp(&a, [a, b].into_iter()), stamp(&a, [a, a].into_iter()));
    }
}
