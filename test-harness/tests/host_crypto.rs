//! Envoy's host crypto (`verify_signature`) on the wasmtime host: the probe, the fallback
//! where a host lacks it or answers wrong, failures at request time, the hosts that must
//! never be asked, and the conformance vectors through both backends.

use agentgate_test_harness::foreign::{result, vector_policy_and_tokens, MISMATCH};
use agentgate_test_harness::host::{Answer, Host, Outcome};
use agentgate_test_harness::tokens::{agent_claims, b64, policy, read_invoice_rule, Signer};

const FOREIGN: &str = "proxy_call_foreign_function";
const HOST_LINE: &str = "signature backends: host crypto (verify_signature) for ES256, RS256, RS384, RS512; wasm for";
const WASM_LINE: &str = "signature backends: every algorithm in wasm";

fn signer() -> Signer {
    Signer::es256("k-1", 5)
}

fn get(host: &mut Host, token: &str) -> Outcome {
    let auth = format!("Bearer {token}");
    let headers = [(":method", "GET"), (":path", "/invoices/42"), (":authority", "api"), ("authorization", &auth)];
    host.request(&headers).unwrap_or_else(|e| panic!("{e}"))
}

fn get_fresh(host: &mut Host, sub: &str) -> Outcome {
    let token = fresh(host, sub);
    get(host, &token)
}

fn fresh(host: &Host, sub: &str) -> String {
    signer().sign(&agent_claims(sub, "invoices:read", host.now()))
}

fn logged(host: &Host, text: &str) -> bool {
    host.logs().iter().any(|l| l.contains(text))
}

fn inline() -> String {
    policy(&signer().jwks(), &read_invoice_rule(), "enforce")
}

#[test]
fn on_envoy_es256_and_rs_tokens_are_verified_by_the_host_after_its_probe() {
    for signer in [Signer::es256("k-1", 5), Signer::rs256("k-1", 5)] {
        let mut host = Host::new(&policy(&signer.jwks(), &read_invoice_rule(), "enforce")).unwrap();
        assert_eq!(host.foreign_calls(), 0, "nothing asked before the first request tells the host");
        let token = signer.sign(&agent_claims("agent-7", "invoices:read", host.now()));
        assert_eq!(get(&mut host, &token).status(), 200, "{:?}", host.logs());
        assert!(logged(&host, HOST_LINE), "{:?}", host.logs());
        assert_eq!(host.foreign_calls(), 5, "four probes and the token");
        let (signed, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{}", b64(&[3; 64]));
        assert_eq!(get(&mut host, &forged).status(), 401);
        assert_eq!(host.foreign_calls(), 6);
    }
}

#[test]
fn kong_and_apisix_are_never_asked_and_a_host_without_it_keeps_wasm() {
    // Kong traps on the call (fatal for the filter), APISIX answers Unimplemented: neither is asked.
    for mut host in [Host::kong(&inline()).unwrap(), Host::apisix(&inline()).unwrap()] {
        let token = fresh(&host, "agent-7");
        assert_eq!(get(&mut host, &token).status(), 200, "{:?}: {:?}", host.profile(), host.logs());
        assert_eq!(host.foreign_calls(), 0, "{:?}", host.profile());
        assert!(!logged(&host, "signature backends"));
    }
    // A host like Envoy that answers Unimplemented: probed once, wasm from then on.
    let mut host = Host::lacking(&inline(), &[FOREIGN]).unwrap();
    let token = fresh(&host, "agent-7");
    assert_eq!(get(&mut host, &token).status(), 200);
    assert!(
        logged(
            &host,
            &format!(
                "{WASM_LINE}; host crypto (verify_signature) not used: the host's verify_signature answered status 12"
            )
        ),
        "{:?}",
        host.logs()
    );
    let calls = host.foreign_calls();
    assert_eq!(get_fresh(&mut host, "agent-8").status(), 200);
    assert_eq!(host.foreign_calls(), calls, "not asked again");
}

#[test]
fn a_host_that_answers_its_probe_wrong_keeps_wasm() {
    for answer in [result(true, ""), result(false, MISMATCH), vec![0xff]] {
        let mut host = Host::new(&inline()).unwrap();
        host.foreign_answer(Some(answer.clone()));
        let token = fresh(&host, "agent-7");
        let (signed, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{}", b64(&[3; 64]));
        let denied = get(&mut host, &forged);
        assert_eq!(denied.status(), 401, "{answer:?}");
        assert!(logged(&host, WASM_LINE), "{answer:?}: {:?}", host.logs());
        assert_eq!(get(&mut host, &token).status(), 200, "{answer:?}: verified in wasm");
    }
}

#[test]
fn a_host_that_fails_at_request_time_denies_with_crypto_unavailable() {
    let mut host = Host::new(&inline()).unwrap();
    assert_eq!(get_fresh(&mut host, "first").status(), 200);
    type Impose = Box<dyn Fn(&mut Host)>;
    let cases: [(&str, Impose); 5] = [
        ("answered status 10", Box::new(|h| h.answer_with(FOREIGN, Answer::Status(10)))),
        ("answered status 2", Box::new(|h| h.answer_with(FOREIGN, Answer::Status(2)))),
        ("answered status 10", Box::new(|h| h.answer_with(FOREIGN, Answer::GarbagePointer))),
        ("do not parse", Box::new(|h| h.foreign_answer(Some(vec![0x08])))),
        (
            "failed: \"sha256 is not supported.\"",
            Box::new(|h| h.foreign_answer(Some(result(false, "sha256 is not supported.")))),
        ),
    ];
    for (n, (why, impose)) in cases.iter().enumerate() {
        impose(&mut host);
        let outcome = get_fresh(&mut host, &format!("agent-{n}"));
        assert_eq!(outcome.status(), 503, "{why}");
        assert!(
            host.logs().iter().any(|l| l.contains(why) && l.contains("crypto_unavailable")),
            "{why}: {:?}",
            host.logs()
        );
        host.answer_normally();
        host.foreign_answer(None);
    }
    assert_eq!(get_fresh(&mut host, "after").status(), 200, "answers again once the host does");
}

#[test]
fn every_vector_flip_truncation_and_hostile_token_gets_the_same_verdict_through_both_backends() {
    let (policy, tokens) = vector_policy_and_tokens();
    let mut through_host = Host::new(&policy).unwrap_or_else(|e| panic!("{e}"));
    let mut in_wasm = Host::lacking(&policy, &[FOREIGN]).unwrap_or_else(|e| panic!("{e}"));
    let send = |host: &mut Host, token: &str| {
        let auth = format!("Bearer {token}");
        let outcome = host
            .request(&[(":method", "GET"), (":path", "/v"), (":authority", "api"), ("authorization", &auth)])
            .unwrap_or_else(|e| panic!("{e}"));
        (outcome.status(), outcome.header("x-agent-reason").map(String::from))
    };
    let (mut signatures_checked, mut bad) = (0, 0);
    for (name, token) in &tokens {
        let (host, wasm) = (send(&mut through_host, token), send(&mut in_wasm, token));
        assert_eq!(host, wasm, "{name}");
        signatures_checked += usize::from(host.1.as_deref() != Some("bad_signature"));
        bad += usize::from(host.1.as_deref() == Some("bad_signature"));
    }
    assert!(logged(&through_host, HOST_LINE), "{:?}", through_host.logs());
    assert!(logged(&in_wasm, WASM_LINE));
    // The RS* and ES256 tokens (most of them) went to the host.
    assert!(through_host.foreign_calls() >= 500, "{} calls", through_host.foreign_calls());
    assert!(signatures_checked >= 10, "only {signatures_checked} tokens passed the signature check");
    assert!(bad >= 500, "only {bad} tokens failed it");
}
