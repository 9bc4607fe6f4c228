//! The service layer's error, and the errno names TrueNAS clients expect.
//!
//! Every use case returns [`ServiceError`]; the transport maps it once to the
//! JSON-RPC or legacy wire shape. Messages say what went wrong and, where it
//! helps, what to do next. They never contain secrets.

use keyhaven_core::error::{FieldError, ValidationErrors};

pub use keyhaven_core::error::Errno::{
    self, EACCES, EADDRINUSE, EBUSY, ECONNREFUSED, EEXIST, EFAULT, EINVAL, EIO, ENOENT, ENOMETHOD, ENOTAUTHENTICATED,
    EOPNOTSUPP, EPERM, ESERVICESTARTFAILURE, ESSLCERTVERIFICATIONERROR, ETIMEDOUT,
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// TrueNAS ValidationErrors: JSON-RPC -32602 with `extra`.
    #[error("{0}")]
    Validation(ValidationErrors),
    /// TrueNAS CallError: JSON-RPC -32001.
    #[error("{message}")]
    Call { errno: Errno, message: String },
    /// The connection must log in first.
    #[error("Not authenticated")]
    NotAuthenticated,
    /// A token session was idle for longer than the token's lifetime.
    #[error("Session expired after {idle_secs} seconds without activity; log in again")]
    SessionExpired { idle_secs: u64 },
    /// The session's role does not allow this method.
    #[error("Not authorized")]
    NotAuthorized,
}

impl ServiceError {
    pub fn call(errno: Errno, message: impl Into<String>) -> Self {
        Self::Call { errno, message: message.into() }
    }

    pub fn field(attribute: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(ValidationErrors::single(attribute, message))
    }

    pub fn field_errno(attribute: impl Into<String>, message: impl Into<String>, errno: Errno) -> Self {
        Self::Validation(FieldError::new(attribute, message).with_errno(errno).into())
    }

    /// An unexpected internal failure. The detail is logged, the caller gets a
    /// message that tells them where to look.
    pub fn internal(context: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(context, %detail, "internal error");
        Self::call(EFAULT, format!("{context} failed; the server log has the details"))
    }

    /// Place the field errors a service named relative to its input
    /// (`username`, `attributes.port`) in a method's schema
    /// (`user_create.username`): the API edge does this once per call.
    /// Errors that name no field (an empty attribute, TrueNAS's `None`, as in
    /// "User 5 does not exist") and every other kind of error are left as
    /// they are.
    pub fn in_schema(self, schema: &str) -> Self {
        match self {
            Self::Validation(v) => Self::Validation(ValidationErrors(
                v.0.into_iter().map(|e| if e.attribute.is_empty() { e } else { e.prefixed(schema) }).collect(),
            )),
            other => other,
        }
    }

    pub fn errno(&self) -> Errno {
        match self {
            Self::Validation(_) => EINVAL,
            Self::Call { errno, .. } => *errno,
            Self::NotAuthenticated | Self::SessionExpired { .. } => ENOTAUTHENTICATED,
            Self::NotAuthorized => EACCES,
        }
    }
}

impl From<ValidationErrors> for ServiceError {
    fn from(v: ValidationErrors) -> Self {
        Self::Validation(v)
    }
}

impl From<FieldError> for ServiceError {
    fn from(v: FieldError) -> Self {
        Self::Validation(v.into())
    }
}

impl From<keyhaven_store::StoreError> for ServiceError {
    fn from(e: keyhaven_store::StoreError) -> Self {
        use keyhaven_store::StoreError as S;
        match e {
            S::NotFound(what) => Self::call(ENOENT, format!("{what} does not exist")),
            S::Conflict(what) => Self::call(EEXIST, format!("{what} already exists")),
            other => Self::internal("database access", other),
        }
    }
}

/// Why a dispatched call produced no result: no method of that name, or the
/// method failed. The transport maps it once to the wire.
#[derive(Debug)]
pub enum CallFailure {
    NoMethod,
    Failed(ServiceError),
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_schema_prefixes_field_errors_only() {
        let mut v = ValidationErrors::new();
        v.add("username", "bad");
        v.push(FieldError::new("", "User 5 does not exist").with_errno(ENOENT));
        v.add("roles.1", "bad");
        let ServiceError::Validation(got) = ServiceError::Validation(v).in_schema("user_create") else {
            panic!("still a validation error")
        };
        let attrs: Vec<&str> = got.0.iter().map(|e| e.attribute.as_str()).collect();
        assert_eq!(attrs, ["user_create.username", "", "user_create.roles.1"]);
        assert_eq!(got.0[1].errno, ENOENT);
        let call = ServiceError::call(EFAULT, "x").in_schema("user_create");
        assert!(matches!(call, ServiceError::Call { errno: EFAULT, .. }));
    }
}
