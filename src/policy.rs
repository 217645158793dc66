//! The compiled policy: parsed and checked once at configure time (keys decoded, templates
//! in a router), so the request path only reads it. Every error names its JSON path.

use crate::config::{self, ConfigError, Mode, PolicyConfig, ProviderConfig, RuleConfig};
use crate::extract::TokenSource;
use crate::jws::Limits;
use crate::keys::{parse_jwk, Alg, Key};
use crate::pattern::Pattern;
use crate::routes::RouteTable;
use serde_json::Value;
use std::collections::HashSet;

#[derive(Debug)]
pub struct Policy {
    pub mode: Mode,
    pub providers: Vec<Provider>,
    pub rules: Vec<Rule>,
    pub routes: RouteTable,
    pub token_sources: Vec<TokenSource>,
    pub limits: Limits,
    pub token_cache_entries: usize,
    pub single_use_entries: usize,
}

pub const DEFAULT_TOKEN_CACHE_ENTRIES: usize = 1024;
pub const DEFAULT_SINGLE_USE_ENTRIES: usize = 100_000;

/// Reads a file named in the policy (`jwks_file`). Hosts without a filesystem refuse.
pub type FileLoader<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// The loader of hosts that cannot read files, such as a gateway's wasm VM.
pub fn no_files(_: &str) -> Result<String, String> {
    Err("this host cannot read files: inline the keys with `jwks`".into())
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
    pub max_lifetime_seconds: Option<u64>,
    /// Normalized (lower case, no `application/`) allowed `typ` values.
    pub token_types: Option<Vec<String>>,
    pub subjects: Option<Vec<Pattern>>,
    /// Bucket ring size for `single_use` (see `replay`); `None` when not single-use.
    pub single_use_ring: Option<i64>,
}

/// RFC 7515 section 4.1.9: `typ` is a media type, compared case-insensitively, and
/// `application/` may be left out.
pub fn normalize_type(typ: &str) -> String {
    let lower = typ.to_ascii_lowercase();
    lower.strip_prefix("application/").map(str::to_string).unwrap_or(lower)
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
    /// Compiles a policy for a host that cannot read files.
    pub fn from_json(json: &str) -> Result<Policy, ConfigError> {
        Policy::from_json_with(json, &no_files)
    }

    /// Compiles a policy, reading any `jwks_file` with `load`.
    pub fn from_json_with(json: &str, load: FileLoader<'_>) -> Result<Policy, ConfigError> {
        compile(config::parse(json)?, load)
    }

    /// The provider whose `issuer` is exactly `iss`.
    pub fn provider_for(&self, iss: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.issuer == iss)
    }
}

fn compile(config: PolicyConfig, load: FileLoader<'_>) -> Result<Policy, ConfigError> {
    if config.providers.is_empty() {
        return Err(ConfigError::at("providers", "at least one token provider is required"));
    }
    let mut providers: Vec<Provider> = Vec::with_capacity(config.providers.len());
    for (i, raw) in config.providers.into_iter().enumerate() {
        let at = format!("providers[{i}]");
        let provider = compile_provider(&at, raw, load)?;
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

    let token_sources = match &config.token_sources {
        None => vec![TokenSource::bearer()],
        Some(sources) if sources.is_empty() => return Err(ConfigError::at("token_sources", "is empty: omit it for `Authorization: Bearer`")),
        Some(sources) => sources
            .iter()
            .enumerate()
            .map(|(i, raw)| TokenSource::compile(raw).map_err(|e| ConfigError::at(format!("token_sources[{i}]"), e)))
            .collect::<Result<_, _>>()?,
    };
    let defaults = Limits::default();
    let positive = |name: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(ConfigError::at(format!("limits.{name}"), "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let limits = Limits {
        max_token_bytes: positive("max_token_bytes", config.limits.max_token_bytes, defaults.max_token_bytes)?,
        max_json_depth: positive("max_json_depth", config.limits.max_json_depth, defaults.max_json_depth)?,
        max_claims: positive("max_claims", config.limits.max_claims, defaults.max_claims)?,
    };
    let token_cache_entries = config.limits.token_cache_entries.unwrap_or(DEFAULT_TOKEN_CACHE_ENTRIES);
    let single_use_entries = positive("single_use_entries", config.limits.single_use_entries, DEFAULT_SINGLE_USE_ENTRIES)?;
    Ok(Policy { mode: config.mode, providers, rules, routes, token_sources, limits, token_cache_entries, single_use_entries })
}

fn compile_provider(at: &str, raw: ProviderConfig, load: FileLoader<'_>) -> Result<Provider, ConfigError> {
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
    let (jwks_at, jwks) = match (raw.jwks, &raw.jwks_file) {
        (Some(jwks), None) => (format!("{at}.jwks"), jwks.keys),
        (None, Some(file)) => {
            let file_at = format!("{at}.jwks_file");
            let text = load(file).map_err(|e| ConfigError::at(&file_at, e))?;
            let set: config::JwksConfig = serde_json::from_str(&text).map_err(|e| ConfigError::at(&file_at, format!("{file}: {e}")))?;
            (format!("{file_at}({file})"), set.keys)
        }
        (Some(_), Some(_)) => return Err(ConfigError::at(format!("{at}.jwks_file"), "give either jwks or jwks_file, not both")),
        (None, None) => return Err(ConfigError::at(at, "needs the provider's keys: jwks (inline) or jwks_file")),
    };
    let keys = compile_keys(&jwks_at, &jwks, &algorithms)?;
    if raw.max_lifetime_seconds == Some(0) {
        return Err(ConfigError::at(format!("{at}.max_lifetime_seconds"), "must be at least 1"));
    }
    let token_types = match raw.token_types {
        Some(types) if types.is_empty() => return Err(ConfigError::at(format!("{at}.token_types"), "is empty: omit it to accept any typ")),
        Some(types) => Some(types.iter().map(|t| normalize_type(t)).collect()),
        None => None,
    };
    let single_use_ring = match (raw.single_use, raw.max_lifetime_seconds) {
        (false, _) => None,
        (true, Some(max)) => Some(crate::replay::ring_windows(max, raw.clock_skew_seconds)),
        (true, None) => {
            return Err(ConfigError::at(format!("{at}.single_use"), "needs max_lifetime_seconds, so that remembered jtis can be forgotten when their tokens expire"));
        }
    };
    let subjects = match raw.subjects {
        Some(subjects) if subjects.is_empty() => return Err(ConfigError::at(format!("{at}.subjects"), "is empty: omit it to accept any subject")),
        Some(subjects) => Some(
            subjects
                .iter()
                .enumerate()
                .map(|(j, s)| Pattern::new(s).map_err(|e| ConfigError::at(format!("{at}.subjects[{j}]"), e)))
                .collect::<Result<_, _>>()?,
        ),
        None => None,
    };
    Ok(Provider {
        name: raw.name,
        issuer: raw.issuer,
        audiences: raw.audiences,
        algorithms,
        keys,
        clock_skew_seconds: raw.clock_skew_seconds,
        max_lifetime_seconds: raw.max_lifetime_seconds,
        token_types,
        subjects,
        single_use_ring,
    })
}

fn compile_keys(at: &str, jwks: &[Value], algorithms: &[Alg]) -> Result<Vec<Key>, ConfigError> {
    let mut keys: Vec<Key> = Vec::with_capacity(jwks.len());
    for (k, jwk) in jwks.iter().enumerate() {
        let key_at = format!("{at}.keys[{k}]");
        let Some(key) = parse_jwk(jwk, algorithms).map_err(|e| ConfigError::at(&key_at, e))? else { continue };
        if key.kid.is_some() && keys.iter().any(|other| other.kid == key.kid) {
            return Err(ConfigError::at(format!("{key_at}.kid"), "duplicate kid in the key set"));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(ConfigError::at(format!("{at}.keys"), "no signing key: add the identity provider's public keys"));
    }
    Ok(keys)
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
