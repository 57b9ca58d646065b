//! The redb layout of the embedded store: table definitions, key formats and value codecs.
//!
//! Values are JSON (serde_json): easy to inspect and to evolve. Profiles and outbox batches,
//! the bulk of every flush, are stored compressed ([`encode_packed`]).

use chrono::{DateTime, Utc};
use cohort_messages::{ProfileId, Source};
use redb::TableDefinition;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{zstd_frame, BronzeRecord, StoreError};

/// Journal: seq → `CustomerEvent` (JSON).
pub(super) const JOURNAL: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("journal");
/// Idempotency: event id → the seq it was journaled at.
pub(super) const IDEMPOTENCY: TableDefinition<'static, &str, u64> = TableDefinition::new("idempotency");
/// Bronze metadata: raw seq → [`BronzeRow`] (JSON).
pub(super) const BRONZE: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("bronze");
/// Bronze bodies: raw seq → the payload bytes, verbatim (no base64 blow-up, byte exact).
pub(super) const BRONZE_BODY: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("bronze_body");
/// Profiles: profile id → `ProfileRecord` ([`encode_packed`]; plain JSON before).
pub(super) const PROFILES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("profiles");
/// Identity graph: `kind:value` → profile id.
pub(super) const IDENTITIES: TableDefinition<'static, &str, &str> = TableDefinition::new("identities");
/// Merges: [`merge_key`] → `IdentityMerged` (JSON), once under each of the two profiles.
pub(super) const MERGES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("merges");
/// Dead letters: id → `DeadLetter` (JSON).
pub(super) const DEAD_LETTERS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("dead_letters");
/// Idempotency key ages: (recorded at, ms since epoch; event id), for expiry in time order.
pub(super) const IDEMPOTENCY_AT: TableDefinition<'static, (u64, &str), ()> = TableDefinition::new("idempotency_at");
/// Warehouse outbox: id → `WarehouseBatch` ([`encode_packed`]; plain JSON before), relayed to
/// the warehouse and then removed.
pub(super) const OUTBOX: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("warehouse_outbox");
/// Consent decisions: `profile/purpose/channel` → `ConsentRecord` (JSON).
pub(super) const CONSENTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("consents");
/// Suppression list: `channel:address` → `Suppression` (JSON).
pub(super) const SUPPRESSIONS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("suppressions");
/// Sagas: saga id → `SagaRecord` (JSON).
pub(super) const SAGAS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("sagas");
/// Audit log: id → `AuditEntry` (JSON).
pub(super) const AUDIT: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("audit_log");
/// Review queue: item id → `ReviewItem` (JSON).
pub(super) const REVIEWS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("review_queue");
/// Named document collections: `collection \u{1} key` → JSON.
pub(super) const DOCUMENTS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("documents");
/// Counters and the pipeline checkpoint.
pub(super) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// Meta key: all journal events up to this seq are reflected in persisted profiles.
pub(super) const META_CHECKPOINT: &str = "checkpoint";
/// Meta key: the last journal seq assigned (0 when empty).
pub(super) const META_JOURNAL_SEQ: &str = "journal_seq";
/// Meta key: the last Bronze raw seq assigned.
pub(super) const META_RAW_SEQ: &str = "raw_seq";
/// Meta key: the last dead-letter id assigned.
pub(super) const META_DEAD_LETTER_ID: &str = "dead_letter_id";
/// Meta key: the last audit-log id assigned.
pub(super) const META_AUDIT_ID: &str = "audit_id";
/// Meta key: the last outbox id assigned.
pub(super) const META_OUTBOX_ID: &str = "outbox_id";
/// Meta key: the ids of journal events up to this seq are in the idempotency tables; later
/// ones are kept in memory (`unindexed`) and read back from the journal at open.
pub(super) const META_INDEXED_SEQ: &str = "idempotency_indexed_seq";

/// Outbox ids are zero-padded so the trait's string ids sort like the numbers.
pub(super) fn outbox_key(id: u64) -> String {
    format!("{id:020}")
}

/// Storage mirror of [`BronzeRecord`] without its body (kept in [`BRONZE_BODY`]): the public
/// type is deliberately not serde, so the on-disk shape is owned here.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BronzeRow {
    pub source: Source,
    pub format: String,
    pub content_type: String,
    pub received_at: DateTime<Utc>,
}

impl BronzeRow {
    pub(super) fn of(record: &BronzeRecord) -> Self {
        Self {
            source: record.source,
            format: record.format.clone(),
            content_type: record.content_type.clone(),
            received_at: record.received_at,
        }
    }

    pub(super) fn into_record(self, body: Vec<u8>) -> BronzeRecord {
        BronzeRecord {
            source: self.source,
            format: self.format,
            content_type: self.content_type,
            received_at: self.received_at,
            body,
        }
    }
}

/// Key of one merge under one of its profiles: `profile/seq(20 digits)/other`.
///
/// The zero-padded seq makes a prefix scan return a profile's merges in journal order; the
/// other profile keeps two merges at the same seq (one survivor absorbing two) apart. Profile
/// ids never contain `/`, so `profile/` is an exact prefix.
pub(super) fn merge_key(profile: &ProfileId, seq: u64, other: &ProfileId) -> String {
    format!("{}/{seq:020}/{}", profile.as_str(), other.as_str())
}

/// The half-open key range `[profile/, profile0)` holding every merge key of `profile`
/// (`0` is the byte after `/`).
pub(super) fn merge_range(profile: &ProfileId) -> (String, String) {
    (format!("{}/", profile.as_str()), format!("{}0", profile.as_str()))
}

/// Serializes a value for storage; failing here is a caller bug, not a storage fault.
pub(super) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::invalid(format!("cannot encode {what} for the embedded store: {e}")))
}

/// Deserializes a stored value; failing here means the file holds something we cannot read.
pub(super) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(format!("cannot decode stored {what}: {e}")))
}

/// [`encode`], then compressed, for values every flush rewrites (profiles) or writes in bulk
/// (outbox batches). redb copies every page a write touches, so fewer bytes per record mean
/// fewer pages per commit and a shorter `fsync`, which the journal's appends wait behind.
pub(super) fn encode_packed<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    pack(what, &encode(what, value)?)
}

/// Compresses JSON from [`encode`] into the format [`decode_packed`] reads.
pub(super) fn pack(what: &'static str, json: &[u8]) -> Result<Vec<u8>, StoreError> {
    zstd_frame::pack_json(json)
        .map_err(|e| StoreError::invalid(format!("cannot compress {what} for the embedded store: {e}")))
}

/// Reads what [`encode_packed`] wrote, or plain JSON stored before values were packed.
pub(super) fn decode_packed<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_packed_within(what, bytes, zstd_frame::MAX_BYTES)
}

/// [`decode_packed`] of a value that may decompress to up to `limit` bytes.
pub(super) fn decode_packed_within<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, StoreError> {
    let json =
        zstd_frame::unpack_json(bytes, limit).map_err(|why| StoreError::corrupt(format!("stored {what} {why}")))?;
    decode(what, &json)
}

/// Maps a redb error met while trying to `action` to a store error: corruption is not
/// retryable, everything else (I/O, locks, transactions) means the backend is unavailable.
pub(super) fn db_err(action: &'static str, err: impl Into<redb::Error>) -> StoreError {
    let err: redb::Error = err.into();
    let message = format!("embedded store: cannot {action}: {err}");
    match err {
        redb::Error::Corrupted(_) => StoreError::corrupt(message),
        _ => StoreError::unavailable(message),
    }
}

/// `.ctx("read journal")?` on any redb result: one mapping for redb's many error types.
pub(super) trait DbResult<T> {
    fn ctx(self, action: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for Result<T, E> {
    fn ctx(self, action: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| db_err(action, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_values_round_trip_and_unknown_formats_are_corrupt() {
        let value = serde_json::json!({"traits": {"programme": "MBA"}, "events": vec!["page"; 50]});
        let packed = encode_packed("profile", &value).unwrap();
        assert!(packed.len() < encode("profile", &value).unwrap().len());
        assert_eq!(decode_packed::<serde_json::Value>("profile", &packed).unwrap(), value);
        let plain = encode("profile", &value).unwrap();
        assert_eq!(decode_packed::<serde_json::Value>("profile", &plain).unwrap(), value, "plain JSON still reads");
        // A frame claiming more than the cap is refused before anything is allocated for it.
        let huge = zstd::bulk::compress(&vec![b' '; zstd_frame::MAX_BYTES + 1], 1).unwrap();
        let mut bomb = vec![zstd_frame::PACKED_JSON];
        bomb.extend_from_slice(&huge);
        for bad in [&b"\x07\x28\xb5"[..], &b""[..], &[zstd_frame::PACKED_JSON, 0, 1, 2][..], &bomb[..]] {
            let err = decode_packed::<serde_json::Value>("profile", bad).err();
            assert_eq!(err.map(|e| e.kind), Some(crate::StoreErrorKind::Corrupt), "{bad:?}");
        }
        let err = decode_packed::<serde_json::Value>("profile", &bomb).unwrap_err();
        assert!(err.message.contains(&format!("claims {} bytes", zstd_frame::MAX_BYTES + 1)), "{}", err.message);
    }

    #[test]
    fn merge_keys_of_a_profile_sort_by_seq_and_stay_inside_its_range() {
        let a = ProfileId::parse("prof_000000000001aaaaaaaaaaaa");
        let b = ProfileId::parse("prof_000000000002bbbbbbbbbbbb");
        let (Some(a), Some(b)) = (a, b) else {
            panic!("test ids must parse");
        };
        let k9 = merge_key(&a, 9, &b);
        let k10 = merge_key(&a, 10, &b);
        assert!(k9 < k10, "seqs must sort numerically");
        let (lo, hi) = merge_range(&a);
        for k in [&k9, &k10] {
            assert!(lo.as_str() <= k.as_str() && k.as_str() < hi.as_str());
        }
        let other = merge_key(&b, 1, &a);
        assert!(!(lo.as_str() <= other.as_str() && other.as_str() < hi.as_str()));
    }
}
