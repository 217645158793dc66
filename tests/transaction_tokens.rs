//! Transaction Tokens (draft-ietf-oauth-transaction-tokens): a rule can require a valid
//! Txn-Token from the trust domain's token service alongside the access token, with conditions
//! on its context; the audit record carries `txn`, so one agent task is followed across hops.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Decision, Gate, Reason, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;
const TTS: &str = "https://tts.corp.example";

fn access() -> Signer {
    Signer::es256("es-1", 1)
}

fn tts() -> Signer {
    Signer::es256("tts-1", 2)
}

fn gate() -> Gate {
    let rules = json!([{"name": "pay", "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"},
        "require": {"transaction_token": {"scopes": ["invoices:pay"],
                                          "claims": [{"path": "tctx.amount", "lte": 500}, {"path": "req_wl", "equals": "checkout-service"}]}}},
        {"name": "read", "match": {"methods": ["GET"], "path": "/invoices/{id}"}}]);
    let mut p: Value = serde_json::from_str(&policy(&access().jwks(), &rules, "enforce")).unwrap();
    let service = json!({"name": "tts", "issuer": TTS, "audiences": ["corp.example"], "algorithms": ["ES256"],
                         "transaction_tokens": true, "jwks": tts().jwks()});
    p["providers"].as_array_mut().unwrap().push(service);
    Gate::from_json(&p.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn txn_token(edit: impl FnOnce(&mut Value)) -> String {
    let mut c = json!({"iss": TTS, "aud": "corp.example", "iat": NOW, "exp": NOW + 60, "sub": "agent-7",
                       "txn": "97053963-771d-49cc-a4e3-20aad399c312", "scope": "invoices:pay",
                       "req_wl": "checkout-service", "tctx": {"amount": 120}});
    edit(&mut c);
    tts().sign_with_header(&json!({"alg": "ES256", "typ": "txntoken+jwt", "kid": "tts-1"}), &c)
}

fn call(g: &Gate, method: &str, path: &str, txn: Option<&str>) -> Decision {
    let mut headers =
        vec![("authorization".to_string(), format!("Bearer {}", access().sign(&agent_claims("agent-7", "", NOW))))];
    if let Some(txn) = txn {
        headers.push(("Txn-Token".to_string(), txn.to_string()));
    }
    g.evaluate(&Request::new(method, path, &headers, NOW))
}

#[test]
fn a_rule_requires_a_valid_txn_token_with_its_context() {
    let g = gate();
    let ok = call(&g, "POST", "/invoices/42/pay", Some(&txn_token(|_| {})));
    assert!(ok.allowed, "{:?}", ok.reason);
    assert_eq!(ok.audit.txn.as_deref(), Some("97053963-771d-49cc-a4e3-20aad399c312"));
    for txn in
        [
            None,
            Some(txn_token(|c| c["tctx"]["amount"] = json!(900))),
            Some(txn_token(|c| c["req_wl"] = json!("other-service"))),
            Some(txn_token(|c| c["scope"] = json!("invoices:read"))),
            Some(txn_token(|c| c["exp"] = json!(NOW - 120))),
            Some(Signer::es256("tts-1", 99).sign_with_header(
                &json!({"alg": "ES256", "typ": "txntoken+jwt", "kid": "tts-1"}),
                &json!({"iss": TTS}),
            )),
            // An access token is no Txn-Token.
            Some(access().sign(&agent_claims("agent-7", "invoices:pay", NOW))),
        ]
    {
        assert_eq!(call(&g, "POST", "/invoices/42/pay", txn.as_deref()).reason, Some(Reason::TransactionTokenRequired));
    }
    // Other rules do not need one, and the audit record still names the transaction.
    let read = call(&g, "GET", "/invoices/42", Some(&txn_token(|_| {})));
    assert!(read.allowed && read.audit.txn.is_some());
}

#[test]
fn a_txn_token_is_never_an_access_token() {
    let g = gate();
    let headers = vec![("authorization".to_string(), format!("Bearer {}", txn_token(|_| {})))];
    let d = g.evaluate(&Request::new("GET", "/invoices/42", &headers, NOW));
    assert_eq!(d.reason, Some(Reason::TypeNotAllowed));
    let untyped = tts().sign(&json!({"iss": TTS, "aud": "corp.example", "iat": NOW, "exp": NOW + 60, "txn": "t"}));
    assert_eq!(
        call(&g, "POST", "/invoices/42/pay", Some(&untyped)).reason,
        Some(Reason::TransactionTokenRequired),
        "typ must be txntoken+jwt"
    );
}
