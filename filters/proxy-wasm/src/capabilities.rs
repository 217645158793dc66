//! What this host offers, probed once at configure time: Envoy has everything; APISIX has
//! no proxy-wasm clock, ticks, shared data nor metrics; Kong answers "not found" for the
//! peer-certificate properties it lacks, which no probe can tell from "no client certificate"
//! (a `bind_mtls_peer` rule then denies). Metrics are found missing in `metrics.rs`. The
//! filter degrades where it safely can (WASI clock, per-VM state) and refuses a policy whose
//! features need what is missing, saying which.

use crate::host;
use agentgate::Gate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub host_clock: bool,
    pub wasi_clock: bool,
    pub timers: bool,
    pub shared_data: bool,
    pub http_calls: bool,
    pub peer_certificates: bool,
}

/// Statuses meaning "this host does not do that" (Unimplemented, and hosts that answer
/// InternalFailure or NotAllowed for calls they lack), as opposed to "not here, not now".
fn lacking(status: u32) -> bool {
    !matches!(status, host::OK | host::NOT_FOUND | host::BAD_ARGUMENT)
}

impl Capabilities {
    /// `tick_ms` is the tick period in force: the probe sets it again, changing nothing (a
    /// refused reconfiguration leaves the policy in force ticking).
    pub fn probe(tick_ms: u32) -> Capabilities {
        Capabilities {
            host_clock: host::host_clock_ms().is_some(),
            wasi_clock: host::wasi_clock_ms().is_some(),
            timers: host::set_tick_period(tick_ms),
            shared_data: !lacking(host::shared_data_status("agentgate.probe")),
            http_calls: !lacking(host::http_call_status()),
            // No connection at configure time: a host with the property says NotFound.
            peer_certificates: host::get_property(&["connection", "uri_san_peer_certificate"])
                .map_or_else(|status| !lacking(status), |_| true),
        }
    }

    /// Why `gate`'s policy cannot run on this host, if it cannot.
    pub fn refusal(&self, gate: &Gate) -> Option<String> {
        if !self.host_clock && !self.wasi_clock {
            return Some(
                "this host has no clock (neither proxy-wasm's nor WASI's): token lifetimes cannot be checked".into(),
            );
        }
        let policy = gate.policy();
        if let Some((_, provider, _)) = gate.remote_providers().next() {
            let missing: Vec<&str> =
                [(self.timers, "timer ticks"), (self.http_calls, "HTTP callouts"), (self.shared_data, "shared data")]
                    .into_iter()
                    .filter_map(|(has, name)| (!has).then_some(name))
                    .collect();
            if !missing.is_empty() {
                return Some(format!(
                    "provider {:?} fetches its keys (jwks_uri or discovery), which needs {} that this host does not offer: give the keys inline (jwks) or as a file (jwks_file)",
                    provider.name,
                    missing.join(" and ")
                ));
            }
        }
        if policy.needs_peer && !self.peer_certificates {
            return Some("a rule binds tokens to the mTLS peer (bind_mtls_peer), but this host exposes no peer-certificate properties".into());
        }
        None
    }

    /// What the filter does differently on this host, for the log.
    pub fn degradations(&self) -> Vec<&'static str> {
        let mut notes = Vec::new();
        if !self.host_clock && self.wasi_clock {
            notes.push("no proxy-wasm clock: using the WASI clock");
        }
        if !self.shared_data {
            notes.push("no shared data: single-use tokens and rate limits are counted per worker VM");
        }
        notes
    }
}
