//! Store errors carry a kind that decides whether the caller retries.

/// What went wrong, as far as a caller's retry decision is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The backend cannot be reached or is overloaded: retry later (HTTP 503).
    Unavailable,
    /// The stored data could not be decoded: not retryable.
    Corrupt,
    /// The request itself is wrong (bad URL, bad argument): not retryable.
    Invalid,
    /// A concurrent writer got there first (a saga version was taken): reload and decide again.
    Conflict,
    /// The value is larger than the backend takes in one piece (a Kafka message over the
    /// broker's limit): not retryable as it is; the sender must split it (HTTP 413).
    TooLarge,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { kind: StoreErrorKind::Unavailable, message: message.into() }
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self { kind: StoreErrorKind::Corrupt, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { kind: StoreErrorKind::Invalid, message: message.into() }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { kind: StoreErrorKind::Conflict, message: message.into() }
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self { kind: StoreErrorKind::TooLarge, message: message.into() }
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}
