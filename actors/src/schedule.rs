//! Timers owned by an actor's state: dropped with the state when the actor stops, so a
//! restarted actor never inherits a ticking timer of its predecessor.

use std::time::Duration;

use ractor::{ActorRef, Message};
use tokio::task::JoinHandle;

pub struct Schedule(JoinHandle<()>);

impl Schedule {
    /// Sends `msg()` to `actor` every `every`.
    pub fn every<M: Message>(actor: &ActorRef<M>, every: Duration, msg: fn() -> M) -> Self {
        Schedule(actor.send_interval(every, msg))
    }
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.0.abort();
    }
}
