//! The `cohort` binary's library: system wiring, the demo, the CSV importer and telemetry setup,
//! kept in a library so end-to-end tests start exactly what the binary starts.

pub mod client;
pub mod connectors;
pub mod dedupe;
pub mod demo;
pub mod import;
pub mod payloads;
pub mod remote;
pub mod replay;
pub mod scaffold;
pub mod synth;
pub mod system;
pub mod telemetry;

pub use system::{Cohort, SystemOptions};
