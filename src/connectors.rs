//! The connectors compiled into the `cohort` binary. `cohort generate-connector` adds its crate
//! to `[dependencies]` in Cargo.toml and a line between the markers below.

use cohort_actors::normalize::connector::Connector;
use std::sync::Arc;

/// Every connector this build serves.
pub fn compiled_in() -> Vec<Arc<dyn Connector>> {
    vec![
        // generate-connector: registrations (keep this line)
    ]
}
