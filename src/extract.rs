//! Stage 1: find the bearer token in the request (RFC 6750 section 2.1).

use crate::reason::Reason;

/// Tokens longer than this are refused before any parsing or crypto.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive). `headers` names
/// are lower-case, as HTTP/2 and Envoy deliver them. A non-Bearer `Authorization` counts as
/// no token; two different bearer tokens are an invalid request.
pub fn bearer_token(headers: &[(String, String)]) -> Result<&str, Reason> {
    let mut found: Option<&str> = None;
    for (name, value) in headers {
        if name != "authorization" {
            continue;
        }
        let Some(token) = bearer_credentials(value) else { continue };
        match found {
            Some(previous) if previous != token => return Err(Reason::MultipleTokens),
            _ => found = Some(token),
        }
    }
    let token = found.ok_or(Reason::MissingToken)?;
    if token.is_empty() {
        return Err(Reason::Malformed);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Reason::TokenTooLarge);
    }
    Ok(token)
}

fn bearer_credentials(value: &str) -> Option<&str> {
    let value = value.trim();
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let rest = value.get(6..)?;
    if rest.is_empty() {
        return Some(rest);
    }
    rest.starts_with(' ').then(|| rest.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc"] {
            assert_eq!(bearer_token(&headers(&[("authorization", value)])), Ok("abc"), "{value}");
        }
    }

    #[test]
    fn missing_or_other_scheme_is_missing_token() {
        assert_eq!(bearer_token(&headers(&[])), Err(Reason::MissingToken));
        assert_eq!(bearer_token(&headers(&[("authorization", "Basic dXNlcg==")])), Err(Reason::MissingToken));
        assert_eq!(bearer_token(&headers(&[("authorization", "Bearerabc")])), Err(Reason::MissingToken));
    }

    #[test]
    fn empty_bearer_is_malformed() {
        assert_eq!(bearer_token(&headers(&[("authorization", "Bearer")])), Err(Reason::Malformed));
    }

    #[test]
    fn two_different_tokens_are_an_invalid_request() {
        let h = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(bearer_token(&h), Err(Reason::MultipleTokens));
        let same = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]);
        assert_eq!(bearer_token(&same), Ok("a"));
    }

    #[test]
    fn oversized_token_is_refused_before_parsing() {
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer_token(&headers(&[("authorization", &big)])), Err(Reason::TokenTooLarge));
    }
}
