//! What this host offers, decided at configure time from calls that are safe on every host
//! (a read, a clock, the tick period). Nothing that a host may treat as fatal is tried: Kong
//! (ngx_wasm_module) traps for good on an HTTP callout from `on_configure`, so callouts are
//! assumed and the first real fetch tells (a refused one is a failed fetch: the provider's
//! tokens are refused, logged). APISIX (wasm-nginx-module) has no proxy-wasm clock, ticks
//! nor shared data, and no client address; it is told by what it does not do: it never
//! calls `proxy_on_vm_start` and configures at the first request of each worker. The filter
//! degrades where it safely can (WASI clock, per-VM state) and refuses a policy whose
//! features need what is missing.

use crate::host::{Host, BAD_ARGUMENT, NOT_FOUND, OK};
use agentgate::config::SingleUseScope;
use agentgate::Gate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub host_clock: bool,
    pub wasi_clock: bool,
    pub timers: bool,
    pub shared_data: bool,
    /// Only asked when a rule needs them (`bind_mtls_peer`): Kong logs an error for any
    /// connection property read outside a request.
    pub peer_certificates: bool,
    /// Whether requests carry the client's address (`source.address`). Not asked (there is
    /// no request at configure time): the one host known without it, APISIX, is the one
    /// that configures at a request, without `proxy_on_vm_start`.
    pub source_address: bool,
}

/// Statuses meaning "this host does not do that" (Unimplemented, and hosts that answer
/// InternalFailure or NotAllowed for calls they lack), as opposed to "not here, not now".
fn lacking(status: u32) -> bool {
    !matches!(status, OK | NOT_FOUND | BAD_ARGUMENT)
}

impl Capabilities {
    /// `tick_ms` is the tick period in force: it is set again, changing nothing (a refused
    /// reconfiguration leaves the policy in force ticking).
    /// `at_request`: the host configures at a request (it never started the VM).
    pub fn probe(host: &dyn Host, gate: &Gate, tick_ms: u32, at_request: bool) -> Capabilities {
        Capabilities {
            host_clock: host.host_clock_nanos().is_some(),
            wasi_clock: host.wasi_clock_nanos().is_some(),
            timers: host.set_tick_period(tick_ms),
            shared_data: host.get_shared_data("agentgate.probe").map_or_else(|status| !lacking(status), |_| true),
            // No connection at configure time: a host with the property says NotFound.
            peer_certificates: (gate.policy().needs_peer || gate.policy().needs_peer_certificate)
                && host
                    .get_property(&["connection", "uri_san_peer_certificate"])
                    .map_or_else(|status| !lacking(status), |_| true),
            source_address: !at_request,
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
            let missing: Vec<&str> = [(self.timers, "timer ticks"), (self.shared_data, "shared data")]
                .into_iter()
                .filter_map(|(has, name)| (!has).then_some(name))
                .collect();
            if !missing.is_empty() {
                return Some(format!(
                    "provider {:?} fetches its keys (jwks_uri or discovery), which needs {} that this host does not offer: give the keys inline (jwks)",
                    provider.name,
                    missing.join(" and ")
                ));
            }
        }
        if let (Some(provider), false) = (
            policy
                .providers
                .iter()
                .find(|p| p.single_use_ring.is_some() && p.single_use_scope == SingleUseScope::Gateway),
            self.shared_data,
        ) {
            return Some(format!(
                "provider {:?} keeps single-use tokens across workers (single_use_scope \"gateway\", the default), which needs shared data that this host does not offer: set \"single_use_scope\": \"worker\" on the provider to accept one use per worker VM",
                provider.name
            ));
        }
        if policy.needs_source && !self.source_address {
            return Some("a rule limits client addresses (source_cidrs), but this host gives the filter no client address (source.address)".into());
        }
        if policy.needs_peer && !self.peer_certificates {
            return Some("a rule binds tokens to the mTLS peer (bind_mtls_peer), but this host exposes no peer-certificate properties".into());
        }
        if policy.needs_peer_certificate && !self.peer_certificates {
            return Some("a provider accepts certificate-bound tokens (certificate_bound), but this host exposes no peer-certificate properties".into());
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
            notes.push("no shared data: single-use tokens, rate limits and quarantine are counted per worker VM");
        }
        notes
    }
}
