//! Abuse limits in front of every route: a rate limit per credential (429 with Retry-After), and
//! load shedding when too many requests are in flight (503 with Retry-After), so overload turns
//! into answers a client can back off on, never into unbounded queues.

use crate::state::ApiState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

pub struct Limits {
    ingest: Option<DefaultKeyedRateLimiter<String>>,
    api: Option<DefaultKeyedRateLimiter<String>>,
    in_flight: Semaphore,
    checks: AtomicU64,
}

/// Checks between two sweeps of the quotas' idle keys.
const TIDY_EVERY: u64 = 4_096;

impl Limits {
    pub fn new(ingest_rps: u32, api_rps: u32, max_in_flight: usize) -> Self {
        let keyed = |rps: u32| NonZeroU32::new(rps).map(|r| RateLimiter::keyed(Quota::per_second(r)));
        Self {
            ingest: keyed(ingest_rps),
            api: keyed(api_rps),
            in_flight: Semaphore::new(max_in_flight),
            checks: AtomicU64::new(0),
        }
    }

    /// Forgets keys whose quota is back to full: every credential a client makes up (valid or
    /// not) gets an entry, which would otherwise stay for good.
    fn tidy(&self) {
        for limiter in [&self.ingest, &self.api].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        [&self.ingest, &self.api].into_iter().flatten().map(|l| l.len()).sum()
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
/// Basic auth counts by user alone: the password is ignored, so varying it is no new quota.
fn key(req: &Request, route: &str) -> String {
    let digest = |bytes: &[u8]| Sha256::digest(bytes).iter().take(12).map(|b| format!("{b:02x}")).collect();
    // Credentials as auth reads them, so another spelling of one (`bearer`, extra spaces) is
    // no new quota.
    match (
        crate::auth::basic_user(req.headers()),
        crate::auth::bearer(req.headers()),
        req.headers().get(header::AUTHORIZATION),
    ) {
        (Some(user), _, _) => digest(format!("basic:{user}").as_bytes()),
        (None, Some(token), _) => digest(format!("bearer:{token}").as_bytes()),
        (None, None, Some(v)) => digest(v.as_bytes()),
        (None, None, None) => format!("route:{route}"),
    }
}

fn refuse(status: StatusCode, code: &str, message: String, retry_after_secs: u64) -> Response {
    let mut resp = crate::error::error_response(status, code, &message);
    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.max(1).to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub async fn limit(State((state, limits)): State<(ApiState, Arc<Limits>)>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let Some(ingest) = class(&route) else { return next.run(req).await };
    let limiter = if ingest { &limits.ingest } else { &limits.api };
    if limits.checks.fetch_add(1, Ordering::Relaxed) % TIDY_EVERY == TIDY_EVERY - 1 {
        limits.tidy();
    }
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

    fn request(authorization: &str) -> Request {
        Request::builder().header(header::AUTHORIZATION, authorization).body(axum::body::Body::empty()).unwrap()
    }

    fn basic(user_and_password: &str) -> String {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_and_password))
    }

    #[test]
    fn a_write_key_has_one_quota_whatever_password_comes_with_it() {
        let route = "/v1/{call}";
        let k = |a: &str| key(&request(a), route);
        assert_eq!(k(&basic("wk_web:")), k(&basic("wk_web:anything")));
        assert_eq!(k(&basic("wk_web")), k(&basic("wk_web:x")));
        assert_ne!(k(&basic("wk_web:")), k(&basic("wk_mobile:")));
        assert_ne!(k("Bearer a"), k("Bearer b"));
        // A token has one quota however the header spells it.
        assert_eq!(k("Bearer a"), k("bearer a"));
        assert_eq!(k("Bearer a"), k("BEARER   a "));
        assert_eq!(key(&Request::new(axum::body::Body::empty()), route), "route:/v1/{call}");
    }

    #[test]
    fn keys_whose_quota_is_full_again_are_forgotten() {
        let limits = Limits::new(1_000, 1_000, 8);
        let ingest = limits.ingest.as_ref().unwrap();
        for i in 0..100 {
            assert!(ingest.check_key(&format!("made-up-{i}")).is_ok());
        }
        assert_eq!(limits.keys(), 100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        limits.tidy();
        assert_eq!(limits.keys(), 0, "each key's quota refilled in a millisecond");
    }
}
