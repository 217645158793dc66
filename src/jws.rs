//! Parsing a compact JWS carrying JWT claims (RFC 7515 / RFC 7519), strictly and cheaply,
//! before any crypto: exactly three non-empty segments, unpadded base64url, size, nesting
//! and claim-count limits, typed header and claims, duplicate members refused.

use crate::reason::Reason;
use base64ct::{Base64UrlUnpadded, Encoding};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Limits applied to every token before it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_token_bytes: usize,
    /// Nesting depth of the header and claims JSON (the top-level object is depth 1).
    pub max_json_depth: usize,
    /// Number of top-level members in the claims.
    pub max_claims: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_token_bytes: 8 * 1024, max_json_depth: 16, max_claims: 100 }
    }
}

/// The JOSE header members agentgate reads. `jku`, `jwk`, `x5u` and `x5c` are ignored on
/// purpose: keys come from the policy only, never from the token.
#[derive(Debug, Deserialize)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
    /// Extensions the recipient must understand (RFC 7515 section 4.1.11). agentgate
    /// understands none, so any `crit` makes the token invalid.
    pub crit: Option<Value>,
    /// `b64: false` (RFC 7797) changes what is signed; not supported.
    pub b64: Option<Value>,
}

/// The registered claims agentgate reads, plus the authorization-relevant ones.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<Audience>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub nbf: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub iat: Option<i64>,
    pub jti: Option<String>,
    /// RFC 8693 / RFC 9068: space-delimited.
    pub scope: Option<String>,
    /// The array form some issuers use instead.
    pub scp: Option<Vec<String>>,
    /// RFC 8693 delegation: the current actor, with earlier actors nested inside.
    pub act: Option<Actor>,
    /// RFC 8693: who may act for the subject.
    pub may_act: Option<Value>,
    /// RFC 9396 task entries.
    pub authorization_details: Option<Value>,
    /// Authentication context class and time (OIDC; RFC 9470 step-up).
    pub acr: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub auth_time: Option<i64>,
    /// RFC 7800 confirmation: the key (RFC 9449 `jkt`) or certificate (RFC 8705) the token is
    /// bound to.
    pub cnf: Option<Confirmation>,
}

#[derive(Debug, Deserialize)]
pub struct Confirmation {
    pub jkt: Option<String>,
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Actor {
    pub sub: Option<String>,
    pub act: Option<Box<Actor>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Audience::One(aud) => vec![aud.clone()],
            Audience::Many(auds) => auds.clone(),
        }
    }

    pub fn intersects(&self, allowed: &[String]) -> bool {
        match self {
            Audience::One(aud) => allowed.contains(aud),
            Audience::Many(auds) => auds.iter().any(|aud| allowed.contains(aud)),
        }
    }
}

/// RFC 7519 NumericDate: a JSON number of seconds, possibly fractional. Strings, booleans,
/// NaN and the like are errors; out-of-range values saturate (and then fail the time checks).
fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    let value = serde_json::Number::deserialize(deserializer)?;
    if let Some(i) = value.as_i64() {
        return Ok(Some(i));
    }
    if value.as_u64().is_some() {
        return Ok(Some(i64::MAX));
    }
    match value.as_f64() {
        // `as` saturates for floats out of the i64 range.
        Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
        _ => Err(serde::de::Error::custom("NumericDate out of range")),
    }
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Parsed<'t> {
    pub header: Header,
    pub claims: Claims,
    /// The claims as JSON text, for claims read by name (a provider's `task_claim`).
    pub claims_json: Vec<u8>,
    /// `header.payload` as sent: the bytes the signature covers.
    pub signed: &'t str,
    pub signature: Vec<u8>,
}

pub fn parse<'t>(token: &'t str, limits: &Limits) -> Result<Parsed<'t>, Reason> {
    if token.len() > limits.max_token_bytes {
        return Err(Reason::TokenTooLarge);
    }
    let mut segments = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(Reason::Malformed);
    };
    if header_b64.is_empty() || payload_b64.is_empty() || signature_b64.is_empty() {
        return Err(Reason::Malformed);
    }
    let decode = |segment: &str| Base64UrlUnpadded::decode_vec(segment).map_err(|_| Reason::Malformed);
    let (header_json, claims_json, signature) = (decode(header_b64)?, decode(payload_b64)?, decode(signature_b64)?);
    check_shape(&header_json, limits.max_json_depth, usize::MAX)?;
    check_shape(&claims_json, limits.max_json_depth, limits.max_claims)?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|_| Reason::Malformed)?;
    if header.crit.is_some() || header.b64.is_some() {
        return Err(Reason::Malformed);
    }
    let claims: Claims = serde_json::from_slice(&claims_json).map_err(|_| Reason::Malformed)?;
    let signed = token.get(..header_b64.len() + 1 + payload_b64.len()).ok_or(Reason::Malformed)?;
    Ok(Parsed { header, claims, claims_json, signed, signature })
}

/// One pass over the JSON text: refuses nesting deeper than `max_depth` and top-level objects
/// with more than `max_members` members, and anything whose top level is not an object.
/// Exact JSON validity is left to the parser; this only bounds its work.
fn check_shape(json: &[u8], max_depth: usize, max_members: usize) -> Result<(), Reason> {
    let (mut depth, mut members, mut seen_value_at_top) = (0usize, 0usize, false);
    for (i, byte) in structure(json) {
        match byte {
            b'"' if depth == 1 && !seen_value_at_top => {
                seen_value_at_top = true;
                members += 1;
            }
            b'{' | b'[' => {
                if depth == 0 && (byte != b'{' || i != first_non_space(json)) {
                    return Err(Reason::Malformed);
                }
                depth += 1;
                if depth > max_depth {
                    return Err(Reason::TokenTooLarge);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => seen_value_at_top = false,
            _ => {}
        }
        if members > max_members {
            return Err(Reason::TokenTooLarge);
        }
    }
    Ok(())
}

/// The bytes of JSON text outside strings, with their offsets; a string shows only as its
/// opening quote. Enough to bound nesting before a parser sees the text.
pub(crate) fn structure(json: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    json.iter().enumerate().filter_map(move |(i, &byte)| {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            return None;
        }
        in_string = byte == b'"';
        Some((i, byte))
    })
}

fn first_non_space(json: &[u8]) -> usize {
    json.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        Base64UrlUnpadded::encode_string(s.as_bytes())
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(claims), b64("sig"))
    }

    fn parse_err(token: &str) -> Option<Reason> {
        parse(token, &Limits::default()).err()
    }

    const H: &str = r#"{"alg":"ES256"}"#;

    #[test]
    fn well_formed_token_parses() {
        let t = token(H, r#"{"iss":"i","exp":1.9e9,"aud":["a"],"scope":"x y"}"#);
        let parsed = parse(&t, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.claims.exp, Some(1_900_000_000));
        assert_eq!(parsed.signature, b"sig");
        assert_eq!(parsed.signed, t.rsplit_once('.').map(|(s, _)| s).unwrap_or_default());
    }

    #[test]
    fn structure_errors_are_malformed() {
        let good = token(H, "{}");
        let (h, rest) = good.split_once('.').unwrap_or_default();
        for bad in [
            String::new(),
            "a.b".into(),
            format!("{good}.x"),
            format!("{h}..x"),
            format!("{h}.{rest}=="),
            format!("{}.{rest}", h.replace('e', "+")),
            format!(" {good}"),
            format!("{h}.e30/.x"),
            format!("{h}.e30=.x"),
        ] {
            assert_eq!(parse_err(&bad), Some(Reason::Malformed), "{bad}");
        }
    }

    #[test]
    fn claim_types_are_enforced() {
        for claims in [
            r#"{"exp":"1900000000"}"#,
            r#"{"exp":true}"#,
            r#"{"nbf":[1]}"#,
            r#"{"iss":5}"#,
            r#"{"aud":[1]}"#,
            r#"{"scp":"a"}"#,
            "[]",
            "1",
            r#""x""#,
        ] {
            assert_eq!(parse_err(&token(H, claims)), Some(Reason::Malformed), "{claims}");
        }
    }

    #[test]
    fn extreme_numbers_saturate() {
        for (exp, want) in [("-5", -5), ("1e300", i64::MAX), ("-1e300", i64::MIN), ("18446744073709551615", i64::MAX)] {
            let t = token(H, &format!(r#"{{"exp":{exp}}}"#));
            assert_eq!(parse(&t, &Limits::default()).map(|p| p.claims.exp), Ok(Some(want)), "{exp}");
        }
    }

    #[test]
    fn duplicate_members_are_refused() {
        assert_eq!(parse_err(&token(H, r#"{"exp":1,"exp":2000000000}"#)), Some(Reason::Malformed));
        assert_eq!(parse_err(&token(r#"{"alg":"none","alg":"ES256"}"#, "{}")), Some(Reason::Malformed));
    }

    #[test]
    fn crit_and_b64_are_refused() {
        assert_eq!(parse_err(&token(r#"{"alg":"ES256","crit":["exp"],"exp":1}"#, "{}")), Some(Reason::Malformed));
        assert_eq!(parse_err(&token(r#"{"alg":"ES256","b64":false,"crit":["b64"]}"#, "{}")), Some(Reason::Malformed));
    }

    #[test]
    fn limits_are_checked_before_parsing() {
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse_err(&token(H, &deep)), Some(Reason::TokenTooLarge));
        let many: Vec<String> = (0..101).map(|i| format!(r#""c{i}":1"#)).collect();
        assert_eq!(parse_err(&token(H, &format!("{{{}}}", many.join(",")))), Some(Reason::TokenTooLarge));
        let few: Vec<String> = (0..100).map(|i| format!(r#""c{i}":"a,b""#)).collect();
        assert!(parse(&token(H, &format!("{{{}}}", few.join(","))), &Limits::default()).is_ok());
        let huge = "a".repeat(1 << 20);
        assert_eq!(parse_err(&huge), Some(Reason::TokenTooLarge));
    }
}
