//! The one error type of the core. Each variant has a stable machine code (see
//! [`Error::code`]); the server maps variants to HTTP statuses in one place.

/// Result alias used throughout the core and its adapters.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a MindSP operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The resource does not exist *or belongs to someone who may not see it*: the two
    /// cases are deliberately indistinguishable so existence never leaks.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller is known and sees the resource, but may not perform this action.
    #[error("{0}")]
    Forbidden(String),
    /// The request contradicts current state (duplicate e-mail, last owner leaving...).
    #[error("{message}")]
    Conflict {
        /// Stable machine code, e.g. `email_taken`.
        code: &'static str,
        /// Human explanation.
        message: String,
    },
    /// The input is well-formed but violates a rule (empty text, too long, bad cursor).
    #[error("{message}")]
    Invalid {
        /// Stable machine code, e.g. `content_too_long`.
        code: &'static str,
        /// Human explanation.
        message: String,
    },
    /// Wrong e-mail, password or tenant, or an inactive account. One variant for all so
    /// a login attempt cannot probe which part was wrong.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// A storage backend failed. The text is for logs, never shown to clients.
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Conflict`].
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Forbidden`].
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden(message.into())
    }

    /// The stable machine code clients can match on.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::Forbidden(_) => "forbidden",
            Error::Conflict { code, .. } | Error::Invalid { code, .. } => code,
            Error::InvalidCredentials => "invalid_credentials",
            Error::Storage(_) => "internal",
        }
    }
}
