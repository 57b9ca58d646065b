//! Segment HTTP API normalization: single calls, batches, limits, identity and time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chrono::{DateTime, TimeZone, Utc};
use cohort_actors::normalize::{normalize, NormalizeError, NormalizeOptions, Normalized};
use cohort_messages::msgs::{PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::{EventId, EventKind, Identifier, IdentifierKind, Source};
use serde_json::{json, Value};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 8, 30, 3).unwrap() + chrono::Duration::milliseconds(123)
}

fn payload(source: Source, call: SegmentCall, body: Vec<u8>) -> RawPayload {
    RawPayload {
        source,
        format: PayloadFormat::Segment { call },
        body: body.into(),
        content_type: "application/json".into(),
        received_at: received(),
    }
}

fn run(source: Source, call: SegmentCall, body: Vec<u8>) -> Result<Normalized, NormalizeError> {
    normalize(&payload(source, call, body), &NormalizeOptions::default())
}

fn single(call: SegmentCall, body: Value) -> Normalized {
    run(Source::Web, call, serde_json::to_vec(&body).unwrap()).unwrap()
}

fn has(ids: &[Identifier], kind: IdentifierKind, value: &str) -> bool {
    ids.contains(&Identifier::new(kind, value))
}

#[test]
fn identify_fixture_normalizes_identity_traits_time_and_campaign() {
    let out = run(Source::Web, SegmentCall::Identify, fixture("segment_identify.json")).unwrap();
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let [e] = out.events.as_slice() else { panic!("one event expected: {out:?}") };
    assert_eq!(e.kind, EventKind::Identify);
    assert_eq!(e.source, Source::Web);
    assert_eq!(e.event_id, EventId::new(Source::Web, "ajs-next-1793611801123-6f0c2b1e-3d8a-4c55-9a8e-2f6a1b7c9d01"));
    assert_eq!(e.received_at, received());
    // timestamp 08:30:00.123Z corrected by the 2 s between sentAt and receipt; the body's
    // receivedAt is the client's claim and ignored.
    assert_eq!(e.occurred_at.to_rfc3339(), "2026-11-02T08:30:02.123+00:00");
    assert!(has(&e.identifiers, IdentifierKind::UserId, "student-1001"));
    assert!(has(&e.identifiers, IdentifierKind::AnonymousId, "a9c3e7f2-5b1d-4e8a-b6c4-1d2e3f4a5b6c"));
    // The Gmail mailbox, dots ignored: the identifier; the trait keeps the address as written.
    assert!(has(&e.identifiers, IdentifierKind::Email, "maxmustermann@gmail.com"));
    assert!(has(&e.identifiers, IdentifierKind::Phone, "+4915123456789"));
    assert_eq!(e.traits["email"], json!("max.mustermann@gmail.com"));
    assert_eq!(e.traits["phone"], json!("+4915123456789"));
    assert_eq!(e.traits["first_name"], json!("Max"));
    assert_eq!(e.traits["last_name"], json!("Mustermann"));
    assert!(!e.traits.contains_key("firstName"));
    assert_eq!(e.traits["programmeInterest"], json!("MBA"), "unknown traits are kept under their own names");
    assert_eq!(e.traits["city"], json!("Berlin"));
    assert_eq!(e.utm.campaign.as_deref(), Some("mba_autumn_2026"));
    assert_eq!(e.utm.source.as_deref(), Some("google"));
    assert_eq!(e.utm.medium.as_deref(), Some("cpc"));
    assert_eq!(e.utm.term.as_deref(), Some("mba berlin teilzeit"));
    assert_eq!(e.utm.content.as_deref(), Some("ad_variant_b"));
    assert_eq!(e.properties["consent"], json!({"Advertising": false, "Analytics": true, "Functional": true}));
    assert_eq!(e.raw.index, 0);
    assert_eq!(e.raw.seq, None);
}

#[test]
fn mobile_track_has_device_session_push_token_and_utc_time() {
    let out = run(Source::Mobile, SegmentCall::Track, fixture("segment_track_mobile.json")).unwrap();
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.source, Source::Mobile);
    assert_eq!(e.kind, EventKind::Track);
    assert_eq!(e.name.as_deref(), Some("Application Started"));
    assert_eq!(e.occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 15, 15, 0).unwrap(), "-05:00 offset to UTC, no sentAt");
    assert!(has(&e.identifiers, IdentifierKind::DeviceId, "dev_456"));
    assert!(has(&e.identifiers, IdentifierKind::SessionId, "1793612100000"));
    assert!(has(&e.identifiers, IdentifierKind::Email, "maxmustermann@gmail.com"), "context.traits.email");
    assert_eq!(e.traits["push_token"], json!("fcm:dGhpcy1pcy1hLWZha2UtcHVzaC10b2tlbg"));
    assert_eq!(e.traits["app_version"], json!("3.4.1"));
    assert_eq!(e.traits["platform"], json!("iOS"));
    assert_eq!(e.properties["programme"], json!("MBA"));
    assert_eq!(e.properties["step"], json!(1));
}

#[test]
fn page_merges_context_page_into_properties() {
    let out = run(Source::Web, SegmentCall::Page, fixture("segment_page.json")).unwrap();
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.kind, EventKind::Page);
    assert_eq!(e.name.as_deref(), Some("MBA Programme"));
    assert_eq!(e.properties["path"], json!("/programmes/mba"));
    assert_eq!(e.properties["url"], json!("https://www.example-university.de/programmes/mba?utm_source=google"));
    assert_eq!(e.properties["referrer"], json!("https://www.google.com/"));
    assert_eq!(e.properties["search"], json!("?utm_source=google"));
    assert_eq!(e.properties["title"], json!("MBA | Example University"), "the call's own properties win");
    assert_eq!(e.properties["keywords"], json!(["mba", "teilzeit"]));
    assert_eq!(e.properties["category"], json!("Programmes"));
    assert!(has(&e.identifiers, IdentifierKind::SessionId, "sess-77f1"));
    assert_eq!(e.occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 8, 29, 0).unwrap());
}

#[test]
fn batch_accepts_good_elements_and_rejects_bad_ones_by_index() {
    let out = run(Source::Web, SegmentCall::Batch, fixture("segment_batch.json")).unwrap();
    let rejected: Vec<usize> = out.rejected.iter().map(|r| r.index.unwrap()).collect();
    assert_eq!(rejected, vec![2, 3, 4, 7, 9], "{:?}", out.rejected);
    let accepted: Vec<u32> = out.events.iter().map(|e| e.raw.index).collect();
    assert_eq!(accepted, vec![0, 1, 5, 6, 8]);
    assert!(out.rejected[0].reason.contains("userId"), "{}", out.rejected[0].reason);
    assert!(out.rejected[1].reason.contains("type"));
    assert!(out.rejected[2].reason.contains("object"));
    assert!(out.rejected[3].reason.contains("timestamp"));
    assert!(out.rejected[4].reason.contains("userId"));

    let identify = &out.events[0];
    assert_eq!(identify.event_id, EventId::new(Source::Web, "py-batch-0001"));
    assert!(has(&identify.identifiers, IdentifierKind::Email, "lena.schmidt@uni-example.de"));
    assert!(has(&identify.identifiers, IdentifierKind::Phone, "+491701234567"));
    // batch-level sentAt 09:02Z vs receipt 08:30:03.123Z: the client clock is ~32 min fast
    let expected = Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap()
        + (received() - Utc.with_ymd_and_hms(2026, 11, 2, 9, 2, 0).unwrap());
    assert_eq!(identify.occurred_at, expected);
    // batch context sits under the event's own: shared campaign source, own campaign name
    assert_eq!(identify.utm.campaign.as_deref(), Some("batch_campaign"));
    let track = &out.events[1];
    assert_eq!(track.utm.campaign.as_deref(), Some("own_campaign"));
    assert_eq!(track.utm.source.as_deref(), Some("newsletter"));
    // group traits describe the group, not the student
    let group = &out.events[2];
    assert_eq!(group.kind, EventKind::Group);
    assert_eq!(group.properties["group_id"], json!("cohort-2027-msc-ds"));
    assert_eq!(group.properties["group_traits"]["name"], json!("MSc Data Science 2027"));
    assert!(!group.identifiers.iter().any(|i| i.kind == IdentifierKind::Email));
    let alias = &out.events[3];
    assert_eq!(alias.kind, EventKind::Alias);
    assert!(has(&alias.identifiers, IdentifierKind::UserId, "anon-old-42"));
    assert!(has(&alias.identifiers, IdentifierKind::UserId, "student-2002"));
    // numeric user ids are accepted as strings; no timestamp means the receipt time
    let page = &out.events[4];
    assert!(has(&page.identifiers, IdentifierKind::UserId, "2002"));
    assert_eq!(page.occurred_at, received());
}

#[test]
fn single_call_type_must_match_the_endpoint() {
    let body = json!({"type": "identify", "userId": "u1", "messageId": "m1", "event": "X"});
    let out = single(SegmentCall::Track, body.clone());
    assert!(out.events.is_empty());
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, None);
    assert!(out.rejected[0].reason.contains("/v1/track"));
    // without a body type the endpoint decides; a matching one is fine
    let mut ok = body.clone();
    ok.as_object_mut().unwrap().remove("type");
    assert_eq!(single(SegmentCall::Track, ok).events[0].kind, EventKind::Track);
    assert_eq!(single(SegmentCall::Identify, body).events[0].kind, EventKind::Identify);
    let upper = json!({"type": "TRACK", "userId": "u1", "event": "X"});
    assert_eq!(single(SegmentCall::Track, upper).events.len(), 1);
}

#[test]
fn identity_is_required_and_ids_must_be_strings() {
    for body in [
        json!({"type": "track", "event": "X"}),
        json!({"type": "track", "event": "X", "userId": "", "anonymousId": null}),
        json!({"type": "track", "event": "X", "userId": ["u"]}),
        json!({"type": "track", "event": "X", "anonymousId": true}),
    ] {
        let out = single(SegmentCall::Track, body.clone());
        assert!(out.events.is_empty(), "{body}");
        assert_eq!(out.rejected.len(), 1, "{body}");
    }
    let anon = single(SegmentCall::Track, json!({"event": "X", "anonymousId": "anon-1"}));
    assert_eq!(anon.events[0].identifiers, vec![Identifier::new(IdentifierKind::AnonymousId, "anon-1")]);
}

#[test]
fn calls_missing_their_required_fields_are_rejected() {
    for (call, body) in [
        (SegmentCall::Track, json!({"userId": "u"})),
        (SegmentCall::Track, json!({"userId": "u", "event": "  "})),
        (SegmentCall::Track, json!({"userId": "u", "event": 5})),
        (SegmentCall::Alias, json!({"userId": "u"})),
        (SegmentCall::Alias, json!({"anonymousId": "a", "previousId": "p"})),
        (SegmentCall::Group, json!({"userId": "u"})),
        (SegmentCall::Identify, json!({"userId": "u", "traits": "not an object"})),
        (SegmentCall::Track, json!({"userId": "u", "event": "X", "properties": [1, 2]})),
        (SegmentCall::Track, json!({"userId": "u", "event": "X", "context": 1})),
        (SegmentCall::Track, json!({"userId": "u", "event": "X", "type": 7})),
    ] {
        let out = single(call, body.clone());
        assert!(out.events.is_empty() && out.rejected.len() == 1, "{call:?} {body}");
    }
}

#[test]
fn alias_of_the_anonymous_id_links_an_anonymous_id() {
    let out =
        single(SegmentCall::Alias, json!({"userId": "student-1", "anonymousId": "anon-9", "previousId": "anon-9"}));
    let e = &out.events[0];
    assert_eq!(e.identifiers.len(), 2);
    assert!(has(&e.identifiers, IdentifierKind::AnonymousId, "anon-9"));
    assert_eq!(e.properties["previous_id"], json!("anon-9"));
}

#[test]
fn message_id_or_content_hash_is_the_event_id() {
    let body = json!({"userId": "u1", "event": "Quiz Completed", "properties": {"score": 9}});
    let a = single(SegmentCall::Track, body.clone());
    let b = single(SegmentCall::Track, body);
    assert_eq!(a.events[0].event_id, b.events[0].event_id, "same content, same id");
    assert!(a.events[0].event_id.as_str().starts_with("web:h:"));
    let c = single(SegmentCall::Track, json!({"userId": "u1", "event": "Quiz Completed", "properties": {"score": 8}}));
    assert_ne!(a.events[0].event_id, c.events[0].event_id);
    let d = single(SegmentCall::Track, json!({"userId": "u1", "event": "X", "messageId": "abc-123"}));
    assert_eq!(d.events[0].event_id.as_str(), "web:abc-123");
}

#[test]
fn timestamps_with_any_offset_become_utc_and_skew_is_corrected() {
    let t = |ts: &str| {
        single(SegmentCall::Track, json!({"userId": "u", "event": "X", "timestamp": ts})).events[0].occurred_at
    };
    let want = Utc.with_ymd_and_hms(2026, 11, 2, 8, 0, 0).unwrap();
    assert_eq!(t("2026-11-02T09:00:00+01:00"), want);
    assert_eq!(t("2026-11-02T09:00:00+0100"), want);
    assert_eq!(t("2026-11-02T14:30:00+06:30"), want);
    assert_eq!(t("2026-11-02T03:00:00-05:00"), want);
    assert_eq!(t("2026-11-02T08:00:00Z"), want);
    assert_eq!(t("2026-11-02T08:00:00.000Z"), want);
    // client clock 10 minutes slow: sentAt 08:20:03.123 for a receipt at 08:30:03.123
    let skewed = single(
        SegmentCall::Track,
        json!({"userId": "u", "event": "X", "timestamp": "2026-11-02T09:19:00+01:00", "sentAt": "2026-11-02T08:20:03.123Z"}),
    );
    assert_eq!(skewed.events[0].occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 8, 29, 0).unwrap());
    // an unreadable sentAt disables the correction, it does not reject
    let bad_sent = single(
        SegmentCall::Track,
        json!({"userId": "u", "event": "X", "timestamp": "2026-11-02T08:00:00Z", "sentAt": "soon"}),
    );
    assert_eq!(bad_sent.events[0].occurred_at, want);
    let bad = single(SegmentCall::Track, json!({"userId": "u", "event": "X", "timestamp": "02.11.2026"}));
    assert!(bad.events.is_empty() && bad.rejected[0].reason.contains("timestamp"));
}

#[test]
fn unparseable_contacts_are_kept_raw_without_identifiers() {
    let out = single(
        SegmentCall::Identify,
        json!({"userId": "u", "traits": {"email": "max at gmail", "phone": "call me maybe", "first_name": "Max"}}),
    );
    let e = &out.events[0];
    assert_eq!(e.identifiers, vec![Identifier::new(IdentifierKind::UserId, "u")]);
    assert_eq!(e.traits["email_raw"], json!("max at gmail"));
    assert_eq!(e.traits["phone_raw"], json!("call me maybe"));
    assert!(!e.traits.contains_key("email") && !e.traits.contains_key("phone"));
    assert_eq!(e.traits["first_name"], json!("Max"));
}

#[test]
fn unknown_fields_are_tolerated() {
    let out = single(
        SegmentCall::Track,
        json!({"userId": "u", "event": "X", "writeKey": "wk", "brandNewField": {"a": 1}, "properties": {"nested": {"deep": [1, {"x": null}]}}}),
    );
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].properties["nested"], json!({"deep": [1, {"x": null}]}));
}

#[test]
fn malformed_bodies_are_errors_with_a_position() {
    let err = run(Source::Web, SegmentCall::Track, b"{\"type\": \"track\", \"userId\": ".to_vec()).unwrap_err();
    let NormalizeError::Malformed { detail, .. } = &err else { panic!("{err:?}") };
    assert!(detail.contains("line 1"), "{detail}");
    let err = run(Source::Web, SegmentCall::Track, b"{\"userId\": \"u\",, }".to_vec()).unwrap_err();
    assert!(err.to_string().contains("column"), "{err}");
    assert!(matches!(run(Source::Web, SegmentCall::Track, b"[1,2]".to_vec()), Err(NormalizeError::Segment(_))));
    assert!(matches!(run(Source::Web, SegmentCall::Track, b"\"track\"".to_vec()), Err(NormalizeError::Segment(_))));
    assert!(matches!(
        run(Source::Web, SegmentCall::Track, vec![0xff, 0xfe, b'{']),
        Err(NormalizeError::Malformed { .. })
    ));
    assert!(matches!(run(Source::Web, SegmentCall::Track, Vec::new()), Err(NormalizeError::Malformed { .. })));
    for body in [
        json!({"events": []}),
        json!({"batch": {"type": "track"}}),
        json!([{"type": "track"}]),
        json!({"batch": [], "context": "x"}),
    ] {
        let r = run(Source::Web, SegmentCall::Batch, serde_json::to_vec(&body).unwrap());
        assert!(matches!(r, Err(NormalizeError::Segment(_))), "{body}: {r:?}");
    }
    // an error message never quotes the payload
    let err = run(Source::Web, SegmentCall::Batch, br#"{"batch": "max.mustermann@gmail.com"}"#.to_vec()).unwrap_err();
    assert!(!err.to_string().contains("mustermann"), "{err}");
}

#[test]
fn empty_batch_is_fine() {
    let out = run(Source::Web, SegmentCall::Batch, br#"{"batch": []}"#.to_vec()).unwrap();
    assert_eq!(out, Normalized::default());
}

#[test]
fn oversized_calls_and_batches_are_too_large() {
    let big = json!({"type": "track", "userId": "u", "event": "big", "properties": {"blob": "x".repeat(33 * 1024)}});
    let err = run(Source::Web, SegmentCall::Track, serde_json::to_vec(&big).unwrap()).unwrap_err();
    assert!(matches!(err, NormalizeError::TooLarge { limit: 32768, .. }), "{err:?}");
    let huge = json!({"type": "track", "userId": "u", "event": "big", "properties": {"blob": "x".repeat(600_000)}});
    assert!(matches!(
        run(Source::Web, SegmentCall::Track, serde_json::to_vec(&huge).unwrap()),
        Err(NormalizeError::TooLarge { .. })
    ));
    let batch = json!({"batch": [huge]});
    let err = run(Source::Web, SegmentCall::Batch, serde_json::to_vec(&batch).unwrap()).unwrap_err();
    assert!(matches!(err, NormalizeError::TooLarge { limit: 512000, unit: "bytes", .. }), "{err:?}");
    // too many events
    let many: Vec<Value> =
        (0..2501).map(|i| json!({"type": "track", "userId": "u", "event": "e", "messageId": i.to_string()})).collect();
    let err = run(Source::Web, SegmentCall::Batch, serde_json::to_vec(&json!({"batch": many})).unwrap()).unwrap_err();
    assert_eq!(err, NormalizeError::TooLarge { limit: 2500, actual: 2501, unit: "events" });
    assert!(err.to_string().contains("2501"));
    // exactly 2,500 small events are fine
    let ok: Vec<Value> =
        (0..2500).map(|i| json!({"type": "track", "userId": "u", "event": "e", "messageId": i.to_string()})).collect();
    assert_eq!(
        run(Source::Web, SegmentCall::Batch, serde_json::to_vec(&json!({"batch": ok})).unwrap()).unwrap().events.len(),
        2500
    );
    // one oversized element inside an acceptable batch is rejected alone
    let elem = json!({"type": "track", "userId": "u", "event": "big", "properties": {"blob": "y".repeat(40 * 1024)}});
    let small = json!({"type": "track", "userId": "u", "event": "small"});
    let out =
        run(Source::Web, SegmentCall::Batch, serde_json::to_vec(&json!({"batch": [small, elem]})).unwrap()).unwrap();
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.rejected[0].index, Some(1));
    assert!(out.rejected[0].reason.contains("limit"));
}

#[test]
fn configured_limits_apply() {
    let mut opts = NormalizeOptions::default();
    opts.segment.max_batch_events = 2;
    let body = json!({"batch": [{"type": "track", "userId": "u", "event": "a"}, {"type": "track", "userId": "u", "event": "b"}, {"type": "track", "userId": "u", "event": "c"}]});
    let p = payload(Source::Web, SegmentCall::Batch, serde_json::to_vec(&body).unwrap());
    assert!(matches!(normalize(&p, &opts), Err(NormalizeError::TooLarge { limit: 2, actual: 3, .. })));
}

#[test]
fn dates_of_birth_become_iso_dates_and_unreadable_ones_are_kept_aside() {
    let identify = |birthday: &str| {
        json!({
            "type": "identify", "messageId": format!("dob-{birthday}"), "userId": "student-7",
            "traits": { "birthday": birthday }, "timestamp": "2026-11-02T09:00:00Z"
        })
    };
    for written in ["14.03.1999", "1999-03-14", "14 March 1999", "1999-03-14T00:00:00.000Z"] {
        let out = single(SegmentCall::Identify, identify(written));
        assert_eq!(out.events[0].traits["date_of_birth"], json!("1999-03-14"), "{written}");
        assert!(!out.events[0].traits.contains_key("birthday"));
    }
    let out = single(SegmentCall::Identify, identify("sometime in spring"));
    assert!(!out.events[0].traits.contains_key("date_of_birth"));
    assert_eq!(out.events[0].traits["date_of_birth_raw"], json!("sometime in spring"));
}

/// Values no store can hold as sent (an integer past `i64::MAX`, a NUL in a key) are made
/// storable at the door: BSON refused them, and with them every later MongoDB flush.
#[test]
fn integers_past_i64_and_nul_keys_become_storable() {
    let body = json!({
        "type": "track", "event": "Quiz Scored", "userId": "u1", "messageId": "m-big",
        "properties": { "n": 18446744073709551615u64, "ok": 7, "a\u{0}b": 1, "nested": [{ "m": 18446744073709551615u64 }] },
        "context": { "traits": { "z\u{0}": "x" } }
    });
    let out = single(SegmentCall::Track, body);
    let e = &out.events[0];
    assert_eq!(e.properties["n"].as_f64(), Some(18446744073709551615u64 as f64));
    assert!(e.properties["n"].as_u64().is_none() && e.properties["n"].as_i64().is_none());
    assert_eq!(e.properties["ok"], json!(7), "ordinary integers stay integers");
    assert_eq!(e.properties["a\u{fffd}b"], json!(1));
    assert!(e.properties["nested"][0]["m"].is_f64());
    assert!(e.traits.keys().all(|k| !k.contains('\0')), "{:?}", e.traits);
}
