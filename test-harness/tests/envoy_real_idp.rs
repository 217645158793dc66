//! A real identity provider in front of the real Envoy 1.40: npm `oidc-provider` on loopback
//! issues RFC 9068 `at+jwt` access tokens (client credentials grant, RFC 8707 resource
//! indicators, RFC 9396 authorization_details), and agentgate finds its keys through OIDC
//! discovery via Envoy's `idp` cluster. Tokens minted by the tests themselves only prove that
//! the gate agrees with its own minter; these come from an independent implementation.

use agentgate_test_harness::envoy::{Envoy, Response};
use agentgate_test_harness::oidc_provider::{peek, OidcProvider, AGENT, DPOP_AGENT, OTHER_RESOURCE, RESOURCE};
use agentgate_test_harness::tokens::b64;
use agentgate_test_harness::upstream::Upstream;
use serde_json::{json, Value};
use std::time::Duration;

fn policy(issuer: &str) -> String {
    json!({
        "providers": [{
            "name": "oidc-provider",
            "issuer": issuer,
            "audiences": [RESOURCE],
            "algorithms": ["ES256"],
            "discovery": true,
            "cluster": "idp",
            "token_types": ["at+jwt"],
        }],
        "rules": [
            {
                "name": "read-invoice",
                "match": {"methods": ["GET"], "path": "/invoices/{id}"},
                "require": {"scopes": ["invoices:read"]}
            },
            {
                "name": "pay-invoice",
                "match": {"methods": ["POST"], "path": "/invoices/{id}/pay"},
                "require": {
                    "scopes": ["invoices:pay"],
                    "task": {"type": "invoice_processing", "actions": ["pay"], "identifier": "{id}"}
                }
            }
        ]
    })
    .to_string()
}

fn pay_42() -> Value {
    json!([{"type": "invoice_processing", "actions": ["pay"], "identifier": "42"}])
}

/// POST through Envoy's listener (the harness's own client only GETs).
fn post(envoy: &Envoy, path: &str, token: &str) -> Response {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{}{path}", envoy.port);
    match agent.post(&url).header("authorization", &format!("Bearer {token}")).send("{}") {
        Ok(mut r) => Response {
            status: r.status().as_u16(),
            headers: Vec::new(),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        },
        Err(e) => Response { status: 0, headers: Vec::new(), body: format!("request failed: {e}") },
    }
}

fn get(envoy: &Envoy, path: &str, token: &str) -> Response {
    envoy.get(path, &[("authorization", &format!("Bearer {token}"))])
}

fn last_reason(envoy: &Envoy) -> Value {
    envoy.audit_records().last().map_or(Value::Null, |r| r["reason"].clone())
}

/// The token with one claim changed and the signature kept.
fn tampered(token: &str, claim: &str, value: Value) -> String {
    let (_, mut claims) = peek(token);
    claims[claim] = value;
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = b64(claims.to_string().as_bytes());
    parts.join(".")
}

#[test]
fn tokens_from_oidc_provider_are_checked_with_keys_found_by_discovery() {
    let idp = OidcProvider::start();
    let upstream = Upstream::start();
    let envoy =
        Envoy::start_with_idp(&policy(&idp.issuer), upstream.port, Some(idp.port)).unwrap_or_else(|e| panic!("{e}"));

    let token = idp.token(AGENT, RESOURCE, "invoices:read invoices:pay", Some(pay_42()));
    // What the real provider issued: an RFC 9068 JWT access token with RFC 9396 details.
    let (header, claims) = peek(&token);
    assert_eq!(header["typ"], "at+jwt", "{header}");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["aud"], RESOURCE);
    assert_eq!(claims["sub"], AGENT.0);
    assert_eq!(claims["authorization_details"], pay_42());

    // Allowed, with the audit headers the upstream receives; the keys came by discovery
    // (the provider's RS256 ID-token key is skipped: the policy allows ES256 only).
    let read = get(&envoy, "/invoices/42", &token);
    assert_eq!(read.status, 200, "{}\n{}", read.body, envoy.logs());
    assert_eq!(read.upstream_header("x-agent-id").as_deref(), Some(AGENT.0));
    assert_eq!(read.upstream_header("x-agent-rule").as_deref(), Some("read-invoice"));
    assert_eq!(read.upstream_header("authorization"), None, "the token is not forwarded");
    assert!(envoy.logs().contains("agentgate: provider oidc-provider: fetched 1 signing keys"), "{}", envoy.logs());

    let pay = post(&envoy, "/invoices/42/pay", &token);
    assert_eq!(pay.status, 200, "{}\n{}", pay.body, envoy.logs());
    assert_eq!(pay.upstream_header("x-agent-task-type").as_deref(), Some("invoice_processing"));
    assert_eq!(pay.upstream_header("x-agent-task-id").as_deref(), Some("42"));
    let record = envoy.audit_records().last().cloned().unwrap_or(Value::Null);
    assert_eq!(record["decision"], "allow");
    assert_eq!(record["issuer"], idp.issuer.as_str());
    assert_eq!(record["jti"], claims["jti"]);

    // The task names invoice 42: the same token cannot pay invoice 43.
    assert_eq!(post(&envoy, "/invoices/43/pay", &token).status, 403);
    assert_eq!(last_reason(&envoy), "task_mismatch");

    // Wrong scope: a genuine token that may only pay cannot read.
    let pay_only = idp.token(AGENT, RESOURCE, "invoices:pay", Some(pay_42()));
    assert_eq!(get(&envoy, "/invoices/42", &pay_only).status, 403);
    assert_eq!(last_reason(&envoy), "insufficient_scope");

    // Tampered: more scope, or another subject, under the provider's signature.
    let widened =
        tampered(&idp.token(AGENT, RESOURCE, "invoices:pay", None), "scope", json!("invoices:read invoices:pay"));
    assert_eq!(get(&envoy, "/invoices/42", &widened).status, 401);
    assert_eq!(last_reason(&envoy), "bad_signature");
    assert_eq!(get(&envoy, "/invoices/42", &tampered(&token, "sub", json!("admin-agent"))).status, 401);
    assert_eq!(last_reason(&envoy), "bad_signature");

    // A genuine token of the same provider for another resource server.
    let other = idp.token(AGENT, OTHER_RESOURCE, "invoices:read", None);
    assert_eq!(peek(&other).1["aud"], OTHER_RESOURCE);
    assert_eq!(get(&envoy, "/invoices/42", &other).status, 401);
    assert_eq!(last_reason(&envoy), "audience_mismatch");

    // And the first token still works: nothing above was a fluke of the key state.
    assert_eq!(get(&envoy, "/invoices/42", &token).status, 200);
}

#[test]
fn a_dpop_bound_token_from_oidc_provider_is_useless_without_its_key_in_envoy() {
    let idp = OidcProvider::start();
    let upstream = Upstream::start();
    let envoy =
        Envoy::start_with_idp(&policy(&idp.issuer), upstream.port, Some(idp.port)).unwrap_or_else(|e| panic!("{e}"));
    // Envoy's :scheme and :authority for this plain listener: the URL the client uses.
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", envoy.port);
    let answer = idp.client(&json!({
        "client_id": DPOP_AGENT.0, "client_secret": DPOP_AGENT.1, "resource": RESOURCE,
        "scope": "invoices:read", "dpop": "ES256",
        "proofs": [{"htm": "GET", "htu": url("/invoices/42")}, {"htm": "GET", "htu": url("/invoices/43")}],
    }));
    assert_eq!(answer["status"], 200, "{answer}\n{}", idp.logs());
    let token = answer["token"]["access_token"].as_str().unwrap_or_default().to_string();
    let proof = |i: usize| answer["proofs"][i].as_str().unwrap_or_default().to_string();
    let dpop = format!("DPoP {token}");

    let ok = envoy.get("/invoices/42", &[("authorization", &dpop), ("dpop", &proof(0))]);
    assert_eq!(ok.status, 200, "{}\n{}", ok.body, envoy.logs());
    assert_eq!(ok.upstream_header("dpop"), None, "the proof stays at the gate");
    assert_eq!(ok.upstream_header("authorization"), None);

    // The same proof again, a proof for another URL, the token as Bearer, a thief's own key.
    let replayed = envoy.get("/invoices/42", &[("authorization", &dpop), ("dpop", &proof(0))]);
    assert_eq!(replayed.status, 401);
    assert!(replayed.header("www-authenticate").is_some_and(|c| c.starts_with("DPoP error=\"invalid_dpop_proof\"")));
    assert_eq!(envoy.get("/invoices/42", &[("authorization", &dpop), ("dpop", &proof(1))]).status, 401);
    assert_eq!(envoy.get("/invoices/42", &[("authorization", &format!("Bearer {token}"))]).status, 401);
    let thief = idp.client(
        &json!({"dpop": "ES256", "proofs": [{"htm": "GET", "htu": url("/invoices/42"), "access_token": token}]}),
    );
    let stolen = thief["proofs"][0].as_str().unwrap_or_default();
    assert_eq!(envoy.get("/invoices/42", &[("authorization", &dpop), ("dpop", stolen)]).status, 401);

    let details: Vec<Value> = envoy.audit_records().iter().map(|r| r["detail"].clone()).collect();
    assert_eq!(
        details,
        [
            Value::Null,
            json!("dpop_replayed"),
            json!("dpop_htu_mismatch"),
            json!("dpop_bound_token_as_bearer"),
            json!("dpop_key_mismatch")
        ]
    );
}

/// RFC 9449 server nonces in Envoy, with npm `dpop` making every proof: the client's first
/// request is refused with `use_dpop_nonce` and a nonce, its retry passes; in a later slot the
/// nonce it holds still passes and the response brings the new one.
#[test]
fn the_dpop_nonce_round_trip_with_oidc_provider_and_npm_dpop_in_envoy() {
    let idp = OidcProvider::start();
    let upstream = Upstream::start();
    let mut policy: Value = serde_json::from_str(&policy(&idp.issuer)).unwrap_or_default();
    let lifetime = 10;
    policy["dpop"] = json!({"use_dpop_nonce": true, "nonce_key": "e2e nonce key, 32 bytes or more!!", "nonce_lifetime_seconds": lifetime});
    let envoy =
        Envoy::start_with_idp(&policy.to_string(), upstream.port, Some(idp.port)).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://127.0.0.1:{}/invoices/42", envoy.port);
    let client = |nonce: Option<&str>| {
        idp.client(&json!({
            "client_id": DPOP_AGENT.0, "client_secret": DPOP_AGENT.1, "resource": RESOURCE,
            "scope": "invoices:read", "dpop": "ES256", "nonce": nonce,
            "requests": [{"method": "GET", "url": url}, {"method": "GET", "url": url}],
        }))
    };
    let first = client(None);
    let responses = &first["responses"];
    assert_eq!(responses[0]["status"], 200, "{first}\n{}", envoy.logs());
    assert_eq!(responses[0]["retried"], true, "the first proof had no nonce");
    assert_eq!((&responses[1]["status"], &responses[1]["retried"]), (&json!(200), &json!(false)), "{first}");
    assert_eq!(
        responses[1]["body"].as_str().map(|b| b.contains("\"dpop\"")),
        Some(false),
        "the proof stays at the gate"
    );
    let nonce = first["nonce"].as_str().unwrap_or_default().to_string();
    let details: Vec<Value> = envoy.audit_records().iter().map(|r| r["detail"].clone()).collect();
    assert_eq!(details, [json!("dpop_use_nonce"), Value::Null, Value::Null]);

    // Wait into the next slot: the nonce held is a slot old, still good, and rotated.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let into_next = lifetime - now.as_secs() % lifetime;
    std::thread::sleep(Duration::from_secs(into_next) + Duration::from_millis(300));
    let later = client(Some(&nonce));
    assert_eq!((&later["responses"][0]["status"], &later["responses"][0]["retried"]), (&json!(200), &json!(false)));
    let rotated = later["responses"][0]["nonce"].as_str().unwrap_or_default();
    assert!(!rotated.is_empty() && rotated != nonce, "{later}");
    assert_eq!(later["responses"][1]["nonce"], Value::Null, "the new nonce is current");
}

/// A Txn-Token (draft-ietf-oauth-transaction-tokens) alongside oidc-provider's access token in
/// Envoy: the pay rule wants one from the trust domain's token service, with the context it
/// names; the audit record carries its `txn`, and it goes on to the upstream (the next hop).
#[test]
fn a_txn_token_alongside_a_real_access_token_in_envoy() {
    use agentgate_test_harness::tokens::Signer;
    let tts = Signer::es256("tts-1", 41);
    let idp = OidcProvider::start();
    let upstream = Upstream::start();
    let mut policy: Value = serde_json::from_str(&policy(&idp.issuer)).unwrap_or_default();
    if let Some(providers) = policy["providers"].as_array_mut() {
        providers.push(json!({"name": "tts", "issuer": "https://tts.corp.example", "audiences": ["corp.example"],
                              "algorithms": ["ES256"], "transaction_tokens": true, "jwks": tts.jwks()}));
    }
    policy["rules"][1]["require"]["transaction_token"] =
        json!({"scopes": ["invoices:pay"], "claims": [{"path": "tctx.amount", "lte": 500}]});
    let envoy =
        Envoy::start_with_idp(&policy.to_string(), upstream.port, Some(idp.port)).unwrap_or_else(|e| panic!("{e}"));
    let token = idp.token(AGENT, RESOURCE, "invoices:read invoices:pay", Some(pay_42()));
    let now = agentgate_test_harness::tokens::now();
    let txn_id = "97053963-771d-49cc-a4e3-20aad399c312";
    let txn_token = |typ: &str, amount: u32| {
        let claims = json!({"iss": "https://tts.corp.example", "aud": "corp.example", "iat": now, "exp": now + 60,
                            "sub": AGENT.0, "txn": txn_id, "scope": "invoices:pay", "req_wl": "checkout-service",
                            "tctx": {"amount": amount}});
        tts.sign_with_header(&json!({"alg": "ES256", "typ": typ, "kid": "tts-1"}), &claims)
    };
    let pay = |txn: Option<&str>| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut request = agent
            .post(&format!("http://127.0.0.1:{}/invoices/42/pay", envoy.port))
            .header("authorization", &format!("Bearer {token}"));
        if let Some(txn) = txn {
            request = request.header("txn-token", txn);
        }
        match request.send("{}") {
            Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    };

    let (status, body) = pay(Some(&txn_token("txntoken+jwt", 120)));
    assert_eq!(status, 200, "{body}\n{}", envoy.logs());
    let echoed: Value = serde_json::from_str(&body).unwrap_or_default();
    assert!(echoed["headers"]["txn-token"].is_string(), "the Txn-Token goes on to the next hop: {echoed}");
    let record = envoy.audit_records().last().cloned().unwrap_or_default();
    assert_eq!(
        (&record["decision"], &record["txn"], &record["agent"]),
        (&json!("allow"), &json!(txn_id), &json!(AGENT.0))
    );

    // Missing, the wrong typ, the context over the limit: the pay rule refuses each.
    for txn in [None, Some(txn_token("JWT", 120)), Some(txn_token("txntoken+jwt", 900))] {
        let (status, body) = pay(txn.as_deref());
        assert_eq!(status, 403, "{body}");
        assert_eq!(last_reason(&envoy), "transaction_token_required");
    }
    // A Txn-Token is never an access token.
    assert_eq!(get(&envoy, "/invoices/42", &txn_token("txntoken+jwt", 120)).status, 401);
    assert_eq!(last_reason(&envoy), "type_not_allowed");
}
