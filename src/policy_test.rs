//! `agentgate test`: a policy's own test cases (like `opa test`). Each case is a request, the
//! claims of the token it carries, and the decision expected. The runner swaps every
//! provider's keys for a test key and signs the claims with it, so cases test the rules and
//! the claim checks without needing the identity provider's private keys.

use crate::gate::{Action, Gate, Request};
use crate::policy::{FileLoader, Policy};
use base64ct::{Base64UrlUnpadded, Encoding};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

const TEST_KID: &str = "agentgate-test";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// The default time of every case (Unix seconds).
    pub now: Option<i64>,
    pub cases: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub request: TestRequest,
    /// Claims of the token; absent: no token. `iss` defaults to the first provider's
    /// issuer, `aud` to its first audience, `iat` to now, `exp` to now + 300.
    pub token: Option<Map<String, Value>>,
    /// Extra JOSE header members (`typ`, say).
    pub token_header: Option<Map<String, Value>>,
    pub now: Option<i64>,
    pub expect: Expectation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub source: Option<String>,
    /// The mTLS peer's URI SAN (for `bind_mtls_peer`).
    pub peer_uri_san: Option<String>,
    /// The body: a JSON value (an MCP call, say) is sent as its JSON text, a string as it is.
    pub body: Option<Value>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// `allow` or `deny`.
    pub decision: String,
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub status: Option<u16>,
}

/// One case's outcome: `Ok` or what differed.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub failure: Option<String>,
}

fn test_key() -> Result<SigningKey, String> {
    SigningKey::from_slice(&[0x42; 32]).map_err(|e| e.to_string())
}

/// The test key's public JWK.
fn test_jwk(key: &SigningKey) -> Result<Value, String> {
    let point = key.verifying_key().to_sec1_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else { return Err("test key has no coordinates".into()) };
    let (x, y) = (Base64UrlUnpadded::encode_string(x), Base64UrlUnpadded::encode_string(y));
    Ok(json!({"kty": "EC", "crv": "P-256", "kid": TEST_KID, "x": x, "y": y}))
}

/// The policy with every provider's keys replaced by the test key (ES256).
fn with_test_keys(policy_json: &str) -> Result<(Policy, Value), String> {
    let mut policy: Value = serde_json::from_str(policy_json).map_err(|e| format!("policy: {e}"))?;
    let key = test_key()?;
    let jwk = test_jwk(&key)?;
    if let Some(providers) = policy.get_mut("providers").and_then(Value::as_array_mut) {
        for provider in providers.iter_mut().filter_map(Value::as_object_mut) {
            // Wherever the real keys come from (file, URL, discovery), the cases use the test key.
            for source in ["jwks_file", "jwks_uri", "discovery", "cluster", "jwks_fetch"] {
                provider.remove(source);
            }
            provider.insert("jwks".into(), json!({"keys": [jwk.clone()]}));
            provider.insert("algorithms".into(), json!(["ES256"]));
        }
    }
    let no_files: FileLoader<'_> = &|_| Err("not used".into());
    let compiled = Policy::from_json_with(&policy.to_string(), no_files).map_err(|e| e.to_string())?;
    Ok((compiled, policy))
}

fn sign(claims: &Value, extra_header: Option<&Map<String, Value>>) -> Result<String, String> {
    let mut header = json!({"alg": "ES256", "kid": TEST_KID});
    if let (Some(extra), Some(h)) = (extra_header, header.as_object_mut()) {
        h.extend(extra.clone());
    }
    let b64 = |v: &Value| Base64UrlUnpadded::encode_string(v.to_string().as_bytes());
    let signed = format!("{}.{}", b64(&header), b64(claims));
    let signature: Signature = test_key()?.sign(signed.as_bytes());
    Ok(format!("{signed}.{}", Base64UrlUnpadded::encode_string(&signature.to_bytes())))
}

/// Runs every case of `tests` (JSON) against `policy_json`, in order, on one gate (so
/// single-use tokens and caches behave as in a gateway).
pub fn run(policy_json: &str, tests: &str) -> Result<Vec<CaseResult>, String> {
    let file: TestFile = serde_json::from_str(tests).map_err(|e| format!("tests: {e}"))?;
    let (policy, raw) = with_test_keys(policy_json)?;
    let provider = raw.get("providers").and_then(|p| p.get(0)).cloned().unwrap_or(Value::Null);
    let gate = Gate::new(policy);
    let mut results = Vec::with_capacity(file.cases.len());
    for case in &file.cases {
        let now = case.now.or(file.now).unwrap_or(0);
        let mut headers: Vec<(String, String)> =
            case.request.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        if let Some(claims) = &case.token {
            let mut claims = claims.clone();
            let defaults = [
                ("iss", provider.get("issuer").cloned()),
                ("aud", provider.get("audiences").and_then(|a| a.get(0)).cloned()),
                ("iat", Some(json!(now))),
                ("exp", Some(json!(now + 300))),
            ];
            for (name, value) in defaults {
                if let (false, Some(value)) = (claims.contains_key(name), value) {
                    claims.insert(name.into(), value);
                }
            }
            headers.push((
                "authorization".into(),
                format!("Bearer {}", sign(&Value::Object(claims), case.token_header.as_ref())?),
            ));
        }
        let body = match &case.request.body {
            Some(Value::String(text)) => Some(text.clone()),
            Some(json) => Some(json.to_string()),
            None => None,
        };
        let request = Request {
            method: &case.request.method,
            path: &case.request.path,
            headers: &headers,
            now,
            source: case.request.source.as_deref(),
            peer_uri_san: case.request.peer_uri_san.as_deref(),
            peer_certificate_sha256: None,
            body: body.as_deref().map(str::as_bytes),
        };
        let decision = gate.evaluate(&request);
        let status = match &decision.action {
            Action::Respond { status, .. } => *status,
            Action::Continue { .. } => 200,
        };
        let got_reason = decision.reason.map(|r| r.code());
        let mut differences = Vec::new();
        if decision.audit.decision != case.expect.decision {
            differences.push(format!("decision {} (reason {})", decision.audit.decision, got_reason.unwrap_or("none")));
        }
        if let Some(reason) = &case.expect.reason {
            if got_reason != Some(reason.as_str()) {
                differences.push(format!("reason {}", got_reason.unwrap_or("none")));
            }
        }
        if let Some(rule) = &case.expect.rule {
            if decision.rule.as_deref() != Some(rule.as_str()) {
                differences.push(format!("rule {}", decision.rule.as_deref().unwrap_or("none")));
            }
        }
        if case.expect.status.is_some_and(|s| s != status) {
            differences.push(format!("status {status}"));
        }
        let failure = (!differences.is_empty()).then(|| format!("got {}", differences.join(", ")));
        results.push(CaseResult { name: case.name.clone(), failure });
    }
    Ok(results)
}
