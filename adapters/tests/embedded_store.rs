//! The embedded store against the shared contract suite (file and in-memory backends), plus
//! what only a file can do: survive a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use std::path::Path;
use std::sync::Arc;

use cohort_adapters::{
    AppendBatch, EmbeddedStore, EventLog, FlushBatch, JournaledEvent, OperationalStore, StoreErrorKind,
};
use cohort_messages::msgs::IdentityMerged;
use suite::{at, batch, dead_letter, email, event, outbox_batch, profile, profile_id, raw, with_timeout, Fixture};

/// The page cache the file fixtures use: the configuration's default (`storage.cache_mb`).
const CACHE: usize = 64 << 20;

fn fixture_of(store: Arc<EmbeddedStore>, keep: Option<Box<dyn std::any::Any + Send>>) -> Fixture {
    Fixture { log: store.clone(), store, keep }
}

/// A store file's path in a fresh temp folder, which lives as long as the guard.
fn store_path() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cohort.redb");
    (dir, path)
}

async fn file_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("cohort.redb"), CACHE).unwrap();
    fixture_of(store, Some(Box::new(dir)))
}

async fn memory_fixture() -> Fixture {
    fixture_of(EmbeddedStore::in_memory().unwrap(), None)
}

mod file {
    crate::suite::store_suite!(crate::file_fixture());
}

mod memory {
    crate::suite::store_suite!(crate::memory_fixture());
}

/// A page cache far smaller than the data (`storage.cache_mb` is at least 1 MiB; 256 KiB here),
/// so the contract also holds when pages are evicted and read back from the file.
const SMALL_CACHE: usize = 256 << 10;

async fn small_cache_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("embedded://{}", dir.path().join("cohort.redb").display());
    fixture_of(EmbeddedStore::open_url(&url, SMALL_CACHE).unwrap(), Some(Box::new(dir)))
}

mod small_cache {
    crate::suite::store_suite!(crate::small_cache_fixture());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_page_cache_still_reads_back_everything_written_through_it() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let ids: Vec<_> = (0..3_000).map(profile_id).collect();
        {
            let store = EmbeddedStore::open(&path, SMALL_CACHE).unwrap();
            for chunk in (0..3_000u32).collect::<Vec<_>>().chunks(500) {
                let profiles = chunk.iter().map(|&n| profile(n)).collect();
                store.commit_flush(FlushBatch { profiles, ..FlushBatch::default() }).await.unwrap();
            }
            let loaded = store.load_profiles(&ids).await.unwrap();
            assert_eq!(loaded.len(), 3_000, "read back through the small cache");
        }
        let reopened = EmbeddedStore::open(&path, SMALL_CACHE).unwrap();
        let loaded = reopened.load_profiles(&ids).await.unwrap();
        assert_eq!(loaded.len(), 3_000);
        for n in (0..3_000).step_by(499) {
            let found = loaded.iter().find(|p| p.profile_id == profile_id(n));
            assert_eq!(found, Some(&profile(n)), "profile {n}");
        }
    })
    .await;
}

/// The same contract through the decorator that seals personal data (GDPR encryption at rest).
async fn sealed_fixture() -> suite::StoreFixture {
    let inner = EmbeddedStore::in_memory().unwrap();
    let pii = Arc::new(cohort_adapters::Pii::new(Arc::new(cohort_adapters::crypto::Envelope::generate().0)));
    suite::StoreFixture { store: Arc::new(cohort_adapters::SealedStore::new(inner, pii)), keep: None }
}

mod sealed {
    crate::suite::operational_store_suite!(crate::sealed_fixture());
}

/// Writes one of everything: journal (with Bronze), profiles, identities, a merge, the
/// checkpoint and dead letters.
async fn populate(store: &Arc<EmbeddedStore>) {
    let out = store.append(batch(Some(b"\x00raw\xffbody"), &["a", "b"])).await.unwrap();
    assert_eq!(out.seqs, vec![Some(1), Some(2)]);
    store.append(batch(None, &["c"])).await.unwrap();
    store
        .commit_flush(FlushBatch {
            identities: vec![(email(1), profile_id(1))],
            profiles: vec![profile(1), profile(2)],
            merges: vec![IdentityMerged {
                survivor: profile_id(1),
                merged: profile_id(2),
                evidence: vec![email(1)],
                at: at(5),
                seq: 3,
                reason: Default::default(),
            }],
            checkpoint: Some(3),
            event_ids: vec![],
            ..FlushBatch::default()
        })
        .await
        .unwrap();
    store.put_dead_letters(vec![dead_letter(1), dead_letter(2)]).await.unwrap();
}

/// Checks everything [`populate`] wrote, then that counters continue rather than restart.
async fn assert_populated(store: &Arc<EmbeddedStore>) {
    assert_eq!(*store.watch_head().borrow(), 3, "the head is restored from the file");
    let journal = store.read_after(0, 10).await.unwrap();
    assert_eq!(journal.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(journal[0].event.raw.seq, Some(1));
    let mut expected_c = event("c");
    expected_c.raw.seq = None;
    assert_eq!(journal[2].event, expected_c);
    let bronze = store.read_bronze_after(0, 10).await.unwrap();
    assert_eq!(bronze, vec![(1, raw(b"\x00raw\xffbody"))]);

    assert_eq!(store.load_profile(&profile_id(1)).await.unwrap(), Some(profile(1)));
    assert_eq!(store.lookup_identity(&email(1)).await.unwrap(), Some(profile_id(1)));
    assert_eq!(store.count_profiles().await.unwrap(), 2);
    assert_eq!(store.checkpoint().await.unwrap(), 3);
    assert_eq!(store.list_merges(&profile_id(2)).await.unwrap().len(), 1);
    assert_eq!(store.count_dead_letters().await.unwrap(), 2);

    // Idempotency survived: an old event id is still a duplicate, new ones continue the seqs.
    let out = store.append(batch(Some(b"again"), &["a", "d"])).await.unwrap();
    assert_eq!(out.seqs, vec![None, Some(4)]);
    assert_eq!(out.raw_seq, Some(2));
    assert_eq!(*store.watch_head().borrow(), 4);
    assert_eq!(store.put_dead_letters(vec![dead_letter(3)]).await.unwrap(), vec![3]);
    store.commit_flush(FlushBatch { checkpoint: Some(1), ..FlushBatch::default() }).await.unwrap();
    assert_eq!(store.checkpoint().await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_store_survives_drop_and_reopen() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        populate(&store).await;
        // Both trait-object handles share the store; dropping the last one releases the file.
        let as_log: Arc<dyn EventLog> = store.clone();
        let as_store: Arc<dyn OperationalStore> = store.clone();
        drop((store, as_log, as_store));

        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        assert_populated(&reopened).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_releases_the_file_and_refuses_further_work() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        populate(&store).await;
        store.close().await;
        store.close().await; // idempotent

        let err = store.append(batch(None, &["z"])).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        let err = store.ping().await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        assert!(store.commit_flush(FlushBatch { checkpoint: Some(9), ..FlushBatch::default() }).await.is_err());

        // The old handle is still alive, yet the file can be opened again.
        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        assert_populated(&reopened).await;
        drop(store);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_open_elsewhere_is_unavailable() {
    let (_dir, path) = store_path();
    let _store = EmbeddedStore::open(&path, CACHE).unwrap();
    let err = EmbeddedStore::open(&path, CACHE).unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable);
    assert!(err.message.contains("already open"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_url_accepts_embedded_and_memory_and_rejects_the_rest() {
    for url in ["ftp://example.com/cohort", "mongodb://localhost/cohort", "/tmp/cohort.redb", "embedded://"] {
        let err = EmbeddedStore::open_url(url, CACHE).unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid, "{url}");
        assert!(err.message.contains(url), "the message names the url: {}", err.message);
        assert!(err.message.contains("embedded://") && err.message.contains("memory://"), "{}", err.message);
    }

    let memory = EmbeddedStore::open_url("memory://", CACHE).unwrap();
    memory.ping().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("not/yet/there/cohort.redb");
    assert!(nested.is_absolute());
    let url = format!("embedded://{}", nested.display());
    assert!(url.starts_with("embedded:///"));
    let file = EmbeddedStore::open_url(&url, CACHE).unwrap();
    file.append(AppendBatch { raw: None, events: vec![event("x")] }).await.unwrap();
    assert!(Path::new(&nested).is_file(), "parent directories are created");
    drop(file);
    let again = EmbeddedStore::open_url(&url, CACHE).unwrap();
    assert_eq!(again.read_after(0, 10).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_memory_stores_are_independent() {
    let a = EmbeddedStore::in_memory().unwrap();
    let b = EmbeddedStore::in_memory().unwrap();
    a.append(batch(None, &["only-in-a"])).await.unwrap();
    assert_eq!(a.read_after(0, 10).await.unwrap().len(), 1);
    assert!(b.read_after(0, 10).await.unwrap().is_empty());
}

/// Profiles and outbox batches are stored compressed; a file written before (plain JSON values)
/// still reads, and new values go in beside the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_and_outbox_batches_are_stored_packed_and_plain_json_still_reads() {
    use redb::{ReadableTable, TableDefinition};
    const PROFILES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("profiles");
    const OUTBOX: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("warehouse_outbox");
    with_timeout(async {
        let (_dir, path) = store_path();
        let packed = profile(1);
        {
            let store = EmbeddedStore::open(&path, CACHE).unwrap();
            let flush = FlushBatch { profiles: vec![packed.clone()], outbox: outbox_batch(1), ..FlushBatch::default() };
            store.commit_flush(flush).await.unwrap();
            store.close().await;
        }
        let old_profile = profile(2);
        let old_batch = outbox_batch(2);
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut profiles = txn.open_table(PROFILES).unwrap();
                let mut outbox = txn.open_table(OUTBOX).unwrap();
                let stored = profiles.get(packed.profile_id.as_str()).unwrap().unwrap().value().to_vec();
                let json = serde_json::to_vec(&packed).unwrap();
                assert_eq!(stored.first(), Some(&1), "a profile is written packed (format byte 1)");
                assert!(stored.len() < json.len(), "packed {} bytes, JSON {}", stored.len(), json.len());
                let stored = outbox.get(1).unwrap().unwrap().value().to_vec();
                let json = serde_json::to_vec(&outbox_batch(1)).unwrap();
                assert_eq!(stored.first(), Some(&1), "an outbox batch is written packed");
                assert!(stored.len() < json.len(), "packed {} bytes, JSON {}", stored.len(), json.len());
                // What a Cohort from before packing wrote: plain JSON.
                let json = serde_json::to_vec(&old_profile).unwrap();
                profiles.insert(old_profile.profile_id.as_str(), json.as_slice()).unwrap();
                outbox.insert(1, serde_json::to_vec(&old_batch).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        assert_eq!(store.load_profile(&packed.profile_id).await.unwrap(), Some(packed.clone()));
        assert_eq!(store.load_profile(&old_profile.profile_id).await.unwrap(), Some(old_profile.clone()));
        let both = store.load_profiles(&[packed.profile_id.clone(), old_profile.profile_id.clone()]).await.unwrap();
        assert_eq!(both, vec![packed, old_profile]);
        store.commit_flush(FlushBatch { outbox: outbox_batch(3), ..FlushBatch::default() }).await.unwrap();
        let outbox: Vec<_> = store.read_outbox(10).await.unwrap().into_iter().map(|(_, b)| b).collect();
        assert_eq!(outbox, vec![old_batch, outbox_batch(3)], "the plain-JSON batch reads, the new one after it");
    })
    .await;
}

/// Reads right after a commit take the writer's decoded copies; reads after a reopen decode
/// the file. Both must see exactly the same events and outbox batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_journal_tail_and_the_outbox_read_the_same_from_memory_and_from_the_file() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        store.append(batch(Some(b"{\"batch\":[1,2]}"), &["m1", "m2"])).await.unwrap();
        store.append(batch(None, &["m3"])).await.unwrap();
        for n in 1..=2 {
            store.commit_flush(FlushBatch { outbox: outbox_batch(n), ..FlushBatch::default() }).await.unwrap();
        }
        let pairs = |read: Vec<JournaledEvent>| read.into_iter().map(|j| (j.seq, j.event)).collect::<Vec<_>>();
        let fresh_events = pairs(store.read_after(0, 10).await.unwrap());
        let fresh_outbox = store.read_outbox(10).await.unwrap();
        assert_eq!(fresh_events.len(), 3);
        assert_eq!(fresh_events[0].1.raw.seq, Some(1), "the kept copy carries the Bronze link");
        assert_eq!(
            fresh_outbox.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
            vec![outbox_batch(1), outbox_batch(2)]
        );
        // Read again in the same process: what was taken is decoded now.
        assert_eq!(pairs(store.read_after(0, 10).await.unwrap()), fresh_events);
        drop(store);

        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        assert_eq!(pairs(reopened.read_after(0, 10).await.unwrap()), fresh_events);
        assert_eq!(reopened.read_outbox(10).await.unwrap(), fresh_outbox);
    })
    .await;
}

/// An outbox entry holding more than a profile may (a whole import chunk as escaped JSON text)
/// still reads back from the file: at the profiles' bound it was written but never readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_entry_above_the_profiles_size_bound_reads_back_from_the_file() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let body = "\"Id\",\"Email\"\n".repeat((65 << 20) / 14);
        let big = cohort_adapters::WarehouseBatch {
            bronze: vec![cohort_adapters::BronzeRow::from_record(1, &raw(body.as_bytes()))],
            ..cohort_adapters::WarehouseBatch::default()
        };
        {
            let store = EmbeddedStore::open(&path, CACHE).unwrap();
            store.commit_flush(FlushBatch { outbox: big.clone(), ..FlushBatch::default() }).await.unwrap();
        }
        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        let read = reopened.read_outbox(10).await.unwrap();
        assert_eq!(read.len(), 1);
        assert!(read[0].1 == big, "the large entry reads back whole");
    })
    .await;
}

/// Ids are written to the idempotency tables many at a time (the writer keeps the newest in
/// memory): those written and those still kept are duplicates before and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_written_in_batches_and_ids_still_kept_stay_duplicates_across_a_reopen() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        // Every fifth append takes the ids kept past one batch (4,096; sooner if 250 ms pass):
        // after 18 appends, 15,000 are written and the last 3,000 kept.
        let ids: Vec<String> = (0..18_000).map(|n| format!("id-{n}")).collect();
        for chunk in ids.chunks(1_000) {
            let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let out = store.append(batch(None, &names)).await.unwrap();
            assert!(out.seqs.iter().all(Option::is_some));
        }
        let old = ["id-0", "id-8000", "id-14999", "id-15000", "id-17999"];
        let again = store.append(batch(None, &old)).await.unwrap();
        assert_eq!(again.seqs, vec![None; old.len()], "duplicates while open");
        let seen = store.seen_event_ids(&["web:id-3".into(), "web:id-17998".into(), "web:new".into()]).await.unwrap();
        assert_eq!(seen, vec![true, true, false]);
        drop(store);

        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        let again = reopened.append(batch(None, &old)).await.unwrap();
        assert_eq!(again.seqs, vec![None; old.len()], "duplicates after a reopen");
        let fresh = reopened.append(batch(None, &["id-18000", "id-18000"])).await.unwrap();
        assert_eq!(fresh.seqs, vec![Some(18_001), None], "a new id, then the same id within one batch");
    })
    .await;
}

/// An erasure deletes journal rows whose ids may still be kept in memory only: they are written
/// first, so the erased event sent again after a restart is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erased_events_id_stays_a_duplicate_after_a_reopen() {
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        store.append(batch(Some(b"{\"anonymousId\":\"anon_er1\"}"), &["er1", "er2"])).await.unwrap();
        let target = cohort_messages::ErasureTarget {
            profiles: vec![],
            identifiers: vec![cohort_messages::Identifier::new(
                cohort_messages::IdentifierKind::AnonymousId,
                "anon_er1",
            )],
            contact_emails: vec![],
        };
        assert_eq!(store.erase_matching(&target).await.unwrap().journal_events, 1);
        drop(store);

        let reopened = EmbeddedStore::open(&path, CACHE).unwrap();
        let again = reopened.append(batch(None, &["er1", "er2", "er3"])).await.unwrap();
        assert_eq!(again.seqs, vec![None, None, Some(3)]);
    })
    .await;
}

/// A store closed cleanly writes the event ids it kept in memory: the tables then cover the
/// whole journal, as a binary from before kept ids expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_close_writes_the_ids_kept_in_memory() {
    const IDEMPOTENCY: redb::TableDefinition<'static, &str, u64> = redb::TableDefinition::new("idempotency");
    const META: redb::TableDefinition<'static, &str, u64> = redb::TableDefinition::new("meta");
    with_timeout(async {
        let (_dir, path) = store_path();
        let store = EmbeddedStore::open(&path, CACHE).unwrap();
        store.append(batch(None, &["c1", "c2", "c3"])).await.unwrap();
        drop(store);

        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("idempotency_indexed_seq").unwrap().map(|v| v.value()), Some(3));
        let ids = txn.open_table(IDEMPOTENCY).unwrap();
        let seqs: Vec<Option<u64>> =
            ["web:c1", "web:c2", "web:c3"].iter().map(|id| ids.get(*id).unwrap().map(|v| v.value())).collect();
        assert_eq!(seqs, vec![Some(1), Some(2), Some(3)]);
    })
    .await;
}
