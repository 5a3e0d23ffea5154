//! Errors of the model stage: sources -> **model** (what was wrong, and exactly where).

use std::fmt;

use crate::key::ObjectKey;

/// Why one document could not become an object. A bad document never yields a partial object.
///
/// Displays as `{file}: document {n} ({object}): {path}: {reason}`; the object part is
/// omitted when the document's kind/name could not be read, the path part when the error is
/// not about one field (for example a YAML syntax error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file name the caller passed to [`crate::parse_file`].
    pub file: String,
    /// 1-based index of the document inside the file.
    pub document: usize,
    /// The object the document defines, when its kind, namespace and name could be read.
    /// Lets the caller keep the last good version of exactly that object.
    pub object: Option<ObjectKey>,
    /// Field path inside the document, e.g. `spec.ingress[2].toPorts[0].rules.http[1].path`.
    /// Empty when the error concerns the whole document.
    pub path: String,
    /// What is wrong, for an operator.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A problem at one field path, before the file/document context is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) path: String,
    pub(crate) reason: String,
}

impl FieldError {
    pub(crate) fn new(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Joins a field path and a child segment: `a` + `b` = `a.b`, `a` + `[1]` = `a[1]`.
pub(crate) fn join(base: &str, child: &str) -> String {
    if base.is_empty() {
        child.to_string()
    } else if child.is_empty() {
        base.to_string()
    } else if child.starts_with('[') {
        format!("{base}{child}")
    } else {
        format!("{base}.{child}")
    }
}

/// Deserializes `value` into `T`, reporting failures at `base` + the path serde reached.
pub(crate) fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    base: &str,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let inner = render_path(error.path());
        FieldError::new(join(base, &inner), error.into_inner().to_string())
    })
}

fn render_path(path: &serde_path_to_error::Path) -> String {
    let mut rendered = String::new();
    for segment in path.iter() {
        let piece = match segment {
            serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
            serde_path_to_error::Segment::Map { key } => key.clone(),
            serde_path_to_error::Segment::Enum { variant } => variant.clone(),
            serde_path_to_error::Segment::Unknown => "?".to_string(),
        };
        rendered = join(&rendered, &piece);
    }
    rendered
}

/// One-line reason for a regex compile error (the regex crate's message spans several lines
/// with a caret diagram; its last `error:` line says what is wrong).
pub(crate) fn regex_reason(pattern: &str, error: &regex::Error) -> String {
    let detail = match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .unwrap_or(text.as_str())
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("compiled regex exceeds the size limit of {limit} bytes")
        }
        other => other.to_string(),
    };
    format!("invalid regex `{pattern}`: {detail}")
}
