//! agentgate core: host-independent policy, token verification, rules, decision and audit.
//!
//! The pipeline is one module per stage: [`extract`] → [`verify`] → [`authorize`] →
//! [`audit`], driven by [`gate::Gate::evaluate`]. Every denial is one [`reason::Reason`].
//! Hosts (the proxy-wasm filter, the CLI) fill a [`gate::Request`] and apply the
//! [`gate::Action`]; none of them holds policy logic.

pub mod audit;
pub mod authorize;
pub mod canonical;
pub mod config;
pub mod context;
pub mod dpop;
pub mod extract;
pub mod gate;
pub mod host_crypto;
pub mod jwks;
pub mod jws;
pub mod keys;
pub mod mcp;
pub mod pattern;
pub mod policy;
pub mod policy_test;
pub mod quarantine;
pub mod ratelimit;
pub mod reason;
pub mod replay;
mod routes;
pub mod shared_cache;
pub mod verify;

pub use config::{ConfigError, Mode};
pub use gate::{Action, Decision, Gate, Request};
pub use reason::Reason;
