//! Field-named validation errors shared by every domain rule.
//!
//! The transport maps these once to TrueNAS's wire shape
//! (`[[attribute, message, errno], …]`), so the domain only says *which field*
//! and *what is wrong*.

use std::fmt;

/// Declares [`Errno`] from `NAME = number` pairs: the one list of errno
/// names and numbers.
macro_rules! errnos {
    ($($(#[$doc:meta])* $name:ident = $num:literal,)*) => {
        /// The errno values TrueNAS puts on its errors (`error` and `errname`
        /// on the wire, the third element of a validation error): POSIX
        /// numbers plus middlewared's own 2xx.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(clippy::upper_case_acronyms)]
        pub enum Errno {
            $($(#[$doc])* $name = $num,)*
        }

        impl Errno {
            /// The number on the wire.
            pub const fn code(self) -> i32 {
                self as i32
            }

            /// The name on the wire (`errname`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Errno::$name => stringify!($name),)*
                }
            }

            /// The errno of a number a remote system sent, if keyhaven knows it.
            pub fn from_code(n: i64) -> Option<Errno> {
                match n {
                    $($num => Some(Errno::$name),)*
                    _ => None,
                }
            }
        }
    };
}

errnos! {
    EPERM = 1,
    /// "Does not exist".
    ENOENT = 2,
    EIO = 5,
    EACCES = 13,
    EFAULT = 14,
    EBUSY = 16,
    EEXIST = 17,
    /// What TrueNAS attaches to ordinary validation failures.
    EINVAL = 22,
    EOPNOTSUPP = 95,
    EADDRINUSE = 98,
    ETIMEDOUT = 110,
    ECONNREFUSED = 111,
    /// No such method (middlewared).
    ENOMETHOD = 201,
    /// A service did not start (middlewared).
    ESERVICESTARTFAILURE = 202,
    ENOTAUTHENTICATED = 207,
    ESSLCERTVERIFICATIONERROR = 208,
}

pub use Errno::*;

/// One failed check on one attribute (e.g. `keychain_credential_create.name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub attribute: String,
    pub message: String,
    pub errno: Errno,
}

impl FieldError {
    pub fn new(attribute: impl Into<String>, message: impl Into<String>) -> Self {
        Self { attribute: attribute.into(), message: message.into(), errno: EINVAL }
    }

    pub fn with_errno(mut self, errno: Errno) -> Self {
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
