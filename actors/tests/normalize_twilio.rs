//! Twilio WhatsApp webhook normalization and message understanding.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chrono::{DateTime, TimeZone, Utc};
use cohort_actors::normalize::{analyze_text, normalize, NormalizeError, NormalizeOptions, Normalized, Programme};
use cohort_messages::msgs::{PayloadFormat, RawPayload};
use cohort_messages::{EventId, EventKind, Identifier, IdentifierKind, Source};
use serde_json::json;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 9, 45, 0).unwrap()
}

fn run(body: Vec<u8>) -> Result<Normalized, NormalizeError> {
    let p = RawPayload {
        source: Source::Whatsapp,
        format: PayloadFormat::TwilioForm,
        body: body.into(),
        content_type: "application/x-www-form-urlencoded".into(),
        received_at: received(),
    };
    normalize(&p, &NormalizeOptions::default())
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(pairs).unwrap().into_bytes()
}

fn message(body: &str) -> serde_json::Map<String, serde_json::Value> {
    let out = run(form(&[("MessageSid", "SM1"), ("From", "whatsapp:+4915123456789"), ("Body", body)])).unwrap();
    out.events.into_iter().next().unwrap().properties
}

#[test]
fn mba_deadline_question_fixture() {
    let out = run(fixture("twilio_whatsapp_mba.form")).unwrap();
    assert!(out.rejected.is_empty());
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.event_id, EventId::new(Source::Whatsapp, "SM8f1b6c1e2d3a4b5c6d7e8f9a0b1c2d3e"));
    assert_eq!(e.kind, EventKind::MessageReceived);
    assert_eq!(e.source, Source::Whatsapp);
    assert_eq!(e.name.as_deref(), Some("deadline_question"));
    assert_eq!(e.occurred_at, received());
    assert_eq!(
        e.identifiers,
        vec![
            Identifier::new(IdentifierKind::Phone, "+4915123456789"),
            Identifier::new(IdentifierKind::WhatsappId, "+4915123456789"),
        ]
    );
    assert_eq!(e.traits["whatsapp_profile_name"], json!("Max Mustermann"));
    let p = &e.properties;
    assert_eq!(p["text"], json!("Hi, when is the deadline for MBA?"));
    assert_eq!(p["intent"], json!("deadline_question"));
    assert_eq!(p["entities"], json!(["MBA"]));
    assert!(p["sentiment"].as_f64().is_some_and(|s| (-1.0..=1.0).contains(&s)));
    assert_eq!(p["to"], json!("whatsapp:+493012345678"));
    assert_eq!(p["channel"], json!("whatsapp"));
    assert_eq!(p["AccountSid"], json!("ACae1f2b3c4d5e6f708192a3b4c5d6e7f8"), "unknown fields are kept");
    assert_eq!(p["SmsStatus"], json!("received"));
    assert!(!p.contains_key("From") && !p.contains_key("Body"), "consumed fields are not duplicated");
    assert!(!p.contains_key("consent_change"));
    assert!(!p.contains_key("media"));
}

#[test]
fn media_are_listed_and_german_text_is_understood() {
    let out = run(fixture("twilio_whatsapp_media.form")).unwrap();
    let e = &out.events[0];
    assert_eq!(e.identifiers[0], Identifier::new(IdentifierKind::Phone, "+491701234567"));
    assert_eq!(e.identifiers[1], Identifier::new(IdentifierKind::WhatsappId, "+491701234567"));
    let media = e.properties["media"].as_array().unwrap();
    assert_eq!(media.len(), 2);
    assert_eq!(media[0]["content_type"], json!("image/jpeg"));
    assert!(media[0]["url"].as_str().unwrap().ends_with("/Media/ME1a2b3c"));
    assert_eq!(media[1]["content_type"], json!("application/pdf"));
    assert_eq!(e.properties["text"], json!("Hier mein Zeugnis für die Bewerbung (Informatik)"));
    assert_eq!(e.properties["intent"], json!("enrollment_inquiry"));
    assert_eq!(e.properties["entities"], json!(["BSc Computer Science"]));
}

#[test]
fn wa_id_is_preferred_for_the_whatsapp_identifier() {
    let out = run(form(&[
        ("MessageSid", "SM2"),
        ("From", "whatsapp:+4915123456789"),
        ("WaId", "4917612345678"),
        ("Body", "Hallo"),
    ]))
    .unwrap();
    let e = &out.events[0];
    assert!(e.identifiers.contains(&Identifier::new(IdentifierKind::Phone, "+4915123456789")));
    assert!(e.identifiers.contains(&Identifier::new(IdentifierKind::WhatsappId, "+4917612345678")));
    assert!(e.traits.is_empty());
}

#[test]
fn stop_and_german_opt_outs_are_consent_changes() {
    for text in [
        "STOP",
        "stop",
        " Stop. ",
        "UNSUBSCRIBE",
        "STOPP",
        "Abmelden",
        "abmelden!",
        "Bitte abmelden",
        "Please unsubscribe me",
        "Keine Nachrichten mehr bitte",
    ] {
        let p = message(text);
        assert_eq!(p["intent"], json!("opt_out"), "{text}");
        assert_eq!(p["consent_change"], json!({"channel": "whatsapp", "status": "opted_out"}), "{text}");
    }
    // "stop" inside a question is not an opt-out
    let p = message("When does the enrolment stop?");
    assert_ne!(p["intent"], json!("opt_out"));
    assert!(!p.contains_key("consent_change"));
    let p = message("START");
    assert_eq!(p["intent"], json!("opt_in"));
    assert_eq!(p["consent_change"], json!({"channel": "whatsapp", "status": "opted_in"}));
}

#[test]
fn each_intent_in_english_and_german() {
    let cases = [
        ("Hi, when is the deadline for MBA?", "deadline_question"),
        ("Bis wann kann ich mich bewerben?", "deadline_question"),
        ("Wann ist die Bewerbungsfrist für Psychologie?", "deadline_question"),
        ("How much are the tuition fees?", "payment"),
        ("Kann ich die Studiengebühren in Raten zahlen?", "payment"),
        ("I paid the invoice yesterday", "payment"),
        ("I would like to apply for the MSc Data Science", "enrollment_inquiry"),
        ("Ich interessiere mich für BWL und möchte mich einschreiben", "enrollment_inquiry"),
        ("What are the admission requirements?", "enrollment_inquiry"),
        ("This is unacceptable, nobody answered my emails", "complaint"),
        ("Ich möchte mich beschweren, ich bin sehr enttäuscht", "complaint"),
        ("STOP", "opt_out"),
        ("STOPP", "opt_out"),
        ("help", "help"),
        ("Guten Morgen!", "other"),
        ("", "other"),
    ];
    let opts = NormalizeOptions::default();
    for (text, intent) in cases {
        assert_eq!(analyze_text(text, &opts).intent, intent, "{text}");
        if !text.is_empty() {
            assert_eq!(message(text)["intent"], json!(intent), "{text}");
        }
    }
}

#[test]
fn programmes_are_found_by_name_and_alias_case_and_accent_insensitively() {
    let opts = NormalizeOptions::default();
    let e = |t: &str| analyze_text(t, &opts).entities;
    assert_eq!(e("Hi, when is the deadline for MBA?"), vec!["MBA"]);
    assert_eq!(e("infos zum mba bitte"), vec!["MBA"]);
    assert_eq!(
        e("Is the Master of Business Administration part-time?"),
        vec!["MBA"],
        "longest match wins over BA Business Administration"
    );
    assert_eq!(e("MSc Data Science or data science bootcamp?"), vec!["MSc Data Science"]);
    assert_eq!(e("Ich schwanke zwischen PSYCHOLOGIE und Informatik"), vec!["Psychology", "BSc Computer Science"]);
    assert_eq!(e("Künstliche Intelligenz oder kunstliche intelligenz"), vec!["MSc Artificial Intelligence"]);
    assert_eq!(e("MBA's application"), vec!["MBA"]);
    assert!(e("Ich habe eine Frage zur Wohnung").is_empty());
    assert!(e("MBAs").is_empty(), "whole words only");
    // a configured catalogue replaces the default
    let custom = NormalizeOptions {
        programmes: vec![Programme { name: "LL.M. Europarecht".into(), aliases: vec!["Europäisches Recht".into()] }],
        ..Default::default()
    };
    assert_eq!(analyze_text("Frage zu europaisches recht", &custom).entities, vec!["LL.M. Europarecht"]);
    assert!(analyze_text("MBA", &custom).entities.is_empty());
    // The rules are compiled once per value: a clone of used options, changed, uses its own.
    let mut changed = custom.clone();
    changed.programmes.push(Programme { name: "MBA".into(), aliases: vec![] });
    changed.sentiment_lexicon.insert("oder".into(), 0.5);
    let analysis = analyze_text("MBA oder europäisches Recht", &changed);
    assert_eq!(analysis.entities, vec!["MBA", "LL.M. Europarecht"]);
    assert_eq!(analysis.sentiment, 0.5);
    let original = analyze_text("MBA oder europäisches Recht", &custom);
    assert_eq!((original.entities, original.sentiment), (vec!["LL.M. Europarecht".to_string()], 0.0));
}

#[test]
fn sentiment_sign_negation_and_bounds() {
    let opts = NormalizeOptions::default();
    let s = |t: &str| analyze_text(t, &opts).sentiment;
    assert!(s("Thanks, the info session was great!") > 0.3);
    assert!(s("Vielen Dank, das war super hilfreich 👍") > 0.3);
    assert!(s("This is terrible, I am really disappointed") < -0.3);
    assert!(s("Ich bin enttäuscht, das ist eine Frechheit") < -0.3);
    assert!(s("not good") < 0.0);
    assert!(s("Das ist nicht gut") < 0.0);
    assert!(s("not bad at all") > 0.0);
    assert!(s("don't like it") < 0.0);
    assert!(s("very good") > s("good"));
    assert_eq!(s("When is the deadline?"), 0.0);
    assert_eq!(s(""), 0.0);
    for t in [
        "worst worst worst scam",
        "best best perfect perfect",
        "extremely extremely worst",
        "so so so very perfect 😍😍",
    ] {
        let v = s(t);
        assert!((-1.0..=1.0).contains(&v), "{t}: {v}");
    }
    // out-of-range configured weights are clamped, never leak
    let mut wild = NormalizeOptions::default();
    wild.sentiment_lexicon.insert("mega".into(), 7.0);
    wild.sentiment_lexicon.insert("nan".into(), f64::NAN);
    assert!((-1.0..=1.0).contains(&analyze_text("mega mega nan", &wild).sentiment));
}

#[test]
fn missing_sid_or_sender_is_malformed() {
    assert!(matches!(
        run(form(&[("From", "whatsapp:+4915123456789"), ("Body", "Hi")])),
        Err(NormalizeError::Twilio(_))
    ));
    assert!(matches!(run(form(&[("MessageSid", "SM1"), ("Body", "Hi")])), Err(NormalizeError::Twilio(_))));
    assert!(matches!(
        run(form(&[("MessageSid", ""), ("From", "whatsapp:+4915123456789")])),
        Err(NormalizeError::Twilio(_))
    ));
    assert!(matches!(run(form(&[("MessageSid", "SM1"), ("From", "whatsapp:hello")])), Err(NormalizeError::Twilio(_))));
    assert!(run(Vec::new()).is_err());
    assert!(run(b"\xff\xfe%%%=&&".to_vec()).is_err());
    // an empty body text is still a message
    let out = run(form(&[
        ("MessageSid", "SM9"),
        ("From", "whatsapp:+4915123456789"),
        ("NumMedia", "1"),
        ("MediaUrl0", "https://api.twilio.com/m/1"),
    ]))
    .unwrap();
    assert_eq!(out.events[0].properties["text"], json!(""));
    assert_eq!(out.events[0].properties["media"][0]["url"], json!("https://api.twilio.com/m/1"));
}

#[test]
fn oversized_webhook_is_too_large() {
    let opts = NormalizeOptions { max_webhook_bytes: 100, ..Default::default() };
    let long = "x".repeat(200);
    let p = RawPayload {
        source: Source::Whatsapp,
        format: PayloadFormat::TwilioForm,
        body: form(&[("MessageSid", "SM1"), ("From", "whatsapp:+4915123456789"), ("Body", &long)]).into(),
        content_type: String::new(),
        received_at: received(),
    };
    assert!(matches!(normalize(&p, &opts), Err(NormalizeError::TooLarge { limit: 100, .. })));
}
