//! The service layer's error, and the errno names TrueNAS clients expect.
//!
//! Every use case returns [`ServiceError`]; the transport maps it once to the
//! JSON-RPC or legacy wire shape. Messages say what went wrong and, where it
//! helps, what to do next. They never contain secrets.

use keyhaven_core::error::{FieldError, ValidationErrors};

pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const EIO: i32 = 5;
pub const EACCES: i32 = 13;
pub const EFAULT: i32 = 14;
pub const EBUSY: i32 = 16;
pub const EEXIST: i32 = 17;
pub const EINVAL: i32 = 22;
pub const EOPNOTSUPP: i32 = 95;
pub const EADDRINUSE: i32 = 98;
pub const ETIMEDOUT: i32 = 110;
pub const ECONNREFUSED: i32 = 111;
pub const ENOTAUTHENTICATED: i32 = 207;
pub const ESSLCERTVERIFICATIONERROR: i32 = 208;

pub fn errname(errno: i32) -> &'static str {
    match errno {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EINVAL => "EINVAL",
        EOPNOTSUPP => "EOPNOTSUPP",
        EADDRINUSE => "EADDRINUSE",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        201 => "ENOMETHOD",
        202 => "ESERVICESTARTFAILURE",
        ENOTAUTHENTICATED => "ENOTAUTHENTICATED",
        ESSLCERTVERIFICATIONERROR => "ESSLCERTVERIFICATIONERROR",
        _ => "EFAULT",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// TrueNAS ValidationErrors: JSON-RPC -32602 with `extra`.
    #[error("{0}")]
    Validation(ValidationErrors),
    /// TrueNAS CallError: JSON-RPC -32001.
    #[error("{message}")]
    Call { errno: i32, message: String },
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
    pub fn call(errno: i32, message: impl Into<String>) -> Self {
        Self::Call { errno, message: message.into() }
    }

    pub fn field(attribute: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(ValidationErrors::single(attribute, message))
    }

    pub fn field_errno(attribute: impl Into<String>, message: impl Into<String>, errno: i32) -> Self {
        Self::Validation(FieldError::new(attribute, message).with_errno(errno).into())
    }

    /// An unexpected internal failure. The detail is logged, the caller gets a
    /// message that tells them where to look.
    pub fn internal(context: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(context, %detail, "internal error");
        Self::call(EFAULT, format!("{context} failed; the server log has the details"))
    }

    pub fn errno(&self) -> i32 {
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

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
