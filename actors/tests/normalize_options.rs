//! Normalizer options (config), contact helpers, and robustness on hostile input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chrono::{TimeZone, Utc};
use cohort_actors::normalize::{normalize, normalize_email, normalize_phone, NormalizeOptions};
use cohort_messages::msgs::{PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::Source;
use serde_json::{json, Map, Value};

fn table(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

#[test]
fn defaults_are_the_documented_ones() {
    let o = NormalizeOptions::default();
    assert_eq!(o.default_region, "DE");
    assert_eq!(o.segment.max_event_bytes, 32 * 1024);
    assert_eq!(o.segment.max_batch_bytes, 500 * 1024);
    assert_eq!(o.segment.max_batch_events, 2500);
    let names: Vec<&str> = o.programmes.iter().map(|p| p.name.as_str()).collect();
    for p in ["MBA", "MSc Data Science", "BSc Computer Science", "Psychology"] {
        assert!(names.contains(&p), "{p}");
    }
    let intents: Vec<&str> = o.intents.iter().map(|r| r.intent.as_str()).collect();
    for i in ["opt_out", "enrollment_inquiry", "deadline_question", "payment", "complaint"] {
        assert!(intents.contains(&i), "{i}");
    }
    assert_eq!(intents[0], "opt_out", "consent is checked first");
    assert!(o.sentiment_lexicon.values().all(|w| (-1.0..=1.0).contains(w)));
    assert!(o.sentiment_lexicon.contains_key("good") && o.sentiment_lexicon.contains_key("gut"));
    let f = &o.salesforce_fields;
    for (k, v) in [
        ("Email", "email"),
        ("Phone", "phone"),
        ("MobilePhone", "mobile_phone"),
        ("FirstName", "first_name"),
        ("LastName", "last_name"),
        ("Name.FirstName", "first_name"),
        ("Name.LastName", "last_name"),
        ("hed__Preferred_Email__c", "preferred_email"),
        ("Enrollment_Status__c", "enrollment_status"),
        ("Application_Stage__c", "application_stage"),
        ("HasOptedOutOfEmail", "has_opted_out_of_email"),
        ("MailingCity", "city"),
    ] {
        assert_eq!(f.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(o.validate().is_ok());
}

#[test]
fn empty_config_table_gives_the_defaults() {
    assert_eq!(NormalizeOptions::from_config(&Map::new()).unwrap(), NormalizeOptions::default());
}

#[test]
fn config_overrides_and_partial_tables() {
    let o = NormalizeOptions::from_config(&table(json!({
        "default_region": "AT",
        "segment": {"max_batch_events": 100},
        "programmes": [{"name": "MBA"}, {"name": "LL.M.", "aliases": ["Master of Laws"]}],
        "sentiment_lexicon": {"klasse": 0.9},
        "intents": [{"intent": "opt_out", "exact": ["stop"]}],
        "salesforce_fields": {"Email": "email"}
    })))
    .unwrap();
    assert_eq!(o.default_region, "AT");
    assert_eq!(o.segment.max_batch_events, 100);
    assert_eq!(o.segment.max_event_bytes, 32 * 1024, "unspecified limits keep their defaults");
    assert_eq!(o.programmes.len(), 2);
    assert!(o.programmes[0].aliases.is_empty());
    assert_eq!(o.intents[0].keywords, Vec::<String>::new());
    assert_eq!(o.fallback_intent, "other");
    assert_eq!(normalize_phone("0664 1234567", &o.default_region), Some("+436641234567".into()));
}

#[test]
fn config_mistakes_fail_at_start() {
    for bad in [
        json!({"default_regoin": "DE"}),
        json!({"segment": {"max_events": 1}}),
        json!({"default_region": "Germany"}),
        json!({"sentiment_lexicon": {"gut": 3.0}}),
        json!({"segment": {"max_batch_events": 0}}),
        json!({"programmes": [{"name": " "}]}),
        json!({"intents": [{"intent": "", "keywords": ["x"]}]}),
        json!({"salesforce_fields": {"Email": ""}}),
        json!({"max_csv_bytes": 0}),
        json!({"programmes": "MBA"}),
    ] {
        assert!(NormalizeOptions::from_config(&table(bad.clone())).is_err(), "{bad}");
    }
    // A value of the wrong type names its key, nested ones included.
    for (bad, key) in [
        (json!({"max_csv_bytes": "big"}), "normalize.max_csv_bytes"),
        (json!({"date_order": "dmy"}), "normalize.date_order"),
        (json!({"segment": {"max_batch_events": "x"}}), "normalize.segment.max_batch_events"),
    ] {
        let e = NormalizeOptions::from_config(&table(bad.clone())).unwrap_err();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn email_normalization() {
    assert_eq!(normalize_email(" Max.Mustermann@GMAIL.com\t"), Some("max.mustermann@gmail.com".into()));
    assert_eq!(normalize_email("LENA.Schmidt@Uni-Example.DE"), Some("lena.schmidt@uni-example.de".into()));
    assert_eq!(normalize_email("jürgen.müller@uni-köln.de"), Some("jürgen.müller@uni-köln.de".into()));
    for bad in
        ["", "   ", "max.mustermann", "@gmail.com", "max@", "a@b@c.de", "max mustermann@gmail.com", "<max@gmail.com>"]
    {
        assert_eq!(normalize_email(bad), None, "{bad:?}");
    }
}

#[test]
fn phone_normalization_to_e164() {
    for (raw, want) in [
        ("+49 1512 3456789", "+4915123456789"),
        ("+49 (0)151 23456789", "+4915123456789"),
        ("0151-234 567 89", "+4915123456789"),
        ("0049 151 23456789", "+4915123456789"),
        ("whatsapp:+4915123456789", "+4915123456789"),
        ("030 12345678", "+493012345678"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+1 415-555-2671", "+14155552671"),
    ] {
        assert_eq!(normalize_phone(raw, "DE").as_deref(), Some(want), "{raw}");
    }
    assert_eq!(normalize_phone("(415) 555-2671", "US").as_deref(), Some("+14155552671"));
    for bad in ["", "n/a", "12345", "+49 000", "0151 2345678901234567", "whatsapp:"] {
        assert_eq!(normalize_phone(bad, "DE"), None, "{bad:?}");
    }
}

/// Every source, fed arbitrary bytes, answers with an `Ok` or an `Err`, never a panic.
#[test]
fn no_input_panics() {
    let opts = NormalizeOptions::default();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet: &[u8] =
        b"{}[]\":,;|\t\r\n0123456789+-.eE truefalsnul\\u00ff@whatsapp:IdEmailbatchtypetrackChangeEventHeader=&%";
    let seeds: Vec<Vec<u8>> = vec![
        br#"{"batch":[{"type":"track","userId":"u","event":"e","timestamp":"9999-12-31T23:59:59+14:00","sentAt":"0001-01-01T00:00:00Z"}]}"#.to_vec(),
        br#"{"type":"track","userId":"u","event":"e","timestamp":1e300}"#.to_vec(),
        br#"[{"email":"a@b.de","timestamp":1e300,"event":"open"},{"email":"a@b.de","timestamp":-1e300,"event":"open"}]"#.to_vec(),
        br#"{"data":{"payload":{"ChangeEventHeader":{"recordIds":["003A"],"changeType":"UPDATE","commitTimestamp":1e308},"Name":{"A":{"B":{"C":1}}}}}}"#.to_vec(),
        b"Id\n\"unterminated\n".to_vec(),
        b"MessageSid=S&From=whatsapp%3A%2B&NumMedia=99999999999999999999".to_vec(),
        "[".repeat(10_000).into_bytes(),
    ];
    let formats = [
        PayloadFormat::Segment { call: SegmentCall::Batch },
        PayloadFormat::Segment { call: SegmentCall::Identify },
        PayloadFormat::TwilioForm,
        PayloadFormat::SendgridEvents,
        PayloadFormat::SalesforceCdc,
        PayloadFormat::SalesforceCsv,
    ];
    let mut bodies = seeds;
    for _ in 0..300 {
        let len = (next() % 200) as usize;
        bodies.push((0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect());
    }
    for body in &bodies {
        for format in formats {
            let p = RawPayload {
                source: Source::Web,
                format,
                body: body.clone().into(),
                content_type: String::new(),
                received_at: Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(),
            };
            let _ = normalize(&p, &opts);
        }
    }
}
