//! The one closed set of reasons a request is denied, and the one table that maps each to
//! its HTTP status, RFC 6750 error code, client-facing description, metric and audit code.
//! Adding a reason is one enum arm and one row in [`Reason::spec`].

/// Why a request was denied. The `code` of each reason is what audit records, metrics and
/// `agentgate eval` report; clients only ever see the coarse RFC 6750 error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    MissingToken,
    MultipleTokens,
    TokenTooLarge,
    Malformed,
    UnknownIssuer,
    UnknownKid,
    KeysUnavailable,
    AlgNotAllowed,
    BadSignature,
    MissingExp,
    Expired,
    NotYetValid,
    AudienceMismatch,
    LifetimeTooLong,
    TypeNotAllowed,
    SubjectNotAllowed,
    MissingJti,
    Replayed,
    ReplayStoreUnavailable,
    NonCanonicalPath,
    NoMatchingRule,
    InsufficientScope,
    TaskMismatch,
    AgentNotAllowed,
    PeerMismatch,
    DelegationNotAllowed,
    ApprovalRequired,
    SourceNotAllowed,
    HeaderMismatch,
    OutsideTimeWindow,
    ClaimMismatch,
    Revoked,
    RateLimited,
    NotConfigured,
    HostError,
}

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

const INVALID_TOKEN: &str = "invalid_token";
const INVALID_REQUEST: &str = "invalid_request";
const INSUFFICIENT_SCOPE: &str = "insufficient_scope";
const TOKEN_INVALID: &str = "the access token is invalid";
const NOT_PERMITTED: &str = "the access token does not permit this request";

impl Reason {
    /// Every reason, for defining metrics up front.
    pub const ALL: [Reason; 35] = [
        Reason::MissingToken,
        Reason::MultipleTokens,
        Reason::TokenTooLarge,
        Reason::Malformed,
        Reason::UnknownIssuer,
        Reason::UnknownKid,
        Reason::KeysUnavailable,
        Reason::AlgNotAllowed,
        Reason::BadSignature,
        Reason::MissingExp,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::AudienceMismatch,
        Reason::LifetimeTooLong,
        Reason::TypeNotAllowed,
        Reason::SubjectNotAllowed,
        Reason::MissingJti,
        Reason::Replayed,
        Reason::ReplayStoreUnavailable,
        Reason::NonCanonicalPath,
        Reason::NoMatchingRule,
        Reason::InsufficientScope,
        Reason::TaskMismatch,
        Reason::AgentNotAllowed,
        Reason::PeerMismatch,
        Reason::DelegationNotAllowed,
        Reason::ApprovalRequired,
        Reason::SourceNotAllowed,
        Reason::HeaderMismatch,
        Reason::OutsideTimeWindow,
        Reason::ClaimMismatch,
        Reason::Revoked,
        Reason::RateLimited,
        Reason::NotConfigured,
        Reason::HostError,
    ];

    pub const fn spec(self) -> ReasonSpec {
        const fn row(
            code: &'static str,
            status: u16,
            error: Option<&'static str>,
            description: &'static str,
        ) -> ReasonSpec {
            ReasonSpec { code, status, error, description }
        }
        use Reason::*;
        match self {
            MissingToken => row("missing_token", 401, None, "a bearer token is required"),
            MultipleTokens => row("multiple_tokens", 400, Some(INVALID_REQUEST), "more than one token was sent"),
            TokenTooLarge => row("token_too_large", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            Malformed => row("malformed", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            UnknownIssuer => row("unknown_issuer", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            UnknownKid => row("unknown_kid", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            // Fail closed: the provider's keys could not be fetched, or are older than max_stale_seconds.
            KeysUnavailable => row("keys_unavailable", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            AlgNotAllowed => row("alg_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            BadSignature => row("bad_signature", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            MissingExp => row("missing_exp", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            // Telling a legitimate agent its token expired lets it refresh; it tells an attacker nothing.
            Expired => row("expired", 401, Some(INVALID_TOKEN), "the access token expired"),
            NotYetValid => row("not_yet_valid", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            AudienceMismatch => row("audience_mismatch", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            LifetimeTooLong => row("lifetime_too_long", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            TypeNotAllowed => row("type_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            SubjectNotAllowed => row("subject_not_allowed", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            MissingJti => row("missing_jti", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            Replayed => row("replayed", 401, Some(INVALID_TOKEN), TOKEN_INVALID),
            // Fail closed: without a working replay store, single-use tokens cannot be accepted.
            ReplayStoreUnavailable => {
                row("replay_store_unavailable", 503, None, "the gateway cannot accept single-use tokens right now")
            }
            NonCanonicalPath => {
                row("non_canonical_path", 400, Some(INVALID_REQUEST), "the request path is not in canonical form")
            }
            NoMatchingRule => row("no_matching_rule", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            InsufficientScope => row("insufficient_scope", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            TaskMismatch => row("task_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            AgentNotAllowed => row("agent_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            PeerMismatch => row("peer_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            DelegationNotAllowed => row("delegation_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            // RFC 9470: the agent must come back with a token showing a human approved.
            ApprovalRequired => row(
                "approval_required",
                401,
                Some("insufficient_user_authentication"),
                "human approval is required for this request",
            ),
            SourceNotAllowed => row("source_not_allowed", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            HeaderMismatch => row("header_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            OutsideTimeWindow => row("outside_time_window", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            ClaimMismatch => row("claim_mismatch", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            Revoked => row("revoked", 403, Some(INSUFFICIENT_SCOPE), NOT_PERMITTED),
            RateLimited => row("rate_limited", 429, None, "too many requests; retry later"),
            NotConfigured => row("not_configured", 503, None, "the gateway is not configured"),
            HostError => row("host_error", 500, None, "the gateway could not evaluate the request"),
        }
    }

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

    /// The `WWW-Authenticate` challenge for this reason (RFC 6750 section 3), if it is one
    /// of the bearer-token errors.
    pub fn challenge(self) -> Option<String> {
        let spec = self.spec();
        match (spec.status, spec.error) {
            (401, None) => Some("Bearer".to_string()),
            (_, Some(error)) => Some(format!("Bearer error=\"{error}\", error_description=\"{}\"", spec.description)),
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
    fn every_reason_has_a_distinct_code() {
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
