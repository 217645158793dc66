//! Native micro-benchmarks of the core: signature verification per algorithm (a cache miss),
//! rule lookup and evaluation with 10, 100 and 1,000 rules (the router keeps it flat), and a
//! whole decision on a cached token.
//! `cargo bench -p agentgate --bench core`.

// Benchmark set-up: a panic is how it reports a broken fixture.
#![allow(clippy::expect_used, clippy::indexing_slicing)]

use agentgate::authorize::{authorize, Target};
use agentgate::verify::verify;
use agentgate::{Gate, Request};
use agentgate_test_harness::tokens::{agent_claims, policy, Signer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::{json, Value};
use std::hint::black_box;

const NOW: i64 = 1_800_000_000;

fn rules(n: usize) -> Value {
    let rules: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "name": format!("rule-{i}"),
                "match": {"methods": ["GET", "POST"], "path": format!("/service-{i}/items/{{id}}")},
                "require": {"scopes": [format!("service-{i}:read")],
                            "task": {"type": "item_processing", "actions": ["read"], "identifier": "{id}"}}
            })
        })
        .collect();
    Value::Array(rules)
}

fn bench_rules(c: &mut Criterion) {
    let signer = Signer::es256("es-1", 1);
    let mut group = c.benchmark_group("authorize");
    for n in [10, 100, 1000] {
        let gate = Gate::from_json(&policy(&signer.jwks(), &rules(n), "enforce")).expect("policy");
        let last = n - 1;
        let mut claims = agent_claims("agent-7", &format!("service-{last}:read"), NOW);
        claims["authorization_details"] = json!([{"type": "item_processing", "actions": ["read"], "identifier": "42"}]);
        let token = verify(gate.policy(), &signer.sign(&claims), NOW).expect("token");
        let path = format!("/service-{last}/items/42");
        let headers = vec![];
        let target = Target {
            method: "GET",
            headers: &headers,
            source: None,
            peer_uri_san: None,
            mcp: None,
            authority: "api",
            dpop: false,
            txn: None,
            path: &path,
            now: NOW,
        };
        assert!(authorize(gate.policy(), &target, &token).result.is_ok());
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| authorize(black_box(gate.policy()), black_box(&target), black_box(&token)))
        });
    }
    group.finish();
}

fn bench_decision(c: &mut Criterion) {
    let signer = Signer::es256("es-1", 1);
    let gate = Gate::from_json(&policy(&signer.jwks(), &rules(100), "enforce")).expect("policy");
    let mut claims = agent_claims("agent-7", "service-7:read", NOW);
    claims["authorization_details"] = json!([{"type": "item_processing", "actions": ["read"], "identifier": "42"}]);
    let headers = vec![
        (":authority".to_string(), "api".to_string()),
        ("authorization".to_string(), format!("Bearer {}", signer.sign(&claims))),
        ("x-request-id".to_string(), "8b1f".to_string()),
    ];
    let request = Request {
        method: "GET",
        path: "/service-7/items/42",
        headers: &headers,
        now: NOW,
        source: None,
        peer_uri_san: None,
        peer_certificate_sha256: None,
        body: None,
    };
    assert!(gate.evaluate(&request).allowed);
    c.bench_function("decision/cached-token", |b| b.iter(|| gate.evaluate(black_box(&request))));
}

fn bench_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify");
    for signer in [Signer::es256("es-1", 1), Signer::rs256("rs-1", 2), Signer::eddsa("ed-1", 3)] {
        let gate = Gate::from_json(&policy(&signer.jwks(), &rules(10), "enforce")).expect("policy");
        let token = signer.sign(&agent_claims("agent-7", "service-1:read", NOW));
        assert!(verify(gate.policy(), &token, NOW).is_ok());
        group.bench_function(signer.alg, |b| b.iter(|| verify(black_box(gate.policy()), black_box(&token), NOW)));
    }
    group.finish();
}

criterion_group!(benches, bench_verify, bench_rules, bench_decision);
criterion_main!(benches);
