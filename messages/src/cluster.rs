//! Cluster membership: what each replica says about itself in the shared store.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The store's document collection of members, keyed by replica name.
pub const MEMBERS: &str = "cluster_members";

/// One replica's heartbeat record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// `HOSTNAME/pid/random`: unique per process, so a restarted replica is a new member.
    pub name: String,
    /// Where peers reach this replica's API.
    pub advertise_url: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// The bus partitions this replica consumes (`topic/partition`), as its consumer sees them.
    pub partitions: Vec<String>,
    /// Its supervision tree and store were healthy at the heartbeat.
    pub ready: bool,
    /// Supervised children not running at the heartbeat.
    pub failing: Vec<String>,
    /// Processed-event partitions assigned here whose previous holder may still hold them:
    /// listed in `partitions`, but not owned yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arriving: Vec<i32>,
}

impl MemberRecord {
    /// The partitions of `cdp.processed.events` it holds: the owner of their profiles.
    pub fn processed_partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.iter().filter_map(|p| {
            let (topic, n) = p.rsplit_once('/')?;
            topic.ends_with("cdp.processed.events").then(|| n.parse().ok()).flatten()
        })
    }

    /// A member is alive while its heartbeats are recent.
    pub fn is_alive(&self, now: DateTime<Utc>, ttl: chrono::Duration) -> bool {
        self.heartbeat_at.checked_add_signed(ttl).is_some_and(|until| until > now)
    }
}

/// Heartbeats and the membership listing.
#[derive(Debug)]
pub enum MembershipMsg {
    /// Write this replica's record (timer).
    Beat,
    /// Write it now if the partitions it lists have changed (a frequent timer): a replica handed
    /// a partition waits until its previous holder's record lets go of it.
    Watch,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_alive_until_its_heartbeat_is_older_than_the_ttl() {
        let now = Utc::now();
        let m = MemberRecord {
            name: "a/1/x".into(),
            advertise_url: "http://a:8080".into(),
            started_at: now,
            heartbeat_at: now - chrono::Duration::seconds(5),
            partitions: Vec::new(),
            ready: true,
            failing: Vec::new(),
            arriving: Vec::new(),
        };
        assert!(m.is_alive(now, chrono::Duration::seconds(10)));
        assert!(!m.is_alive(now, chrono::Duration::seconds(5)));
    }

    #[test]
    fn the_processed_partitions_a_member_lists_are_read_from_their_topic_names() {
        let m = MemberRecord {
            name: "a/1/x".into(),
            advertise_url: "http://a:8080".into(),
            started_at: Utc::now(),
            heartbeat_at: Utc::now(),
            partitions: [
                "t1.cdp.processed.events/2",
                "t1.cdp.raw.web/1",
                "cdp.processed.events/11",
                "cdp.processed.events/x",
            ]
            .map(String::from)
            .to_vec(),
            ready: true,
            failing: Vec::new(),
            arriving: Vec::new(),
        };
        assert_eq!(m.processed_partitions().collect::<Vec<_>>(), vec![2, 11]);
    }

    #[test]
    fn every_partition_gets_profiles_and_a_profile_always_the_same_one() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let id = crate::ProfileId::parse(&format!("prof_{i:024x}")).unwrap();
            let p = partition_of(&id, 6);
            assert_eq!(p, partition_of(&id, 6));
            assert!((0..6).contains(&p));
            seen.insert(p);
        }
        assert_eq!(seen.len(), 6);
    }

    /// The owner's directory learns whether an event was sent on by a merged profile: its
    /// arrival was counted at the first hop.
    #[test]
    fn a_routed_event_read_back_says_whether_a_merged_profile_sent_it_on() {
        use crate::msgs::{ProfileMsg, ProfilesMsg};
        let event = crate::profile::tests::event(crate::Source::Web, "e1", 0, &[]);
        let id = crate::ProfileId::derive_from_event(&event.event_id, event.received_at);
        let apply = ProfileMsg::Apply { seq: 1, event: std::sync::Arc::new(event) };
        let routed = RoutedChange::of(&id, &apply).unwrap();
        for (change, sent_on) in [(routed.clone(), false), (routed.forwarded(), true)] {
            let ProfilesMsg::DeliverRouted { forwarded, seq, msg: ProfileMsg::Apply { .. }, .. } =
                change.into_directory_msg(7)
            else {
                panic!("an Apply reads back as one")
            };
            assert_eq!((forwarded, seq), (sent_on, 7));
        }
    }
}

/// A change for one profile on `cdp.processed.events` in cluster mode, keyed (and partitioned)
/// by the profile id: the replica holding that partition owns the profile's actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedChange {
    pub profile_id: crate::ProfileId,
    pub change: RoutedKind,
}

/// The changes that travel between replicas (those without a reply channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoutedKind {
    Apply {
        event: Box<crate::CustomerEvent>,
        /// Sent on by a merged profile to its survivor: the same event id once more, on purpose
        /// (the profile stage's duplicate check must let it through).
        #[serde(default)]
        forwarded: bool,
    },
    BeginMerge {
        merged: crate::ProfileId,
    },
    MergeInto {
        survivor: crate::ProfileId,
    },
    Absorb {
        record: Box<crate::ProfileRecord>,
    },
    Restore {
        record: Box<crate::ProfileRecord>,
        from: crate::ProfileId,
    },
    Reevaluate,
    /// GDPR erasure: the owner stops the profile's actor, never writes it again, and confirms
    /// with a `gdpr_erase_acks` record `{request}:{profile_id}` the saga waits for. `request`
    /// names the saga and the attempt, so a late confirmation of an earlier attempt never
    /// stands for a later one.
    Erase {
        request: String,
    },
}

impl RoutedChange {
    /// The routable form of a profile message (`None` for queries and changes that carry a
    /// reply channel: those are answered where they are asked).
    pub fn of(profile_id: &crate::ProfileId, msg: &crate::msgs::ProfileMsg) -> Option<Self> {
        use crate::msgs::ProfileMsg as M;
        let change = match msg {
            M::Apply { event, .. } => RoutedKind::Apply { event: Box::new((**event).clone()), forwarded: false },
            M::BeginMerge { merged } => RoutedKind::BeginMerge { merged: merged.clone() },
            M::MergeInto { survivor } => RoutedKind::MergeInto { survivor: survivor.clone() },
            M::Absorb { record } => RoutedKind::Absorb { record: record.clone() },
            M::Restore { record, from } => RoutedKind::Restore { record: record.clone(), from: from.clone() },
            M::Reevaluate => RoutedKind::Reevaluate,
            _ => return None,
        };
        Some(Self { profile_id: profile_id.clone(), change })
    }

    /// The same change, marked as sent on by a merged profile.
    pub fn forwarded(mut self) -> Self {
        if let RoutedKind::Apply { forwarded, .. } = &mut self.change {
            *forwarded = true;
        }
        self
    }

    /// The directory message, with the position it was read from the topic at.
    pub fn into_directory_msg(self, seq: u64) -> crate::msgs::ProfilesMsg {
        use crate::msgs::ProfileMsg as M;
        let profile_id = self.profile_id;
        let forwarded = matches!(self.change, RoutedKind::Apply { forwarded: true, .. });
        let msg = match self.change {
            RoutedKind::Apply { event, .. } => M::Apply { seq, event: std::sync::Arc::new(*event) },
            RoutedKind::BeginMerge { merged } => M::BeginMerge { merged },
            RoutedKind::MergeInto { survivor } => M::MergeInto { survivor },
            RoutedKind::Absorb { record } => M::Absorb { record },
            RoutedKind::Restore { record, from } => M::Restore { record, from },
            RoutedKind::Reevaluate => M::Reevaluate,
            RoutedKind::Erase { request } => {
                return crate::msgs::ProfilesMsg::EraseRouted { profile_id, request, seq };
            }
        };
        crate::msgs::ProfilesMsg::DeliverRouted { profile_id, msg, seq, forwarded }
    }
}

/// The partition of `cdp.processed.events` that owns a profile: FNV-1a of its id, so every
/// replica computes the same owner without asking anyone.
pub fn partition_of(profile_id: &crate::ProfileId, partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in profile_id.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % partitions.max(1) as u32) as i32
}
