//! The compiled policy: parsed and checked once at configure time (keys decoded, templates
//! in a router), so the request path only reads it. Every error names its JSON path.

use crate::audit::{self, AuditSettings, HeaderNames, Pseudonymizer, MIN_PSEUDONYM_KEY_BYTES};
use crate::config::{self, ConfigError, Mode, PolicyConfig, ProviderConfig, RuleConfig};
use crate::context::{parse_cidr, Condition, TimeWindow};
use crate::extract::TokenSource;
use crate::jwks::{self, RemoteJwks};
use crate::jws::Limits;
use crate::keys::{parse_jwk, Alg, Key, KeySet};
use crate::mcp::McpMatch;
use crate::pattern::Pattern;
use crate::ratelimit::RateLimit;
use crate::reason::Reason;
use crate::routes::{param_names, RouteTable};
use ipnet::IpNet;
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
    pub revoked: Revoked,
    /// Some rule reads the client address: hosts fetch it only then.
    pub needs_source: bool,
    /// Some rule matches hosts: the request's host is brought to canonical form only then.
    pub needs_host: bool,
    pub path_parameters: crate::canonical::PathParameters,
    /// Some rule has claim conditions: verified tokens keep all their claims only then.
    pub needs_claims: bool,
    /// The per-agent limit over all requests.
    pub rate_limit: Option<RateLimit>,
    /// Some rule binds the agent to the mTLS peer: hosts fetch the peer's URI SAN only then.
    pub needs_peer: bool,
    /// Some provider accepts certificate-bound tokens: hosts fetch the client certificate's
    /// SHA-256 (Envoy's `connection.sha256_peer_certificate_digest`) only then.
    pub needs_peer_certificate: bool,
    pub forward_token: bool,
    pub audit: AuditSettings,
    /// SHA-256 of the policy's text: what the shared token cache's entries are valid under.
    pub digest: [u8; 32],
    /// The templates of rules that match MCP messages: a POST there has its body read.
    pub mcp_routes: RouteTable,
    pub max_body_bytes: usize,
    pub resource_metadata: Option<ResourceMetadata>,
    pub quarantine: Option<crate::quarantine::Quarantine>,
    /// What was accepted but deserves a look (keys of a `jwks_file` this policy cannot use),
    /// with their JSON paths: hosts log them, `agentgate check-config` prints them.
    pub warnings: Vec<String>,
    pub dpop: crate::dpop::DpopOptions,
    /// The policy has a `dpop` section.
    pub dpop_configured: bool,
    /// The routing header of a front-tier gate; `None` for a gate that decides.
    pub front_tier: Option<String>,
}

/// RFC 9728 protected-resource metadata, ready to serve.
#[derive(Debug)]
pub struct ResourceMetadata {
    /// The resource identifier (RFC 8707): MCP tokens must carry it as audience.
    pub resource: String,
    /// Where the document is served: the path-inserted form first, then the plain one.
    pub paths: Vec<String>,
    /// The document's URL, for `resource_metadata="…"` in challenges.
    pub url: String,
    /// The document itself (JSON).
    pub document: String,
}

fn rate_limit(at: &str, raw: Option<&config::RateLimitConfig>) -> Result<Option<RateLimit>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(r) if r.requests == 0 || r.per_seconds == 0 => {
            Err(ConfigError::at(at, "requests and per_seconds must be at least 1"))
        }
        Some(r) => Ok(Some(RateLimit { requests: r.requests, per_seconds: r.per_seconds })),
    }
}

/// The kill switch, compiled.
#[derive(Debug, Default)]
pub struct Revoked {
    pub subjects: Vec<Pattern>,
    pub actors: Vec<Pattern>,
    pub jtis: HashSet<String>,
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
    pub keys: KeySet,
    /// Where the keys are fetched from; `None` for keys given in the policy.
    pub remote: Option<RemoteJwks>,
    pub clock_skew_seconds: u64,
    pub max_lifetime_seconds: Option<u64>,
    /// Normalized (lower case, no `application/`) allowed `typ` values.
    pub token_types: Option<Vec<String>>,
    pub subjects: Option<Vec<Pattern>>,
    /// Bucket ring size for `single_use` (see `replay`); `None` when not single-use.
    pub single_use_ring: Option<i64>,
    /// Where single-use `jti`s must be remembered.
    pub single_use_scope: config::SingleUseScope,
    /// Every token must be DPoP-bound and come with a proof.
    pub require_dpop: bool,
    /// RFC 8705 certificate-bound tokens are checked (else refused).
    pub certificate_bound: bool,
    /// Issues Txn-Tokens, accepted only in the `Txn-Token` header.
    pub transaction_tokens: bool,
    /// A custom claim holding task entries; `None`: `authorization_details`.
    pub task_claim: Option<String>,
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
    /// Lower-case host patterns; `None` matches any.
    pub hosts: Option<Vec<Pattern>>,
    pub scopes: Vec<String>,
    pub any_scopes: Vec<String>,
    pub task: Option<TaskRequirement>,
    pub agents: Option<Vec<Pattern>>,
    pub max_delegation_depth: Option<usize>,
    pub actors: Option<Vec<Pattern>>,
    pub approval: Option<Approval>,
    /// This rule's own mode, overriding the policy's when set.
    pub mode: Option<Mode>,
    pub source_cidrs: Option<Vec<IpNet>>,
    pub headers: Vec<Condition>,
    pub time: Option<TimeWindow>,
    pub claims: Vec<Condition>,
    pub rate_limit: Option<RateLimit>,
    pub bind_mtls_peer: bool,
    /// The MCP message this rule is for; such a rule matches only a POST carrying one.
    pub mcp: Option<McpMatch>,
    /// Conditions on the MCP call's `params.arguments`.
    pub arguments: Vec<Condition>,
    pub max_recent_denials: Option<u32>,
    /// The token must be DPoP-bound, its proof checked.
    pub dpop: bool,
    /// A Txn-Token must come along: its scopes and claim conditions.
    pub transaction_token: Option<(Vec<String>, Vec<Condition>)>,
}

#[derive(Debug)]
pub struct TaskRequirement {
    pub kind: String,
    pub actions: Vec<String>,
    pub locations: Vec<String>,
    pub datatypes: Vec<String>,
    /// Template such as `{id}`, filled from the request's path parameters.
    pub identifier: Option<String>,
}

#[derive(Debug)]
pub struct Approval {
    pub acr_values: Vec<String>,
    pub max_age_seconds: Option<u64>,
}

impl Rule {
    pub fn matches_method(&self, method: &str) -> bool {
        self.methods.as_ref().is_none_or(|methods| methods.iter().any(|m| m == method))
    }

    /// `host` is the request's authority, without port, lower case.
    pub fn matches_host(&self, host: &str) -> bool {
        self.hosts.as_ref().is_none_or(|hosts| hosts.iter().any(|h| h.matches(host)))
    }
}

impl Policy {
    /// Compiles a policy for a host that cannot read files.
    pub fn from_json(json: &str) -> Result<Policy, ConfigError> {
        Policy::from_json_with(json, &no_files)
    }

    /// Compiles a policy, reading any `jwks_file` with `load`.
    pub fn from_json_with(json: &str, load: FileLoader<'_>) -> Result<Policy, ConfigError> {
        use sha2::Digest;
        let mut policy = compile(config::parse(json)?, load)?;
        policy.digest = sha2::Sha256::digest(json.as_bytes()).into();
        Ok(policy)
    }

    /// Whether some provider's single-use tokens must be remembered across workers
    /// (`single_use_scope: gateway`): a host without shared storage must refuse the policy.
    pub fn needs_shared_single_use(&self) -> bool {
        self.providers
            .iter()
            .any(|p| p.single_use_ring.is_some() && p.single_use_scope == config::SingleUseScope::Gateway)
    }

    /// Whether DPoP-bound tokens are expected: a provider or rule requires them, or the
    /// policy sets how proofs are checked. Hosts prepare the proof replay store then.
    pub fn expects_dpop(&self) -> bool {
        self.dpop_configured || self.providers.iter().any(|p| p.require_dpop) || self.rules.iter().any(|r| r.dpop)
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
    let mut warnings = Vec::new();
    for (i, raw) in config.providers.into_iter().enumerate() {
        let at = format!("providers[{i}]");
        let provider = compile_provider(&at, raw, load, &mut warnings)?;
        if providers.iter().any(|p| p.name == provider.name) {
            return Err(ConfigError::at(format!("{at}.name"), format!("duplicate provider name {:?}", provider.name)));
        }
        if providers.iter().any(|p| p.issuer == provider.issuer) {
            return Err(ConfigError::at(
                format!("{at}.issuer"),
                format!("issuer {:?} is already used by another provider", provider.issuer),
            ));
        }
        providers.push(provider);
    }

    let mut rules = Vec::with_capacity(config.rules.len());
    let mut routes = RouteTable::default();
    let mut mcp_routes = RouteTable::default();
    let mut names = HashSet::new();
    for (i, raw) in config.rules.into_iter().enumerate() {
        let at = format!("rules[{i}]");
        routes.add(i, raw.matcher.path.as_deref()).map_err(|e| ConfigError::at(format!("{at}.match.path"), e))?;
        if raw.matcher.mcp.is_some() {
            // Already validated above, with the same template.
            let _ = mcp_routes.add(i, raw.matcher.path.as_deref());
        }
        let rule = compile_rule(&at, raw)?;
        if !names.insert(rule.name.clone()) {
            return Err(ConfigError::at(format!("{at}.name"), format!("duplicate rule name {:?}", rule.name)));
        }
        rules.push(rule);
    }
    routes.finish();
    mcp_routes.finish();

    let token_sources = match &config.token_sources {
        None => vec![TokenSource::bearer(), TokenSource::dpop()],
        Some(sources) if sources.is_empty() => {
            return Err(ConfigError::at("token_sources", "is empty: omit it for `Authorization: Bearer`"))
        }
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
    let max_body_bytes = positive("max_body_bytes", config.limits.max_body_bytes, crate::mcp::DEFAULT_MAX_BODY_BYTES)?;
    let resource_metadata = config.resource_metadata.map(compile_resource_metadata).transpose()?;
    let quarantine = config.quarantine.as_ref().map(compile_quarantine).transpose()?;
    let dpop = compile_dpop(config.dpop.as_ref())?;
    let front_tier = match &config.front_tier {
        None => None,
        Some(front) => {
            let name = front.routing_header.clone().unwrap_or_else(|| "x-agent-route".into());
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(ConfigError::at(
                    "front_tier.routing_header",
                    "must be a lower-case header name (a-z, 0-9, '-')",
                ));
            }
            Some(name)
        }
    };
    if let Some(i) = rules.iter().position(|r: &Rule| r.max_recent_denials.is_some()).filter(|_| quarantine.is_none()) {
        return Err(ConfigError::at(
            format!("rules[{i}].require.max_recent_denials"),
            "needs a policy-level quarantine (its window and counted reasons)",
        ));
    }
    let single_use_entries =
        positive("single_use_entries", config.limits.single_use_entries, DEFAULT_SINGLE_USE_ENTRIES)?;
    let revoked = Revoked {
        subjects: patterns("revoked.subjects", &config.revoked.subjects)?,
        actors: patterns("revoked.actors", &config.revoked.actors)?,
        jtis: config.revoked.jtis.into_iter().collect(),
    };
    let audit = compile_audit(&config.audit, &token_sources, config.forward_token)?;
    let needs_source = rules.iter().any(|r: &Rule| r.source_cidrs.is_some());
    let needs_host = rules.iter().any(|r: &Rule| r.hosts.is_some());
    let needs_claims = rules.iter().any(|r: &Rule| !r.claims.is_empty());
    let needs_peer = rules.iter().any(|r: &Rule| r.bind_mtls_peer);
    let needs_peer_certificate = providers.iter().any(|p| p.certificate_bound);
    if let Some(i) = rules
        .iter()
        .position(|r: &Rule| r.transaction_token.is_some())
        .filter(|_| !providers.iter().any(|p| p.transaction_tokens))
    {
        return Err(ConfigError::at(
            format!("rules[{i}].require.transaction_token"),
            "needs a provider with \"transaction_tokens\": true (the transaction-token service)",
        ));
    }
    Ok(Policy {
        mode: config.mode,
        providers,
        rules,
        routes,
        token_sources,
        limits,
        token_cache_entries,
        single_use_entries,
        revoked,
        needs_source,
        needs_host,
        path_parameters: config.path_parameters,
        needs_claims,
        rate_limit: rate_limit("rate_limit", config.rate_limit.as_ref())?,
        needs_peer,
        needs_peer_certificate,
        forward_token: config.forward_token,
        audit,
        digest: [0; 32],
        mcp_routes,
        max_body_bytes,
        resource_metadata,
        quarantine,
        warnings,
        dpop,
        dpop_configured: config.dpop.is_some(),
        front_tier,
    })
}

fn compile_resource_metadata(raw: serde_json::Map<String, Value>) -> Result<ResourceMetadata, ConfigError> {
    let at = |field: &str| format!("resource_metadata.{field}");
    let strings = |field: &str, required: bool| -> Result<(), ConfigError> {
        match raw.get(field) {
            None if !required => Ok(()),
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(|i| i.as_str().is_some_and(|s| !s.is_empty())) =>
            {
                Ok(())
            }
            _ => Err(ConfigError::at(at(field), "must be a non-empty array of strings")),
        }
    };
    strings("authorization_servers", true)?;
    strings("scopes_supported", true)?;
    let resource = raw.get("resource").and_then(Value::as_str).unwrap_or("");
    let (authority, path) = jwks::split_url(resource)
        .ok()
        .filter(|(_, path)| !resource.contains(['#', '?']) && !path.contains("//"))
        .ok_or_else(|| {
            ConfigError::at(at("resource"), "must be the resource's https URL (RFC 8707), without query or fragment")
        })?;
    let scheme = if resource.starts_with("https://") { "https" } else { "http" };
    let suffix = path.trim_end_matches('/');
    let well_known = "/.well-known/oauth-protected-resource";
    let mut paths = vec![format!("{well_known}{suffix}")];
    if !suffix.is_empty() {
        paths.push(well_known.to_string());
    }
    Ok(ResourceMetadata {
        resource: resource.to_string(),
        url: format!("{scheme}://{authority}{well_known}{suffix}"),
        paths,
        document: Value::Object(raw.clone()).to_string(),
    })
}

/// Nonce keys are secrets: as long as a pseudonymization key.
const MIN_NONCE_KEY_BYTES: usize = 32;

fn compile_dpop(raw: Option<&config::DpopConfig>) -> Result<crate::dpop::DpopOptions, ConfigError> {
    let mut options = crate::dpop::DpopOptions::default();
    let Some(raw) = raw else { return Ok(options) };
    if let Some(names) = &raw.algorithms {
        if names.is_empty() {
            return Err(ConfigError::at("dpop.algorithms", "is empty: omit it for the defaults"));
        }
        options.algorithms = names
            .iter()
            .enumerate()
            .map(|(j, name)| {
                Alg::from_name(name).filter(|a| !a.is_symmetric()).ok_or_else(|| {
                    ConfigError::at(
                        format!("dpop.algorithms[{j}]"),
                        format!("{name:?} is not an asymmetric JWS algorithm"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
    }
    match raw.max_age_seconds {
        Some(v) if !(1..=600).contains(&v) => {
            return Err(ConfigError::at("dpop.max_age_seconds", "must be between 1 and 600"))
        }
        Some(v) => options.max_age_seconds = i64::try_from(v).unwrap_or(120),
        None => {}
    }
    let lifetime = match raw.nonce_lifetime_seconds {
        None => 60,
        Some(v) if (10..=3600).contains(&v) => i64::try_from(v).unwrap_or(60),
        Some(_) => return Err(ConfigError::at("dpop.nonce_lifetime_seconds", "must be between 10 and 3600")),
    };
    match (&raw.nonce_key, raw.use_dpop_nonce) {
        (Some(key), _) if key.len() < MIN_NONCE_KEY_BYTES => {
            return Err(ConfigError::at(
                "dpop.nonce_key",
                format!("must be at least {MIN_NONCE_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"),
            ))
        }
        (Some(key), true) => options.nonce = Some(crate::dpop::NonceKey::new(key.as_bytes(), lifetime)),
        (None, true) => {
            return Err(ConfigError::at(
                "dpop.nonce_key",
                "is required with use_dpop_nonce: the secret nonces are made with, the same on every instance",
            ))
        }
        (_, false) => {}
    }
    Ok(options)
}

fn compile_quarantine(raw: &config::QuarantineConfig) -> Result<crate::quarantine::Quarantine, ConfigError> {
    let within = |field: &str, value: Option<u64>, default: u64, max: u64| match value {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(_) => Err(ConfigError::at(format!("quarantine.{field}"), format!("must be between 1 and {max}"))),
    };
    let seconds = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let count = match &raw.count {
        None => crate::quarantine::DEFAULT_COUNT.to_vec(),
        Some(codes) if codes.is_empty() => {
            return Err(ConfigError::at("quarantine.count", "is empty: omit it for the default reasons"))
        }
        Some(codes) => codes
            .iter()
            .enumerate()
            .map(|(j, code)| {
                Reason::ALL.iter().copied().find(|r| r.code() == code).filter(|r| crate::quarantine::countable(*r)).ok_or_else(
                    || {
                        ConfigError::at(
                            format!("quarantine.count[{j}]"),
                            format!("{code:?} is not a reason given after a token verified (only those count: an unverified token names nobody)"),
                        )
                    },
                )
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(crate::quarantine::Quarantine {
        window_seconds: seconds(within("window_seconds", raw.window_seconds, 60, 3600)?),
        max_denials: u32::try_from(within("max_denials", raw.max_denials.map(u64::from), 5, 10_000)?).unwrap_or(5),
        cool_off_seconds: seconds(within("cool_off_seconds", raw.cool_off_seconds, 900, 86_400)?),
        count,
        release: raw.release.clone(),
        count_delegators: raw.count_delegators,
    })
}

fn compile_audit(
    raw: &config::AuditConfig,
    token_sources: &[TokenSource],
    forward_token: bool,
) -> Result<AuditSettings, ConfigError> {
    let prefix = &raw.header_prefix;
    let valid = prefix.len() >= 3 && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(ConfigError::at(
            "audit.header_prefix",
            format!("{prefix:?} must be at least 3 characters of a-z, 0-9 and '-', like \"x-agent-\""),
        ));
    }
    let headers = HeaderNames::with_prefix(prefix);
    // Client headers with the prefix are removed (after the token is read): the prefix must
    // not swallow ones the upstream is meant to get.
    let token_headers = token_sources.iter().filter(|_| forward_token).filter_map(|s| match s {
        TokenSource::Header { name, .. } => Some(name.as_str()),
        _ => None,
    });
    if let Some(taken) = [audit::REQUEST_ID, "cookie"].into_iter().chain(token_headers).find(|h| headers.owns(h)) {
        return Err(ConfigError::at(
            "audit.header_prefix",
            format!("{prefix:?} would remove the client's {taken:?} header"),
        ));
    }
    let pseudonymizer = match &raw.pseudonymize_key {
        None => None,
        Some(key) => Some(Pseudonymizer::new(key.as_bytes()).ok_or_else(|| {
            ConfigError::at(
                "audit.pseudonymize_key",
                format!("must be at least {MIN_PSEUDONYM_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"),
            )
        })?),
    };
    Ok(AuditSettings {
        headers,
        pseudonymizer,
        log_query: raw.log_query,
        filter_state: raw.filter_state,
        log_level: raw.log_level,
        log_arguments: raw.log_arguments.clone(),
    })
}

fn compile_provider(
    at: &str,
    raw: ProviderConfig,
    load: FileLoader<'_>,
    warnings: &mut Vec<String>,
) -> Result<Provider, ConfigError> {
    non_empty(&format!("{at}.name"), &raw.name)?;
    non_empty(&format!("{at}.issuer"), &raw.issuer)?;
    if raw.audiences.is_empty() {
        return Err(ConfigError::at(
            format!("{at}.audiences"),
            "at least one audience is required: tokens minted for other APIs must not be accepted here",
        ));
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
            ConfigError::at(
                format!("{at}.algorithms[{j}]"),
                format!("unsupported algorithm {name:?} (supported: {})", supported.join(", ")),
            )
        })?;
        if alg == Alg::Es384 && !cfg!(feature = "es384") {
            return Err(ConfigError::at(format!("{at}.algorithms[{j}]"), crate::keys::ES384_MISSING));
        }
        algorithms.push(alg);
    }
    if raw.clock_skew_seconds > config::MAX_CLOCK_SKEW_SECONDS {
        return Err(ConfigError::at(
            format!("{at}.clock_skew_seconds"),
            format!("must be at most {}", config::MAX_CLOCK_SKEW_SECONDS),
        ));
    }
    let (keys, remote) = compile_key_source(at, &raw, &algorithms, load, warnings)?;
    if let Some(max) = raw.max_lifetime_seconds {
        let limit =
            if raw.single_use { crate::replay::MAX_SINGLE_USE_LIFETIME_SECONDS } else { config::MAX_LIFETIME_SECONDS };
        if max == 0 || max > limit {
            let single_use = if raw.single_use { " with single_use" } else { "" };
            return Err(ConfigError::at(
                format!("{at}.max_lifetime_seconds"),
                format!("must be between 1 and {limit}{single_use}"),
            ));
        }
    }
    let token_types = match raw.token_types {
        Some(types) if types.is_empty() => {
            return Err(ConfigError::at(format!("{at}.token_types"), "is empty: omit it to accept any typ"))
        }
        Some(types) => Some(types.iter().map(|t| normalize_type(t)).collect()),
        None => None,
    };
    let single_use_ring = match (raw.single_use, raw.max_lifetime_seconds) {
        (false, _) => None,
        (true, Some(_)) => Some(crate::replay::RING),
        (true, None) => {
            return Err(ConfigError::at(
                format!("{at}.single_use"),
                "needs max_lifetime_seconds, so that remembered jtis can be forgotten when their tokens expire",
            ));
        }
    };
    let subjects = match raw.subjects {
        Some(subjects) if subjects.is_empty() => {
            return Err(ConfigError::at(format!("{at}.subjects"), "is empty: omit it to accept any subject"))
        }
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
        remote,
        clock_skew_seconds: raw.clock_skew_seconds,
        max_lifetime_seconds: raw.max_lifetime_seconds,
        token_types,
        subjects,
        single_use_ring,
        single_use_scope: raw.single_use_scope,
        require_dpop: raw.require_dpop,
        certificate_bound: raw.certificate_bound,
        transaction_tokens: raw.transaction_tokens,
        task_claim: raw.task_claim.filter(|name| name != "authorization_details"),
    })
}

/// Exactly one of `jwks`, `jwks_file`, `jwks_uri`, `discovery`: keys now, or where to fetch them.
fn compile_key_source(
    at: &str,
    raw: &ProviderConfig,
    algorithms: &[Alg],
    load: FileLoader<'_>,
    warnings: &mut Vec<String>,
) -> Result<(KeySet, Option<RemoteJwks>), ConfigError> {
    let given: Vec<&str> = [
        ("jwks", raw.jwks.is_some()),
        ("jwks_file", raw.jwks_file.is_some()),
        ("jwks_uri", raw.jwks_uri.is_some()),
        ("discovery", raw.discovery),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let remote = matches!(given.as_slice(), ["jwks_uri"] | ["discovery"]);
    if !remote && raw.cluster.is_some() {
        return Err(ConfigError::at(format!("{at}.cluster"), "is only used with jwks_uri or discovery"));
    }
    match given.as_slice() {
        ["jwks"] => {
            let jwks = raw.jwks.as_ref().map_or(&[][..], |j| &j.keys[..]);
            Ok((KeySet::fixed(compile_keys(&format!("{at}.jwks"), jwks, algorithms, None)?), None))
        }
        ["jwks_file"] => {
            let file = raw.jwks_file.as_deref().unwrap_or("");
            let file_at = format!("{at}.jwks_file");
            let text = load(file).map_err(|e| ConfigError::at(&file_at, e))?;
            let set: config::JwksConfig =
                serde_json::from_str(&text).map_err(|e| ConfigError::at(&file_at, format!("{file}: {e}")))?;
            // A verbatim copy of the provider's JWKS loads as a fetched one would: keys this
            // policy cannot use are skipped (and said so), not refused.
            let keys = compile_keys(&format!("{file_at}({file})"), &set.keys, algorithms, Some(warnings))?;
            Ok((KeySet::fixed(keys), None))
        }
        ["jwks_uri"] | ["discovery"] => Ok((KeySet::default(), Some(compile_remote(at, raw, algorithms)?))),
        [] => Err(ConfigError::at(at, "needs the provider's keys: jwks (inline), jwks_file, jwks_uri or discovery")),
        several => Err(ConfigError::at(
            format!("{at}.{}", several.get(1).unwrap_or(&"jwks")),
            format!("give one of jwks, jwks_file, jwks_uri or discovery, not {}", several.join(" and ")),
        )),
    }
}

fn compile_remote(at: &str, raw: &ProviderConfig, algorithms: &[Alg]) -> Result<RemoteJwks, ConfigError> {
    if let Some(uri) = &raw.jwks_uri {
        jwks::split_url(uri).map_err(|e| ConfigError::at(format!("{at}.jwks_uri"), e))?;
    } else {
        jwks::split_url(&raw.issuer)
            .map_err(|e| ConfigError::at(format!("{at}.discovery"), format!("needs an http(s) issuer: {e}")))?;
    }
    let cluster = match raw.cluster.as_deref() {
        Some(c) if !c.trim().is_empty() => c.to_string(),
        _ => return Err(ConfigError::at(
            format!("{at}.cluster"),
            "is required with jwks_uri or discovery: the upstream (Envoy cluster) that reaches the identity provider",
        )),
    };
    let f = &raw.jwks_fetch;
    let fetch_at = format!("{at}.jwks_fetch");
    let at_least = |name: &str, value: Option<u64>, default: u64, min: u64| match value {
        Some(v) if v < min => Err(ConfigError::at(format!("{fetch_at}.{name}"), format!("must be at least {min}"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let seconds = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let refresh = at_least("refresh_seconds", f.refresh_seconds, jwks::DEFAULT_REFRESH_SECONDS, 1)?;
    let max_stale = at_least("max_stale_seconds", f.max_stale_seconds, jwks::DEFAULT_MAX_STALE_SECONDS, 1)?;
    if max_stale <= refresh {
        return Err(ConfigError::at(
            format!("{fetch_at}.max_stale_seconds"),
            format!("must be longer than refresh_seconds ({refresh}), or keys would expire before they are refreshed"),
        ));
    }
    let max_bytes = match f.max_bytes {
        Some(v) if !(1024..=config::MAX_JWKS_BYTES).contains(&v) => {
            return Err(ConfigError::at(
                format!("{fetch_at}.max_bytes"),
                format!("must be between 1024 and {}", config::MAX_JWKS_BYTES),
            ))
        }
        Some(v) => v,
        None => jwks::DEFAULT_MAX_BYTES,
    };
    Ok(RemoteJwks {
        issuer: raw.issuer.clone(),
        algorithms: algorithms.to_vec(),
        jwks_uri: raw.jwks_uri.clone(),
        store_key: jwks::store_key(&raw.name, &raw.issuer, raw.jwks_uri.as_deref(), &cluster),
        cluster,
        refresh_seconds: seconds(refresh),
        max_stale_seconds: seconds(max_stale),
        min_refetch_seconds: seconds(at_least(
            "min_refetch_seconds",
            f.min_refetch_seconds,
            jwks::DEFAULT_MIN_REFETCH_SECONDS,
            1,
        )?),
        timeout_ms: at_least("timeout_ms", f.timeout_ms, jwks::DEFAULT_TIMEOUT_MS, 100)?,
        max_bytes,
        wait_ms: at_least("wait_ms", f.wait_ms, jwks::DEFAULT_WAIT_MS, 0)?,
    })
}

/// The keys of a JWKS. With `skipped` (a copy of a provider's document), a key this policy
/// cannot use is skipped with a warning instead of refusing the policy.
fn compile_keys(
    at: &str,
    jwks: &[Value],
    algorithms: &[Alg],
    mut skipped: Option<&mut Vec<String>>,
) -> Result<Vec<Key>, ConfigError> {
    let mut keys: Vec<Key> = Vec::with_capacity(jwks.len());
    for (k, jwk) in jwks.iter().enumerate() {
        let key_at = format!("{at}.keys[{k}]");
        let key = match (parse_jwk(jwk, algorithms), skipped.as_deref_mut()) {
            (Ok(Some(key)), _) => key,
            (Ok(None), _) => continue,
            (Err(e), Some(warnings)) => {
                warnings.push(format!("{key_at}: skipped: {e}"));
                continue;
            }
            (Err(e), None) => return Err(ConfigError::at(&key_at, e)),
        };
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

fn patterns(at: &str, raw: &[String]) -> Result<Vec<Pattern>, ConfigError> {
    raw.iter().enumerate().map(|(j, p)| Pattern::new(p).map_err(|e| ConfigError::at(format!("{at}[{j}]"), e))).collect()
}

fn optional_patterns(at: &str, raw: &Option<Vec<String>>) -> Result<Option<Vec<Pattern>>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(list) if list.is_empty() => Err(ConfigError::at(at, "is empty: omit it to allow any")),
        Some(list) => patterns(at, list).map(Some),
    }
}

fn scope_list(at: &str, scopes: &[String]) -> Result<(), ConfigError> {
    for (j, scope) in scopes.iter().enumerate() {
        if scope.is_empty() || scope.contains(char::is_whitespace) {
            return Err(ConfigError::at(
                format!("{at}[{j}]"),
                format!("{scope:?} is not a scope (non-empty, no spaces)"),
            ));
        }
    }
    Ok(())
}

fn compile_rule(at: &str, raw: RuleConfig) -> Result<Rule, ConfigError> {
    non_empty(&format!("{at}.name"), &raw.name)?;
    let methods = match raw.matcher.methods {
        None => None,
        Some(methods) if methods.is_empty() => {
            return Err(ConfigError::at(
                format!("{at}.match.methods"),
                "is empty: list methods, or omit the field to match any method",
            ));
        }
        Some(methods) => {
            let mut upper = Vec::with_capacity(methods.len());
            for (j, method) in methods.iter().enumerate() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(ConfigError::at(
                        format!("{at}.match.methods[{j}]"),
                        format!("{method:?} is not an HTTP method"),
                    ));
                }
                upper.push(method.to_ascii_uppercase());
            }
            Some(upper)
        }
    };
    let hosts = raw.matcher.hosts.map(|hosts| hosts.iter().map(|h| h.to_ascii_lowercase()).collect::<Vec<_>>());
    let hosts = optional_patterns(&format!("{at}.match.hosts"), &hosts)?;
    let require = raw.require;
    scope_list(&format!("{at}.require.scopes"), &require.scopes)?;
    scope_list(&format!("{at}.require.any_scopes"), &require.any_scopes)?;
    let task = match require.task {
        None => None,
        Some(task) => {
            non_empty(&format!("{at}.require.task.type"), &task.kind)?;
            if let Some(identifier) = &task.identifier {
                let available = raw.matcher.path.as_deref().map(param_names).unwrap_or_default();
                for name in param_names(identifier) {
                    let argument = name.strip_prefix("args.").filter(|a| !a.is_empty() && raw.matcher.mcp.is_some());
                    if argument.is_none() && !available.contains(&name) {
                        return Err(ConfigError::at(
                            format!("{at}.require.task.identifier"),
                            format!(
                                "{{{name}}} is not a parameter of match.path ({}){}",
                                raw.matcher.path.as_deref().unwrap_or("none"),
                                if name.starts_with("args.") { " ({args.NAME} needs match.mcp)" } else { "" }
                            ),
                        ));
                    }
                }
            }
            Some(TaskRequirement {
                kind: task.kind,
                actions: task.actions,
                locations: task.locations.unwrap_or_default(),
                datatypes: task.datatypes.unwrap_or_default(),
                identifier: task.identifier,
            })
        }
    };
    let approval = match require.approval {
        None => None,
        Some(approval) if approval.acr_values.is_empty() => {
            return Err(ConfigError::at(
                format!("{at}.require.approval.acr_values"),
                "list the acr values that prove a human approved",
            ));
        }
        Some(approval) => {
            for (j, acr) in approval.acr_values.iter().enumerate() {
                if acr.is_empty() || acr.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
                    return Err(ConfigError::at(
                        format!("{at}.require.approval.acr_values[{j}]"),
                        "must be non-empty, without spaces or quotes",
                    ));
                }
            }
            Some(Approval { acr_values: approval.acr_values, max_age_seconds: approval.max_age_seconds })
        }
    };
    let conditions = |field: &str,
                      key: &str,
                      raw: &Option<Vec<config::ConditionConfig>>|
     -> Result<Vec<Condition>, ConfigError> {
        match raw {
            None => Ok(Vec::new()),
            Some(list) if list.is_empty() => Err(ConfigError::at(format!("{at}.require.{field}"), "is empty: omit it")),
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    Condition::compile(c, key).map_err(|e| ConfigError::at(format!("{at}.require.{field}[{j}]"), e))
                })
                .collect(),
        }
    };
    let headers = conditions("headers", "name", &require.headers)?;
    let claims = conditions("claims", "path", &require.claims)?;
    let arguments = conditions("arguments", "path", &require.arguments)?;
    if !arguments.is_empty() && raw.matcher.mcp.is_none() {
        return Err(ConfigError::at(
            format!("{at}.require.arguments"),
            "needs match.mcp: only MCP calls have arguments",
        ));
    }
    let mcp = raw.matcher.mcp.as_ref().map(|m| compile_mcp(&format!("{at}.match.mcp"), m)).transpose()?;
    let transaction_token = match &require.transaction_token {
        None => None,
        Some(txn) => {
            scope_list(&format!("{at}.require.transaction_token.scopes"), &txn.scopes)?;
            let claims = txn
                .claims
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    Condition::compile(c, "path")
                        .map_err(|e| ConfigError::at(format!("{at}.require.transaction_token.claims[{j}]"), e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some((txn.scopes.clone(), claims))
        }
    };
    let source_cidrs = match &require.source_cidrs {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ConfigError::at(format!("{at}.require.source_cidrs"), "is empty: omit it to allow any source"))
        }
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(j, c)| parse_cidr(c).map_err(|e| ConfigError::at(format!("{at}.require.source_cidrs[{j}]"), e)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let time = match &require.time {
        None => None,
        Some(window) => {
            Some(TimeWindow::compile(window).map_err(|e| ConfigError::at(format!("{at}.require.time"), e))?)
        }
    };
    Ok(Rule {
        name: raw.name,
        methods,
        hosts,
        scopes: require.scopes,
        any_scopes: require.any_scopes,
        task,
        agents: optional_patterns(&format!("{at}.require.agents"), &require.agents)?,
        max_delegation_depth: require.max_delegation_depth,
        actors: optional_patterns(&format!("{at}.require.actors"), &require.actors)?,
        approval,
        mode: raw.mode,
        source_cidrs,
        headers,
        time,
        claims,
        rate_limit: rate_limit(&format!("{at}.rate_limit"), raw.rate_limit.as_ref())?,
        bind_mtls_peer: require.bind_mtls_peer,
        mcp,
        arguments,
        max_recent_denials: require.max_recent_denials,
        dpop: require.dpop,
        transaction_token,
    })
}

/// `match.mcp`: a method, and at most one name of what it acts on, which must be the one
/// that method takes.
fn compile_mcp(at: &str, raw: &config::McpMatchConfig) -> Result<McpMatch, ConfigError> {
    let named: Vec<(&str, &str, &String)> = [
        ("tool", "tools/call", &raw.tool),
        ("prompt", "prompts/get", &raw.prompt),
        ("resource", "resources/read", &raw.resource),
    ]
    .into_iter()
    .filter_map(|(field, method, value)| value.as_ref().map(|v| (field, method, v)))
    .collect();
    let (method, name) = match (named.as_slice(), &raw.method) {
        ([], Some(method)) => (method.as_str(), None),
        ([], None) => return Err(ConfigError::at(at, "give the method (and for tools/call a tool)")),
        ([(field, implied, name)], method) => {
            if method.as_deref().is_some_and(|m| m != *implied) {
                return Err(ConfigError::at(format!("{at}.{field}"), format!("goes with method {implied:?}")));
            }
            (*implied, Some((*field, name.as_str())))
        }
        _ => return Err(ConfigError::at(at, "give at most one of tool, prompt, resource")),
    };
    let pattern = |field: &str, text: &str| Pattern::new(text).map_err(|e| ConfigError::at(format!("{at}.{field}"), e));
    Ok(McpMatch {
        method: pattern("method", method)?,
        name: name.map(|(field, text)| pattern(field, text)).transpose()?,
    })
}

fn non_empty(at: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::at(at, "must not be empty"));
    }
    Ok(())
}
