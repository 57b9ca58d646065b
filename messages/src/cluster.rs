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
}

impl MemberRecord {
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
        };
        assert!(m.is_alive(now, chrono::Duration::seconds(10)));
        assert!(!m.is_alive(now, chrono::Duration::seconds(5)));
    }
}
