//! The MongoDB document layouts of the operational store, in one place.
//!
//! Records are stored as real BSON documents (not opaque blobs) so analysts can query them:
//! each record's serde fields become document fields, with the natural key as `_id`. The one
//! exception is a profile's bookkeeping that only Cohort reads (see `PACKED_FIELDS`). Unsigned
//! integers become `Int64` (BSON has no unsigned type; values above `i64::MAX` are refused on
//! write rather than wrapped). Timestamps stay RFC 3339 strings exactly as serde writes them, so
//! a record reads back equal to what was written, nanoseconds included (a BSON date keeps only
//! milliseconds).
//!
//! | collection     | `_id`                              | other fields                                  |
//! |----------------|------------------------------------|-----------------------------------------------|
//! | `profiles`     | profile id                         | the fields of `ProfileRecord`, bookkeeping in `packed` |
//! | `identities`   | `kind:value`                       | `kind`, `value`, `profile_id`                 |
//! | `merges`       | `profile/seq(20 digits)/other`     | `profile`, `merge` (the `IdentityMerged`)     |
//! | `dead_letters` | id (`Int64`, from 1)               | the fields of `DeadLetter` except `id`        |
//! | `meta`         | `checkpoint`, `dead_letter_id`     | `value` (`Int64`)                             |
//! | `event_ids`    | event id                           | `at` (BSON date it was recorded, for expiry)  |
//! | `warehouse_outbox` | ObjectId (time ordered)        | `batch` (binary: the `WarehouseBatch` JSON, see `outbox_docs`) |
//! | `consents`     | `profile/purpose/channel`          | the fields of `ConsentRecord`                 |
//! | `suppressions` | `channel:address`                  | the fields of `Suppression`                   |
//! | `sagas`        | saga id                            | the fields of `SagaRecord` (`version` guards) |
//! | `audit_log`    | id (`Int64`, from 1)               | the fields of `AuditEntry`                    |
//! | `review_queue` | item id                            | the fields of `ReviewItem`                    |

use cohort_messages::{msgs::IdentityMerged, DeadLetter, Identifier, ProfileId, ProfileRecord};
use mongodb::bson::{self, doc, spec::BinarySubtype, Binary, Bson, Document};

use crate::{StoreError, WarehouseBatch};

pub(super) const PROFILES: &str = "profiles";
pub(super) const IDENTITIES: &str = "identities";
pub(super) const MERGES: &str = "merges";
pub(super) const EVENT_IDS: &str = "event_ids";
pub(super) const DEAD_LETTERS: &str = "dead_letters";
pub(super) const META: &str = "meta";
pub(super) const OUTBOX: &str = "warehouse_outbox";
pub(super) const CONSENTS: &str = "consents";
pub(super) const SUPPRESSIONS: &str = "suppressions";
pub(super) const SAGAS: &str = "sagas";
pub(super) const AUDIT: &str = "audit_log";
pub(super) const REVIEWS: &str = "review_queue";
pub(super) const DOCUMENTS: &str = "documents";

/// Meta document: all journal events up to `value` are reflected in persisted profiles.
pub(super) const META_CHECKPOINT: &str = "checkpoint";
/// Meta document: the last dead-letter id handed out (ids are reserved in blocks).
pub(super) const META_DEAD_LETTER_ID: &str = "dead_letter_id";
/// Meta document: the last audit-log id handed out.
pub(super) const META_AUDIT_ID: &str = "audit_id";

/// `u64` → `Int64`; larger values cannot be stored faithfully, so they are refused.
pub(super) fn to_i64(what: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::invalid(format!("{what} {value} exceeds what MongoDB can store (i64)")))
}

/// An integer field back to `u64`; accepts `Int32` too, since a hand-edited document may have one.
pub(super) fn as_u64(what: &str, value: Option<&Bson>) -> Result<u64, StoreError> {
    let n = match value {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(other) => {
            return Err(StoreError::corrupt(format!("stored {what} is a {:?}, not an integer", other.element_type())))
        }
        None => return Err(StoreError::corrupt(format!("stored {what} is missing"))),
    };
    u64::try_from(n).map_err(|_| StoreError::corrupt(format!("stored {what} is negative ({n})")))
}

/// Serde error texts can quote stored values (`invalid type: string "..."`), and those may be
/// personal data; callers log these messages, so quoted parts are blanked.
pub(super) fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if quoted {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

fn encode_error(what: &str, id: &str, err: bson::ser::Error) -> StoreError {
    StoreError::invalid(format!("cannot encode {what} {id} for MongoDB: {}", redact_quoted(&err.to_string())))
}

fn decode_error(what: &str, id: &str, err: bson::de::Error) -> StoreError {
    StoreError::corrupt(format!("cannot decode stored {what} {id}: {}", redact_quoted(&err.to_string())))
}

/// The document's `_id` as a string, for error messages and keys.
fn string_id(doc: &Document) -> String {
    match doc.get("_id") {
        Some(Bson::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "(without _id)".to_string(),
    }
}

/// Profile fields only Cohort reads back: the event history, replay marks, merge ledger and
/// activity windows. They are most of a profile's bytes and are rewritten on every flush, and
/// the database parses every field of every rewrite, so they are stored as one compressed blob
/// (`packed`) and the rest stays queryable BSON. Documents written before still read.
const PACKED_FIELDS: [&str; 4] = ["recent_events", "applied_seqs", "ledger", "activity"];
const PACKED: &str = "packed";
/// First byte of `packed`: what follows is a zstd frame holding a BSON document.
const PACKED_ZSTD_BSON: u8 = 1;

/// `{_id: profile id, ...fields of ProfileRecord, packed: the fields in PACKED_FIELDS}`.
pub(super) fn profile_doc(record: &ProfileRecord) -> Result<Document, StoreError> {
    let id = record.profile_id.as_str();
    let mut fields = bson::to_document(record).map_err(|e| encode_error("profile", id, e))?;
    let mut packed = Document::new();
    for name in PACKED_FIELDS {
        if let Some(value) = fields.remove(name) {
            packed.insert(name, value);
        }
    }
    let mut doc = doc! { "_id": id };
    doc.extend(fields);
    if !packed.is_empty() {
        let mut raw = Vec::new();
        packed.to_writer(&mut raw).map_err(|e| {
            StoreError::invalid(format!("cannot encode profile {id} for MongoDB: {}", redact_quoted(&e.to_string())))
        })?;
        let bytes = crate::zstd_frame::compress(PACKED_ZSTD_BSON, &raw)
            .map_err(|e| StoreError::invalid(format!("cannot compress profile {id}: {e}")))?;
        doc.insert(PACKED, Binary { subtype: BinarySubtype::Generic, bytes });
    }
    Ok(doc)
}

pub(super) fn profile_from_doc(mut doc: Document) -> Result<ProfileRecord, StoreError> {
    let id = string_id(&doc);
    doc.remove("_id");
    if let Some(packed) = doc.remove(PACKED) {
        let corrupt = |what: String| StoreError::corrupt(format!("stored profile {id}: packed fields {what}"));
        let bytes = match packed {
            Bson::Binary(Binary { bytes, .. }) => bytes,
            other => return Err(corrupt(format!("are a {:?}, not binary", other.element_type()))),
        };
        let frame = match bytes.split_first() {
            Some((&PACKED_ZSTD_BSON, frame)) => frame,
            Some((format, _)) => {
                return Err(corrupt(format!("in an unknown format ({format}); written by a newer Cohort?")))
            }
            None => return Err(corrupt("are empty".into())),
        };
        let raw = crate::zstd_frame::decompress(frame).map_err(|why| corrupt(format!("do not decompress: {why}")))?;
        let unpacked = Document::from_reader(raw.as_slice())
            .map_err(|e| corrupt(format!("are not BSON: {}", redact_quoted(&e.to_string()))))?;
        doc.extend(unpacked);
    }
    bson::from_document(doc).map_err(|e| decode_error("profile", &id, e))
}

/// What one outbox document's batch may take: MongoDB refuses documents over 16 MiB.
pub(super) const OUTBOX_DOC_BYTES: usize = 15 << 20;

/// An outbox batch as the `batch` values of documents that fit MongoDB: at most `max_rows` rows
/// each, halved until each is at most `max_bytes` of JSON, and a single row still too large
/// compressed. Counting rows alone let 1,000 Bronze payloads (a Segment batch may be 500 KB) make
/// a document MongoDB refuses, and the failed flush, retried with more, never fitted again.
pub(super) fn outbox_docs(
    batch: WarehouseBatch,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut out = Vec::new();
    for part in batch.split(max_rows) {
        fit_outbox(part, max_bytes, &mut out)?;
    }
    Ok(out)
}

fn fit_outbox(part: WarehouseBatch, max_bytes: usize, out: &mut Vec<Vec<u8>>) -> Result<(), StoreError> {
    let json =
        serde_json::to_vec(&part).map_err(|e| StoreError::invalid(format!("cannot encode an outbox batch: {e}")))?;
    if json.len() <= max_bytes {
        out.push(json);
        return Ok(());
    }
    let rows = part.rows();
    if rows > 1 {
        // Not held while the halves are encoded.
        drop(json);
        for half in part.split(rows.div_ceil(2)) {
            fit_outbox(half, max_bytes, out)?;
        }
        return Ok(());
    }
    let packed = crate::zstd_frame::pack_json(&json)
        .map_err(|e| StoreError::invalid(format!("cannot compress an outbox row: {e}")))?;
    if packed.len() > max_bytes {
        return Err(StoreError::invalid(format!(
            "an outbox row of {} bytes ({} compressed) does not fit a MongoDB document",
            json.len(),
            packed.len()
        )));
    }
    out.push(packed);
    Ok(())
}

/// Reads a `batch` value [`outbox_docs`] wrote, plain or compressed.
pub(super) fn outbox_from_doc(bytes: &[u8]) -> Result<WarehouseBatch, String> {
    let json = crate::zstd_frame::unpack_json(bytes, crate::zstd_frame::MAX_OUTBOX_BYTES)?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// `{_id: "kind:value", kind, value, profile_id}`: the key is unique by construction.
pub(super) fn identity_doc(identifier: &Identifier, profile: &ProfileId) -> Document {
    doc! {
        "_id": identifier.key(),
        "kind": identifier.kind.as_str(),
        "value": identifier.value.as_str(),
        "profile_id": profile.as_str(),
    }
}

pub(super) fn profile_id_of(doc: &Document, field: &str) -> Result<ProfileId, StoreError> {
    let raw =
        doc.get_str(field).map_err(|_| StoreError::corrupt(format!("stored {field} is missing or not a string")))?;
    ProfileId::parse(raw).ok_or_else(|| StoreError::corrupt(format!("stored {field} is a malformed profile id")))
}

/// Key of one merge under one of its profiles: `profile/seq(20 digits)/other`, the same key as
/// the embedded store's. The zero-padded seq makes `_id` order journal order; `other` keeps two
/// merges at one seq (a survivor absorbing two profiles) apart.
pub(super) fn merge_key(profile: &ProfileId, seq: u64, other: &ProfileId) -> String {
    format!("{}/{seq:020}/{}", profile.as_str(), other.as_str())
}

/// The merge documents to upsert: one under the survivor and one under the merged profile.
pub(super) fn merge_docs(merge: &IdentityMerged) -> Result<Vec<Document>, StoreError> {
    let key = merge_key(&merge.survivor, merge.seq, &merge.merged);
    let body = bson::to_bson(merge).map_err(|e| encode_error("merge", &key, e))?;
    let mut docs = vec![doc! { "_id": key, "profile": merge.survivor.as_str(), "merge": body.clone() }];
    if merge.merged != merge.survivor {
        let key = merge_key(&merge.merged, merge.seq, &merge.survivor);
        docs.push(doc! { "_id": key, "profile": merge.merged.as_str(), "merge": body });
    }
    Ok(docs)
}

pub(super) fn merge_from_doc(doc: Document) -> Result<IdentityMerged, StoreError> {
    let id = string_id(&doc);
    let body = doc.get_document("merge").map_err(|_| StoreError::corrupt(format!("stored merge {id} has no body")))?;
    bson::from_document(body.clone()).map_err(|e| decode_error("merge", &id, e))
}

/// `{_id: id, ...fields of DeadLetter except id}`.
/// A record's serde fields with `_id` first.
pub(super) fn record_doc<T: serde::Serialize>(
    what: &str,
    id: impl Into<Bson>,
    record: &T,
) -> Result<Document, StoreError> {
    let id = id.into();
    let fields = bson::to_document(record).map_err(|e| encode_error(what, &id.to_string(), e))?;
    let mut doc = doc! { "_id": id };
    doc.extend(fields);
    Ok(doc)
}

pub(super) fn record_from_doc<T: serde::de::DeserializeOwned>(what: &str, mut doc: Document) -> Result<T, StoreError> {
    let id = string_id(&doc);
    doc.remove("_id");
    bson::from_document(doc).map_err(|e| decode_error(what, &id, e))
}

pub(super) fn dead_letter_doc(letter: &DeadLetter) -> Result<Document, StoreError> {
    let id = to_i64("dead letter id", letter.id)?;
    let mut fields = bson::to_document(letter).map_err(|e| encode_error("dead letter", &id.to_string(), e))?;
    fields.remove("id");
    let mut doc = doc! { "_id": id };
    doc.extend(fields);
    Ok(doc)
}

pub(super) fn dead_letter_from_doc(mut doc: Document) -> Result<DeadLetter, StoreError> {
    let id = as_u64("dead letter id", doc.get("_id"))?;
    doc.remove("_id");
    doc.insert("id", to_i64("dead letter id", id).map_err(|e| StoreError::corrupt(e.message))?);
    bson::from_document(doc).map_err(|e| decode_error("dead letter", &id.to_string(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use chrono::{DateTime, Utc};
    use cohort_messages::{CustomerEvent, DeadLetterStage, EventId, EventKind, IdentifierKind, RawRef, Source, Utm};
    use serde_json::{json, Map};

    fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, nanos).unwrap()
    }

    fn id(n: u32) -> ProfileId {
        ProfileId::derive_from_event(&EventId::new(Source::Crm, &format!("p{n}")), at(i64::from(n), 0))
    }

    fn rich_event() -> CustomerEvent {
        let mut properties = Map::new();
        properties.insert("score".into(), json!(7));
        properties.insert("ratio".into(), json!(0.25));
        properties.insert("negative".into(), json!(-3));
        properties.insert("nested".into(), json!({"a": [1, "two", null, true], "b": {}}));
        CustomerEvent {
            event_id: EventId::new(Source::Web, "e1"),
            source: Source::Web,
            kind: EventKind::Track,
            name: Some("quiz_completed".into()),
            occurred_at: at(5, 1),
            received_at: at(6, 999_999_999),
            identifiers: vec![Identifier::new(IdentifierKind::Email, "grüße@example.edu")],
            traits: [("first_name".to_string(), json!("Zoë")), ("age".to_string(), json!(19))].into_iter().collect(),
            properties,
            utm: Utm { campaign: Some("spring".into()), ..Utm::default() },
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    fn rich_profile() -> ProfileRecord {
        let mut p = ProfileRecord::new(id(1), at(0, 123_456_789));
        p.apply(1 << 40, &rich_event(), 10);
        p.merged_into = Some(id(2));
        p.merged_from = vec![id(3)];
        p
    }

    #[test]
    fn profiles_round_trip_exactly_with_numbers_as_int64() {
        let p = rich_profile();
        let doc = profile_doc(&p).unwrap();
        assert_eq!(doc.get_str("_id").unwrap(), p.profile_id.as_str());
        assert_eq!(doc.get_document("counters").unwrap().get("events_total"), Some(&Bson::Int64(1)));
        assert_eq!(profile_from_doc(doc).unwrap(), p);
    }

    /// The packed blob back to the document it holds.
    fn unpack(doc: &Document) -> Document {
        let bytes = &doc.get_binary_generic(PACKED).unwrap()[..];
        assert_eq!(bytes[0], PACKED_ZSTD_BSON);
        Document::from_reader(zstd::stream::decode_all(&bytes[1..]).unwrap().as_slice()).unwrap()
    }

    #[test]
    fn bookkeeping_is_packed_and_what_analysts_query_stays_bson() {
        let mut p = rich_profile();
        for n in 2..60u64 {
            let event = CustomerEvent {
                event_id: EventId::new(Source::Web, &format!("e{n}")),
                kind: EventKind::Page,
                name: Some("lecture viewed".into()),
                occurred_at: at(10, 0),
                received_at: at(10, 5),
                properties: [("path".to_string(), json!("/courses/101/lectures/3"))].into_iter().collect(),
                ..rich_event()
            };
            p.apply(n, &event, 100);
        }
        let doc = profile_doc(&p).unwrap();
        for name in PACKED_FIELDS {
            assert!(!doc.contains_key(name), "{name} is packed, not a field");
        }
        for name in ["identifiers", "traits", "counters", "created_at", "updated_at", "merged_into"] {
            assert!(doc.contains_key(name), "{name} stays a queryable field");
        }
        let packed = unpack(&doc);
        assert_eq!(packed.get_array("applied_seqs").unwrap()[0], Bson::Int64(2), "numbers are Int64 inside too");
        assert_eq!(packed.get_array("recent_events").unwrap().len(), p.recent_events.len());
        let plain = bson::to_document(&p).unwrap();
        let size = |d: &Document| {
            let mut v = Vec::new();
            d.to_writer(&mut v).unwrap();
            v.len()
        };
        assert!(size(&doc) * 3 < size(&plain), "packed {} B against {} B plain", size(&doc), size(&plain));
        assert_eq!(profile_from_doc(doc).unwrap(), p);
    }

    #[test]
    fn profiles_stored_before_packing_still_read() {
        let p = rich_profile();
        let mut old = doc! { "_id": p.profile_id.as_str() };
        old.extend(bson::to_document(&p).unwrap());
        assert!(old.contains_key("recent_events") && !old.contains_key(PACKED));
        assert_eq!(profile_from_doc(old).unwrap(), p);
    }

    #[test]
    fn damaged_or_unknown_packed_fields_are_corrupt_not_a_panic() {
        let p = rich_profile();
        let good = profile_doc(&p).unwrap();
        let with = |packed: Bson| {
            let mut d = good.clone();
            d.insert(PACKED, packed);
            profile_from_doc(d).unwrap_err()
        };
        let binary = |bytes: Vec<u8>| Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes });
        for err in [
            with(binary(vec![])),
            with(binary(vec![PACKED_ZSTD_BSON, 1, 2, 3])),
            with(binary(vec![PACKED_ZSTD_BSON])),
            with(Bson::String("x".into())),
        ] {
            assert_eq!(err.kind, crate::StoreErrorKind::Corrupt, "{}", err.message);
        }
        let err = with(binary(vec![9, 0]));
        assert!(err.message.contains("unknown format (9)"), "{}", err.message);
        // A valid frame holding something that is not a BSON document.
        let frame = zstd::bulk::compress(b"not bson", 1).unwrap();
        assert_eq!(with(binary([vec![PACKED_ZSTD_BSON], frame].concat())).kind, crate::StoreErrorKind::Corrupt);
    }

    #[test]
    fn oversized_numbers_are_refused_not_wrapped() {
        let mut p = rich_profile();
        p.applied_seqs.insert(u64::MAX);
        let err = profile_doc(&p).unwrap_err();
        assert_eq!(err.kind, crate::StoreErrorKind::Invalid);
    }

    #[test]
    fn merges_are_keyed_under_both_profiles_in_seq_order() {
        let m = IdentityMerged {
            survivor: id(1),
            merged: id(2),
            evidence: vec![Identifier::new(IdentifierKind::Email, "a@b.c")],
            at: at(1, 5),
            seq: 9,
            reason: Default::default(),
        };
        let docs = merge_docs(&m).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].get_str("profile").unwrap(), id(1).as_str());
        assert_eq!(docs[1].get_str("profile").unwrap(), id(2).as_str());
        assert!(merge_key(&id(1), 9, &id(2)) < merge_key(&id(1), 10, &id(2)));
        for d in docs {
            assert_eq!(merge_from_doc(d).unwrap(), m);
        }
    }

    #[test]
    fn dead_letters_use_their_id_as_int64_key() {
        let letter = DeadLetter {
            id: 42,
            source: Source::Email,
            stage: DeadLetterStage::Validation,
            reason: "bad".into(),
            event_id: None,
            payload: "{}".into(),
            content_type: "application/json".into(),
            received_at: at(1, 1),
            recorded_at: at(2, 2),
            attempts: 3,
        };
        let doc = dead_letter_doc(&letter).unwrap();
        assert_eq!(doc.get("_id"), Some(&Bson::Int64(42)));
        assert!(!doc.contains_key("id"));
        assert_eq!(dead_letter_from_doc(doc).unwrap(), letter);
    }

    #[test]
    fn decode_errors_do_not_echo_stored_values() {
        let doc = doc! { "_id": "prof_x", "profile_id": 5, "created_at": "student@example.edu" };
        let err = profile_from_doc(doc).unwrap_err();
        assert_eq!(err.kind, crate::StoreErrorKind::Corrupt);
        assert!(!err.message.contains("student@example.edu"), "{}", err.message);
        assert_eq!(
            redact_quoted(r#"invalid type: string "a@b.c", expected u64"#),
            r#"invalid type: string "…", expected u64"#
        );
    }

    fn bronze(n: u64, payload: String) -> crate::BronzeRow {
        crate::BronzeRow {
            raw_seq: n,
            source: Source::Web,
            format: "segment:batch".into(),
            content_type: "application/json".into(),
            received_at: at(0, 0),
            payload_encoding: crate::warehouse::PayloadEncoding::Utf8,
            payload,
        }
    }

    #[test]
    fn outbox_batches_are_halved_until_each_fits_and_read_back_in_order() {
        let batch = WarehouseBatch {
            bronze: (0..40).map(|n| bronze(n, format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(200)))).collect(),
            ..WarehouseBatch::default()
        };
        let docs = outbox_docs(batch.clone(), 1000, 2_000).unwrap();
        assert!(docs.len() >= 5, "{} documents", docs.len());
        assert!(docs.iter().all(|d| d.len() <= 2_000), "every document fits");
        let mut read = WarehouseBatch::default();
        for d in &docs {
            read.extend(outbox_from_doc(d).unwrap());
        }
        assert_eq!(read, batch, "all rows, in order");
        assert_eq!(outbox_docs(batch.clone(), 1000, usize::MAX).unwrap().len(), 1, "small enough: one document");
    }

    #[test]
    fn a_single_row_too_large_is_compressed_and_one_too_large_even_so_is_refused() {
        let big = WarehouseBatch { bronze: vec![bronze(1, "a".repeat(50_000))], ..WarehouseBatch::default() };
        let docs = outbox_docs(big.clone(), 1000, 10_000).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].first(), Some(&crate::zstd_frame::PACKED_JSON));
        assert_eq!(outbox_from_doc(&docs[0]).unwrap(), big);
        // Plain JSON written before compression existed still reads.
        assert_eq!(outbox_from_doc(&serde_json::to_vec(&big).unwrap()).unwrap(), big);

        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: String = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'0' + (x % 64) as u8)
            })
            .collect();
        let err =
            outbox_docs(WarehouseBatch { bronze: vec![bronze(2, noise)], ..WarehouseBatch::default() }, 1000, 10_000)
                .unwrap_err();
        assert_eq!(err.kind, crate::StoreErrorKind::Invalid);
        assert!(err.message.contains("does not fit a MongoDB document"), "{}", err.message);
    }
}
