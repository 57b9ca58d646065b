//! Abuse limits in front of every route: a rate limit per credential (429 with Retry-After), and
//! load shedding when too many requests are in flight (503 with Retry-After), so overload turns
//! into answers a client can back off on, never into unbounded queues.

use crate::state::ApiState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::sync::Arc;
use tokio::sync::Semaphore;

pub struct Limits {
    ingest: Option<DefaultKeyedRateLimiter<String>>,
    api: Option<DefaultKeyedRateLimiter<String>>,
    in_flight: Semaphore,
}

impl Limits {
    pub fn new(ingest_rps: u32, api_rps: u32, max_in_flight: usize) -> Self {
        let keyed = |rps: u32| NonZeroU32::new(rps).map(|r| RateLimiter::keyed(Quota::per_second(r)));
        Self { ingest: keyed(ingest_rps), api: keyed(api_rps), in_flight: Semaphore::new(max_in_flight) }
    }
}

/// Routes that take events from the sources (their own limit) and routes never limited.
fn class(route: &str) -> Option<bool> {
    match route {
        "/health/live" | "/health/ready" | "/metrics" | "/openapi.json" => None,
        r if r == "/v1/{call}" || r.starts_with("/webhooks/") || r == "/v1/import/salesforce/contacts" => Some(true),
        _ => Some(false),
    }
}

/// Whose quota a request uses: its credential (hashed: the key is kept in memory), or the
/// route's shared one when it carries none in a header (Segment's body write key, webhooks).
fn key(req: &Request, route: &str) -> String {
    match req.headers().get(header::AUTHORIZATION) {
        Some(v) => {
            let digest = Sha256::digest(v.as_bytes());
            digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
        }
        None => format!("route:{route}"),
    }
}

fn refuse(status: StatusCode, code: &str, message: String, retry_after_secs: u64) -> Response {
    let mut resp = (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response();
    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.max(1).to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub async fn limit(State((state, limits)): State<(ApiState, Arc<Limits>)>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let Some(ingest) = class(&route) else { return next.run(req).await };
    let limiter = if ingest { &limits.ingest } else { &limits.api };
    if let Some(limiter) = limiter {
        if let Err(not_until) = limiter.check_key(&key(&req, &route)) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            state.metrics.api_refused.with_label_values(&[route.as_str()]).inc();
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this credential".into(),
                secs,
            );
        }
    }
    let Ok(_permit) = limits.in_flight.try_acquire() else {
        state.metrics.api_refused.with_label_values(&["overloaded"]).inc();
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight".into(), 1);
    };
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_metrics_are_never_limited_and_sources_have_their_own_quota() {
        assert_eq!(class("/health/ready"), None);
        assert_eq!(class("/metrics"), None);
        assert_eq!(class("/v1/{call}"), Some(true));
        assert_eq!(class("/webhooks/twilio/whatsapp"), Some(true));
        assert_eq!(class("/v1/profiles/{ref}"), Some(false));
    }
}
