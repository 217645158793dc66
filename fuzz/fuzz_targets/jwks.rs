//! Any bytes as an identity provider's answer (discovery document or JWKS), in any stage:
//! must be recorded as a success or a failure, never panic.
#![no_main]

use agentgate::jwks::{KeyRecord, RemoteJwks, Stage};
use agentgate::keys::Alg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let remote = RemoteJwks {
        issuer: "https://idp.example.com/tenant".into(),
        algorithms: Alg::ALL.to_vec(),
        jwks_uri: None,
        cluster: "idp".into(),
        refresh_seconds: 300,
        max_stale_seconds: 3600,
        min_refetch_seconds: 30,
        timeout_ms: 1000,
        max_bytes: 256 * 1024,
        wait_ms: 100,
        store_key: "k".into(),
    };
    let status = data.first().map_or(200, |b| if b % 4 == 0 { 503 } else { 200 });
    for stage in [Stage::OpenIdDiscovery, Stage::OAuthDiscovery, Stage::Jwks] {
        let (record, _) = KeyRecord::default().record_response(&remote, stage, Ok((status, data)), 1, 0.5);
        let _ = record.keys(&remote);
        // A record read back from shared data may be anything too.
        let _ = KeyRecord::from_bytes(Some(data)).claim(&remote, 1, true);
    }
});
