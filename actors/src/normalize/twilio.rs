//! Twilio's inbound WhatsApp message webhook (form-encoded), understood with [`super::nlp`].

use super::contact::trusted_e164;
use super::nlp::analyze_text;
use super::util::{check_size, consent_change};
use super::{NormalizeError, NormalizeOptions, Normalized};
use cohort_messages::msgs::RawPayload;
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Utm};
use serde_json::{json, Map, Value};

/// Most media a message can carry (Twilio allows 10; more is not a real message).
const MAX_MEDIA: usize = 20;

/// Fields turned into identifiers, traits or named properties rather than copied as-is.
fn consumed(name: &str) -> bool {
    matches!(name, "MessageSid" | "From" | "To" | "Body" | "NumMedia" | "ProfileName" | "WaId")
        || name.strip_prefix("MediaUrl").is_some_and(|n| n.parse::<usize>().is_ok())
        || name.strip_prefix("MediaContentType").is_some_and(|n| n.parse::<usize>().is_ok())
}

pub(crate) fn normalize_twilio(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    check_size(payload.body.len(), opts.max_webhook_bytes)?;
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&payload.body).map_err(|e| {
        NormalizeError::Malformed { format: "Twilio", detail: format!("not x-www-form-urlencoded: {e}") }
    })?;
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty());

    let sid = get("MessageSid").ok_or_else(|| NormalizeError::Twilio("missing MessageSid".into()))?;
    let from = get("From").ok_or_else(|| NormalizeError::Twilio("missing From".into()))?;
    let region = opts.default_region.as_str();
    let phone = trusted_e164(from, region)
        .ok_or_else(|| NormalizeError::Twilio("From is not a phone number (expected whatsapp:+E.164)".into()))?;
    // WaId is the WhatsApp account's number without `+`; stored in E.164 like phones so that
    // `whatsapp_id:+49...` finds it.
    let wa_id = get("WaId").and_then(|w| trusted_e164(w, region)).unwrap_or_else(|| phone.clone());

    let text = params.iter().find(|(k, _)| k == "Body").map(|(_, v)| v.as_str()).unwrap_or("");
    let analysis = analyze_text(text, opts);

    let mut properties = Map::new();
    for (k, v) in &params {
        if !consumed(k) && !properties.contains_key(k) {
            properties.insert(k.clone(), Value::String(v.clone()));
        }
    }
    properties.insert("message_sid".into(), Value::String(sid.to_string()));
    if let Some(to) = get("To") {
        properties.insert("to".into(), Value::String(to.to_string()));
    }
    let channel = if from.to_ascii_lowercase().starts_with("whatsapp:") { "whatsapp" } else { "sms" };
    properties.insert("channel".into(), Value::String(channel.into()));
    properties.insert("text".into(), Value::String(text.to_string()));
    let declared = get("NumMedia").and_then(|n| n.parse::<usize>().ok()).unwrap_or(0).min(MAX_MEDIA);
    let media: Vec<Value> = (0..MAX_MEDIA)
        .filter_map(|i| {
            let url = get(&format!("MediaUrl{i}"))?;
            let content_type = get(&format!("MediaContentType{i}"));
            Some(json!({ "url": url, "content_type": content_type }))
        })
        .collect();
    if declared > 0 || !media.is_empty() {
        properties.insert("media".into(), Value::Array(media));
    }
    properties.insert("intent".into(), Value::String(analysis.intent.clone()));
    properties.insert("entities".into(), json!(analysis.entities));
    properties.insert("sentiment".into(), json!(analysis.sentiment));
    match analysis.intent.as_str() {
        "opt_out" => {
            properties.insert("consent_change".into(), consent_change(channel, "opted_out"));
        }
        "opt_in" => {
            properties.insert("consent_change".into(), consent_change(channel, "opted_in"));
        }
        _ => {}
    }

    let mut traits = Map::new();
    if let Some(name) = get("ProfileName") {
        traits.insert("whatsapp_profile_name".into(), Value::String(name.to_string()));
    }
    let mut identifiers = vec![Identifier::new(IdentifierKind::Phone, phone)];
    identifiers.push(Identifier::new(IdentifierKind::WhatsappId, wa_id));

    let event = CustomerEvent {
        event_id: EventId::new(payload.source, sid),
        source: payload.source,
        kind: EventKind::MessageReceived,
        name: Some(analysis.intent),
        // The webhook carries no send time; Twilio calls it as the message arrives.
        occurred_at: payload.received_at,
        received_at: payload.received_at,
        identifiers,
        traits,
        properties,
        utm: Utm::default(),
        trace: None,
        raw: RawRef { seq: None, index: 0 },
    };
    Ok(Normalized { events: vec![event], rejected: Vec::new() })
}
