//! Crypto errors. None of them carries key material, plaintext or request bodies, so they are safe
//! to log and to show on status pages.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Reading or writing a key file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A key file exists but does not hold a usable key (the key itself is never shown).
    #[error("bad key file {}: {reason}", path.display())]
    BadKeyFile { path: PathBuf, reason: String },

    /// A key-manager URL with a scheme this build does not know.
    #[error(
        "unknown key manager scheme {scheme:?}: expected file:///absolute/path, file:relative/path \
         or gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K"
    )]
    UnknownScheme { scheme: String },

    /// A key-manager URL, KMS key name, endpoint or option is malformed.
    #[error("invalid key manager configuration: {0}")]
    InvalidConfig(String),

    /// Cloud KMS answered with an HTTP error; `message` is Google's `error.message` when present.
    #[error("Cloud KMS {operation} failed: HTTP {status}: {message}")]
    Kms { operation: &'static str, status: u16, message: String },

    /// No access token could be had from the token source (metadata server down, refused, odd answer).
    #[error("could not get a Google access token{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Token { status: Option<u16>, message: String },

    /// The service could not be reached or timed out (worth retrying).
    #[error("{service} unreachable: {message}")]
    Unavailable { service: &'static str, message: String },

    /// The service answered 2xx with something we could not use.
    #[error("unexpected answer from {service}: {message}")]
    BadResponse { service: &'static str, message: String },

    /// AES-GCM authentication failed: the ciphertext was altered or sealed under another key.
    #[error("decryption failed: {what} was tampered with or encrypted under a different key")]
    Decrypt { what: &'static str },

    /// A sealed token or wrapped key is not even shaped right (prefix, base64, length).
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// Raw key bytes of the wrong length were supplied.
    #[error("invalid {what}: {len} bytes, expected {expected}")]
    KeyLength { what: &'static str, len: usize, expected: usize },
}

impl CryptoError {
    /// Whether trying again later may succeed (network trouble, throttling, KMS/metadata 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable { .. } => true,
            Self::Kms { status, .. } => *status == 429 || *status >= 500,
            Self::Token { status, .. } => status.is_some_and(|s| s == 429 || s >= 500),
            _ => false,
        }
    }

    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed { what, reason: reason.into() }
    }
}
