//! Cohort's domain types and the message enum of every actor.
//!
//! This crate does no I/O: it is shared by the adapters (which persist these types), the actors
//! (which exchange them) and the API (which renders them). It depends on `ractor` only for
//! `RpcReplyPort`, so that queries can carry their reply channel.

pub mod cluster;
pub mod dead_letter;
pub mod event;
pub mod gdpr;
pub mod ids;
pub mod msgs;
pub mod profile;
pub mod quality;
pub mod records;
pub mod segment;

pub use dead_letter::{DeadLetter, DeadLetterStage};
pub use event::{CustomerEvent, EventKind, RawRef, Utm};
pub use gdpr::{
    DeletionState, DeletionStep, ErasureCounts, ErasureTarget, Regulation, SagaLease, StepState, StepStatus,
    DELETION_SAGA,
};
pub use ids::{EventId, Identifier, IdentifierKind, ParseIdentifierError, ProfileId, ProfileRef, Source};
pub use profile::{
    ConsentState, EventSummary, LedgerEntry, LinkedIdentifier, MergeLedger, ProfileCounters, ProfileRecord,
    ProfileView, Split, TraitValue, UnmergeError,
};
pub use quality::{ExpectationResult, Gate, QualityRun, QUALITY_RUN};
pub use records::{
    AuditEntry, Channel, ConsentRecord, NewAuditEntry, ReviewItem, ReviewStatus, SagaRecord, SagaStatus, Suppression,
    SuppressionReason,
};
