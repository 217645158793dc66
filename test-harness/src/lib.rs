//! What runs the built agentgate filter in tests and in the demo: token minting for a test
//! identity provider, an echo upstream, and a real Envoy process.

pub mod envoy;
pub mod tokens;
pub mod upstream;
