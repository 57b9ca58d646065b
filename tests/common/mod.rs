//! Helpers shared by the tests that run the real `cohort` binary.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test crate uses a subset

use cohort::client::CohortClient;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
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
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("cohort binary starts"))
}

pub async fn wait_ready(c: &CohortClient) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(a) = c.get("/health/ready").await {
            if a.status == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cohort did not become ready");
}
