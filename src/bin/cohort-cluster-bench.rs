//! Cluster throughput: spreads Segment batches over running replicas and measures how fast the
//! cluster applies them (the sum of every replica's applied-event counter). `scripts/cluster-bench.sh`
//! starts 1, 2 and 3 replicas in cluster mode and runs this against each.

use anyhow::Context;
use clap::Parser;
use cohort::client::CohortClient;
use cohort::payloads;
use cohort_config::Config;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Measures a Cohort cluster's end-to-end throughput")]
struct Cli {
    /// The replicas' base URLs, comma-separated; batch `j` goes to replica `j % n`.
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    #[arg(long, default_value_t = 5_000)]
    students: u64,
    #[arg(long, default_value_t = 100)]
    batch: u64,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Give up waiting for the pipeline after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Events applied to profiles so far, summed over the replicas.
async fn applied(clients: &[CohortClient]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for c in clients {
        let text = c.get("/metrics").await?.body.as_str().unwrap_or_default().to_string();
        total += text
            .lines()
            .find(|l| l.starts_with("cohort_event_to_profile_seconds_count"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    Ok(total)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_toml_str("")?;
    let clients: Vec<CohortClient> =
        cli.urls.iter().map(|u| CohortClient::new(u.clone(), &config)).collect::<anyhow::Result<_>>()?;
    let before = applied(&clients).await.context("reading /metrics")?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let batches = cli.events / cli.batch;
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cli.concurrency {
        let (clients, next, accepted, run) = (clients.clone(), next.clone(), accepted.clone(), run.clone());
        let (per, students) = (cli.batch, cli.students.max(1));
        workers.push(tokio::spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= batches {
                    return;
                }
                // One student's batch, as one browser or app sends it.
                let user = format!("cb-{run}-{}", j % students);
                let events = (0..per)
                    .map(|i| {
                        let mid = format!("cb-{run}-{j}-{i}");
                        payloads::segment_track(&mid, &user, "Lesson Viewed", json!({ "i": i }), chrono::Utc::now())
                    })
                    .collect();
                let c = &clients[(j as usize) % clients.len()];
                if let Ok(a) = c.segment(true, "batch", &payloads::segment_batch(events)).await {
                    accepted.fetch_add(a.body["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let http = started.elapsed();
    let accepted = accepted.load(Ordering::Relaxed) as f64;
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    let done = loop {
        let now = applied(&clients).await? - before;
        if now >= accepted {
            break started.elapsed();
        }
        anyhow::ensure!(Instant::now() < deadline, "only {now} of {accepted} events applied in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "replicas {}: {} events accepted in {:.1} s ({:.0}/s over HTTP); all applied after {:.1} s: {:.0} events/s end to end",
        clients.len(),
        accepted,
        http.as_secs_f64(),
        accepted / http.as_secs_f64(),
        done.as_secs_f64(),
        accepted / done.as_secs_f64()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli))
}
