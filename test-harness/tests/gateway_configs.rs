//! The ready configs in `gateways/` carry one policy, and the filter loads it on each host as
//! that host is (the wasmtime harness's Envoy, Kong and APISIX host models).

use agentgate_test_harness::envoy::workspace_root;
use agentgate_test_harness::host::{Host, Outcome};
use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// kong.yml: the block under `config: |`, dedented.
fn kong_policy() -> Value {
    let text = read("gateways/kong/kong.yml");
    let mut lines = text.lines().skip_while(|l| !l.trim_end().ends_with("config: |")).skip(1);
    let first = lines.next().unwrap_or_default();
    let indent = first.len() - first.trim_start().len();
    let block: Vec<&str> = std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect();
    serde_json::from_str(&block.join("\n")).unwrap_or_else(|e| panic!("kong.yml config: {e}"))
}

fn apisix_policy() -> Value {
    let route: Value = serde_json::from_str(&read("gateways/apisix/route.json")).unwrap_or_default();
    let config = read("gateways/apisix/config.yaml");
    assert!(config.contains("- name: agentgate") && config.contains("file: /usr/local/apisix/wasm/agentgate.wasm"));
    route["plugins"]["agentgate"]["conf"].clone()
}

/// wasmplugin.yaml: `pluginConfig` is written as JSON (flow style).
fn istio_policy() -> Value {
    let text = read("gateways/istio/wasmplugin.yaml");
    let json = text.lines().find_map(|l| l.trim().strip_prefix("pluginConfig:")).unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("pluginConfig: {e}"))
}

fn unauthenticated(host: &mut Host) -> Outcome {
    host.request(&[(":method", "GET"), (":path", "/invoices/42"), (":authority", "api")])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_gateway_config_carries_the_same_policy() {
    let kong = kong_policy();
    assert!(kong["providers"].is_array() && kong["rules"].is_array(), "{kong}");
    // APISIX's logs the audit record at warn (its error_log_level), and differs in nothing else.
    let mut apisix = apisix_policy();
    assert_eq!(apisix["audit"].as_object().map(|a| a.len()), Some(1), "{apisix}");
    if let Some(conf) = apisix.as_object_mut() {
        conf.remove("audit");
    }
    assert_eq!(apisix, kong, "APISIX and Kong");
    assert_eq!(istio_policy(), kong, "Istio and Kong");
}

#[test]
fn each_host_loads_its_config_and_enforces_it() {
    let hosts = [("istio", istio_policy()), ("kong", kong_policy()), ("apisix", apisix_policy())];
    for (name, policy) in hosts {
        let started = match name {
            "kong" => Host::kong(&policy.to_string()),
            "apisix" => Host::apisix(&policy.to_string()),
            _ => Host::new(&policy.to_string()),
        };
        let mut host = started.unwrap_or_else(|e| panic!("{name}: {e}"));
        let outcome = unauthenticated(&mut host);
        assert_eq!(outcome.status(), 401, "{name}: deny by default without a token");
        // APISIX's metrics calls succeed and keep nothing.
        let counted = (name != "apisix").then_some(1);
        assert_eq!(
            host.metric("agentgate.denied.missing_token"),
            counted,
            "{name}: counted where the host has metrics"
        );
        if name == "apisix" {
            // Its default error_log_level is warn: the shipped policy logs the audit record there.
            assert_eq!(policy["audit"]["log_level"], "warn", "{policy}");
            assert!(host.logs_at(3).iter().any(|l| l.starts_with("agentgate audit ")), "{:?}", host.logs());
        }
    }
}
