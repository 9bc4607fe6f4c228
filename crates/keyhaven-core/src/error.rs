//! Field-named validation errors shared by every domain rule.
//!
//! The transport maps these once to TrueNAS's wire shape
//! (`[[attribute, message, errno], …]`), so the domain only says *which field*
//! and *what is wrong*.

use std::fmt;

/// `EINVAL`, the errno TrueNAS attaches to ordinary validation failures.
pub const EINVAL: i32 = 22;
/// `ENOENT`, used for "does not exist" validation failures.
pub const ENOENT: i32 = 2;
/// `EEXIST`.
pub const EEXIST: i32 = 17;

/// One failed check on one attribute (e.g. `keychain_credential_create.name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub attribute: String,
    pub message: String,
    pub errno: i32,
}

impl FieldError {
    pub fn new(attribute: impl Into<String>, message: impl Into<String>) -> Self {
        Self { attribute: attribute.into(), message: message.into(), errno: EINVAL }
    }

    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    /// Prefix the attribute with a schema or parent path (`schema` + `.` + attribute).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.attribute =
                if self.attribute.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", self.attribute) };
        }
        self
    }
}

/// All the failures found in one request, reported together like TrueNAS does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn single(attribute: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError::new(attribute, message)])
    }

    pub fn add(&mut self, attribute: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(attribute, message));
    }

    pub fn push(&mut self, err: FieldError) {
        self.0.push(err);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing failed, otherwise `Err(self)`.
    pub fn check(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.attribute.is_empty() {
                write!(f, "{}", e.message)?;
            } else {
                write!(f, "[{}] {}", e.attribute, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

impl From<FieldError> for ValidationErrors {
    fn from(e: FieldError) -> Self {
        Self(vec![e])
    }
}
