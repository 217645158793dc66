//! What runs the built agentgate filter in tests and in the demo: token minting for a test
//! identity provider, an echo upstream, a real Envoy process, and an in-process proxy-wasm
//! host on wasmtime.

pub mod envoy;
pub mod fleet;
pub mod foreign;
#[cfg(feature = "host")]
pub mod host;
pub mod idp;
pub mod oidc_provider;
pub mod tokens;
pub mod upstream;
