//! The one closed set of reasons a request is denied, and the one table that maps each to
//! its HTTP status, RFC 6750 error code, client-facing description, metric and audit code.
//! Adding a reason is one row in the `reasons!` table.

const INVALID_TOKEN: &str = "invalid_token";
const INVALID_REQUEST: &str = "invalid_request";
const INSUFFICIENT_SCOPE: &str = "insufficient_scope";
const TOKEN_INVALID: &str = "the access token is invalid";
const NOT_PERMITTED: &str = "the access token does not permit this request";
const NOT_CANONICAL: &str = "the request is not in canonical form";

/// One row of the reason table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonSpec {
    /// Stable snake_case identifier: audit records, metrics, CLI output.
    pub code: &'static str,
    pub status: u16,
    /// RFC 6750 `error` attribute; `None` for a request that carried no credentials at all.
    pub error: Option<&'static str>,
    /// Short `error_description` sent to the client. Deliberately coarse: the precise reason
    /// stays in the audit record so a probing client learns nothing useful.
    pub description: &'static str,
}

/// Declares the enum, [`Reason::ALL`] and [`Reason::spec`] from one table, so a reason
/// cannot exist without its row or be missing from `ALL` (and so from the counters).
macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident => $code:literal, $status:literal, $error:expr, $description:expr;)*) => {
        /// Why a request was denied. The `code` of each reason is what audit records, metrics
        /// and `agentgate eval` report; clients only ever see the coarse RFC 6750 error.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, for defining metrics up front.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            pub const fn spec(self) -> ReasonSpec {
                match self {
                    $(Reason::$name => ReasonSpec { code: $code, status: $status, error: $error, description: $description },)*
                }
            }
        }
    };
}

reasons! {
    MissingToken => "missing_token", 401, None, "a bearer token is required";
    MultipleTokens => "multiple_tokens", 400, Some(INVALID_REQUEST), "more than one token was sent";
    TokenTooLarge => "token_too_large", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    Malformed => "malformed", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    UnknownIssuer => "unknown_issuer", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    UnknownKid => "unknown_kid", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// Fail closed: the provider's keys could not be fetched, or are older than max_stale_seconds.
    KeysUnavailable => "keys_unavailable", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    AlgNotAllowed => "alg_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    BadSignature => "bad_signature", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// Fail closed: the host's crypto, which the probe found sound, failed to answer.
    CryptoUnavailable => "crypto_unavailable", 503, None, "the gateway cannot verify tokens right now";
    MissingExp => "missing_exp", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// Telling a legitimate agent its token expired lets it refresh; it tells an attacker nothing.
    Expired => "expired", 401, Some(INVALID_TOKEN), "the access token expired";
    NotYetValid => "not_yet_valid", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    AudienceMismatch => "audience_mismatch", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    LifetimeTooLong => "lifetime_too_long", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    TypeNotAllowed => "type_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    SubjectNotAllowed => "subject_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    MissingJti => "missing_jti", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// The provider or rule wants DPoP-bound tokens (RFC 9449), and this one is not, or came
    /// without the DPoP scheme.
    DpopRequired => "dpop_required", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// The DPoP proof fails a check of RFC 9449 §4.3 (the audit record's `detail` says which).
    DpopProofInvalid => "dpop_proof_invalid", 401, Some("invalid_dpop_proof"), "the DPoP proof is invalid";
    /// The gate wants server nonces (`dpop.use_dpop_nonce`) and the proof carries no current
    /// one: the answer brings a fresh `DPoP-Nonce` to retry with (RFC 9449 §9).
    DpopNonceRequired => "dpop_nonce_required", 401, Some("use_dpop_nonce"), "a DPoP nonce is required";
    /// A DPoP proof presented again.
    DpopReplayed => "dpop_replayed", 401, Some("invalid_dpop_proof"), "the DPoP proof is invalid";
    /// The rule wants a valid Txn-Token (with its scopes and claims) alongside, and there is
    /// none, or it fails (`detail` says how).
    TransactionTokenRequired => "transaction_token_required", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    /// RFC 8705: a certificate-bound token on a connection without that client certificate.
    CertificateMismatch => "certificate_mismatch", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// A DPoP-bound token sent as Bearer, an unbound one sent as DPoP, or a proof by another
    /// key than the token's `cnf.jkt`.
    DpopBindingMismatch => "dpop_binding_mismatch", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    Replayed => "replayed", 401, Some(INVALID_TOKEN), TOKEN_INVALID;
    /// Fail closed: without a working replay store, single-use tokens cannot be accepted.
    ReplayStoreUnavailable => "replay_store_unavailable", 503, None, "the gateway cannot accept single-use tokens right now";
    /// Another spelling of a path (encoded, dot segments, `;` parameters, ...): see `canonical`.
    NonCanonicalPath => "non_canonical_path", 400, Some(INVALID_REQUEST), "the request path is not in canonical form";
    /// A case variant of a standard method (`post`).
    NonCanonicalMethod => "non_canonical_method", 400, Some(INVALID_REQUEST), NOT_CANONICAL;
    /// A host that is no DNS name or IP literal, where rules match hosts.
    NonCanonicalHost => "non_canonical_host", 400, Some(INVALID_REQUEST), NOT_CANONICAL;
    /// An MCP route's body is no JSON (or not UTF-8, has duplicate keys, nests too deep).
    McpParseError => "mcp_parse_error", 400, Some(INVALID_REQUEST), "the request body is not a JSON-RPC message";
    /// An MCP route's body is JSON but not one JSON-RPC 2.0 message (a batch, wrong members).
    McpInvalidRequest => "mcp_invalid_request", 400, Some(INVALID_REQUEST), "the request body is not a JSON-RPC message";
    /// `Mcp-Method` or `Mcp-Name` says something else than the body.
    McpHeaderMismatch => "mcp_header_mismatch", 400, Some(INVALID_REQUEST), "the MCP headers do not match the body";
    /// A body over the limit, where the gate must read it.
    BodyTooLarge => "body_too_large", 413, None, "the request body is too large";
    NoMatchingRule => "no_matching_rule", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    InsufficientScope => "insufficient_scope", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    TaskMismatch => "task_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    AgentNotAllowed => "agent_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    PeerMismatch => "peer_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    DelegationNotAllowed => "delegation_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    /// RFC 9470: the agent must come back with a token showing a human approved.
    ApprovalRequired => "approval_required", 401, Some("insufficient_user_authentication"), "human approval is required for this request";
    SourceNotAllowed => "source_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    HeaderMismatch => "header_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    /// An MCP call's arguments fail the rule's `arguments` conditions.
    ArgumentMismatch => "argument_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    OutsideTimeWindow => "outside_time_window", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    ClaimMismatch => "claim_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    Revoked => "revoked", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    /// The agent collected too many counted denials and is cut off for the cool-off.
    Quarantined => "quarantined", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    /// The rule's `max_recent_denials`: the agent was denied too often in the current window.
    RecentDenials => "recent_denials", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED;
    RateLimited => "rate_limited", 429, None, "too many requests; retry later";
    NotConfigured => "not_configured", 503, None, "the gateway is not configured";
    /// A header the gate must strip, sent more than once, where the host can strip only one
    /// copy (nginx): the other would reach the upstream.
    RepeatedHeader => "repeated_header", 400, Some(INVALID_REQUEST), "a header was sent more than once";
    /// More headers than the host hands the filter (nginx: 100): one past them could be a
    /// second token or a forged audit header, neither seen nor stripped.
    TooManyHeaders => "too_many_headers", 431, None, "the request has too many headers";
    HostError => "host_error", 500, None, "the gateway could not evaluate the request";
}

impl Reason {
    pub const fn code(self) -> &'static str {
        self.spec().code
    }

    pub const fn status(self) -> u16 {
        self.spec().status
    }

    /// The counter this reason increments (Envoy shows it as `wasmcustom.<name>`).
    pub fn metric(self) -> String {
        format!("agentgate.denied.{}", self.code())
    }

    /// The authentication scheme of this reason's challenge: DPoP (RFC 9449 §7.1) for
    /// proof-of-possession failures, Bearer (RFC 6750) otherwise.
    pub const fn scheme(self) -> &'static str {
        match self {
            Reason::DpopRequired
            | Reason::DpopProofInvalid
            | Reason::DpopNonceRequired
            | Reason::DpopReplayed
            | Reason::DpopBindingMismatch => "DPoP",
            _ => "Bearer",
        }
    }

    /// The `WWW-Authenticate` challenge for this reason (RFC 6750 section 3), if it is one
    /// of the token errors.
    pub fn challenge(self) -> Option<String> {
        let (spec, scheme) = (self.spec(), self.scheme());
        match (spec.status, spec.error) {
            (401, None) => Some(scheme.to_string()),
            (_, Some(error)) => Some(format!("{scheme} error=\"{error}\", error_description=\"{}\"", spec.description)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_is_listed_once_with_a_distinct_code() {
        // `ALL` comes from the same table as the enum; a count check guards the macro.
        let listed: HashSet<_> = Reason::ALL.iter().collect();
        assert_eq!(listed.len(), Reason::ALL.len());
        assert!(Reason::ALL.contains(&Reason::HostError) && Reason::ALL.contains(&Reason::NonCanonicalHost));
        let codes: HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn missing_token_challenge_has_no_error_attribute() {
        assert_eq!(Reason::MissingToken.challenge().as_deref(), Some("Bearer"));
        assert_eq!(Reason::MissingToken.status(), 401);
    }

    #[test]
    fn invalid_token_reasons_map_to_401_invalid_token() {
        for r in [Reason::Expired, Reason::BadSignature, Reason::AudienceMismatch] {
            assert_eq!(r.status(), 401);
            let challenge = r.challenge().unwrap_or_default();
            assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{challenge}");
        }
    }

    #[test]
    fn authorization_reasons_map_to_403_insufficient_scope() {
        for r in [Reason::NoMatchingRule, Reason::InsufficientScope] {
            assert_eq!(r.status(), 403);
            assert_eq!(r.spec().error, Some("insufficient_scope"));
        }
    }

    #[test]
    fn server_side_failures_send_no_bearer_challenge() {
        assert_eq!(Reason::NotConfigured.challenge(), None);
        assert_eq!(Reason::HostError.challenge(), None);
    }
}
