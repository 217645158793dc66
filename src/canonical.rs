//! The request as rules see it: one canonical spelling of its method, host and path, or a
//! refusal. Rules are first-match-wins, so any other spelling of an operation that a backend
//! routes to the same handler must reach the same rule — or be refused (400) — never fall
//! through to a broader rule. Backends disagree (Spring decodes and strips `;` parameters,
//! Tomcat resolves `..;`, Express matches case-insensitively and ignores a trailing slash,
//! IIS decodes `%u` and drops trailing dots), so the gate takes the union of what they do:
//!
//! - percent-escapes are decoded (RFC 3986 §6.2.2, and beyond: a backend decodes every
//!   escape before routing); an escape that is not two hex digits (`%u2e`), `%25` (double
//!   encoding), an encoded `/` or `\`, and decoded text that is not UTF-8 (overlong `%c0%ae`)
//!   are refused;
//! - static path text is compared case-insensitively (ASCII) and one trailing slash is
//!   ignored; parameter values keep their case;
//! - refused: `#`, `\`, `//`, dot segments in any spelling, a segment ending in `.`,
//!   whitespace and control characters (raw or encoded), `;` segment parameters unless the
//!   policy ignores them, and characters a backend may fold into ASCII (fullwidth forms, `ſ`,
//!   the Kelvin sign);
//! - a method that is a case variant of a standard one (`post`) is refused;
//! - a host is compared without port, case or one trailing dot.

use crate::reason::Reason;

/// How `;` parameters inside path segments (`/a;v=1/b`, RFC 3986 §3.3) are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum PathParameters {
    /// Refused (400): servlet containers and Spring strip them, other backends do not.
    #[default]
    Refuse,
    /// Matched without them (`/a;v=1/b` as `/a/b`) and forwarded as sent.
    Ignore,
}

/// A request path in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// Decoded, without `;` parameters or a trailing slash: parameter values come from here.
    pub decoded: String,
    /// `decoded` with ASCII letters in lower case, byte for byte: rules are routed on it.
    pub folded: String,
}

/// The path without its query string or fragment.
pub fn strip_query(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

/// The canonical form of the path of request target `target` (query ignored).
pub fn canonical_path(target: &str, parameters: PathParameters) -> Result<CanonicalPath, Reason> {
    const REFUSED: Reason = Reason::NonCanonicalPath;
    // A fragment is never sent by a client; a raw `#` is something else being tried.
    if target.contains('#') {
        return Err(REFUSED);
    }
    let raw = strip_query(target);
    if !raw.starts_with('/') {
        return Err(REFUSED);
    }
    let decoded = percent_decode(raw).ok_or(REFUSED)?;
    let mut canonical = String::with_capacity(decoded.len());
    let mut segments = decoded.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let segment = match (segment.split_once(';'), parameters) {
            (None, _) => segment,
            (Some((name, _)), PathParameters::Ignore) => name,
            (Some(_), PathParameters::Refuse) => return Err(REFUSED),
        };
        if segment.is_empty() {
            // `/` alone, or one trailing slash: the same resource for the backends that matter.
            if last {
                break;
            }
            return Err(REFUSED);
        }
        if segment == "." || segment == ".." || segment.ends_with('.') {
            return Err(REFUSED);
        }
        canonical.push('/');
        canonical.push_str(segment);
    }
    if canonical.is_empty() {
        canonical.push('/');
    }
    let folded = canonical.to_ascii_lowercase();
    Ok(CanonicalPath { decoded: canonical, folded })
}

/// `raw` with every percent-escape decoded; `None` when an escape or the result is one a
/// backend could read another way.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let decoded = if byte == b'%' {
            let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
            let value = hex(i + 1)? * 16 + hex(i + 2)?;
            i += 3;
            let value = u8::try_from(value).ok()?;
            // Double encoding, and escapes that change the path's structure.
            if matches!(value, b'%' | b'/' | b'\\') {
                return None;
            }
            value
        } else {
            i += 1;
            if byte == b'\\' {
                return None;
            }
            byte
        };
        if decoded.is_ascii_control() || decoded == b' ' {
            return None;
        }
        out.push(decoded);
    }
    // Overlong forms and lone surrogates are not UTF-8: refused here.
    let text = String::from_utf8(out).ok()?;
    text.chars().filter(|c| !c.is_ascii()).all(|c| !confusable(c)).then_some(text)
}

/// Non-ASCII characters some backend may turn into ASCII, or read as a separator: fullwidth
/// forms (NFKC), characters whose case mapping is ASCII (`ſ` → `S`, `K` → `k`, `ı` → `I`),
/// whitespace, and U+FFFD (bytes that were not UTF-8 before the host replaced them). `ß`
/// (full upper case `SS`) is a letter of its own in every backend's simple case mapping.
fn confusable(c: char) -> bool {
    ('\u{ff01}'..='\u{ff5e}').contains(&c)
        || c == char::REPLACEMENT_CHARACTER
        || c.is_whitespace()
        || c.is_control()
        || (c != 'ß' && c.to_lowercase().chain(c.to_uppercase()).any(|m| m.is_ascii()))
}

/// The standard methods (RFC 9110 §9, RFC 5789).
const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// Methods are case-sensitive (RFC 9110 §9.1), but many backends are not: `post` is refused
/// rather than treated as an unknown method that rules for `POST` do not match.
pub fn check_method(method: &str) -> Result<(), Reason> {
    let variant = METHODS.iter().any(|m| m.eq_ignore_ascii_case(method) && *m != method);
    if variant || method.is_empty() {
        Err(Reason::NonCanonicalMethod)
    } else {
        Ok(())
    }
}

/// The host of an authority, as `hosts` rules see it: lower case, without port or one
/// trailing dot (`Admin.Example.com.:443` → `admin.example.com`). `None` for anything that
/// is not a DNS name or IP literal, which `hosts` rules then refuse.
pub fn canonical_host(authority: &str) -> Option<String> {
    let host = match authority.strip_prefix('[') {
        Some(v6) => {
            let (literal, rest) = v6.split_once(']')?;
            let port_ok = rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port);
            let literal_ok = literal.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            return (port_ok && literal_ok && !literal.is_empty()).then(|| literal.to_ascii_lowercase());
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return None,
            None => authority,
        },
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.split('.').all(|label| !label.is_empty())
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then(|| host.to_ascii_lowercase())
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(target: &str) -> Result<String, Reason> {
        canonical_path(target, PathParameters::Refuse).map(|p| p.folded)
    }

    #[test]
    fn plain_paths_keep_working() {
        assert_eq!(folded("/"), Ok("/".into()));
        assert_eq!(folded("/invoices/42?x=a%2Fb&y=%25"), Ok("/invoices/42".into()));
        assert_eq!(canonical_path("/caf%C3%A9/X", PathParameters::Refuse).map(|p| p.decoded), Ok("/café/X".into()));
        assert_eq!(folded("/a-b_c~d/%41.json"), Ok("/a-b_c~d/a.json".into()));
        assert_eq!(folded("/stra%C3%9Fe/\u{e9}"), Ok("/straße/\u{e9}".into()));
    }

    #[test]
    fn other_spellings_fold_into_one() {
        for spelling in
            ["/invoices/42/approve", "/invoices/42/%61pprove", "/invoices/42/APPROVE", "/invoices/42/approve/"]
        {
            assert_eq!(folded(spelling), Ok("/invoices/42/approve".into()), "{spelling}");
        }
        assert_eq!(canonical_path("/a;v=1/b;x", PathParameters::Ignore).map(|p| p.decoded), Ok("/a/b".into()));
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        for bad in [
            "",
            "invoices",
            "/public/..;/admin",
            "/public/%252e%252e/admin",
            "/public/%c0%ae%c0%ae/admin",
            "/public/x#/../../admin",
            "/public/%2e%2e/admin",
            "/public/%2E/admin",
            "/a/../b",
            "/a/./b",
            "//a",
            "/a//b",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%u002e",
            "/a%2",
            "/a%zz",
            "/a%20",
            "/a%09b",
            "/a%00",
            "/a b",
            "/admin.",
            "/admin;x",
            "/admin%3Bx",
            "/ad\u{ff4d}in",
            "/\u{17f}ecret",
            "/\u{212a}ey",
            "/\u{130}d",
            "/a\u{a0}b",
            "/a\u{fffd}",
            "/a%ff",
        ] {
            assert_eq!(folded(bad), Err(Reason::NonCanonicalPath), "{bad:?}");
        }
        assert_eq!(canonical_path("/public/..;/admin", PathParameters::Ignore), Err(Reason::NonCanonicalPath));
        assert_eq!(canonical_path("/;x/admin", PathParameters::Ignore), Err(Reason::NonCanonicalPath));
    }

    #[test]
    fn method_case_variants_are_refused() {
        assert_eq!(check_method("POST"), Ok(()));
        assert_eq!(check_method("PROPFIND"), Ok(()));
        assert_eq!(check_method("post"), Err(Reason::NonCanonicalMethod));
        assert_eq!(check_method("Get"), Err(Reason::NonCanonicalMethod));
        assert_eq!(check_method(""), Err(Reason::NonCanonicalMethod));
    }

    #[test]
    fn hosts_are_compared_without_case_port_or_trailing_dot() {
        for spelling in ["admin.example.com", "ADMIN.Example.com.", "admin.example.com.:8443", "admin.example.com:443"]
        {
            assert_eq!(canonical_host(spelling).as_deref(), Some("admin.example.com"), "{spelling}");
        }
        assert_eq!(canonical_host("[2001:DB8::1]:443").as_deref(), Some("2001:db8::1"));
        for bad in ["", "admin..example.com", "admin.example.com..", "%61dmin.example.com", "a b", "a:b:c", "[::1"] {
            assert_eq!(canonical_host(bad), None, "{bad:?}");
        }
    }
}
