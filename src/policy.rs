//! The compiled policy: parsed and checked once at configure time (keys decoded, templates
//! in a router), so the request path only reads it. Every error names its JSON path.

use crate::config::{self, ConfigError, Mode, PolicyConfig, ProviderConfig, RuleConfig};
use crate::keys::{parse_jwk, Alg, Key};
use crate::routes::RouteTable;
use std::collections::HashSet;

#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub providers: Vec<Provider>,
    pub rules: Vec<Rule>,
    pub routes: RouteTable,
}

/// A trusted token issuer and the keys its tokens must be signed with.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Alg>,
    pub keys: Vec<Key>,
    pub clock_skew_seconds: u64,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// Upper-case methods; `None` matches any.
    pub methods: Option<Vec<String>>,
    pub scopes: Vec<String>,
}

impl Rule {
    pub fn matches_method(&self, method: &str) -> bool {
        self.methods.as_ref().is_none_or(|methods| methods.iter().any(|m| m == method))
    }
}

impl Policy {
    pub fn from_json(json: &str) -> Result<Policy, ConfigError> {
        compile(config::parse(json)?)
    }

    /// The provider whose `issuer` is exactly `iss`.
    pub fn provider_for(&self, iss: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.issuer == iss)
    }
}

fn compile(config: PolicyConfig) -> Result<Policy, ConfigError> {
    if config.providers.is_empty() {
        return Err(ConfigError::at("providers", "at least one token provider is required"));
    }
    let mut providers: Vec<Provider> = Vec::with_capacity(config.providers.len());
    for (i, raw) in config.providers.into_iter().enumerate() {
        let at = format!("providers[{i}]");
        let provider = compile_provider(&at, raw)?;
        if providers.iter().any(|p| p.name == provider.name) {
            return Err(ConfigError::at(format!("{at}.name"), format!("duplicate provider name {:?}", provider.name)));
        }
        if providers.iter().any(|p| p.issuer == provider.issuer) {
            return Err(ConfigError::at(format!("{at}.issuer"), format!("issuer {:?} is already used by another provider", provider.issuer)));
        }
        providers.push(provider);
    }

    let mut rules = Vec::with_capacity(config.rules.len());
    let mut routes = RouteTable::default();
    let mut names = HashSet::new();
    for (i, raw) in config.rules.into_iter().enumerate() {
        let at = format!("rules[{i}]");
        routes
            .add(i, raw.matcher.path.as_deref())
            .map_err(|e| ConfigError::at(format!("{at}.match.path"), e))?;
        let rule = compile_rule(&at, raw)?;
        if !names.insert(rule.name.clone()) {
            return Err(ConfigError::at(format!("{at}.name"), format!("duplicate rule name {:?}", rule.name)));
        }
        rules.push(rule);
    }
    routes.finish();
    Ok(Policy { mode: config.mode, providers, rules, routes })
}

fn compile_provider(at: &str, raw: ProviderConfig) -> Result<Provider, ConfigError> {
    non_empty(&format!("{at}.name"), &raw.name)?;
    non_empty(&format!("{at}.issuer"), &raw.issuer)?;
    if raw.audiences.is_empty() {
        return Err(ConfigError::at(format!("{at}.audiences"), "at least one audience is required: tokens minted for other APIs must not be accepted here"));
    }
    for (j, audience) in raw.audiences.iter().enumerate() {
        non_empty(&format!("{at}.audiences[{j}]"), audience)?;
    }
    if raw.algorithms.is_empty() {
        return Err(ConfigError::at(format!("{at}.algorithms"), "at least one algorithm is required"));
    }
    let mut algorithms = Vec::with_capacity(raw.algorithms.len());
    for (j, name) in raw.algorithms.iter().enumerate() {
        let alg = Alg::from_name(name).ok_or_else(|| {
            let supported: Vec<&str> = Alg::ALL.iter().map(|a| a.name()).collect();
            ConfigError::at(format!("{at}.algorithms[{j}]"), format!("unsupported algorithm {name:?} (supported: {})", supported.join(", ")))
        })?;
        algorithms.push(alg);
    }
    if raw.clock_skew_seconds > config::MAX_CLOCK_SKEW_SECONDS {
        return Err(ConfigError::at(format!("{at}.clock_skew_seconds"), format!("must be at most {}", config::MAX_CLOCK_SKEW_SECONDS)));
    }
    let mut keys: Vec<Key> = Vec::with_capacity(raw.jwks.keys.len());
    for (k, jwk) in raw.jwks.keys.iter().enumerate() {
        let key_at = format!("{at}.jwks.keys[{k}]");
        let Some(key) = parse_jwk(jwk, &algorithms).map_err(|e| ConfigError::at(&key_at, e))? else { continue };
        if key.kid.is_some() && keys.iter().any(|other| other.kid == key.kid) {
            return Err(ConfigError::at(format!("{key_at}.kid"), "duplicate kid in the key set"));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(ConfigError::at(format!("{at}.jwks.keys"), "no signing key: add the identity provider's public keys"));
    }
    Ok(Provider {
        name: raw.name,
        issuer: raw.issuer,
        audiences: raw.audiences,
        algorithms,
        keys,
        clock_skew_seconds: raw.clock_skew_seconds,
    })
}

fn compile_rule(at: &str, raw: RuleConfig) -> Result<Rule, ConfigError> {
    non_empty(&format!("{at}.name"), &raw.name)?;
    let methods = match raw.matcher.methods {
        None => None,
        Some(methods) if methods.is_empty() => {
            return Err(ConfigError::at(format!("{at}.match.methods"), "is empty: list methods, or omit the field to match any method"));
        }
        Some(methods) => {
            let mut upper = Vec::with_capacity(methods.len());
            for (j, method) in methods.iter().enumerate() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(ConfigError::at(format!("{at}.match.methods[{j}]"), format!("{method:?} is not an HTTP method")));
                }
                upper.push(method.to_ascii_uppercase());
            }
            Some(upper)
        }
    };
    for (j, scope) in raw.require.scopes.iter().enumerate() {
        if scope.is_empty() || scope.contains(char::is_whitespace) {
            return Err(ConfigError::at(format!("{at}.require.scopes[{j}]"), format!("{scope:?} is not a scope (non-empty, no spaces)")));
        }
    }
    Ok(Rule { name: raw.name, methods, scopes: raw.require.scopes })
}

fn non_empty(at: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::at(at, "must not be empty"));
    }
    Ok(())
}
