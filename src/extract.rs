//! Stage 1: find the token. By default `Authorization: Bearer` (RFC 6750 section 2.1); a
//! policy may list other headers (with an optional prefix), cookies and query parameters.

use crate::canonical::strip_query;
use crate::config::TokenSourceConfig;
use crate::reason::Reason;

/// One place a token may be carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A header (name compared case-insensitively); `prefix` (likewise) is removed first.
    Header {
        name: String,
        prefix: Option<String>,
    },
    Cookie(String),
    Query(String),
}

impl TokenSource {
    pub fn bearer() -> TokenSource {
        TokenSource::Header { name: "authorization".into(), prefix: Some("Bearer ".into()) }
    }

    /// `Authorization: DPoP <token>` (RFC 9449 §7.1), with its proof in the `DPoP` header.
    pub fn dpop() -> TokenSource {
        TokenSource::Header { name: "authorization".into(), prefix: Some("DPoP ".into()) }
    }

    pub fn compile(raw: &TokenSourceConfig) -> Result<TokenSource, String> {
        let non_empty =
            |name: &str| if name.trim().is_empty() { Err("name must not be empty".to_string()) } else { Ok(()) };
        match (&raw.header, &raw.cookie, &raw.query, &raw.prefix) {
            (Some(header), None, None, prefix) => {
                non_empty(header)?;
                if prefix.as_deref().is_some_and(str::is_empty) {
                    return Err("prefix must not be empty (omit it for a bare token)".into());
                }
                Ok(TokenSource::Header { name: header.to_ascii_lowercase(), prefix: prefix.clone() })
            }
            (None, Some(cookie), None, None) => non_empty(cookie).map(|_| TokenSource::Cookie(cookie.clone())),
            (None, None, Some(query), None) => non_empty(query).map(|_| TokenSource::Query(query.clone())),
            (None, _, _, Some(_)) => Err("prefix only goes with header".into()),
            _ => Err("give exactly one of header, cookie or query".into()),
        }
    }

    /// Every token this source finds in the request.
    fn find<'r>(&self, headers: &'r [(String, String)], path: &'r str, found: &mut Vec<&'r str>) {
        match self {
            TokenSource::Header { name, prefix } => {
                for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    if let Some(token) = strip_prefix(value.trim(), prefix.as_deref()) {
                        found.push(token);
                    }
                }
            }
            TokenSource::Cookie(name) => {
                for (_, value) in cookie_headers(headers) {
                    found.extend(
                        value
                            .split(';')
                            .filter_map(|pair| pair.trim().split_once('='))
                            .filter(|(n, _)| n == name)
                            .map(|(_, v)| v),
                    );
                }
            }
            TokenSource::Query(name) => {
                let query = path.get(strip_query(path).len()..).and_then(|q| q.strip_prefix('?')).unwrap_or("");
                let query = query.split('#').next().unwrap_or("");
                found.extend(
                    query.split('&').filter_map(|pair| pair.split_once('=')).filter(|(n, _)| n == name).map(|(_, v)| v),
                );
            }
        }
    }
}

/// Whether the token came with the DPoP scheme (any `Authorization: DPoP …`).
pub fn presented_as_dpop(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("authorization")
            && v.trim_start().get(..5).is_some_and(|s| s.eq_ignore_ascii_case("dpop "))
    })
}

/// The values of the `DPoP` header (its proofs; more than one is refused).
pub fn dpop_proofs(headers: &[(String, String)]) -> Vec<&str> {
    headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("dpop")).map(|(_, v)| v.trim()).collect()
}

fn cookie_headers(headers: &[(String, String)]) -> impl Iterator<Item = &(String, String)> {
    headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
}

/// `value` without `prefix` (case-insensitive, extra spaces allowed after it), or `None`
/// when the value does not start with it.
fn strip_prefix<'v>(value: &'v str, prefix: Option<&str>) -> Option<&'v str> {
    let Some(prefix) = prefix else { return Some(value) };
    let scheme = prefix.trim_end();
    let head = value.get(..scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let rest = value.get(scheme.len()..)?;
    if rest.is_empty() {
        return Some(rest);
    }
    // A prefix that ends in a space ("Bearer ") needs at least one space before the token.
    let needs_space = prefix.len() > scheme.len();
    (!needs_space || rest.starts_with(' ')).then(|| rest.trim_start())
}

/// How to take every token `sources` would find out of the request before it goes upstream:
/// headers to remove, and headers to set (`cookie` without the token's cookie, `:path`
/// without the token's query parameter).
pub fn strip_tokens(
    sources: &[TokenSource],
    headers: &[(String, String)],
    path: &str,
) -> (Vec<String>, Vec<(&'static str, String)>) {
    let (mut remove, mut set) = (Vec::new(), Vec::new());
    for source in sources {
        match source {
            TokenSource::Header { name, prefix } => {
                let carries = headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && strip_prefix(v.trim(), prefix.as_deref()).is_some());
                if carries && !remove.contains(name) {
                    remove.push(name.clone());
                }
            }
            TokenSource::Cookie(cookie) => {
                // Every cookie header (HTTP/2 may send several) becomes one, without the token.
                let pairs: Vec<&str> = cookie_headers(headers)
                    .flat_map(|(_, value)| value.split(';').map(str::trim).filter(|p| !p.is_empty()))
                    .collect();
                let kept: Vec<&str> =
                    pairs.iter().copied().filter(|p| p.split_once('=').is_none_or(|(n, _)| n != cookie)).collect();
                if kept.len() != pairs.len() {
                    set.push(("cookie", kept.join("; ")));
                }
            }
            TokenSource::Query(param) => {
                let base = strip_query(path);
                let Some(query) = path.get(base.len()..).and_then(|q| q.strip_prefix('?')) else { continue };
                let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
                let pairs: Vec<&str> = query.split('&').collect();
                let kept: Vec<&str> =
                    pairs.iter().copied().filter(|p| p.split_once('=').map_or(*p, |(n, _)| n) != param).collect();
                if kept.len() != pairs.len() {
                    let mut rewritten = base.to_string();
                    if !kept.is_empty() {
                        rewritten = format!("{rewritten}?{}", kept.join("&"));
                    }
                    if let Some(fragment) = fragment {
                        rewritten = format!("{rewritten}#{fragment}");
                    }
                    set.push((":path", rewritten));
                }
            }
        }
    }
    (remove, set)
}

/// The one token the request carries. Several copies of the same token are fine; two
/// different tokens are an invalid request, since which one decides would be ambiguous.
pub fn find_token<'r>(
    sources: &[TokenSource],
    headers: &'r [(String, String)],
    path: &'r str,
    max_bytes: usize,
) -> Result<&'r str, Reason> {
    let mut found = Vec::new();
    for source in sources {
        source.find(headers, path, &mut found);
    }
    let token = *found.first().ok_or(Reason::MissingToken)?;
    // Mostly the same slice again: compared by address first (wasm compares bytes one by one).
    let same = |other: &&str| (other.as_ptr() == token.as_ptr() && other.len() == token.len()) || *other == token;
    if !found.iter().all(same) {
        return Err(Reason::MultipleTokens);
    }
    if token.is_empty() {
        return Err(Reason::Malformed);
    }
    if token.len() > max_bytes {
        return Err(Reason::TokenTooLarge);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn bearer(pairs: &[(&str, &str)]) -> Result<String, Reason> {
        find_token(&[TokenSource::bearer()], &headers(pairs), "/", MAX).map(str::to_string)
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc"] {
            assert_eq!(bearer(&[("authorization", value)]), Ok("abc".into()), "{value}");
        }
    }

    #[test]
    fn missing_or_other_scheme_is_missing_token() {
        assert_eq!(bearer(&[]), Err(Reason::MissingToken));
        assert_eq!(bearer(&[("authorization", "Basic dXNlcg==")]), Err(Reason::MissingToken));
        assert_eq!(bearer(&[("authorization", "Bearerabc")]), Err(Reason::MissingToken));
    }

    #[test]
    fn empty_bearer_is_malformed() {
        assert_eq!(bearer(&[("authorization", "Bearer")]), Err(Reason::Malformed));
    }

    #[test]
    fn two_different_tokens_are_an_invalid_request() {
        assert_eq!(
            bearer(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
            Err(Reason::MultipleTokens)
        );
        assert_eq!(bearer(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]), Ok("a".into()));
    }

    #[test]
    fn oversized_token_is_refused_before_parsing() {
        let big = format!("Bearer {}", "a".repeat(MAX + 1));
        assert_eq!(bearer(&[("authorization", &big)]), Err(Reason::TokenTooLarge));
    }

    #[test]
    fn header_cookie_and_query_sources() {
        let sources = [
            TokenSource::bearer(),
            TokenSource::Header { name: "x-agent-token".into(), prefix: None },
            TokenSource::Cookie("agent_token".into()),
            TokenSource::Query("access_token".into()),
        ];
        let find = |h: &[(&str, &str)], path: &str| find_token(&sources, &headers(h), path, MAX).map(str::to_string);
        assert_eq!(find(&[("x-agent-token", "t1")], "/"), Ok("t1".into()));
        assert_eq!(find(&[("cookie", "a=1; agent_token=t2; b=3")], "/"), Ok("t2".into()));
        assert_eq!(find(&[], "/x?a=1&access_token=t3#f"), Ok("t3".into()));
        assert_eq!(find(&[("cookie", "agent_token=t2")], "/x?access_token=t3"), Err(Reason::MultipleTokens));
        assert_eq!(find(&[("authorization", "Bearer t4")], "/x?access_token=t4"), Ok("t4".into()));
        assert_eq!(find(&[], "/x?other=t5"), Err(Reason::MissingToken));
    }

    #[test]
    fn tokens_are_taken_out_wherever_they_came_from() {
        let sources = [
            TokenSource::bearer(),
            TokenSource::Cookie("agent_token".into()),
            TokenSource::Query("access_token".into()),
        ];
        let h = headers(&[("authorization", "Bearer t"), ("cookie", "a=1; agent_token=t; b=2"), ("x-other", "1")]);
        let (remove, set) = strip_tokens(&sources, &h, "/x?a=1&access_token=t&b=2");
        assert_eq!(remove, ["authorization"]);
        assert_eq!(set, [("cookie", "a=1; b=2".to_string()), (":path", "/x?a=1&b=2".to_string())]);
        let (_, set) = strip_tokens(&sources, &headers(&[]), "/x?access_token=t");
        assert_eq!(set, [(":path", "/x".to_string())]);
        // A Basic credential is not agentgate's to remove.
        let (remove, set) = strip_tokens(&sources, &headers(&[("authorization", "Basic eA==")]), "/x");
        assert!(remove.is_empty() && set.is_empty());
    }

    #[test]
    fn header_names_match_in_any_case() {
        let sources = [TokenSource::bearer(), TokenSource::Cookie("agent_token".into())];
        let h = headers(&[("Authorization", "Bearer t"), ("Cookie", "a=1"), ("COOKIE", "agent_token=t; b=2")]);
        assert_eq!(find_token(&sources, &h, "/", MAX), Ok("t"));
        let (remove, set) = strip_tokens(&sources, &h, "/");
        assert_eq!(remove, ["authorization"]);
        assert_eq!(set, [("cookie", "a=1; b=2".to_string())]);
    }

    #[test]
    fn source_config_errors() {
        let raw = |h: Option<&str>, p: Option<&str>, c: Option<&str>, q: Option<&str>| TokenSourceConfig {
            header: h.map(Into::into),
            prefix: p.map(Into::into),
            cookie: c.map(Into::into),
            query: q.map(Into::into),
        };
        assert!(TokenSource::compile(&raw(None, None, None, None)).is_err());
        assert!(TokenSource::compile(&raw(Some("a"), None, Some("b"), None)).is_err());
        assert!(TokenSource::compile(&raw(None, Some("Bearer "), Some("b"), None)).is_err());
        assert_eq!(
            TokenSource::compile(&raw(Some("X-Token"), None, None, None)),
            Ok(TokenSource::Header { name: "x-token".into(), prefix: None })
        );
    }
}
