//! The documents of a YAML manifest file, each parsed on its own into the JSON data model
//! (the model `kubectl` sends and the API server stores; it is what the typed resources
//! decode from).
//!
//! A file is cut at its document markers before anything is parsed. YAML forbids a line that
//! starts with `---` (followed by a space or the end of the line) anywhere but at a document
//! boundary, even inside a block scalar, so the cut is exact; it gives every document its own
//! number (empty ones counted, as a reader of the file counts them) and a syntax error in one
//! document leaves the others readable.

use serde_json::Value;

/// One document of a file.
#[derive(Debug, PartialEq)]
pub struct Document<'a> {
    /// 1-based, in file order; empty documents count.
    pub number: usize,
    /// The file's line the document's text starts at (1-based).
    pub first_line: usize,
    pub text: &'a str,
}

/// A document that could not be parsed.
#[derive(Debug, PartialEq)]
pub struct YamlError {
    /// The file's line of the error, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong, with the file's line and column when known.
    pub message: String,
}

fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

/// Whether a line holds YAML content (not blank, a comment or a directive).
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim();
        !(t.is_empty() || t.starts_with('#') || l.starts_with('%'))
    })
}

/// The documents of `text`, in order.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    // Byte offset and line number of every marker line.
    let mut starts = Vec::new();
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line.trim_end_matches('\n')) {
            starts.push((offset, i + 1));
        }
        offset += line.len();
    }
    let mut docs = Vec::new();
    // What precedes the first marker is a document only if it holds content (a file without
    // markers is one document; comments or directives before `---` are not one).
    let first = starts.first().map_or(text.len(), |s| s.0);
    if starts.is_empty() || has_content(&text[..first]) {
        docs.push((0, 1, &text[..first]));
    }
    for (k, &(start, line)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(text.len(), |s| s.0);
        docs.push((start, line, &text[start..end]));
    }
    docs.into_iter()
        .enumerate()
        .map(|(i, (_, first_line, text))| Document {
            number: i + 1,
            first_line,
            text,
        })
        .collect()
}

/// Parses one document; `Ok(None)` for an empty one (nothing, or only comments, or `null`).
pub fn parse(doc: &Document<'_>) -> Result<Option<Value>, YamlError> {
    if !has_content(doc.text.strip_prefix("---").unwrap_or(doc.text)) {
        return Ok(None);
    }
    match crate::yaml::from_str::<Value>(doc.text) {
        Ok(Value::Null) => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let at = e
                .location()
                .map(|l| (doc.first_line + l.line() as usize - 1, l.column() as usize));
            // The parser's own position is within the document; say the file's.
            let what = crate::yaml::short_message(&e);
            Err(YamlError {
                line: at.map(|(l, _)| l),
                message: match at {
                    Some((line, column)) => format!("{what} (line {line} column {column})"),
                    None => what,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers_and_lines(text: &str) -> Vec<(usize, usize)> {
        documents(text)
            .iter()
            .map(|d| (d.number, d.first_line))
            .collect()
    }

    #[test]
    fn documents_are_cut_at_markers_only() {
        assert_eq!(numbers_and_lines("a: 1\n"), [(1, 1)]);
        assert_eq!(numbers_and_lines("a: 1\n---\nb: 2\n"), [(1, 1), (2, 2)]);
        // Comments before the first marker are no document.
        assert_eq!(numbers_and_lines("# c\n---\na: 1\n---\n"), [(1, 2), (2, 4)]);
        // An empty document between two counts.
        assert_eq!(
            numbers_and_lines("---\na: 1\n---\n---\nb: 2\n"),
            [(1, 1), (2, 3), (3, 4)]
        );
        // `---x` and an indented `---` are content, not markers.
        assert_eq!(numbers_and_lines("a: |\n  ---\n  x\nb: ---x\n"), [(1, 1)]);
    }

    #[test]
    fn documents_parse_to_json_values() {
        let docs = documents("---\nkind: A\nn: [1, 2]\n---\n# only a comment\n---\nnull\n");
        assert_eq!(
            parse(&docs[0]).unwrap(),
            Some(serde_json::json!({"kind": "A", "n": [1, 2]}))
        );
        assert_eq!(parse(&docs[1]).unwrap(), None);
        assert_eq!(parse(&docs[2]).unwrap(), None);
    }

    #[test]
    fn a_syntax_error_names_the_files_line() {
        let text = "a: 1\n---\nb: 2\nc: [1, 2\nd: 3\n---\ne: 5\n";
        let docs = documents(text);
        let err = parse(&docs[1]).unwrap_err();
        let line = err.line.unwrap();
        assert!((4..=6).contains(&line), "{err:?}");
        assert!(err.message.contains(&format!("line {line}")), "{err:?}");
        // The documents around it still parse.
        assert!(parse(&docs[0]).unwrap().is_some());
        assert!(parse(&docs[2]).unwrap().is_some());
    }

    #[test]
    fn merge_keys_and_anchors_resolve() {
        let docs = documents("base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n");
        assert_eq!(
            parse(&docs[0]).unwrap().unwrap()["merged"],
            serde_json::json!({"x": 1, "y": 2})
        );
    }

    #[test]
    fn a_duplicate_key_is_an_error() {
        let docs = documents("a: 1\na: 2\n");
        assert!(parse(&docs[0]).is_err());
    }
}
