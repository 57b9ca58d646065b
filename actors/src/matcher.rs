//! The live probabilistic matcher (slide 7): looks for likely duplicates of every profile whose
//! person fields change, with the blocking keys and match model `cohort identity dedupe` uses,
//! and queues them for a person to decide (or merges them above `auto_merge_threshold`).

use crate::identity::{send_merge, IdentityIndex, MergeRefused};
use crate::matching::{compare, MatchModel, MatchRecord};
use chrono::Utc;
use cohort_adapters::{all_review_items, OperationalStore};
use cohort_messages::msgs::{
    IdentityMerged, MatchCandidate, MatcherMsg, MatcherStats, MergeReason, ProfilesMsg, ReviewError,
};
use cohort_messages::{NewAuditEntry, ProfileId, ReviewItem, ReviewStatus};
use cohort_supervisors::{Metrics, Slot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Blocks with more members than this say nothing about a pair and are not searched.
const MAX_BLOCK: usize = 200;
/// Profiles read per page when the index is rebuilt at start.
const REBUILD_PAGE: usize = 500;

/// The kind of review item the matcher opens.
pub const PROBABLE_DUPLICATE: &str = "probable_duplicate";

pub struct IdentityMatcher;

pub struct IdentityMatcherArgs {
    pub store: Arc<dyn OperationalStore>,
    pub index: Arc<IdentityIndex>,
    pub directory: Slot<ProfilesMsg>,
    pub metrics: Metrics,
    pub model: MatchModel,
    pub review_threshold: f64,
    /// `None`: probabilistic matches never merge without a person's decision.
    pub auto_merge_threshold: Option<f64>,
    /// Erased people: never indexed or proposed again (a change may arrive after the erasure).
    pub erasures: Arc<crate::gdpr::Erasures>,
}

pub struct IdentityMatcherState {
    args: IdentityMatcherArgs,
    records: HashMap<ProfileId, (MatchRecord, Vec<String>)>,
    blocks: HashMap<String, Vec<ProfileId>>,
    /// Pairs (smaller id first) that already have a review item, whatever its status: a
    /// rejected pair is not asked about again.
    known_pairs: HashSet<(ProfileId, ProfileId)>,
    stats: MatcherStats,
}

/// A review item's id: stable for a pair, so the same pair is never queued twice.
pub fn review_id(a: &ProfileId, b: &ProfileId) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    let strip = |p: &ProfileId| p.as_str().trim_start_matches(ProfileId::PREFIX).to_string();
    format!("rev_{}_{}", strip(a), strip(b))
}

fn pair(a: &ProfileId, b: &ProfileId) -> (ProfileId, ProfileId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl IdentityMatcherState {
    fn forget(&mut self, id: &ProfileId) {
        if let Some((_, keys)) = self.records.remove(id) {
            for key in keys {
                if let Some(members) = self.blocks.get_mut(&key) {
                    members.retain(|m| m != id);
                    if members.is_empty() {
                        self.blocks.remove(&key);
                    }
                }
            }
        }
    }

    fn insert(&mut self, id: ProfileId, record: MatchRecord) {
        let keys = record.blocking_keys();
        for key in &keys {
            self.blocks.entry(key.clone()).or_default().push(id.clone());
        }
        self.records.insert(id, (record, keys));
    }

    /// Indexes a changed profile and returns the pairs it forms at or above the threshold.
    fn update(&mut self, id: ProfileId, record: MatchRecord) -> Vec<(ProfileId, f64, serde_json::Value)> {
        if self.records.get(&id).is_some_and(|(r, _)| *r == record) {
            return Vec::new();
        }
        self.forget(&id);
        let mut candidates: HashSet<&ProfileId> = HashSet::new();
        for key in record.blocking_keys() {
            if let Some(members) = self.blocks.get(&key).filter(|m| m.len() <= MAX_BLOCK) {
                candidates.extend(members.iter().filter(|m| **m != id));
            }
        }
        let mut found = Vec::new();
        for other in candidates {
            if self.known_pairs.contains(&pair(&id, other)) {
                continue;
            }
            let Some((theirs, _)) = self.records.get(other) else { continue };
            self.stats.pairs_compared += 1;
            let explanation = compare(&record, theirs, &self.args.model);
            let same_national_id = record.national_id.is_some() && record.national_id == theirs.national_id;
            let score = if same_national_id { 1.0 } else { explanation.score };
            if score >= self.args.review_threshold {
                let evidence = json!({
                    "comparisons": explanation.comparisons,
                    "weight_bits": explanation.weight,
                    "same_national_id": same_national_id,
                });
                found.push((other.clone(), score, evidence));
            }
        }
        self.insert(id, record);
        found
    }

    fn directory(&self) -> Result<ActorRef<ProfilesMsg>, ReviewError> {
        self.args.directory.get().ok_or_else(|| ReviewError::Unavailable("profile directory restarting".into()))
    }

    /// Carries out a decided merge: the graph first, then the merged profile hands its state over.
    async fn merge(&self, a: &ProfileId, b: &ProfileId, reason: MergeReason) -> Result<(), ReviewError> {
        let directory = self.directory()?;
        // A deletion in progress: the erased profile could survive the merge and take the
        // other student's data with it.
        for p in [a, b] {
            let root = self.args.index.root(p).await.map_err(|e| ReviewError::Unavailable(e.to_string()))?;
            if self.args.erasures.is_erased(p) || self.args.erasures.is_erased(&root) {
                return Err(ReviewError::Refused("one of the two profiles is being erased".into()));
            }
        }
        match self.args.index.merge_pair(a, b, reason).await {
            Ok(Some(IdentityMerged { survivor, merged, .. })) => {
                self.args.metrics.identity_merges.inc();
                tracing::info!(survivor = %survivor, merged = %merged, "profiles merged on a probabilistic match");
                send_merge(&directory, &survivor, &merged)
                    .map_err(|e| ReviewError::Unavailable(format!("profile directory unavailable: {e}")))
            }
            Ok(None) => Ok(()),
            Err(MergeRefused::Unavailable(e)) => Err(ReviewError::Unavailable(e)),
            Err(refused) => Err(ReviewError::Refused(refused.to_string())),
        }
    }

    async fn changed(&mut self, candidates: Vec<MatchCandidate>) {
        let mut items = Vec::new();
        for c in candidates {
            if c.merged || self.args.erasures.is_erased(&c.profile_id) {
                self.forget(&c.profile_id);
                continue;
            }
            let record = MatchRecord::from_parts(&c.traits, &c.identifiers);
            for (other, score, evidence) in self.update(c.profile_id.clone(), record) {
                if self.args.index.kept_apart_pair(&c.profile_id, &other) || self.args.erasures.is_erased(&other) {
                    continue;
                }
                let now = Utc::now();
                let (first, second) = pair(&c.profile_id, &other);
                let mut item = ReviewItem {
                    id: review_id(&c.profile_id, &other),
                    kind: PROBABLE_DUPLICATE.into(),
                    profiles: vec![first, second],
                    score,
                    evidence,
                    status: ReviewStatus::Open,
                    created_at: now,
                    decided_at: None,
                    decided_by: None,
                };
                let auto = self.args.auto_merge_threshold.is_some_and(|t| score >= t);
                if auto {
                    match self.merge(&c.profile_id, &other, MergeReason::AutoMerged { score }).await {
                        Ok(()) => {
                            item.status = ReviewStatus::Accepted;
                            item.decided_at = Some(now);
                            item.decided_by = Some("auto_merge".into());
                            self.stats.auto_merges += 1;
                            self.args.metrics.identity_reviews_decided.with_label_values(&["auto_merged"]).inc();
                        }
                        // Not mergeable (kept apart, limits): a person decides.
                        Err(e) => {
                            tracing::info!(review = %item.id, reason = %e, "automatic merge refused; queued for review")
                        }
                    }
                }
                items.push(item);
            }
        }
        if items.is_empty() {
            return;
        }
        let opened = items.iter().filter(|i| i.status == ReviewStatus::Open).count() as u64;
        let pairs: Vec<(ProfileId, ProfileId)> = items.iter().map(|i| pair(&i.profiles[0], &i.profiles[1])).collect();
        match self.args.store.put_review_items(items).await {
            Ok(()) => {
                self.known_pairs.extend(pairs);
                self.stats.reviews_opened += opened;
                self.args.metrics.identity_reviews_opened.inc_by(opened);
            }
            // The pairs are found again on the profiles' next change.
            Err(e) => tracing::warn!(error = %e, "review items not stored"),
        }
    }

    async fn decide(&mut self, review_id: &str, approve: bool, by: &str) -> Result<ReviewItem, ReviewError> {
        let store = &self.args.store;
        let unavailable = |e: cohort_adapters::StoreError| ReviewError::Unavailable(e.to_string());
        let mut item = store
            .review_item(review_id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ReviewError::NotFound(review_id.into()))?;
        if item.status != ReviewStatus::Open {
            return Err(ReviewError::AlreadyDecided(review_id.into()));
        }
        let [a, b] = item.profiles.as_slice() else {
            return Err(ReviewError::Refused(format!("review item {review_id} does not name two profiles")));
        };
        if approve {
            let reason = MergeReason::ReviewApproved { review_id: review_id.into(), score: item.score, by: by.into() };
            self.merge(a, b, reason).await?;
        }
        let now = Utc::now();
        item.status = if approve { ReviewStatus::Accepted } else { ReviewStatus::Rejected };
        item.decided_at = Some(now);
        item.decided_by = Some(by.into());
        store.put_review_items(vec![item.clone()]).await.map_err(unavailable)?;
        let outcome = if approve { "approved" } else { "rejected" };
        self.args.metrics.identity_reviews_decided.with_label_values(&[outcome]).inc();
        let audit = NewAuditEntry {
            at: now,
            actor: by.into(),
            action: format!("identity.review.{outcome}"),
            subject: review_id.into(),
            detail: json!({ "profiles": item.profiles, "score": item.score }),
        };
        if let Err(e) = store.append_audit(vec![audit]).await {
            tracing::warn!(error = %e, review = review_id, "review decision not written to the audit log");
        }
        Ok(item)
    }
}

impl Actor for IdentityMatcher {
    type Msg = MatcherMsg;
    type State = IdentityMatcherState;
    type Arguments = IdentityMatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MatcherMsg>,
        args: IdentityMatcherArgs,
    ) -> Result<IdentityMatcherState, ActorProcessingErr> {
        let known_pairs: HashSet<(ProfileId, ProfileId)> = all_review_items(args.store.as_ref())
            .await?
            .iter()
            .filter_map(|item| match item.profiles.as_slice() {
                [a, b] => Some(pair(a, b)),
                _ => None,
            })
            .collect();
        myself.send_message(MatcherMsg::Rebuild { after: None })?;
        Ok(IdentityMatcherState {
            args,
            records: HashMap::new(),
            blocks: HashMap::new(),
            known_pairs,
            stats: MatcherStats::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<MatcherMsg>,
        msg: MatcherMsg,
        state: &mut IdentityMatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MatcherMsg::ProfilesChanged(candidates) => state.changed(candidates).await,
            MatcherMsg::Rebuild { after } => {
                // Index only: pairs that existed before are for `cohort identity dedupe`, not
                // for a review flood at every start.
                let ids = state.args.store.list_profile_ids(after.as_ref(), REBUILD_PAGE).await?;
                let last = ids.last().cloned();
                for p in state.args.store.load_profiles(&ids).await? {
                    let person = ["first_name", "last_name", "date_of_birth"].iter().any(|k| p.traits.contains_key(*k));
                    // A profile changed since start is already indexed with fresher fields.
                    if p.merged_into.is_none() && person && !state.records.contains_key(&p.profile_id) {
                        state.insert(p.profile_id.clone(), MatchRecord::from_profile(&p));
                    }
                }
                match last {
                    Some(last) if ids.len() == REBUILD_PAGE => {
                        myself.send_message(MatcherMsg::Rebuild { after: Some(last) })?
                    }
                    _ => state.stats.rebuilt = true,
                }
            }
            MatcherMsg::Decide { review_id, approve, by, reply } => {
                let _ = reply.send(state.decide(&review_id, approve, &by).await);
            }
            MatcherMsg::Sync(reply) => {
                state.stats.indexed_profiles = state.records.len();
                let _ = reply.send(state.stats.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_ids_do_not_depend_on_the_order_of_the_pair() {
        let a = ProfileId::derive_from_event(&cohort_messages::EventId::from_raw("a"), Utc::now());
        let b = ProfileId::derive_from_event(&cohort_messages::EventId::from_raw("b"), Utc::now());
        assert_eq!(review_id(&a, &b), review_id(&b, &a));
        assert_ne!(review_id(&a, &b), review_id(&a, &a));
    }
}
