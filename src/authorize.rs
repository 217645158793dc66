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
    let facts = Facts { rule, target, token, identifier: task_identifier.as_deref() };
    let result = REQUIREMENTS.iter().filter_map(|(_, check)| check(&facts)).find(Result::is_err).unwrap_or(Ok(()));
    Authorization { rule: Some(index), result, task_identifier }
}

/// Every requirement of the rule matching the request, in order, and whether it held: what
/// `agentgate eval` shows. `None` when no rule matches.
pub fn explain(
    policy: &Policy,
    target: &Target<'_>,
    token: &VerifiedToken,
) -> Option<Vec<(&'static str, Result<(), Reason>)>> {
    let path = strip_query(target.path);
    let (index, params) = policy.routes.first_match(path, |i| {
        policy.rules.get(i).is_some_and(|rule| rule.matches_method(target.method) && rule.matches_host(target.host))
    })?;
    let rule = policy.rules.get(index)?;
    let identifier = rule.task.as_ref().and_then(|task| task.identifier.as_deref()).map(|t| bind(t, &params));
    let facts = Facts { rule, target, token, identifier: identifier.as_deref() };
    Some(REQUIREMENTS.iter().filter_map(|(name, check)| check(&facts).map(|result| (*name, result))).collect())
}

/// What the requirements look at.
struct Facts<'a> {
    rule: &'a Rule,
    target: &'a Target<'a>,
    token: &'a VerifiedToken,
    /// The rule's task identifier, bound from the path.
    identifier: Option<&'a str>,
}

/// A requirement, by its name in the policy; its check gives `None` when the rule does not
/// have it.
type Requirement = (&'static str, fn(&Facts<'_>) -> Option<Result<(), Reason>>);

/// In order: who and what task first, then proof of possession, then context; human
/// approval last, so an agent is only sent to get approval for a request that would
/// otherwise be allowed.
const REQUIREMENTS: [Requirement; 11] = [
    ("scopes", scopes),
    ("any_scopes", any_scopes),
    ("agents", agents),
    ("delegation", delegation),
    ("task", task),
    ("bind_mtls_peer", mtls_peer),
    ("source_cidrs", source_cidrs),
    ("headers", headers),
    ("time", time),
    ("claims", claims),
    ("approval", approval),
];

fn verdict(held: bool, reason: Reason) -> Result<(), Reason> {
    if held {
        Ok(())
    } else {
        Err(reason)
    }
}

fn scopes(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let rule = f.rule;
    (!rule.scopes.is_empty())
        .then(|| verdict(rule.scopes.iter().all(|s| f.token.scopes.contains(s)), Reason::InsufficientScope))
}

fn any_scopes(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let rule = f.rule;
    (!rule.any_scopes.is_empty())
        .then(|| verdict(rule.any_scopes.iter().any(|s| f.token.scopes.contains(s)), Reason::InsufficientScope))
}

fn agents(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let agents = f.rule.agents.as_ref()?;
    Some(verdict(f.token.agent().is_some_and(|agent| agents.iter().any(|p| p.matches(agent))), Reason::AgentNotAllowed))
}

fn delegation(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let (rule, token) = (f.rule, f.token);
    if rule.max_delegation_depth.is_none() && rule.actors.is_none() && token.may_act.is_none() {
        return None;
    }
    let depth_ok = rule.max_delegation_depth.is_none_or(|max| token.actors.len() <= max);
    let actor_ok = token.actors.first().is_none_or(|actor| {
        rule.actors.as_ref().is_none_or(|patterns| patterns.iter().any(|p| p.matches(actor)))
            // RFC 8693: where the subject said who may act for it, the actor must be one of them.
            && token.may_act.as_ref().is_none_or(|allowed| allowed.contains(actor))
    });
    Some(verdict(depth_ok && actor_ok, Reason::DelegationNotAllowed))
}

fn task(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let required = f.rule.task.as_ref()?;
    Some(verdict(
        f.token.tasks.iter().any(|granted| task_covers(required, f.identifier, granted)),
        Reason::TaskMismatch,
    ))
}

/// Proof of possession by mTLS: the agent the token names is the workload on the other end
/// of the connection. No peer certificate, no match.
fn mtls_peer(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    f.rule.bind_mtls_peer.then(|| {
        verdict(f.target.peer_uri_san.is_some() && f.target.peer_uri_san == f.token.agent(), Reason::PeerMismatch)
    })
}

fn source_cidrs(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let networks = f.rule.source_cidrs.as_ref()?;
    // An unknown source is outside every network: fail closed.
    let ip = f.target.source.and_then(source_ip);
    Some(verdict(ip.is_some_and(|ip| networks.iter().any(|n| n.contains(&ip))), Reason::SourceNotAllowed))
}

fn headers(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let conditions = &f.rule.headers;
    (!conditions.is_empty()).then(|| {
        let holds = conditions.iter().all(|condition| {
            let value =
                f.target.headers.iter().find(|(n, _)| *n == condition.key).map(|(_, v)| Value::String(v.clone()));
            condition.holds(value.as_ref())
        });
        verdict(holds, Reason::HeaderMismatch)
    })
}

fn time(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let window = f.rule.time.as_ref()?;
    Some(verdict(window.contains(f.target.now), Reason::OutsideTimeWindow))
}

fn claims(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let conditions = &f.rule.claims;
    (!conditions.is_empty()).then(|| {
        let holds = conditions
            .iter()
            .all(|condition| condition.holds(f.token.claims.as_ref().and_then(|claims| claim(claims, &condition.key))));
        verdict(holds, Reason::ClaimMismatch)
    })
}

fn approval(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let approval = f.rule.approval.as_ref()?;
    let token = f.token;
    let approved = token.acr.as_ref().is_some_and(|acr| approval.acr_values.contains(acr));
    let recent = approval.max_age_seconds.is_none_or(|max| {
        token.auth_time.is_some_and(|t| f.target.now.saturating_sub(t) <= i64::try_from(max).unwrap_or(i64::MAX))
    });
    Some(verdict(approved && recent, Reason::ApprovalRequired))
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
