//! The golden record of one student, as persisted and as served by the Profile API.

use crate::event::{CustomerEvent, EventKind};
use crate::ids::{EventId, Identifier, ProfileId, Source};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Contact fields: Salesforce is their source of truth (slide 7).
pub const CONTACT_TRAITS: &[&str] =
    &["email", "phone", "first_name", "last_name", "name", "enrollment_status", "application_stage"];

/// Behaviour fields: only the website and the app may set them.
pub const BEHAVIOUR_TRAITS: &[&str] =
    &["last_page_path", "last_screen", "last_utm_campaign", "app_version", "platform"];

/// One trait value with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    pub value: Value,
    pub source: Source,
    pub updated_at: DateTime<Utc>,
}

/// An identifier linked to a profile, with the source that first showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedIdentifier {
    #[serde(flatten)]
    pub identifier: Identifier,
    pub source: Source,
    pub first_seen: DateTime<Utc>,
}

/// A bounded history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    pub event_id: EventId,
    pub source: Source,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
}

/// Basic counters, exact under replay because events are applied once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileCounters {
    pub events_total: u64,
    pub by_source: BTreeMap<Source, u64>,
    pub by_kind: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
}

/// The persisted state of one student's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub profile_id: ProfileId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub identifiers: Vec<LinkedIdentifier>,
    pub traits: BTreeMap<String, TraitValue>,
    pub counters: ProfileCounters,
    #[serde(default)]
    pub recent_events: VecDeque<EventSummary>,
    /// Journal sequence numbers applied after the last pipeline checkpoint. Replay after a crash
    /// starts at the checkpoint; these make re-applying an event a no-op.
    #[serde(default)]
    pub applied_seqs: BTreeSet<u64>,
    /// Set when this profile was merged into another; the record then only redirects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<ProfileId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<ProfileId>,
    /// What undoing this profile's recent merges needs (see [`MergeLedger`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<MergeLedger>,
    /// Profiles an unmerge declared to be other students: identifiers never link them again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub kept_apart: BTreeSet<ProfileId>,
    /// What computed traits and segment rules are derived from.
    #[serde(default, skip_serializing_if = "Activity::is_empty")]
    pub activity: Activity,
    /// Consent as the events stated it, by channel or category (`email`, `whatsapp`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, ConsentState>,
    /// Real-time segments the profile is in, with when it entered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, DateTime<Utc>>,
}

/// How long activity is remembered, and how much of it per key.
pub const ACTIVITY_DAYS: i64 = 90;
pub const ACTIVITY_PER_KEY: usize = 500;

/// Distinct activity keys and all-time topics a profile keeps: every word of a page path is a
/// topic, and a sender of made-up paths would otherwise grow a profile without end. Keys past
/// the bound are not noted; those already kept go on counting.
pub const MAX_ACTIVITY_KEYS: usize = 2_000;

/// Words of one path taken as topics (`/programs/mba/...`: the first ones say what it is).
const MAX_PATH_TOPICS: usize = 16;

/// Recent activity by key, oldest first: `page` and `page:TOPIC` (page and screen views),
/// `event:NAME` (track events, name folded to lower case), `email:open`, `email:click`, `login`.
/// Pruned by age relative to the newest activity (not the clock), so replays give the same state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Unix milliseconds: compact, and quick to write on every flush.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recent: BTreeMap<String, Vec<i64>>,
    /// All-time page views by topic (most frequent, unique lists).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topics: BTreeMap<String, u64>,
    #[serde(default)]
    pub sentiment_sum: f64,
    #[serde(default)]
    pub sentiment_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_login: Option<DateTime<Utc>>,
}

impl Activity {
    pub fn is_empty(&self) -> bool {
        self.recent.is_empty() && self.topics.is_empty() && self.sentiment_count == 0 && self.last_login.is_none()
    }

    fn note(&mut self, key: String, at: DateTime<Utc>) {
        let at = at.timestamp_millis();
        if self.recent.len() >= MAX_ACTIVITY_KEYS && !self.recent.contains_key(&key) {
            return;
        }
        let list = self.recent.entry(key).or_default();
        let pos = list.partition_point(|t| *t <= at);
        list.insert(pos, at);
        if list.len() > ACTIVITY_PER_KEY {
            list.remove(0);
        }
    }

    fn prune(&mut self) {
        let Some(newest) = self.recent.values().filter_map(|l| l.last()).max().copied() else { return };
        let cutoff = newest - ACTIVITY_DAYS * 86_400_000;
        self.recent.retain(|_, l| {
            let old = l.partition_point(|t| *t < cutoff);
            l.drain(..old);
            !l.is_empty()
        });
    }

    /// Timestamps (Unix milliseconds) of `key` at or after `since`.
    pub fn since(&self, key: &str, since: DateTime<Utc>) -> &[i64] {
        // Rounded up: an item one fraction of a millisecond before the bound is outside it.
        let since =
            since.timestamp_micros().div_euclid(1000) + i64::from(since.timestamp_micros().rem_euclid(1000) != 0);
        match self.recent.get(key) {
            Some(l) => &l[l.partition_point(|t| *t < since)..],
            None => &[],
        }
    }

    fn absorb(&mut self, other: Activity) {
        for (key, times) in other.recent {
            if self.recent.len() >= MAX_ACTIVITY_KEYS && !self.recent.contains_key(&key) {
                continue;
            }
            let list = self.recent.entry(key).or_default();
            list.extend(times);
            list.sort_unstable();
            let excess = list.len().saturating_sub(ACTIVITY_PER_KEY);
            list.drain(..excess);
        }
        for (topic, n) in other.topics {
            if self.topics.len() < MAX_ACTIVITY_KEYS || self.topics.contains_key(&topic) {
                *self.topics.entry(topic).or_default() += n;
            }
        }
        self.sentiment_sum += other.sentiment_sum;
        self.sentiment_count += other.sentiment_count;
        self.last_login = self.last_login.max(other.last_login);
        self.prune();
    }
}

/// One consent decision carried by events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentState {
    pub granted: bool,
    /// Where the decision came from: a source (`web`, `crm`, `whatsapp`, ...) or what an API
    /// caller named (`support_ticket`).
    pub source: String,
    pub at: DateTime<Utc>,
    /// 1 for the first decision on this channel, then one more per change.
    #[serde(default)]
    pub version: u64,
    /// `consent` (the default), `contract`, `legal_obligation`, `legitimate_interest`, ...
    #[serde(default = "default_legal_basis")]
    pub legal_basis: String,
}

fn default_legal_basis() -> String {
    "consent".into()
}

/// Channels and purposes consent is recorded for through the API.
pub const CONSENT_KEYS: &[&str] = &["email", "whatsapp", "sms", "push", "analytics", "advertising"];

/// Legal bases of GDPR Art. 6(1), as consent decisions name them.
pub const LEGAL_BASES: &[&str] =
    &["consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interest"];

impl ProfileRecord {
    /// Records a decision on a channel or purpose; returns false when it changes nothing.
    pub fn set_consent(
        &mut self,
        key: &str,
        granted: bool,
        source: &str,
        legal_basis: &str,
        at: DateTime<Utc>,
    ) -> bool {
        let version = match self.consent.get(key) {
            Some(c) if c.granted == granted && c.legal_basis == legal_basis => return false,
            Some(c) if c.at > at => return false,
            Some(c) => c.version + 1,
            None => 1,
        };
        self.consent.insert(
            key.to_string(),
            ConsentState { granted, source: source.to_string(), at, version, legal_basis: legal_basis.to_string() },
        );
        true
    }
}

/// Track event names that mean a login.
const LOGIN_EVENTS: &[&str] = &["logged in", "signed in", "login", "log in", "sign in"];

/// Lower case, single spaces: how event names and topics are keyed.
pub fn fold_key(s: &str) -> String {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The topics of a page or screen view: its category and the words of its path
/// (`/programs/mba/curriculum` → programs, mba, curriculum).
pub fn page_topics(event: &CustomerEvent) -> BTreeSet<String> {
    let mut topics = BTreeSet::new();
    if let Some(c) = event.properties.get("category").and_then(Value::as_str) {
        let c = fold_key(c);
        if !c.is_empty() {
            topics.insert(c);
        }
    }
    if let Some(path) = event.properties.get("path").and_then(Value::as_str) {
        let words = path.split(['/', '?', '#', '&', '=']).map(fold_key);
        for part in
            words.filter(|p| !p.is_empty() && !p.chars().all(|c| c.is_ascii_digit() || c == ' ')).take(MAX_PATH_TOPICS)
        {
            topics.insert(part);
        }
    }
    topics
}

/// The state a profile had before its oldest undoable merge and everything that changed it
/// since, so a merge can be undone exactly: each side rebuilt with its own events and traits.
/// Bounded by `identity.unmerge_window` events; older entries are folded into `base`, which
/// makes the merges among them final.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeLedger {
    pub base: Box<ProfileRecord>,
    pub entries: Vec<LedgerEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerEntry {
    /// Resolution decided to merge `merged` in; events after this may be either student's.
    Merging {
        merged: ProfileId,
    },
    Applied {
        seq: u64,
        event: Box<CustomerEvent>,
    },
    Absorbed {
        record: Box<ProfileRecord>,
    },
}

/// Why a merge could not be undone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnmergeError {
    #[error("profile {0} was not merged into this profile")]
    NotMerged(ProfileId),
    #[error("the merge of {0} is older than the unmerge window (identity.unmerge_window); it is final")]
    Final(ProfileId),
    #[error("profile {merged} was merged into {via}, not directly into this profile: unmerge {via} first")]
    Nested { merged: ProfileId, via: ProfileId },
}

/// The two profiles an unmerge leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub survivor: ProfileRecord,
    pub restored: ProfileRecord,
}

impl ProfileRecord {
    pub fn new(profile_id: ProfileId, now: DateTime<Utc>) -> Self {
        Self {
            profile_id,
            created_at: now,
            updated_at: now,
            identifiers: Vec::new(),
            traits: BTreeMap::new(),
            counters: ProfileCounters::default(),
            recent_events: VecDeque::new(),
            applied_seqs: BTreeSet::new(),
            merged_into: None,
            merged_from: Vec::new(),
            ledger: None,
            kept_apart: BTreeSet::new(),
            activity: Activity::default(),
            consent: BTreeMap::new(),
            segments: BTreeMap::new(),
        }
    }

    /// Links an identifier; returns whether it was new to this profile.
    pub fn link(&mut self, identifier: &Identifier, source: Source, at: DateTime<Utc>) -> bool {
        if self.identifiers.iter().any(|l| &l.identifier == identifier) {
            return false;
        }
        self.identifiers.push(LinkedIdentifier { identifier: identifier.clone(), source, first_seen: at });
        true
    }

    /// Applies one trait by the golden-record rules: Salesforce wins contact fields, web and app
    /// own behaviour fields, otherwise the most recent value wins.
    pub fn set_trait(&mut self, name: &str, value: Value, source: Source, at: DateTime<Utc>) -> bool {
        if BEHAVIOUR_TRAITS.contains(&name) && !source.is_behavioural() {
            return false;
        }
        if let Some(existing) = self.traits.get(name) {
            let contact = CONTACT_TRAITS.contains(&name);
            let existing_wins = if contact && existing.source == Source::Crm && source != Source::Crm {
                true
            } else if contact && source == Source::Crm && existing.source != Source::Crm {
                false
            } else {
                existing.updated_at > at
            };
            // Salesforce claims a contact field even when the value is unchanged, so a later
            // non-CRM value cannot override it.
            let crm_claims = contact && source == Source::Crm && existing.source != Source::Crm;
            if existing_wins || (existing.value == value && !crm_claims) {
                return false;
            }
        }
        self.traits.insert(name.to_string(), TraitValue { value, source, updated_at: at });
        true
    }

    /// Applies an event: traits, counters and history. Returns false if it was already applied.
    pub fn apply(&mut self, seq: u64, event: &CustomerEvent, history_limit: usize) -> bool {
        if !self.applied_seqs.insert(seq) {
            return false;
        }
        if let Some(ledger) = self.ledger.as_mut() {
            ledger.entries.push(LedgerEntry::Applied { seq, event: Box::new(event.clone()) });
        }
        self.apply_fields(event, history_limit);
        true
    }

    fn apply_activity(&mut self, event: &CustomerEvent) {
        let at = event.occurred_at;
        let a = &mut self.activity;
        match event.kind {
            EventKind::Page | EventKind::Screen => {
                a.note("page".into(), at);
                for topic in page_topics(event) {
                    a.note(format!("page:{topic}"), at);
                    if a.topics.len() < MAX_ACTIVITY_KEYS || a.topics.contains_key(&topic) {
                        *a.topics.entry(topic).or_default() += 1;
                    }
                }
            }
            EventKind::Track => {
                if let Some(name) = event.name.as_deref().map(fold_key).filter(|n| !n.is_empty()) {
                    if LOGIN_EVENTS.contains(&name.as_str()) {
                        a.last_login = a.last_login.max(Some(at));
                        a.note("login".into(), at);
                    }
                    a.note(format!("event:{name}"), at);
                }
            }
            EventKind::EmailActivity => {
                if let Some(kind @ ("open" | "click")) = event.name.as_deref() {
                    a.note(format!("email:{kind}"), at);
                }
            }
            _ => {}
        }
        // WhatsApp messages' own score in [-1, 1] only: another source's `sentiment` property
        // (a survey's 1-5, a 1e308) is not it, and an infinite sum stored as JSON `null` made
        // the whole profile unreadable.
        if let Some(s) = event.properties.get("sentiment").and_then(Value::as_f64) {
            if event.source == Source::Whatsapp && s.is_finite() {
                a.sentiment_sum += s.clamp(-1.0, 1.0);
                a.sentiment_count += 1;
            }
        }
        a.prune();
        // Consent: an explicit change (unsubscribe, STOP, Salesforce opt-out) or a consent object
        // (Segment `context.consent.categoryPreferences`); the latest decision per key wins.
        let mut decisions: Vec<(String, bool)> = Vec::new();
        if let Some(change) = event.properties.get("consent_change") {
            if let (Some(channel), Some(status)) =
                (change.get("channel").and_then(Value::as_str), change.get("status").and_then(Value::as_str))
            {
                decisions.push((fold_key(channel), status == "opted_in"));
            }
        }
        if let Some(Value::Object(prefs)) = event.properties.get("consent") {
            for (k, v) in prefs {
                if let Some(granted) = v.as_bool() {
                    decisions.push((fold_key(k), granted));
                }
            }
        }
        for (key, granted) in decisions.into_iter().filter(|(k, _)| !k.is_empty()) {
            self.set_consent(&key, granted, event.source.as_str(), "consent", at);
        }
    }

    fn apply_fields(&mut self, event: &CustomerEvent, history_limit: usize) {
        self.apply_activity(event);
        for id in &event.identifiers {
            self.link(id, event.source, event.occurred_at);
        }
        for (k, v) in &event.traits {
            if !v.is_null() {
                self.set_trait(k, v.clone(), event.source, event.occurred_at);
            }
        }
        if event.source.is_behavioural() {
            if let Some(path) = event.properties.get("path").and_then(Value::as_str) {
                if event.kind == EventKind::Page {
                    self.set_trait("last_page_path", Value::from(path), event.source, event.occurred_at);
                }
            }
            if event.kind == EventKind::Screen {
                if let Some(name) = &event.name {
                    self.set_trait("last_screen", Value::from(name.as_str()), event.source, event.occurred_at);
                }
            }
            if let Some(c) = &event.utm.campaign {
                self.set_trait("last_utm_campaign", Value::from(c.as_str()), event.source, event.occurred_at);
            }
        }
        let c = &mut self.counters;
        c.events_total += 1;
        *c.by_source.entry(event.source).or_default() += 1;
        *c.by_kind.entry(event.kind.as_str().to_string()).or_default() += 1;
        c.first_seen = Some(c.first_seen.map_or(event.occurred_at, |f| f.min(event.occurred_at)));
        c.last_seen = Some(c.last_seen.map_or(event.occurred_at, |l| l.max(event.occurred_at)));
        self.push_history(
            EventSummary {
                event_id: event.event_id.clone(),
                source: event.source,
                kind: event.kind,
                name: event.name.clone(),
                occurred_at: event.occurred_at,
                received_at: event.received_at,
                properties: event.properties.clone(),
            },
            history_limit,
        );
        self.updated_at = self.updated_at.max(event.received_at);
    }

    /// Keeps history sorted newest first and bounded.
    fn push_history(&mut self, entry: EventSummary, limit: usize) {
        let pos = self.recent_events.iter().position(|e| e.occurred_at <= entry.occurred_at);
        match pos {
            Some(i) => self.recent_events.insert(i, entry),
            None => self.recent_events.push_back(entry),
        }
        while self.recent_events.len() > limit.max(1) {
            self.recent_events.pop_back();
        }
    }

    /// Absorbs a merged profile: identifiers, traits by the same rules, counters added (each
    /// event was applied to exactly one of the two), histories interleaved.
    pub fn absorb(&mut self, other: ProfileRecord, history_limit: usize) -> bool {
        if other.profile_id == self.profile_id || self.merged_from.contains(&other.profile_id) {
            return false;
        }
        let ledger = self.ledger.take();
        let mut ledger = ledger.unwrap_or_else(|| MergeLedger { base: Box::new(self.clone()), entries: Vec::new() });
        ledger.entries.push(LedgerEntry::Absorbed { record: Box::new(other.clone()) });
        self.absorb_fields(other, history_limit);
        self.ledger = Some(ledger);
        true
    }

    /// Opens the ledger for a merge resolution has just decided, before the merged profile's
    /// state arrives: the events applied meanwhile (the linking event first) can then be told
    /// apart by an unmerge.
    pub fn begin_merge(&mut self, merged: &ProfileId) {
        if self.merged_from.contains(merged) {
            return;
        }
        if self.ledger.is_none() {
            self.ledger = Some(MergeLedger { base: Box::new(self.clone()), entries: Vec::new() });
        }
        let Some(ledger) = self.ledger.as_mut() else { return };
        let open = ledger.entries.iter().any(|e| matches!(e, LedgerEntry::Merging { merged: m } if m == merged));
        if !open {
            ledger.entries.push(LedgerEntry::Merging { merged: merged.clone() });
        }
    }

    fn absorb_fields(&mut self, other: ProfileRecord, history_limit: usize) {
        self.kept_apart.extend(other.kept_apart.iter().cloned());
        self.activity.absorb(other.activity);
        // Consent after a merge is the most restrictive: a refusal on either side stands.
        for (key, theirs) in other.consent {
            let keep_ours =
                self.consent.get(&key).is_some_and(|ours| !ours.granted || theirs.granted && ours.at >= theirs.at);
            if !keep_ours {
                self.consent.insert(key, theirs);
            }
        }
        for l in other.identifiers {
            self.link(&l.identifier, l.source, l.first_seen);
        }
        for (k, t) in other.traits {
            self.set_trait(&k, t.value, t.source, t.updated_at);
        }
        let c = &mut self.counters;
        c.events_total += other.counters.events_total;
        for (s, n) in other.counters.by_source {
            *c.by_source.entry(s).or_default() += n;
        }
        for (k, n) in other.counters.by_kind {
            *c.by_kind.entry(k).or_default() += n;
        }
        c.first_seen = match (c.first_seen, other.counters.first_seen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        c.last_seen = match (c.last_seen, other.counters.last_seen) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for e in other.recent_events {
            self.push_history(e, history_limit);
        }
        self.applied_seqs.extend(other.applied_seqs);
        self.merged_from.push(other.profile_id);
        self.merged_from.extend(other.merged_from);
        self.created_at = self.created_at.min(other.created_at);
        self.updated_at = self.updated_at.max(other.updated_at);
    }

    /// Keeps at most `window` applied events in the ledger by folding the oldest entries into
    /// its base; a merge folded in is final. Drops the ledger once no merge is left in it.
    pub fn trim_ledger(&mut self, window: usize, history_limit: usize) {
        let Some(ledger) = self.ledger.as_mut() else { return };
        let mut applied = ledger.entries.iter().filter(|e| matches!(e, LedgerEntry::Applied { .. })).count();
        let mut folded = 0;
        for entry in &ledger.entries {
            let merges_left = ledger.entries[folded..]
                .iter()
                .any(|e| matches!(e, LedgerEntry::Absorbed { .. } | LedgerEntry::Merging { .. }));
            if applied <= window && merges_left {
                break;
            }
            match entry {
                LedgerEntry::Applied { event, .. } => {
                    ledger.base.apply_fields(event, history_limit);
                    applied -= 1;
                }
                LedgerEntry::Absorbed { record } => ledger.base.absorb_fields((**record).clone(), history_limit),
                LedgerEntry::Merging { .. } => {}
            }
            folded += 1;
        }
        ledger.entries.drain(..folded);
        if ledger.entries.is_empty() {
            self.ledger = None;
        }
    }

    /// Undoes the merge of `merged` into this profile: rebuilds this profile from the ledger
    /// without it, and `merged` from its record at the merge plus the later events that belong
    /// to it (by their strongest identifier, as resolution would have placed them). Identifiers
    /// of the other side are left out of each side's events.
    pub fn unmerge(&self, merged: &ProfileId, history_limit: usize, now: DateTime<Utc>) -> Result<Split, UnmergeError> {
        let Some(ledger) = &self.ledger else {
            return Err(if self.merged_from.contains(merged) {
                UnmergeError::Final(merged.clone())
            } else {
                UnmergeError::NotMerged(merged.clone())
            });
        };
        let absorbed = ledger
            .entries
            .iter()
            .position(|e| matches!(e, LedgerEntry::Absorbed { record } if &record.profile_id == merged));
        let Some(absorbed) = absorbed else {
            let via = ledger.entries.iter().find_map(|e| match e {
                LedgerEntry::Absorbed { record } if record.merged_from.contains(merged) => {
                    Some(record.profile_id.clone())
                }
                _ => None,
            });
            return Err(match via {
                Some(via) => UnmergeError::Nested { merged: merged.clone(), via },
                None if self.merged_from.contains(merged) => UnmergeError::Final(merged.clone()),
                None => UnmergeError::NotMerged(merged.clone()),
            });
        };
        let LedgerEntry::Absorbed { record } = &ledger.entries[absorbed] else {
            return Err(UnmergeError::NotMerged(merged.clone()));
        };
        // Events after the merge was decided may be either student's.
        let position = ledger
            .entries
            .iter()
            .position(|e| matches!(e, LedgerEntry::Merging { merged: m } if m == merged))
            .unwrap_or(absorbed);
        let mut restored = (**record).clone();
        restored.merged_into = None;
        let mut theirs: BTreeSet<Identifier> = restored.identifiers.iter().map(|l| l.identifier.clone()).collect();
        let mut survivor = (*ledger.base).clone();
        survivor.ledger = None;
        // Kept apart since the base (an earlier unmerge, a reviewer's no) still holds; what only
        // the merged side brought goes with it (the merges that stay add theirs back).
        survivor.kept_apart = self
            .kept_apart
            .iter()
            .filter(|p| !record.kept_apart.contains(*p) || ledger.base.kept_apart.contains(*p))
            .cloned()
            .collect();
        let mut ours: BTreeSet<Identifier> =
            survivor.identifiers.iter().map(|l| l.identifier.clone()).filter(|i| !theirs.contains(i)).collect();
        for (i, entry) in ledger.entries.iter().enumerate() {
            match entry {
                LedgerEntry::Absorbed { .. } if i == absorbed => {}
                LedgerEntry::Merging { merged: m } if m == merged => {}
                LedgerEntry::Merging { merged: m } => survivor.begin_merge(m),
                LedgerEntry::Absorbed { record } => {
                    ours.extend(record.identifiers.iter().map(|l| l.identifier.clone()));
                    survivor.absorb((**record).clone(), history_limit);
                }
                LedgerEntry::Applied { seq, event } => {
                    // As resolution orders them: strongest kind first, then the greater value.
                    let strongest = event.identifiers.iter().max_by_key(|i| (i.kind.strength(), &i.value));
                    let to_restored = i > position && strongest.is_some_and(|s| theirs.contains(s));
                    let (side, own, other) = if to_restored {
                        (&mut restored, &mut theirs, &ours)
                    } else {
                        (&mut survivor, &mut ours, &theirs)
                    };
                    let mut event = (**event).clone();
                    event.identifiers.retain(|id| !other.contains(id));
                    own.extend(event.identifiers.iter().cloned());
                    side.applied_seqs.remove(seq);
                    side.apply(*seq, &event, history_limit);
                }
            }
        }
        // Identifiers the base learned from the merged side (a linking event applied before
        // the ledger opened) are not the survivor's.
        survivor.identifiers.retain(|l| !theirs.contains(&l.identifier));
        survivor.kept_apart.insert(merged.clone());
        restored.kept_apart.insert(self.profile_id.clone());
        survivor.updated_at = now;
        restored.updated_at = now;
        Ok(Split { survivor, restored })
    }

    pub fn view(&self) -> ProfileView {
        ProfileView {
            profile_id: self.profile_id.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            identifiers: self.identifiers.clone(),
            traits: self.traits.clone(),
            counters: self.counters.clone(),
            merged_from: self.merged_from.clone(),
            recent_events: self.recent_events.len(),
            consent: self.consent.clone(),
            segments: self.segments.clone(),
            computed: Map::new(),
        }
    }
}

/// What the Profile API returns for a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileView {
    pub profile_id: ProfileId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub identifiers: Vec<LinkedIdentifier>,
    pub traits: BTreeMap<String, TraitValue>,
    pub counters: ProfileCounters,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<ProfileId>,
    /// Number of events held in the recent history (see `/events`).
    pub recent_events: usize,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, ConsentState>,
    /// Real-time segments, with when the profile entered each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, DateTime<Utc>>,
    /// Computed traits at the time of the answer.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub computed: Map<String, Value>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{RawRef, Utm};
    use crate::ids::IdentifierKind;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).single().unwrap_or_default()
    }

    /// An identify event from `source` at `secs` past a fixed time (also used by other modules' tests).
    pub(crate) fn event(source: Source, id: &str, secs: i64, traits: &[(&str, &str)]) -> CustomerEvent {
        CustomerEvent {
            event_id: EventId::new(source, id),
            source,
            kind: EventKind::Identify,
            name: None,
            occurred_at: at(secs),
            received_at: at(secs),
            identifiers: vec![Identifier::new(IdentifierKind::Email, "max@gmail.com")],
            traits: traits.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect(),
            properties: Map::new(),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    #[test]
    fn salesforce_wins_contact_fields_even_when_older() {
        let mut p = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("x"), at(0)), at(0));
        p.apply(1, &event(Source::Crm, "a", 10, &[("first_name", "Max")]), 10);
        p.apply(2, &event(Source::Web, "b", 20, &[("first_name", "Maxi"), ("city", "Berlin")]), 10);
        assert_eq!(p.traits["first_name"].value, Value::from("Max"));
        // an equal value from Salesforce still makes Salesforce the owner
        p.apply(5, &event(Source::Web, "e", 21, &[("last_name", "Muster")]), 10);
        p.apply(6, &event(Source::Crm, "f", 22, &[("last_name", "Muster")]), 10);
        assert_eq!(p.traits["last_name"].source, Source::Crm);
        p.apply(7, &event(Source::Web, "g", 23, &[("last_name", "Other")]), 10);
        assert_eq!(p.traits["last_name"].value, Value::from("Muster"));
        assert_eq!(p.traits["city"].value, Value::from("Berlin"));
        // most recent wins for non-contact fields
        p.apply(3, &event(Source::Email, "c", 30, &[("city", "Hamburg")]), 10);
        assert_eq!(p.traits["city"].value, Value::from("Hamburg"));
        p.apply(4, &event(Source::Web, "d", 5, &[("city", "Munich")]), 10);
        assert_eq!(p.traits["city"].value, Value::from("Hamburg"));
    }

    /// A sender of made-up page paths cannot grow a profile without bound: a path gives at most
    /// 16 topics, and a profile keeps at most MAX_ACTIVITY_KEYS of them and of activity keys.
    #[test]
    fn page_paths_cannot_grow_a_profile_without_bound() {
        let mut p = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("t"), at(0)), at(0));
        let long: String = (0..100).map(|i| format!("/w{i}")).collect();
        let view = |id: &str, path: &str| CustomerEvent {
            kind: EventKind::Page,
            properties: [("path".to_string(), serde_json::json!(path))].into_iter().collect(),
            ..event(Source::Web, id, 1, &[])
        };
        p.apply(1, &view("long", &long), 10);
        assert_eq!(p.activity.topics.len(), 16);
        for i in 0..3_000u64 {
            p.apply(10 + i, &view(&format!("v{i}"), &format!("/made-up-{i}")), 10);
        }
        assert!(p.activity.topics.len() <= MAX_ACTIVITY_KEYS, "{}", p.activity.topics.len());
        assert!(p.activity.recent.len() <= MAX_ACTIVITY_KEYS, "{}", p.activity.recent.len());
        // A topic already kept goes on counting.
        p.apply(9_999, &view("again", "/w0"), 10);
        assert_eq!(p.activity.topics["w0"], 2);
        // Nor does a merge of two full profiles grow it past the bound.
        let mut q = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("u"), at(0)), at(0));
        for i in 0..2_500u64 {
            q.apply(20_000 + i, &view(&format!("q{i}"), &format!("/other-{i}")), 10);
        }
        p.absorb(q, 10);
        assert!(p.activity.topics.len() <= MAX_ACTIVITY_KEYS, "{}", p.activity.topics.len());
        assert!(p.activity.recent.len() <= MAX_ACTIVITY_KEYS, "{}", p.activity.recent.len());
    }

    /// Only WhatsApp messages' scores count towards the sentiment average, bounded to [-1, 1]:
    /// a web event's 1e308 would make the sum infinite and the stored profile unreadable.
    #[test]
    fn only_whatsapp_sentiment_in_range_is_averaged_and_the_record_stays_storable() {
        let mut p = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("s"), at(0)), at(0));
        let with = |source, id: &str, s: f64| CustomerEvent {
            properties: [("sentiment".to_string(), serde_json::json!(s))].into_iter().collect(),
            ..event(source, id, 1, &[])
        };
        p.apply(1, &with(Source::Web, "w1", 1e308), 10);
        p.apply(2, &with(Source::Web, "w2", 1e308), 10);
        p.apply(3, &with(Source::Whatsapp, "m1", 0.5), 10);
        p.apply(4, &with(Source::Whatsapp, "m2", 7.0), 10);
        assert_eq!((p.activity.sentiment_count, p.activity.sentiment_sum), (2, 1.5));
        let json = serde_json::to_vec(&p).unwrap();
        let back: ProfileRecord = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.activity.sentiment_sum, 1.5);
    }

    #[test]
    fn applying_twice_counts_once_and_history_is_bounded_newest_first() {
        let mut p = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("x"), at(0)), at(0));
        for i in 0..5u64 {
            assert!(p.apply(i, &event(Source::Web, &i.to_string(), i as i64, &[]), 3));
        }
        assert!(!p.apply(2, &event(Source::Web, "2", 2, &[]), 3));
        assert_eq!(p.counters.events_total, 5);
        assert_eq!(p.recent_events.len(), 3);
        assert_eq!(p.recent_events[0].occurred_at, at(4));
    }

    #[test]
    fn absorb_adds_counters_and_keeps_salesforce_contact_fields() {
        let mut a = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("a"), at(0)), at(0));
        let mut b = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("b"), at(1)), at(1));
        a.apply(1, &event(Source::Web, "1", 50, &[("phone", "+491")]), 10);
        b.apply(2, &event(Source::Crm, "2", 10, &[("phone", "+492")]), 10);
        let b_id = b.profile_id.clone();
        assert!(a.absorb(b.clone(), 10));
        assert!(!a.absorb(b, 10), "absorbing the same profile twice must be a no-op");
        assert_eq!(a.counters.events_total, 2);
        assert_eq!(a.traits["phone"].value, Value::from("+492"));
        assert_eq!(a.merged_from, vec![b_id]);
    }

    fn person(source: Source, id: &str, secs: i64, ids: &[Identifier], traits: &[(&str, &str)]) -> CustomerEvent {
        CustomerEvent { identifiers: ids.to_vec(), ..event(source, id, secs, traits) }
    }

    fn email(v: &str) -> Identifier {
        Identifier::new(IdentifierKind::Email, v)
    }

    fn device(v: &str) -> Identifier {
        Identifier::new(IdentifierKind::DeviceId, v)
    }

    #[test]
    fn unmerge_rebuilds_each_side_with_its_own_events_and_traits() {
        let (a_id, b_id) = (
            ProfileId::derive_from_event(&EventId::from_raw("a"), at(0)),
            ProfileId::derive_from_event(&EventId::from_raw("b"), at(1)),
        );
        let mut a = ProfileRecord::new(a_id.clone(), at(0));
        a.apply(1, &person(Source::Web, "1", 1, &[email("anna@uni.eu")], &[("city", "Berlin")]), 50);
        let mut b = ProfileRecord::new(b_id.clone(), at(1));
        b.apply(2, &person(Source::Mobile, "2", 2, &[device("tablet-1")], &[("city", "Wien")]), 50);
        // The bridging event: Anna's email on Ben's tablet.
        let bridge = person(Source::Web, "3", 3, &[email("anna@uni.eu"), device("tablet-1")], &[]);
        // As the pipeline orders it: resolution opens the merge, the linking event is applied,
        // then the merged profile's state arrives.
        a.begin_merge(&b_id);
        a.apply(3, &bridge, 50);
        a.absorb(b.clone(), 50);
        a.apply(4, &person(Source::Mobile, "4", 4, &[device("tablet-1")], &[("city", "Graz")]), 50);
        a.apply(5, &person(Source::Web, "5", 5, &[email("anna@uni.eu")], &[("first_name", "Anna")]), 50);
        assert_eq!(a.counters.events_total, 5);
        assert_eq!(a.traits["city"].value, Value::from("Graz"));

        let split = a.unmerge(&b_id, 50, at(9)).unwrap_or_else(|e| panic!("{e}"));
        let (s, r) = (split.survivor, split.restored);
        assert_eq!((s.counters.events_total, r.counters.events_total), (3, 2));
        assert_eq!(s.traits["city"].value, Value::from("Berlin"));
        assert_eq!(s.traits["first_name"].value, Value::from("Anna"));
        assert_eq!(r.traits["city"].value, Value::from("Graz"));
        assert!(!r.traits.contains_key("first_name"));
        let ids = |p: &ProfileRecord| p.identifiers.iter().map(|l| l.identifier.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&s), vec![email("anna@uni.eu")]);
        assert_eq!(ids(&r), vec![device("tablet-1")]);
        assert!(s.merged_from.is_empty() && r.merged_into.is_none());
        assert!(s.kept_apart.contains(&b_id) && r.kept_apart.contains(&a_id));
        let events = |p: &ProfileRecord| p.recent_events.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(events(&r), vec![EventId::new(Source::Mobile, "4"), EventId::new(Source::Mobile, "2")]);
        assert_eq!(s.recent_events.len(), 3);
        assert!(s.ledger.is_none(), "no merge left to undo");
    }

    /// Undoing a merge takes back what the merged side was kept apart from: it is not the
    /// survivor's own decision.
    #[test]
    fn unmerge_leaves_the_survivor_kept_apart_only_from_what_it_was_itself() {
        let ids: Vec<ProfileId> =
            (0..4).map(|i| ProfileId::derive_from_event(&EventId::from_raw(format!("k{i}")), at(i))).collect();
        let (s_id, r_id, q_id, x_id) = (&ids[0], &ids[1], &ids[2], &ids[3]);
        let mut s = ProfileRecord::new(s_id.clone(), at(0));
        s.apply(1, &person(Source::Web, "1", 1, &[email("s@uni.eu")], &[]), 50);
        s.kept_apart.insert(x_id.clone());
        // R was split from Q earlier.
        let mut r = ProfileRecord::new(r_id.clone(), at(1));
        r.apply(2, &person(Source::Web, "2", 2, &[email("r@uni.eu")], &[]), 50);
        r.kept_apart.insert(q_id.clone());
        s.absorb(r, 50);
        assert!(s.kept_apart.contains(q_id));
        let split = s.unmerge(r_id, 50, at(9)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!split.survivor.kept_apart.contains(q_id), "{:?}", split.survivor.kept_apart);
        assert!(split.survivor.kept_apart.contains(x_id) && split.survivor.kept_apart.contains(r_id));
        assert!(split.restored.kept_apart.contains(q_id) && split.restored.kept_apart.contains(s_id));
    }

    #[test]
    fn merges_beyond_the_window_become_final_and_others_stay_undoable() {
        let ids: Vec<ProfileId> =
            (0..3).map(|i| ProfileId::derive_from_event(&EventId::from_raw(i.to_string()), at(i))).collect();
        let mut a = ProfileRecord::new(ids[0].clone(), at(0));
        a.apply(1, &person(Source::Web, "1", 1, &[email("a@uni.eu")], &[]), 50);
        let mut b = ProfileRecord::new(ids[1].clone(), at(1));
        b.apply(2, &person(Source::Web, "2", 2, &[email("b@uni.eu")], &[]), 50);
        a.absorb(b, 50);
        for seq in 10..15 {
            a.apply(seq, &person(Source::Web, &seq.to_string(), seq as i64, &[email("a@uni.eu")], &[]), 50);
        }
        let mut c = ProfileRecord::new(ids[2].clone(), at(2));
        c.apply(3, &person(Source::Web, "3", 3, &[email("c@uni.eu")], &[]), 50);
        a.absorb(c, 50);
        a.trim_ledger(2, 50);
        assert_eq!(a.unmerge(&ids[1], 50, at(20)), Err(UnmergeError::Final(ids[1].clone())));
        let split = a.unmerge(&ids[2], 50, at(20)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(split.survivor.counters.events_total, 7);
        assert_eq!(split.restored.counters.events_total, 1);
        let stranger = ProfileId::derive_from_event(&EventId::from_raw("x"), at(5));
        assert_eq!(a.unmerge(&stranger, 50, at(20)), Err(UnmergeError::NotMerged(stranger)));
    }

    #[test]
    fn a_window_bound_a_fraction_of_a_millisecond_after_an_item_leaves_it_out() {
        let mut a = Activity::default();
        let t = at(100);
        a.note("page".into(), t);
        assert_eq!(a.since("page", t).len(), 1);
        assert_eq!(a.since("page", t + chrono::Duration::microseconds(400)).len(), 0);
        assert_eq!(a.since("page", t - chrono::Duration::microseconds(400)).len(), 1);
    }
}
