//! Cohort's behaviour: ingest, identity resolution and profiles, as ractor actors.
//!
//! Actors depend on the adapter traits only; the `cohort` binary chooses the backends.

pub mod cluster;
pub mod context;
pub mod dead_letters;
pub mod directory;
pub mod dispatcher;
pub mod features;
pub mod gdpr;
pub mod identity;
pub mod identity_stats;
pub mod ingest;
pub mod jobs;
pub mod matcher;
pub mod matching;
pub mod normalize;
pub mod profile;
pub mod quality;
pub mod retention;
pub mod reverse_etl;
pub mod schedule;
pub mod segments;
pub mod trace;
pub mod warehouse_sink;
pub mod watermark;

pub use context::{FaultInjector, PipelineContext, ProfileSettings};
pub use directory::{ProfilesArgs, ProfilesDirectory};
pub use dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg};
pub use gdpr::saga::{GdprArgs, GdprCoordinator, GdprSettings};
pub use gdpr::Erasures;
pub use identity::{spawn_identity_pool, IdentityFactoryMsg, IdentityIndex, IdentityRules};
pub use identity_stats::{IdentityStatsActor, IdentityStatsArgs};
pub use ingest::{IngestActor, IngestArgs};
pub use matcher::{IdentityMatcher, IdentityMatcherArgs};
pub use profile::{ProfileActor, ProfileArgs};
pub use retention::{RetentionActor, RetentionArgs};
pub use warehouse_sink::{WarehouseSink, WarehouseSinkArgs};
pub use watermark::{Checkpoints, Watermark};
