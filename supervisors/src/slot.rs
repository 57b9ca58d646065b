//! A restartable child's current address.

use parking_lot::RwLock;
use ractor::{ActorRef, Message};
use std::sync::Arc;

/// Holds the live `ActorRef` of a child that a supervisor may restart: the spawn function puts
/// the new reference here, so senders always reach the current incarnation.
#[derive(Debug)]
pub struct Slot<M: Message> {
    inner: Arc<RwLock<Option<ActorRef<M>>>>,
}

impl<M: Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<M: Message> Default for Slot<M> {
    fn default() -> Self {
        Self { inner: Arc::new(RwLock::new(None)) }
    }
}

impl<M: Message> Slot<M> {
    pub fn set(&self, actor: ActorRef<M>) {
        *self.inner.write() = Some(actor);
    }

    /// The current incarnation, if one is running.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.inner.read().clone()
    }
}
