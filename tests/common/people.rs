//! Helpers of the identity tests: Segment identify calls and profile lookups over HTTP.

use chrono::Utc;
use cohort::client::CohortClient;
use cohort::payloads;
use serde_json::Value;

/// A Segment identify from the mobile app: with a user id, or anonymous (`anon-{mid}`).
pub async fn identify(c: &CohortClient, mid: &str, user: Option<&str>, traits: Value, device: Option<&str>) {
    let anonymous = format!("anon-{mid}");
    let anonymous = if user.is_none() { Some(anonymous.as_str()) } else { None };
    let body = payloads::segment_identify(mid, anonymous, user, traits, device, Utc::now());
    let a = c.segment(true, "identify", &body).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
}

pub async fn profile(c: &CohortClient, reference: &str) -> Value {
    let p = c.get(&format!("/v1/profiles/{reference}")).await.unwrap();
    assert_eq!(p.status, 200, "{reference}: {}", p.body);
    p.body
}

pub async fn profile_id(c: &CohortClient, reference: &str) -> String {
    profile(c, reference).await["profile_id"].as_str().unwrap().to_string()
}

/// A counter's value in Prometheus text (0 when absent).
pub fn metric(text: &str, line_start: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok()).unwrap_or(0)
}
