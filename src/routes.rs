//! Rule lookup by path: distinct path templates go into a matchit router, so the cost of
//! finding a request's rule does not grow with the number of rules. Templates a router
//! refuses to hold together (`/a/{id}/b` beside `/a/{*rest}`) go into another layer.
//!
//! A router answers with the most specific template, but rules are "first match wins". To
//! keep that exact, each template also lists the templates that could match some of the same
//! paths (found once, at configure time); only those are checked in addition, and in
//! practice there are few.
//!
//! Requests are routed in canonical form ([`crate::canonical`]): static template text is
//! folded to lower case like the request path, and parameter values are taken, at the same
//! byte offsets, from the decoded path that kept its case.

use crate::canonical::CanonicalPath;
use matchit::Router;

/// Compiled path templates and which rules use them.
#[derive(Debug, Default)]
pub struct RouteTable {
    layers: Vec<Router<usize>>,
    templates: Vec<Template>,
    /// Rules without a path template: they match every path.
    any_path: Vec<usize>,
}

#[derive(Debug)]
struct Template {
    source: String,
    /// Indices of the rules using this template, ascending.
    rules: Vec<usize>,
    /// Other templates that may match the same paths.
    overlaps: Vec<usize>,
    /// This template alone, to test one overlapping template against a path.
    alone: Router<()>,
}

impl RouteTable {
    /// Adds rule `rule` (rules must be added in ascending order) for `template`, or for every
    /// path when `None`. Errors are messages for the rule's `match.path`.
    pub fn add(&mut self, rule: usize, template: Option<&str>) -> Result<(), String> {
        let Some(template) = template else {
            self.any_path.push(rule);
            return Ok(());
        };
        validate_template(template)?;
        let folded = fold_template(template);
        let template = folded.as_str();
        if let Some(existing) = self.templates.iter_mut().find(|t| t.source == template) {
            existing.rules.push(rule);
            return Ok(());
        }
        let id = self.templates.len();
        // Alone, a template can only fail for its syntax; in a layer, only by conflict.
        let mut alone = Router::new();
        alone.insert(template, ()).map_err(|e| format!("invalid path template: {e}"))?;
        if !self.layers.iter_mut().any(|layer| layer.insert(template, id).is_ok()) {
            let mut layer = Router::new();
            layer.insert(template, id).map_err(|e| format!("invalid path template: {e}"))?;
            self.layers.push(layer);
        }
        self.templates.push(Template { source: template.to_string(), rules: vec![rule], overlaps: Vec::new(), alone });
        Ok(())
    }

    /// Whether no rule was added.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty() && self.any_path.is_empty()
    }

    /// Computes the overlap lists; call once after all rules are added.
    pub fn finish(&mut self) {
        let overlaps: Vec<Vec<usize>> = {
            let shapes: Vec<Vec<Segment<'_>>> = self.templates.iter().map(|t| segments(&t.source)).collect();
            shapes
                .iter()
                .enumerate()
                .map(|(i, mine)| {
                    shapes
                        .iter()
                        .enumerate()
                        .filter(|&(j, other)| j != i && may_overlap(mine, other))
                        .map(|(j, _)| j)
                        .collect()
                })
                .collect()
        };
        for (template, overlaps) in self.templates.iter_mut().zip(overlaps) {
            template.overlaps = overlaps;
        }
    }

    /// The lowest-numbered rule whose template matches `path` and for which `accept` holds,
    /// with the path parameters its template captured.
    pub fn first_match(&self, path: &CanonicalPath, accept: impl Fn(usize) -> bool) -> Option<(usize, Params)> {
        let (folded, decoded) = (path.folded.as_str(), path.decoded.as_str());
        let collect = |params: &matchit::Params<'_, '_>| collect(params, folded, decoded);
        let first = |rules: &[usize]| rules.iter().copied().find(|&r| accept(r));
        let mut best: Option<(usize, Params)> = first(&self.any_path).map(|r| (r, Params::new()));
        let mut consider = |candidate: Option<usize>, params: &dyn Fn() -> Params| {
            if let Some(c) = candidate {
                if best.as_ref().is_none_or(|(b, _)| c < *b) {
                    best = Some((c, params()));
                }
            }
        };
        // Every template matching `path` overlaps the first one found, so its overlap list
        // covers the other layers too.
        if let Some(found) = self.layers.iter().find_map(|layer| layer.at(folded).ok()) {
            if let Some(template) = self.templates.get(*found.value) {
                consider(first(&template.rules), &|| collect(&found.params));
                for other in template.overlaps.iter().filter_map(|&j| self.templates.get(j)) {
                    if let Ok(m) = other.alone.at(folded) {
                        consider(first(&other.rules), &|| collect(&m.params));
                    }
                }
            }
        }
        best
    }
}

/// Path parameters by name, in template order.
pub type Params = Vec<(String, String)>;

/// The parameters matched in `folded`, read from `decoded` at the same offsets (folding
/// keeps every byte where it is).
fn collect(params: &matchit::Params<'_, '_>, folded: &str, decoded: &str) -> Params {
    params
        .iter()
        .map(|(k, v)| {
            let start = (v.as_ptr() as usize).wrapping_sub(folded.as_ptr() as usize);
            let value = decoded.get(start..start.saturating_add(v.len())).unwrap_or(v);
            (k.to_string(), value.to_string())
        })
        .collect()
}

/// The template with its static text in lower case (parameter names keep theirs).
fn fold_template(template: &str) -> String {
    let mut inside = false;
    template
        .chars()
        .map(|c| {
            match c {
                '{' => inside = true,
                '}' => inside = false,
                _ => {}
            }
            if inside {
                c
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// The parameter names of a template, in order (`{id}` → `id`, `{*rest}` → `rest`).
pub fn param_names(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = rest.get(start + 1..).unwrap_or("");
        if after.starts_with('{') {
            rest = after.get(1..).unwrap_or("");
            continue;
        }
        let Some(end) = after.find('}') else { break };
        names.push(after.get(..end).unwrap_or("").trim_start_matches('*').to_string());
        rest = after.get(end + 1..).unwrap_or("");
    }
    names
}

fn validate_template(template: &str) -> Result<(), String> {
    if !template.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if template.contains(['?', '#']) {
        return Err("must not contain a query or fragment".into());
    }
    if template.contains(['%', ';', '\\']) || template.contains("{{") || template.contains("}}") {
        return Err("must be written decoded, without '%', ';', '\\' or escaped braces".into());
    }
    if template.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".into());
    }
    // Static text is matched case-insensitively in ASCII only; backends that fold case fold
    // `É` too, so a non-ASCII static segment could be reached by a spelling that misses it.
    if segments_outside_braces(template).any(|c| !c.is_ascii()) {
        return Err("static text must be ASCII (match non-ASCII names with a parameter)".into());
    }
    let segments: Vec<&str> = template.split('/').skip(1).collect();
    if template != "/" && segments.iter().any(|s| s.is_empty()) {
        return Err("must not contain empty segments or end with '/' (a trailing slash in a request is ignored)".into());
    }
    if segments.iter().any(|s| s.ends_with('.')) {
        return Err("must not contain '.' or '..' segments, or a segment ending in '.'".into());
    }
    Ok(())
}

/// The characters of `template` outside `{…}` parameters.
fn segments_outside_braces(template: &str) -> impl Iterator<Item = char> + '_ {
    let mut inside = false;
    template.chars().filter(move |&c| {
        match c {
            '{' => inside = true,
            '}' => inside = false,
            _ => {}
        }
        !inside
    })
}

#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Static(&'a str),
    Param,
    CatchAll,
}

fn segments(template: &str) -> Vec<Segment<'_>> {
    template
        .split('/')
        .map(|s| match s {
            s if s.starts_with("{*") => Segment::CatchAll,
            // Segments with a parameter inside (`img-{id}.png`) are treated as parameters:
            // this check may over-approximate, never miss an overlap.
            s if s.contains('{') => Segment::Param,
            s => Segment::Static(s),
        })
        .collect()
}

fn may_overlap(a: &[Segment<'_>], b: &[Segment<'_>]) -> bool {
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Segment::CatchAll, _) | (_, Segment::CatchAll) => return true,
            (Segment::Static(x), Segment::Static(y)) if x != y => return false,
            _ => {}
        }
    }
    a.len() == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table(RouteTable);

    impl Table {
        fn first_match(&self, path: &str, accept: impl Fn(usize) -> bool) -> Option<usize> {
            self.0.first_match(&canonical(path), accept).map(|(rule, _)| rule)
        }
    }

    fn canonical(path: &str) -> CanonicalPath {
        crate::canonical::canonical_path(path, crate::canonical::PathParameters::Refuse)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn table(templates: &[Option<&str>]) -> Table {
        let mut t = RouteTable::default();
        for (i, template) in templates.iter().enumerate() {
            if let Err(e) = t.add(i, *template) {
                panic!("{template:?}: {e}");
            }
        }
        t.finish();
        Table(t)
    }

    #[test]
    fn parameter_and_static_templates_match() {
        let t = table(&[Some("/invoices/{id}"), Some("/health")]);
        assert_eq!(t.first_match("/invoices/42", |_| true), Some(0));
        assert_eq!(t.first_match("/health", |_| true), Some(1));
        assert_eq!(t.first_match("/invoices", |_| true), None);
        assert_eq!(t.first_match("/invoices/42/pay", |_| true), None);
    }

    #[test]
    fn first_rule_wins_even_when_a_later_one_is_more_specific() {
        let t = table(&[Some("/invoices/{id}"), Some("/invoices/special")]);
        assert_eq!(t.first_match("/invoices/special", |_| true), Some(0));
        // ...but when the first rule does not accept the request, the later one still can.
        assert_eq!(t.first_match("/invoices/special", |r| r == 1), Some(1));
    }

    #[test]
    fn catch_all_and_pathless_rules_take_part_in_order() {
        let t = table(&[Some("/files/{*rest}"), None, Some("/files/a/b")]);
        assert_eq!(t.first_match("/files/a/b", |r| r != 0), Some(1));
        assert_eq!(t.first_match("/anything", |_| true), Some(1));
        assert_eq!(t.first_match("/files/x/y/z", |_| true), Some(0));
    }

    #[test]
    fn templates_a_router_cannot_hold_together_still_match() {
        let t = table(&[Some("/a/{id}/b"), Some("/a/{*rest}"), Some("/a/{x}")]);
        assert_eq!(t.first_match("/a/1/b", |_| true), Some(0));
        assert_eq!(t.first_match("/a/1/c", |_| true), Some(1));
        assert_eq!(t.first_match("/a/1", |r| r != 1), Some(2));
        assert_eq!(t.first_match("/b", |_| true), None);
    }

    #[test]
    fn rules_sharing_a_template_keep_their_order() {
        let t = table(&[Some("/a/{x}"), Some("/a/{x}")]);
        assert_eq!(t.first_match("/a/1", |r| r == 1), Some(1));
        assert_eq!(t.first_match("/a/1", |_| true), Some(0));
    }

    #[test]
    fn bad_templates_are_explained() {
        let mut t = RouteTable::default();
        assert_eq!(t.add(0, Some("invoices")), Err("must start with '/'".into()));
        assert!(t.add(0, Some("/a/{*rest}/b")).is_err_and(|e| e.starts_with("invalid path template")));
        assert!(t.add(0, Some("/a/../b")).is_err());
        assert!(t.add(0, Some("/a?x=1")).is_err());
        for bad in ["/a/", "/a//b", "/a%20b", "/a;b", "/a/b.", "/a b", "/{{x}}", "/caf\u{e9}/{id}"] {
            assert!(t.add(0, Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn static_text_matches_in_any_case_and_parameters_keep_theirs() {
        let t = table(&[Some("/Invoices/{Id}/approve"), Some("/invoices/{*rest}")]);
        assert_eq!(
            t.0.first_match(&canonical("/INVOICES/Inv-42/%41pprove/"), |_| true),
            Some((0, vec![("Id".to_string(), "Inv-42".to_string())]))
        );
        assert_eq!(
            t.0.first_match(&canonical("/invoices/Caf%C3%A9/x"), |r| r == 1),
            Some((1, vec![("rest".to_string(), "Café/x".to_string())]))
        );
    }

    #[test]
    fn parameters_come_from_the_template_that_decided() {
        let t = table(&[Some("/invoices/{id}/pay"), Some("/invoices/{*rest}")]);
        assert_eq!(
            t.0.first_match(&canonical("/invoices/42/pay"), |_| true),
            Some((0, vec![("id".to_string(), "42".to_string())]))
        );
        assert_eq!(
            t.0.first_match(&canonical("/invoices/42/pay"), |r| r == 1),
            Some((1, vec![("rest".to_string(), "42/pay".to_string())]))
        );
        assert_eq!(param_names("/a/{id}/b/{*rest}"), ["id", "rest"]);
        assert_eq!(param_names("/img-{n}.png"), ["n"]);
        assert!(param_names("/a/{{x}}").is_empty());
    }

    #[test]
    fn overlap_detection() {
        let s = |t| segments(t);
        assert!(may_overlap(&s("/a/{x}"), &s("/a/b")));
        assert!(!may_overlap(&s("/a/{x}"), &s("/b/{x}")));
        assert!(!may_overlap(&s("/a/{x}"), &s("/a/{x}/c")));
        assert!(may_overlap(&s("/a/{*rest}"), &s("/a/b/c")));
    }
}
