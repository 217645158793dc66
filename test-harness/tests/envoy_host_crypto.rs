//! Envoy 1.40's own crypto (`verify_signature`, BoringSSL) behind the filter in real Envoy:
//! the backend each algorithm uses is logged, and every conformance vector, bit flip,
//! truncation and hostile token gets the verdict the pure-Rust verifiers give (the same
//! module on the wasmtime host without the foreign function).

use agentgate_test_harness::envoy::Envoy;
use agentgate_test_harness::foreign::vector_policy_and_tokens;
use agentgate_test_harness::host::Host;
use agentgate_test_harness::upstream::Upstream;

#[test]
fn envoys_crypto_gives_every_vector_the_pure_rust_verdict() {
    let (policy, tokens) = vector_policy_and_tokens();
    let upstream = Upstream::start();
    let envoy = Envoy::start(&policy, upstream.port).unwrap_or_else(|e| panic!("{e}"));
    let mut in_wasm = Host::lacking(&policy, &["proxy_call_foreign_function"]).unwrap_or_else(|e| panic!("{e}"));
    let (mut host_checked, mut bad) = (0, 0);
    for (name, token) in &tokens {
        let auth = format!("Bearer {token}");
        let r = envoy.get("/v", &[("authorization", &auth)]);
        let through_envoy = (
            r.status as u32,
            r.upstream_header("x-agent-reason").or_else(|| r.header("x-agent-reason").map(String::from)),
        );
        let outcome = in_wasm
            .request(&[(":method", "GET"), (":path", "/v"), (":authority", "api"), ("authorization", &auth)])
            .unwrap_or_else(|e| panic!("{e}"));
        let pure_rust = (outcome.status(), outcome.header("x-agent-reason").map(String::from));
        assert_eq!(through_envoy, pure_rust, "{name}");
        host_checked += usize::from(pure_rust.1.as_deref() != Some("bad_signature"));
        bad += usize::from(pure_rust.1.as_deref() == Some("bad_signature"));
    }
    let logs = envoy.logs();
    assert!(
        logs.contains("signature backends: host crypto (verify_signature) for ES256, RS256, RS384, RS512; wasm for"),
        "{logs}"
    );
    assert!(!logs.contains("crypto_unavailable"), "{logs}");
    assert!(host_checked >= 10, "only {host_checked} tokens passed the signature check");
    assert!(bad >= 500, "only {bad} tokens failed it");
}
