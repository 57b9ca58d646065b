//! One behavioural suite for every `Warehouse` backend (DuckDB and SQLite, each as a file and in
//! memory, and the BigQuery emulator). A test file supplies a factory and expands `warehouse_tests!` with it.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::any::Any;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cohort_adapters::warehouse::raw_mentioning;
use cohort_adapters::warehouse::PayloadEncoding;
use cohort_adapters::{
    BronzeRecord, BronzeRow, GoldProfileRow, Layer, QueryValue, SilverRow, StoreErrorKind, Warehouse,
};
use cohort_messages::{
    CustomerEvent, ErasureTarget, EventId, EventKind, Identifier, IdentifierKind, ProfileId, ProfileRecord, RawRef,
    Source, Utm,
};
use serde_json::{json, Map, Value};

/// A warehouse under test and whatever must live as long as it (a temp folder).
pub struct Subject {
    pub wh: Arc<dyn Warehouse>,
    pub guard: Option<Box<dyn Any + Send>>,
}

/// Expands to one `#[tokio::test]` per suite case; `$make` is an async expression giving a
/// fresh, empty `Subject` (schema not yet created). Declare the module with `#[macro_use]`.
macro_rules! warehouse_tests {
    ($make:expr) => {
        warehouse_tests!(@cases $make;
            schema_is_idempotent,
            writes_land_in_every_layer,
            silver_is_deduplicated_by_event_id,
            gold_keeps_the_latest_snapshot_per_profile,
            named_parameters_of_every_type,
            delete_profile_removes_only_that_profiles_rows,
            raw_payloads_mentioning_a_person_are_found_and_deleted,
            batches_of_1200_rows_round_trip,
            bad_queries_are_invalid_not_retryable,
        );
    };
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let subject = $make.await;
                crate::warehouse_suite::$case(&subject).await;
            }
        )+
    };
}

pub fn t0() -> DateTime<Utc> {
    // Microseconds on purpose: both backends must keep them.
    Utc.timestamp_opt(1_704_164_645, 123_456_000).single().unwrap()
}

pub fn profile(n: u32) -> ProfileId {
    ProfileId::derive_from_event(&EventId::new(Source::Crm, &format!("creator-{n}")), t0())
}

pub fn event(id: &str, secs: i64, raw_seq: Option<u64>) -> CustomerEvent {
    let mut traits = Map::new();
    traits.insert("first_name".into(), json!("Zoë"));
    let mut properties = Map::new();
    properties.insert("path".into(), json!("/apply"));
    properties.insert("score".into(), json!(87.5));
    CustomerEvent {
        event_id: EventId::new(Source::Web, id),
        source: Source::Web,
        kind: EventKind::Page,
        name: Some("Apply".into()),
        occurred_at: t0() + Duration::seconds(secs),
        received_at: t0() + Duration::seconds(secs) + Duration::milliseconds(250),
        identifiers: vec![Identifier::new(IdentifierKind::AnonymousId, format!("anon-{id}"))],
        traits,
        properties,
        utm: Utm { campaign: Some("spring".into()), ..Utm::default() },
        trace: None,
        raw: RawRef { seq: raw_seq, index: 0 },
    }
}

pub fn silver(id: &str, secs: i64, who: &ProfileId) -> SilverRow {
    SilverRow::from_event(&event(id, secs, Some(secs.unsigned_abs() + 1)), who)
}

pub fn bronze(seq: u64, body: &[u8]) -> BronzeRow {
    BronzeRow::from_record(
        seq,
        &BronzeRecord {
            source: Source::Web,
            format: "segment:page".into(),
            content_type: "application/json".into(),
            received_at: t0() + Duration::seconds(seq as i64),
            body: body.to_vec(),
        },
    )
}

/// A profile snapshot after `events` page views, taken `secs` after t0.
pub fn gold(who: &ProfileId, events: u64, secs: i64) -> GoldProfileRow {
    let mut record = ProfileRecord::new(who.clone(), t0());
    for i in 0..events {
        record.apply(i + 1, &event(&format!("{who}-g{i}"), i as i64, Some(i + 1)), 10);
    }
    GoldProfileRow::from_record_at(&record, t0() + Duration::seconds(secs))
}

fn p(name: &str, v: QueryValue) -> (String, QueryValue) {
    (name.to_string(), v)
}

async fn counts(wh: &dyn Warehouse) -> [u64; 3] {
    let mut out = [0; 3];
    for (i, layer) in Layer::ALL.into_iter().enumerate() {
        out[i] = wh.count_rows(layer).await.unwrap();
    }
    out
}

async fn event_ids_of(wh: &dyn Warehouse, who: &ProfileId) -> Vec<String> {
    let sql = format!("SELECT event_id FROM {} WHERE profile_id = @p ORDER BY event_id", wh.table(Layer::Silver));
    let result = wh.query(&sql, &[p("p", QueryValue::String(who.to_string()))]).await.unwrap();
    assert_eq!(result.columns, vec!["event_id"]);
    result.rows.into_iter().map(|r| r[0].as_str().unwrap().to_string()).collect()
}

pub async fn schema_is_idempotent(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    wh.ensure_schema().await.unwrap();
    assert_eq!(counts(wh).await, [0, 0, 0]);
    // Data survives a second ensure_schema (nothing is dropped or recreated).
    wh.write_silver(vec![silver("a", 1, &profile(1))]).await.unwrap();
    wh.ensure_schema().await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 1);
}

pub async fn writes_land_in_every_layer(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let binary = [0xffu8, 0x00, 0xfe, b'{'];
    wh.write_bronze(vec![bronze(1, b"{\"type\":\"page\"}"), bronze(2, &binary), bronze(3, "ünïcödé".as_bytes())])
        .await
        .unwrap();
    let (a, b) = (profile(1), profile(2));
    wh.write_silver(vec![silver("e1", 1, &a), silver("e2", 2, &a), silver("e3", 3, &b)]).await.unwrap();
    wh.write_gold_profiles(vec![gold(&a, 2, 10), gold(&b, 1, 10)]).await.unwrap();
    assert_eq!(counts(wh).await, [3, 3, 2]);

    // Bronze: a replayed raw_seq is kept once; payloads round-trip exactly.
    wh.write_bronze(vec![bronze(2, &binary)]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Bronze).await.unwrap(), 3);
    let sql = format!("SELECT raw_seq, payload_encoding, payload FROM {} ORDER BY raw_seq", wh.table(Layer::Bronze));
    let result = wh.query(&sql, &[]).await.unwrap();
    assert_eq!(result.columns, vec!["raw_seq", "payload_encoding", "payload"]);
    assert_eq!(result.rows.len(), 3);
    assert_eq!(result.rows[0], vec![json!(1), json!("utf8"), json!("{\"type\":\"page\"}")]);
    assert_eq!(result.rows[2][2], json!("ünïcödé"));
    let stored = BronzeRow {
        payload_encoding: serde_json::from_value(result.rows[1][1].clone()).unwrap(),
        payload: result.rows[1][2].as_str().unwrap().to_string(),
        ..bronze(2, &binary)
    };
    assert_eq!(stored.payload_encoding, PayloadEncoding::Base64);
    assert_eq!(stored.body().unwrap(), binary);

    // Silver columns round-trip: text, timestamps with microseconds, JSON as JSON text.
    let sql = format!(
        "SELECT event_id, source, kind, name, occurred_at, received_at, identifiers, traits, properties, utm, raw_seq \
         FROM {} WHERE event_id = @e",
        wh.table(Layer::Silver)
    );
    let result = wh.query(&sql, &[p("e", QueryValue::String("web:e1".into()))]).await.unwrap();
    assert_eq!(result.rows.len(), 1);
    let row = &result.rows[0];
    assert_eq!(row[0..4], [json!("web:e1"), json!("web"), json!("page"), json!("Apply")]);
    assert_eq!(row[4], json!("2024-01-02T03:04:06.123456Z"));
    assert_eq!(row[5], json!("2024-01-02T03:04:06.373456Z"));
    let parse = |v: &Value| serde_json::from_str::<Value>(v.as_str().unwrap()).unwrap();
    assert_eq!(parse(&row[6]), json!([{"kind": "anonymous_id", "value": "anon-e1"}]));
    assert_eq!(parse(&row[7]), json!({"first_name": "Zoë"}));
    assert_eq!(parse(&row[8]), json!({"path": "/apply", "score": 87.5}));
    assert_eq!(parse(&row[9]), json!({"campaign": "spring"}));
    assert_eq!(row[10], json!(2));

    // Gold columns.
    let sql = format!(
        "SELECT profile_id, events_total, first_seen, last_seen, merged_into, traits FROM {} WHERE profile_id = @p",
        wh.table(Layer::Gold)
    );
    let result = wh.query(&sql, &[p("p", QueryValue::String(a.to_string()))]).await.unwrap();
    assert_eq!(result.rows.len(), 1);
    let row = &result.rows[0];
    assert_eq!(row[0], json!(a.to_string()));
    assert_eq!(row[1], json!(2));
    assert_eq!(row[2], json!("2024-01-02T03:04:05.123456Z"));
    assert_eq!(row[3], json!("2024-01-02T03:04:06.123456Z"));
    assert_eq!(row[4], Value::Null);
    assert_eq!(parse(&row[5])["first_name"], json!("Zoë"));
}

pub async fn silver_is_deduplicated_by_event_id(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let a = profile(1);
    // Duplicates within one batch and across batches (a replay after a crash).
    wh.write_silver(vec![silver("e1", 1, &a), silver("e2", 2, &a), silver("e1", 1, &a)]).await.unwrap();
    wh.write_silver(vec![silver("e2", 2, &a), silver("e3", 3, &a)]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Silver).await.unwrap(), 3);
    assert_eq!(event_ids_of(wh, &a).await, vec!["web:e1", "web:e2", "web:e3"]);
    let sql = format!("SELECT COUNT(*) AS n FROM {} WHERE event_id = @e", wh.table(Layer::Silver));
    let result = wh.query(&sql, &[p("e", QueryValue::String("web:e2".into()))]).await.unwrap();
    assert_eq!(result.rows, vec![vec![json!(1)]]);
}

pub async fn gold_keeps_the_latest_snapshot_per_profile(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let (a, b) = (profile(1), profile(2));
    wh.write_gold_profiles(vec![gold(&a, 1, 10), gold(&b, 1, 10)]).await.unwrap();
    wh.write_gold_profiles(vec![gold(&a, 3, 30)]).await.unwrap();
    // A stale snapshot arriving late (replay) must not win.
    wh.write_gold_profiles(vec![gold(&a, 2, 20)]).await.unwrap();
    // One written later at the same time (a merge kept it) does: it holds more.
    wh.write_gold_profiles(vec![gold(&b, 4, 10)]).await.unwrap();
    assert_eq!(wh.count_rows(Layer::Gold).await.unwrap(), 2);
    let sql =
        format!("SELECT profile_id, events_total, snapshot_at FROM {} ORDER BY profile_id", wh.table(Layer::Gold));
    let result = wh.query(&sql, &[]).await.unwrap();
    let mut expected = vec![
        vec![json!(a.to_string()), json!(3), json!("2024-01-02T03:04:35.123456Z")],
        vec![json!(b.to_string()), json!(4), json!("2024-01-02T03:04:15.123456Z")],
    ];
    expected.sort_by(|x, y| x[0].as_str().cmp(&y[0].as_str()));
    assert_eq!(result.rows, expected);
}

pub async fn named_parameters_of_every_type(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let (a, b) = (profile(1), profile(2));
    wh.write_silver((0..6).map(|i| silver(&format!("e{i}"), i, if i % 2 == 0 { &a } else { &b })).collect())
        .await
        .unwrap();
    wh.write_gold_profiles(vec![gold(&a, 4, 10), gold(&b, 1, 10)]).await.unwrap();

    // String + Timestamp (with microseconds) + Int64; names with and without `@`.
    let sql = format!(
        "SELECT event_id, occurred_at, raw_seq FROM {} \
         WHERE profile_id = @p AND occurred_at >= @since AND raw_seq < @max_seq ORDER BY event_id",
        wh.table(Layer::Silver)
    );
    let params = [
        p("p", QueryValue::String(a.to_string())),
        p("@since", QueryValue::Timestamp(t0() + Duration::seconds(2))),
        p("max_seq", QueryValue::Int64(6)),
    ];
    let result = wh.query(&sql, &params).await.unwrap();
    assert_eq!(result.columns, vec!["event_id", "occurred_at", "raw_seq"]);
    assert_eq!(
        result.rows,
        vec![
            vec![json!("web:e2"), json!("2024-01-02T03:04:07.123456Z"), json!(3)],
            vec![json!("web:e4"), json!("2024-01-02T03:04:09.123456Z"), json!(5)],
        ]
    );
    // A timestamp parameter compares at microsecond precision.
    let sql = format!("SELECT event_id FROM {} WHERE occurred_at = @t", wh.table(Layer::Silver));
    let result = wh.query(&sql, &[p("t", QueryValue::Timestamp(t0() + Duration::seconds(3)))]).await.unwrap();
    assert_eq!(result.rows, vec![vec![json!("web:e3")]]);

    // Float64 and Bool parameters (SQLite has no boolean type: compare against an expression).
    let sql = format!(
        "SELECT profile_id FROM {} WHERE events_total > @min AND (events_total > 1) = @many ORDER BY profile_id",
        wh.table(Layer::Gold)
    );
    let result =
        wh.query(&sql, &[p("min", QueryValue::Float64(0.5)), p("many", QueryValue::Bool(true))]).await.unwrap();
    assert_eq!(result.rows, vec![vec![json!(a.to_string())]]);

    // Parameters the SQL does not use are ignored (as BigQuery's emulator does).
    let result = wh.query("SELECT 1 AS one", &[p("unused", QueryValue::Int64(1))]).await.unwrap();
    assert_eq!(result.rows, vec![vec![json!(1)]]);

    // An empty result still names its columns.
    let result = wh
        .query(
            &format!("SELECT event_id, profile_id FROM {} WHERE profile_id = @p", wh.table(Layer::Silver)),
            &[p("p", QueryValue::String("prof_nobody".into()))],
        )
        .await
        .unwrap();
    assert!(result.rows.is_empty());
}

pub async fn delete_profile_removes_only_that_profiles_rows(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let (a, b) = (profile(1), profile(2));
    wh.write_bronze(vec![bronze(1, b"raw one"), bronze(2, b"raw two")]).await.unwrap();
    wh.write_silver(vec![silver("a1", 1, &a), silver("a2", 2, &a), silver("a3", 3, &a), silver("b1", 4, &b)])
        .await
        .unwrap();
    wh.write_gold_profiles(vec![gold(&a, 3, 10), gold(&b, 1, 10)]).await.unwrap();

    let outcome = wh.delete_profile(&a).await.unwrap();
    assert!(!outcome.retry_later, "{outcome:?}");
    // a's events came from raw payloads 2, 3 and 4; only 2 was stored. Payload 1 is nobody's.
    assert_eq!(outcome.rows_deleted, 5, "{outcome:?}");
    for layer in ["bronze", "silver", "gold"] {
        assert!(outcome.detail.contains(layer), "{}", outcome.detail);
    }
    assert!(!outcome.detail.contains(a.as_str()), "the detail must not name the person: {}", outcome.detail);

    assert_eq!(counts(wh).await, [1, 1, 1]);
    let raw = wh.query(&format!("SELECT raw_seq FROM {}", wh.table(Layer::Bronze)), &[]).await.unwrap();
    assert_eq!(raw.rows, vec![vec![json!(1)]], "only the other payload is left");
    assert!(event_ids_of(wh, &a).await.is_empty());
    assert_eq!(event_ids_of(wh, &b).await, vec!["web:b1"]);
    let result = wh.query(&format!("SELECT profile_id FROM {}", wh.table(Layer::Gold)), &[]).await.unwrap();
    assert_eq!(result.rows, vec![vec![json!(b.to_string())]]);

    // Idempotent: the GDPR saga may call again.
    let again = wh.delete_profile(&a).await.unwrap();
    assert_eq!((again.rows_deleted, again.retry_later), (0, false));
    assert_eq!(counts(wh).await, [1, 1, 1]);
}

pub async fn raw_payloads_mentioning_a_person_are_found_and_deleted(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    wh.write_bronze(vec![
        bronze(1, br#"{"traits":{"email":"Jana.Novak@uni.eu"}}"#),
        bronze(2, b"From=whatsapp%3A%2B4915112345678&Body=hi"),
        bronze(3, br#"{"traits":{"email":"max@uni.eu"}}"#),
    ])
    .await
    .unwrap();
    let target = ErasureTarget {
        identifiers: vec![
            Identifier::new(IdentifierKind::Email, "jana.novak@uni.eu"),
            Identifier::new(IdentifierKind::Phone, "+4915112345678"),
        ],
        ..ErasureTarget::default()
    };
    let found = raw_mentioning(wh, &target, str::to_string).await.unwrap();
    assert_eq!(found, vec![1, 2], "case-insensitive, URL-encoded forms too");
    assert_eq!(wh.raw_payloads(1, 1).await.unwrap().len(), 1, "paged after a seq");
    let outcome = wh.delete_raw(&found).await.unwrap();
    assert_eq!((outcome.rows_deleted, outcome.retry_later), (2, false), "{outcome:?}");
    assert!(raw_mentioning(wh, &target, str::to_string).await.unwrap().is_empty());
    assert_eq!(counts(wh).await[0], 1, "the other student's payload stays");
    assert_eq!(wh.delete_raw(&found).await.unwrap().rows_deleted, 0, "idempotent");
}

pub async fn batches_of_1200_rows_round_trip(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let (a, b) = (profile(1), profile(2));
    let rows: Vec<SilverRow> =
        (0..1200).map(|i| silver(&format!("bulk-{i:05}"), i, if i < 700 { &a } else { &b })).collect();
    wh.write_silver(rows).await.unwrap();
    wh.write_bronze((1..=1200).map(|i| bronze(i, format!("{{\"n\":{i}}}").as_bytes())).collect()).await.unwrap();
    wh.write_gold_profiles((0..1200).map(|i| gold(&profile(100 + i), 1, 10)).collect()).await.unwrap();
    assert_eq!(counts(wh).await, [1200, 1200, 1200]);

    let sql = format!(
        "SELECT COUNT(*) AS n, MIN(event_id) AS first, MAX(event_id) AS last, SUM(raw_seq) AS seqs \
         FROM {} WHERE profile_id = @p",
        wh.table(Layer::Silver)
    );
    let result = wh.query(&sql, &[p("p", QueryValue::String(b.to_string()))]).await.unwrap();
    assert_eq!(result.columns, vec!["n", "first", "last", "seqs"]);
    // raw_seq of row i is i + 1: the sum over 700..1200 is 701 + ... + 1200.
    let seqs: i64 = (701..=1200).sum();
    assert_eq!(result.rows, vec![vec![json!(500), json!("web:bulk-00700"), json!("web:bulk-01199"), json!(seqs)]]);
    let ids = event_ids_of(wh, &a).await;
    assert_eq!(ids.len(), 700);
    assert_eq!(ids.first().map(String::as_str), Some("web:bulk-00000"));
    assert_eq!(ids.last().map(String::as_str), Some("web:bulk-00699"));
}

pub async fn bad_queries_are_invalid_not_retryable(s: &Subject) {
    let wh = s.wh.as_ref();
    wh.ensure_schema().await.unwrap();
    let err = wh.query(&format!("SELECT no_such_column FROM {}", wh.table(Layer::Silver)), &[]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    let sql = format!("SELECT event_id FROM {} WHERE profile_id = @p", wh.table(Layer::Silver));
    let err = wh.query(&sql, &[]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    let err = wh.query(&sql, &[p("p; DROP TABLE silver", QueryValue::Int64(1))]).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
}
