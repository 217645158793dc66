//! The examples in docs/policy.md are real: each JSON policy compiles, or fails with exactly
//! the error printed after it; the reason table matches the code.

// Test code: a panic is how a test fails.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use agentgate::{Gate, Reason};

const POLICY_DOC: &str = include_str!("../docs/policy.md");

/// (language, body) of each fenced block.
fn blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

#[test]
fn every_policy_example_behaves_as_documented() {
    let blocks = blocks(POLICY_DOC);
    let mut checked = 0;
    for (i, (lang, body)) in blocks.iter().enumerate() {
        if lang != "json" {
            continue;
        }
        let expected_error = blocks
            .get(i + 1)
            .filter(|(lang, _)| lang == "text")
            .and_then(|(_, text)| text.trim().strip_prefix("error: ").map(str::to_string));
        match (Gate::from_json(body), expected_error) {
            (Ok(_), None) => {}
            (Err(e), Some(expected)) => assert_eq!(e.to_string(), expected, "example {i}"),
            (Ok(_), Some(expected)) => panic!("example {i} was accepted, docs say: {expected}"),
            (Err(e), None) => panic!("example {i} is refused: {e}\n{body}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 17);
}

#[test]
fn reason_table_matches_the_code() {
    let rows: Vec<Vec<String>> = POLICY_DOC
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('|').map(|c| c.trim().trim_matches('`').to_string()).collect())
        .filter(|cells: &Vec<String>| Reason::ALL.iter().any(|r| Some(r.code()) == cells.get(1).map(String::as_str)))
        // Rows of the decision table have a status; a config field may share a reason's name.
        .filter(|cells: &Vec<String>| cells.get(2).is_some_and(|c| c.parse::<u16>().is_ok()))
        .collect();
    assert_eq!(rows.len(), Reason::ALL.len(), "every reason is documented once");
    for reason in Reason::ALL {
        let spec = reason.spec();
        let row = rows.iter().find(|r| r.get(1).map(String::as_str) == Some(spec.code)).expect("row");
        assert_eq!(row.get(2), Some(&spec.status.to_string()), "{}", spec.code);
        assert_eq!(row.get(3).map(String::as_str), Some(spec.error.unwrap_or("—")), "{}", spec.code);
    }
}
