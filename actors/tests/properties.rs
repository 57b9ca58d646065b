//! Property tests of the normalizers and parsers that take outside input: whatever arrives, they
//! never panic, and normalizing a normalized value changes nothing (identity look-ups depend on
//! one canonical form).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use chrono::Utc;
use cohort_actors::normalize::{normalize, normalize_email, normalize_phone, NormalizeOptions};
use cohort_actors::segments::lang::compile;
use cohort_messages::msgs::{PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::{IdentifierKind, Source};
use proptest::prelude::*;
use serde_json::{json, Value};

fn payload(source: Source, format: PayloadFormat, content_type: &str, body: Vec<u8>) -> RawPayload {
    RawPayload { source, format, body: body.into(), content_type: content_type.into(), received_at: Utc::now() }
}

/// JSON values of any shape, up to a few levels deep, with keys Segment payloads use.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_string()),
        Just("userId".to_string()),
        Just("anonymousId".to_string()),
        Just("messageId".to_string()),
        Just("traits".to_string()),
        Just("email".to_string()),
        Just("phone".to_string()),
        Just("timestamp".to_string()),
        Just("context".to_string()),
        Just("properties".to_string()),
        Just("batch".to_string()),
        "[a-zA-Z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(json!("identify")),
        Just(json!("track")),
        Just(json!("2026-11-27T10:00:00Z")),
        Just(json!("Max@Gmail.com")),
        Just(json!("+49 151 2345 6789")),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn email_normalization_is_idempotent(raw in ".{0,80}", local in "[a-zA-Z0-9._%+-]{1,20}", domain in "[a-zA-Z0-9-]{1,12}\\.[a-z]{2,6}") {
        for candidate in [raw, format!("{local}@{domain}"), format!("  {local}@{domain}  "), format!("mailto:{local}@{domain}")] {
            if let Some(e) = normalize_email(&candidate) {
                prop_assert_eq!(normalize_email(&e), Some(e.clone()));
                let opts = NormalizeOptions::default();
                let key = opts.email_key(&e);
                prop_assert_eq!(opts.email_key(&key), key.clone(), "the identity key of a key is itself");
            }
        }
    }

    #[test]
    fn phone_normalization_is_idempotent_and_e164(raw in "[+0-9 ()./-]{0,30}", region in prop_oneof![Just("DE"), Just("GB"), Just("US"), Just("NO"), Just("FR")]) {
        if let Some(p) = normalize_phone(&raw, region) {
            prop_assert!(p.starts_with('+') && p[1..].chars().all(|c| c.is_ascii_digit()), "{}", p);
            prop_assert_eq!(normalize_phone(&p, region), Some(p.clone()));
            prop_assert_eq!(normalize_phone(&p, "US"), Some(p.clone()), "E.164 does not depend on the region");
            prop_assert_eq!(normalize_phone(&format!("whatsapp:{p}"), region), Some(p.clone()));
        }
    }

    #[test]
    fn segment_payloads_of_any_shape_never_panic_and_yield_canonical_identifiers(v in json_value(), call in prop_oneof![Just(SegmentCall::Identify), Just(SegmentCall::Track), Just(SegmentCall::Batch), Just(SegmentCall::Page)]) {
        let opts = NormalizeOptions::default();
        let body = serde_json::to_vec(&v).unwrap();
        let p = payload(Source::Web, PayloadFormat::Segment { call }, "application/json", body);
        if let Ok(n) = normalize(&p, &opts) {
            for e in &n.events {
                for id in &e.identifiers {
                    match id.kind {
                        IdentifierKind::Email => prop_assert_eq!(normalize_email(&id.value).map(|e| opts.email_key(&e)), Some(id.value.clone())),
                        IdentifierKind::Phone => prop_assert_eq!(normalize_phone(&id.value, "DE"), Some(id.value.clone())),
                        _ => prop_assert!(!id.value.is_empty()),
                    }
                }
            }
        }
    }

    #[test]
    fn identify_calls_yield_canonical_identifiers(user in "[a-z0-9-]{1,16}", local in "[a-zA-Z0-9._+]{1,16}", domain in "[a-zA-Z]{1,10}\\.(com|de|edu|eu)", phone in "\\+?[0-9 ]{6,16}") {
        let opts = NormalizeOptions::default();
        let v = json!({ "type": "identify", "messageId": format!("m-{user}"), "userId": user,
            "traits": { "email": format!("{local}@{domain}"), "phone": phone }, "timestamp": "2026-11-27T10:00:00Z" });
        let p = payload(Source::Web, PayloadFormat::Segment { call: SegmentCall::Identify }, "application/json", serde_json::to_vec(&v).unwrap());
        let n = normalize(&p, &opts).unwrap();
        prop_assert_eq!(n.events.len(), 1);
        for id in &n.events[0].identifiers {
            match id.kind {
                IdentifierKind::Email => prop_assert_eq!(normalize_email(&id.value).map(|e| opts.email_key(&e)), Some(id.value.clone())),
                IdentifierKind::Phone => prop_assert_eq!(normalize_phone(&id.value, "DE"), Some(id.value.clone())),
                IdentifierKind::UserId => prop_assert_eq!(&id.value, &user),
                _ => {}
            }
        }
    }

    #[test]
    fn any_bytes_in_any_format_never_panic(body in prop::collection::vec(any::<u8>(), 0..600)) {
        let opts = NormalizeOptions::default();
        for (source, format, ct) in [
            (Source::Web, PayloadFormat::Segment { call: SegmentCall::Batch }, "application/json"),
            (Source::Whatsapp, PayloadFormat::TwilioForm, "application/x-www-form-urlencoded"),
            (Source::Email, PayloadFormat::SendgridEvents, "application/json"),
            (Source::Crm, PayloadFormat::SalesforceCdc, "application/json"),
            (Source::Crm, PayloadFormat::SalesforceCsv, "text/csv"),
        ] {
            let _ = normalize(&payload(source, format, ct, body.clone()), &opts);
        }
    }

    #[test]
    fn twilio_forms_of_any_fields_never_panic(fields in prop::collection::vec(("[A-Za-z]{1,12}", ".{0,40}"), 0..12)) {
        let mut form: Vec<(String, String)> = fields;
        form.push(("From".into(), "whatsapp:+4915123456789".into()));
        let body = serde_urlencoded::to_string(&form).unwrap().into_bytes();
        let p = payload(Source::Whatsapp, PayloadFormat::TwilioForm, "application/x-www-form-urlencoded", body);
        let _ = normalize(&p, &NormalizeOptions::default());
    }

    #[test]
    fn salesforce_csv_of_any_cells_never_panics(rows in prop::collection::vec(prop::collection::vec(".{0,20}", 4), 0..10)) {
        let mut csv = String::from("Id,Email,FirstName,LastModifiedDate\n");
        for r in rows {
            let cells: Vec<String> = r.iter().map(|c| format!("\"{}\"", c.replace('"', "\"\""))).collect();
            csv.push_str(&cells.join(","));
            csv.push('\n');
        }
        let p = payload(Source::Crm, PayloadFormat::SalesforceCsv, "text/csv", csv.into_bytes());
        let _ = normalize(&p, &NormalizeOptions::default());
    }

    #[test]
    fn the_segment_rule_language_refuses_or_compiles_anything_without_panicking(rule in ".{0,80}", words in prop::collection::vec(prop_oneof![Just("page_count(\"mba\", 7d)"), Just(">="), Just("3"), Just("and"), Just("or"), Just("not"), Just("consent.email"), Just("("), Just(")"), Just("traits.first_name"), Just("=="), Just("\"x\""), Just("score(\"m\")")], 0..12)) {
        let _ = compile(&rule, &[]);
        let _ = compile(&words.join(" "), &["m".to_string()]);
    }
}
