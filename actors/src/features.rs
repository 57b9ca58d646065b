//! Feature computation (the seed's nightly feature job): every live profile's computed traits,
//! as of the run, stored per profile in the `profile_features` documents. Models and analysts
//! read a consistent daily snapshot instead of values that move with every event; the live
//! values stay on the profile. Erasure removes a person's features (the `feature_stores` step).

use crate::segments::computed::compute;
use chrono::{DateTime, Utc};
use cohort_adapters::{OperationalStore, StoreError};
use cohort_messages::ProfileId;
use serde_json::{json, Value};

/// The document collection of computed features, keyed by profile id.
pub const FEATURES: &str = "profile_features";

const PAGE: usize = 500;

/// Computes and stores every live (not merged-away, not erased) profile's features; returns
/// counts.
pub async fn compute_all(
    store: &dyn OperationalStore,
    erasures: &crate::gdpr::Erasures,
    now: DateTime<Utc>,
) -> Result<Value, StoreError> {
    let (mut profiles, mut written, mut stale_removed) = (0u64, 0u64, 0u64);
    let mut after: Option<ProfileId> = None;
    loop {
        let ids = store.list_profile_ids(after.as_ref(), PAGE).await?;
        let Some(last) = ids.last().cloned() else { break };
        let records = store.load_profiles(&ids).await?;
        let mut docs = Vec::with_capacity(records.len());
        for record in &records {
            profiles += 1;
            let key = record.profile_id.as_str().to_string();
            if record.merged_into.is_some() || erasures.is_erased(&record.profile_id) {
                // A merged-away profile's features live on its survivor now.
                docs.push((key, None));
                stale_removed += 1;
                continue;
            }
            let features =
                serde_json::to_value(compute(record, now)).map_err(|e| StoreError::invalid(e.to_string()))?;
            docs.push((key, Some(json!({ "computed_at": now, "features": features }))));
            written += 1;
        }
        store.put_documents(FEATURES, docs).await?;
        // A deletion that went by while this page was computed: its step removed the person's
        // features before this write put them back.
        let gone: Vec<(String, Option<Value>)> = records
            .iter()
            .filter(|r| erasures.is_erased(&r.profile_id))
            .map(|r| (r.profile_id.as_str().to_string(), None))
            .collect();
        if !gone.is_empty() {
            store.put_documents(FEATURES, gone).await?;
        }
        if ids.len() < PAGE {
            break;
        }
        after = Some(last);
    }
    Ok(json!({ "profiles": profiles, "written": written, "merged_removed": stale_removed, "computed_at": now }))
}

/// A profile's stored features, if the job has computed them.
pub async fn features_of(store: &dyn OperationalStore, id: &ProfileId) -> Result<Option<Value>, StoreError> {
    Ok(store.get_documents(FEATURES, &[id.as_str().to_string()]).await?.into_iter().next().flatten())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_adapters::FlushBatch;
    use cohort_messages::{EventId, ProfileRecord, Source};

    /// An erased profile whose record is still read gets no features written.
    #[tokio::test]
    async fn an_erased_profile_gets_no_features() {
        let store = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let id = |n: &str| ProfileId::derive_from_event(&EventId::new(Source::Web, n), Utc::now());
        let (gone, kept) = (ProfileRecord::new(id("a"), Utc::now()), ProfileRecord::new(id("b"), Utc::now()));
        store
            .commit_flush(FlushBatch { profiles: vec![gone.clone(), kept.clone()], ..FlushBatch::default() })
            .await
            .unwrap();
        let erasures =
            crate::gdpr::Erasures::new(cohort_adapters::crypto::KeyedHasher::from_secret(&[7u8; 32]).unwrap());
        erasures.mark_erased([gone.profile_id.clone()]);
        let counts = compute_all(store.as_ref(), &erasures, Utc::now()).await.unwrap();
        assert_eq!(counts["written"], 1, "{counts}");
        assert!(features_of(store.as_ref(), &gone.profile_id).await.unwrap().is_none());
        assert!(features_of(store.as_ref(), &kept.profile_id).await.unwrap().is_some());
    }
}
