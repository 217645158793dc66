//! Stage 4: what the decision leaves behind: the audit headers sent upstream and the JSON
//! audit record logged for every request, allowed or denied.

use serde::Serialize;

/// Every header agentgate sets starts with this; the client's own are removed first, so an
/// upstream can trust them.
pub const HEADER_PREFIX: &str = "x-agent-";
pub const AGENT_ID: &str = "x-agent-id";
pub const ON_BEHALF_OF: &str = "x-agent-on-behalf-of";
pub const DECISION: &str = "x-agent-decision";
pub const RULE: &str = "x-agent-rule";
pub const AUDIT_ID: &str = "x-agent-audit-id";
pub const DRY_RUN: &str = "x-agent-dry-run";
pub const REASON: &str = "x-agent-reason";

/// The request header whose value becomes the audit id (Envoy sets it on every request).
pub const REQUEST_ID: &str = "x-request-id";

/// One record per request. Never holds the token or its signature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub time: i64,
    pub audit_id: Option<String>,
    /// `allow` or `deny`: what the policy decided, even when dry run let the request through.
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    pub rule: Option<String>,
    /// Who acted: the current actor of a delegated token, else the subject.
    pub agent: Option<String>,
    /// The subject of a delegated token: on whose behalf the agent acted.
    pub on_behalf_of: Option<String>,
    /// The delegation chain, current actor first.
    pub actors: Vec<String>,
    /// The task identifier the matched rule bound from the path.
    pub task_identifier: Option<String>,
    pub issuer: Option<String>,
    pub jti: Option<String>,
    /// The first 8 bytes of the token's SHA-256, hex: ties records of one token together
    /// without revealing it.
    pub token_fingerprint: Option<String>,
    pub method: String,
    /// Without the query string, which may carry personal data.
    pub path: String,
    pub dry_run: bool,
    /// The status agentgate answered with itself; `None` when the request went upstream.
    pub status: Option<u16>,
}

impl AuditRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The short, one-way token fingerprint kept in audit records.
pub fn fingerprint(digest: &[u8; 32]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Makes a claim value safe as an HTTP header value: visible ASCII and spaces pass, anything
/// else (control characters that could split headers, non-ASCII) is percent-encoded.
pub fn header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (b' '..=b'~').contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_cannot_split_headers() {
        assert_eq!(header_value("agent-7"), "agent-7");
        assert_eq!(header_value("a\r\nx-agent-id: evil"), "a%0D%0Ax-agent-id: evil");
        assert_eq!(header_value("é%"), "%C3%A9%25");
    }
}
