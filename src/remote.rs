//! Operator commands that talk to a running Cohort over its API: GDPR deletions and exports,
//! dead letters, segments and scheduled jobs. Answers are printed as JSON; an error answer is
//! reported with its status and message and fails the command.

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::time::Duration;

/// A running Cohort's API.
#[derive(Debug, Clone)]
pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(url: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(3600)).build()?;
        Ok(Self { base: url.trim_end_matches('/').to_string(), token: token.to_string(), http })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach Cohort at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            bail!("{path}: {status}: {message}");
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Replays dead letters: the given ids, or every letter (of `stage`, if given) page by page
    /// with a progress bar; returns the totals and what was kept and why.
    pub async fn replay_dead_letters(&self, ids: &[u64], stage: Option<&str>, progress: bool) -> anyhow::Result<Value> {
        let (mut replayed, mut kept, mut removed) = (0u64, 0u64, 0u64);
        let mut kept_letters = Vec::new();
        let mut not_found = Vec::new();
        let mut absorb = |v: &Value| {
            replayed += v["replayed"].as_u64().unwrap_or(0);
            kept += v["kept"].as_u64().unwrap_or(0);
            removed += v["removed"].as_u64().unwrap_or(0);
            if let Some(results) = v["results"].as_array() {
                kept_letters.extend(results.iter().filter(|r| r["outcome"] == "kept").cloned());
            }
            if let Some(missing) = v["not_found"].as_array() {
                not_found.extend(missing.iter().cloned());
            }
        };
        if !ids.is_empty() {
            for chunk in ids.chunks(1000) {
                absorb(&self.post("/v1/dlq/replay", json!({ "ids": chunk, "stage": stage })).await?);
            }
        } else {
            let total = self.get("/v1/dlq?limit=1").await?["total"].as_u64().unwrap_or(0);
            let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} dead letters {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            // Replayed letters are removed, so the next page starts after the last one kept.
            let mut after = 0u64;
            loop {
                let page = self.post("/v1/dlq/replay", json!({ "after": after, "limit": 100, "stage": stage })).await?;
                absorb(&page);
                let seen = page["results"].as_array().map_or(0, Vec::len) as u64;
                bar.inc(seen);
                match page["next_after"].as_u64() {
                    Some(next) => after = next,
                    None => break,
                }
            }
            bar.finish_and_clear();
        }
        Ok(json!({
            "replayed": replayed, "kept": kept, "removed": removed,
            "kept_letters": kept_letters, "not_found": not_found,
        }))
    }

    /// The quality report: runs as JSON, or the HTML page.
    pub async fn quality_report_html(&self, query: &str) -> anyhow::Result<String> {
        let url = format!("{}/v1/quality/report{query}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach Cohort at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        if !status.is_success() {
            bail!("/v1/quality/report: {status}: {text}");
        }
        Ok(text)
    }

    /// Requests a deletion; with `wait`, follows it (a spinner names the current step) until it
    /// completes, and returns the final status.
    pub async fn delete_person(
        &self,
        reference: &str,
        regulation: &str,
        requested_by: Option<&str>,
        wait: bool,
        progress: bool,
    ) -> anyhow::Result<Value> {
        let mut body = json!({ "profile": reference, "regulation": regulation });
        if let Some(who) = requested_by {
            body["requested_by"] = json!(who);
        }
        let created = self.post("/v1/gdpr/deletions", body).await?;
        if !wait {
            return Ok(created);
        }
        let id = created["id"].as_str().ok_or_else(|| anyhow!("the answer names no deletion id: {created}"))?;
        let path = format!("/v1/gdpr/deletions/{id}");
        let bar = if progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").unwrap_or(ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        loop {
            let status = self.get(&path).await?;
            if status["status"] == "completed" {
                bar.finish_with_message(format!("{id} completed"));
                return Ok(status);
            }
            let current = status["steps"].as_array().and_then(|s| {
                s.iter().find(|s| s["status"] != "done" && s["status"] != "skipped").map(|s| {
                    let error = s["last_error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
                    format!("{} (attempt {}){error}", s["step"].as_str().unwrap_or("?"), s["attempts"])
                })
            });
            bar.set_message(current.unwrap_or_else(|| "finishing".into()));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Percent-encodes a path segment (profile refs hold `:` and `@`).
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'@' | b'+' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The runs of `GET /v1/quality/runs` as a plain-text table, newest first.
pub fn quality_table(runs: &Value) -> String {
    let mut out = format!(
        "{:<5} {:<26} {:<22} {:<7} {:>9}  {}\n",
        "gate", "finished", "checkpoint", "result", "evaluated", "failed expectations"
    );
    for r in runs["runs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let gate = serde_json::from_value::<cohort_messages::Gate>(r["gate"].clone()).map_or(0, |g| g.number());
        let failed: Vec<String> = r["results"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|e| e["success"] == false)
            .map(|e| match e["column"].as_str() {
                Some(c) => format!("{}({c}): {}", e["expectation"].as_str().unwrap_or(""), e["unexpected_count"]),
                None => format!("{}: {}", e["expectation"].as_str().unwrap_or(""), e["observed"]),
            })
            .collect();
        let finished: String = r["finished_at"].as_str().unwrap_or("").chars().take(26).collect();
        out.push_str(&format!(
            "{gate:<5} {finished:<26} {:<22} {:<7} {:>9}  {}\n",
            r["checkpoint"].as_str().unwrap_or(""),
            if r["success"] == true { "passed" } else { "FAILED" },
            r["evaluated"].as_u64().unwrap_or(0),
            failed.join("; ")
        ));
    }
    out
}
