//! One IngestActor per source: Gate 1 (validation), normalization, and the durable append that
//! must complete before the HTTP answer.

use crate::dead_letters;
use crate::normalize::{normalize, NormalizeError, NormalizeOptions};
use cohort_adapters::{AppendBatch, BronzeRecord, EventBus, NewDeadLetter, OperationalStore, StoreErrorKind};
use cohort_messages::dead_letter::{element_reason, summary_reason, GATE1_LETTER_BYTES};
use cohort_messages::msgs::{IngestError, IngestMsg, IngestReceipt, PayloadFormat, RawPayload, Rejection, SegmentCall};
use cohort_messages::{DeadLetterStage, Source};
use cohort_supervisors::{Metrics, PipelineStages, QueueDepth};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;

pub struct IngestActor;

pub struct IngestArgs {
    pub source: Source,
    pub options: Arc<NormalizeOptions>,
    pub bus: Arc<dyn EventBus>,
    pub store: Arc<dyn OperationalStore>,
    pub metrics: Metrics,
    pub queue: QueueDepth,
    /// Erased people, whose events are dropped here (counted, never stored).
    pub erasures: Arc<crate::gdpr::Erasures>,
    /// Gate 1's declared timestamp bounds (`quality.gate1`).
    pub gate1: cohort_config::Gate1Config,
}

/// Gate 1's timestamp bounds: why an event's `occurred_at` is refused, if it is.
pub fn timestamp_out_of_bounds(
    gate1: &cohort_config::Gate1Config,
    occurred_at: chrono::DateTime<chrono::Utc>,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let ahead = (occurred_at - received_at).num_seconds();
    if ahead > i64::try_from(gate1.max_future_secs).unwrap_or(i64::MAX) {
        return Some(format!(
            "gate 1: timestamp is {ahead} s after receipt (quality.gate1.max_future_secs = {})",
            gate1.max_future_secs
        ));
    }
    let age_days = (received_at - occurred_at).num_days();
    if age_days > i64::try_from(gate1.max_age_days).unwrap_or(i64::MAX) {
        return Some(format!(
            "gate 1: timestamp is {age_days} days before receipt (quality.gate1.max_age_days = {})",
            gate1.max_age_days
        ));
    }
    None
}

pub type IngestState = IngestArgs;

/// The Bronze format label of a payload.
pub fn format_label(format: PayloadFormat) -> String {
    match format {
        PayloadFormat::Segment { call } => format!(
            "segment:{}",
            serde_json::to_value(call).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        ),
        PayloadFormat::TwilioForm => "twilio_form".into(),
        PayloadFormat::SendgridEvents => "sendgrid_events".into(),
        PayloadFormat::SalesforceCdc => "salesforce_cdc".into(),
        PayloadFormat::SalesforceCsv => "salesforce_csv".into(),
        PayloadFormat::Connector { name } => format!("connector:{}", name.as_str()),
    }
}

/// The inverse of [`format_label`], for payloads read back from Bronze.
pub fn parse_format_label(label: &str) -> Option<PayloadFormat> {
    Some(match label {
        "twilio_form" => PayloadFormat::TwilioForm,
        "sendgrid_events" => PayloadFormat::SendgridEvents,
        "salesforce_cdc" => PayloadFormat::SalesforceCdc,
        "salesforce_csv" => PayloadFormat::SalesforceCsv,
        other if other.starts_with("connector:") => {
            let name = other.strip_prefix("connector:")?;
            crate::normalize::connector::valid_name(name)
                .then(|| PayloadFormat::Connector { name: cohort_messages::msgs::ConnectorName::intern(name) })?
        }
        other => PayloadFormat::Segment { call: SegmentCall::parse(other.strip_prefix("segment:")?)? },
    })
}

/// What a letter keeps of a payload that is not UTF-8: it cannot be replayed as sent anyway, and
/// decoded whole (each bad byte three bytes) it could outgrow what a store takes in one record.
const NOT_UTF8_KEPT: usize = 64 << 10;

/// A payload's text for its dead letters.
fn letter_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let kept = String::from_utf8_lossy(&body[..body.len().min(NOT_UTF8_KEPT)]);
            format!("(not UTF-8, {} bytes; the first {} decoded lossily) {kept}", body.len(), NOT_UTF8_KEPT)
        }
    }
}

/// Whether a payload's text holds the email address or phone number of a suppressed person.
/// Asked only of a payload with refused parts: those were never screened, and their raw text
/// would otherwise be kept (Bronze, dead letters).
fn names_suppressed(erasures: &crate::gdpr::Erasures, opts: &NormalizeOptions, payload: &RawPayload) -> bool {
    if erasures.suppressed_len() == 0 {
        return false;
    }
    let text = String::from_utf8_lossy(&payload.body);
    names_suppressed_email(erasures, opts, &text)
        || names_suppressed_phone(erasures, opts, &screened_text(payload, &text))
}

/// A form body's values decoded (Twilio writes `+` as `%2B`), else the text as it is.
fn screened_text<'a>(payload: &RawPayload, text: &'a str) -> std::borrow::Cow<'a, str> {
    let form = matches!(payload.format, PayloadFormat::TwilioForm) || payload.content_type.contains("urlencoded");
    match form.then(|| serde_urlencoded::from_bytes::<Vec<(String, String)>>(&payload.body)).and_then(Result::ok) {
        Some(pairs) => pairs.into_iter().map(|(_, v)| v).collect::<Vec<_>>().join("\n").into(),
        None => text.into(),
    }
}

fn names_suppressed_email(erasures: &crate::gdpr::Erasures, opts: &NormalizeOptions, text: &str) -> bool {
    let b = text.as_bytes();
    let local = |c: &u8| c.is_ascii_alphanumeric() || b"._%+-".contains(c);
    let domain = |c: &u8| c.is_ascii_alphanumeric() || b".-".contains(c);
    // Each distinct address once, and a bounded number of them: a body of repeated or made-up
    // addresses costs a keyed hash per distinct one, not per `@`.
    let mut seen = std::collections::HashSet::new();
    b.iter()
        .enumerate()
        .filter(|(_, c)| **c == b'@')
        .filter_map(|(at, _)| {
            let start = b[..at].iter().rposition(|c| !local(c)).map_or(0, |p| p + 1);
            let end = b[at + 1..].iter().position(|c| !domain(c)).map_or(b.len(), |p| at + 1 + p);
            text.get(start..end).filter(|a| a.len() > 2 && seen.insert(*a))
        })
        .take(MAX_ADDRESSES_SCREENED)
        .any(|address| {
            crate::normalize::contact::normalize_email(address).is_some_and(|e| {
                erasures.suppresses_identifier(&cohort_messages::Identifier::new(
                    cohort_messages::IdentifierKind::Email,
                    opts.email_key(&e),
                ))
            })
        })
}

/// Looks for the numbers of suppressed people: runs of digits written the ways people write
/// phone numbers, read in the default region, and also as E.164 without its `+` (a WhatsApp id).
fn names_suppressed_phone(erasures: &crate::gdpr::Erasures, opts: &NormalizeOptions, text: &str) -> bool {
    use cohort_messages::{Identifier, IdentifierKind};
    let phone_char = |c: char| c.is_ascii_digit() || "+-(). /".contains(c);
    let digits = |s: &str| s.bytes().filter(u8::is_ascii_digit).count();
    let mut seen = std::collections::HashSet::new();
    text.split(|c: char| !phone_char(c))
        // A long run (digits listed with spaces) is read a token at a time as well.
        .flat_map(|run| std::iter::once(run).chain(run.split(' ').filter(move |_| run.len() > 24)))
        .map(|run| run.trim_matches(|c: char| !c.is_ascii_digit() && c != '+' && c != '('))
        .filter(|run| (6..=17).contains(&digits(run)) && seen.insert(*run))
        .take(MAX_ADDRESSES_SCREENED)
        .any(|run| {
            let suppressed = |n: &str| {
                crate::normalize::contact::normalize_phone(n, &opts.default_region).is_some_and(|e164| {
                    [IdentifierKind::Phone, IdentifierKind::WhatsappId]
                        .into_iter()
                        .any(|kind| erasures.suppresses_identifier(&Identifier::new(kind, e164.clone())))
                })
            };
            suppressed(run) || (!run.starts_with('+') && suppressed(&format!("+{run}")))
        })
}

/// Distinct addresses (and, apart, phone numbers) [`names_suppressed`] looks at in one payload
/// (a Segment batch holds at most a few hundred people).
const MAX_ADDRESSES_SCREENED: usize = 10_000;

/// Stands for the payload in letters of a payload that named an erased person.
const WITHHELD: &str = "(withheld: the payload names an erased person)";

fn raw_dead_letter(payload: &RawPayload, reason: String, event_id: Option<String>) -> NewDeadLetter {
    letter_with(payload, letter_text(&payload.body), reason, event_id)
}

fn letter_with(payload: &RawPayload, text: String, reason: String, event_id: Option<String>) -> NewDeadLetter {
    NewDeadLetter {
        source: payload.source,
        stage: DeadLetterStage::Validation,
        reason,
        event_id,
        payload: text,
        // A connector's letter names its connector, so a replay knows how to read it again.
        content_type: match payload.format {
            PayloadFormat::Connector { name } => format!("{}; connector={}", payload.content_type, name.as_str()),
            // The route said CSV whatever the client's header did; a replay reads it as CSV.
            PayloadFormat::SalesforceCsv if !payload.content_type.contains("csv") => {
                format!("{}; format=csv", payload.content_type)
            }
            _ => payload.content_type.clone(),
        },
        received_at: payload.received_at,
        attempts: 1,
    }
}

/// Gate 1 letters for a payload's rejected elements: one each while their copies of the payload
/// stay under [`GATE1_LETTER_BYTES`] together, else one for all of them.
/// A payload that named an erased person (`screened`) is not kept in them: its other elements
/// may name that person too.
fn element_letters(payload: &RawPayload, rejected: &[Rejection], screened: bool) -> Vec<NewDeadLetter> {
    if rejected.is_empty() {
        return Vec::new();
    }
    let text = if screened { WITHHELD.to_string() } else { letter_text(&payload.body) };
    let reasons: Vec<String> = rejected.iter().map(|r| element_reason(r.index, &r.reason)).collect();
    if reasons.len() > 1 && reasons.len().saturating_mul(text.len()) > GATE1_LETTER_BYTES {
        return vec![letter_with(payload, text, summary_reason(&reasons), None)];
    }
    reasons.into_iter().map(|reason| letter_with(payload, text.clone(), reason, None)).collect()
}

impl Actor for IngestActor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = IngestArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<IngestMsg>,
        args: IngestArgs,
    ) -> Result<IngestState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<IngestMsg>,
        msg: IngestMsg,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        let IngestMsg::Receive { payload, trace, dead_letters: keep_letters, reply } = msg;
        let span = tracing::debug_span!("ingest", source = payload.source.as_str());
        crate::trace::continue_from(&span, trace.as_deref());
        // Every event of the payload continues this span's trace through the pipeline.
        let event_trace = trace.as_ref().and_then(|_| crate::trace::of(&span));
        state.queue.dequeued();
        let source = state.source.as_str();
        let m = &state.metrics;
        match normalize(&payload, &state.options) {
            Err(e) => {
                let (reason_label, err) = match &e {
                    NormalizeError::TooLarge { .. } => ("too_large", IngestError::TooLarge(e.to_string())),
                    _ => ("invalid", IngestError::Malformed(e.to_string())),
                };
                m.events_received.with_label_values(&[source]).inc();
                m.events_rejected.with_label_values(&[source, reason_label]).inc();
                tracing::info!(source, reason = reason_label, error = %e, "payload rejected at gate 1");
                let store = state.store.clone();
                let bus = state.bus.clone();
                let metrics = m.clone();
                let letters = match keep_letters {
                    false => vec![],
                    true if names_suppressed(&state.erasures, &state.options, &payload) => {
                        vec![letter_with(&payload, WITHHELD.to_string(), e.to_string(), None)]
                    }
                    true => vec![raw_dead_letter(&payload, e.to_string(), None)],
                };
                tokio::spawn(async move {
                    dead_letters::record(store.as_ref(), bus.as_ref(), &metrics, letters).await;
                    let _ = reply.send(Err(err));
                });
            }
            Ok(normalized) => {
                let mut rejected: Vec<Rejection> = normalized.rejected;
                let (mut events, mut suppressed, mut screened) = (Vec::new(), 0, false);
                for event in normalized.events {
                    // Screened first: an erased person's event is dropped, never dead-lettered.
                    let (kept, changed) = state.erasures.apply(event);
                    screened |= changed;
                    let Some(mut event) = kept else {
                        suppressed += 1;
                        continue;
                    };
                    if let Some(reason) = timestamp_out_of_bounds(&state.gate1, event.occurred_at, event.received_at) {
                        rejected.push(Rejection { index: None, reason });
                        continue;
                    }
                    event.trace.clone_from(&event_trace);
                    events.push(event);
                }
                if suppressed > 0 {
                    m.gdpr_suppressed_events.with_label_values(&["ingest"]).inc_by(suppressed as u64);
                    tracing::info!(source, suppressed, "events of erased people dropped at ingest");
                }
                m.events_received
                    .with_label_values(&[source])
                    .inc_by((events.len() + rejected.len() + suppressed) as u64);
                if !rejected.is_empty() {
                    m.events_rejected.with_label_values(&[source, "invalid"]).inc_by(rejected.len() as u64);
                }
                if !rejected.is_empty() && !screened {
                    // The refused parts were never screened: their text may name an erased person.
                    screened = names_suppressed(&state.erasures, &state.options, &payload);
                }
                let letters = if keep_letters { element_letters(&payload, &rejected, screened) } else { Vec::new() };
                // A payload naming an erased person is not kept raw: Bronze would store them again.
                let bronze = (!screened).then(|| BronzeRecord {
                    source: payload.source,
                    format: format_label(payload.format),
                    content_type: payload.content_type.clone(),
                    received_at: payload.received_at,
                    body: payload.body.to_vec(),
                });
                let bus = state.bus.clone();
                let store = state.store.clone();
                let metrics = m.clone();
                let source_label = source.to_string();
                let received_at = payload.received_at;
                // Appends are group-committed by the journal; awaiting them off the actor keeps
                // this source's ingest loop free. Order within a payload is kept; concurrent
                // requests have no order to keep.
                tokio::spawn(async move {
                    let appended = match events.is_empty() {
                        true => None,
                        false => Some(bus.publish(AppendBatch { raw: bronze, events }).await),
                    };
                    // A failed append (503, or 413 from the bus) tells the client to send the
                    // request again, whole or in parts, and its rejected rows are judged again
                    // then: recording them now as well would record them once per attempt.
                    if !matches!(&appended, Some(Err(_))) {
                        dead_letters::record(store.as_ref(), bus.as_ref(), &metrics, letters).await;
                    }
                    let answer = match appended {
                        None => match rejected.first() {
                            Some(first) if suppressed == 0 => Err(IngestError::Malformed(format!(
                                "no valid event in payload; first problem: {}",
                                first.reason
                            ))),
                            _ => Ok(IngestReceipt { suppressed, rejected, ..IngestReceipt::default() }),
                        },
                        Some(appended) => match appended {
                            Ok(outcome) => {
                                let accepted = outcome.seqs.iter().filter(|s| s.is_some()).count();
                                let duplicates = outcome.seqs.len() - accepted;
                                metrics.events_accepted.with_label_values(&[&source_label]).inc_by(accepted as u64);
                                PipelineStages::observe(&metrics.stages.journaled, received_at, accepted);
                                metrics.events_duplicate.with_label_values(&[&source_label]).inc_by(duplicates as u64);
                                Ok(IngestReceipt { accepted, duplicates, rejected, suppressed })
                            }
                            Err(e) if e.kind == StoreErrorKind::TooLarge => {
                                tracing::warn!(source = %source_label, error = %e, "payload too large for the bus");
                                Err(IngestError::TooLarge(e.message))
                            }
                            Err(e) => {
                                tracing::warn!(source = %source_label, error = %e, "journal append failed");
                                Err(IngestError::Unavailable(e.to_string()))
                            }
                        },
                    };
                    let _ = reply.send(answer);
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_labels_round_trip() {
        let mut formats = vec![
            PayloadFormat::TwilioForm,
            PayloadFormat::SendgridEvents,
            PayloadFormat::SalesforceCdc,
            PayloadFormat::SalesforceCsv,
        ];
        for call in ["identify", "track", "page", "screen", "group", "alias", "batch"] {
            formats.push(PayloadFormat::Segment { call: SegmentCall::parse(call).unwrap() });
        }
        for f in formats {
            assert_eq!(parse_format_label(&format_label(f)), Some(f), "{f:?}");
        }
        assert_eq!(parse_format_label("segment:nope"), None);
        assert_eq!(parse_format_label("csv"), None);
    }

    #[test]
    fn gate_1_refuses_timestamps_too_far_ahead_or_too_old_and_keeps_the_rest() {
        use chrono::{Duration, Utc};
        let g = cohort_config::Gate1Config { max_future_secs: 60, max_age_days: 365, max_dead_letter_ratio: 0.05 };
        let now = Utc::now();
        assert_eq!(timestamp_out_of_bounds(&g, now, now), None);
        assert_eq!(timestamp_out_of_bounds(&g, now + Duration::seconds(59), now), None);
        let ahead = timestamp_out_of_bounds(&g, now + Duration::hours(1), now).unwrap();
        assert!(ahead.contains("3600 s after receipt") && ahead.contains("max_future_secs"), "{ahead}");
        assert_eq!(timestamp_out_of_bounds(&g, now - Duration::days(365), now), None);
        let old = timestamp_out_of_bounds(&g, now - Duration::days(400), now).unwrap();
        assert!(old.contains("400 days") && old.contains("max_age_days"), "{old}");
    }

    /// A refused payload is searched for a suppressed person's number in the ways it is
    /// written: national format, E.164, a WhatsApp id without `+`, a form-encoded `whatsapp:`.
    #[test]
    fn a_suppressed_phone_number_is_found_in_raw_text_as_written() {
        use cohort_messages::{Identifier, IdentifierKind};
        let e = crate::gdpr::Erasures::new(cohort_adapters::crypto::KeyedHasher::from_secret(&[7u8; 32]).unwrap());
        let opts = NormalizeOptions::default();
        let payload = |format, content_type: &str, body: &str| RawPayload {
            source: cohort_messages::Source::Web,
            format,
            content_type: content_type.into(),
            received_at: chrono::Utc::now(),
            body: body.as_bytes().to_vec().into(),
        };
        let json = |body: &str| payload(PayloadFormat::Segment { call: SegmentCall::Batch }, "application/json", body);
        let form = |body: &str| payload(PayloadFormat::TwilioForm, "application/x-www-form-urlencoded", body);
        let jana = r#"{"batch":[{"type":"identify","traits":{"phone":"0151 12345678"}}]}"#;
        // Nobody suppressed: nothing found, whatever the text.
        assert!(!names_suppressed(&e, &opts, &json(jana)));
        e.suppress([e.hash(&Identifier::new(IdentifierKind::Phone, "+4915112345678"))]);
        assert!(names_suppressed(&e, &opts, &json(jana)));
        assert!(names_suppressed(&e, &opts, &json(r#"{"traits":{"phone":"+49 (151) 123-456-78"}}"#)));
        assert!(names_suppressed(&e, &opts, &json(r#"{"waId":"4915112345678"}"#)));
        assert!(names_suppressed(&e, &opts, &form("From=whatsapp%3A%2B4915112345678&Body=hi")));
        // A form writes spaces as `+`: the number in a message text is read decoded.
        assert!(names_suppressed(&e, &opts, &form("From=whatsapp%3A%2B4917000000000&Body=call+0151+12345678")));
        // Someone else's number, timestamps and counts are not her.
        let other = r#"{"phone":"0151 87654321","timestamp":"2026-11-30T10:00:00Z","n":[1,2,3]}"#;
        assert!(!names_suppressed(&e, &opts, &json(other)));
        assert!(!names_suppressed(&e, &opts, &form("From=whatsapp%3A%2B4915187654321&Body=hi")));
        // A WhatsApp id is screened like a phone.
        e.suppress([e.hash(&Identifier::new(IdentifierKind::WhatsappId, "+4915187654321"))]);
        assert!(names_suppressed(&e, &opts, &form("From=whatsapp%3A%2B4915187654321&Body=hi")));
    }
}
