//! Stage 3: the verified token against the rules. First matching rule wins; no match, deny.

use crate::policy::Policy;
use crate::reason::Reason;
use crate::verify::VerifiedToken;

/// Which rule applied, and whether it allowed the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorization {
    /// Index into `policy.rules` of the rule that matched, if any.
    pub rule: Option<usize>,
    pub result: Result<(), Reason>,
}

pub fn authorize(policy: &Policy, method: &str, path: &str, token: &VerifiedToken) -> Authorization {
    let path = strip_query(path);
    if !is_canonical(path) {
        return Authorization { rule: None, result: Err(Reason::NonCanonicalPath) };
    }
    let matched = policy
        .routes
        .first_match(path, |i| policy.rules.get(i).is_some_and(|rule| rule.matches_method(method)));
    let Some(rule) = matched.and_then(|i| policy.rules.get(i).map(|rule| (i, rule))) else {
        return Authorization { rule: None, result: Err(Reason::NoMatchingRule) };
    };
    let (index, rule) = rule;
    let result = if rule.scopes.iter().all(|s| token.scopes.contains(s)) {
        Ok(())
    } else {
        Err(Reason::InsufficientScope)
    };
    Authorization { rule: Some(index), result }
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
        for bad in ["", "invoices", "//x", "/a/../b", "/a/./b", "/a/..", "/a%2Fb", "/a%2e%2e/b", "/a\\b", "/a b", "/a%00"] {
            assert!(!is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(strip_query("/a/b?x=1#f"), "/a/b");
        assert_eq!(strip_query("/a#f"), "/a");
        assert_eq!(strip_query("/a"), "/a");
    }
}
