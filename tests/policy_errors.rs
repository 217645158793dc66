//! A bad policy is refused with the JSON path and what is wrong.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::Gate;
use agentgate_test_harness::tokens::{policy, read_invoice_rule, Signer};
use serde_json::{json, Value};

fn base() -> Value {
    let jwks = Signer::es256("k", 1).jwks();
    serde_json::from_str(&policy(&jwks, &read_invoice_rule(), "enforce")).unwrap_or_default()
}

fn error(edit: impl FnOnce(&mut Value)) -> String {
    let mut p = base();
    edit(&mut p);
    match Gate::from_json(&p.to_string()) {
        Ok(_) => "<accepted>".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_foundation_example_policy_is_accepted() {
    assert_eq!(error(|_| {}), "<accepted>");
}

#[test]
fn each_mistake_names_its_path() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|p| p["providers"] = json!([])), "providers: at least one token provider is required"),
        (
            Box::new(|p| p["providers"][0]["audiences"] = json!([])),
            "providers[0].audiences: at least one audience is required",
        ),
        (Box::new(|p| p["providers"][0]["issuer"] = json!(" ")), "providers[0].issuer: must not be empty"),
        (
            Box::new(|p| p["providers"][0]["algorithms"] = json!(["none"])),
            "providers[0].algorithms[0]: unsupported algorithm \"none\"",
        ),
        (
            Box::new(|p| p["providers"][0]["clock_skew_seconds"] = json!(301)),
            "providers[0].clock_skew_seconds: must be at most 300",
        ),
        (
            Box::new(|p| p["providers"][0]["clock_skew_seconds"] = json!(-1)),
            "providers[0].clock_skew_seconds: invalid value: integer `-1`",
        ),
        (Box::new(|p| p["providers"][0]["jwks"]["keys"] = json!([])), "providers[0].jwks.keys: no signing key"),
        (
            Box::new(|p| p["providers"][0]["jwks"]["keys"][0]["kty"] = json!("OKT")),
            "providers[0].jwks.keys[0]: unsupported kty",
        ),
        (
            Box::new(|p| p["providers"][0]["jwks"]["keys"][0]["kty"] = json!("oct")),
            "providers[0].jwks.keys[0]: missing k",
        ),
        (
            Box::new(|p| p["providers"][0]["jwks"]["keys"][0]["x"] = json!("AAAA")),
            "providers[0].jwks.keys[0]: invalid key",
        ),
        (
            Box::new(|p| {
                let k = p["providers"][0]["jwks"]["keys"][0].clone();
                p["providers"][0]["jwks"]["keys"] = json!([k.clone(), k]);
            }),
            "providers[0].jwks.keys[1].kid: duplicate kid",
        ),
        (
            Box::new(|p| {
                let q = p["providers"][0].clone();
                p["providers"] = json!([q.clone(), q]);
            }),
            "providers[1].name: duplicate provider name",
        ),
        (
            Box::new(|p| p["providers"][0]["jwks_uri"] = json!("https://x")),
            "providers[0].jwks_uri: give one of jwks, jwks_file, jwks_uri or discovery, not jwks and jwks_uri",
        ),
        (
            Box::new(|p| {
                p["providers"][0].as_object_mut().map(|o| o.remove("jwks"));
                p["providers"][0]["jwks_uri"] = json!("https://idp.example.com/keys");
            }),
            "providers[0].cluster: is required with jwks_uri or discovery: the upstream (Envoy cluster) that reaches the identity provider",
        ),
        (
            Box::new(|p| {
                p["providers"][0].as_object_mut().map(|o| o.remove("jwks"));
                p["providers"][0]["jwks_uri"] = json!("idp.example.com/keys");
                p["providers"][0]["cluster"] = json!("idp");
            }),
            "providers[0].jwks_uri: \"idp.example.com/keys\" is not an http(s) URL",
        ),
        (
            Box::new(|p| {
                p["providers"][0].as_object_mut().map(|o| o.remove("jwks"));
                p["providers"][0]["discovery"] = json!(true);
                p["providers"][0]["cluster"] = json!("idp");
                p["providers"][0]["jwks_fetch"] = json!({"refresh_seconds": 600, "max_stale_seconds": 300});
            }),
            "providers[0].jwks_fetch.max_stale_seconds: must be longer than refresh_seconds (600), or keys would expire before they are refreshed",
        ),
        (
            Box::new(|p| p["providers"][0]["cluster"] = json!("idp")),
            "providers[0].cluster: is only used with jwks_uri or discovery",
        ),
        (
            Box::new(|p| p["rules"][0]["match"]["methods"] = json!(["GE T"])),
            "rules[0].match.methods[0]: \"GE T\" is not an HTTP method",
        ),
        (
            Box::new(|p| p["rules"][0]["match"]["path"] = json!("/a/{*rest}/b")),
            "rules[0].match.path: invalid path template",
        ),
        (
            Box::new(|p| p["rules"][0]["require"]["scopes"] = json!(["a b"])),
            "rules[0].require.scopes[0]: \"a b\" is not a scope",
        ),
        (
            Box::new(|p| p["rules"][0]["require"]["scopes"] = json!("invoices:read")),
            "rules[0].require.scopes: invalid type: string",
        ),
        (
            Box::new(|p| {
                let r = p["rules"][0].clone();
                p["rules"] = json!([r.clone(), r]);
            }),
            "rules[1].name: duplicate rule name",
        ),
        (Box::new(|p| p["mode"] = json!("monitor")), "mode: unknown variant `monitor`"),
        (
            Box::new(|p| p["providers"][0]["max_lifetime_seconds"] = json!(0)),
            "providers[0].max_lifetime_seconds: must be between 1 and 604800",
        ),
        (
            Box::new(|p| p["providers"][0]["max_lifetime_seconds"] = json!(604_801)),
            "providers[0].max_lifetime_seconds: must be between 1 and 604800",
        ),
        (
            Box::new(|p| {
                p["providers"][0]["single_use"] = json!(true);
                p["providers"][0]["max_lifetime_seconds"] = json!(3601);
            }),
            "providers[0].max_lifetime_seconds: must be between 1 and 3600 with single_use",
        ),
        (
            Box::new(|p| p["providers"][0]["single_use_scope"] = json!("cluster")),
            "providers[0].single_use_scope: unknown variant `cluster`",
        ),
        (
            Box::new(|p| {
                let provider = p["providers"][0].as_object_mut().unwrap();
                provider.remove("jwks");
                provider.insert("jwks_uri".into(), json!("https://idp.example.com/keys"));
                provider.insert("cluster".into(), json!("idp"));
                provider.insert("jwks_fetch".into(), json!({"max_bytes": 4_194_305}));
            }),
            "providers[0].jwks_fetch.max_bytes: must be between 1024 and 4194304",
        ),
        (Box::new(|p| p["path_parameters"] = json!("strip")), "path_parameters: unknown variant `strip`"),
        (
            Box::new(|p| p["rules"][0]["match"]["path"] = json!("/invoices/{id}/")),
            "rules[0].match.path: must not contain empty segments or end with '/'",
        ),
        (
            Box::new(|p| p["rules"][0]["match"]["path"] = json!("/caf%C3%A9/{id}")),
            "rules[0].match.path: must be written decoded",
        ),
    ];
    for (edit, expected) in cases {
        let got = error(edit);
        assert!(got.starts_with(expected), "expected {expected:?}\n     got {got:?}");
    }
}

#[test]
fn trailing_garbage_after_the_policy_is_refused() {
    let text = format!("{} x", base());
    assert!(Gate::from_json(&text).is_err());
}
