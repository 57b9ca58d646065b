//! The backend-independent contract of `EventLog` + `OperationalStore`.
//!
//! Every backend runs the same functions. A test crate provides an async fixture factory
//! returning a fresh, empty store and invokes:
//! - [`store_suite!`] for backends implementing both traits (the embedded file and memory
//!   stores): every test, journal and store;
//! - [`operational_store_suite!`] for backends implementing only `OperationalStore` (MongoDB,
//!   whose journal in production is Kafka): the store tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cohort_adapters::{
    AppendBatch, AppendOutcome, BronzeRecord, BronzeRow, EventLog, FlushBatch, GoldProfileRow, NewDeadLetter,
    OperationalStore, SilverRow, WarehouseBatch,
};
use cohort_messages::{
    msgs::IdentityMerged, CustomerEvent, DeadLetterStage, ErasureCounts, ErasureTarget, EventId, EventKind, Identifier,
    IdentifierKind, ProfileId, ProfileRecord, RawRef, Source, Utm,
};
use cohort_messages::{
    AuditEntry, Channel, ConsentRecord, ConsentState, LedgerEntry, MergeLedger, NewAuditEntry, ReviewItem,
    ReviewStatus, SagaRecord, SagaStatus, Suppression, SuppressionReason,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Map};

/// A fresh, empty store as both trait objects, plus whatever must outlive it (a temp dir, a
/// throwaway database handle).
pub struct Fixture {
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn OperationalStore>,
    pub keep: Option<Box<dyn std::any::Any + Send>>,
}

impl Fixture {
    /// The store half, for the store-only tests (the log handle is dropped).
    pub fn into_store(self) -> StoreFixture {
        StoreFixture { store: self.store, keep: self.keep }
    }
}

/// A fresh, empty operational store, plus whatever must outlive it (a temp dir, a guard that
/// drops a test database).
pub struct StoreFixture {
    pub store: Arc<dyn OperationalStore>,
    pub keep: Option<Box<dyn std::any::Any + Send>>,
}

/// Generates one test per contract function, journal and store, for the backend built by
/// `$fixture` (an expression evaluating to a future of [`Fixture`]).
macro_rules! store_suite {
    ($fixture:expr) => {
        $crate::suite::store_suite!(@tests $fixture;
            append_assigns_consecutive_seqs_and_links_bronze,
            duplicate_event_ids_are_not_journaled,
            concurrent_appends_get_unique_gapless_seqs,
            concurrent_appends_of_one_event_id_journal_it_once,
            read_after_pages_in_order,
            bronze_round_trip_is_byte_exact,
            compaction_forgets_only_old_covered_events,
            journal_erasure_removes_the_persons_events_and_payloads,
            ping_answers,
        );
        $crate::suite::operational_store_suite!(async { $fixture.await.into_store() });
    };
    (@tests $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fixture = $fixture.await;
                $crate::suite::with_timeout($crate::suite::$name(fixture)).await;
            }
        )*
    };
}
pub(crate) use store_suite;

/// Generates one test per `OperationalStore` contract function for the backend built by
/// `$fixture` (an expression evaluating to a future of [`StoreFixture`]).
macro_rules! operational_store_suite {
    ($fixture:expr) => {
        $crate::suite::store_suite!(@tests $fixture;
            flushed_profiles_and_identities_can_be_read_back,
            rich_profile_round_trips_exactly,
            checkpoint_never_goes_backwards,
            dead_letters_get_increasing_ids_and_page,
            concurrent_dead_letter_batches_get_unique_ids,
            profile_ids_page_in_id_order,
            merges_are_listed_for_both_profiles,
            large_flush_round_trips,
            flushed_event_ids_are_seen,
            outbox_keeps_batches_in_order_until_acknowledged,
            large_outbox_batches_are_split_and_kept_whole,
            outbox_payloads_larger_than_a_document_are_kept_whole,
            profiles_load_in_one_call,
            flushed_event_ids_expire,
            consents_keep_the_latest_decision_per_purpose_and_channel,
            suppression_list_adds_looks_up_and_removes,
            sagas_advance_one_version_at_a_time,
            audit_log_numbers_and_pages_entries,
            review_queue_filters_by_status_and_pages,
            documents_are_kept_per_collection_listed_by_prefix_and_deleted,
            erasure_removes_one_person_and_nobody_else,
            identifier_claims_keep_the_first_owner,
            store_ping_answers,
        );
    };
}
pub(crate) use operational_store_suite;

/// No contract test may hang the run: a lost group-commit reply would otherwise wait forever.
pub async fn with_timeout(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("store test timed out");
}

pub fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

/// A web track event with a unique anonymous id and a property, so round trips are checked
/// on more than the id.
pub fn event(id: &str) -> CustomerEvent {
    let mut properties = Map::new();
    properties.insert("score".into(), json!(7));
    properties.insert("path".into(), json!(format!("/quiz/{id}")));
    CustomerEvent {
        event_id: EventId::new(Source::Web, id),
        source: Source::Web,
        kind: EventKind::Track,
        name: Some("quiz_completed".into()),
        occurred_at: at(1),
        received_at: at(2),
        identifiers: vec![Identifier::new(IdentifierKind::AnonymousId, format!("anon_{id}"))],
        traits: Map::new(),
        properties,
        utm: Utm { campaign: Some("spring".into()), ..Utm::default() },
        trace: None,
        raw: RawRef { seq: None, index: 0 },
    }
}

pub fn raw(body: &[u8]) -> BronzeRecord {
    BronzeRecord {
        source: Source::Web,
        format: "segment:track".into(),
        content_type: "application/json".into(),
        received_at: at(2),
        body: body.to_vec(),
    }
}

pub fn batch(raw_body: Option<&[u8]>, ids: &[&str]) -> AppendBatch {
    AppendBatch { raw: raw_body.map(raw), events: ids.iter().map(|id| event(id)).collect() }
}

pub fn profile_id(n: u32) -> ProfileId {
    ProfileId::derive_from_event(&EventId::new(Source::Crm, &format!("p{n}")), at(i64::from(n)))
}

/// A profile with one applied event, so traits, counters and history are all non-trivial.
pub fn profile(n: u32) -> ProfileRecord {
    let mut p = ProfileRecord::new(profile_id(n), at(i64::from(n)));
    let mut e = event(&format!("profile-{n}"));
    e.traits.insert("first_name".into(), json!(format!("Student {n}")));
    p.apply(u64::from(n), &e, 10);
    p
}

pub fn email(n: u32) -> Identifier {
    Identifier::new(IdentifierKind::Email, format!("student{n}@example.edu"))
}

pub fn dead_letter(n: u32) -> NewDeadLetter {
    NewDeadLetter {
        source: Source::Email,
        stage: DeadLetterStage::Validation,
        reason: format!("bad payload {n}"),
        event_id: Some(format!("email:sg{n}")),
        payload: format!("{{\"n\":{n}}}"),
        content_type: "application/json".into(),
        received_at: at(i64::from(n)),
        attempts: n,
    }
}

pub async fn append_assigns_consecutive_seqs_and_links_bronze(f: Fixture) {
    let head = f.log.watch_head();
    assert_eq!(*head.borrow(), 0);

    let first = f.log.append(batch(Some(b"payload-1"), &["a", "b", "c"])).await.unwrap();
    assert_eq!(first, AppendOutcome { raw_seq: Some(1), seqs: vec![Some(1), Some(2), Some(3)] });
    let second = f.log.append(batch(None, &["d"])).await.unwrap();
    assert_eq!(second, AppendOutcome { raw_seq: None, seqs: vec![Some(4)] });
    let empty = f.log.append(batch(None, &[])).await.unwrap();
    assert_eq!(empty, AppendOutcome { raw_seq: None, seqs: vec![] });
    let third = f.log.append(batch(Some(b"payload-2"), &["e"])).await.unwrap();
    assert_eq!(third, AppendOutcome { raw_seq: Some(2), seqs: vec![Some(5)] });
    assert_eq!(*head.borrow(), 5);
    assert_eq!(*f.log.watch_head().borrow(), 5);

    let journal = f.log.read_after(0, 100).await.unwrap();
    assert_eq!(journal.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let raw_seqs: Vec<_> = journal.iter().map(|j| j.event.raw.seq).collect();
    assert_eq!(raw_seqs, vec![Some(1), Some(1), Some(1), None, Some(2)]);
    for (j, id) in journal.iter().zip(["a", "b", "c", "d", "e"]) {
        let mut expected = event(id);
        expected.raw.seq = j.event.raw.seq;
        assert_eq!(j.event, expected, "event {id} must round-trip");
    }
}

pub async fn duplicate_event_ids_are_not_journaled(f: Fixture) {
    let out = f.log.append(batch(None, &["a", "b", "a"])).await.unwrap();
    assert_eq!(out.seqs, vec![Some(1), Some(2), None], "repeat within one batch");
    let out = f.log.append(batch(Some(b"retry"), &["b", "c"])).await.unwrap();
    assert_eq!(out.seqs, vec![None, Some(3)], "repeat across calls");
    let out = f.log.append(batch(Some(b"retry"), &["a", "b", "c"])).await.unwrap();
    assert_eq!(out.seqs, vec![None, None, None]);
    assert!(out.raw_seq.is_some(), "the raw payload is kept for audit even when all are duplicates");

    let journal = f.log.read_after(0, 100).await.unwrap();
    let ids: Vec<_> = journal.iter().map(|j| j.event.event_id.as_str().to_string()).collect();
    assert_eq!(ids, vec!["web:a", "web:b", "web:c"]);
    assert_eq!(journal.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(*f.log.watch_head().borrow(), 3);
}

pub async fn concurrent_appends_get_unique_gapless_seqs(f: Fixture) {
    const TASKS: usize = 50;
    let mut head = f.log.watch_head();
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let log = Arc::clone(&f.log);
            tokio::spawn(async move {
                let ids = [format!("t{i}-0"), format!("t{i}-1")];
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                log.append(batch(Some(format!("body {i}").as_bytes()), &ids)).await
            })
        })
        .collect();
    let mut seqs = BTreeSet::new();
    let mut raw_seqs = BTreeSet::new();
    for task in tasks {
        let out = task.await.unwrap().unwrap();
        let [Some(a), Some(b)] = out.seqs[..] else {
            panic!("every event is new: {out:?}");
        };
        assert_eq!(b, a + 1, "one batch's events are journaled together, in order");
        assert!(seqs.insert(a) && seqs.insert(b), "seqs must be unique");
        assert!(raw_seqs.insert(out.raw_seq.unwrap()), "raw seqs must be unique");
    }
    let max = (TASKS * 2) as u64;
    assert_eq!(seqs, (1..=max).collect::<BTreeSet<_>>(), "seqs start at 1 with no gaps");
    assert_eq!(raw_seqs, (1..=TASKS as u64).collect::<BTreeSet<_>>());
    head.wait_for(|h| *h == max).await.unwrap();
    assert_eq!(f.log.read_after(0, 1000).await.unwrap().len(), TASKS * 2);
}

pub async fn concurrent_appends_of_one_event_id_journal_it_once(f: Fixture) {
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let log = Arc::clone(&f.log);
            tokio::spawn(async move { log.append(batch(None, &["same"])).await })
        })
        .collect();
    let mut journaled = 0;
    for task in tasks {
        let out = task.await.unwrap().unwrap();
        journaled += out.seqs.iter().flatten().count();
    }
    assert_eq!(journaled, 1, "a retry storm journals the event exactly once");
    assert_eq!(f.log.read_after(0, 100).await.unwrap().len(), 1);
}

pub async fn read_after_pages_in_order(f: Fixture) {
    let ids: Vec<String> = (0..25).map(|i| format!("e{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.log.append(batch(None, &ids[..12])).await.unwrap();
    f.log.append(batch(None, &ids[12..])).await.unwrap();

    let mut cursor = 0;
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    loop {
        let page = f.log.read_after(cursor, 10).await.unwrap();
        sizes.push(page.len());
        let Some(last) = page.last() else { break };
        cursor = last.seq;
        seen.extend(page.into_iter().map(|j| (j.seq, j.event.event_id)));
    }
    assert_eq!(sizes, vec![10, 10, 5, 0]);
    let expected: Vec<_> = (1..=25u64).zip(ids.iter().map(|id| EventId::new(Source::Web, id))).collect();
    assert_eq!(seen, expected);
    assert_eq!(f.log.read_after(7, 2).await.unwrap().iter().map(|j| j.seq).collect::<Vec<_>>(), [8, 9]);
    assert!(f.log.read_after(25, 10).await.unwrap().is_empty());
    assert!(f.log.read_after(u64::MAX, 10).await.unwrap().is_empty());
    assert!(f.log.read_after(0, 0).await.unwrap().is_empty());
}

pub async fn bronze_round_trip_is_byte_exact(f: Fixture) {
    let binary: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    let bodies: [&[u8]; 3] = [&binary, b"", "Grüße, Ünïcödé ✓".as_bytes()];
    for (i, body) in bodies.iter().enumerate() {
        let mut record = raw(body);
        record.source = Source::ALL[i];
        record.format = format!("format-{i}");
        f.log.append(AppendBatch { raw: Some(record), events: vec![] }).await.unwrap();
    }
    let stored = f.log.read_bronze_after(0, 10).await.unwrap();
    assert_eq!(stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    for (i, (_, record)) in stored.iter().enumerate() {
        let mut expected = raw(bodies[i]);
        expected.source = Source::ALL[i];
        expected.format = format!("format-{i}");
        assert_eq!(record, &expected);
    }
    let page = f.log.read_bronze_after(1, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].0, 2);
    assert!(page[0].1.body.is_empty());
    assert!(f.log.read_bronze_after(3, 10).await.unwrap().is_empty());
    assert_eq!(*f.log.watch_head().borrow(), 0, "bronze-only appends do not move the journal head");
}

pub async fn flushed_profiles_and_identities_can_be_read_back(f: StoreFixture) {
    assert_eq!(f.store.load_profile(&profile_id(1)).await.unwrap(), None);
    assert_eq!(f.store.lookup_identity(&email(1)).await.unwrap(), None);
    assert_eq!(f.store.count_profiles().await.unwrap(), 0);

    let (p1, p2) = (profile(1), profile(2));
    let device = Identifier::new(IdentifierKind::DeviceId, "dev_1");
    f.store
        .commit_flush(FlushBatch {
            identities: vec![
                (email(1), p1.profile_id.clone()),
                (device.clone(), p1.profile_id.clone()),
                (email(2), p2.profile_id.clone()),
            ],
            profiles: vec![p1.clone(), p2.clone()],
            merges: vec![],
            checkpoint: None,
            event_ids: vec![],
            outbox: WarehouseBatch::default(),
        })
        .await
        .unwrap();
    assert_eq!(f.store.load_profile(&p1.profile_id).await.unwrap(), Some(p1.clone()));
    assert_eq!(f.store.load_profile(&p2.profile_id).await.unwrap(), Some(p2.clone()));
    assert_eq!(f.store.lookup_identity(&email(1)).await.unwrap(), Some(p1.profile_id.clone()));
    assert_eq!(f.store.lookup_identity(&device).await.unwrap(), Some(p1.profile_id.clone()));
    assert_eq!(f.store.lookup_identity(&email(2)).await.unwrap(), Some(p2.profile_id.clone()));
    assert_eq!(f.store.lookup_identity(&email(3)).await.unwrap(), None);
    let many = f.store.lookup_identities(&[email(2), email(3), device.clone(), email(1)]).await.unwrap();
    assert_eq!(
        many,
        vec![Some(p2.profile_id.clone()), None, Some(p1.profile_id.clone()), Some(p1.profile_id.clone())],
        "in the order asked, misses as None"
    );
    assert!(f.store.lookup_identities(&[]).await.unwrap().is_empty());
    assert_eq!(f.store.count_profiles().await.unwrap(), 2);

    // Upserts: a newer snapshot replaces the record, an identity can be re-pointed.
    let mut p1_newer = p1.clone();
    p1_newer.apply(99, &event("later"), 10);
    f.store
        .commit_flush(FlushBatch {
            identities: vec![(device.clone(), p2.profile_id.clone())],
            profiles: vec![p1_newer.clone()],
            ..FlushBatch::default()
        })
        .await
        .unwrap();
    assert_eq!(f.store.load_profile(&p1.profile_id).await.unwrap(), Some(p1_newer));
    assert_eq!(f.store.lookup_identity(&device).await.unwrap(), Some(p2.profile_id.clone()));
    assert_eq!(f.store.count_profiles().await.unwrap(), 2);
    assert_eq!(f.store.checkpoint().await.unwrap(), 0, "no checkpoint was given");
}

pub async fn checkpoint_never_goes_backwards(f: StoreFixture) {
    assert_eq!(f.store.checkpoint().await.unwrap(), 0);
    let flush = |checkpoint| FlushBatch { checkpoint, ..FlushBatch::default() };
    f.store.commit_flush(flush(Some(10))).await.unwrap();
    assert_eq!(f.store.checkpoint().await.unwrap(), 10);
    f.store.commit_flush(flush(Some(5))).await.unwrap();
    assert_eq!(f.store.checkpoint().await.unwrap(), 10, "a lower checkpoint is ignored");
    f.store.commit_flush(flush(None)).await.unwrap();
    assert_eq!(f.store.checkpoint().await.unwrap(), 10);
    f.store
        .commit_flush(FlushBatch { profiles: vec![profile(1)], checkpoint: Some(12), ..FlushBatch::default() })
        .await
        .unwrap();
    assert_eq!(f.store.checkpoint().await.unwrap(), 12);
}

pub async fn dead_letters_get_increasing_ids_and_page(f: StoreFixture) {
    assert_eq!(f.store.count_dead_letters().await.unwrap(), 0);
    assert!(f.store.list_dead_letters(0, 10).await.unwrap().is_empty());
    let before = Utc::now();
    let ids = f.store.put_dead_letters((1..=3).map(dead_letter).collect()).await.unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(f.store.put_dead_letters(vec![]).await.unwrap(), Vec::<u64>::new());
    let ids = f.store.put_dead_letters((4..=5).map(dead_letter).collect()).await.unwrap();
    assert_eq!(ids, vec![4, 5]);
    assert_eq!(f.store.count_dead_letters().await.unwrap(), 5);

    let first = f.store.list_dead_letters(0, 2).await.unwrap();
    assert_eq!(first.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2]);
    let rest = f.store.list_dead_letters(2, 10).await.unwrap();
    assert_eq!(rest.iter().map(|d| d.id).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(f.store.list_dead_letters(5, 10).await.unwrap().is_empty());

    for letter in first.iter().chain(&rest) {
        let n = u32::try_from(letter.id).unwrap();
        let expected = dead_letter(n);
        assert_eq!(letter.source, expected.source);
        assert_eq!(letter.stage, expected.stage);
        assert_eq!(letter.reason, expected.reason);
        assert_eq!(letter.event_id, expected.event_id);
        assert_eq!(letter.payload, expected.payload);
        assert_eq!(letter.content_type, expected.content_type);
        assert_eq!(letter.received_at, expected.received_at);
        assert_eq!(letter.attempts, expected.attempts);
        assert!(letter.recorded_at >= before - chrono::Duration::seconds(1), "recorded_at is set to now");
        assert!(letter.recorded_at <= Utc::now());
    }
}

pub async fn profile_ids_page_in_id_order(f: StoreFixture) {
    let profiles: Vec<_> = (1..=7).rev().map(profile).collect();
    f.store.commit_flush(FlushBatch { profiles: profiles.clone(), ..FlushBatch::default() }).await.unwrap();
    let mut expected: Vec<_> = profiles.iter().map(|p| p.profile_id.clone()).collect();
    expected.sort();

    let mut seen = Vec::new();
    let mut after: Option<ProfileId> = None;
    let mut pages = 0;
    loop {
        let page = f.store.list_profile_ids(after.as_ref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        assert!(page.len() <= 3);
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);
    assert_eq!(f.store.list_profile_ids(None, 100).await.unwrap(), expected);
    assert!(f.store.list_profile_ids(None, 0).await.unwrap().is_empty());
}

pub async fn merges_are_listed_for_both_profiles(f: StoreFixture) {
    let (a, b, c, d) = (profile_id(1), profile_id(2), profile_id(3), profile_id(4));
    let merge = |merged: &ProfileId, n: u32, seq| IdentityMerged {
        survivor: a.clone(),
        merged: merged.clone(),
        evidence: vec![email(n)],
        at: at(i64::from(n)),
        seq,
        reason: Default::default(),
    };
    // Two merges into `a` at the same seq (one event linked three profiles), one later.
    let (ab, ac) = (merge(&b, 2, 40), merge(&c, 3, 40));
    let ad = merge(&d, 4, 100);
    f.store
        .commit_flush(FlushBatch { merges: vec![ad.clone(), ab.clone(), ac.clone()], ..FlushBatch::default() })
        .await
        .unwrap();
    let of_a = f.store.list_merges(&a).await.unwrap();
    assert_eq!(of_a.len(), 3);
    assert_eq!(of_a.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![40, 40, 100], "in seq order");
    for m in [&ab, &ac, &ad] {
        assert!(of_a.contains(m));
    }
    assert_eq!(f.store.list_merges(&b).await.unwrap(), vec![ab.clone()]);
    assert_eq!(f.store.list_merges(&c).await.unwrap(), vec![ac.clone()]);
    assert_eq!(f.store.list_merges(&d).await.unwrap(), vec![ad]);
    assert!(f.store.list_merges(&profile_id(5)).await.unwrap().is_empty());

    // Re-flushing the same merge (a replay) does not list it twice.
    f.store.commit_flush(FlushBatch { merges: vec![ab.clone()], ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.list_merges(&b).await.unwrap(), vec![ab]);
    assert_eq!(f.store.list_merges(&a).await.unwrap().len(), 3);
}

/// A record using every part of `ProfileRecord`: traits of every JSON type from several
/// sources, several history entries, many applied seqs (some large), both merge links,
/// sub-second timestamps, non-ASCII text and property keys with `.` and `$`.
pub fn rich_profile() -> ProfileRecord {
    let mut p = ProfileRecord::new(profile_id(1), at(0) + chrono::Duration::nanoseconds(123_456_789));
    let sources = [Source::Web, Source::Crm, Source::Mobile, Source::Email, Source::Whatsapp];
    for (i, source) in sources.into_iter().enumerate() {
        let n = i as i64;
        let mut e = event(&format!("rich-{i}"));
        e.source = source;
        e.event_id = EventId::new(source, &format!("rich-{i}"));
        e.kind = [EventKind::Identify, EventKind::Track, EventKind::Page, EventKind::Screen, EventKind::Track][i];
        e.occurred_at = at(10 + n) + chrono::Duration::nanoseconds(7 * (n + 1));
        e.received_at = at(20 + n) + chrono::Duration::microseconds(999_999);
        e.identifiers.push(Identifier::new(IdentifierKind::ALL[i], format!("Zoë-{i}@école.example")));
        e.traits.insert("first_name".into(), json!(format!("Zoë {i}")));
        e.traits.insert(format!("trait_{i}"), json!(i));
        e.properties.insert("page.url".into(), json!("https://example.edu/a?b=c"));
        e.properties.insert("$meta".into(), json!({"nested": {"deep": [1, 2.5, -3, null, true, "x", [], {}]}}));
        e.properties.insert("big".into(), json!(i64::MAX - n));
        e.properties.insert("ratio".into(), json!(0.1 + n as f64));
        p.apply(1_000 + i as u64, &e, 3);
    }
    for seq in [1u64, 2, 3, 1 << 40, (i64::MAX as u64) - 1] {
        p.applied_seqs.insert(seq);
    }
    p.merged_into = Some(profile_id(2));
    p.merged_from = vec![profile_id(3), profile_id(4)];
    p.kept_apart.insert(profile_id(5));
    p.consent.insert(
        "email".into(),
        ConsentState { granted: true, source: "web".into(), at: at(30), version: 2, legal_basis: "consent".into() },
    );
    // Segment names are chosen by users; one named like a personal field once made the sealed
    // record fail to encode.
    for (i, name) in ["email", "name", "mba_leads"].into_iter().enumerate() {
        p.segments.insert(name.into(), at(40 + i as i64));
    }
    p.ledger = Some(MergeLedger {
        base: Box::new(profile(6)),
        entries: vec![
            LedgerEntry::Merging { merged: profile_id(7) },
            LedgerEntry::Applied { seq: 2_000, event: Box::new(event("ledger-1")) },
            LedgerEntry::Absorbed { record: Box::new(profile(7)) },
        ],
    });
    p
}

pub async fn rich_profile_round_trips_exactly(f: StoreFixture) {
    let p = rich_profile();
    assert_eq!(p.recent_events.len(), 3, "history is bounded, several entries kept");
    assert!(p.traits.len() >= 6 && p.identifiers.len() >= 6 && p.counters.by_source.len() == 5);
    f.store.commit_flush(FlushBatch { profiles: vec![p.clone()], ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.load_profile(&p.profile_id).await.unwrap(), Some(p.clone()));

    // A record without the optional parts round-trips too (fields skipped when empty).
    let bare = ProfileRecord::new(profile_id(9), at(9));
    f.store.commit_flush(FlushBatch { profiles: vec![bare.clone()], ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.load_profile(&bare.profile_id).await.unwrap(), Some(bare));
    assert_eq!(f.store.load_profile(&p.profile_id).await.unwrap(), Some(p));
}

pub async fn concurrent_dead_letter_batches_get_unique_ids(f: StoreFixture) {
    const TASKS: u32 = 10;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move { store.put_dead_letters((1..=3).map(|i| dead_letter(t * 3 + i)).collect()).await })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for task in tasks {
        let batch = task.await.unwrap().unwrap();
        assert_eq!(batch.len(), 3);
        assert!(batch.windows(2).all(|w| w[1] == w[0] + 1), "one batch gets consecutive ids: {batch:?}");
        for id in batch {
            assert!(ids.insert(id), "id {id} handed out twice");
        }
    }
    assert_eq!(ids, (1..=u64::from(TASKS) * 3).collect::<BTreeSet<_>>());
    assert_eq!(f.store.count_dead_letters().await.unwrap(), u64::from(TASKS) * 3);
    let listed = f.store.list_dead_letters(0, 1000).await.unwrap();
    assert_eq!(listed.iter().map(|d| d.id).collect::<BTreeSet<_>>(), ids);
}

/// One write-behind cycle of a busy shard: 3,000 profiles and 3,000 identities in one flush.
pub async fn large_flush_round_trips(f: StoreFixture) {
    const N: u32 = 3_000;
    let profiles: Vec<_> = (1..=N).map(profile).collect();
    let identities: Vec<_> = (1..=N).map(|n| (email(n), profile_id(n))).collect();
    let started = Instant::now();
    f.store
        .commit_flush(FlushBatch {
            identities,
            profiles: profiles.clone(),
            merges: vec![],
            checkpoint: Some(77),
            event_ids: vec![],
            outbox: WarehouseBatch::default(),
        })
        .await
        .unwrap();
    let elapsed = started.elapsed();
    eprintln!(
        "flush of {N} profiles + {N} identities: {:.0} ms ({:.0} profiles/s)",
        elapsed.as_secs_f64() * 1e3,
        f64::from(N) / elapsed.as_secs_f64()
    );
    assert_eq!(f.store.checkpoint().await.unwrap(), 77);
    assert_eq!(f.store.count_profiles().await.unwrap(), u64::from(N));

    let mut expected: Vec<_> = profiles.iter().map(|p| p.profile_id.clone()).collect();
    expected.sort();
    let mut listed = Vec::new();
    let mut after: Option<ProfileId> = None;
    loop {
        let page = f.store.list_profile_ids(after.as_ref(), 1_000).await.unwrap();
        let Some(last) = page.last().cloned() else { break };
        after = Some(last);
        listed.extend(page);
    }
    assert_eq!(listed, expected);

    let store = &f.store;
    futures::stream::iter(profiles)
        .map(|p| async move {
            let n = u32::try_from(p.applied_seqs.iter().next().copied().unwrap()).unwrap();
            assert_eq!(store.load_profile(&p.profile_id).await?, Some(p.clone()));
            assert_eq!(store.lookup_identity(&email(n)).await?, Some(p.profile_id));
            Ok::<_, cohort_adapters::StoreError>(())
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .unwrap();
}

/// Idempotency keys: ids recorded by a flush are seen afterwards, others are not.
pub async fn flushed_event_ids_are_seen(f: StoreFixture) {
    let ids: Vec<String> = ["web:a", "web:b", "crm:cdc:1:003x"].iter().map(|s| s.to_string()).collect();
    assert_eq!(f.store.seen_event_ids(&ids).await.unwrap(), vec![false, false, false]);
    assert!(f.store.seen_event_ids(&[]).await.unwrap().is_empty());
    f.store.commit_flush(FlushBatch { event_ids: ids[..2].to_vec(), ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.seen_event_ids(&ids).await.unwrap(), vec![true, true, false]);
    // recording again is harmless
    f.store.commit_flush(FlushBatch { event_ids: ids.clone(), ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.seen_event_ids(&ids).await.unwrap(), vec![true, true, true]);
}

pub async fn identifier_claims_keep_the_first_owner(f: StoreFixture) {
    let (p1, p2) = (profile(1).profile_id, profile(2).profile_id);
    let owners = f.store.claim_identities(&[(email(1), p1.clone()), (email(2), p1.clone())]).await.unwrap();
    assert_eq!(owners, vec![p1.clone(), p1.clone()], "unclaimed identifiers go to the claimer");
    // A second claimer gets the identifier it is first to, and learns the owner of the other.
    let owners = f.store.claim_identities(&[(email(2), p2.clone()), (email(3), p2.clone())]).await.unwrap();
    assert_eq!(owners, vec![p1.clone(), p2.clone()]);
    assert_eq!(f.store.lookup_identity(&email(2)).await.unwrap(), Some(p1.clone()), "a lost claim changes nothing");
    assert_eq!(f.store.lookup_identity(&email(3)).await.unwrap(), Some(p2.clone()));
    assert!(f.store.claim_identities(&[]).await.unwrap().is_empty());
}

pub async fn store_ping_answers(f: StoreFixture) {
    f.store.ping().await.unwrap();
    f.store.commit_flush(FlushBatch { profiles: vec![profile(1)], ..FlushBatch::default() }).await.unwrap();
    f.store.ping().await.unwrap();
}

pub async fn ping_answers(f: Fixture) {
    f.store.ping().await.unwrap();
    f.log.append(batch(None, &["x"])).await.unwrap();
    f.store.ping().await.unwrap();
}

pub async fn compaction_forgets_only_old_covered_events(f: Fixture) {
    f.log.append(batch(Some(b"one"), &["c1", "c2"])).await.unwrap();
    f.log.append(batch(Some(b"two"), &["c3"])).await.unwrap();
    // Nothing was received (at(2)) or journaled (now) before at(0).
    assert_eq!(f.log.compact(at(0), 3).await.unwrap(), 0);
    assert_eq!(f.log.read_after(0, 10).await.unwrap().len(), 3);
    // Everything is older than a future cutoff, but only seqs up to `covered` may go.
    let removed = f.log.compact(Utc::now() + chrono::Duration::seconds(5), 2).await.unwrap();
    assert_eq!(removed, 3, "every idempotency key is older than the cutoff");
    let left: Vec<u64> = f.log.read_after(0, 10).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(left, vec![3], "seq 3 is not covered by the checkpoint");
    let bronze: Vec<u64> = f.log.read_bronze_after(0, 10).await.unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(bronze, vec![2], "the raw payload of the remaining event stays");
    // An expired id is accepted again: retention is the deduplication window.
    let again = f.log.append(batch(None, &["c1"])).await.unwrap();
    assert!(again.seqs[0].is_some());
    assert_eq!(again.seqs[0], Some(4), "seqs keep counting after compaction");
}

pub fn outbox_batch(n: u64) -> WarehouseBatch {
    WarehouseBatch {
        bronze: vec![BronzeRow::from_record(n, &raw(format!("payload {n}").as_bytes()))],
        silver: vec![SilverRow::from_event(&event(&format!("o{n}")), &profile_id(n as u32))],
        gold: vec![profile_id(n as u32)],
        gold_rows: vec![GoldProfileRow::from_record(&profile(n as u32))],
    }
}

pub async fn outbox_keeps_batches_in_order_until_acknowledged(f: StoreFixture) {
    assert_eq!(f.store.outbox_len().await.unwrap(), 0);
    assert!(f.store.read_outbox(10).await.unwrap().is_empty());
    for n in 1..=3 {
        f.store.commit_flush(FlushBatch { outbox: outbox_batch(n), ..FlushBatch::default() }).await.unwrap();
    }
    assert_eq!(f.store.outbox_len().await.unwrap(), 3);
    let first_two = f.store.read_outbox(2).await.unwrap();
    assert_eq!(first_two.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), vec![outbox_batch(1), outbox_batch(2)]);
    f.store.ack_outbox(&[first_two[0].0.clone()]).await.unwrap();
    // Acknowledging twice, or an id that never existed, is harmless.
    f.store.ack_outbox(&[first_two[0].0.clone(), "not-an-id".into()]).await.unwrap();
    let rest = f.store.read_outbox(10).await.unwrap();
    assert_eq!(rest.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), vec![outbox_batch(2), outbox_batch(3)]);
    f.store.ack_outbox(&rest.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(f.store.outbox_len().await.unwrap(), 0);
}

/// 300 Segment batches of 100 KB in one flush: more than a MongoDB document holds (16 MiB),
/// fewer rows than one outbox entry's row limit.
pub async fn outbox_payloads_larger_than_a_document_are_kept_whole(f: StoreFixture) {
    let mut big = WarehouseBatch::default();
    for n in 0..300u64 {
        let body = format!("{{\"batch\":[{}\"n\":{n}]}}", "{\"event\":\"Lesson Completed\"},".repeat(3_000));
        big.bronze.push(BronzeRow::from_record(n + 1, &raw(body.as_bytes())));
    }
    f.store.commit_flush(FlushBatch { outbox: big.clone(), ..FlushBatch::default() }).await.unwrap();
    let mut joined = WarehouseBatch::default();
    for (_, b) in f.store.read_outbox(1000).await.unwrap() {
        joined.extend(b);
    }
    assert!(joined == big, "every payload, whole and in order");
}

pub async fn large_outbox_batches_are_split_and_kept_whole(f: StoreFixture) {
    let mut big = WarehouseBatch::default();
    for n in 0..5000u64 {
        big.silver.push(SilverRow::from_event(&event(&format!("big{n}")), &profile_id((n % 50) as u32)));
    }
    f.store.commit_flush(FlushBatch { outbox: big.clone(), ..FlushBatch::default() }).await.unwrap();
    let stored = f.store.read_outbox(1000).await.unwrap();
    assert!(stored.len() > 1, "5000 rows are stored as several outbox entries");
    let mut joined = WarehouseBatch::default();
    for (_, b) in stored {
        joined.extend(b);
    }
    assert_eq!(joined, big);
}

pub async fn profiles_load_in_one_call(f: StoreFixture) {
    let profiles: Vec<ProfileRecord> = (1..=5).map(profile).collect();
    f.store.commit_flush(FlushBatch { profiles: profiles.clone(), ..FlushBatch::default() }).await.unwrap();
    let wanted = vec![profile_id(4), profile_id(2), profile_id(99)];
    let mut loaded = f.store.load_profiles(&wanted).await.unwrap();
    loaded.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
    let mut expected = vec![profiles[1].clone(), profiles[3].clone()];
    expected.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
    assert_eq!(loaded, expected, "missing ids are skipped");
    assert!(f.store.load_profiles(&[]).await.unwrap().is_empty());
}

pub async fn flushed_event_ids_expire(f: StoreFixture) {
    let ids = vec!["ev-a".to_string(), "ev-b".to_string()];
    f.store.commit_flush(FlushBatch { event_ids: ids.clone(), ..FlushBatch::default() }).await.unwrap();
    assert_eq!(f.store.expire_before(Utc::now() - chrono::Duration::hours(1)).await.unwrap(), 0);
    assert_eq!(f.store.seen_event_ids(&ids).await.unwrap(), vec![true, true]);
    assert_eq!(f.store.expire_before(Utc::now() + chrono::Duration::seconds(5)).await.unwrap(), 2);
    assert_eq!(f.store.seen_event_ids(&ids).await.unwrap(), vec![false, false]);
}

fn consent(p: u32, purpose: &str, channel: Channel, granted: bool, secs: i64) -> ConsentRecord {
    ConsentRecord {
        profile_id: profile_id(p),
        purpose: purpose.into(),
        channel,
        granted,
        source: "web_form".into(),
        recorded_at: at(secs),
    }
}

pub async fn consents_keep_the_latest_decision_per_purpose_and_channel(f: StoreFixture) {
    assert!(f.store.consents(&profile_id(1)).await.unwrap().is_empty());
    f.store
        .record_consents(vec![
            consent(1, "marketing", Channel::Email, true, 1),
            consent(1, "marketing", Channel::Whatsapp, true, 1),
            consent(2, "marketing", Channel::Email, true, 1),
        ])
        .await
        .unwrap();
    f.store.record_consents(vec![consent(1, "marketing", Channel::Email, false, 5)]).await.unwrap();
    let mine = f.store.consents(&profile_id(1)).await.unwrap();
    assert_eq!(
        mine,
        vec![consent(1, "marketing", Channel::Email, false, 5), consent(1, "marketing", Channel::Whatsapp, true, 1)]
    );
    assert_eq!(f.store.consents(&profile_id(2)).await.unwrap().len(), 1, "another profile's are its own");
}

pub async fn suppression_list_adds_looks_up_and_removes(f: StoreFixture) {
    let bounce = Suppression {
        channel: Channel::Email,
        address: "max@gmail.com".into(),
        reason: SuppressionReason::Bounce,
        since: at(3),
    };
    let stop = Suppression {
        channel: Channel::Whatsapp,
        address: "+4915123456789".into(),
        reason: SuppressionReason::Unsubscribe,
        since: at(4),
    };
    f.store.suppress(vec![bounce.clone(), stop.clone()]).await.unwrap();
    let ask = vec![
        (Channel::Email, "max@gmail.com".to_string()),
        (Channel::Sms, "+4915123456789".to_string()),
        (Channel::Whatsapp, "+4915123456789".to_string()),
    ];
    assert_eq!(f.store.suppressed(&ask).await.unwrap(), vec![Some(bounce.clone()), None, Some(stop.clone())]);
    let spam = Suppression { reason: SuppressionReason::SpamReport, since: at(9), ..bounce.clone() };
    f.store.suppress(vec![spam.clone()]).await.unwrap();
    f.store.unsuppress(&[(Channel::Whatsapp, "+4915123456789".into()), (Channel::Push, "x".into())]).await.unwrap();
    assert_eq!(f.store.suppressed(&ask).await.unwrap(), vec![Some(spam), None, None]);
    assert!(f.store.suppressed(&[]).await.unwrap().is_empty());
}

fn saga(id: &str, version: u64, status: SagaStatus) -> SagaRecord {
    SagaRecord {
        saga_id: id.into(),
        kind: "erasure".into(),
        subject: profile_id(1).to_string(),
        status,
        version,
        state: json!({ "steps_done": version - 1 }),
        created_at: at(1),
        updated_at: at(version as i64),
    }
}

pub async fn sagas_advance_one_version_at_a_time(f: StoreFixture) {
    assert_eq!(f.store.load_saga("s1").await.unwrap(), None);
    f.store.save_saga(&saga("s1", 1, SagaStatus::Running)).await.unwrap();
    let again = f.store.save_saga(&saga("s1", 1, SagaStatus::Running)).await.unwrap_err();
    assert_eq!(again.kind, cohort_adapters::StoreErrorKind::Conflict, "a second creator loses");
    f.store.save_saga(&saga("s1", 2, SagaStatus::Running)).await.unwrap();
    let stale = f.store.save_saga(&saga("s1", 2, SagaStatus::Failed)).await.unwrap_err();
    assert_eq!(stale.kind, cohort_adapters::StoreErrorKind::Conflict, "a writer on an old version loses");
    let skip = f.store.save_saga(&saga("s1", 4, SagaStatus::Completed)).await.unwrap_err();
    assert_eq!(skip.kind, cohort_adapters::StoreErrorKind::Conflict);
    f.store.save_saga(&saga("s1", 3, SagaStatus::Completed)).await.unwrap();
    assert_eq!(f.store.load_saga("s1").await.unwrap(), Some(saga("s1", 3, SagaStatus::Completed)));
    f.store.save_saga(&saga("s0", 1, SagaStatus::Running)).await.unwrap();
    f.store.save_saga(&saga("s2", 1, SagaStatus::Running)).await.unwrap();
    let ids = |v: Vec<SagaRecord>| v.into_iter().map(|s| s.saga_id).collect::<Vec<_>>();
    assert_eq!(ids(f.store.list_sagas(None, 10).await.unwrap()), vec!["s0", "s1", "s2"]);
    assert_eq!(ids(f.store.list_sagas(Some("s0"), 1).await.unwrap()), vec!["s1"]);
}

pub async fn audit_log_numbers_and_pages_entries(f: StoreFixture) {
    let entry = |n: i64| NewAuditEntry {
        at: at(n),
        actor: "api:ops".into(),
        action: "profile.erase".into(),
        subject: profile_id(n as u32).to_string(),
        detail: json!({ "n": n }),
    };
    let first = f.store.append_audit(vec![entry(1), entry(2)]).await.unwrap();
    let second = f.store.append_audit(vec![entry(3)]).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0] < first[1] && first[1] < second[0], "{first:?} {second:?}");
    let all = f.store.list_audit(0, 10).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[2], AuditEntry::numbered(second[0], entry(3)));
    let page = f.store.list_audit(first[0], 1).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![first[1]]);
    assert!(f.store.append_audit(vec![]).await.unwrap().is_empty());
}

pub async fn review_queue_filters_by_status_and_pages(f: StoreFixture) {
    let item = |id: &str, status: ReviewStatus| ReviewItem {
        id: id.into(),
        kind: "probable_match".into(),
        profiles: vec![profile_id(1), profile_id(2)],
        score: 0.87,
        evidence: json!({ "name_similarity": 0.93 }),
        status,
        created_at: at(1),
        decided_at: None,
        decided_by: None,
    };
    f.store
        .put_review_items(vec![
            item("r1", ReviewStatus::Open),
            item("r2", ReviewStatus::Open),
            item("r3", ReviewStatus::Open),
        ])
        .await
        .unwrap();
    let decided = ReviewItem {
        status: ReviewStatus::Accepted,
        decided_at: Some(at(5)),
        decided_by: Some("ops".into()),
        ..item("r2", ReviewStatus::Open)
    };
    f.store.put_review_items(vec![decided.clone()]).await.unwrap();
    let ids = |v: Vec<ReviewItem>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(f.store.list_review_items(Some(ReviewStatus::Open), None, 10).await.unwrap()), vec!["r1", "r3"]);
    assert_eq!(f.store.list_review_items(Some(ReviewStatus::Accepted), None, 10).await.unwrap(), vec![decided.clone()]);
    assert_eq!(ids(f.store.list_review_items(None, Some("r1"), 1).await.unwrap()), vec!["r2"]);
    assert_eq!(f.store.review_item("r2").await.unwrap(), Some(decided));
    assert_eq!(f.store.review_item("r9").await.unwrap(), None);
}

pub async fn documents_are_kept_per_collection_listed_by_prefix_and_deleted(f: StoreFixture) {
    use serde_json::json;
    let store = &f.store;
    let put = |c: &str, k: &str, v| (c.to_string(), k.to_string(), v);
    for (c, k, v) in [
        put("members", "mba/prof_2", json!({ "since": 2 })),
        put("members", "mba/prof_1", json!({ "since": 1 })),
        put("members", "mba/prof_3", json!({ "since": 3, "nested": { "list": [1, 2.5, "x"] } })),
        put("members", "mbax/prof_9", json!({ "since": 9 })),
        put("members", "law/prof_1", json!(null)),
        put("segments", "mba", json!({ "rule": "x" })),
    ] {
        store.put_documents(&c, vec![(k, Some(v))]).await.unwrap();
    }
    let keys = |v: Vec<(String, serde_json::Value)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let listed = store.list_documents("members", "mba/", None, 10).await.unwrap();
    assert_eq!(keys(listed.clone()), vec!["mba/prof_1", "mba/prof_2", "mba/prof_3"]);
    assert_eq!(listed[2].1, json!({ "since": 3, "nested": { "list": [1, 2.5, "x"] } }));
    assert_eq!(keys(store.list_documents("members", "mba/", Some("mba/prof_1"), 1).await.unwrap()), vec!["mba/prof_2"]);
    assert_eq!(keys(store.list_documents("members", "", None, 10).await.unwrap()).len(), 5);
    assert!(store.list_documents("segments", "mba/", None, 10).await.unwrap().is_empty(), "collections are separate");
    let got = store.get_documents("segments", &["mba".into(), "law".into()]).await.unwrap();
    assert_eq!(got, vec![Some(json!({ "rule": "x" })), None]);
    store
        .put_documents("members", vec![("mba/prof_2".into(), None), ("mba/prof_4".into(), Some(json!(4)))])
        .await
        .unwrap();
    assert_eq!(
        keys(store.list_documents("members", "mba/", None, 10).await.unwrap()),
        vec!["mba/prof_1", "mba/prof_3", "mba/prof_4"]
    );
    store.put_documents("members", vec![]).await.unwrap();
    // Whole listings cross page boundaries without losing or repeating a key.
    let many: Vec<(String, Option<serde_json::Value>)> =
        (0..1203).map(|i| (format!("k/{i:05}"), Some(json!(i)))).collect();
    store.put_documents("bulk", many).await.unwrap();
    let all = cohort_adapters::all_documents(store.as_ref(), "bulk", "k/").await.unwrap();
    assert_eq!(all.len(), 1203);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(all[1202].1, json!(1202));
}

/// GDPR erasure: everything naming the person goes (their records, identities, merges on both
/// sides, consent, review items, dead letters mentioning them); the other student's stay; a
/// second run finds nothing; the remnant count agrees before and after.
pub async fn erasure_removes_one_person_and_nobody_else(f: StoreFixture) {
    let (a, b, other) = (profile_id(1), profile_id(2), profile_id(3));
    let s = &f.store;
    let merge = IdentityMerged {
        survivor: a.clone(),
        merged: b.clone(),
        evidence: vec![email(1)],
        at: at(5),
        seq: 7,
        reason: Default::default(),
    };
    let kept_merge = IdentityMerged { survivor: other.clone(), merged: profile_id(4), seq: 9, ..merge.clone() };
    s.commit_flush(FlushBatch {
        identities: vec![(email(1), a.clone()), (email(2), b.clone()), (email(3), other.clone())],
        profiles: vec![profile(1), profile(2), profile(3)],
        merges: vec![merge, kept_merge.clone()],
        ..FlushBatch::default()
    })
    .await
    .unwrap();
    s.record_consents(vec![
        consent(1, "marketing", Channel::Email, false, 1),
        consent(3, "marketing", Channel::Email, true, 1),
    ])
    .await
    .unwrap();
    let item = |id: &str, profiles: Vec<ProfileId>| ReviewItem {
        id: id.into(),
        kind: "probable_match".into(),
        profiles,
        score: 0.9,
        evidence: json!({}),
        status: ReviewStatus::Open,
        created_at: at(1),
        decided_at: None,
        decided_by: None,
    };
    s.put_review_items(vec![
        item("r1", vec![a.clone(), other.clone()]),
        item("r2", vec![other.clone(), profile_id(4)]),
    ])
    .await
    .unwrap();
    let mut mentions = dead_letter(1);
    mentions.payload = r#"{"email":"student1@example.edu","bad":true}"#.into();
    s.put_dead_letters(vec![mentions, dead_letter(2)]).await.unwrap();

    let target = ErasureTarget {
        profiles: vec![a.clone(), b.clone()],
        identifiers: vec![email(1), email(2)],
        contact_emails: vec![],
    };
    let found = s.person_remnants(&target).await.unwrap();
    let expected = ErasureCounts {
        profiles: 2,
        identities: 2,
        merges: 2,
        consents: 1,
        review_items: 1,
        dead_letters: 1,
        ..ErasureCounts::default()
    };
    assert_eq!(found, expected);
    let erased = s.erase_person(&target).await.unwrap();
    assert_eq!(erased, ErasureCounts { dead_letters: 0, ..expected.clone() });
    assert_eq!(cohort_adapters::erase_dead_letters(s.as_ref(), &target).await.unwrap(), 1);
    assert_eq!(s.person_remnants(&target).await.unwrap(), ErasureCounts::default());
    assert_eq!(s.erase_person(&target).await.unwrap(), ErasureCounts::default(), "idempotent");

    assert!(s.load_profile(&a).await.unwrap().is_none());
    assert_eq!(
        s.lookup_identities(&[email(1), email(2), email(3)]).await.unwrap(),
        vec![None, None, Some(other.clone())]
    );
    assert!(s.list_merges(&a).await.unwrap().is_empty());
    assert_eq!(s.list_merges(&other).await.unwrap(), vec![kept_merge]);
    assert!(s.consents(&a).await.unwrap().is_empty());
    assert_eq!(s.consents(&other).await.unwrap().len(), 1);
    let left: Vec<String> = s.list_review_items(None, None, 10).await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(left, vec!["r2"]);
    let letters = s.list_dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(!letters[0].payload.contains("student1"));
    assert!(s.load_profile(&other).await.unwrap().is_some());
}

/// GDPR erasure in the journal: the person's events, their raw payloads and any other payload
/// mentioning them go; the rest stays readable in order.
pub async fn journal_erasure_removes_the_persons_events_and_payloads(f: Fixture) {
    let mut mine = batch(Some(br#"{"anonymousId":"anon_x1"}"#), &["x1"]);
    mine.events[0].identifiers.push(email(1));
    f.log.append(mine).await.unwrap();
    f.log.append(batch(Some(b"{\"email\":\"student1@example.edu\",\"rejected\":true}"), &[])).await.unwrap();
    f.log.append(batch(Some(b"{\"someone\":\"else\"}"), &["y1", "y2"])).await.unwrap();
    let target = ErasureTarget { profiles: vec![profile_id(1)], identifiers: vec![email(1)], contact_emails: vec![] };
    let found = f.log.count_matching(&target).await.unwrap();
    assert_eq!((found.journal_events, found.raw_payloads), (1, 2));
    let erased = f.log.erase_matching(&target).await.unwrap();
    assert_eq!((erased.journal_events, erased.raw_payloads), (1, 2));
    assert_eq!(f.log.count_matching(&target).await.unwrap(), ErasureCounts::default());
    let left: Vec<String> =
        f.log.read_after(0, 10).await.unwrap().into_iter().map(|e| e.event.event_id.as_str().to_string()).collect();
    assert_eq!(left, vec!["web:y1", "web:y2"]);
    let bronze = f.log.read_bronze_after(0, 10).await.unwrap();
    assert_eq!(bronze.len(), 1);
    assert!(!String::from_utf8_lossy(&bronze[0].1.body).contains("student1"));
}
