//! GDPR erasure in the embedded store: find every key that holds a person (in a read
//! transaction, so the writer is never held by a scan), then delete those keys in one write.
//!
//! Finding and deleting are separate on purpose: the same search is the verification sweep.

use redb::{ReadTransaction, ReadableTable};

use super::tables::{
    decode, merge_range, DbResult, BRONZE, BRONZE_BODY, CONSENTS, IDENTITIES, JOURNAL, MERGES, PROFILES, REVIEWS,
};
use crate::StoreError;
use cohort_messages::{CustomerEvent, ErasureCounts, ErasureTarget, ReviewItem};

/// The keys holding one person, per table.
#[derive(Debug, Default)]
pub(super) struct ErasePlan {
    pub(super) profiles: Vec<String>,
    pub(super) identities: Vec<String>,
    pub(super) merges: Vec<String>,
    pub(super) consents: Vec<String>,
    pub(super) reviews: Vec<String>,
    pub(super) dead_letters: Vec<u64>,
    pub(super) journal: Vec<u64>,
    pub(super) bronze: Vec<u64>,
}

impl ErasePlan {
    pub(super) fn counts(&self) -> ErasureCounts {
        ErasureCounts {
            profiles: self.profiles.len() as u64,
            identities: self.identities.len() as u64,
            merges: self.merges.len() as u64,
            consents: self.consents.len() as u64,
            review_items: self.reviews.len() as u64,
            dead_letters: self.dead_letters.len() as u64,
            journal_events: self.journal.len() as u64,
            raw_payloads: self.bronze.len() as u64,
            documents: 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.counts().total() == 0
    }

    /// A plan deleting only these dead letters.
    pub(super) fn dead_letters(ids: &[u64]) -> Self {
        Self { dead_letters: ids.to_vec(), ..Self::default() }
    }
}

/// The operational-store keys of a person: records, identities (keyed by one of their
/// identifiers or pointing at one of their profiles), merges on either side, consent and review
/// items naming them. (Dead letters are found by content, see `dead_letters_mentioning`.)
pub(super) fn plan_store(txn: &ReadTransaction, target: &ErasureTarget) -> Result<ErasePlan, StoreError> {
    let mut plan = ErasePlan::default();
    let profiles = txn.open_table(PROFILES).ctx("erase: read profiles")?;
    for p in &target.profiles {
        if profiles.get(p.as_str()).ctx("erase: read profiles")?.is_some() {
            plan.profiles.push(p.as_str().to_string());
        }
    }
    let keys: Vec<String> = target.identifiers.iter().map(|i| i.key()).collect();
    let identities = txn.open_table(IDENTITIES).ctx("erase: read identities")?;
    for entry in identities.iter().ctx("erase: read identities")? {
        let (k, v) = entry.ctx("erase: read identities")?;
        if keys.iter().any(|x| x == k.value()) || target.profiles.iter().any(|p| p.as_str() == v.value()) {
            plan.identities.push(k.value().to_string());
        }
    }
    let merges = txn.open_table(MERGES).ctx("erase: read merges")?;
    for p in &target.profiles {
        let (lo, hi) = merge_range(p);
        for entry in merges.range::<&str>(lo.as_str()..hi.as_str()).ctx("erase: read merges")? {
            let key = entry.ctx("erase: read merges")?.0.value().to_string();
            // `profile/seq/other`: the same merge is stored under the other profile too.
            let mut parts = key.splitn(3, '/');
            if let (Some(a), Some(seq), Some(b)) = (parts.next(), parts.next(), parts.next()) {
                let mirror = format!("{b}/{seq}/{a}");
                if merges.get(mirror.as_str()).ctx("erase: read merges")?.is_some() {
                    plan.merges.push(mirror);
                }
            }
            plan.merges.push(key);
        }
    }
    plan.merges.sort();
    plan.merges.dedup();
    let consents = txn.open_table(CONSENTS).ctx("erase: read consents")?;
    for p in &target.profiles {
        let (lo, hi) = (format!("{p}/"), format!("{p}0"));
        for entry in consents.range::<&str>(lo.as_str()..hi.as_str()).ctx("erase: read consents")? {
            plan.consents.push(entry.ctx("erase: read consents")?.0.value().to_string());
        }
    }
    let reviews = txn.open_table(REVIEWS).ctx("erase: read review queue")?;
    for entry in reviews.iter().ctx("erase: read review queue")? {
        let (k, v) = entry.ctx("erase: read review queue")?;
        let item: ReviewItem = decode("review item", v.value())?;
        if item.profiles.iter().any(|p| target.profiles.contains(p)) {
            plan.reviews.push(k.value().to_string());
        }
    }
    Ok(plan)
}

/// The journal keys of a person: events carrying one of their identifiers, the raw payloads
/// those came from, and any other raw payload mentioning them.
pub(super) fn plan_journal(txn: &ReadTransaction, target: &ErasureTarget) -> Result<ErasePlan, StoreError> {
    let mut plan = ErasePlan::default();
    let journal = txn.open_table(JOURNAL).ctx("erase: read journal")?;
    for entry in journal.iter().ctx("erase: read journal")? {
        let (seq, bytes) = entry.ctx("erase: read journal")?;
        let event: CustomerEvent = decode("event", bytes.value())?;
        if target.matches_event(&event) {
            plan.journal.push(seq.value());
            plan.bronze.extend(event.raw.seq);
        }
    }
    let needles = target.needles();
    let bodies = txn.open_table(BRONZE_BODY).ctx("erase: read bronze")?;
    for entry in bodies.iter().ctx("erase: read bronze")? {
        let (seq, body) = entry.ctx("erase: read bronze")?;
        if target.mentions(&needles, body.value()) {
            plan.bronze.push(seq.value());
        }
    }
    plan.bronze.sort_unstable();
    plan.bronze.dedup();
    // A raw seq referenced by an already-expired payload is not there to delete.
    let bronze = txn.open_table(BRONZE).ctx("erase: read bronze")?;
    let mut present = Vec::with_capacity(plan.bronze.len());
    for seq in plan.bronze.drain(..) {
        if bronze.get(seq).ctx("erase: read bronze")?.is_some() || bodies.get(seq).ctx("erase: read bronze")?.is_some()
        {
            present.push(seq);
        }
    }
    plan.bronze = present;
    Ok(plan)
}
