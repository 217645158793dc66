//! The pipeline: extract → verify → authorize → audit, and the decision a host applies.

use crate::audit::{self, AuditRecord};
use crate::authorize::{authorize, strip_query, Authorization};
use crate::config::{ConfigError, Mode};
use crate::extract::bearer_token;
use crate::policy::Policy;
use crate::reason::Reason;
use crate::verify::{verify, VerifiedToken};

/// A request as any host sees it. Header names are lower-case.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as sent (`:path`), query included.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    /// Unix seconds.
    pub now: i64,
}

/// What the host must do with the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Forward upstream after removing `remove` and setting `set`.
    Continue { remove: Vec<String>, set: Vec<(&'static str, String)> },
    /// Answer locally; the request never reaches the upstream.
    Respond { status: u16, headers: Vec<(&'static str, String)>, body: String },
}

impl Action {
    /// The local response for a denial.
    pub fn deny(reason: Reason, audit_id: Option<&str>) -> Action {
        let spec = reason.spec();
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(challenge) = reason.challenge() {
            headers.push(("www-authenticate", challenge));
        }
        if let Some(id) = audit_id {
            headers.push((audit::AUDIT_ID, audit::header_value(id)));
        }
        let error = spec.error.unwrap_or(if spec.status == 401 { "unauthorized" } else { "server_error" });
        let body = serde_json::json!({"error": error, "error_description": spec.description}).to_string();
        Action::Respond { status: spec.status, headers, body }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The policy's verdict, even when dry run lets a denied request through.
    pub allowed: bool,
    pub reason: Option<Reason>,
    pub rule: Option<String>,
    pub dry_run: bool,
    pub action: Action,
    pub audit: AuditRecord,
}

/// A compiled policy, ready to decide requests.
#[derive(Debug)]
pub struct Gate {
    policy: Policy,
}

impl Gate {
    pub fn from_json(json: &str) -> Result<Gate, ConfigError> {
        Policy::from_json(json).map(|policy| Gate { policy })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        let audit_id = header(request.headers, audit::REQUEST_ID);
        let (token, authorization) =
            match bearer_token(request.headers).and_then(|t| verify(&self.policy, t, request.now)) {
                Ok(token) => {
                    let authorization = authorize(&self.policy, request.method, request.path, &token);
                    (Some(token), authorization)
                }
                Err(reason) => (None, Authorization { rule: None, result: Err(reason) }),
            };
        let rule = authorization.rule.and_then(|i| self.policy.rules.get(i)).map(|r| r.name.clone());
        let reason = authorization.result.err();
        let dry_run = self.policy.mode == Mode::DryRun;

        let action = match reason {
            Some(reason) if !dry_run => Action::deny(reason, audit_id),
            _ => Action::Continue {
                remove: forged_headers(request.headers),
                set: audit_headers(reason, rule.as_deref(), token.as_ref(), audit_id, dry_run),
            },
        };
        let audit = AuditRecord {
            time: request.now,
            audit_id: audit_id.map(str::to_string),
            decision: if reason.is_none() { "allow" } else { "deny" },
            reason: reason.map(Reason::code),
            rule: rule.clone(),
            agent: token.as_ref().and_then(|t| t.subject.clone()),
            issuer: token.as_ref().map(|t| t.issuer.clone()),
            jti: token.as_ref().and_then(|t| t.jti.clone()),
            method: request.method.to_string(),
            path: strip_query(request.path).to_string(),
            dry_run,
            status: match &action {
                Action::Respond { status, .. } => Some(*status),
                Action::Continue { .. } => None,
            },
        };
        Decision { allowed: reason.is_none(), reason, rule, dry_run, action, audit }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Client-sent headers in agentgate's namespace: removed so nobody can forge them.
fn forged_headers(headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = headers
        .iter()
        .filter(|(name, _)| name.len() >= audit::HEADER_PREFIX.len() && name.get(..audit::HEADER_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(audit::HEADER_PREFIX)))
        .map(|(name, _)| name.clone())
        .collect();
    names.dedup();
    names
}

fn audit_headers(
    reason: Option<Reason>,
    rule: Option<&str>,
    token: Option<&VerifiedToken>,
    audit_id: Option<&str>,
    dry_run: bool,
) -> Vec<(&'static str, String)> {
    let mut set = vec![(audit::DECISION, if reason.is_none() { "allow" } else { "deny" }.to_string())];
    if let Some(sub) = token.and_then(|t| t.subject.as_deref()) {
        set.push((audit::AGENT_ID, audit::header_value(sub)));
    }
    if let Some(rule) = rule {
        set.push((audit::RULE, audit::header_value(rule)));
    }
    if let Some(id) = audit_id {
        set.push((audit::AUDIT_ID, audit::header_value(id)));
    }
    if dry_run {
        set.push((audit::DRY_RUN, "true".to_string()));
        if let Some(reason) = reason {
            set.push((audit::REASON, reason.code().to_string()));
        }
    }
    set
}
