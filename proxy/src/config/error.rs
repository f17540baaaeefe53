//! Configuration errors: each names the file, the resource and the field.

use std::fmt;

/// One problem found while loading, validating or compiling configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or origin, e.g. `<embedded>`) the resource came from.
    pub file: String,
    /// 1-based line and column in `file`, when known (YAML syntax and type errors).
    pub location: Option<(u32, u32)>,
    /// `Kind namespace/name`, or empty when the error is not about one resource.
    pub resource: String,
    /// Field path, e.g. `spec.http[1].route[0].weight`; empty for the whole resource.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about a field of a resource.
    pub fn new(file: &str, resource: &str, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            location: None,
            resource: resource.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The same error at a line and column.
    pub fn at(mut self, line: u32, column: u32) -> ConfigError {
        self.location = Some((line, column));
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.resource.is_empty() {
            write!(f, ": {}", self.resource)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every error of a load or compile; `Display` prints one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn render_lines(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl ConfigErrors {
    /// Whether there is no error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The errors.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// `Ok(value)` when there is no error, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() { Ok(value) } else { Err(self) }
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Collects the errors of one resource, with its file and name filled in.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    pub file: &'a str,
    pub resource: String,
    pub errors: &'a mut Vec<ConfigError>,
}

impl Sink<'_> {
    /// Records an error at `field`.
    pub fn push(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(self.file, &self.resource, field, message));
    }

    /// Records "not supported by serin" for `field` when `present`.
    pub fn unsupported(&mut self, present: bool, field: &str, hint: &str) {
        if present {
            let mut message = "field is not supported by serin".to_string();
            if !hint.is_empty() {
                message.push_str(" (");
                message.push_str(hint);
                message.push(')');
            }
            self.push(field, message);
        }
    }

    /// Records the error of a `Result`, returning its value.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.push(field, message);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_location_resource_and_field() {
        let e = ConfigError::new("vs.yaml", "VirtualService prod/payment", "spec.http[0].timeout", "bad").at(3, 7);
        assert_eq!(e.to_string(), "vs.yaml:3:7: VirtualService prod/payment: spec.http[0].timeout: bad");
        let errors = ConfigErrors(vec![e.clone(), ConfigError::new("x.yaml", "", "", "oops")]);
        assert_eq!(errors.to_string().lines().count(), 2);
        assert!(errors.to_string().ends_with("x.yaml: oops"));
    }
}
