//! Driver errors → [`StoreError`]: the kind decides whether the pipeline retries.
//!
//! Server messages are never copied into the result: a duplicate-key or validation message
//! quotes the offending document (an email address, a phone number) and callers log store
//! errors. Codes and code names are enough to diagnose.

use mongodb::error::{Error, ErrorKind, WriteFailure, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR};

use super::codec::redact_quoted;
use crate::StoreError;

/// Labels the server or driver attach to errors worth retrying.
const RETRYABLE_LABELS: [&str; 4] =
    [RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR, "SystemOverloadedError", "RetryableError"];

/// MongoDB's DuplicateKey: a unique index (or `_id`) already holds the value.
pub(super) const DUPLICATE_KEY: i32 = 11000;

/// Server codes that mean "not now" rather than "never": network trouble, elections,
/// shutdowns, time limits, write conflicts, overload.
const TRANSIENT_CODES: [i32; 20] = [
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    133,   // FailedToSatisfyReadPreference
    134,   // ReadConcernMajorityNotAvailableYet
    189,   // PrimarySteppedDown
    251,   // NoSuchTransaction
    262,   // ExceededTimeLimit
    462,   // IngressRequestRateLimitExceeded
    9001,  // SocketException
    10107, // NotWritablePrimary
    11000, // DuplicateKey: two concurrent upserts of one _id; the retry finds the document
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// A server-reported error: retryable when transient, otherwise the request itself is wrong.
fn server_error(err: &Error, context: &str, code: i32, code_name: &str) -> StoreError {
    let message = if code_name.is_empty() {
        format!("{context}: server error {code}")
    } else {
        format!("{context}: server error {code} ({code_name})")
    };
    if TRANSIENT_CODES.contains(&code) || RETRYABLE_LABELS.iter().any(|l| err.contains_label(l)) {
        StoreError::unavailable(message)
    } else {
        StoreError::invalid(message)
    }
}

/// Maps a driver error met while trying to `action`.
pub(super) fn store_error(action: &str, err: Error) -> StoreError {
    let context = format!("MongoDB: cannot {action}");
    match &*err.kind {
        ErrorKind::BsonDeserialization(_) => StoreError::corrupt(format!("{context}: undecodable document")),
        ErrorKind::BsonSerialization(e) => StoreError::invalid(format!("{context}: {}", redact_quoted(&e.to_string()))),
        ErrorKind::InvalidArgument { message, .. } => StoreError::invalid(format!("{context}: {message}")),
        ErrorKind::Authentication { .. } => StoreError::invalid(format!("{context}: authentication failed")),
        ErrorKind::InvalidTlsConfig { message, .. } => StoreError::invalid(format!("{context}: {message}")),
        ErrorKind::IncompatibleServer { message, .. } => StoreError::invalid(format!("{context}: {message}")),
        ErrorKind::Command(c) => server_error(&err, &context, c.code, &c.code_name),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            server_error(&err, &context, w.code, w.code_name.as_deref().unwrap_or_default())
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            StoreError::unavailable(format!("{context}: write concern error {} ({})", w.code, w.code_name))
        }
        ErrorKind::BulkWrite(b) => match b.write_errors.iter().min_by_key(|(index, _)| **index) {
            Some((index, w)) => {
                let mut e = server_error(&err, &context, w.code, w.code_name.as_deref().unwrap_or_default());
                e.message.push_str(&format!(" at write {index} of the call"));
                e
            }
            None => StoreError::unavailable(format!("{context}: write concern error")),
        },
        // An unordered insert's refusals can mix: a duplicate key (transient) must not hide a
        // permanent one, or the flush would be retried forever.
        ErrorKind::InsertMany(i) => {
            match i.write_errors.as_ref().and_then(|w| w.iter().find(|w| w.code != DUPLICATE_KEY).or_else(|| w.first()))
            {
                Some(w) => server_error(&err, &context, w.code, w.code_name.as_deref().unwrap_or_default()),
                None => StoreError::unavailable(format!("{context}: write concern error")),
            }
        }
        // Io, ServerSelection, ConnectionPoolCleared, DnsResolve, Shutdown, ...: the database
        // cannot be reached right now. These messages name hosts, never data.
        _ => StoreError::unavailable(format!("{context}: {err}")),
    }
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::StoreErrorKind;

    #[test]
    fn network_trouble_is_retryable_and_bad_arguments_are_not() {
        let io = Error::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert_eq!(store_error("ping", io).kind, StoreErrorKind::Unavailable);
        let bad = Error::from(mongodb::bson::ser::Error::UnsignedIntegerExceededRange(u64::MAX));
        assert_eq!(store_error("ping", bad).kind, StoreErrorKind::Invalid);
    }

    /// An `insert_many` error with these write error codes, as the driver builds it.
    pub(in crate::mongo) fn insert_many_error(codes: &[i32]) -> Error {
        let errors: Vec<mongodb::bson::Document> =
            codes.iter().enumerate().map(|(i, c)| mongodb::bson::doc! { "index": i as i64, "code": c }).collect();
        let e: mongodb::error::InsertManyError =
            mongodb::bson::from_document(mongodb::bson::doc! { "writeErrors": errors }).unwrap();
        Error::from(ErrorKind::InsertMany(e))
    }

    #[test]
    fn a_permanent_insert_refusal_is_not_hidden_by_a_duplicate_key_before_it() {
        assert_eq!(store_error("insert", insert_many_error(&[11000, 11000])).kind, StoreErrorKind::Unavailable);
        let mixed = store_error("insert", insert_many_error(&[11000, 121]));
        assert_eq!(mixed.kind, StoreErrorKind::Invalid, "{}", mixed.message);
        assert!(mixed.message.contains("121"), "{}", mixed.message);
    }
}
