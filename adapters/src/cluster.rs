//! Cluster mode: which partitions of `cdp.processed.events` this replica owns, and the gate that
//! keeps a profile flush from landing after its partition has moved to another replica.

use cohort_messages::cluster::partition_of;
use cohort_messages::ProfileId;
use std::collections::{BTreeSet, HashMap};

pub struct Ownership {
    /// Held and handed over: the profiles of these partitions are this replica's.
    owned: parking_lot::RwLock<BTreeSet<i32>>,
    /// Assigned by the group, but the replica that held them before may still be writing: a
    /// broker can hand a partition on before its holder has seen the revocation (Tansu does),
    /// and a profile loaded before that holder's last flush would overwrite it. See
    /// [`Self::arriving`].
    arriving: parking_lot::RwLock<BTreeSet<i32>>,
    /// A flush holds it shared while it writes; a revocation takes it exclusively, so it waits for
    /// the write in flight and the next flush already sees the partition gone.
    gate: tokio::sync::RwLock<()>,
    /// Revocations so far, per partition: a partition revoked and assigned back during a flush
    /// is not the same tenure, and what the flush dropped with it must not be recorded.
    revocations: parking_lot::Mutex<HashMap<i32, u64>>,
    partitions: i32,
}

/// The partitions owned and the revocation counts at one moment (see [`Ownership::tenure`]).
#[derive(Debug, Clone, Default)]
pub struct Tenure {
    owned: BTreeSet<i32>,
    revocations: HashMap<i32, u64>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("owned", &*self.owned.read()).finish_non_exhaustive()
    }
}

impl Ownership {
    pub fn new(partitions: i32) -> Self {
        Self {
            owned: Default::default(),
            arriving: Default::default(),
            gate: tokio::sync::RwLock::new(()),
            revocations: Default::default(),
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.owned.read().contains(&partition)
    }

    pub fn owns_profile(&self, profile: &ProfileId) -> bool {
        self.owns(partition_of(profile, self.partitions))
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.read().iter().copied().collect()
    }

    /// The tenure of every partition now, to check later that one was held all along.
    pub fn tenure(&self) -> Tenure {
        // Both under the same locks `revoke` takes, so no revocation falls between them.
        let owned = self.owned.read();
        let revocations = self.revocations.lock();
        Tenure { owned: owned.clone(), revocations: revocations.clone() }
    }

    /// Whether the partition was owned at `tenure`, still is, and was not revoked in between.
    pub fn held_since(&self, tenure: &Tenure, partition: i32) -> bool {
        let now = self.revocations.lock().get(&partition).copied().unwrap_or(0);
        tenure.owned.contains(&partition)
            && self.owns(partition)
            && tenure.revocations.get(&partition).copied().unwrap_or(0) == now
    }

    pub fn profile_held_since(&self, tenure: &Tenure, profile: &ProfileId) -> bool {
        self.held_since(tenure, partition_of(profile, self.partitions))
    }

    /// [`Self::held_since`] for the partition a position was read from (positions of other
    /// topics count as held).
    pub fn position_held_since(&self, tenure: &Tenure, position: u64) -> bool {
        crate::kafka::processed_partition(position).is_none_or(|p| self.held_since(tenure, p))
    }

    /// Held while a flush writes profiles of owned partitions.
    pub async fn writing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// From the consumer's rebalance callback: the partitions arrive (see [`Self::arriving`]),
    /// also those owned until the revocation just before: a broker may have handed them to
    /// another replica in between.
    pub fn assign(&self, partitions: &[i32]) {
        self.arriving.write().extend(partitions.iter().copied());
        tracing::info!(?partitions, "processed-event partitions assigned");
    }

    /// Partitions assigned here whose previous holder may not have let go yet: not owned until
    /// [`Self::arrived`], so nothing of theirs is loaded, applied or written before. Their
    /// profiles start afresh from the store when they arrive, even if they were here before.
    pub fn arriving(&self) -> Vec<i32> {
        self.arriving.read().iter().copied().collect()
    }

    /// The previous holders have let go of these: they are owned from now on (unless revoked
    /// meanwhile).
    pub fn arrived(&self, partitions: &[i32]) {
        // The lock order of `revoke` and `tenure`: owned first.
        let mut owned = self.owned.write();
        let mut arriving = self.arriving.write();
        for p in partitions {
            if arriving.remove(p) {
                owned.insert(*p);
            }
        }
    }

    /// From the consumer's rebalance callback, before the partitions go to another replica:
    /// waits for a flush that is writing, then forgets them.
    pub fn revoke(&self, partitions: &[i32]) {
        let forget = || {
            let mut owned = self.owned.write();
            let mut arriving = self.arriving.write();
            let mut revocations = self.revocations.lock();
            for p in partitions {
                owned.remove(p);
                arriving.remove(p);
                *revocations.entry(*p).or_insert(0) += 1;
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    let _exclusive = h.block_on(self.gate.write());
                    forget();
                })
            }
            // Not on a runtime worker (librdkafka's own thread): blocking is fine.
            Err(_) => {
                let _exclusive = futures::executor::block_on(self.gate.write());
                forget();
            }
            // A current-thread runtime cannot block here; the flush re-checks ownership anyway.
            Ok(_) => forget(),
        }
        tracing::info!(?partitions, "processed-event partitions revoked");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::bus::pack;
    use crate::kafka::PROCESSED_STREAMS;
    use std::sync::Arc;
    use std::time::Duration;

    /// Assigned and handed over.
    fn owning(partitions: &[i32]) -> Ownership {
        let o = Ownership::new(3);
        o.assign(partitions);
        o.arrived(partitions);
        o
    }

    #[test]
    fn an_assigned_partition_is_owned_once_it_has_arrived_even_one_that_comes_straight_back() {
        let o = Ownership::new(3);
        o.assign(&[0, 1]);
        assert!(!o.owns(0) && !o.owns(1), "its previous holder may still be writing");
        assert_eq!(o.arriving(), vec![0, 1]);
        o.arrived(&[0]);
        assert!(o.owns(0) && !o.owns(1));
        // An eager rebalance: everything revoked, then assigned again.
        o.revoke(&[0, 1]);
        assert!(o.arriving().is_empty(), "a revoked partition no longer arrives");
        o.assign(&[0, 1, 2]);
        assert!(!o.owns(0), "another replica may have held it in between");
        assert_eq!(o.arriving(), vec![0, 1, 2]);
        o.revoke(&[0, 1, 2]);
        o.arrived(&[1]);
        assert!(!o.owns(1), "revoked before it arrived");
    }

    #[test]
    fn a_partition_not_owned_when_a_tenure_began_was_not_held_since() {
        let o = owning(&[0]);
        o.revoke(&[0]);
        // A flush starts between the revocation and the next assignment...
        let during = o.tenure();
        o.assign(&[0]);
        o.arrived(&[0]);
        // ...and has dropped the partition's actors: nothing of it may be recorded.
        assert!(!o.held_since(&during, 0));
        assert!(o.held_since(&o.tenure(), 0));
    }

    #[test]
    fn positions_of_moved_partitions_are_not_owned() {
        let o = owning(&[0, 2]);
        let processed = |p: u32| pack(PROCESSED_STREAMS + p, 7);
        assert!(o.position_held_since(&o.tenure(), processed(0)));
        assert!(!o.position_held_since(&o.tenure(), processed(1)));
        o.revoke(&[2]);
        assert!(!o.position_held_since(&o.tenure(), processed(2)));
        assert_eq!(o.owned(), vec![0]);
        // Raw-topic positions are not partitioned by profile.
        assert!(o.position_held_since(&o.tenure(), pack(1024, 7)));
    }

    #[test]
    fn a_partition_revoked_and_assigned_back_is_a_new_tenure() {
        let o = owning(&[0, 1]);
        let before = o.tenure();
        o.revoke(&[1]);
        o.assign(&[1]);
        o.arrived(&[1]);
        assert!(o.owns(1), "owned again");
        assert!(!o.held_since(&before, 1), "but not all along");
        assert!(!o.position_held_since(&before, pack(PROCESSED_STREAMS + 1, 9)));
        assert!(o.held_since(&before, 0));
        assert!(o.held_since(&o.tenure(), 1));
        assert!(o.position_held_since(&before, pack(1024, 9)), "raw positions are not partitioned by profile");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_waits_for_the_write_in_flight() {
        let o = Arc::new(owning(&[1]));
        let writing = o.writing().await;
        // librdkafka calls the rebalance callback on a thread of its own.
        let revoker = {
            let o = o.clone();
            std::thread::spawn(move || o.revoke(&[1]))
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(o.owns(1), "revoked while a flush was writing");
        drop(writing);
        revoker.join().unwrap();
        assert!(!o.owns(1));
        // The next flush sees the partition gone as soon as it holds the gate.
        let _next = o.writing().await;
        assert!(!o.position_held_since(&o.tenure(), pack(PROCESSED_STREAMS + 1, 3)));
    }
}
