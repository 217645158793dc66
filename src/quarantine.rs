//! Behavioural quarantine: an agent that collects `max_denials` counted denials within
//! `window_seconds` is refused everything for `cool_off_seconds` — any token, any rule —
//! until the cool-off ends or a policy update releases it. Only verified identities count:
//! a denial is counted only after the token's signature and claims were checked, so garbage
//! sent in a victim's name never quarantines it.
//!
//! State lives in the host's shared store (proxy-wasm shared data in Envoy, so all workers of
//! an instance agree; memory where there is none), in fixed keys, so memory is bounded:
//! - conduct: `SLOTS` slots of at most `SLOT_ENTRIES` agents each (the window's denials by
//!   reason); an agent whose window has passed is forgotten first, then the least recently
//!   denied;
//! - the quarantine list: at most `MAX_QUARANTINED` agents; expired entries are dropped first.
//!
//! A full or failing store fails *open* for quarantine only: quarantine is an extra defence
//! on top of the rules, which still judge every request; refusing all traffic because the
//! store is full would let one misbehaving population take the API down (and is logged).

use crate::reason::Reason;
use crate::replay::{token_id, GuardError, TokenId};
use serde_json::json;

/// Agents tracked at once: 256 slots of 64.
pub const SLOTS: u16 = 256;
pub const SLOT_ENTRIES: usize = 64;
pub const MAX_QUARANTINED: usize = 1024;
pub const QUARANTINE_KEY: &str = "agentgate/quarantined";

/// The reasons counted when a policy does not list its own: what an agent that strays from
/// its task, probes, loops or replays collects.
pub const DEFAULT_COUNT: [Reason; 10] = [
    Reason::NoMatchingRule,
    Reason::InsufficientScope,
    Reason::TaskMismatch,
    Reason::ArgumentMismatch,
    Reason::AgentNotAllowed,
    Reason::DelegationNotAllowed,
    Reason::RateLimited,
    Reason::Replayed,
    Reason::NonCanonicalPath,
    Reason::McpParseError,
];

/// Reasons that can only be reached with a verified token: the ones a policy may count.
pub fn countable(reason: Reason) -> bool {
    use Reason::*;
    matches!(
        reason,
        Replayed
            | NonCanonicalPath
            | NonCanonicalMethod
            | NonCanonicalHost
            | McpParseError
            | McpInvalidRequest
            | McpHeaderMismatch
            | BodyTooLarge
            | NoMatchingRule
            | InsufficientScope
            | TaskMismatch
            | AgentNotAllowed
            | PeerMismatch
            | DelegationNotAllowed
            | ApprovalRequired
            | SourceNotAllowed
            | HeaderMismatch
            | ArgumentMismatch
            | OutsideTimeWindow
            | ClaimMismatch
            | RateLimited
            | RecentDenials
    )
}

/// The compiled `quarantine` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub window_seconds: i64,
    pub max_denials: u32,
    pub cool_off_seconds: i64,
    pub count: Vec<Reason>,
    /// Agents released from a quarantine that began under another policy.
    pub release: Vec<String>,
    /// Denials of a delegated token count against its subject too.
    pub count_delegators: bool,
}

/// A read-modify-write of one stored value: the new value, or `None` to leave it.
pub type Update<'a> = dyn Fn(Option<&[u8]>) -> Option<Vec<u8>> + 'a;

/// Where quarantine state is kept: a key-value store with atomic read-modify-write.
pub trait ConductStore {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>, GuardError>;
    /// Replaces the value of `key` with `update(current)` (nothing when `None`), atomically.
    fn update(&self, key: &str, update: &Update<'_>) -> Result<(), GuardError>;
}

/// One agent's denials in its current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Conduct {
    id: TokenId,
    window_start: i64,
    denials: u32,
    /// Counts of the four reasons seen most, by index in `Reason::ALL`.
    by_reason: [(u8, u8); 4],
    last: i64,
}

const CONDUCT_BYTES: usize = 16 + 8 + 4 + 8 + 8;
const QUARANTINED_BYTES: usize = 16 + 8 + 8;

fn agent_id(agent: &str) -> TokenId {
    token_id("agentgate/conduct", agent)
}

fn slot_key(id: &TokenId) -> String {
    format!("agentgate/conduct/{}", u16::from_le_bytes([id[0], id[1]]) % SLOTS)
}

fn read_conduct(bytes: &[u8]) -> Vec<Conduct> {
    bytes
        .chunks_exact(CONDUCT_BYTES)
        .filter_map(|c| {
            let (id, rest) = c.split_first_chunk::<16>()?;
            let (start, rest) = rest.split_first_chunk::<8>()?;
            let (denials, rest) = rest.split_first_chunk::<4>()?;
            let (reasons, rest) = rest.split_first_chunk::<8>()?;
            let last = rest.first_chunk::<8>()?;
            let mut by_reason = [(0u8, 0u8); 4];
            for (slot, pair) in by_reason.iter_mut().zip(reasons.chunks_exact(2)) {
                *slot = (pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0));
            }
            Some(Conduct {
                id: *id,
                window_start: i64::from_le_bytes(*start),
                denials: u32::from_le_bytes(*denials),
                by_reason,
                last: i64::from_le_bytes(*last),
            })
        })
        .collect()
}

fn write_conduct(entries: &[Conduct]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * CONDUCT_BYTES);
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.window_start.to_le_bytes());
        out.extend_from_slice(&e.denials.to_le_bytes());
        for (reason, count) in e.by_reason {
            out.extend_from_slice(&[reason, count]);
        }
        out.extend_from_slice(&e.last.to_le_bytes());
    }
    out
}

/// One quarantined agent: until when, and a stamp of the policy it began under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quarantined {
    id: TokenId,
    until: i64,
    policy: [u8; 8],
}

fn read_quarantined(bytes: &[u8]) -> Vec<Quarantined> {
    bytes
        .chunks_exact(QUARANTINED_BYTES)
        .filter_map(|c| {
            let (id, rest) = c.split_first_chunk::<16>()?;
            let (until, rest) = rest.split_first_chunk::<8>()?;
            Some(Quarantined { id: *id, until: i64::from_le_bytes(*until), policy: *rest.first_chunk::<8>()? })
        })
        .collect()
}

fn write_quarantined(entries: &[Quarantined]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * QUARANTINED_BYTES);
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.until.to_le_bytes());
        out.extend_from_slice(&e.policy);
    }
    out
}

fn policy_stamp(digest: &[u8; 32]) -> [u8; 8] {
    let mut stamp = [0u8; 8];
    stamp.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    stamp
}

/// A quarantine that has just begun: what the host logs (`agentgate quarantine {json}`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineEvent {
    pub agent: String,
    pub until: i64,
    pub denials: u32,
    pub by_reason: Vec<(&'static str, u8)>,
}

impl QuarantineEvent {
    pub fn to_json(&self) -> String {
        let by_reason: serde_json::Map<String, serde_json::Value> =
            self.by_reason.iter().map(|(r, n)| (r.to_string(), json!(n))).collect();
        json!({"agent": self.agent, "until": self.until, "denials": self.denials, "by_reason": by_reason}).to_string()
    }
}

impl Quarantine {
    /// Whether any of `identities` is quarantined now under `policy_digest` (an agent in
    /// `release` whose quarantine began under another policy is not).
    pub fn blocks(
        &self,
        store: &dyn ConductStore,
        identities: &[&str],
        policy_digest: &[u8; 32],
        now: i64,
    ) -> Result<bool, GuardError> {
        let Some(list) = store.load(QUARANTINE_KEY)? else { return Ok(false) };
        let entries = read_quarantined(&list);
        let stamp = policy_stamp(policy_digest);
        Ok(identities.iter().any(|agent| {
            let id = agent_id(agent);
            let released = self.release.iter().any(|r| r == agent);
            entries.iter().any(|e| e.id == id && e.until > now && !(released && e.policy != stamp))
        }))
    }

    /// The counted denials of `agent` in its current window.
    pub fn recent_denials(&self, store: &dyn ConductStore, agent: &str, now: i64) -> Result<u32, GuardError> {
        let id = agent_id(agent);
        let slot = store.load(&slot_key(&id))?.unwrap_or_default();
        Ok(read_conduct(&slot)
            .iter()
            .find(|e| e.id == id && now < e.window_start.saturating_add(self.window_seconds))
            .map_or(0, |e| e.denials))
    }

    /// Counts a denial for `reason` against `agent`; the event when it starts a quarantine.
    pub fn count(
        &self,
        store: &dyn ConductStore,
        agent: &str,
        reason: Reason,
        policy_digest: &[u8; 32],
        now: i64,
    ) -> Result<Option<QuarantineEvent>, GuardError> {
        if !self.count.contains(&reason) {
            return Ok(None);
        }
        let id = agent_id(agent);
        let reason_index = Reason::ALL.iter().position(|r| *r == reason).and_then(|i| u8::try_from(i).ok());
        let after = std::cell::Cell::new(None);
        store.update(&slot_key(&id), &|slot| {
            let mut entries = read_conduct(slot.unwrap_or_default());
            let window = self.window_seconds;
            let mut entry = match entries.iter().position(|e| e.id == id) {
                Some(at) => entries.swap_remove(at),
                None => Conduct { id, window_start: now, ..Conduct::default() },
            };
            if now >= entry.window_start.saturating_add(window) {
                entry = Conduct { id, window_start: now, ..Conduct::default() };
            }
            entry.denials = entry.denials.saturating_add(1);
            entry.last = now;
            if let Some(index) = reason_index {
                tally(&mut entry.by_reason, index);
            }
            if entries.len() >= SLOT_ENTRIES {
                entries.retain(|e| now < e.window_start.saturating_add(window));
            }
            if entries.len() >= SLOT_ENTRIES {
                if let Some(oldest) = entries.iter().enumerate().min_by_key(|(_, e)| e.last).map(|(i, _)| i) {
                    entries.swap_remove(oldest);
                }
            }
            entries.push(entry);
            after.set(Some(entry));
            Some(write_conduct(&entries))
        })?;
        let Some(entry) = after.get().filter(|e| e.denials >= self.max_denials) else { return Ok(None) };
        let until = now.saturating_add(self.cool_off_seconds);
        let stamp = policy_stamp(policy_digest);
        let started = std::cell::Cell::new(false);
        store.update(QUARANTINE_KEY, &|list| {
            let mut entries = read_quarantined(list.unwrap_or_default());
            entries.retain(|e| e.until > now);
            if entries.iter().any(|e| e.id == id && e.policy == stamp) {
                return None;
            }
            entries.retain(|e| e.id != id);
            if entries.len() >= MAX_QUARANTINED {
                started.set(false);
                return None;
            }
            entries.push(Quarantined { id, until, policy: stamp });
            started.set(true);
            Some(write_quarantined(&entries))
        })?;
        if !started.get() {
            return Ok(None);
        }
        let by_reason = entry
            .by_reason
            .iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(i, n)| Reason::ALL.get(usize::from(*i)).map(|r| (r.code(), *n)))
            .collect();
        Ok(Some(QuarantineEvent { agent: agent.to_string(), until, denials: entry.denials, by_reason }))
    }
}

/// Counts one more `reason` in a small tally; a new reason takes the least seen place.
fn tally(by_reason: &mut [(u8, u8); 4], reason: u8) {
    if let Some(pair) = by_reason.iter_mut().find(|(r, n)| *r == reason && *n > 0) {
        pair.1 = pair.1.saturating_add(1);
    } else if let Some(pair) = by_reason.iter_mut().min_by_key(|(_, n)| *n) {
        *pair = (reason, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Store(Mutex<HashMap<String, Vec<u8>>>);

    impl ConductStore for Store {
        fn load(&self, key: &str) -> Result<Option<Vec<u8>>, GuardError> {
            Ok(self.0.lock().map_err(|_| GuardError::Unavailable)?.get(key).cloned())
        }

        fn update(&self, key: &str, update: &Update<'_>) -> Result<(), GuardError> {
            let mut map = self.0.lock().map_err(|_| GuardError::Unavailable)?;
            if let Some(new) = update(map.get(key).map(Vec::as_slice)) {
                map.insert(key.to_string(), new);
            }
            Ok(())
        }
    }

    fn q() -> Quarantine {
        Quarantine {
            window_seconds: 60,
            max_denials: 3,
            cool_off_seconds: 900,
            count: DEFAULT_COUNT.to_vec(),
            release: vec![],
            count_delegators: false,
        }
    }

    const P: [u8; 32] = [1; 32];

    #[test]
    fn the_threshold_within_the_window_quarantines_until_the_cool_off_ends() {
        let (q, store) = (q(), Store::default());
        assert_eq!(q.count(&store, "a", Reason::TaskMismatch, &P, 100), Ok(None));
        assert_eq!(q.count(&store, "a", Reason::Expired, &P, 101), Ok(None), "not counted");
        assert_eq!(q.count(&store, "a", Reason::TaskMismatch, &P, 110), Ok(None));
        assert_eq!(q.recent_denials(&store, "a", 111), Ok(2));
        let event = q.count(&store, "a", Reason::InsufficientScope, &P, 120).ok().flatten();
        let event = event.unwrap_or_else(|| panic!("quarantined"));
        assert_eq!((event.until, event.denials), (1020, 3));
        assert_eq!(event.by_reason, vec![("task_mismatch", 2), ("insufficient_scope", 1)]);
        assert_eq!(q.blocks(&store, &["a"], &P, 500), Ok(true));
        assert_eq!(q.blocks(&store, &["b"], &P, 500), Ok(false));
        assert_eq!(q.blocks(&store, &["a"], &P, 1020), Ok(false), "the cool-off ended");
    }

    #[test]
    fn the_window_slides() {
        let (q, store) = (q(), Store::default());
        for t in [100, 140, 170, 210] {
            assert_eq!(q.count(&store, "a", Reason::TaskMismatch, &P, t), Ok(None), "at {t}");
        }
        assert_eq!(q.recent_denials(&store, "a", 211), Ok(2), "170 and 210: a new window began at 170");
    }

    #[test]
    fn a_release_frees_a_quarantine_begun_under_another_policy_only() {
        let (mut q, store) = (q(), Store::default());
        for t in 0..3 {
            let _ = q.count(&store, "a", Reason::TaskMismatch, &P, t);
        }
        let released = [2u8; 32];
        q.release = vec!["a".into()];
        assert_eq!(q.blocks(&store, &["a"], &released, 10), Ok(false), "released by the new policy");
        for t in 20..23 {
            let _ = q.count(&store, "a", Reason::TaskMismatch, &released, t);
        }
        assert_eq!(q.blocks(&store, &["a"], &released, 30), Ok(true), "a new quarantine under it holds");
    }

    #[test]
    fn memory_stays_bounded() {
        let (q, store) = (Quarantine { max_denials: 1, ..q() }, Store::default());
        for n in 0..(MAX_QUARANTINED + 10) {
            let _ = q.count(&store, &format!("agent-{n}"), Reason::TaskMismatch, &P, 5);
        }
        let list = store.load(QUARANTINE_KEY).ok().flatten().unwrap_or_default();
        assert_eq!(list.len(), MAX_QUARANTINED * QUARANTINED_BYTES);
        let slots: usize = (0..SLOTS)
            .filter_map(|s| store.load(&format!("agentgate/conduct/{s}")).ok().flatten())
            .map(|b| b.len() / CONDUCT_BYTES)
            .sum();
        assert!(slots <= usize::from(SLOTS) * SLOT_ENTRIES);
    }
}
