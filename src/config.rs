//! The policy as users write it (JSON). Parsing only: every field is typed, unknown fields
//! are rejected, and an error names the JSON path. [`crate::policy`] compiles it.

use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// A policy error a user can act on: where in the JSON, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path such as `rules[0].match.path`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "policy: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Denied requests are refused.
    #[default]
    Enforce,
    /// Decisions are computed, logged and sent upstream in the audit headers, but nothing is
    /// blocked: how a new policy is rolled out safely.
    DryRun,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub mode: Mode,
    pub providers: Vec<ProviderConfig>,
    pub rules: Vec<RuleConfig>,
    /// Where tokens are looked for; default: `Authorization: Bearer`.
    pub token_sources: Option<Vec<TokenSourceConfig>>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The kill switch: agents, actors and tokens refused at once.
    #[serde(default)]
    pub revoked: RevokedConfig,
    /// A limit per agent over all its requests.
    pub rate_limit: Option<RateLimitConfig>,
    /// Send the agent's token on to the upstream. Default: credentials stay at the gate.
    #[serde(default)]
    pub forward_token: bool,
    /// What the upstream, the audit log and the access log are told.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `;` parameters in path segments (`/a;v=1/b`): `refuse` (400, the default) or
    /// `ignore` (matched as `/a/b`, forwarded as sent).
    #[serde(default)]
    pub path_parameters: crate::canonical::PathParameters,
    /// RFC 9728 protected-resource metadata (`resource`, `authorization_servers`,
    /// `scopes_supported`, and any other field of RFC 9728): served at
    /// `/.well-known/oauth-protected-resource` (and its path-inserted form), named in every
    /// challenge, and tokens for MCP rules must have `resource` as audience (RFC 8707).
    pub resource_metadata: Option<serde_json::Map<String, Value>>,
    /// Cut off an agent that collects too many denials (behavioural quarantine).
    pub quarantine: Option<QuarantineConfig>,
    /// This gate is a fleet's front tier: it verifies and decides nothing, and only sets a
    /// header naming the token's acting agent (read without verification) for the proxy's
    /// consistent-hash load balancing, so that each agent's requests reach the back-tier
    /// instance that holds its state. The back tier decides.
    pub front_tier: Option<FrontTierConfig>,
    /// How DPoP proofs (RFC 9449) are checked. Tokens bound to a key (`cnf.jkt`) are always
    /// checked; this only sets the accepted algorithms and the proof's age.
    pub dpop: Option<DpopConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TransactionTokenConfig {
    /// Every one of these must be in the Txn-Token's `scope`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Conditions on the Txn-Token's claims (`path`, dot-separated).
    #[serde(default)]
    pub claims: Vec<ConditionConfig>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FrontTierConfig {
    /// The header set for the hash policy (default `x-agent-route`); a client's own is removed.
    pub routing_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DpopConfig {
    /// Proof algorithms (default ES256, EdDSA, PS256, RS256; never HMAC or none).
    pub algorithms: Option<Vec<String>>,
    /// The oldest accepted proof `iat`, in seconds (default 120, at most 600).
    pub max_age_seconds: Option<u64>,
    /// Server nonces (RFC 9449 §9): proofs must carry a current `DPoP-Nonce` from the gate;
    /// one without gets 401 `use_dpop_nonce` with a fresh nonce. Needs `nonce_key`.
    #[serde(default)]
    pub use_dpop_nonce: bool,
    /// A secret of at least 32 bytes that nonces are made with; every instance of a
    /// deployment given the same key accepts the others' nonces.
    pub nonce_key: Option<String>,
    /// How long one nonce is issued for (default 60, 10 to 3600): each is accepted for one to
    /// two of these.
    pub nonce_lifetime_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// The window denials are counted in (default 60, at most 3600).
    pub window_seconds: Option<u64>,
    /// Counted denials within the window that quarantine the agent (default 5).
    pub max_denials: Option<u32>,
    /// How long a quarantine lasts (default 900, at most 86400).
    pub cool_off_seconds: Option<u64>,
    /// The reason codes that count (default: no_matching_rule, insufficient_scope,
    /// task_mismatch, argument_mismatch, agent_not_allowed, delegation_not_allowed,
    /// rate_limited, replayed, non_canonical_path, mcp_parse_error).
    pub count: Option<Vec<String>>,
    /// Agents released from their quarantine at once (one begun under an earlier policy).
    #[serde(default)]
    pub release: Vec<String>,
    /// Denials of a delegated token count against its subject too (default: only the actor).
    #[serde(default)]
    pub count_delegators: bool,
}

/// Where single-use `jti`s are remembered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SingleUseScope {
    /// Once across the gateway's workers: refused on a host without shared data.
    #[default]
    Gateway,
    /// Once per worker VM: a token may be used once on each worker. Only where the host has
    /// no shared data and that is accepted knowingly.
    Worker,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The prefix of every header agentgate sets upstream; client headers with it are removed.
    #[serde(default = "default_header_prefix")]
    pub header_prefix: String,
    /// A secret of at least 32 bytes: subject identifiers (agent, on-behalf-of, actors) in
    /// headers and records become HMAC-SHA256 pseudonyms.
    pub pseudonymize_key: Option<String>,
    /// Log the query string too (token parameters removed).
    #[serde(default)]
    pub log_query: bool,
    /// Set decision, reason, rule and agent as filter state (`wasm.agentgate.*`) for access logs.
    #[serde(default = "default_true")]
    pub filter_state: bool,
    /// The level of the audit record in the proxy's log (default `info`). APISIX logs only
    /// `warn` and above by default: raise it there, or lower APISIX's `error_log_level`.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Argument paths (dot-separated) of MCP calls whose values go into the audit record;
    /// by default no argument value is logged.
    #[serde(default)]
    pub log_arguments: Vec<String>,
}

/// A proxy log level (proxy-wasm's, as every host maps it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
    Critical,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            header_prefix: default_header_prefix(),
            pseudonymize_key: None,
            log_query: false,
            filter_state: true,
            log_level: LogLevel::default(),
            log_arguments: Vec::new(),
        }
    }
}

fn default_header_prefix() -> String {
    crate::audit::DEFAULT_HEADER_PREFIX.to_string()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests: u32,
    pub per_seconds: u32,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokedConfig {
    /// Identity patterns, revoked wherever the identity appears: `sub` or any actor of the
    /// delegation chain (`act`).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// The same as `subjects` (both lists apply to every role); kept for policies that list
    /// agents seen as actors here.
    #[serde(default)]
    pub actors: Vec<String>,
    /// Exact `jti`s.
    #[serde(default)]
    pub jtis: Vec<String>,
}

/// One place a token may come from: exactly one of `header`, `cookie`, `query`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenSourceConfig {
    pub header: Option<String>,
    /// With `header`: the scheme before the token, compared case-insensitively (`"Bearer "`).
    pub prefix: Option<String>,
    pub cookie: Option<String>,
    pub query: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_token_bytes: Option<usize>,
    pub max_json_depth: Option<usize>,
    pub max_claims: Option<usize>,
    /// Verified tokens remembered per worker, so a reused token costs no signature check.
    pub token_cache_entries: Option<usize>,
    /// Single-use `jti`s remembered by hosts without shared storage.
    pub single_use_entries: Option<usize>,
    /// The largest request body read for an MCP rule (default 1048576); larger: 413.
    pub max_body_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    pub jwks: Option<JwksConfig>,
    /// A JWKS file, for hosts that can read files (the CLI); inside a gateway, inline `jwks`.
    pub jwks_file: Option<String>,
    /// The identity provider's JWKS URL: keys fetched, refreshed and shared by the gateway.
    pub jwks_uri: Option<String>,
    /// Find the JWKS URL from `{issuer}/.well-known/openid-configuration` (or RFC 8414's
    /// `oauth-authorization-server`).
    #[serde(default)]
    pub discovery: bool,
    /// The upstream that reaches the identity provider: an Envoy cluster name (host:port on
    /// hosts that take one). Needed with `jwks_uri` or `discovery`.
    pub cluster: Option<String>,
    /// How remote keys are fetched and kept.
    #[serde(default)]
    pub jwks_fetch: JwksFetchConfig,
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// Longest accepted token lifetime (`exp - iat`, and `exp - now`), at most 7 days.
    pub max_lifetime_seconds: Option<u64>,
    /// Allowed JOSE `typ` values, e.g. `["at+jwt"]` (RFC 9068) or `["JWT", "JOSE"]` (JWT-SVID).
    pub token_types: Option<Vec<String>>,
    /// Patterns the `sub` must match, e.g. `spiffe://corp.example/agent/*`.
    pub subjects: Option<Vec<String>>,
    /// Accept each `jti` once within its token's lifetime (at most 3600 s).
    #[serde(default)]
    pub single_use: bool,
    /// This provider is a transaction-token service (draft-ietf-oauth-transaction-tokens): its
    /// tokens (`typ` `txntoken+jwt`) come in the `Txn-Token` header, never as access tokens.
    #[serde(default)]
    pub transaction_tokens: bool,
    /// Accept RFC 8705 certificate-bound tokens (`cnf["x5t#S256"]`): hosts then read the
    /// client certificate's SHA-256 on every request. Without it such a token is refused.
    #[serde(default)]
    pub certificate_bound: bool,
    /// Every token of this provider must be DPoP-bound (`cnf.jkt`) and sent with a proof.
    #[serde(default)]
    pub require_dpop: bool,
    /// `gateway` (default): once across all workers, or the policy is refused on a host
    /// without shared data; `worker`: accept once per worker VM there.
    #[serde(default)]
    pub single_use_scope: SingleUseScope,
    /// The claim holding RFC 9396 task entries, for issuers that do not use `authorization_details`.
    pub task_claim: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JwksFetchConfig {
    /// Refetch period (default 300).
    pub refresh_seconds: Option<u64>,
    /// While the identity provider fails, the last good keys are used this long after they
    /// were fetched, then tokens of this provider get 401 (default 86400).
    pub max_stale_seconds: Option<u64>,
    /// A token with an unknown `kid` triggers a refetch at most this often (default 30).
    pub min_refetch_seconds: Option<u64>,
    /// Per request to the identity provider (default 3000).
    pub timeout_ms: Option<u64>,
    /// Larger responses are refused (default 262144, at most 4194304).
    pub max_bytes: Option<usize>,
    /// How long a request waits for keys being fetched, at start or after a rotation (default 2000).
    pub wait_ms: Option<u64>,
}

pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 30;
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 300;
/// The longest `max_lifetime_seconds`: agent credentials are short-lived.
pub const MAX_LIFETIME_SECONDS: u64 = 7 * 86_400;
/// The largest key-set or discovery document a provider may answer with.
pub const MAX_JWKS_BYTES: usize = 4 * 1024 * 1024;

fn default_clock_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

/// An inline JSON Web Key Set (RFC 7517 section 5). Keys stay raw here: each is checked and
/// decoded, with its own path in errors, when the policy is compiled.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    pub keys: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    #[serde(default)]
    pub require: RequireConfig,
    /// `dry_run` here rolls out this one rule without blocking; absent, the policy's mode.
    pub mode: Option<Mode>,
    /// A limit per agent on the requests this rule allows.
    pub rate_limit: Option<RateLimitConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// HTTP methods; absent means any method.
    pub methods: Option<Vec<String>>,
    /// Host patterns (`api.example.com`, `*.example.com`), matched without the port.
    pub hosts: Option<Vec<String>>,
    /// Path template such as `/invoices/{id}` or `/files/{*rest}`; absent means any path.
    pub path: Option<String>,
    /// An MCP message in the body (a POST of JSON-RPC 2.0): its method and what it acts on.
    pub mcp: Option<McpMatchConfig>,
}

/// `match.mcp`: `{"method": "tools/call", "tool": "pay_invoice"}`. Names take `*` patterns.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct McpMatchConfig {
    /// The JSON-RPC method (`tools/call`, `tools/list`, `prompts/get`, `resources/read`, ...);
    /// default: the one `tool`, `prompt` or `resource` implies.
    pub method: Option<String>,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
    /// `params.name` of a `prompts/get`.
    pub prompt: Option<String>,
    /// `params.uri` of a `resources/read`.
    pub resource: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RequireConfig {
    /// Every one of these must be granted by the token's `scope` (or `scp`) claim.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// At least one of these must be granted.
    #[serde(default)]
    pub any_scopes: Vec<String>,
    /// An RFC 9396 `authorization_details` entry covering this operation.
    pub task: Option<TaskConfig>,
    /// Patterns the agent (the current actor of a delegated token, else `sub`) must match.
    pub agents: Option<Vec<String>>,
    /// Most `act` levels allowed (0: no delegation).
    pub max_delegation_depth: Option<usize>,
    /// Patterns the current actor of a delegated token must match.
    pub actors: Option<Vec<String>>,
    /// Human approval (RFC 9470 step-up).
    pub approval: Option<ApprovalConfig>,
    /// The client address must be in one of these networks.
    pub source_cidrs: Option<Vec<String>>,
    /// Conditions on request headers (`name`).
    pub headers: Option<Vec<ConditionConfig>>,
    /// UTC weekdays and hours when the rule allows.
    pub time: Option<TimeWindowConfig>,
    /// Conditions on claims (`path`, dot-separated), e.g. `trust_score >= 0.7`.
    pub claims: Option<Vec<ConditionConfig>>,
    /// The acting agent must be the mTLS peer: its certificate's URI SAN (a SPIFFE ID).
    #[serde(default)]
    pub bind_mtls_peer: bool,
    /// The token must be DPoP-bound and come with a valid proof (RFC 9449).
    #[serde(default)]
    pub dpop: bool,
    /// A valid `Txn-Token` from a transaction-token provider must come along, with these
    /// scopes and conditions on its claims (`tctx.*`, `rctx.*`, `req_wl`, ...).
    pub transaction_token: Option<TransactionTokenConfig>,
    /// Refuse an agent denied more than this many times in the quarantine window (needs
    /// `quarantine`): risky operations are not for an agent that just strayed.
    pub max_recent_denials: Option<u32>,
    /// Conditions on an MCP call's `params.arguments` (`path`, dot-separated), e.g.
    /// `{"path": "amount", "lte": 500}`. Only with `match.mcp`.
    pub arguments: Option<Vec<ConditionConfig>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub name: Option<String>,
    pub path: Option<String>,
    pub present: Option<bool>,
    pub equals: Option<Value>,
    #[serde(rename = "in")]
    pub one_of: Option<Vec<Value>>,
    pub gte: Option<f64>,
    pub lte: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TimeWindowConfig {
    /// `mon` … `sun`; absent: every day.
    pub days: Option<Vec<String>>,
    /// Inclusive, 0–23 (default 0).
    pub from_hour: Option<u8>,
    /// Exclusive, 1–24 (default 24); before `from_hour` for an overnight window.
    pub to_hour: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub actions: Vec<String>,
    pub locations: Option<Vec<String>>,
    pub datatypes: Option<Vec<String>>,
    /// The entry's `identifier`, with `{param}` bound to the request path (`"{id}"`) or, for
    /// MCP rules, `{args.NAME}` to an argument of the call (`"{args.invoice_id}"`).
    pub identifier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalConfig {
    pub acr_values: Vec<String>,
    pub max_age_seconds: Option<u64>,
}

/// The JSON Schema of the policy, generated from these types (committed as
/// `docs/policy.schema.json`, for editors and CI validators).
#[cfg(feature = "schema")]
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PolicyConfig)).unwrap_or_default()
}

/// Parses a policy document, reporting the JSON path of the first error.
pub fn parse(json: &str) -> Result<PolicyConfig, ConfigError> {
    serde_json::from_str(json).map_err(|err| {
        let message = err.to_string();
        if err.is_syntax() || err.is_eof() {
            return ConfigError::at("", message);
        }
        // The error's position is where serde_json stopped: the JSON path to it is where the
        // user must look. (serde_path_to_error would track it too, at 100 KiB of wasm.)
        let path = path_at(json, err.line(), err.column());
        ConfigError::at(path, strip_position(&message))
    })
}

/// One open container while scanning.
enum Frame {
    /// The key being read or whose value is being read; `in_value` after its `:`.
    Object {
        key: Option<String>,
        in_value: bool,
    },
    Array {
        index: usize,
    },
}

/// The JSON path (`rules[0].match.path`) of the value serde_json stopped after, at `line` and
/// `column` (1-based, as it reports them) in `json`. A missing field is reported after its
/// object's `}`: the path is then the object's own.
fn path_at(json: &str, line: usize, column: usize) -> String {
    let line_start: usize = json.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    let end = line_start.saturating_add(column).min(json.len());
    let bytes = json.as_bytes().get(..end).unwrap_or_default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'{' => stack.push(Frame::Object { key: None, in_value: false }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b':' => {
                if let Some(Frame::Object { in_value, .. }) = stack.last_mut() {
                    *in_value = true;
                }
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, in_value }) => {
                    *key = None;
                    *in_value = false;
                }
                None => {}
            },
            b'"' => {
                let start = i + 1;
                i = start;
                while let Some(&b) = bytes.get(i) {
                    match b {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                if let Some(Frame::Object { key, in_value: false }) = stack.last_mut() {
                    *key =
                        Some(String::from_utf8_lossy(bytes.get(start..i.min(bytes.len())).unwrap_or_default()).into());
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
            Frame::Object { key: None, .. } => {}
        }
    }
    path
}

/// serde_json appends " at line L column C" to data errors; with the JSON path given the
/// position only adds noise, except for syntax errors where it is all there is.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) if !message.starts_with("expected") && !message.starts_with("EOF") => {
            message.get(..at).unwrap_or(message).to_string()
        }
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match parse(json) {
            Ok(_) => String::from("<accepted>"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let e = err(r#"{"providers": [], "rules": [{"name": "r", "match": {"paths": "/x"}}]}"#);
        assert_eq!(e, "rules[0].match.paths: unknown field `paths`, expected one of `methods`, `hosts`, `path`, `mcp`");
    }

    #[test]
    fn invalid_mode_names_the_field() {
        let e = err(r#"{"mode": "audit", "providers": [], "rules": []}"#);
        assert!(e.starts_with("mode: unknown variant `audit`"), "{e}");
    }

    #[test]
    fn missing_required_field_is_reported() {
        let e = err(r#"{"providers": []}"#);
        assert_eq!(e, "policy: missing field `rules`");
    }

    #[test]
    fn nested_errors_name_their_path_in_pretty_printed_json() {
        let provider = r#"{"name": "a", "issuer": "i\\\"x", "audiences": ["x"], "algorithms": ["ES256", 5]}"#;
        let e = err(&format!("{{\n  \"providers\": [\n    {provider}\n  ],\n  \"rules\": []\n}}"));
        assert_eq!(e, "providers[0].algorithms[1]: invalid type: integer `5`, expected a string");
        let e =
            err(r#"{"providers": [], "rules": [{"name": "r", "match": {}, "require": {"task": {"actions": []}}}]}"#);
        assert_eq!(e, "rules[0].require.task: missing field `type`");
        let e = err(r#"{"providers": [], "rules": [{"name": "r", "match": {"methods": "GET"}}]}"#);
        assert_eq!(e, "rules[0].match.methods: invalid type: string \"GET\", expected a sequence");
    }

    #[test]
    fn syntax_error_keeps_its_position() {
        let e = err("{\"providers\": [,]}");
        assert!(e.contains("line 1 column"), "{e}");
    }

    #[test]
    fn mode_defaults_to_enforce_and_skew_to_30s() {
        let p = parse(
            r#"{"providers": [{"name": "a", "issuer": "i", "audiences": ["x"], "algorithms": ["ES256"], "jwks": {"keys": []}}], "rules": []}"#,
        );
        let p = p.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.providers.first().map(|p| p.clock_skew_seconds), Some(30));
    }
}
