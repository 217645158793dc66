//! Identity patterns such as `spiffe://corp.example/agent/*`: `*` matches any run of
//! characters (including none, including `/`); everything else matches itself.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The text between the `*`s.
    parts: Vec<String>,
    wildcard: bool,
}

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        Ok(Pattern { parts: pattern.split('*').map(str::to_string).collect(), wildcard: pattern.contains('*') })
    }

    pub fn matches(&self, text: &str) -> bool {
        let (Some(first), Some(last)) = (self.parts.first(), self.parts.last()) else { return false };
        if !self.wildcard {
            return text == first;
        }
        if text.len() < first.len() + last.len() || !text.starts_with(first.as_str()) || !text.ends_with(last.as_str())
        {
            return false;
        }
        // Greedy left-to-right search of the middle parts is exact for `*` globs.
        let mut rest = text.get(first.len()..text.len() - last.len()).unwrap_or("");
        for part in self.parts.iter().skip(1).take(self.parts.len().saturating_sub(2)) {
            match rest.find(part.as_str()) {
                Some(at) => rest = rest.get(at + part.len()..).unwrap_or(""),
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Pattern::new(pattern).is_ok_and(|p| p.matches(text))
    }

    #[test]
    fn exact_prefix_suffix_and_inner_wildcards() {
        assert!(m("agent-7", "agent-7"));
        assert!(!m("agent-7", "agent-70"));
        assert!(m("spiffe://corp.example/agent/*", "spiffe://corp.example/agent/invoices/7"));
        assert!(!m("spiffe://corp.example/agent/*", "spiffe://corp.example/user/7"));
        assert!(m("*@corp.example", "bot@corp.example"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "a-b-b-c"));
        assert!(!m("a*b*c", "ac"));
        assert!(!m("ab*ba", "aba"), "prefix and suffix must not overlap");
        assert!(m("*", ""));
        assert!(Pattern::new("").is_err());
    }
}
