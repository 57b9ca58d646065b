//! Supervision: restart policies, a generic supervisor actor for static children, the health
//! registry behind `/v1/supervisors`, and the metrics every subsystem reports.
//!
//! ractor's default is for a supervisor to stop itself when a child fails; every supervisor here
//! decides on purpose instead: restart after a capped exponential backoff while the child stays
//! within its restart budget, otherwise escalate by failing itself so its parent decides.

pub mod health;
pub mod metrics;
pub mod policy;
pub mod slot;
pub mod supervisor;

pub use health::{ChildHealth, ChildStatus, FailureRecord, HealthRegistry};
pub use metrics::{Metrics, PipelineStages, QueueDepth, PIPELINE_STAGES};
pub use policy::{RestartDecision, RestartPolicy, RestartTracker};
pub use slot::Slot;
pub use supervisor::{ChildSpec, SpawnFuture, Strategy, SupervisorActor, SupervisorArgs, SupervisorMsg};
