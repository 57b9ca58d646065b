//! Helpers shared by the tests that run the real `cohort` binary.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test crate uses a subset

use cohort::client::CohortClient;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A test service's address from `$COHORT_SERVICES_DIR/env`; a missing one fails the test.
pub fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `scripts/services.sh start` and `source ~/.cache/cohort/run/env` (scripts/test.sh does both)")
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// A series' value in Prometheus text, matched by name and labels (0 when absent).
pub fn series_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of a metric over its label sets (`name` without labels).
pub fn series_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// A replica's `/metrics` text.
pub async fn scrape(c: &CohortClient) -> String {
    c.get("/metrics").await.unwrap().body.as_str().unwrap_or_default().to_string()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cohort [args] serve` on `127.0.0.1:port` with extra environment.
pub fn spawn_cohort(args: &[&str], env: &[(&str, String)], port: u16) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
    cmd.args(args)
        .arg("serve")
        .env("COHORT__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("COHORT__TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // For a failing run: `COHORT_TEST_LOG_DIR=dir` keeps each process's log (info and up).
    if let Some(dir) = std::env::var_os("COHORT_TEST_LOG_DIR") {
        let path =
            std::path::Path::new(&dir).join(format!("cohort-{port}-{}.log", chrono::Utc::now().timestamp_micros()));
        if let Ok(file) = std::fs::File::create(&path) {
            cmd.env("COHORT__TELEMETRY__LOG_FILTER", "info").stderr(file);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("cohort binary starts"))
}

/// Waits until the instance is ready; returns whether it was seen up but unready because its
/// Kafka consumer groups had not given it partitions yet.
pub async fn wait_ready(c: &CohortClient) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unjoined = false;
    while Instant::now() < deadline {
        if let Ok(a) = c.get("/health/ready").await {
            if a.status == 200 {
                assert_eq!(a.body["consumer_groups_joined"], true, "{}", a.body);
                return unjoined;
            }
            unjoined |= a.body["consumer_groups_joined"] == false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cohort did not become ready");
}

/// What a load run sent and what Cohort acknowledged (event ids as Cohort names them).
pub struct LoadResult {
    pub sent: std::collections::HashSet<String>,
    pub acked: std::collections::HashSet<String>,
}

/// Sends `students × per_student` track events from concurrent students (user ids
/// `{user_prefix}-{s}`), SIGKILLs `proc` once a third is acknowledged, and returns what was sent
/// and acknowledged. Asserts the kill really came mid-load.
pub async fn load_then_kill(
    c: &CohortClient,
    proc: &mut Proc,
    students: usize,
    per_student: usize,
    user_prefix: &str,
) -> LoadResult {
    // Kill the process mid-load, without any chance to flush.
    let result = load_during(c, students, per_student, user_prefix, async {
        proc.0.kill().unwrap();
        proc.0.wait().unwrap();
    })
    .await;
    assert!(result.acked.len() < students * per_student, "the kill came too late to test anything");
    result
}

/// Sends `per_student` track events for each of `students` users concurrently and runs
/// `disruption` once a third of them are acknowledged; a user's sender stops at its first
/// refused request. Returns what was sent and what was acknowledged.
pub async fn load_during(
    c: &CohortClient,
    students: usize,
    per_student: usize,
    user_prefix: &str,
    disruption: impl std::future::Future<Output = ()>,
) -> LoadResult {
    load_spread_during(std::slice::from_ref(c), students, per_student, user_prefix, disruption).await
}

/// [`load_during`] spread over several replicas: student `s` sends to `clients[s % n]`.
pub async fn load_spread_during(
    clients: &[CohortClient],
    students: usize,
    per_student: usize,
    user_prefix: &str,
    disruption: impl std::future::Future<Output = ()>,
) -> LoadResult {
    use std::sync::{Arc, Mutex};
    let acked: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let sent: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..students {
        let c = clients[s % clients.len()].clone();
        let (acked, sent, user) = (acked.clone(), sent.clone(), format!("{user_prefix}-{s}"));
        tasks.push(tokio::spawn(async move {
            for i in 0..per_student {
                let mid = format!("{user}-{i}");
                let ev = cohort::payloads::segment_track(
                    &mid,
                    &user,
                    "Lesson Completed",
                    serde_json::json!({"i": i}),
                    chrono::Utc::now(),
                );
                sent.lock().unwrap().insert(format!("mobile:{mid}"));
                match c.segment(true, "track", &ev).await {
                    Ok(a) if a.status == 200 => {
                        acked.lock().unwrap().insert(format!("mobile:{mid}"));
                    }
                    _ => return,
                }
            }
        }));
    }
    finish_load(tasks, &sent, &acked, students * per_student, disruption).await
}

/// The end of a load run: `disruption` once a third of `total` is acknowledged, then every
/// sender to its end; asserts the load really ran.
pub async fn finish_load(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: &std::sync::Mutex<std::collections::HashSet<String>>,
    acked: &std::sync::Mutex<std::collections::HashSet<String>>,
    total: usize,
    disruption: impl std::future::Future<Output = ()>,
) -> LoadResult {
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < total / 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    disruption.await;
    for t in tasks {
        let _ = t.await;
    }
    let result = LoadResult { sent: sent.lock().unwrap().clone(), acked: acked.lock().unwrap().clone() };
    assert!(result.acked.len() >= total / 3, "load did not run: {} acked", result.acked.len());
    result
}

/// Waits until every acknowledged event is in a profile history, then checks exactly-once:
/// no event twice, counters equal histories, nothing that was never sent.
pub async fn assert_exactly_once(c: &CohortClient, students: usize, user_prefix: &str, load: &LoadResult) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut histories = Vec::new();
        for s in 0..students {
            let p = c.get(&format!("/v1/profiles/user_id:{user_prefix}-{s}/events?limit=500")).await.unwrap();
            let ids: Vec<String> = p.body["events"]
                .as_array()
                .map(|a| a.iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            histories.push(ids);
        }
        let seen: std::collections::HashSet<&String> = histories.iter().flatten().collect();
        let lost: Vec<&String> = load.acked.iter().filter(|a| !seen.contains(a)).collect();
        if !lost.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} acknowledged events lost, e.g. {:?}",
                lost.len(),
                lost.iter().take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        // The history and the counter are two reads: an event sent but not acknowledged before
        // the kill may still be replayed between them. Only a disagreement that lasts counts.
        let mut settled = true;
        for (s, ids) in histories.iter().enumerate() {
            let unique: std::collections::HashSet<&String> = ids.iter().collect();
            assert_eq!(unique.len(), ids.len(), "student {s}: an event appears twice");
            let p = c.get(&format!("/v1/profiles/user_id:{user_prefix}-{s}")).await.unwrap();
            let total = p.body["counters"]["events_total"].as_u64().unwrap_or(0) as usize;
            if total != ids.len() {
                assert!(Instant::now() < deadline, "student {s}: counter {total} disagrees with history {}", ids.len());
                settled = false;
                break;
            }
            for id in ids {
                assert!(load.sent.contains(id), "unknown event {id}");
            }
        }
        if !settled {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return;
    }
}
pub mod erasure;
