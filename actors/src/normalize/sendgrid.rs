//! SendGrid's Event Webhook: a JSON array of email events.

use super::contact::normalize_email;
use super::util::{check_size, consent_change, from_unix, id_string, parse_json, raw_index, type_name};
use super::{NormalizeError, NormalizeOptions, Normalized};
use chrono::{DateTime, Utc};
use cohort_messages::msgs::{RawPayload, Rejection};
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Utm};
use serde_json::{Map, Value};

pub(crate) fn normalize_sendgrid(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    check_size(payload.body.len(), opts.max_webhook_bytes)?;
    let value = parse_json(&payload.body, "SendGrid")?;
    let Value::Array(items) = value else {
        return Err(NormalizeError::Sendgrid(format!(
            "body must be a JSON array of events, found {}",
            type_name(&value)
        )));
    };
    let mut out = Normalized::default();
    for (index, item) in items.into_iter().enumerate() {
        match event_from(item, payload, index, opts) {
            Ok(e) => out.events.push(e),
            Err(reason) => out.rejected.push(Rejection { index: Some(index), reason }),
        }
    }
    Ok(out)
}

/// Unix seconds as SendGrid sends them (an integer; tolerated: a float or a digit string).
fn timestamp(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::Number(n) => n.as_f64().and_then(from_unix),
        Value::String(s) => s.trim().parse::<f64>().ok().and_then(from_unix),
        _ => None,
    }
}

fn event_from(
    item: Value,
    payload: &RawPayload,
    index: usize,
    opts: &NormalizeOptions,
) -> Result<CustomerEvent, String> {
    let raw = serde_json::to_vec(&item).unwrap_or_default();
    let Value::Object(obj) = item else {
        return Err(format!("event must be an object, found {}", type_name(&item)));
    };
    let email = match obj.get("email") {
        Some(Value::String(s)) => normalize_email(s).ok_or("`email` is not a valid address")?,
        Some(other) => return Err(format!("`email` must be a string, found {}", type_name(other))),
        None => return Err("missing `email`".into()),
    };
    let event_type = match obj.get("event") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::String(_)) | None => return Err("missing `event`".into()),
        Some(other) => return Err(format!("`event` must be a string, found {}", type_name(other))),
    };
    let occurred_at = match obj.get("timestamp") {
        None | Some(Value::Null) => return Err("missing `timestamp`".into()),
        Some(v) => timestamp(v).ok_or("`timestamp` must be Unix seconds")?,
    };
    let source = payload.source;
    let event_id = match obj.get("sg_event_id").and_then(id_string) {
        Some(id) => EventId::new(source, &id),
        None => EventId::from_content(source, &[&raw]),
    };
    let mut properties: Map<String, Value> =
        obj.into_iter().filter(|(k, _)| !matches!(k.as_str(), "email" | "event" | "timestamp")).collect();
    let consent = match event_type.as_str() {
        "unsubscribe" | "group_unsubscribe" | "spamreport" => Some("opted_out"),
        "group_resubscribe" => Some("opted_in"),
        _ => None,
    };
    if let Some(status) = consent {
        properties.insert("consent_change".into(), consent_change("email", status));
    }
    Ok(CustomerEvent {
        event_id,
        source,
        kind: EventKind::EmailActivity,
        name: Some(event_type),
        occurred_at,
        received_at: payload.received_at,
        identifiers: vec![Identifier::new(IdentifierKind::Email, opts.email_key(&email))],
        traits: Map::new(),
        properties,
        utm: Utm::default(),
        trace: None,
        raw: RawRef { seq: None, index: raw_index(index) },
    })
}
