//! Stage 4: what the decision leaves behind: the audit headers sent upstream, the JSON audit
//! record logged for every request, allowed or denied, and the fields an access log prints.

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::fmt::Write as _;

/// The default prefix of every header agentgate sets upstream (`audit.header_prefix`).
pub const DEFAULT_HEADER_PREFIX: &str = "x-agent-";

/// The request header whose value becomes the audit id (Envoy sets it on every request).
pub const REQUEST_ID: &str = "x-request-id";

/// The names of the headers agentgate sets, all under one prefix. Client headers with the
/// prefix are removed first, so an upstream can trust them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNames {
    pub prefix: String,
    pub agent_id: String,
    pub on_behalf_of: String,
    pub delegation_chain: String,
    pub task_type: String,
    pub task_id: String,
    pub rule: String,
    pub decision: String,
    pub audit_id: String,
    pub dry_run: String,
    pub reason: String,
    pub mcp_method: String,
    pub mcp_tool: String,
}

impl HeaderNames {
    pub fn with_prefix(prefix: &str) -> HeaderNames {
        let name = |suffix: &str| format!("{prefix}{suffix}");
        HeaderNames {
            prefix: prefix.to_string(),
            agent_id: name("id"),
            on_behalf_of: name("on-behalf-of"),
            delegation_chain: name("delegation-chain"),
            task_type: name("task-type"),
            task_id: name("task-id"),
            rule: name("rule"),
            decision: name("decision"),
            audit_id: name("audit-id"),
            dry_run: name("dry-run"),
            reason: name("reason"),
            mcp_method: name("mcp-method"),
            mcp_tool: name("mcp-tool"),
        }
    }

    /// Whether a header name is in agentgate's namespace, in any spelling an upstream may
    /// fold into it: any case, and `_` for `-` (CGI, WSGI and Rack turn both into `_`).
    pub fn owns(&self, name: &str) -> bool {
        let same = |a: u8, b: u8| a.eq_ignore_ascii_case(&b) || (matches!(a, b'-' | b'_') && matches!(b, b'-' | b'_'));
        name.len() >= self.prefix.len() && name.bytes().zip(self.prefix.bytes()).all(|(a, b)| same(a, b))
    }
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames::with_prefix(DEFAULT_HEADER_PREFIX)
    }
}

/// Replaces subject identifiers with keyed pseudonyms: the same subject always gets the same
/// pseudonym (records stay linkable), and only the key holder can tell who it is.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer(..)")
    }
}

/// Shorter keys are refused: a guessable key makes pseudonyms reversible by brute force.
pub const MIN_PSEUDONYM_KEY_BYTES: usize = 32;

impl Pseudonymizer {
    pub fn new(key: &[u8]) -> Option<Pseudonymizer> {
        (key.len() >= MIN_PSEUDONYM_KEY_BYTES).then(|| Pseudonymizer { key: key.to_vec() })
    }

    /// HMAC-SHA256 of `subject`, the first 16 bytes in hex.
    pub fn pseudonym(&self, subject: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else { return String::new() };
        mac.update(subject.as_bytes());
        hex(mac.finalize().into_bytes().get(..16).unwrap_or_default())
    }
}

/// The compiled `audit` section of the policy.
#[derive(Debug, Clone, Default)]
pub struct AuditSettings {
    pub headers: HeaderNames,
    pub pseudonymizer: Option<Pseudonymizer>,
    /// Log the query string (without token parameters).
    pub log_query: bool,
    /// Set the record's key fields as host properties (Envoy filter state) for access logs.
    pub filter_state: bool,
    /// The level the audit record is logged at.
    pub log_level: crate::config::LogLevel,
    /// Argument paths of MCP calls whose values the record keeps (none by default).
    pub log_arguments: Vec<String>,
}

impl AuditSettings {
    /// A subject identifier as it may leave the gate.
    pub fn subject(&self, subject: &str) -> String {
        match &self.pseudonymizer {
            Some(p) => p.pseudonym(subject),
            None => subject.to_string(),
        }
    }
}

/// One record per request. Never holds the token or its signature; subject identifiers are
/// pseudonyms when the policy asks for them.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct AuditRecord {
    /// Unix seconds.
    pub time: i64,
    pub audit_id: Option<String>,
    /// `allow` or `deny`: what the policy decided, even when dry run let the request through.
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    /// The precise check behind `reason`, where it covers several (`dpop_htu_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
    pub rule: Option<String>,
    /// Who acted: the current actor of a delegated token, else the subject.
    pub agent: Option<String>,
    /// The subject of a delegated token: on whose behalf the agent acted.
    pub on_behalf_of: Option<String>,
    /// The delegation chain, current actor first.
    pub actors: Vec<String>,
    /// The RFC 9396 task type the matched rule required.
    pub task_type: Option<String>,
    /// The task identifier the matched rule bound from the path.
    pub task_identifier: Option<String>,
    pub issuer: Option<String>,
    /// The transaction id (`txn`) of a valid Txn-Token that came along.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    pub jti: Option<String>,
    /// The first 8 bytes of the token's SHA-256, hex: ties records of one token together
    /// without revealing it.
    pub token_fingerprint: Option<String>,
    pub method: String,
    /// Without the query string unless `audit.log_query` (and never with a token in it).
    pub path: String,
    /// The client address as the host reported it.
    pub source: Option<String>,
    pub dry_run: bool,
    /// The status agentgate answered with itself; `None` when the request went upstream.
    pub status: Option<u16>,
    /// The MCP method of the call, on MCP routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<String>,
    /// The tool (prompt, resource) the MCP call names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_tool: Option<String>,
    /// The argument values the policy asked to log (`audit.log_arguments`), by path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_arguments: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuditRecord {
    /// Names the MCP call, and keeps the argument values listed in `log_arguments` only.
    pub fn note_mcp(&mut self, call: Option<&crate::mcp::McpCall>, log_arguments: &[String]) {
        let Some(call) = call else { return };
        self.mcp_method = call.method.clone();
        self.mcp_tool = call.name.clone();
        if let Some(arguments) = call.arguments.as_object().filter(|_| !log_arguments.is_empty()) {
            let kept: serde_json::Map<String, serde_json::Value> = log_arguments
                .iter()
                .filter_map(|path| crate::context::claim(arguments, path).map(|v| (path.clone(), v.clone())))
                .collect();
            self.mcp_arguments = Some(kept);
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    /// Appends the record as JSON to `out`: exactly what serde_json makes of it (the tests
    /// compare the two), written directly, as this runs for every request.
    pub fn write_json(&self, out: &mut String) {
        out.reserve(512);
        let _ = write!(out, "{{\"time\":{},\"audit_id\":", self.time);
        json_opt(out, self.audit_id.as_deref());
        out.push_str(",\"decision\":");
        json_str(out, self.decision);
        out.push_str(",\"reason\":");
        json_opt(out, self.reason);
        if let Some(detail) = self.detail {
            out.push_str(",\"detail\":");
            json_str(out, detail);
        }
        let fields =
            [(",\"rule\":", &self.rule), (",\"agent\":", &self.agent), (",\"on_behalf_of\":", &self.on_behalf_of)];
        for (name, value) in fields {
            out.push_str(name);
            json_opt(out, value.as_deref());
        }
        out.push_str(",\"actors\":[");
        for (i, actor) in self.actors.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_str(out, actor);
        }
        out.push(']');
        let fields = [
            (",\"task_type\":", &self.task_type),
            (",\"task_identifier\":", &self.task_identifier),
            (",\"issuer\":", &self.issuer),
        ];
        for (name, value) in fields {
            out.push_str(name);
            json_opt(out, value.as_deref());
        }
        if let Some(txn) = &self.txn {
            out.push_str(",\"txn\":");
            json_str(out, txn);
        }
        out.push_str(",\"jti\":");
        json_opt(out, self.jti.as_deref());
        out.push_str(",\"token_fingerprint\":");
        json_opt(out, self.token_fingerprint.as_deref());
        out.push_str(",\"method\":");
        json_str(out, &self.method);
        out.push_str(",\"path\":");
        json_str(out, &self.path);
        out.push_str(",\"source\":");
        json_opt(out, self.source.as_deref());
        out.push_str(if self.dry_run { ",\"dry_run\":true,\"status\":" } else { ",\"dry_run\":false,\"status\":" });
        match self.status {
            Some(status) => {
                let _ = write!(out, "{status}");
            }
            None => out.push_str("null"),
        }
        for (name, value) in [(",\"mcp_method\":", &self.mcp_method), (",\"mcp_tool\":", &self.mcp_tool)] {
            if let Some(value) = value {
                out.push_str(name);
                json_str(out, value);
            }
        }
        if let Some(arguments) = &self.mcp_arguments {
            out.push_str(",\"mcp_arguments\":");
            out.push_str(&serde_json::to_string(arguments).unwrap_or_default());
        }
        out.push('}');
    }

    /// The headers that tell the upstream who called, for what, under which rule.
    pub fn upstream_headers(&self, names: &HeaderNames) -> Vec<(String, String)> {
        let mut set = vec![(names.decision.clone(), self.decision.to_string())];
        let mut put = |name: &String, value: Option<&str>| {
            if let Some(value) = value {
                set.push((name.clone(), header_value(value)));
            }
        };
        put(&names.agent_id, self.agent.as_deref());
        put(&names.on_behalf_of, self.on_behalf_of.as_deref());
        put(&names.task_type, self.task_type.as_deref());
        put(&names.task_id, self.task_identifier.as_deref());
        put(&names.rule, self.rule.as_deref());
        put(&names.audit_id, self.audit_id.as_deref());
        put(&names.mcp_method, self.mcp_method.as_deref());
        put(&names.mcp_tool, self.mcp_tool.as_deref());
        if self.dry_run {
            put(&names.dry_run, Some("true"));
            put(&names.reason, self.reason);
        }
        if !self.actors.is_empty() {
            // Commas separate the actors, so one inside an identifier is encoded.
            let chain: Vec<String> = self.actors.iter().map(|a| header_value(a).replace(',', "%2C")).collect();
            set.push((names.delegation_chain.clone(), chain.join(",")));
        }
        set
    }

    /// The fields an access log prints, for hosts that keep per-request state (Envoy filter
    /// state `wasm.agentgate.<field>`), escaped like header values: a claim cannot break an
    /// access-log line. Absent values are left out.
    pub fn log_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![("decision", self.decision)];
        let optional = [
            ("reason", self.reason),
            ("rule", self.rule.as_deref()),
            ("agent", self.agent.as_deref()),
            ("on_behalf_of", self.on_behalf_of.as_deref()),
            ("task_identifier", self.task_identifier.as_deref()),
        ];
        fields.extend(optional.into_iter().filter_map(|(name, value)| value.map(|v| (name, v))));
        fields.into_iter().map(|(name, value)| (name, header_value(value))).collect()
    }
}

/// `value` as a JSON string, or `null`.
fn json_opt(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => json_str(out, value),
        None => out.push_str("null"),
    }
}

/// `value` as a JSON string, escaped as serde_json escapes: `"`, `\\` and control
/// characters; runs of other text are copied whole.
fn json_str(out: &mut String, value: &str) {
    out.push('"');
    let mut start = 0;
    for (i, byte) in value.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(value.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(value.get(start..).unwrap_or_default());
    out.push('"');
}

/// The short, one-way token fingerprint kept in audit records.
pub fn fingerprint(digest: &[u8; 32]) -> String {
    hex(digest.get(..8).unwrap_or_default())
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// Makes a claim value safe as an HTTP header value: visible ASCII and spaces pass, anything
/// else (control characters that could split headers, non-ASCII) is percent-encoded.
pub fn header_value(value: &str) -> String {
    let safe = |byte: u8| (b' '..=b'~').contains(&byte) && byte != b'%';
    // Claims are nearly always safe already: one copy.
    if value.bytes().all(safe) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for byte in value.bytes() {
        if safe(byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_written_exactly_as_serde_json_writes_it() {
        let odd = "a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é/<>\u{2028}";
        let mut arguments = serde_json::Map::new();
        arguments.insert("to".into(), serde_json::json!({"x": [1, "\u{0}"], "a": null}));
        let full = AuditRecord {
            time: -3,
            audit_id: Some(odd.into()),
            decision: "deny",
            reason: Some("insufficient_scope"),
            detail: Some("dpop_htu_mismatch"),
            rule: Some(odd.into()),
            agent: Some("agent-7".into()),
            on_behalf_of: Some(String::new()),
            actors: vec!["a".into(), odd.into()],
            task_type: Some("t".into()),
            task_identifier: Some("42".into()),
            issuer: Some("https://idp".into()),
            txn: Some("txn-1".into()),
            jti: Some(odd.into()),
            token_fingerprint: Some("00ff".into()),
            method: "GET".into(),
            path: odd.into(),
            source: Some("10.0.0.1:5".into()),
            dry_run: true,
            status: Some(403),
            mcp_method: Some("tools/call".into()),
            mcp_tool: Some(odd.into()),
            mcp_arguments: Some(arguments),
        };
        let sparse = AuditRecord { decision: "allow", actors: vec!["only".into()], ..AuditRecord::default() };
        for record in [full, sparse, AuditRecord::default()] {
            assert_eq!(record.to_json(), serde_json::to_string(&record).unwrap_or_default());
        }
    }

    #[test]
    fn header_values_cannot_split_headers() {
        assert_eq!(header_value("agent-7"), "agent-7");
        assert_eq!(header_value("a\r\nx-agent-id: evil"), "a%0D%0Ax-agent-id: evil");
        assert_eq!(header_value("é%"), "%C3%A9%25");
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_need_a_long_key() {
        assert!(Pseudonymizer::new(b"short").is_none());
        let a = Pseudonymizer::new(&[7; 32]).map(|p| p.pseudonym("alice"));
        let b = Pseudonymizer::new(&[8; 32]).map(|p| p.pseudonym("alice"));
        assert_eq!(a, Pseudonymizer::new(&[7; 32]).map(|p| p.pseudonym("alice")));
        assert_ne!(a, b);
        assert_eq!(a.as_ref().map(String::len), Some(32));
        assert_ne!(a.as_deref(), Some("alice"));
        // RFC 4231 test case 6: the documented algorithm, reproducible by anyone with the key.
        let rfc = Pseudonymizer::new(&[0xaa; 131])
            .map(|p| p.pseudonym("Test Using Larger Than Block-Size Key - Hash Key First"));
        assert_eq!(rfc.as_deref(), Some("60e431591ee0b67f0d8a26aacbf5b77f"));
    }

    #[test]
    fn names_follow_the_prefix() {
        let names = HeaderNames::with_prefix("x-gw-");
        assert_eq!(names.agent_id, "x-gw-id");
        assert!(names.owns("X-GW-anything"));
        assert!(!names.owns("x-agent-id"));
        let names = HeaderNames::default();
        for spelling in ["x-agent-on-behalf-of", "x_agent_on_behalf_of", "X_Agent-ID", "x-AGENT_x"] {
            assert!(names.owns(spelling), "{spelling}");
        }
        assert!(!names.owns("x-agents") && !names.owns("x-agen"));
    }
}
