//! The filter's counters, through the proxy-wasm metrics ABI (Envoy stats).

use crate::host::Host;
use agentgate::{Gate, Reason};
use std::cell::RefCell;

/// Tools counted by name per VM; later ones (and calls no rule matched) count as `_other`.
/// Tool names come from clients: the bound keeps the host's stats from growing with them.
const MAX_TOOLS: usize = 64;
/// The longest tool name kept in a counter's name.
const MAX_TOOL_NAME: usize = 64;

/// A pair of counters (allowed, denied).
type Pair = (Option<u32>, Option<u32>);

/// Counters, defined once per VM. A failed definition leaves the counter out (metrics must
/// never stop a request; APISIX has none).
#[derive(Default)]
pub struct Metrics {
    allowed: Option<u32>,
    dry_run_denied: Option<u32>,
    cache_hits: Option<u32>,
    cache_misses: Option<u32>,
    /// Tokens another worker verified (the shared cache): no signature checked here.
    shared_hits: Option<u32>,
    /// Agents put into quarantine by this VM's requests.
    quarantines: Option<u32>,
    denied: Vec<(Reason, u32)>,
    /// Per rule, in policy order: (allowed, denied).
    rules: Vec<(Option<u32>, Option<u32>)>,
    /// Per provider, in policy order: JWKS fetches (succeeded, failed); unused for inline keys.
    fetches: Vec<(Option<u32>, Option<u32>)>,
    /// MCP tools/call counters by sanitized tool name, defined at first use (`_other` too).
    tools: RefCell<Vec<(String, Pair)>>,
}

impl Metrics {
    /// The counters for `gate`'s policy (per-rule ones included). Envoy hands back the same
    /// counter for a name defined again, so a reconfiguration keeps counting.
    pub fn define(host: &dyn Host, gate: Option<&Gate>) -> Metrics {
        let counter = |name: &str| host.define_counter(name);
        let rules = gate.map_or(&[][..], |g| &g.policy().rules[..]);
        Metrics {
            allowed: counter("agentgate.allowed"),
            dry_run_denied: counter("agentgate.dry_run.denied"),
            cache_hits: counter("agentgate.token_cache.hit"),
            cache_misses: counter("agentgate.token_cache.miss"),
            shared_hits: counter("agentgate.token_cache.shared_hit"),
            quarantines: counter("agentgate.quarantine.started"),
            denied: Reason::ALL.iter().filter_map(|&r| counter(&r.metric()).map(|id| (r, id))).collect(),
            rules: rules
                .iter()
                .map(|rule| {
                    let name = format!("agentgate.rule.{}", metric_name(&rule.name));
                    (counter(&format!("{name}.allowed")), counter(&format!("{name}.denied")))
                })
                .collect(),
            fetches: gate
                .map_or(&[][..], |g| &g.policy().providers[..])
                .iter()
                .map(|provider| match provider.remote {
                    None => (None, None),
                    Some(_) => {
                        let name = format!("agentgate.jwks.{}", metric_name(&provider.name));
                        (counter(&format!("{name}.fetch_success")), counter(&format!("{name}.fetch_failure")))
                    }
                })
                .collect(),
            tools: RefCell::default(),
        }
    }

    /// Counts an MCP `tools/call` under its tool, when a rule matched it (a name the policy
    /// knows); others, and tools past the first [`MAX_TOOLS`], under `_other`.
    pub fn count_tool(&self, host: &dyn Host, tool: &str, matched: bool, allowed: bool) {
        let name = if matched { metric_name(tool).chars().take(MAX_TOOL_NAME).collect() } else { String::new() };
        let name = if name.is_empty() { "_other".to_string() } else { name };
        let known = |name: &str| self.tools.borrow().iter().find(|(n, _)| n == name).map(|&(_, pair)| pair);
        let pair = match known(&name) {
            Some(pair) => pair,
            None => {
                let full = self.tools.borrow().len() >= MAX_TOOLS;
                let name = if full { "_other".to_string() } else { name };
                match known(&name) {
                    Some(pair) => pair,
                    None => {
                        // Defined with no borrow held: a host call may trap.
                        let counter = |suffix: &str| host.define_counter(&format!("agentgate.mcp.{name}.{suffix}"));
                        let pair = (counter("allowed"), counter("denied"));
                        self.tools.borrow_mut().push((name, pair));
                        pair
                    }
                }
            }
        };
        bump(host, if allowed { pair.0 } else { pair.1 });
    }

    /// Whether the host keeps counters at all.
    pub fn available(&self) -> bool {
        self.allowed.is_some()
    }

    pub fn count_fetch(&self, host: &dyn Host, provider: usize, succeeded: bool) {
        if let Some(&(success, failure)) = self.fetches.get(provider) {
            bump(host, if succeeded { success } else { failure });
        }
    }

    /// A local miss that another worker verified is a miss and a shared hit.
    pub fn count_quarantine(&self, host: &dyn Host) {
        bump(host, self.quarantines);
    }

    pub fn count_cache(&self, host: &dyn Host, hit: bool, shared_hit: bool) {
        bump(host, if hit { self.cache_hits } else { self.cache_misses });
        if shared_hit {
            bump(host, self.shared_hits);
        }
    }

    pub fn count_rule(&self, host: &dyn Host, index: Option<usize>, allowed: bool) {
        if let Some(&(allow, deny)) = index.and_then(|i| self.rules.get(i)) {
            bump(host, if allowed { allow } else { deny });
        }
    }

    pub fn count(&self, host: &dyn Host, reason: Option<Reason>, dry_run: bool) {
        match reason {
            None => bump(host, self.allowed),
            Some(reason) => {
                bump(host, self.denied.iter().find(|(r, _)| *r == reason).map(|&(_, id)| id));
                if dry_run {
                    bump(host, self.dry_run_denied);
                }
            }
        }
    }
}

fn bump(host: &dyn Host, id: Option<u32>) {
    if let Some(id) = id {
        host.increment(id);
    }
}

/// A rule or provider name in a stat name: Envoy keeps `[A-Za-z0-9_-]`; anything else becomes `_`.
fn metric_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}
