//! Stage 3: the verified token against the rules. First matching rule wins; no match, deny.
//! A rule matches on method, host and path; then every requirement it lists must hold.

use crate::canonical::{canonical_host, canonical_path, check_method};
use crate::context::{claim, source_ip};
use crate::mcp::{argument_text, McpCall};
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
    /// The precise check that failed, where a reason covers several (`dpop_htu_mismatch`).
    pub detail: Option<&'static str>,
}

impl Authorization {
    pub fn denied(reason: Reason) -> Authorization {
        Authorization { rule: None, result: Err(reason), task_identifier: None, detail: None }
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
    /// The request's authority as sent (`:authority` or `host`).
    pub authority: &'a str,
    /// The request target as sent, query included.
    pub path: &'a str,
    pub now: i64,
    /// The MCP message in the body, on an MCP route.
    pub mcp: Option<&'a McpCall>,
    /// The token is DPoP-bound and its proof for this request verified.
    pub dpop: bool,
    /// The valid Txn-Token that came along, if any.
    pub txn: Option<&'a VerifiedToken>,
}

/// The kill switch, checked before any rule: a revoked identity is revoked in every role it
/// appears in — the subject or any actor of the delegation chain — whichever list names it.
pub fn check_revoked(policy: &Policy, token: &VerifiedToken) -> Result<(), Reason> {
    let revoked = &policy.revoked;
    let mut identities = token.subject.iter().chain(&token.actors);
    let identity = identities.any(|id| revoked.subjects.iter().chain(&revoked.actors).any(|p| p.matches(id)));
    let jti = token.jti.as_ref().is_some_and(|j| revoked.jtis.contains(j));
    if identity || jti {
        Err(Reason::Revoked)
    } else {
        Ok(())
    }
}

/// The rule that decides `target` (first match wins), with the task identifier it binds from
/// the path. Every spelling is first brought to canonical form, or refused.
fn route<'p>(policy: &'p Policy, target: &Target<'_>) -> Result<(usize, &'p Rule, Option<String>), Reason> {
    check_method(target.method)?;
    let path = canonical_path(target.path, policy.path_parameters)?;
    // Only hosts rules need the host; one that is no host name must not slip past them.
    let host =
        if policy.needs_host { Some(canonical_host(target.authority).ok_or(Reason::NonCanonicalHost)?) } else { None };
    let matched = policy.routes.first_match(&path, |i| {
        policy.rules.get(i).is_some_and(|rule| {
            rule.matches_method(target.method)
                && host.as_deref().is_none_or(|host| rule.matches_host(host))
                // An MCP rule matches only the MCP message it names.
                && rule.mcp.as_ref().is_none_or(|m| target.mcp.is_some_and(|call| m.matches(call)))
        })
    });
    let (index, params) = matched.ok_or(Reason::NoMatchingRule)?;
    let rule = policy.rules.get(index).ok_or(Reason::NoMatchingRule)?;
    let arguments = target.mcp.map_or(&serde_json::Value::Null, |call| &call.arguments);
    let identifier =
        rule.task.as_ref().and_then(|task| task.identifier.as_deref()).and_then(|t| bind(t, &params, arguments));
    Ok((index, rule, identifier))
}

pub fn authorize(policy: &Policy, target: &Target<'_>, token: &VerifiedToken) -> Authorization {
    let (index, rule, task_identifier) = match route(policy, target) {
        Ok(routed) => routed,
        Err(reason) => return Authorization::denied(reason),
    };
    let facts = Facts { rule, target, token, identifier: task_identifier.as_deref(), arguments_unknown: false };
    let result = resource_audience(policy, rule, token).and_then(|()| {
        REQUIREMENTS.iter().filter_map(|(_, check)| check(&facts)).find(Result::is_err).unwrap_or(Ok(()))
    });
    Authorization { rule: Some(index), result, task_identifier, detail: None }
}

/// RFC 8707: a token for an MCP rule must be for the protected resource the policy's
/// metadata names, not merely for one of the provider's audiences.
fn resource_audience(policy: &Policy, rule: &Rule, token: &VerifiedToken) -> Result<(), Reason> {
    match (&policy.resource_metadata, &rule.mcp) {
        (Some(metadata), Some(_)) if !token.audiences.contains(&metadata.resource) => Err(Reason::AudienceMismatch),
        _ => Ok(()),
    }
}

/// Whether some call of `target`'s MCP message, with arguments not known yet, could be
/// allowed for `token`: the rule that would decide it exists and every requirement that does
/// not depend on the arguments holds. Human approval is left out: a step-up token can still
/// satisfy it, so such tools stay visible. For filtering `tools/list` and its kin.
pub fn could_hold(policy: &Policy, target: &Target<'_>, token: &VerifiedToken) -> bool {
    let Ok((_, rule, identifier)) = route(policy, target) else { return false };
    if resource_audience(policy, rule, token).is_err() {
        return false;
    }
    let facts = Facts { rule, target, token, identifier: identifier.as_deref(), arguments_unknown: true };
    REQUIREMENTS
        .iter()
        .filter(|(name, _)| *name != "approval")
        .filter_map(|(_, check)| check(&facts))
        .all(|result| result.is_ok())
}

/// Each requirement of a rule by its name in the policy, in order, and whether it held.
pub type Explanation = Vec<(&'static str, Result<(), Reason>)>;

/// Every requirement of the rule the gate would apply to the request, in order, and whether
/// it held: what `agentgate eval` shows. `Err` when no rule applies (and why).
pub fn explain(policy: &Policy, target: &Target<'_>, token: &VerifiedToken) -> Result<Explanation, Reason> {
    let (_, rule, identifier) = route(policy, target)?;
    resource_audience(policy, rule, token)?;
    let facts = Facts { rule, target, token, identifier: identifier.as_deref(), arguments_unknown: false };
    Ok(REQUIREMENTS.iter().filter_map(|(name, check)| check(&facts).map(|result| (*name, result))).collect())
}

/// What the requirements look at.
struct Facts<'a> {
    rule: &'a Rule,
    target: &'a Target<'a>,
    token: &'a VerifiedToken,
    /// The rule's task identifier, bound from the path.
    identifier: Option<&'a str>,
    /// The call's arguments are not known yet (filtering a list of tools): requirements on
    /// them are given the benefit of the doubt.
    arguments_unknown: bool,
}

/// A requirement, by its name in the policy; its check gives `None` when the rule does not
/// have it.
type Requirement = (&'static str, fn(&Facts<'_>) -> Option<Result<(), Reason>>);

/// In order: who and what task first, then proof of possession, then context; human
/// approval last, so an agent is only sent to get approval for a request that would
/// otherwise be allowed.
const REQUIREMENTS: [Requirement; 14] = [
    ("dpop", dpop),
    ("transaction_token", transaction_token),
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
    ("arguments", arguments),
    ("approval", approval),
];

fn verdict(held: bool, reason: Reason) -> Result<(), Reason> {
    if held {
        Ok(())
    } else {
        Err(reason)
    }
}

/// Proof of possession by DPoP: the token is bound to a key and the request proved it.
fn dpop(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    f.rule.dpop.then(|| verdict(f.target.dpop, Reason::DpopRequired))
}

/// A valid Txn-Token alongside, with the rule's scopes and claim conditions.
fn transaction_token(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let (scopes, conditions) = f.rule.transaction_token.as_ref()?;
    let holds = f.target.txn.is_some_and(|txn| {
        scopes.iter().all(|s| txn.scopes.contains(s))
            && conditions.iter().all(|c| c.holds(txn.claims.as_ref().and_then(|claims| claim(claims, &c.key))))
    });
    Some(verdict(holds, Reason::TransactionTokenRequired))
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
    // Every actor of the chain, prior ones included, must be one the rule allows: an unlisted
    // agent must not act through a listed one.
    let chain_ok = rule
        .actors
        .as_ref()
        .is_none_or(|patterns| token.actors.iter().all(|actor| patterns.iter().any(|p| p.matches(actor))));
    // RFC 8693: where the subject said who may act for it, the current actor must be one of them.
    let may_act_ok =
        token.actors.first().is_none_or(|actor| token.may_act.as_ref().is_none_or(|allowed| allowed.contains(actor)));
    Some(verdict(depth_ok && chain_ok && may_act_ok, Reason::DelegationNotAllowed))
}

fn task(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let required = f.rule.task.as_ref()?;
    if required.identifier.is_some() && f.identifier.is_none() && !f.arguments_unknown {
        // The identifier could not be bound (an argument missing, or not a string or number).
        return Some(Err(Reason::TaskMismatch));
    }
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
        // A repeated header reaches the upstream with every value (often joined): the
        // condition must hold for each, not only for the first.
        let holds = conditions.iter().all(|condition| {
            let mut values = f.target.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(&condition.key)).peekable();
            if values.peek().is_none() {
                return condition.holds(None);
            }
            values.all(|(_, v)| condition.holds(Some(&Value::String(v.clone()))))
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

fn arguments(f: &Facts<'_>) -> Option<Result<(), Reason>> {
    let conditions = &f.rule.arguments;
    (!conditions.is_empty() && !f.arguments_unknown).then(|| {
        let arguments = f.target.mcp.and_then(|call| call.arguments.as_object());
        let holds = conditions.iter().all(|c| c.holds(arguments.and_then(|a| claim(a, &c.key))));
        verdict(holds, Reason::ArgumentMismatch)
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

/// Fills `{name}` (and `{*name}`) in `template` from `params`, and `{args.NAME}` from an MCP
/// call's arguments, in one pass: a value that itself contains `{id}` is not expanded again.
/// `None` when a name has no value: a task identifier that cannot be bound matches nothing.
fn bind(template: &str, params: &Params, arguments: &serde_json::Value) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open)?);
        let after = rest.get(open + 1..)?;
        let close = after.find('}')?;
        let name = after.get(..close)?.trim_start_matches('*');
        match name.strip_prefix("args.") {
            Some(path) => out.push_str(&argument_text(arguments, path)?),
            None => out.push_str(&params.iter().find(|(n, _)| n == name)?.1),
        }
        rest = after.get(close + 1..)?;
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_bind_path_parameters_and_arguments() {
        let none = serde_json::Value::Null;
        let params = vec![("id".to_string(), "42".to_string())];
        assert_eq!(bind("{id}", &params, &none).as_deref(), Some("42"));
        assert_eq!(bind("inv-{id}", &params, &none).as_deref(), Some("inv-42"));
        assert_eq!(bind("{*id}/{other}", &params, &none), None, "an unbound name binds nothing");
        // A parameter value is never a template itself.
        let params = vec![("org".to_string(), "ac{id}e".to_string()), ("id".to_string(), "7".to_string())];
        assert_eq!(bind("{id}@{org}", &params, &none).as_deref(), Some("7@ac{id}e"));
        let arguments = serde_json::json!({"invoice_id": "{id}", "n": 5, "o": {"x": true}});
        assert_eq!(bind("{args.invoice_id}-{args.n}", &params, &arguments).as_deref(), Some("{id}-5"));
        assert_eq!(bind("{args.o.x}", &params, &arguments), None, "only strings and numbers bind");
    }
}
