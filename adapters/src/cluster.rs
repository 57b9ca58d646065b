//! Cluster mode: which partitions of `cdp.processed.events` this replica owns, and the gate that
//! keeps a profile flush from landing after its partition has moved to another replica.

use cohort_messages::cluster::partition_of;
use cohort_messages::ProfileId;
use std::collections::{BTreeSet, HashMap};

pub struct Ownership {
    owned: parking_lot::RwLock<BTreeSet<i32>>,
    /// A flush holds it shared while it writes; a revocation takes it exclusively, so it waits for
    /// the write in flight and the next flush already sees the partition gone.
    gate: tokio::sync::RwLock<()>,
    /// Revocations so far, per partition: a partition revoked and assigned back during a flush
    /// is not the same tenure, and what the flush dropped with it must not be recorded.
    revocations: parking_lot::Mutex<HashMap<i32, u64>>,
    partitions: i32,
}

/// The revocation counts at one moment (see [`Ownership::tenure`]).
#[derive(Debug, Clone, Default)]
pub struct Tenure(HashMap<i32, u64>);

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("owned", &*self.owned.read()).finish_non_exhaustive()
    }
}

impl Ownership {
    pub fn new(partitions: i32) -> Self {
        Self {
            owned: Default::default(),
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
        Tenure(self.revocations.lock().clone())
    }

    /// Whether the partition is owned and was not revoked since `tenure`.
    pub fn held_since(&self, tenure: &Tenure, partition: i32) -> bool {
        let now = self.revocations.lock().get(&partition).copied().unwrap_or(0);
        self.owns(partition) && tenure.0.get(&partition).copied().unwrap_or(0) == now
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

    pub fn assign(&self, partitions: &[i32]) {
        self.owned.write().extend(partitions.iter().copied());
        tracing::info!(?partitions, "processed-event partitions assigned");
    }

    /// From the consumer's rebalance callback, before the partitions go to another replica:
    /// waits for a flush that is writing, then forgets them.
    pub fn revoke(&self, partitions: &[i32]) {
        let forget = || {
            let mut owned = self.owned.write();
            let mut revocations = self.revocations.lock();
            for p in partitions {
                owned.remove(p);
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

    #[test]
    fn positions_of_moved_partitions_are_not_owned() {
        let o = Ownership::new(3);
        o.assign(&[0, 2]);
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
        let o = Ownership::new(3);
        o.assign(&[0, 1]);
        let before = o.tenure();
        o.revoke(&[1]);
        o.assign(&[1]);
        assert!(o.owns(1), "owned again");
        assert!(!o.held_since(&before, 1), "but not all along");
        assert!(!o.position_held_since(&before, pack(PROCESSED_STREAMS + 1, 9)));
        assert!(o.held_since(&before, 0));
        assert!(o.held_since(&o.tenure(), 1));
        assert!(o.position_held_since(&before, pack(1024, 9)), "raw positions are not partitioned by profile");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_waits_for_the_write_in_flight() {
        let o = Arc::new(Ownership::new(3));
        o.assign(&[1]);
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
