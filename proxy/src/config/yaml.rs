//! YAML plumbing: split a stream into documents, read a document's header, and
//! deserialize a document into a typed resource with the field path of any error.

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub(crate) use serin_control_api::yaml::{Document, split_documents};

/// A deserialization problem in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    /// Field path (`spec.http[0].timeout`); empty when unknown or the document root.
    pub path: String,
    pub message: String,
    /// Line and column in the whole stream.
    pub location: Option<(u32, u32)>,
}

/// The identifying part of a document (other keys are ignored here).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Header {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: Option<HeaderMeta>,
}

/// `metadata.name` / `metadata.namespace`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct HeaderMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

impl Header {
    /// `apiVersion` ("" when missing).
    pub fn api_version(&self) -> &str {
        self.api_version.as_deref().unwrap_or("")
    }
    /// `kind` ("" when missing).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("")
    }
    /// `namespace/name` for messages.
    pub fn name(&self) -> String {
        let meta = self.metadata.as_ref();
        let ns = meta.and_then(|m| m.namespace.as_deref()).unwrap_or("default");
        let name = meta.and_then(|m| m.name.as_deref()).unwrap_or("");
        format!("{ns}/{name}")
    }
}

/// Reads a document's header; `Ok(None)` for an empty document (only comments,
/// or nothing). Syntax errors come out here, with line and column.
pub(crate) fn parse_header(doc: Document<'_>) -> Result<Option<Header>, YamlError> {
    match serde_saphyr::from_str::<Option<Header>>(doc.text) {
        Ok(header) => Ok(header),
        Err(error) => Err(convert_error(doc, String::new(), &error)),
    }
}

/// Deserializes a whole document into `T`, naming the field path on error.
pub(crate) fn parse_typed<T: DeserializeOwned>(doc: Document<'_>) -> Result<T, YamlError> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(doc.text, |de| match serde_path_to_error::deserialize(de) {
        Ok(value) => Ok(value),
        Err(error) => {
            path = error.path().to_string();
            Err(error.into_inner())
        }
    });
    result.map_err(|error| {
        let path = if path == "." { String::new() } else { path };
        convert_error(doc, path, &error)
    })
}

fn convert_error(doc: Document<'_>, path: String, error: &serde_saphyr::Error) -> YamlError {
    let mut message = error.without_snippet().to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    let location = error
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| (u32::try_from(l.line()).unwrap_or(u32::MAX), u32::try_from(l.column()).unwrap_or(u32::MAX)));
    if let Some((line, column)) = location {
        // Name the offending value when the message does not already.
        if !message.contains('`')
            && !message.contains("missing field")
            && let Some(value) = value_at(doc.text, line, column)
        {
            message = format!("{message}: {value:?}");
        }
    }
    let location = location.map(|(line, column)| (line.saturating_add(doc.first_line - 1), column));
    YamlError { path, message, location }
}

/// The scalar text at a 1-based line and character column, for messages.
fn value_at(text: &str, line: u32, column: u32) -> Option<String> {
    let line_text = text.lines().nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let start = usize::try_from(column).ok()?.checked_sub(1)?;
    let rest: String = line_text.chars().skip(start).collect();
    let rest = match rest.find(" #") {
        Some(cut) => &rest[..cut],
        None => rest.as_str(),
    };
    let value = rest.trim();
    if value.is_empty() || value.starts_with(['{', '[', '-', '|', '>']) {
        return None;
    }
    Some(value.chars().take(80).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_keeps_line_numbers() {
        let text = "a: 1\n---\nb: 2\n--- # c\n\n---\nc: 3\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 4);
        assert_eq!((docs[0].first_line, docs[0].text), (1, "a: 1\n"));
        assert_eq!((docs[1].first_line, docs[1].text), (2, "---\nb: 2\n"));
        assert_eq!(docs[2].first_line, 4);
        assert_eq!((docs[3].first_line, docs[3].text), (6, "---\nc: 3\n"));
        assert!(split_documents("").is_empty());
        assert_eq!(split_documents("---\nx: y\n").len(), 1);
        assert_eq!(split_documents("x: '---'\ny: ----\n").len(), 1);
    }

    #[test]
    fn empty_documents_have_no_header() {
        for text in ["", "# only a comment\n", "---\n"] {
            let doc = Document { text, first_line: 1 };
            assert!(parse_header(doc).expect("empty is fine").is_none(), "{text:?}");
        }
    }

    #[test]
    fn syntax_error_has_stream_line_and_column() {
        let text = "a: 1\n---\nkind: X\nspec:\n  hosts: [a\n  http: [\n";
        let docs = split_documents(text);
        let err = parse_header(docs[1]).expect_err("syntax error");
        let (line, column) = err.location.expect("location");
        assert!(line >= 5, "{err:?}");
        assert!(column >= 1);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        spec: Spec,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Spec {
        items: Vec<Item>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        weight: Option<i64>,
    }

    #[test]
    fn typed_errors_name_path_and_value() {
        let doc = Document { text: "spec:\n  items:\n  - weight: 1\n  - wieght: 2\n", first_line: 10 };
        let err = parse_typed::<Doc>(doc).expect_err("unknown field");
        assert_eq!(err.path, "spec.items[1].wieght");
        assert!(err.message.contains("unknown field `wieght`"), "{}", err.message);
        assert_eq!(err.location, Some((13, 5)));

        let doc = Document { text: "spec:\n  items:\n  - weight: abc\n", first_line: 1 };
        let err = parse_typed::<Doc>(doc).expect_err("bad int");
        assert_eq!(err.path, "spec.items[0].weight");
        assert!(err.message.contains("\"abc\""), "{}", err.message);
    }
}
