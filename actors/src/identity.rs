//! Deterministic identity resolution: a shared identity index and a sharded pool of
//! IdentityResolver workers (a ractor factory routed by identifier key).

use crate::context::PipelineContext;
use crate::dead_letters;
use chrono::Utc;
use cohort_adapters::{OperationalStore, StoreError};
use cohort_messages::msgs::{IdentityMerged, IdentityMsg, ProfileMsg, ProfilesMsg};
use cohort_messages::{CustomerEvent, DeadLetterStage, Identifier, IdentifierKind, ProfileId};
use cohort_supervisors::Slot;
use dashmap::{DashMap, DashSet};
use parking_lot::Mutex;
use ractor::factory::{
    queues::DefaultQueue, routing::KeyPersistentRouting, Factory, FactoryArguments, FactoryMessage, Job, Worker,
    WorkerBuilder, WorkerId,
};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Identifier values that must never link profiles: test and placeholder data that many
/// unrelated people share (`test@example.com`, `+49 111 111111`).
#[derive(Debug, Clone, Default)]
pub struct IdentityRules {
    /// Exact identifiers, normalized as ingest normalizes them.
    pub blocked: HashSet<Identifier>,
    /// Phone numbers whose national digits are one digit repeated or a plain run (`123456789`).
    pub placeholder_phones: bool,
}

impl IdentityRules {
    pub fn is_blocked(&self, id: &Identifier) -> bool {
        if self.blocked.contains(id) {
            return true;
        }
        self.placeholder_phones
            && matches!(id.kind, IdentifierKind::Phone | IdentifierKind::WhatsappId)
            && is_placeholder_number(&id.value)
    }
}

/// `+491111111111`, `+10000000000`, `+49123456789`: the national number is one repeated digit
/// or an ascending or descending run of at least six digits.
fn is_placeholder_number(e164: &str) -> bool {
    let input = e164.to_string();
    // The parser has internal unwraps on some inputs; resolution must never panic on one.
    let code = std::panic::catch_unwind(move || phonenumber::parse(None, &input).ok().map(|n| n.code().value()))
        .ok()
        .flatten();
    let all: Vec<u8> = e164.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
    let repeated = |d: &[u8]| d.len() >= 6 && d.windows(2).all(|w| w[0] == w[1]);
    let Some(code) = code else {
        // Not a number the metadata can parse: only a repeated digit after a country code counts.
        return (1..=3).any(|cc| repeated(all.get(cc..).unwrap_or_default()));
    };
    let national = all.get(code.to_string().len()..).unwrap_or_default();
    repeated(national)
        || (national.len() >= 6
            && (national.windows(2).all(|w| (w[0] + 1) % 10 == w[1])
                || national.windows(2).all(|w| (w[1] + 1) % 10 == w[0])))
}

/// The identity graph in memory, in front of the store: identifier → owning profile, and merged
/// profile → survivor. Ownership is claimed atomically, so two shards can never give one
/// identifier two owners; changes are persisted by the write-behind flush.
pub struct IdentityIndex {
    store: Arc<dyn OperationalStore>,
    owners: DashMap<Identifier, ProfileId>,
    redirects: DashMap<ProfileId, ProfileId>,
    known_roots: DashSet<ProfileId>,
    /// Identifiers the store did not have when last asked (see [`IdentityIndex::prefetch`]);
    /// `owners` always wins over this set, and claims take entries out of it.
    absent: DashSet<Identifier>,
    /// Profiles this process created and has not started an actor for yet: nothing to load.
    created: DashSet<ProfileId>,
    dirty: Mutex<HashMap<Identifier, ProfileId>>,
    merges: Mutex<Vec<IdentityMerged>>,
    rules: IdentityRules,
}

impl std::fmt::Debug for IdentityIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityIndex").field("owners", &self.owners.len()).finish_non_exhaustive()
    }
}

impl IdentityIndex {
    pub fn new(store: Arc<dyn OperationalStore>) -> Self {
        Self::with_rules(store, IdentityRules::default())
    }

    pub fn with_rules(store: Arc<dyn OperationalStore>, rules: IdentityRules) -> Self {
        Self {
            rules,
            store,
            owners: DashMap::new(),
            redirects: DashMap::new(),
            known_roots: DashSet::new(),
            absent: DashSet::new(),
            created: DashSet::new(),
            dirty: Mutex::new(HashMap::new()),
            merges: Mutex::new(Vec::new()),
        }
    }

    /// The profile owning `identifier`, from memory or the store.
    pub async fn owner(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        if let Some(p) = self.owners.get(identifier) {
            return Ok(Some(p.clone()));
        }
        if self.absent.contains(identifier) {
            return Ok(None);
        }
        match self.store.lookup_identity(identifier).await? {
            Some(p) => Ok(Some(self.owners.entry(identifier.clone()).or_insert(p).clone())),
            None => Ok(None),
        }
    }

    /// Claims an unowned identifier for `profile`; returns the owner if someone was first.
    fn claim(&self, identifier: &Identifier, profile: &ProfileId) -> Result<(), ProfileId> {
        match self.owners.entry(identifier.clone()) {
            dashmap::Entry::Occupied(e) if e.get() != profile => Err(e.get().clone()),
            dashmap::Entry::Occupied(_) => Ok(()),
            dashmap::Entry::Vacant(v) => {
                v.insert(profile.clone());
                self.absent.remove(identifier);
                self.dirty.lock().insert(identifier.clone(), profile.clone());
                Ok(())
            }
        }
    }

    /// Looks up, in one store round trip, every identifier of a batch this index does not know
    /// yet, so resolving the batch's events needs no store call per new identifier.
    pub async fn prefetch(&self, identifiers: impl IntoIterator<Item = &Identifier>) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let unknown: Vec<Identifier> = identifiers
            .into_iter()
            .filter(|i| !self.owners.contains_key(*i) && !self.absent.contains(*i) && seen.insert(*i))
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let found = self.store.lookup_identities(&unknown).await?;
        for (identifier, owner) in unknown.into_iter().zip(found) {
            match owner {
                Some(p) => {
                    self.owners.entry(identifier).or_insert(p);
                }
                None if !self.owners.contains_key(&identifier) => {
                    self.absent.insert(identifier);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether `profile` was created by this process and never loaded: then the store has no
    /// record of it and its actor can start empty. Answers true once.
    pub fn take_created(&self, profile: &ProfileId) -> bool {
        self.created.remove(profile).is_some()
    }

    /// Points an identifier at a merge survivor.
    fn repoint(&self, identifier: &Identifier, profile: &ProfileId) {
        let changed = self.owners.insert(identifier.clone(), profile.clone()).as_ref() != Some(profile);
        if changed {
            self.dirty.lock().insert(identifier.clone(), profile.clone());
        }
    }

    /// Follows merge redirects to the surviving profile, consulting the store for profiles this
    /// process has not seen yet (their records say whether they were merged).
    pub async fn root(&self, profile: &ProfileId) -> Result<ProfileId, StoreError> {
        let mut current = profile.clone();
        for _ in 0..64 {
            if let Some(next) = self.redirects.get(&current).map(|r| r.clone()) {
                current = next;
                continue;
            }
            if self.known_roots.contains(&current) {
                return Ok(current);
            }
            match self.store.load_profile(&current).await? {
                Some(rec) => match rec.merged_into {
                    Some(next) => {
                        self.redirects.insert(current.clone(), next.clone());
                        current = next;
                    }
                    None => {
                        self.known_roots.insert(current.clone());
                        return Ok(current);
                    }
                },
                None => {
                    self.known_roots.insert(current.clone());
                    return Ok(current);
                }
            }
        }
        Err(StoreError::corrupt(format!("merge redirects of {profile} form a cycle")))
    }

    fn record_merge(&self, merged: IdentityMerged) {
        self.known_roots.remove(&merged.merged);
        self.redirects.insert(merged.merged.clone(), merged.survivor.clone());
        self.merges.lock().push(merged);
    }

    /// Resolves an identifier ref to the live profile id (following merges).
    pub async fn resolve(&self, identifier: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        match self.owner(identifier).await? {
            Some(p) => Ok(Some(self.root(&p).await?)),
            None => Ok(None),
        }
    }

    /// Changes not yet persisted, taken by the write-behind flush.
    pub fn take_pending(&self) -> (Vec<(Identifier, ProfileId)>, Vec<IdentityMerged>) {
        let ids = std::mem::take(&mut *self.dirty.lock()).into_iter().collect();
        let merges = std::mem::take(&mut *self.merges.lock());
        (ids, merges)
    }

    /// Puts back what a failed flush took, unless newer changes replaced it meanwhile.
    pub fn restore_pending(&self, ids: Vec<(Identifier, ProfileId)>, merges: Vec<IdentityMerged>) {
        let mut dirty = self.dirty.lock();
        for (i, p) in ids {
            dirty.entry(i).or_insert(p);
        }
        let mut m = self.merges.lock();
        let newer = std::mem::take(&mut *m);
        *m = merges;
        m.extend(newer);
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

/// Places one event: returns the profile it belongs to, creating, linking or merging profiles.
pub async fn resolve_event(
    ctx: &PipelineContext,
    directory: &ActorRef<ProfilesMsg>,
    seq: u64,
    event: &CustomerEvent,
) -> Result<Option<ProfileId>, StoreError> {
    let index = &ctx.index;
    let usable: Vec<&Identifier> = event.identifiers.iter().filter(|i| !index.rules.is_blocked(i)).collect();
    for blocked in event.identifiers.iter().filter(|i| index.rules.is_blocked(i)) {
        ctx.metrics.identity_blocked.with_label_values(&[blocked.kind.as_str()]).inc();
    }
    if usable.is_empty() {
        return Ok(None);
    }
    let mut roots = BTreeSet::new();
    let mut unowned = Vec::new();
    for id in usable.iter().copied() {
        match index.owner(id).await? {
            Some(owner) => {
                roots.insert(index.root(&owner).await?);
            }
            None => unowned.push(id),
        }
    }
    let created = roots.is_empty();
    let mut target = match roots.first() {
        Some(p) => p.clone(),
        None => ProfileId::derive_from_event(&event.event_id, event.received_at),
    };
    for id in unowned {
        if let Err(other) = index.claim(id, &target) {
            // Another shard claimed it first: that profile is this student too.
            roots.insert(index.root(&other).await?);
        }
    }
    roots.insert(target.clone());
    if let Some(first) = roots.first() {
        target = first.clone();
    }
    if created && roots.len() == 1 {
        index.known_roots.insert(target.clone());
        index.created.insert(target.clone());
        ctx.metrics.profiles_created.inc();
    }
    for merged in roots.iter().filter(|p| **p != target) {
        let evidence: Vec<Identifier> = usable.iter().map(|i| (*i).clone()).collect();
        tracing::info!(survivor = %target, merged = %merged, seq, "profiles merged");
        index.record_merge(IdentityMerged {
            survivor: target.clone(),
            merged: merged.clone(),
            evidence,
            at: Utc::now(),
            seq,
        });
        ctx.metrics.identity_merges.inc();
        directory
            .send_message(ProfilesMsg::Deliver {
                profile_id: merged.clone(),
                msg: ProfileMsg::MergeInto { survivor: target.clone() },
            })
            .map_err(|e| StoreError::unavailable(format!("profile directory unavailable: {e}")))?;
    }
    if roots.len() > 1 {
        for id in &usable {
            index.repoint(id, &target);
        }
    }
    Ok(Some(target))
}

/// One shard of the resolver pool.
pub struct IdentityResolver;

pub struct IdentityResolverArgs {
    pub ctx: PipelineContext,
    pub directory: Slot<ProfilesMsg>,
}

pub struct IdentityResolverState {
    ctx: PipelineContext,
    directory: Slot<ProfilesMsg>,
}

pub type IdentityFactoryMsg = FactoryMessage<String, IdentityMsg>;

impl Worker for IdentityResolver {
    type Key = String;
    type Message = IdentityMsg;
    type State = IdentityResolverState;
    type Arguments = IdentityResolverArgs;

    async fn pre_start(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<IdentityFactoryMsg>,
        args: IdentityResolverArgs,
    ) -> Result<IdentityResolverState, ActorProcessingErr> {
        Ok(IdentityResolverState { ctx: args.ctx, directory: args.directory })
    }

    async fn handle(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<IdentityFactoryMsg>,
        job: Job<String, IdentityMsg>,
        state: &mut IdentityResolverState,
    ) -> Result<String, ActorProcessingErr> {
        let IdentityMsg::Resolve { seq, event } = job.msg;
        let directory = state.directory.get().ok_or("profile directory is not running")?;
        let mut backoff = Duration::from_millis(20);
        let target = loop {
            match resolve_event(&state.ctx, &directory, seq, &event).await {
                Ok(t) => break t,
                Err(e) if e.is_retryable() => {
                    // Backpressure: hold this shard until the store answers again.
                    tracing::warn!(seq, error = %e, backoff_ms = backoff.as_millis() as u64, "identity store unavailable, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    dead_letters::record_event(&state.ctx, DeadLetterStage::Identity, &event, &e.to_string(), 1).await;
                    break None;
                }
            }
        };
        match target {
            Some(profile_id) => {
                // The directory marks it delivered when it takes the message: only then is the
                // event certain to be covered by the directory's next flush.
                directory.send_message(ProfilesMsg::Deliver { profile_id, msg: ProfileMsg::Apply { seq, event } })?;
                return Ok(job.key);
            }
            None if event.identifiers.is_empty() => {
                dead_letters::record_event(
                    &state.ctx,
                    DeadLetterStage::Identity,
                    &event,
                    "event carries no identifier",
                    1,
                )
                .await;
            }
            None if event.identifiers.iter().all(|i| state.ctx.index.rules.is_blocked(i)) => {
                dead_letters::record_event(
                    &state.ctx,
                    DeadLetterStage::Identity,
                    &event,
                    "every identifier of the event is blocked (test or placeholder data, see identity.blocked)",
                    1,
                )
                .await;
            }
            None => {}
        }
        state.ctx.watermark.delivered(seq);
        Ok(job.key)
    }
}

struct ResolverBuilder {
    ctx: PipelineContext,
    directory: Slot<ProfilesMsg>,
}

impl WorkerBuilder<IdentityResolver, IdentityResolverArgs> for ResolverBuilder {
    fn build(&mut self, _wid: WorkerId) -> (IdentityResolver, IdentityResolverArgs) {
        (IdentityResolver, IdentityResolverArgs { ctx: self.ctx.clone(), directory: self.directory.clone() })
    }
}

pub type IdentityFactory = Factory<
    String,
    IdentityMsg,
    IdentityResolverArgs,
    IdentityResolver,
    KeyPersistentRouting<String, IdentityMsg>,
    DefaultQueue<String, IdentityMsg>,
>;

/// Starts the resolver pool under `supervisor`; the factory replaces crashed workers itself.
pub async fn spawn_identity_pool(
    ctx: PipelineContext,
    directory: Slot<ProfilesMsg>,
    shards: usize,
    supervisor: ActorCell,
) -> Result<ActorRef<IdentityFactoryMsg>, SpawnErr> {
    let args = FactoryArguments {
        worker_builder: Box::new(ResolverBuilder { ctx, directory }),
        num_initial_workers: shards,
        router: KeyPersistentRouting::default(),
        queue: DefaultQueue::default(),
        discard_handler: None,
        discard_settings: ractor::factory::DiscardSettings::None,
        dead_mans_switch: None,
        capacity_controller: None,
        lifecycle_hooks: None,
        stats: None,
    };
    let (factory, _) = Actor::spawn_linked(None, IdentityFactory::default(), args, supervisor).await?;
    Ok(factory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_numbers_and_listed_values_are_blocked() {
        let rules = IdentityRules {
            blocked: HashSet::from([Identifier::new(IdentifierKind::Email, "test@example.com")]),
            placeholder_phones: true,
        };
        let phone = |v: &str| Identifier::new(IdentifierKind::Phone, v);
        for placeholder in ["+491111111111", "+10000000000", "+49123456789", "+4998765432", "+33666666666"] {
            assert!(rules.is_blocked(&phone(placeholder)), "{placeholder}");
        }
        assert!(rules.is_blocked(&Identifier::new(IdentifierKind::WhatsappId, "+491111111111")));
        for real in ["+4915123456789", "+493012345678", "+441632960961"] {
            assert!(!rules.is_blocked(&phone(real)), "{real}");
        }
        assert!(rules.is_blocked(&Identifier::new(IdentifierKind::Email, "test@example.com")));
        assert!(!rules.is_blocked(&Identifier::new(IdentifierKind::Email, "max@gmail.com")));
        assert!(!rules.is_blocked(&Identifier::new(IdentifierKind::DeviceId, "1111111111")), "only phones");
        let off = IdentityRules { placeholder_phones: false, ..rules };
        assert!(!off.is_blocked(&phone("+491111111111")));
    }
}
