//! The embedded journal's append rate once it holds many event ids: the idempotency tables grow
//! with the deduplication window (`retention.idempotency_hours`, 7 days), and their inserts
//! are the part of an append that grows with them.
//!
//! `cargo run --release -p cohort-adapters --example journal_at_scale -- FILE [STORED]` fills
//! `FILE` (a new or earlier file) up to `STORED` events (default 2,000,000), then appends
//! 320,000 more from 32 concurrent callers in batches of 100, as the HTTP ingest does, and
//! prints the rate of each phase. Run it again on the same file to measure without the fill.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use cohort_adapters::{AppendBatch, EmbeddedStore, EventLog};
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Source, Utm};
use serde_json::json;

const CALLERS: u64 = 32;
const BATCH: u64 = 100;

/// A page view with a random-looking id, as Segment's `messageId`s are.
fn event(n: u64) -> CustomerEvent {
    let id = format!("{:032x}", u128::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
    let mut properties = serde_json::Map::new();
    properties.insert("path".into(), json!(format!("/course/{}", n % 500)));
    properties.insert("title".into(), json!("Introduction to statistics, lesson 4"));
    CustomerEvent {
        event_id: EventId::new(Source::Web, &id),
        source: Source::Web,
        kind: EventKind::Page,
        name: Some("Lesson".into()),
        occurred_at: chrono::Utc::now(),
        received_at: chrono::Utc::now(),
        identifiers: vec![Identifier::new(IdentifierKind::AnonymousId, format!("anon-{}", n % 10_000))],
        traits: Default::default(),
        properties,
        utm: Utm::default(),
        trace: None,
        raw: RawRef { seq: None, index: 0 },
    }
}

/// Appends events `from..from + count` and returns events per second.
async fn append(store: &Arc<EmbeddedStore>, from: u64, count: u64) -> Result<f64, Box<dyn Error>> {
    let started = Instant::now();
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let store = Arc::clone(store);
        callers.push(tokio::spawn(async move {
            let mut first = from + caller * BATCH;
            while first < from + count {
                let events = (first..first + BATCH).map(event).collect();
                store.append(AppendBatch { raw: None, events }).await?;
                first += CALLERS * BATCH;
            }
            Ok::<_, cohort_adapters::StoreError>(())
        }));
    }
    for caller in callers {
        caller.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().ok_or("usage: journal_at_scale FILE [STORED]")?);
    let stored: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2_000_000);
    let store = EmbeddedStore::open(&path, 64 << 20)?;
    let head = *store.watch_head().borrow();
    if head < stored {
        let rate = append(&store, head, stored - head).await?;
        println!("filled {} events at {rate:.0} events/s", stored - head);
    }
    let head = *store.watch_head().borrow();
    // Ids far from the fill's, so none is a duplicate.
    let rate = append(&store, 1 << 40 | head, 320_000).await?;
    println!("appended 320,000 events at {rate:.0} events/s with {head} already stored");
    store.close().await;
    Ok(())
}
