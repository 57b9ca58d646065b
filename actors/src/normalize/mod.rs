//! Gate 1 of ingest: turns each source's real wire format into [`CustomerEvent`]s.
//!
//! Everything here is a pure function of the payload and the [`NormalizeOptions`]: no I/O, no
//! clock, no logging (payloads carry personal data, and error messages never quote values).
//! Whole-payload problems are an `Err`; problems of one element of a batch, array or CSV chunk
//! reject that element only, so one bad row never costs the rest of the batch.

pub mod connector;
pub mod contact;
pub mod given_names;
pub mod nlp;
pub mod options;
pub mod person;
pub mod salesforce;
pub mod segment;
pub mod sendgrid;
pub mod signature;
pub mod twilio;
mod util;

pub use contact::{normalize_email, normalize_phone};
pub use given_names::{compare_given_names, GivenNames};
pub use nlp::{analyze_text, TextAnalysis};
pub use options::{EmailRule, IntentRule, NormalizeOptions, Programme, SegmentLimits};
pub use person::{normalize_name, parse_date_of_birth, DateOrder};
pub use salesforce::normalize_csv_record;

use cohort_messages::msgs::{PayloadFormat, RawPayload, Rejection};
use cohort_messages::CustomerEvent;

/// The events of one payload, and the elements of it that were refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Normalized {
    pub events: Vec<CustomerEvent>,
    pub rejected: Vec<Rejection>,
}

/// Why a whole payload was refused. Messages say what and where, never the offending values
/// (they end up in logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    /// The body cannot be read at all: invalid JSON, UTF-8, form or CSV syntax.
    #[error("malformed {format} payload: {detail}")]
    Malformed { format: &'static str, detail: String },
    /// The body exceeds a source limit (HTTP 413).
    #[error("payload too large: {actual} {unit} exceeds the limit of {limit} {unit}")]
    TooLarge { limit: usize, actual: usize, unit: &'static str },
    /// Well-formed JSON that is not a Segment call or batch.
    #[error("invalid Segment payload: {0}")]
    Segment(String),
    /// A Twilio webhook without the fields every inbound message has.
    #[error("invalid Twilio webhook: {0}")]
    Twilio(String),
    /// A SendGrid Event Webhook body that is not an array of events.
    #[error("invalid SendGrid event webhook: {0}")]
    Sendgrid(String),
    /// A Salesforce change event without a usable ChangeEventHeader.
    #[error("invalid Salesforce change event: {0}")]
    SalesforceCdc(String),
    /// A Salesforce Bulk API CSV chunk without a usable header.
    #[error("invalid Salesforce CSV: {0}")]
    SalesforceCsv(String),
}

/// Normalizes one authenticated payload according to its wire format.
pub fn normalize(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    let mut normalized = match payload.format {
        PayloadFormat::Segment { call } => segment::normalize_segment(payload, call, opts),
        PayloadFormat::TwilioForm => twilio::normalize_twilio(payload, opts),
        PayloadFormat::SendgridEvents => sendgrid::normalize_sendgrid(payload, opts),
        PayloadFormat::SalesforceCdc => salesforce::normalize_cdc(payload, opts),
        PayloadFormat::SalesforceCsv => salesforce::normalize_csv(payload, opts),
        PayloadFormat::Connector { name } => connector::normalize_connector(name.as_str(), payload, opts),
    }?;
    for event in &mut normalized.events {
        util::storable_map(&mut event.traits);
        util::storable_map(&mut event.properties);
    }
    Ok(normalized)
}
