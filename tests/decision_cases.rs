//! The decision cases in `tests/cases/decisions.json`, which the JS edge build runs too
//! (`filters/edge-js/test`): one policy, the same decisions on every host.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Action, Gate, Request};
use base64ct::{Base64UrlUnpadded, Encoding};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};

fn cases() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases/decisions.json"))
        .unwrap_or_else(|e| panic!("decisions.json: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("decisions.json: {e}"))
}

fn sign(key: &Value, claims: &Value, tamper: bool) -> String {
    let b64 = |bytes: &[u8]| Base64UrlUnpadded::encode_string(bytes);
    let d = Base64UrlUnpadded::decode_vec(key["d"].as_str().unwrap_or_default()).unwrap_or_default();
    let signing = SigningKey::from_slice(&d).unwrap_or_else(|e| panic!("signing key: {e}"));
    let header = json!({"alg": "ES256", "kid": key["kid"], "typ": "JWT"});
    let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let mut signature = Signature::to_bytes(&signing.sign(signed.as_bytes())).to_vec();
    if tamper {
        if let Some(last) = signature.last_mut() {
            *last ^= 1;
        }
    }
    format!("{signed}.{}", b64(&signature))
}

#[test]
fn every_shared_case_decides_as_expected() {
    let cases = cases();
    let gate = Gate::from_json(&cases["policy"].to_string()).unwrap_or_else(|e| panic!("policy: {e}"));
    let now = cases["now"].as_i64().unwrap_or_default();
    let list = cases["cases"].as_array().cloned().unwrap_or_default();
    assert!(list.len() >= 10, "the shared cases are all here");
    for case in &list {
        let name = case["name"].as_str().unwrap_or_default();
        let request = &case["request"];
        let mut headers: Vec<(String, String)> = request["headers"]
            .as_object()
            .map(|h| {
                h.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_str().unwrap_or_default().to_string())).collect()
            })
            .unwrap_or_default();
        if case["claims"].is_object() {
            let token = sign(&cases["signing_key"], &case["claims"], case["tamper"] == json!(true));
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        let decision = gate.evaluate(&Request::new(
            request["method"].as_str().unwrap_or_default(),
            request["path"].as_str().unwrap_or_default(),
            &headers,
            now,
        ));
        let expect = &case["expect"];
        let allowed = expect["decision"] == "allow";
        assert_eq!(decision.allowed, allowed, "{name}: {:?}", decision.reason);
        assert_eq!(decision.reason.map(|r| r.code()), expect["reason"].as_str(), "{name}");
        if let Some(rule) = expect["rule"].as_str() {
            assert_eq!(decision.rule.as_deref(), Some(rule), "{name}");
        }
        match (&decision.action, allowed) {
            (Action::Continue { remove, set }, true) => {
                for (header, value) in expect["headers"].as_object().into_iter().flatten() {
                    let got = set.iter().find(|(n, _)| n == header).map(|(_, v)| v.as_str());
                    assert_eq!(got, value.as_str(), "{name}: {header}");
                }
                for header in expect["remove"].as_array().into_iter().flatten() {
                    assert!(remove.iter().any(|r| Some(r.as_str()) == header.as_str()), "{name}: removes {header}");
                }
            }
            (Action::Respond { status, .. }, false) => {
                assert_eq!(Some(u64::from(*status)), expect["status"].as_u64(), "{name}");
            }
            (action, _) => panic!("{name}: unexpected action {action:?}"),
        }
    }
}
