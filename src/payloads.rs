//! Builders of real source payloads (Segment, Salesforce CDC, SendGrid, Twilio), shared by the
//! demo, the end-to-end tests and the load generator so all three speak the same formats.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A Segment `page` call from an anonymous visitor.
pub fn segment_page(message_id: &str, anonymous_id: &str, path: &str, at: DateTime<Utc>) -> Value {
    json!({
        "type": "page",
        "messageId": message_id,
        "anonymousId": anonymous_id,
        "name": path.trim_start_matches('/'),
        "properties": { "path": path, "url": format!("https://www.example-university.eu{path}"), "title": "Programmes" },
        "context": {
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
            "page": { "path": path, "referrer": "https://www.google.com/", "url": format!("https://www.example-university.eu{path}") },
            "campaign": { "name": "mba-autumn", "source": "google", "medium": "cpc", "term": "mba berlin" },
            "library": { "name": "analytics.js", "version": "2.11.1" }
        },
        "timestamp": iso(at),
        "sentAt": iso(Utc::now()),
        "version": 2
    })
}

/// A Segment `identify` call carrying traits.
pub fn segment_identify(
    message_id: &str,
    anonymous_id: Option<&str>,
    user_id: Option<&str>,
    traits: Value,
    device_id: Option<&str>,
    at: DateTime<Utc>,
) -> Value {
    let mut v = json!({
        "type": "identify",
        "messageId": message_id,
        "traits": traits,
        "context": { "ip": "203.0.113.7" },
        "timestamp": iso(at),
        "sentAt": iso(Utc::now()),
    });
    if let Some(a) = anonymous_id {
        v["anonymousId"] = json!(a);
    }
    if let Some(u) = user_id {
        v["userId"] = json!(u);
    }
    if let Some(d) = device_id {
        v["context"]["device"] = json!({ "id": d, "manufacturer": "Google", "model": "Pixel 8", "type": "android" });
        v["context"]["app"] = json!({ "name": "Campus", "version": "4.2.0", "build": "420" });
    }
    v
}

/// A Segment `track` call.
pub fn segment_track(message_id: &str, user_id: &str, event: &str, properties: Value, at: DateTime<Utc>) -> Value {
    json!({
        "type": "track",
        "messageId": message_id,
        "userId": user_id,
        "event": event,
        "properties": properties,
        "timestamp": iso(at),
        "sentAt": iso(Utc::now()),
    })
}

/// A Segment batch request body.
pub fn segment_batch(events: Vec<Value>) -> Value {
    json!({ "batch": events, "context": { "library": { "name": "analytics-python", "version": "2.3.2" } } })
}

/// A Salesforce Change Data Capture event for a Contact.
pub fn salesforce_contact_cdc(
    replay_id: u64,
    record_id: &str,
    change_type: &str,
    fields: Value,
    at: DateTime<Utc>,
) -> Value {
    let mut payload = fields;
    let changed: Vec<String> = payload.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    payload["ChangeEventHeader"] = json!({
        "entityName": "Contact",
        "recordIds": [record_id],
        "changeType": change_type,
        "changeOrigin": "com/salesforce/api/soap/61.0;client=SfdcInternalAPI/",
        "transactionKey": format!("0001-{replay_id:08x}"),
        "sequenceNumber": 1,
        "commitTimestamp": at.timestamp_millis(),
        "commitNumber": 10_000_000 + replay_id,
        "commitUser": "0055e000001AbCdAAK",
        "changedFields": changed,
        "nulledFields": [],
        "diffFields": []
    });
    json!({
        "data": {
            "schema": "IeRuaY6cbI_HsV8Rv1Mc5g",
            "payload": payload,
            "event": { "replayId": replay_id }
        },
        "channel": "/data/ContactChangeEvent"
    })
}

/// SendGrid Event Webhook body with one event.
pub fn sendgrid_event(sg_event_id: &str, email: &str, event: &str, at: DateTime<Utc>) -> Value {
    json!([{
        "email": email,
        "timestamp": at.timestamp(),
        "event": event,
        "sg_event_id": sg_event_id,
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "category": ["mba-autumn"],
        "useragent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
        "ip": "198.51.100.4",
        "sg_machine_open": false
    }])
}

/// Twilio's inbound WhatsApp webhook form fields.
pub fn twilio_whatsapp_form(
    message_sid: &str,
    from_e164: &str,
    body: &str,
    profile_name: &str,
) -> Vec<(String, String)> {
    let wa_id = from_e164.trim_start_matches('+');
    vec![
        ("SmsMessageSid".into(), message_sid.into()),
        ("NumMedia".into(), "0".into()),
        ("ProfileName".into(), profile_name.into()),
        ("MessageType".into(), "text".into()),
        ("SmsSid".into(), message_sid.into()),
        ("WaId".into(), wa_id.into()),
        ("SmsStatus".into(), "received".into()),
        ("Body".into(), body.into()),
        ("To".into(), "whatsapp:+4930123456789".into()),
        ("NumSegments".into(), "1".into()),
        ("ReferralNumMedia".into(), "0".into()),
        ("MessageSid".into(), message_sid.into()),
        ("AccountSid".into(), "AC00000000000000000000000000000001".into()),
        ("From".into(), format!("whatsapp:{from_e164}")),
        ("ApiVersion".into(), "2010-04-01".into()),
    ]
}
