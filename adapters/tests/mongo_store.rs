//! The MongoDB operational store against the shared contract suite, on the SecantusDB test
//! server (MongoDB wire protocol), plus what only this backend has: its document layout,
//! failures half-way through a flush, and an unreachable server.
//!
//! Needs `COHORT_TEST_MONGODB`: run `scripts/services.sh start` and
//! `source ~/.cache/cohort/run/env` first. Without it every test here fails (never skips), so a
//! CI run cannot pass without having tested this backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_adapters::{FlushBatch, MongoStore, OperationalStore, StoreErrorKind};
use cohort_messages::msgs::IdentityMerged;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde_json::json;
use suite::{at, dead_letter, email, profile, profile_id, with_timeout, StoreFixture};

const URL_VAR: &str = "COHORT_TEST_MONGODB";

fn url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{URL_VAR} is not set: the MongoDB store tests need the SecantusDB test server. Run \
             `scripts/services.sh start && source ~/.cache/cohort/run/env` in the workspace root, then rerun \
             (and `scripts/services.sh stop` afterwards)."
        ),
    }
}

/// A database name unique to this test: process id, a counter and the time, so parallel tests
/// and earlier runs never share data.
fn unique_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("cohort_test_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Drops the test database when the fixture goes away, also after a failed test. It runs on a
/// thread of its own with its own runtime and connection, because a drop cannot await.
struct DropDatabase {
    url: String,
    database: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let (url, database) = (self.url.clone(), self.database.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                if let Ok(store) = MongoStore::connect(&url, &database).await {
                    let _ = store.drop_database().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn connect_fresh() -> (Arc<MongoStore>, DropDatabase) {
    let url = url();
    let database = unique_database();
    let store = MongoStore::connect(&url, &database)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR} (is `scripts/services.sh start` running?): {e}"));
    (store, DropDatabase { url, database })
}

async fn fixture() -> StoreFixture {
    let (store, guard) = connect_fresh().await;
    StoreFixture { store, keep: Some(Box::new(guard)) }
}

mod contract {
    crate::suite::operational_store_suite!(crate::fixture());
}

/// The contract again through the decorator that seals personal data.
async fn sealed_fixture() -> StoreFixture {
    let (store, guard) = connect_fresh().await;
    StoreFixture {
        store: Arc::new(cohort_adapters::SealedStore::new(store, sealed_pii())),
        keep: Some(Box::new(guard)),
    }
}

fn sealed_pii() -> Arc<cohort_adapters::Pii> {
    Arc::new(cohort_adapters::Pii::new(Arc::new(cohort_adapters::crypto::Envelope::generate().0)))
}

mod sealed_contract {
    crate::suite::operational_store_suite!(crate::sealed_fixture());
}

/// Through the sealing decorator, MongoDB itself holds no email, name or message text: what a
/// database administrator (or a stolen backup) sees is ciphertext and keyed hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_documents_hold_no_personal_data_in_the_clear() {
    with_timeout(async {
        let (raw, _guard) = connect_fresh().await;
        let store = cohort_adapters::SealedStore::new(raw.clone(), sealed_pii());
        let p = profile(1);
        store
            .commit_flush(FlushBatch {
                identities: vec![(email(1), profile_id(1))],
                profiles: vec![p.clone()],
                ..FlushBatch::default()
            })
            .await
            .unwrap();
        let mut letter = dead_letter(1);
        letter.payload = r#"{"email":"student1@example.edu"}"#.into();
        store.put_dead_letters(vec![letter]).await.unwrap();
        assert_eq!(store.load_profile(&profile_id(1)).await.unwrap(), Some(p), "opened exactly");
        assert_eq!(store.lookup_identity(&email(1)).await.unwrap(), Some(profile_id(1)));
        assert!(store.list_dead_letters(0, 10).await.unwrap()[0].payload.contains("student1@example.edu"));
        let db = raw_database(&raw).await;
        for collection in ["profiles", "identities", "dead_letters"] {
            let docs: Vec<Document> =
                db.collection::<Document>(collection).find(doc! {}).await.unwrap().try_collect().await.unwrap();
            assert!(!docs.is_empty(), "{collection}");
            // Inside the compressed bookkeeping of profiles too, not only the plain fields.
            let text = format!("{docs:?}{:?}", docs.iter().filter_map(unpacked).collect::<Vec<_>>());
            for secret in ["student1@example.edu", "Student 1"] {
                assert!(!text.contains(secret), "{collection} holds `{secret}` in the clear: {text}");
            }
        }
    })
    .await;
}

/// A profile document's compressed bookkeeping (`packed`: a format byte, then zstd of BSON).
fn unpacked(doc: &Document) -> Option<Document> {
    let bytes = doc.get_binary_generic("packed").ok()?;
    let raw = zstd::stream::decode_all(bytes.get(1..)?).unwrap();
    Some(Document::from_reader(raw.as_slice()).unwrap())
}

/// The raw driver view of the store's database, to check what analysts see.
async fn raw_database(store: &MongoStore) -> mongodb::Database {
    mongodb::Client::with_uri_str(url()).await.unwrap().database(store.database_name())
}

async fn raw_doc(db: &mongodb::Database, collection: &str, id: impl Into<Bson>) -> Document {
    db.collection::<Document>(collection).find_one(doc! { "_id": id.into() }).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_are_queryable_bson_not_blobs() {
    with_timeout(async {
        let (store, _guard) = connect_fresh().await;
        let p = profile(1);
        let merge = IdentityMerged {
            survivor: profile_id(1),
            merged: profile_id(2),
            evidence: vec![email(1)],
            at: at(5),
            seq: 42,
            reason: Default::default(),
        };
        store
            .commit_flush(FlushBatch {
                identities: vec![(email(1), profile_id(1))],
                profiles: vec![p.clone()],
                merges: vec![merge],
                checkpoint: Some(9),
                event_ids: vec![],
                ..FlushBatch::default()
            })
            .await
            .unwrap();
        store.put_dead_letters(vec![dead_letter(1)]).await.unwrap();
        let db = raw_database(&store).await;

        let profile_doc = raw_doc(&db, "profiles", p.profile_id.as_str()).await;
        assert_eq!(profile_doc.get_str("profile_id").unwrap(), p.profile_id.as_str());
        let counters = profile_doc.get_document("counters").unwrap();
        assert_eq!(counters.get("events_total"), Some(&Bson::Int64(1)));
        assert_eq!(counters.get_document("by_source").unwrap().get("web"), Some(&Bson::Int64(1)));
        let first_name = profile_doc.get_document("traits").unwrap().get_document("first_name").unwrap();
        assert_eq!(first_name.get_str("value").unwrap(), "Student 1");
        // Cohort's own bookkeeping (history, replay marks, ...) is one compressed blob.
        assert!(!profile_doc.contains_key("applied_seqs") && !profile_doc.contains_key("recent_events"));
        let packed = unpacked(&profile_doc).unwrap();
        assert_eq!(packed.get_array("applied_seqs").unwrap(), &vec![Bson::Int64(1)]);
        // Analysts can filter on trait values directly.
        let found = db
            .collection::<Document>("profiles")
            .count_documents(doc! { "traits.first_name.value": "Student 1" })
            .await
            .unwrap();
        assert_eq!(found, 1);

        let identity = raw_doc(&db, "identities", email(1).key()).await;
        assert_eq!(identity.get_str("kind").unwrap(), "email");
        assert_eq!(identity.get_str("value").unwrap(), "student1@example.edu");
        assert_eq!(identity.get_str("profile_id").unwrap(), profile_id(1).as_str());

        for (owner, other) in [(profile_id(1), profile_id(2)), (profile_id(2), profile_id(1))] {
            let key = format!("{}/{:020}/{}", owner.as_str(), 42, other.as_str());
            let merge_doc = raw_doc(&db, "merges", key).await;
            assert_eq!(merge_doc.get_str("profile").unwrap(), owner.as_str());
            assert_eq!(merge_doc.get_document("merge").unwrap().get("seq"), Some(&Bson::Int64(42)));
        }

        let letter = raw_doc(&db, "dead_letters", 1i64).await;
        assert_eq!(letter.get_str("stage").unwrap(), "validation");
        assert!(!letter.contains_key("id"), "the id is the _id");
        assert_eq!(raw_doc(&db, "meta", "checkpoint").await.get("value"), Some(&Bson::Int64(9)));
        assert_eq!(raw_doc(&db, "meta", "dead_letter_id").await.get("value"), Some(&Bson::Int64(1)));

        let indexes = db.collection::<Document>("identities").list_index_names().await.unwrap();
        assert!(indexes.iter().any(|n| n.starts_with("profile_id")), "{indexes:?}");
        let indexes = db.collection::<Document>("merges").list_index_names().await.unwrap();
        assert!(indexes.iter().any(|n| n.starts_with("profile")), "{indexes:?}");
        // Created at connect, before any document: expiry by age, consents by profile, the
        // review queue and sagas by status.
        for (collection, prefix) in
            [("event_ids", "at"), ("consents", "profile_id"), ("review_queue", "status"), ("sagas", "status")]
        {
            let indexes = db.collection::<Document>(collection).list_index_names().await.unwrap();
            assert!(indexes.iter().any(|n| n.starts_with(prefix)), "{collection}: {indexes:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_failing_half_way_does_not_advance_the_checkpoint() {
    with_timeout(async {
        let (store, _guard) = connect_fresh().await;
        store.commit_flush(FlushBatch { checkpoint: Some(5), ..FlushBatch::default() }).await.unwrap();

        // 1,500 profiles: the first bulk chunk is fine, the second holds a record over MongoDB's
        // 16 MB document limit, which is refused.
        let mut profiles: Vec<_> = (1..=1_500).map(profile).collect();
        let huge = "x".repeat(17 * 1024 * 1024);
        profiles[1_200].traits.get_mut("first_name").unwrap().value = json!(huge);
        let err = store
            .commit_flush(FlushBatch { profiles: profiles.clone(), checkpoint: Some(50), ..FlushBatch::default() })
            .await
            .unwrap_err();
        assert!(
            !err.message.contains("xxxxxxxx"),
            "the error does not echo data: {}",
            &err.message[..200.min(err.message.len())]
        );
        assert_eq!(store.checkpoint().await.unwrap(), 5, "the checkpoint must not move past unwritten data");
        assert_eq!(store.load_profile(&profiles[0].profile_id).await.unwrap(), Some(profiles[0].clone()));
        assert_eq!(store.load_profile(&profiles[1_200].profile_id).await.unwrap(), None);
        assert_eq!(store.count_profiles().await.unwrap(), 1_200, "ordered: nothing after the refused write");

        // The retry (here without the oversized record) succeeds and then moves it.
        profiles.remove(1_200);
        store.commit_flush(FlushBatch { profiles, checkpoint: Some(50), ..FlushBatch::default() }).await.unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), 50);
        assert_eq!(store.count_profiles().await.unwrap(), 1_499);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_beyond_i64_are_refused_before_anything_is_written() {
    with_timeout(async {
        let (store, _guard) = connect_fresh().await;
        let mut bad = profile(2);
        bad.applied_seqs.insert(u64::MAX);
        let err = store
            .commit_flush(FlushBatch { profiles: vec![profile(1), bad], checkpoint: Some(3), ..FlushBatch::default() })
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
        assert_eq!(store.count_profiles().await.unwrap(), 0, "encoding fails before the first write");
        assert_eq!(store.checkpoint().await.unwrap(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_port_is_unavailable_within_seconds() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        MongoStore::connect(&format!("mongodb://127.0.0.1:{port}"), "cohort_unreachable"),
    )
    .await
    .expect("connect must give up on its own");
    let elapsed = started.elapsed();
    let err = result.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_urls_and_database_names_are_invalid() {
    for url in ["http://127.0.0.1:27017", "127.0.0.1:27017", "", "mongodb://"] {
        let err = MongoStore::connect(url, "cohort").await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{url}: {err}");
    }
    for database in ["", "a.b", "a/b"] {
        let err = MongoStore::connect("mongodb://127.0.0.1:1", database).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{database}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_connection_sees_the_same_data_and_continues_the_counters() {
    with_timeout(async {
        let (store, _guard) = connect_fresh().await;
        store
            .commit_flush(FlushBatch {
                identities: vec![(email(1), profile_id(1))],
                profiles: vec![profile(1)],
                checkpoint: Some(3),
                ..FlushBatch::default()
            })
            .await
            .unwrap();
        assert_eq!(store.put_dead_letters(vec![dead_letter(1), dead_letter(2)]).await.unwrap(), vec![1, 2]);

        let again = MongoStore::connect(&url(), store.database_name()).await.unwrap();
        assert_eq!(again.load_profile(&profile_id(1)).await.unwrap(), Some(profile(1)));
        assert_eq!(again.lookup_identity(&email(1)).await.unwrap(), Some(profile_id(1)));
        assert_eq!(again.checkpoint().await.unwrap(), 3);
        assert_eq!(again.put_dead_letters(vec![dead_letter(3)]).await.unwrap(), vec![3]);
        let as_trait: Arc<dyn OperationalStore> = again;
        as_trait.ping().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_databases_are_dropped_afterwards() {
    with_timeout(async {
        let (store, guard) = connect_fresh().await;
        store.commit_flush(FlushBatch { profiles: vec![profile(1)], ..FlushBatch::default() }).await.unwrap();
        let name = store.database_name().to_string();
        let client = mongodb::Client::with_uri_str(url()).await.unwrap();
        assert!(client.list_database_names().await.unwrap().contains(&name));
        drop(guard);
        assert!(!client.list_database_names().await.unwrap().contains(&name), "{name} must be gone");
    })
    .await;
}
