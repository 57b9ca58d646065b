//! Deterministic identity resolution: a shared identity index and a sharded pool of
//! IdentityResolver workers (a ractor factory; the dispatcher shards events by identifier key).

use crate::context::PipelineContext;
use crate::dead_letters;
use crate::normalize::{compare_given_names, normalize_name, GivenNames};
use chrono::NaiveDate;
use chrono::Utc;
use cohort_adapters::{EventBus, OperationalStore, StoreError};
use cohort_messages::msgs::{
    IdentityEvent, IdentityMerged, IdentityMsg, IdentityUnmerged, MergeReason, ProfileMsg, ProfilesMsg,
};
use cohort_messages::{CustomerEvent, DeadLetterStage, Identifier, IdentifierKind, ProfileId, ProfileRecord};
use cohort_supervisors::{PipelineStages, Slot};
use dashmap::{DashMap, DashSet};
use parking_lot::Mutex;
use ractor::factory::{
    queues::DefaultQueue,
    routing::{CustomHashFunction, CustomRouting},
    Factory, FactoryArguments, FactoryMessage, Job, Worker, WorkerBuilder, WorkerId,
};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
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
    /// Most distinct values of a kind one profile may hold (`user_id = 1`: one account each).
    pub max_values_per_profile: HashMap<IdentifierKind, usize>,
    /// Most profiles one identifier of a kind may link before it stops linking (`device_id = 3`).
    pub max_profiles_per_identifier: HashMap<IdentifierKind, usize>,
}

impl IdentityRules {
    /// Whether a profile holding `held` (values of limited kinds) can also hold `more`.
    pub fn fits(&self, held: &[Identifier], more: &[Identifier]) -> bool {
        self.max_values_per_profile.iter().all(|(kind, max)| {
            let values: HashSet<&str> =
                held.iter().chain(more).filter(|i| i.kind == *kind).map(|i| i.value.as_str()).collect();
            values.len() <= *max
        })
    }

    pub fn is_limited(&self, kind: IdentifierKind) -> bool {
        self.max_values_per_profile.contains_key(&kind)
    }

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
    let all: Vec<u8> = e164.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
    // A placeholder's last six digits are a run whatever the country code: real numbers, almost
    // all of them, fail this before the (costly) parse.
    let tail = all.get(all.len().saturating_sub(6)..).unwrap_or_default();
    let run = |d: &[u8]| {
        d.windows(2).all(|w| w[0] == w[1])
            || d.windows(2).all(|w| (w[0] + 1) % 10 == w[1])
            || d.windows(2).all(|w| (w[1] + 1) % 10 == w[0])
    };
    if tail.len() < 6 || !run(tail) {
        return false;
    }
    let input = e164.to_string();
    // The parser has internal unwraps on some inputs; resolution must never panic on one.
    let code = std::panic::catch_unwind(move || phonenumber::parse(None, &input).ok().map(|n| n.code().value()))
        .ok()
        .flatten();
    let repeated = |d: &[u8]| d.len() >= 6 && d.windows(2).all(|w| w[0] == w[1]);
    let Some(code) = code else {
        // Not a number the metadata can parse: only a repeated digit after a country code counts.
        return (1..=3).any(|cc| repeated(all.get(cc..).unwrap_or_default()));
    };
    let national = all.get(code.to_string().len()..).unwrap_or_default();
    national.len() >= 6 && run(national)
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
    /// Per live profile, its identifiers of kinds with a per-profile limit.
    limited: DashMap<ProfileId, Vec<Identifier>>,
    /// Per identifier of a kind with a per-identifier limit, the profiles it was found linking.
    sightings: DashMap<Identifier, BTreeSet<ProfileId>>,
    /// Per live profile, the profiles an unmerge declared to be other students.
    apart: DashMap<ProfileId, BTreeSet<ProfileId>>,
    /// Unmerges not yet persisted and published (merges are in `merges`).
    unmerges: Mutex<Vec<IdentityUnmerged>>,
    /// Persisted identity events the bus has not taken yet (retried with the next flush).
    unpublished: Mutex<Vec<IdentityEvent>>,
    /// Per live profile, the person fields that tell two people sharing a phone apart.
    persons: DashMap<ProfileId, Person>,
}

/// The person fields resolution compares before linking through a shareable identifier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Person {
    /// Folded (see `normalize_name`).
    pub first_name: Option<String>,
    pub date_of_birth: Option<NaiveDate>,
}

impl Person {
    /// From traits as events and records carry them (`first_name`, `date_of_birth` as
    /// `YYYY-MM-DD`).
    pub fn from_traits<'a>(get: impl Fn(&str) -> Option<&'a serde_json::Value>) -> Self {
        let text = |k: &str| get(k).and_then(serde_json::Value::as_str);
        Self {
            first_name: text("first_name").and_then(normalize_name),
            date_of_birth: text("date_of_birth").and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.first_name.is_none() && self.date_of_birth.is_none()
    }

    /// Fields of `self`, else of `other`.
    fn or(&self, other: Option<&Person>) -> Person {
        Person {
            first_name: self.first_name.clone().or_else(|| other.and_then(|o| o.first_name.clone())),
            date_of_birth: self.date_of_birth.or_else(|| other.and_then(|o| o.date_of_birth)),
        }
    }

    /// Two different people for sure: two different known given names (not a nickname, not a
    /// possible typo), or two birthdays too far apart to be a slip of the keyboard.
    pub fn conflicts_with(&self, other: &Person) -> bool {
        let names = match (&self.first_name, &other.first_name) {
            (Some(a), Some(b)) => compare_given_names(a, b) == GivenNames::Different,
            _ => false,
        };
        let birthdays = match (self.date_of_birth, other.date_of_birth) {
            (Some(a), Some(b)) => {
                use chrono::Datelike;
                let swapped = a.year() == b.year() && a.day() == b.month() && a.month() == b.day();
                a != b && !swapped && (a - b).num_days().abs() > 1
            }
            _ => false,
        };
        names || birthdays
    }
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
            limited: DashMap::new(),
            sightings: DashMap::new(),
            apart: DashMap::new(),
            unmerges: Mutex::new(Vec::new()),
            unpublished: Mutex::new(Vec::new()),
            persons: DashMap::new(),
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

    /// GDPR erasure: forgets the person in memory (their identifiers, their profiles as owners,
    /// roots, redirects and merge state, and unpersisted claims and merges naming them), and
    /// remembers the identifiers as absent so no lookup brings them back from a stale cache.
    pub fn forget(&self, profiles: &[ProfileId], identifiers: &[Identifier]) {
        let theirs = |p: &ProfileId| profiles.contains(p);
        self.owners.retain(|i, p| !theirs(p) && !identifiers.contains(i));
        self.redirects.retain(|from, to| !theirs(from) && !theirs(to));
        for p in profiles {
            self.known_roots.remove(p);
            self.created.remove(p);
            self.limited.remove(p);
            self.apart.remove(p);
            self.persons.remove(p);
        }
        for mut seen in self.sightings.iter_mut() {
            seen.retain(|p| !theirs(p));
        }
        self.sightings.retain(|i, seen| !seen.is_empty() && !identifiers.contains(i));
        for mut apart in self.apart.iter_mut() {
            apart.retain(|p| !theirs(p));
        }
        self.dirty.lock().retain(|i, p| !theirs(p) && !identifiers.contains(i));
        self.merges.lock().retain(|m| !theirs(&m.survivor) && !theirs(&m.merged));
        self.unmerges.lock().retain(|u| !theirs(&u.survivor) && !theirs(&u.restored));
        for i in identifiers {
            self.absent.insert(i.clone());
        }
    }

    /// Whether `profile` was created by this process and never loaded: then the store has no
    /// record of it and its actor can start empty. Answers true once.
    pub fn take_created(&self, profile: &ProfileId) -> bool {
        self.created.remove(profile).is_some()
    }

    /// The identifiers of limited kinds `profile` holds, as far as this process knows (profiles
    /// read from the store are known from their record, see [`IdentityIndex::root`]).
    fn limited_values(&self, profile: &ProfileId) -> Vec<Identifier> {
        self.limited.get(profile).map(|v| v.clone()).unwrap_or_default()
    }

    fn note_limited(&self, profile: &ProfileId, mut held: Vec<Identifier>) {
        held.retain(|i| self.rules.is_limited(i.kind));
        held.sort();
        held.dedup();
        if !held.is_empty() {
            self.limited.insert(profile.clone(), held);
        }
    }

    /// Records that `id` (with `owner`) was found in an event placed on `target`, and says
    /// whether it has linked more profiles than its kind allows (then it links no more).
    fn saturated(&self, id: &Identifier, owner: &ProfileId, target: &ProfileId) -> bool {
        let Some(max) = self.rules.max_profiles_per_identifier.get(&id.kind) else { return false };
        let mut seen = self.sightings.entry(id.clone()).or_default();
        seen.insert(owner.clone());
        seen.insert(target.clone());
        seen.len() > *max
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
        self.root_from(profile, false).await
    }

    /// [`IdentityIndex::root`] without what this process took for a root: a merge another
    /// replica made reaches this one only through the store.
    pub async fn refresh_root(&self, profile: &ProfileId) -> Result<ProfileId, StoreError> {
        self.root_from(profile, true).await
    }

    /// `fresh`: the store, not `known_roots`, says whether the profile redirects reaches is a root.
    async fn root_from(&self, profile: &ProfileId, fresh: bool) -> Result<ProfileId, StoreError> {
        let mut current = profile.clone();
        for _ in 0..64 {
            if let Some(next) = self.redirects.get(&current).map(|r| r.clone()) {
                current = next;
                continue;
            }
            if !fresh && self.known_roots.contains(&current) {
                return Ok(current);
            }
            match self.store.load_profile(&current).await? {
                Some(rec) => match rec.merged_into {
                    Some(next) => {
                        self.redirects.insert(current.clone(), next.clone());
                        current = next;
                    }
                    None => {
                        if !self.limited.contains_key(&current) {
                            let values = rec.identifiers.iter().map(|l| l.identifier.clone()).collect();
                            self.note_limited(&current, values);
                        }
                        if !rec.kept_apart.is_empty() {
                            self.apart.entry(current.clone()).or_default().extend(rec.kept_apart);
                        }
                        self.note_person(&current, Person::from_traits(|k| rec.traits.get(k).map(|t| &t.value)));
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

    /// Takes a merge another replica made, learned from the merged profile's actor: the next
    /// `root` of `merged` is `survivor`, without asking the store.
    pub fn learn_redirect(&self, merged: &ProfileId, survivor: &ProfileId) {
        if merged != survivor {
            self.known_roots.remove(merged);
            self.redirects.insert(merged.clone(), survivor.clone());
        }
    }

    fn record_merge(&self, merged: IdentityMerged) {
        if let Some((_, values)) = self.limited.remove(&merged.merged) {
            let mut all = self.limited_values(&merged.survivor);
            all.extend(values);
            self.note_limited(&merged.survivor, all);
        }
        if let Some((_, apart)) = self.apart.remove(&merged.merged) {
            self.apart.entry(merged.survivor.clone()).or_default().extend(apart);
        }
        self.known_roots.remove(&merged.merged);
        self.redirects.insert(merged.merged.clone(), merged.survivor.clone());
        self.merges.lock().push(merged);
    }

    /// Remembers a profile's person fields (from a flushed record or an event placed on it).
    pub fn note_person(&self, profile: &ProfileId, person: Person) {
        if person.is_empty() {
            return;
        }
        let mut entry = self.persons.entry(profile.clone()).or_default();
        *entry = person.or(Some(&entry));
    }

    /// Whether the person an event describes (with what is known of the profile it lands on)
    /// is not the person of `other`.
    fn different_person(&self, event: &Person, anchor: &ProfileId, other: &ProfileId) -> bool {
        let Some(theirs) = self.persons.get(other).map(|p| p.clone()) else { return false };
        let ours = event.or(self.persons.get(anchor).as_deref());
        ours.conflicts_with(&theirs)
    }

    /// Whether an unmerge declared one of `group` and `other` to be different students.
    fn kept_apart(&self, group: &BTreeSet<ProfileId>, other: &ProfileId) -> bool {
        let theirs = self.apart.get(other);
        group.iter().any(|p| {
            theirs.as_ref().is_some_and(|t| t.contains(p)) || self.apart.get(p).is_some_and(|a| a.contains(other))
        })
    }

    /// Whether an unmerge declared these two (live) profiles to be different students.
    pub fn kept_apart_pair(&self, a: &ProfileId, b: &ProfileId) -> bool {
        self.kept_apart(&BTreeSet::from([a.clone()]), b)
    }

    /// Merges two live profiles on a decision (a review approval, an automatic probabilistic
    /// match): the older survives. `Ok(None)` when they already are one profile; refused when an
    /// unmerge kept them apart or together they would exceed a per-profile identifier limit.
    pub async fn merge_pair(
        &self,
        a: &ProfileId,
        b: &ProfileId,
        reason: MergeReason,
    ) -> Result<Option<IdentityMerged>, MergeRefused> {
        let a = self.root(a).await.map_err(|e| MergeRefused::Unavailable(e.to_string()))?;
        let b = self.root(b).await.map_err(|e| MergeRefused::Unavailable(e.to_string()))?;
        if a == b {
            return Ok(None);
        }
        if self.kept_apart(&BTreeSet::from([a.clone()]), &b) {
            return Err(MergeRefused::KeptApart);
        }
        if !self.rules.fits(&self.limited_values(&a), &self.limited_values(&b)) {
            return Err(MergeRefused::ProfileLimit);
        }
        let (survivor, merged) = if a < b { (a, b) } else { (b, a) };
        let merge = IdentityMerged { survivor, merged, evidence: Vec::new(), at: Utc::now(), seq: 0, reason };
        self.record_merge(merge.clone());
        Ok(Some(merge))
    }

    /// Takes the split an unmerge computed into the graph: the restored profile owns its
    /// identifiers again, no longer redirects, and the two are kept apart from now on.
    pub fn unmerge(&self, survivor: &ProfileRecord, restored: &ProfileRecord) {
        let (s, r) = (&survivor.profile_id, &restored.profile_id);
        self.redirects.remove(r);
        self.known_roots.insert(r.clone());
        self.known_roots.insert(s.clone());
        for (record, id) in [(survivor, s), (restored, r)] {
            for l in &record.identifiers {
                self.repoint(&l.identifier, id);
            }
            self.limited.remove(id);
            self.note_limited(id, record.identifiers.iter().map(|l| l.identifier.clone()).collect());
            self.apart.insert(id.clone(), record.kept_apart.clone());
            // Each side is again only the person its own record describes: the survivor kept
            // the merged student's name, and refused its own student's next event as another.
            self.persons.remove(id);
            self.note_person(id, Person::from_traits(|k| record.traits.get(k).map(|t| &t.value)));
        }
        self.unmerges.lock().push(IdentityUnmerged { survivor: s.clone(), restored: r.clone(), at: Utc::now() });
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

    /// Unmerges not yet published, taken by the flush that persists them.
    pub fn take_unmerges(&self) -> Vec<IdentityUnmerged> {
        std::mem::take(&mut *self.unmerges.lock())
    }

    /// Publishes identity events a flush persisted, with any a previous attempt could not
    /// publish; on failure they wait for the next flush (in memory: a restart loses them, the
    /// store's merge records and audit log keep the facts).
    pub async fn publish_identity_events(&self, bus: &dyn EventBus, events: Vec<IdentityEvent>) {
        let pending = {
            let mut u = self.unpublished.lock();
            u.extend(events);
            std::mem::take(&mut *u)
        };
        if pending.is_empty() {
            return;
        }
        if let Err(e) = bus.publish_identity(&pending).await {
            tracing::warn!(error = %e, events = pending.len(), "identity events not published; retrying with the next flush");
            let mut u = self.unpublished.lock();
            let newer = std::mem::take(&mut *u);
            *u = pending;
            u.extend(newer);
        }
    }

    /// Puts back unmerges a failed flush took.
    pub fn restore_unmerges(&self, taken: Vec<IdentityUnmerged>) {
        let mut u = self.unmerges.lock();
        let newer = std::mem::take(&mut *u);
        *u = taken;
        u.extend(newer);
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
///
/// The event's strongest identifier decides where it belongs (its profile, or a new one). Every
/// other identifier links its profile too, unless that would give one profile more distinct
/// values of a kind than `identity.max_values_per_profile` allows (two user ids: two students
/// on one device) or the identifier has already linked more profiles than
/// `identity.max_profiles_per_identifier` allows (a shared family phone): then it links nothing
/// and stays with the profile it had. Of the profiles linked, the oldest survives.
pub async fn resolve_event(
    ctx: &PipelineContext,
    directory: &ActorRef<ProfilesMsg>,
    seq: u64,
    event: &CustomerEvent,
) -> Result<Option<Placement>, StoreError> {
    let index = &ctx.index;
    let (mut usable, blocked): (Vec<&Identifier>, Vec<&Identifier>) =
        event.identifiers.iter().partition(|i| !index.rules.is_blocked(i));
    for b in blocked {
        ctx.metrics.identity_blocked.with_label_values(&[b.kind.as_str()]).inc();
    }
    if usable.is_empty() {
        return Ok(None);
    }
    usable.sort_by(|a, b| (b.kind.strength(), &b.value).cmp(&(a.kind.strength(), &a.value)));
    let mut owned: Vec<(&Identifier, ProfileId)> = Vec::new();
    let mut unowned: Vec<&Identifier> = Vec::new();
    for id in usable.iter().copied() {
        match index.owner(id).await? {
            Some(owner) => owned.push((id, index.root(&owner).await?)),
            None => unowned.push(id),
        }
    }
    let fresh = ProfileId::derive_from_event(&event.event_id, event.received_at);
    let anchor = match owned.first() {
        Some((id, root)) if std::ptr::eq(*id, usable[0]) => root.clone(),
        _ => fresh.clone(),
    };
    let person = Person::from_traits(|k| event.traits.get(k));
    // The profiles this event links, and the limited values they would hold together.
    let mut linked = BTreeSet::from([anchor.clone()]);
    let mut held = index.limited_values(&anchor);
    let mut links: Vec<&Identifier> = Vec::new();
    let refuse = |id: &Identifier, reason: &str| {
        ctx.metrics.identity_links_refused.with_label_values(&[id.kind.as_str(), reason]).inc();
    };
    for id in unowned.iter().copied() {
        if index.rules.fits(&held, std::slice::from_ref(id)) {
            held.push(id.clone());
            links.push(id);
        } else {
            refuse(id, "profile_limit");
        }
    }
    for (id, root) in &owned {
        if linked.contains(root) {
            links.push(id);
            continue;
        }
        if index.kept_apart(&linked, root) {
            refuse(id, "kept_apart");
            continue;
        }
        // Before the sharing limit: a sibling told apart by name does not use up the phone.
        if id.kind.can_be_shared() && index.different_person(&person, &anchor, root) {
            refuse(id, "different_person");
            continue;
        }
        if index.saturated(id, root, &anchor) {
            refuse(id, "shared_identifier");
            continue;
        }
        let theirs = index.limited_values(root);
        if index.rules.fits(&held, &theirs) {
            held.extend(theirs);
            linked.insert(root.clone());
            links.push(id);
        } else {
            refuse(id, "profile_limit");
        }
    }
    let mut target = linked.first().cloned().unwrap_or_else(|| anchor.clone());
    let claimable: Vec<&Identifier> = unowned.iter().copied().filter(|i| links.contains(i)).collect();
    for id in claimable {
        match index.claim(id, &target) {
            Ok(()) => {}
            Err(other) => {
                // Another shard claimed it first: that profile is this student too, if it fits.
                let other = index.root(&other).await?;
                let theirs = index.limited_values(&other);
                let allowed = index.rules.fits(&held, &theirs) && !index.kept_apart(&linked, &other);
                if linked.contains(&other) || allowed {
                    held.extend(theirs);
                    linked.insert(other);
                } else {
                    // Refused, it is not this profile's: kept in `links`, it would be recorded
                    // here and even repointed away from the student who claimed it.
                    refuse(id, "profile_limit");
                    links.retain(|l| *l != id);
                }
            }
        }
    }
    if let Some(first) = linked.first() {
        target = first.clone();
    }
    if linked.len() == 1 && target == fresh {
        index.known_roots.insert(target.clone());
        index.created.insert(target.clone());
        ctx.metrics.profiles_created.inc();
    }
    index.note_limited(&target, held);
    index.note_person(&target, person);
    // The event's own new id, when the event links existing profiles, was never a profile: no
    // state, no record, nothing to merge or to undo later.
    for merged in linked.iter().filter(|p| **p != target && **p != fresh) {
        let evidence: Vec<Identifier> = links.iter().map(|i| (*i).clone()).collect();
        tracing::info!(survivor = %target, merged = %merged, seq, "profiles merged");
        index.record_merge(IdentityMerged {
            survivor: target.clone(),
            merged: merged.clone(),
            evidence,
            at: Utc::now(),
            seq,
            reason: MergeReason::SharedIdentifier,
        });
        ctx.metrics.identity_merges.inc();
        send_merge(directory, &target, merged)
            .map_err(|e| StoreError::unavailable(format!("profile directory unavailable: {e}")))?;
    }
    if linked.len() > 1 {
        for id in &links {
            index.repoint(id, &target);
        }
    }
    let unlinked = event.identifiers.iter().filter(|i| !links.contains(i)).cloned().collect();
    Ok(Some(Placement { profile: target, unlinked }))
}

/// Drops an erased person's event in the resolver: counted, and delivered as far as the
/// checkpoint is concerned.
fn drop_erased(ctx: &PipelineContext, seq: u64) {
    ctx.metrics.gdpr_suppressed_events.with_label_values(&["resolver"]).inc();
    ctx.watermark.delivered(seq);
}

/// Tells the survivor a merge is coming (so it can tell later events apart on an unmerge), then
/// the merged profile to hand its state over.
pub fn send_merge(
    directory: &ActorRef<ProfilesMsg>,
    survivor: &ProfileId,
    merged: &ProfileId,
) -> Result<(), ractor::MessagingErr<ProfilesMsg>> {
    directory.send_message(ProfilesMsg::Deliver {
        profile_id: survivor.clone(),
        msg: ProfileMsg::BeginMerge { merged: merged.clone() },
    })?;
    directory.send_message(ProfilesMsg::Deliver {
        profile_id: merged.clone(),
        msg: ProfileMsg::MergeInto { survivor: survivor.clone() },
    })
}

/// Why a decided merge was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeRefused {
    #[error("an unmerge declared these profiles to be different students")]
    KeptApart,
    #[error("together they would hold more identifiers of a kind than identity.max_values_per_profile allows")]
    ProfileLimit,
    #[error("identity store unavailable: {0}")]
    Unavailable(String),
}

/// The identity events a flush persisted, for the bus.
pub fn identity_events(merges: &[IdentityMerged], unmerges: &[IdentityUnmerged]) -> Vec<IdentityEvent> {
    merges
        .iter()
        .cloned()
        .map(IdentityEvent::IdentityMerged)
        .chain(unmerges.iter().cloned().map(IdentityEvent::IdentityUnmerged))
        .collect()
}

/// Where an event belongs, and which of its identifiers did not link there (blocked, or over a
/// limit): those are not the profile's and are left out of what the profile records.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub profile: ProfileId,
    pub unlinked: Vec<Identifier>,
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

pub type IdentityFactoryMsg = FactoryMessage<usize, IdentityMsg>;

/// The shard that resolves an event: every event with the same routing key goes to the same
/// worker, in journal order, so two events of one new student cannot race to create two profiles.
pub fn shard_of(event: &CustomerEvent, shards: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    event.routing_key().hash(&mut hasher);
    (hasher.finish() % shards.max(1) as u64) as usize
}

/// Routes a shard's batch to the worker with that number (the factory's workers are 0..shards).
#[derive(Debug, Clone, Copy, Default)]
pub struct ByShard;

impl CustomHashFunction<usize> for ByShard {
    fn hash(&self, shard: &usize, worker_count: usize) -> usize {
        shard % worker_count.max(1)
    }
}

impl Worker for IdentityResolver {
    type Key = usize;
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
        job: Job<usize, IdentityMsg>,
        state: &mut IdentityResolverState,
    ) -> Result<usize, ActorProcessingErr> {
        let IdentityMsg::Resolve { events } = job.msg;
        let directory = state.directory.get().ok_or("profile directory is not running")?;
        // One event at a time, each delivered before the next is resolved, as when every
        // event was a job of its own: other shards see this one's claims and merges at once.
        for (seq, event) in events {
            place(&state.ctx, &directory, seq, event).await?;
        }
        Ok(job.key)
    }
}

/// Resolves one journaled event and delivers it; an event that reaches no profile (erased,
/// unplaceable) is settled here.
async fn place(
    ctx: &PipelineContext,
    directory: &ActorRef<ProfilesMsg>,
    seq: u64,
    mut event: Arc<CustomerEvent>,
) -> Result<(), ActorProcessingErr> {
    PipelineStages::observe(&ctx.metrics.stages.resolved, event.received_at, 1);
    match ctx.erasures.screen(&event) {
        crate::gdpr::Screen::Keep => {}
        // An erased person's event already on the bus (a replay, a redelivery): dropped
        // before it can re-create the profile.
        crate::gdpr::Screen::Drop => {
            drop_erased(ctx, seq);
            return Ok(());
        }
        crate::gdpr::Screen::Strip(identifiers) => {
            event = Arc::new(CustomerEvent { identifiers, ..(*event).clone() });
        }
    }
    let span = tracing::debug_span!("identity.resolve", seq);
    crate::trace::continue_from(&span, event.trace.as_deref());
    if event.trace.is_some() {
        // The profile update continues from here.
        let mut traced = (*event).clone();
        traced.trace = crate::trace::of(&span);
        event = Arc::new(traced);
    }
    let mut backoff = Duration::from_millis(20);
    let target = loop {
        match resolve_event(ctx, directory, seq, &event).await {
            Ok(t) => break t,
            Err(e) if e.is_retryable() => {
                // Backpressure: hold this shard until the store answers again.
                tracing::warn!(seq, error = %e, backoff_ms = backoff.as_millis() as u64, "identity store unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                // An erasure may have run while the store was away: resolving now would give
                // the erased person a new profile.
                if ctx.erasures.suppresses(&event) {
                    drop_erased(ctx, seq);
                    return Ok(());
                }
            }
            Err(e) => {
                dead_letters::record_event(ctx, DeadLetterStage::Identity, &event, &e.to_string(), 1).await;
                ctx.watermark.delivered(seq);
                return Ok(());
            }
        }
    };
    match target {
        Some(Placement { profile: profile_id, unlinked }) => {
            let event = if unlinked.is_empty() {
                event
            } else {
                let mut own = (*event).clone();
                own.identifiers.retain(|i| !unlinked.contains(i));
                Arc::new(own)
            };
            // The directory marks it delivered when it takes the message: only then is the
            // event certain to be covered by the directory's next flush.
            directory.send_message(ProfilesMsg::Deliver { profile_id, msg: ProfileMsg::Apply { seq, event } })?;
        }
        // Nothing usable: no identifier at all, or only blocked ones.
        None => {
            let reason = if event.identifiers.is_empty() {
                "event carries no identifier"
            } else {
                "every identifier of the event is blocked (test or placeholder data, see identity.blocked)"
            };
            dead_letters::record_event(ctx, DeadLetterStage::Identity, &event, reason, 1).await;
            ctx.watermark.delivered(seq);
        }
    }
    Ok(())
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
    usize,
    IdentityMsg,
    IdentityResolverArgs,
    IdentityResolver,
    CustomRouting<usize, IdentityMsg, ByShard>,
    DefaultQueue<usize, IdentityMsg>,
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
        router: CustomRouting::new(ByShard),
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
    use cohort_messages::{EventId, EventKind, RawRef, Source, Utm};

    fn event_with(id: &str, identifiers: Vec<Identifier>) -> CustomerEvent {
        CustomerEvent {
            event_id: EventId::new(Source::Web, id),
            source: Source::Web,
            kind: EventKind::Track,
            name: None,
            occurred_at: Utc::now(),
            received_at: Utc::now(),
            identifiers,
            traits: Default::default(),
            properties: Default::default(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    /// A directory that records the kind of each message it takes, in order.
    struct Recorder;

    type Received = Arc<Mutex<Vec<&'static str>>>;

    impl Actor for Recorder {
        type Msg = ProfilesMsg;
        type State = Received;
        type Arguments = Received;

        async fn pre_start(&self, _me: ActorRef<ProfilesMsg>, got: Received) -> Result<Received, ActorProcessingErr> {
            Ok(got)
        }

        async fn handle(
            &self,
            _me: ActorRef<ProfilesMsg>,
            msg: ProfilesMsg,
            got: &mut Received,
        ) -> Result<(), ActorProcessingErr> {
            let kind = |m: &ProfileMsg| match m {
                ProfileMsg::Apply { .. } => "apply",
                ProfileMsg::BeginMerge { .. } => "begin_merge",
                ProfileMsg::MergeInto { .. } => "merge_into",
                _ => "other",
            };
            got.lock().push(match &msg {
                ProfilesMsg::Deliver { msg, .. } => kind(msg),
                _ => "other",
            });
            Ok(())
        }
    }

    /// After an unmerge each side is the person of its own record again: the survivor no
    /// longer carries the name it learned from the merged student.
    #[test]
    fn an_unmerge_gives_each_side_back_its_own_person() {
        let store = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let index = IdentityIndex::new(store);
        let id = |n: &str| ProfileId::derive_from_event(&EventId::new(Source::Web, n), Utc::now());
        let (s, r) = (id("s"), id("r"));
        let person = |name: &str| {
            let v = serde_json::Value::from(name);
            Person::from_traits(|k| (k == "first_name").then_some(&v))
        };
        // The merge taught the survivor (no name of its own) the merged student's name.
        index.note_person(&s, person("Christian"));
        let survivor = ProfileRecord::new(s.clone(), Utc::now());
        let mut restored = ProfileRecord::new(r.clone(), Utc::now());
        restored.set_trait("first_name", serde_json::Value::from("Christian"), Source::Web, Utc::now());
        index.unmerge(&survivor, &restored);
        let maria = person("Maria");
        assert!(!index.different_person(&maria, &s, &s), "S's own student may be Maria");
        assert!(index.different_person(&maria, &s, &r), "R is still Christian");
    }

    #[tokio::test]
    async fn a_resolver_delivers_each_event_of_a_batch_before_resolving_the_next() {
        let store = cohort_adapters::EmbeddedStore::in_memory().unwrap();
        let ctx = PipelineContext::for_tests(store);
        let got: Received = Arc::default();
        let (recorder, _) = Actor::spawn(None, Recorder, got.clone()).await.unwrap();
        let directory = Slot::default();
        directory.set(recorder.clone());
        let supervisor = Actor::spawn(None, Recorder, Arc::default()).await.unwrap().0;
        let pool = spawn_identity_pool(ctx.clone(), directory, 1, supervisor.get_cell()).await.unwrap();
        let anon = |v: &str| Identifier::new(IdentifierKind::AnonymousId, v);
        let user = |v: &str| Identifier::new(IdentifierKind::UserId, v);
        let events = [
            event_with("e1", vec![anon("a")]),            // a new profile: claims `a`
            event_with("e2", vec![anon("a")]),            // the same profile
            event_with("e3", vec![user("u"), anon("b")]), // a second profile: claims both
            event_with("e4", vec![anon("a"), anon("b")]), // merges the two: the merge goes first
            event_with("e5", vec![anon("a")]),            // the survivor
        ];
        let events: Vec<(u64, Arc<CustomerEvent>)> =
            events.into_iter().enumerate().map(|(n, e)| (n as u64 + 1, Arc::new(e))).collect();
        for (seq, _) in &events {
            ctx.watermark.dispatched(*seq);
        }
        pool.dispatch(0, IdentityMsg::Resolve { events }).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.lock().len() < 7 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*got.lock(), ["apply", "apply", "apply", "begin_merge", "merge_into", "apply", "apply"]);
        // The merge moved `a` and `b` to the survivor.
        let survivor = ctx.index.owner(&anon("a")).await.unwrap();
        assert_eq!(survivor, ctx.index.owner(&anon("b")).await.unwrap());
        pool.stop(None);
        recorder.stop(None);
        supervisor.stop(None);
    }

    #[test]
    fn events_sharing_their_strongest_identifier_go_to_one_shard_and_shards_go_to_their_worker() {
        let email = |v: &str| Identifier::new(IdentifierKind::Email, v);
        let anon = |v: &str| Identifier::new(IdentifierKind::AnonymousId, v);
        for shards in [1, 3, 4, 16] {
            // The strongest identifier decides, whatever else an event carries.
            let a = event_with("e1", vec![anon("a-1"), email("max@gmail.com")]);
            let b = event_with("e2", vec![email("max@gmail.com"), anon("a-2")]);
            assert_eq!(shard_of(&a, shards), shard_of(&b, shards));
            let used: HashSet<usize> =
                (0..200).map(|n| shard_of(&event_with("e", vec![email(&format!("s{n}@uni.de"))]), shards)).collect();
            assert_eq!(used, (0..shards).collect(), "{shards} shards");
            for shard in 0..shards {
                assert_eq!(ByShard.hash(&shard, shards), shard);
            }
        }
        // An event without identifiers still has a shard (whose worker dead-letters it).
        assert!(shard_of(&event_with("e3", vec![]), 4) < 4);
    }

    #[test]
    fn placeholder_numbers_and_listed_values_are_blocked() {
        let rules = IdentityRules {
            blocked: HashSet::from([Identifier::new(IdentifierKind::Email, "test@example.com")]),
            placeholder_phones: true,
            ..IdentityRules::default()
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

    #[test]
    fn people_conflict_on_different_known_names_or_far_apart_birthdays_only() {
        let p = |first: Option<&str>, dob: Option<(i32, u32, u32)>| Person {
            first_name: first.and_then(normalize_name),
            date_of_birth: dob.and_then(|(y, m, d)| NaiveDate::from_ymd_opt(y, m, d)),
        };
        assert!(p(Some("Christina"), None).conflicts_with(&p(Some("Christian"), None)));
        assert!(p(None, Some((2001, 2, 3))).conflicts_with(&p(Some("Ruth"), Some((2004, 5, 1)))));
        assert!(!p(Some("Max"), None).conflicts_with(&p(Some("Maximilian"), None)), "nickname");
        assert!(!p(Some("Katharina"), None).conflicts_with(&p(Some("Katharnia"), None)), "maybe a typo");
        assert!(
            !p(Some("Ruth"), Some((2001, 2, 3))).conflicts_with(&p(Some("RUTH"), Some((2001, 3, 2)))),
            "day and month swapped"
        );
        assert!(!p(None, Some((2001, 2, 3))).conflicts_with(&p(None, Some((2001, 2, 4)))), "one day off");
        assert!(!p(Some("Ruth"), None).conflicts_with(&p(None, Some((1999, 1, 1)))), "nothing to compare");
    }
}
