//! Cohort's outside world: traits for every external system and their implementations.
//!
//! Each trait has an embedded default (so `cohort` runs with nothing installed) and, as the
//! project grows, real backends chosen by URL in config.

pub mod bus;
pub mod cluster;
pub mod crypto;
pub mod embedded;
pub mod error;
pub mod kafka;
pub mod mongo;
pub mod sealed;
pub mod store;
pub mod warehouse;
mod zstd_frame;

pub use bus::{
    pack, unpack, EmbeddedBus, EventBus, Polled, RoutedPolled, RoutedSubscription, StreamPositions, Subscription,
    Undecodable,
};
pub use embedded::EmbeddedStore;
pub use error::{StoreError, StoreErrorKind};
pub use mongo::MongoStore;
pub use sealed::{Pii, SealedStore};
pub use store::{
    all_documents, all_review_items, dead_letters_mentioning, delete_documents, erase_dead_letters, AppendBatch,
    AppendOutcome, BronzeRecord, EventLog, FlushBatch, JournaledEvent, NewDeadLetter, OperationalStore, OutboxId,
};
pub use warehouse::{
    open_warehouse, open_warehouse_holding, BigQueryWarehouse, BronzeRow, DeleteOutcome, DuckDbWarehouse,
    GoldProfileRow, Holding, Layer, QueryResult, QueryValue, SilverRow, SqliteWarehouse, Warehouse, WarehouseBatch,
};
