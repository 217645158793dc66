//! Stage 3: the verified token against the rules. First matching rule wins; no match, deny.
//! A rule matches on method, host and path; then every requirement it lists must hold.

use crate::context::{claim, source_ip};
use crate::policy::{Policy, Rule, TaskRequirement};
use crate::reason::Reason;
use crate::routes::Params;
use crate::verify::VerifiedToken;
use serde_json::Value;

/// Which rule applied, and whether it allowed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Index into `policy.rules` of the rule that matched, if any.
    pub rule: Option<usize>,
    pub result: Result<(), Reason>,
    /// The task identifier the rule bound from the path, when it has one.
    pub task_identifier: Option<String>,
}

impl Authorization {
    pub fn denied(reason: Reason) -> Authorization {
        Authorization { rule: None, result: Err(reason), task_identifier: None }
    }
}

/// What of the request the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub method: &'a str,
    pub headers: &'a [(String, String)],
    /// The client's address as the host gives it (`ip:port`), when known.
    pub source: Option<&'a str>,
    /// The mTLS peer certificate's URI SAN, when there is one.
    pub peer_uri_san: Option<&'a str>,
    /// Authority without port, lower case.
    pub host: &'a str,
    pub path: &'a str,
    pub now: i64,
}

/// The kill switch, checked before any rule.
pub fn check_revoked(policy: &Policy, token: &VerifiedToken) -> Result<(), Reason> {
    let revoked = &policy.revoked;
    let subject = token.subject.as_deref().is_some_and(|s| revoked.subjects.iter().any(|p| p.matches(s)));
    let actor = token.actors.iter().any(|a| revoked.actors.iter().any(|p| p.matches(a)));
    let jti = token.jti.as_ref().is_some_and(|j| revoked.jtis.contains(j));
    if subject || actor || jti {
        Err(Reason::Revoked)
    } else {
        Ok(())
    }
}

pub fn authorize(policy: &Policy, target: &Target<'_>, token: &VerifiedToken) -> Authorization {
    let path = strip_query(target.path);
    if !is_canonical(path) {
        return Authorization::denied(Reason::NonCanonicalPath);
    }
    let matched = policy.routes.first_match(path, |i| {
        policy.rules.get(i).is_some_and(|rule| rule.matches_method(target.method) && rule.matches_host(target.host))
    });
    let Some((index, rule, params)) = matched.and_then(|(i, params)| policy.rules.get(i).map(|rule| (i, rule, params)))
    else {
        return Authorization::denied(Reason::NoMatchingRule);
    };
    let task_identifier = rule.task.as_ref().and_then(|task| task.identifier.as_deref()).map(|t| bind(t, &params));
    let result = check(rule, task_identifier.as_deref(), token)
        .and_then(|()| check_peer(rule, target, token))
        .and_then(|()| check_context(rule, target, token))
        .and_then(|()| check_approval(rule, token, target.now));
    Authorization { rule: Some(index), result, task_identifier }
}

/// Who and what: scopes, agent, delegation, task.
fn check(rule: &Rule, identifier: Option<&str>, token: &VerifiedToken) -> Result<(), Reason> {
    let has = |scope: &String| token.scopes.contains(scope);
    if !rule.scopes.iter().all(has) || !(rule.any_scopes.is_empty() || rule.any_scopes.iter().any(has)) {
        return Err(Reason::InsufficientScope);
    }
    if let Some(agents) = &rule.agents {
        if !token.agent().is_some_and(|agent| agents.iter().any(|p| p.matches(agent))) {
            return Err(Reason::AgentNotAllowed);
        }
    }
    check_delegation(rule, token)?;
    if let Some(task) = &rule.task {
        if !token.tasks.iter().any(|granted| task_covers(task, identifier, granted)) {
            return Err(Reason::TaskMismatch);
        }
    }
    Ok(())
}

/// Human approval, checked last: an agent is only sent to get approval for a request that
/// would otherwise be allowed.
fn check_approval(rule: &Rule, token: &VerifiedToken, now: i64) -> Result<(), Reason> {
    let Some(approval) = &rule.approval else { return Ok(()) };
    let approved = token.acr.as_ref().is_some_and(|acr| approval.acr_values.contains(acr));
    let recent = approval.max_age_seconds.is_none_or(|max| {
        token.auth_time.is_some_and(|t| now.saturating_sub(t) <= i64::try_from(max).unwrap_or(i64::MAX))
    });
    if approved && recent {
        Ok(())
    } else {
        Err(Reason::ApprovalRequired)
    }
}

/// Proof of possession by mTLS: the agent the token names is the workload on the other end
/// of the connection. No peer certificate, no match.
fn check_peer(rule: &Rule, target: &Target<'_>, token: &VerifiedToken) -> Result<(), Reason> {
    if rule.bind_mtls_peer && (target.peer_uri_san.is_none() || target.peer_uri_san != token.agent()) {
        return Err(Reason::PeerMismatch);
    }
    Ok(())
}

/// Where, when and in what context: source network, headers, time, claims.
fn check_context(rule: &Rule, target: &Target<'_>, token: &VerifiedToken) -> Result<(), Reason> {
    if let Some(networks) = &rule.source_cidrs {
        // An unknown source is outside every network: fail closed.
        let ip = target.source.and_then(source_ip);
        if !ip.is_some_and(|ip| networks.iter().any(|n| n.contains(&ip))) {
            return Err(Reason::SourceNotAllowed);
        }
    }
    for condition in &rule.headers {
        let value = target.headers.iter().find(|(n, _)| *n == condition.key).map(|(_, v)| Value::String(v.clone()));
        if !condition.holds(value.as_ref()) {
            return Err(Reason::HeaderMismatch);
        }
    }
    if rule.time.as_ref().is_some_and(|window| !window.contains(target.now)) {
        return Err(Reason::OutsideTimeWindow);
    }
    for condition in &rule.claims {
        let value = token.claims.as_ref().and_then(|claims| claim(claims, &condition.key));
        if !condition.holds(value) {
            return Err(Reason::ClaimMismatch);
        }
    }
    Ok(())
}

fn check_delegation(rule: &Rule, token: &VerifiedToken) -> Result<(), Reason> {
    if rule.max_delegation_depth.is_some_and(|max| token.actors.len() > max) {
        return Err(Reason::DelegationNotAllowed);
    }
    let Some(actor) = token.actors.first() else { return Ok(()) };
    if rule.actors.as_ref().is_some_and(|patterns| !patterns.iter().any(|p| p.matches(actor))) {
        return Err(Reason::DelegationNotAllowed);
    }
    // RFC 8693: where the subject said who may act for it, the actor must be one of them.
    if token.may_act.as_ref().is_some_and(|allowed| !allowed.contains(actor)) {
        return Err(Reason::DelegationNotAllowed);
    }
    Ok(())
}

fn task_covers(required: &TaskRequirement, identifier: Option<&str>, granted: &crate::verify::Task) -> bool {
    let all = |needed: &[String], have: &[String]| needed.iter().all(|n| have.contains(n));
    granted.kind == required.kind
        && all(&required.actions, &granted.actions)
        && all(&required.locations, &granted.locations)
        && all(&required.datatypes, &granted.datatypes)
        && identifier.is_none_or(|id| granted.identifier.as_deref() == Some(id))
}

/// Fills `{name}` in `template` from `params`.
fn bind(template: &str, params: &Params) -> String {
    params.iter().fold(template.to_string(), |acc, (name, value)| {
        acc.replace(&format!("{{{name}}}"), value).replace(&format!("{{*{name}}}"), value)
    })
}

/// The path without its query string or fragment.
pub fn strip_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Rules are written against canonical paths, so a path that a backend might resolve
/// differently from its text (dot segments, doubled or encoded slashes, backslashes) is
/// refused rather than matched. Envoy's `normalize_path` and `merge_slashes` make most of
/// these disappear before the filter runs.
pub fn is_canonical(path: &str) -> bool {
    if !path.starts_with('/') || path.contains("//") || path.contains('\\') {
        return false;
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%2e", "%00"].iter().any(|encoded| lower.contains(encoded)) {
        return false;
    }
    !path.split('/').any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        for ok in ["/", "/invoices/42", "/a/b.json", "/a-b_c~d/%41"] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in
            ["", "invoices", "//x", "/a/../b", "/a/./b", "/a/..", "/a%2Fb", "/a%2e%2e/b", "/a\\b", "/a b", "/a%00"]
        {
            assert!(!is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(strip_query("/a/b?x=1#f"), "/a/b");
        assert_eq!(strip_query("/a#f"), "/a");
        assert_eq!(strip_query("/a"), "/a");
    }

    #[test]
    fn identifiers_bind_path_parameters() {
        let params = vec![("id".to_string(), "42".to_string())];
        assert_eq!(bind("{id}", &params), "42");
        assert_eq!(bind("inv-{id}", &params), "inv-42");
    }
}
