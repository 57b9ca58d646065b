//! Cluster mode: which partitions of `cdp.processed.events` this replica owns, and the gate that
//! keeps a profile flush from landing after its partition has moved to another replica.

use cohort_messages::cluster::partition_of;
use cohort_messages::ProfileId;
use std::collections::BTreeSet;

pub struct Ownership {
    owned: parking_lot::RwLock<BTreeSet<i32>>,
    /// A flush holds it shared while it writes; a revocation takes it exclusively, so it waits for
    /// the write in flight and the next flush already sees the partition gone.
    gate: tokio::sync::RwLock<()>,
    partitions: i32,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("owned", &*self.owned.read()).finish_non_exhaustive()
    }
}

impl Ownership {
    pub fn new(partitions: i32) -> Self {
        Self { owned: Default::default(), gate: tokio::sync::RwLock::new(()), partitions: partitions.max(1) }
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
            for p in partitions {
                owned.remove(p);
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
