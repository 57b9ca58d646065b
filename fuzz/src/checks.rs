//! The entry points the fuzz targets drive, and what every outcome must satisfy.
//!
//! One function per parser that takes outside input: it feeds raw bytes through the same entry
//! point production uses and panics if the outcome breaks an invariant. "Did not panic" alone
//! proves little, so each check also states what a sound answer looks like: errors of the typed
//! kind the body deserves (invalid JSON is `Malformed`, an oversized body is `TooLarge`), every
//! element of a batch either accepted or rejected exactly once, events stamped with the
//! payload's source and receipt time, events that survive the journal's JSON round trip.
//!
//! This file is compiled twice: by the fuzz targets (`fuzz/src/lib.rs`) and by the regression
//! test that replays the committed corpus under `cargo test` on stable
//! (`actors/tests/fuzz_regressions.rs`, through `#[path]`). It may therefore only use crates
//! that `cohort-actors` depends on.

use chrono::{DateTime, TimeZone, Utc};
use cohort_actors::normalize::signature::verify_twilio;
use cohort_actors::normalize::signature::{parse_sendgrid_public_key, sign_sendgrid, sign_twilio, verify_sendgrid};
use cohort_actors::normalize::{normalize, normalize_csv_record, NormalizeError, NormalizeOptions, Normalized};
use cohort_actors::segments::computed::ProfileFacts;
use cohort_actors::segments::lang::{compile, eval, Val};
use cohort_actors::segments::models::{LogisticModel, Models};
use cohort_actors::segments::{Segment, SegmentDefinition, SegmentKind};
use cohort_config::{Config, ConfigError};
use cohort_messages::msgs::{PayloadFormat, RawPayload, SegmentCall};
use cohort_messages::{
    CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, ProfileId, ProfileRecord, RawRef, Source, Utm,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

/// A check: raw bytes in, a panic if an invariant breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets by name, for replaying a corpus directory through the right check.
pub const TARGETS: &[(&str, Check)] = &[
    ("segment", segment),
    ("twilio", twilio),
    ("sendgrid", sendgrid),
    ("salesforce_cdc", salesforce_cdc),
    ("salesforce_csv", salesforce_csv),
    ("signatures", signatures),
    ("segment_rules", segment_rules),
    ("config", config),
    ("connector", connector),
];

/// A fixed receipt time, so a finding replays identically.
fn received_at() -> DateTime<Utc> {
    Utc.timestamp_opt(1_793_608_203, 0).single().unwrap_or_default()
}

fn options() -> &'static NormalizeOptions {
    static OPTS: OnceLock<NormalizeOptions> = OnceLock::new();
    OPTS.get_or_init(NormalizeOptions::default)
}

fn payload(source: Source, format: PayloadFormat, body: &[u8], content_type: &str) -> RawPayload {
    RawPayload { source, format, body: body.into(), content_type: content_type.into(), received_at: received_at() }
}

/// What the JSON formats' bodies parse as, independently of the normalizer: `None` when the
/// body is not UTF-8 JSON (a byte-order mark allowed, as the normalizer allows it).
fn json_of(body: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?;
    serde_json::from_str(text.strip_prefix('\u{feff}').unwrap_or(text)).ok()
}

/// Invariants of every accepted event, whatever its source.
fn check_event(e: &CustomerEvent, p: &RawPayload) {
    assert_eq!(e.source, p.source, "an event carries its payload's source");
    assert_eq!(e.received_at, p.received_at, "an event carries its payload's receipt time");
    assert!(e.event_id.as_str().len() > p.source.as_str().len() + 1, "event id without a key: {:?}", e.event_id);
    for id in &e.identifiers {
        assert!(!id.value.trim().is_empty(), "empty {:?} identifier", id.kind);
    }
    assert_eq!(e.raw.seq, None, "the journal assigns sequence numbers, not the normalizer");
    // The journal stores events as JSON and the resolver reads them back.
    let json = match serde_json::to_vec(e) {
        Ok(j) => j,
        Err(err) => panic!("event does not serialize: {err}"),
    };
    match serde_json::from_slice::<CustomerEvent>(&json) {
        Ok(back) => assert_eq!(&back, e, "event changes through the journal's JSON round trip"),
        Err(err) => panic!("serialized event does not deserialize: {err}"),
    }
}

/// Elements of a batch, array or chunk: each index accepted or rejected exactly once, and when
/// the element count is known, every one of them accounted for.
fn check_elements(out: &Normalized, elements: Option<usize>) {
    let mut seen = BTreeSet::new();
    for e in &out.events {
        assert!(seen.insert(e.raw.index as usize), "element {} produced two outcomes", e.raw.index);
    }
    for r in &out.rejected {
        assert!(!r.reason.trim().is_empty(), "a rejection without a reason");
        let Some(i) = r.index else { panic!("a rejection without an element index: {r:?}") };
        assert!(seen.insert(i), "element {i} produced two outcomes");
    }
    if let Some(n) = elements {
        assert!(seen.iter().copied().eq(0..n), "outcomes {seen:?} do not cover the {n} elements");
    }
}

/// Whole-payload errors of the JSON formats: `Malformed` exactly when the body is not JSON,
/// `TooLarge` only over the limit.
fn check_json_error(err: &NormalizeError, body: &[u8], limit: usize) {
    match err {
        NormalizeError::Malformed { .. } => assert!(json_of(body).is_none(), "valid JSON called malformed: {err}"),
        NormalizeError::TooLarge { limit: l, actual, .. } => {
            assert!(actual > l, "too large but within the limit: {err}");
        }
        other => {
            assert!(json_of(body).is_some(), "invalid JSON not reported as malformed: {other}");
            assert!(body.len() <= limit, "an oversized body must be refused before parsing: {other}");
        }
    }
    assert!(!err.to_string().is_empty());
}

const SEGMENT_CALLS: [SegmentCall; 7] = [
    SegmentCall::Identify,
    SegmentCall::Track,
    SegmentCall::Page,
    SegmentCall::Screen,
    SegmentCall::Group,
    SegmentCall::Alias,
    SegmentCall::Batch,
];

/// Segment HTTP Tracking API: the body as posted to each of `/v1/{identify,...,batch}`.
pub fn segment(body: &[u8]) {
    let limits = &options().segment;
    for call in SEGMENT_CALLS {
        let p = payload(Source::Web, PayloadFormat::Segment { call }, body, "application/json");
        let limit = if call == SegmentCall::Batch { limits.max_batch_bytes } else { limits.max_event_bytes };
        match normalize(&p, options()) {
            Ok(out) => {
                assert!(body.len() <= limit, "{call:?}: accepted {} bytes over the limit {limit}", body.len());
                let parsed = json_of(body);
                assert!(parsed.as_ref().is_some_and(Value::is_object), "{call:?}: accepted a non-object body");
                let elements = match (call, parsed) {
                    (SegmentCall::Batch, Some(v)) => match v.get("batch") {
                        Some(Value::Array(items)) => items.len(),
                        _ => panic!("batch accepted without a `batch` array"),
                    },
                    _ => 1,
                };
                assert!(elements <= limits.max_batch_events, "batch of {elements} events accepted");
                if call == SegmentCall::Batch {
                    check_elements(&out, Some(elements));
                } else {
                    assert_eq!(out.events.len() + out.rejected.len(), 1, "{call:?}: one call, one outcome");
                    assert!(out.rejected.iter().all(|r| r.index.is_none() && !r.reason.is_empty()));
                }
                for e in &out.events {
                    check_event(e, &p);
                    let ids = |k: IdentifierKind| e.identifiers.iter().any(|i| i.kind == k);
                    assert!(
                        ids(IdentifierKind::UserId) || ids(IdentifierKind::AnonymousId),
                        "a Segment event needs a userId or an anonymousId"
                    );
                    if e.kind == EventKind::Track {
                        assert!(e.name.as_deref().is_some_and(|n| !n.trim().is_empty()), "a track without a name");
                    }
                    if call != SegmentCall::Batch {
                        assert_eq!(e.raw.index, 0);
                    }
                }
            }
            Err(err) => check_json_error(&err, body, limit),
        }
    }
}

/// Twilio's inbound WhatsApp webhook: the form body as the API reads it for the signature
/// check, then the normalizer.
pub fn twilio(body: &[u8]) {
    // What api::ingest::twilio does before verifying the signature.
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let url = "https://cohort.example.de/webhooks/twilio/whatsapp";
    let sig = sign_twilio("twilio-auth-token", url, &params);
    assert!(verify_twilio("twilio-auth-token", url, &params, &sig), "own signature rejected");
    assert!(!verify_twilio("another-token", url, &params, &sig), "signature accepted under another token");

    let p = payload(Source::Whatsapp, PayloadFormat::TwilioForm, body, "application/x-www-form-urlencoded");
    match normalize(&p, options()) {
        Ok(out) => {
            assert!(out.rejected.is_empty(), "a webhook is one message: accepted or refused whole");
            let [e] = out.events.as_slice() else { panic!("a webhook is one message, got {}", out.events.len()) };
            check_event(e, &p);
            assert_eq!(e.kind, EventKind::MessageReceived);
            let phone = e.identifiers.iter().find(|i| i.kind == IdentifierKind::Phone);
            let phone = phone.map(|i| i.value.as_str()).unwrap_or_default();
            assert!(
                phone.starts_with('+') && phone.len() > 1 && phone[1..].bytes().all(|b| b.is_ascii_digit()),
                "the sender's phone is not E.164: {phone:?}"
            );
            assert!(e.identifiers.iter().any(|i| i.kind == IdentifierKind::WhatsappId));
            let sid = params.iter().find(|(k, _)| k == "MessageSid").map(|(_, v)| v.trim());
            assert_eq!(e.event_id, EventId::new(Source::Whatsapp, sid.unwrap_or_default()), "keyed by MessageSid");
            let sentiment = e.properties.get("sentiment").and_then(Value::as_f64);
            assert!(sentiment.is_some_and(|s| (-1.0..=1.0).contains(&s)), "sentiment {sentiment:?} outside [-1, 1]");
            assert!(e.name.as_deref().is_some_and(|n| !n.is_empty()), "an intent is always named");
        }
        Err(NormalizeError::TooLarge { actual, limit, .. }) => assert!(actual > limit && body.len() > limit),
        Err(NormalizeError::Twilio(m)) => assert!(!m.is_empty()),
        Err(NormalizeError::Malformed { .. }) => {}
        Err(other) => panic!("Twilio refused with another source's error: {other}"),
    }
}

/// SendGrid Event Webhook: a JSON array of events.
pub fn sendgrid(body: &[u8]) {
    let p = payload(Source::Email, PayloadFormat::SendgridEvents, body, "application/json");
    match normalize(&p, options()) {
        Ok(out) => {
            let Some(Value::Array(items)) = json_of(body) else { panic!("accepted a body that is not a JSON array") };
            check_elements(&out, Some(items.len()));
            for e in &out.events {
                check_event(e, &p);
                assert_eq!(e.kind, EventKind::EmailActivity);
                let email = e.identifiers.iter().find(|i| i.kind == IdentifierKind::Email);
                assert!(email.is_some_and(|i| i.value.contains('@')), "an email event without an address");
            }
        }
        Err(NormalizeError::Sendgrid(m)) => {
            assert!(!m.is_empty());
            assert!(!matches!(json_of(body), Some(Value::Array(_)) | None), "a JSON array refused whole");
        }
        Err(err @ (NormalizeError::Malformed { .. } | NormalizeError::TooLarge { .. })) => {
            check_json_error(&err, body, options().max_webhook_bytes)
        }
        Err(other) => panic!("SendGrid refused with another source's error: {other}"),
    }
}

/// Salesforce Change Data Capture event, relayed as JSON.
pub fn salesforce_cdc(body: &[u8]) {
    let p = payload(Source::Crm, PayloadFormat::SalesforceCdc, body, "application/json");
    match normalize(&p, options()) {
        Ok(out) => {
            assert!(json_of(body).is_some_and(|v| v.is_object()), "accepted a body that is not a JSON object");
            assert!(!out.events.is_empty() || !out.rejected.is_empty(), "a change event produced nothing");
            check_elements(&out, None);
            for e in &out.events {
                check_event(e, &p);
                assert!(
                    matches!(e.kind, EventKind::ContactChanged | EventKind::ContactDeleted | EventKind::ContactGap),
                    "{:?} from a change event",
                    e.kind
                );
                let reread = e.properties.get("reread_all") == Some(&Value::Bool(true));
                let sf_id = e.identifiers.iter().any(|i| i.kind == IdentifierKind::SalesforceId);
                assert!(reread || sf_id, "a record change without the record's id");
            }
        }
        Err(NormalizeError::SalesforceCdc(m)) => {
            assert!(!m.is_empty());
            assert!(json_of(body).is_some(), "invalid JSON not reported as malformed");
        }
        Err(err @ (NormalizeError::Malformed { .. } | NormalizeError::TooLarge { .. })) => {
            check_json_error(&err, body, options().max_webhook_bytes)
        }
        Err(other) => panic!("Salesforce CDC refused with another source's error: {other}"),
    }
}

/// Salesforce Bulk API 2.0 CSV chunk, through the HTTP import's normalizer and through the
/// streaming importer's per-row entry point (`normalize_csv_record`), which must agree.
pub fn salesforce_csv(body: &[u8]) {
    let p = payload(Source::Crm, PayloadFormat::SalesforceCsv, body, "text/csv");
    let out = match normalize(&p, options()) {
        Ok(out) => out,
        Err(NormalizeError::SalesforceCsv(m)) => return assert!(!m.is_empty()),
        Err(NormalizeError::Malformed { .. }) => return,
        Err(NormalizeError::TooLarge { actual, limit, .. }) => return assert!(actual > limit),
        Err(other) => panic!("Salesforce CSV refused with another source's error: {other}"),
    };
    assert!(std::str::from_utf8(body).is_ok(), "accepted a body that is not UTF-8");
    check_elements(&out, None);
    let n = out.events.len() + out.rejected.len();
    check_elements(&out, Some(n));
    for e in &out.events {
        check_event(e, &p);
        assert_eq!(e.kind, EventKind::ContactChanged);
        let id = e.identifiers.iter().find(|i| i.kind == IdentifierKind::SalesforceId);
        assert!(id.is_some_and(|i| !i.value.trim().is_empty()), "a CSV row without its record id");
        assert_eq!(e.properties.get("change_origin"), Some(&json!("bulk_api_csv")));
    }
    // The streaming importer reads rows itself (comma-separated files) and calls the per-row
    // entry point; for a comma-separated chunk it must produce the same events.
    let text = std::str::from_utf8(body).unwrap_or_default();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let header_line = text.split('\n').next().unwrap_or_default();
    if [';', '\t', '|', '^', '`'].iter().any(|d| header_line.contains(*d)) {
        return;
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(text.as_bytes());
    let Ok(header) = reader.headers().cloned() else { return };
    for (index, row) in reader.records().enumerate() {
        let Ok(row) = row else { continue };
        let streamed = normalize_csv_record(&header, &row, index, received_at(), options());
        if let Ok(e) = streamed {
            check_event(&e, &p);
            assert!(out.events.contains(&e), "row {index}: the streaming importer and the HTTP import disagree");
        }
    }
}

fn sendgrid_keys() -> &'static (p256::ecdsa::SigningKey, p256::ecdsa::VerifyingKey) {
    static KEYS: OnceLock<(p256::ecdsa::SigningKey, p256::ecdsa::VerifyingKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let secret = [7u8; 32];
        let sk = match p256::ecdsa::SigningKey::from_slice(&secret) {
            Ok(k) => k,
            Err(e) => panic!("fixed test key: {e}"),
        };
        let vk = *sk.verifying_key();
        (sk, vk)
    })
}

/// Webhook signature parsing and verification: lines of the input are a request URL, an
/// `X-Twilio-Signature`, a SendGrid signature, its timestamp header and a verification key as
/// an operator pastes it; the rest is the body.
pub fn signatures(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(6, '\n');
    let mut next = || lines.next().unwrap_or_default().to_string();
    let (url, twilio_sig, sendgrid_sig, timestamp, key, body) = (next(), next(), next(), next(), next(), next());
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(body.as_bytes()).unwrap_or_default();

    // A guessed signature never verifies; the real one does, at the URL as given.
    let real = sign_twilio("twilio-auth-token", &url, &params);
    if twilio_sig.trim() != real {
        let _ = verify_twilio("twilio-auth-token", &url, &params, &twilio_sig);
    }
    assert!(verify_twilio("twilio-auth-token", &url, &params, &real), "own Twilio signature rejected");

    let (sk, vk) = sendgrid_keys();
    assert!(
        !verify_sendgrid(vk, body.as_bytes(), &sendgrid_sig, &timestamp),
        "a SendGrid signature verified that the key's owner never made"
    );
    let good = sign_sendgrid(sk, body.as_bytes(), timestamp.trim());
    assert!(verify_sendgrid(vk, body.as_bytes(), &good, &timestamp), "own SendGrid signature rejected");

    if let Ok(parsed) = parse_sendgrid_public_key(&key) {
        // Whatever key an operator configured, nothing signed by another key verifies with it.
        if parsed != *vk {
            assert!(!verify_sendgrid(&parsed, body.as_bytes(), &good, timestamp.trim()));
        }
    }
}

/// A profile with some activity, traits and consent for rules to read.
fn profile(now: DateTime<Utc>) -> &'static ProfileRecord {
    static PROFILE: OnceLock<ProfileRecord> = OnceLock::new();
    PROFILE.get_or_init(|| {
        let mut record = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("fuzz"), now), now);
        let event = |seq: i64, kind: EventKind, name: Option<&str>, props: Value, traits: Value| CustomerEvent {
            event_id: EventId::new(Source::Web, &format!("fuzz-{seq}")),
            source: Source::Web,
            kind,
            name: name.map(String::from),
            occurred_at: now - chrono::Duration::days(seq),
            received_at: now - chrono::Duration::days(seq),
            identifiers: vec![Identifier::new(IdentifierKind::UserId, "student-1001")],
            traits: traits.as_object().cloned().unwrap_or_default(),
            properties: props.as_object().cloned().unwrap_or_default(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        };
        let events = [
            event(1, EventKind::Page, None, json!({"path": "/programs/mba/fees"}), json!({})),
            event(2, EventKind::Page, None, json!({"path": "/programs/mba"}), json!({})),
            event(3, EventKind::Track, Some("Logged In"), json!({}), json!({})),
            event(4, EventKind::EmailActivity, Some("open"), json!({}), json!({})),
            event(
                5,
                EventKind::Identify,
                None,
                json!({}),
                json!({"enrollment_status": "Inquiry", "application_date": "2026-09-01", "gpa": 3.4,
                       "tags": ["mba", "scholarship"]}),
            ),
        ];
        for (seq, e) in events.iter().enumerate() {
            record.apply(seq as u64 + 1, e, 100);
        }
        record
    })
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let mut models = Models::default();
        let weights = [("engagement_score".to_string(), 0.05)].into_iter().collect();
        if let Ok(m) = LogisticModel::new(-1.0, weights) {
            models.insert("churn_risk", Arc::new(m));
        }
        models
    })
}

/// The segment rule language: a rule as `PUT /v1/segments/{name}` or `[[segments.define]]`
/// gives it, compiled and, when valid, evaluated on a profile.
pub fn segment_rules(data: &[u8]) {
    let Ok(rule) = std::str::from_utf8(data) else { return };
    let names = models().names();
    let now = received_at();
    match compile(rule, &names) {
        Ok(expr) => {
            let facts = ProfileFacts::new(profile(now), now, models());
            let mut next_change = None;
            let value = eval(&expr, &facts, &mut next_change);
            if let Some(at) = next_change {
                assert!(at >= now, "a rule asks to be evaluated again at {at}, before now ({now})");
            }
            if let Val::Num(n) = value {
                assert!(!n.is_nan(), "a rule evaluated to NaN");
            }
        }
        Err(e) => {
            let chars = rule.chars().count();
            assert!(
                e.column >= 1 && e.column <= chars + 1,
                "error column {} outside the rule ({chars} chars)",
                e.column
            );
            assert!(!e.message.is_empty());
        }
    }
    // The same rule through a segment definition, as the API and the config loader compile it.
    let definition = SegmentDefinition {
        name: "fuzz".into(),
        description: String::new(),
        kind: SegmentKind::Realtime,
        rule: Some(rule.to_string()),
        sql: None,
        every_secs: None,
        model: None,
        threshold: None,
    };
    assert_eq!(Segment::compile(definition, models()).is_ok(), compile(rule, &names).is_ok());
}

/// A config file: TOML over the defaults, validated, then what start-up derives from it (the
/// normalizer options, the models, the `[[segments.define]]` rules).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cfg = match Config::from_toml_str(text) {
        Ok(cfg) => cfg,
        Err(ConfigError::Parse(m)) => return assert!(!m.is_empty()),
        Err(ConfigError::Invalid { key, problem }) => return assert!(!key.is_empty() && !problem.is_empty()),
    };
    if let Err(e) = cfg.validate() {
        panic!("a loaded config fails validation on its own: {e}");
    }
    if let Ok(opts) = NormalizeOptions::from_config(&cfg.normalize) {
        assert!(opts.validate().is_ok());
    }
    // What the binary's segment_setup does before anything starts.
    let mut models = Models::default();
    for (name, m) in &cfg.models {
        if let Ok(model) = LogisticModel::new(m.bias, m.weights.clone()) {
            models.insert(name.clone(), Arc::new(model));
        }
    }
    for d in &cfg.segments.define {
        let _ = Segment::compile(d.clone(), &models);
    }
}

/// A connector as `generate-connector` makes them; the body's first byte picks the record
/// format (JSON, NDJSON, CSV, logfmt), the rest is the body.
struct FuzzConnector(u8);

const FUZZ_SCHEMA: &str = r#"{"type": "object", "required": ["id", "event", "timestamp"],
  "properties": {"id": {"type": "string", "minLength": 1}, "event": {"type": "string"},
  "timestamp": {"type": ["string", "number"]}, "user_id": {"type": "string"}}}"#;

impl cohort_actors::normalize::connector::Connector for FuzzConnector {
    fn name(&self) -> &'static str {
        "fuzz_conn"
    }
    fn channel(&self) -> Source {
        Source::Web
    }
    fn schema(&self) -> &'static str {
        FUZZ_SCHEMA
    }
    fn expectations(&self) -> &'static str {
        "max_records = 50"
    }
    fn records(&self, body: &[u8]) -> Result<Vec<cohort_actors::normalize::connector::Record>, String> {
        use cohort_actors::normalize::connector::{csv_records, json_records, logfmt_records, ndjson_records};
        match self.0 % 4 {
            0 => json_records(body),
            1 => ndjson_records(body),
            2 => csv_records(body),
            _ => logfmt_records(body),
        }
    }
    fn map(
        &self,
        r: &cohort_actors::normalize::connector::Record,
    ) -> Result<cohort_actors::normalize::connector::EventDraft, String> {
        use cohort_actors::normalize::connector::{field, timestamp_field, EventDraft};
        Ok(EventDraft {
            key: field(r, "id").ok_or("no id")?.to_string(),
            kind: EventKind::Track,
            name: field(r, "event").map(str::to_string),
            occurred_at: timestamp_field(r, "timestamp")?,
            user_id: field(r, "user_id").map(str::to_string),
            email: field(r, "email").map(str::to_string),
            phone: field(r, "phone").map(str::to_string),
            traits: serde_json::Map::new(),
            properties: serde_json::Map::new(),
        })
    }
}

/// A connector's body: split into records, each checked against the schema and the
/// expectations, mapped, and accepted or refused exactly once.
pub fn connector(data: &[u8]) {
    use cohort_actors::normalize::connector::{format_of, Connector, ConnectorSet};
    let Some((&pick, body)) = data.split_first() else { return };
    let c = FuzzConnector(pick);
    let set = ConnectorSet::new(vec![Arc::new(FuzzConnector(pick))]).expect("the fuzz connector registers");
    let opts = NormalizeOptions { connectors: set, ..options().clone() };
    let p = payload(Source::Web, format_of(&c), body, "text/plain");
    let split = c.records(body);
    match (normalize(&p, &opts), split) {
        (Ok(out), Ok(records)) => {
            assert!(records.len() <= 50, "more records than max_records were accepted");
            assert_eq!(out.events.len() + out.rejected.len(), records.len(), "every record once");
            let mut refused = BTreeSet::new();
            for r in &out.rejected {
                let i = r.index.expect("a refusal names its record");
                assert!(i < records.len() && refused.insert(i), "refusal index {i} out of range or repeated");
            }
            for e in &out.events {
                check_event(e, &p);
                assert!(e.event_id.as_str().starts_with("web+fuzz_conn:"), "{}", e.event_id.as_str());
                assert_eq!(e.properties.get("connector"), Some(&json!("fuzz_conn")));
                assert!(!e.identifiers.is_empty(), "require_identifier lets no anonymous record through");
            }
        }
        (Err(NormalizeError::Malformed { .. }), Err(_)) => {}
        (Err(NormalizeError::TooLarge { actual, limit, .. }), _) => assert!(actual > limit),
        (other, split) => panic!("normalize {other:?} disagrees with the splitter {split:?}"),
    }
}
