//! SendGrid Event Webhook normalization.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chrono::{DateTime, TimeZone, Utc};
use cohort_actors::normalize::{normalize, NormalizeError, NormalizeOptions, Normalized};
use cohort_messages::msgs::{PayloadFormat, RawPayload};
use cohort_messages::{EventId, EventKind, Identifier, IdentifierKind, Source};
use serde_json::json;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap()
}

fn run(body: Vec<u8>) -> Result<Normalized, NormalizeError> {
    let p = RawPayload {
        source: Source::Email,
        format: PayloadFormat::SendgridEvents,
        body: body.into(),
        content_type: "application/json".into(),
        received_at: received(),
    };
    normalize(&p, &NormalizeOptions::default())
}

#[test]
fn fixture_events_are_normalized_and_bad_ones_rejected_by_index() {
    let out = run(fixture("sendgrid_events.json")).unwrap();
    let rejected: Vec<usize> = out.rejected.iter().map(|r| r.index.unwrap()).collect();
    assert_eq!(rejected, vec![9, 10, 11, 12, 13, 14], "{:?}", out.rejected);
    assert!(out.rejected[0].reason.contains("timestamp"));
    assert!(out.rejected[1].reason.contains("email"));
    assert!(out.rejected[2].reason.contains("email"));
    assert!(!out.rejected[2].reason.contains("not-an-address"), "reasons never quote values");
    assert!(out.rejected[3].reason.contains("timestamp"));
    assert!(out.rejected[4].reason.contains("event"));
    assert!(out.rejected[5].reason.contains("object"));
    let names: Vec<&str> = out.events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        vec![
            "processed",
            "delivered",
            "open",
            "click",
            "bounce",
            "unsubscribe",
            "group_unsubscribe",
            "group_resubscribe",
            "spamreport",
            "deferred"
        ]
    );
    let indices: Vec<u32> = out.events.iter().map(|e| e.raw.index).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 15]);

    let processed = &out.events[0];
    assert_eq!(processed.kind, EventKind::EmailActivity);
    assert_eq!(processed.source, Source::Email);
    assert_eq!(processed.event_id, EventId::new(Source::Email, "rbtnWrG1DVDGGGFHFyun0A=="));
    assert_eq!(processed.identifiers, vec![Identifier::new(IdentifierKind::Email, "maxmustermann@gmail.com")]);
    assert_eq!(processed.occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 7, 30, 0).unwrap());
    assert_eq!(processed.received_at, received());
    assert_eq!(processed.properties["category"], json!(["mba", "autumn-2026"]));
    assert_eq!(processed.properties["smtp-id"], json!("<14c5d75ce93.dfd.64b469@ismtpd-555>"));
    assert!(processed.properties["sg_message_id"].as_str().is_some());
    assert!(!processed.properties.contains_key("email"), "the address lives in identifiers only");
    assert!(processed.traits.is_empty());

    assert_eq!(out.events[1].properties["category"], json!("mba"), "category as a string is kept as a string");
    assert_eq!(out.events[2].properties["sg_machine_open"], json!(false));
    assert_eq!(
        out.events[3].properties["url"],
        json!("https://www.example-university.de/programmes/mba?utm_source=sendgrid&utm_campaign=mba_autumn_2026")
    );
    assert_eq!(out.events[3].properties["url_offset"], json!({"index": 0, "type": "html"}));
    assert_eq!(
        out.events[4].properties["reason"],
        json!("550 5.1.1 The email account that you tried to reach does not exist.")
    );
    assert_eq!(out.events[4].properties["type"], json!("bounce"));
    assert!(!out.events[4].properties.contains_key("consent_change"));

    let opted_out = json!({"channel": "email", "status": "opted_out"});
    assert_eq!(out.events[5].properties["consent_change"], opted_out);
    assert_eq!(out.events[6].properties["consent_change"], opted_out);
    assert_eq!(out.events[6].properties["asm_group_id"], json!(10));
    assert_eq!(out.events[7].properties["consent_change"], json!({"channel": "email", "status": "opted_in"}));
    assert_eq!(out.events[8].properties["consent_change"], opted_out, "spam reports opt out");

    let deferred = &out.events[9];
    assert!(deferred.event_id.as_str().starts_with("email:h:"), "no sg_event_id: content hash");
    assert_eq!(deferred.properties["attempt"], json!("5"));
}

#[test]
fn content_hash_ids_are_stable() {
    let body = br#"[{"email":"a@b.de","timestamp":1793604600,"event":"open"}]"#.to_vec();
    let a = run(body.clone()).unwrap();
    let b = run(body).unwrap();
    assert_eq!(a.events[0].event_id, b.events[0].event_id);
}

#[test]
fn timestamps_are_unix_seconds_in_utc() {
    let out = run(br#"[{"email":"a@b.de","timestamp":1793608200,"event":"open","sg_event_id":"x"},
                       {"email":"a@b.de","timestamp":"1793608200","event":"open","sg_event_id":"y"},
                       {"email":"a@b.de","timestamp":-5,"event":"open","sg_event_id":"z"}]"#
        .to_vec())
    .unwrap();
    assert_eq!(out.events[0].occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 8, 30, 0).unwrap());
    assert_eq!(out.events[1].occurred_at, out.events[0].occurred_at);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, Some(2));
}

#[test]
fn non_array_and_invalid_bodies_are_errors() {
    assert!(matches!(run(br#"{"email": "x@y.de"}"#.to_vec()), Err(NormalizeError::Sendgrid(_))));
    assert!(matches!(run(b"\"events\"".to_vec()), Err(NormalizeError::Sendgrid(_))));
    assert!(matches!(run(b"null".to_vec()), Err(NormalizeError::Sendgrid(_))));
    let err = run(b"[{\"email\": \"x@y.de\",}]".to_vec()).unwrap_err();
    assert!(matches!(&err, NormalizeError::Malformed { detail, .. } if detail.contains("line 1")), "{err:?}");
    assert!(run(Vec::new()).is_err());
    assert_eq!(run(b"[]".to_vec()).unwrap(), Normalized::default());
}

#[test]
fn wrong_types_are_rejected_per_element() {
    let out = run(br#"[{"email":["a@b.de"],"timestamp":1,"event":"open"},
                       {"email":"a@b.de","timestamp":true,"event":"open"},
                       {"email":"a@b.de","timestamp":1793608200,"event":{"x":1}},
                       {"email":"a@b.de","timestamp":1793608200,"event":"open"}]"#
        .to_vec())
    .unwrap();
    assert_eq!(out.rejected.iter().map(|r| r.index.unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(out.events.len(), 1);
}
