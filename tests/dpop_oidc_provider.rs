//! `agentgate::dpop` (not yet wired into the gate) against real implementations: DPoP-bound
//! access tokens issued by npm `oidc-provider`, with proofs made by npm `dpop`. The thumbprint
//! the provider put in `cnf.jkt`, the one the client library computes and agentgate's must all
//! agree, and agentgate must accept the client's proofs and refuse them used elsewhere.
//! (Here rather than in test-harness/tests: the harness depending on agentgate would build a
//! second wasmtime with other features.) Needs `make idp-node`.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::dpop::{check, DpopError, DpopOptions, DpopRequest};
use agentgate_test_harness::oidc_provider::{peek, OidcProvider, DPOP_AGENT, RESOURCE};
use agentgate_test_harness::tokens::now;
use serde_json::{json, Value};

const PAY: &str = "https://api.example.com/invoices/42/pay";

fn pay_request() -> DpopRequest<'static> {
    DpopRequest { method: "POST", scheme: "https", authority: "api.example.com", path: "/invoices/42/pay?confirm=1" }
}

fn bound_token(idp: &OidcProvider, alg: &str, proofs: Value) -> Value {
    let answer = idp.client(&json!({
        "client_id": DPOP_AGENT.0,
        "client_secret": DPOP_AGENT.1,
        "resource": RESOURCE,
        "scope": "invoices:pay",
        "dpop": alg,
        "proofs": proofs,
    }));
    assert_eq!(answer["status"], 200, "{answer}\n{}", idp.logs());
    answer
}

fn proof(answer: &Value, i: usize) -> &str {
    answer["proofs"][i].as_str().unwrap_or_default()
}

#[test]
fn dpop_bound_tokens_and_proofs_from_real_implementations_verify() {
    let idp = OidcProvider::start();
    let options = DpopOptions::default();
    // Every key type the client library makes: ES256, Ed25519 (RFC 9864's name for EdDSA over
    // Ed25519), PS256 and RS256.
    for alg in ["ES256", "Ed25519", "PS256", "RS256"] {
        let answer = bound_token(
            &idp,
            alg,
            json!([
                {"htm": "POST", "htu": PAY},
                {"htm": "GET", "htu": "HTTPS://API.Example.com:443/invoices/42"},
            ]),
        );
        let token = answer["token"]["access_token"].as_str().unwrap_or_default();
        assert_eq!(answer["token"]["token_type"], "DPoP");
        let (header, claims) = peek(token);
        assert_eq!(header["typ"], "at+jwt");
        let cnf_jkt = claims["cnf"]["jkt"].as_str();
        assert!(cnf_jkt.is_some(), "{claims}");
        // The provider's and the client library's thumbprints agree.
        assert_eq!(cnf_jkt, answer["jkt"].as_str(), "{alg}");

        let verified = check(&[proof(&answer, 0)], &pay_request(), token, cnf_jkt, &options, now())
            .unwrap_or_else(|e| panic!("{alg}: {e:?} {}", e.code()));
        assert_eq!(Some(verified.jkt.as_str()), cnf_jkt, "{alg}");
        assert!(!verified.jti.is_empty());

        // The client's case and port spelling normalizes to the request's.
        let read = DpopRequest { method: "GET", path: "/invoices/42", ..pay_request() };
        assert!(check(&[proof(&answer, 1)], &read, token, cnf_jkt, &options, now()).is_ok(), "{alg}");

        // The same proof for another URL, another method, or after its window.
        let other = DpopRequest { path: "/invoices/43/pay", ..pay_request() };
        assert_eq!(check(&[proof(&answer, 0)], &other, token, cnf_jkt, &options, now()), Err(DpopError::HtuMismatch));
        assert_eq!(
            check(&[proof(&answer, 1)], &pay_request(), token, cnf_jkt, &options, now()),
            Err(DpopError::HtmMismatch)
        );
        assert_eq!(
            check(&[proof(&answer, 0)], &pay_request(), token, cnf_jkt, &options, now() + 3600),
            Err(DpopError::IatOutOfWindow)
        );
    }
}

#[test]
fn a_stolen_dpop_token_is_useless_without_its_key() {
    let idp = OidcProvider::start();
    let options = DpopOptions::default();
    let victim = bound_token(&idp, "ES256", json!([{"htm": "POST", "htu": PAY}]));
    let token = victim["token"]["access_token"].as_str().unwrap_or_default();
    let cnf_jkt = peek(token).1["cnf"]["jkt"].as_str().map(str::to_string);

    // A thief with the token and a key of its own makes a perfect proof for it: refused, the
    // token is bound to the victim's key.
    let thief = idp.client(&json!({"dpop": "ES256", "proofs": [{"htm": "POST", "htu": PAY, "access_token": token}]}));
    assert_eq!(
        check(&[proof(&thief, 0)], &pay_request(), token, cnf_jkt.as_deref(), &options, now()),
        Err(DpopError::KeyMismatch)
    );
    // The victim's proof presented with another token of the same client: `ath` differs.
    let second = bound_token(&idp, "ES256", json!([]));
    let other_token = second["token"]["access_token"].as_str().unwrap_or_default();
    assert_eq!(
        check(&[proof(&victim, 0)], &pay_request(), other_token, cnf_jkt.as_deref(), &options, now()),
        Err(DpopError::AthMismatch)
    );
    // And the victim's own proof still passes.
    assert!(check(&[proof(&victim, 0)], &pay_request(), token, cnf_jkt.as_deref(), &options, now()).is_ok());
}
