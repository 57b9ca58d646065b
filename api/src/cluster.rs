//! Cluster mode at the HTTP edge: a Profile API request is answered by the replica that owns
//! the profile's partition (its live actor), whichever replica it reached.

use crate::profiles::resolve_ref;
use crate::state::ApiState;
use axum::extract::{MatchedPath, Path, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::RequestPartsExt;
use cohort_messages::cluster::partition_of;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Names the replica whose live actor answered.
pub const OWNER: &str = "x-cohort-owner";
/// `snapshot`: answered from the stored profile, because no live owner could be reached.
pub const CONSISTENCY: &str = "x-cohort-consistency";
/// Set on a forwarded request, so it is never forwarded twice.
pub const FORWARDED: &str = "x-cohort-forwarded";

/// Partition → (owner's name, owner's address).
type OwnerMap = HashMap<i32, (String, String)>;

/// Who owns which partition, from the membership records, re-read at most once a second.
#[derive(Default)]
pub struct Owners {
    cached: Mutex<Option<(Instant, OwnerMap)>>,
}

impl Owners {
    async fn owner_of(&self, state: &ApiState, partition: i32) -> Option<(String, String)> {
        if let Some((at, map)) = &*self.cached.lock() {
            if at.elapsed() < Duration::from_secs(1) {
                return map.get(&partition).cloned();
            }
        }
        let m = &state.membership;
        let members = cohort_actors::cluster::members(state.store.as_ref(), chrono::Utc::now(), m.ttl()).await.ok()?;
        let map = owner_map(members, &m.name);
        let found = map.get(&partition).cloned();
        *self.cached.lock() = Some((Instant::now(), map));
        found
    }
}

/// The owner of each partition among the live members but `me`. During a rebalance two may
/// list one partition: the one still holding it wins over the one taking it over, whatever
/// order the records come in.
fn owner_map(members: Vec<(cohort_messages::cluster::MemberRecord, bool)>, me: &str) -> OwnerMap {
    let mut map: HashMap<i32, ((String, String), bool)> = HashMap::new();
    for (member, alive) in members {
        if !alive || member.name == me {
            continue;
        }
        for n in member.processed_partitions() {
            let arriving = member.arriving.contains(&n);
            if map.get(&n).is_none_or(|(_, theirs)| *theirs && !arriving) {
                map.insert(n, ((member.name.clone(), member.advertise_url.clone()), arriving));
            }
        }
    }
    map.into_iter().map(|(n, (owner, _))| (n, owner)).collect()
}

fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(HeaderName::from_static(name), v);
    }
    response
}

fn unavailable(why: &str) -> Response {
    crate::error::ApiError::Unavailable(why.to_string()).into_response()
}

/// Middleware on every route: profile routes of a profile owned elsewhere are forwarded to the
/// owner; with no live owner (a rebalance), reads answer from the store and say so, writes get
/// 503 with `Retry-After`.
pub async fn route_to_owner(
    axum::extract::State(state): axum::extract::State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(ownership) = state.ownership.clone() else { return next.run(req).await };
    let template = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_default();
    if !template.starts_with("/v1/profiles/{ref}") {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let raw = match parts.extract::<Path<HashMap<String, String>>>().await {
        Ok(Path(params)) => params.get("ref").cloned().unwrap_or_default(),
        Err(_) => String::new(),
    };
    let req = Request::from_parts(parts, body);
    // A ref that does not resolve is the handler's to answer (400, 404).
    let Ok(id) = resolve_ref(&state, &raw).await else { return next.run(req).await };
    let mut root = state.index.root(&id).await.unwrap_or_else(|_| id.clone());
    let mut partition = partition_of(&root, ownership.partitions());
    if req.headers().contains_key(FORWARDED) && !ownership.owns(partition) {
        // The sender took this replica for the owner: its view of the profile's merges may be
        // newer than ours (a merge another replica made), so ours is read again.
        root = state.index.refresh_root(&id).await.unwrap_or(root);
        partition = partition_of(&root, ownership.partitions());
    }
    let me = state.membership.name.clone();
    let read = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if ownership.owns(partition) {
        if !read {
            // Writes are flushed before they are answered; one whose partition moved meanwhile
            // may have been dropped with it, so it is not acknowledged.
            let tenure = ownership.tenure();
            let response = next.run(req).await;
            if response.status().is_success() && !ownership.held_since(&tenure, partition) {
                return unavailable("the profile's partition moved while it was written; send it again");
            }
            return with_header(response, OWNER, &me);
        }
        let (parts, body) = req.into_parts();
        let response = next.clone().run(Request::from_parts(parts.clone(), body)).await;
        if ownership.owns(partition) {
            return with_header(response, OWNER, &me);
        }
        // The partition moved while the actor answered (a rebalance stops its actors): the
        // answer may be cut short or already stale, so the new owner (or the store) answers.
        return route_read_elsewhere(
            &state,
            Request::from_parts(parts, axum::body::Body::empty()),
            next,
            partition,
            &me,
        )
        .await;
    }
    if read {
        return route_read_elsewhere(&state, req, next, partition, &me).await;
    }
    if req.headers().contains_key(FORWARDED) {
        // The sender took this replica for the owner; it no longer is (or not yet).
        return unavailable("the profile's partition is moving");
    }
    let Some((owner, url)) = state.owners.owner_of(&state, partition).await else {
        return unavailable("the profile's partition has no owner");
    };
    let (parts, body) = req.into_parts();
    let limit = state.config.server.max_body_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b.to_vec(),
        // As the owner would answer it: sent again, it would be refused again.
        Err(e) if is_length_limit(&e) => {
            return crate::error::ApiError::PayloadTooLarge(format!("request body over {limit} bytes")).into_response()
        }
        Err(e) => return unavailable(&format!("request body unreadable: {e}")),
    };
    match forward(&state, &parts.method, &parts.uri, &parts.headers, body, &url, &me, write_timeout(&state)).await {
        Ok(response) => with_header(response, OWNER, &owner),
        Err(e) => {
            tracing::warn!(owner = %owner, error = %e, "forwarding to the profile's owner failed");
            unavailable("the profile's owner did not answer")
        }
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// How long a forwarded read waits for the owner before the store answers instead.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a forwarded write waits: the owner may take a call and a flush to answer (each up to
/// the call timeout), and an answer cut short would report a stored write as failed. Less than
/// this replica's own request timeout, so the client still hears why.
fn write_timeout(state: &ApiState) -> std::time::Duration {
    let own = std::time::Duration::from_millis(state.config.server.request_timeout_ms);
    (state.call_timeout * 2 + READ_TIMEOUT).min(own.saturating_sub(std::time::Duration::from_secs(1))).max(READ_TIMEOUT)
}

/// A read of a profile this replica does not own, answered by the owner's live actor; or from the
/// stored record, marked as such, when there is no live owner, the owner does not answer, or the
/// request was already forwarded once.
async fn route_read_elsewhere(state: &ApiState, req: Request, next: Next, partition: i32, me: &str) -> Response {
    let snapshot = |response: Response| with_header(response, CONSISTENCY, "snapshot");
    if req.headers().contains_key(FORWARDED) {
        // The sender took this replica for the owner; it no longer is (or not yet).
        return snapshot(next.run(req).await);
    }
    let Some((owner, url)) = state.owners.owner_of(state, partition).await else {
        return snapshot(next.run(req).await);
    };
    match forward(state, req.method(), req.uri(), req.headers(), Vec::new(), &url, me, READ_TIMEOUT).await {
        Ok(response) => with_header(response, OWNER, &owner),
        Err(e) => {
            tracing::debug!(owner = %owner, error = %e, "profile owner unreachable; answering from the store");
            snapshot(next.run(req).await)
        }
    }
}

/// A peer request's error without its URL, whose path names the student (`email:...`).
fn peer_error(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

/// Sends the request on to `base` as it came, and returns its answer.
#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &ApiState,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    body: Vec<u8>,
    base: &str,
    me: &str,
    timeout: std::time::Duration,
) -> Result<Response, String> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut out = state.http.request(method, format!("{base}{path}")).timeout(timeout).body(body);
    for (name, value) in headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = out.header(FORWARDED, me).send().await.map_err(peer_error)?;
    let status = StatusCode::from_u16(answer.status().as_u16()).map_err(|e| e.to_string())?;
    let mut response = Response::builder().status(status);
    for (name, value) in answer.headers() {
        if name.as_str() != "content-length" && name.as_str() != "transfer-encoding" {
            response = response.header(name.as_str(), value.as_bytes());
        }
    }
    let bytes = answer.bytes().await.map_err(peer_error)?;
    response.body(axum::body::Body::from(bytes)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Of two live members listing a partition, the one holding it owns it, not the one still
    /// taking it over, in either order.
    #[test]
    fn a_partition_being_taken_over_is_still_its_holders() {
        let member = |name: &str, arriving: Vec<i32>| cohort_messages::cluster::MemberRecord {
            name: name.into(),
            advertise_url: format!("http://{name}"),
            started_at: chrono::Utc::now(),
            heartbeat_at: chrono::Utc::now(),
            partitions: ["t.cdp.processed.events/1", "t.cdp.processed.events/2"].map(String::from).to_vec(),
            ready: true,
            failing: Vec::new(),
            arriving,
        };
        for members in [
            vec![(member("old", vec![]), true), (member("new", vec![1]), true)],
            vec![(member("new", vec![1]), true), (member("old", vec![]), true)],
        ] {
            let map = super::owner_map(members, "me");
            assert_eq!(map[&1].0, "old");
        }
        let map = super::owner_map(vec![(member("new", vec![1]), true), (member("me", vec![]), true)], "me");
        assert_eq!(map[&1].0, "new", "the only other lister, arriving or not");
        let map = super::owner_map(vec![(member("dead", vec![]), false)], "me");
        assert!(map.is_empty());
    }

    /// Forwarding errors are logged: they must not carry the student's email from the path.
    #[tokio::test]
    async fn a_peer_error_leaves_the_students_reference_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/v1/profiles/email:alice@example.edu/consent");
        let e = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(e.to_string().contains("alice"), "the test means something: {e}");
        let logged = super::peer_error(e);
        assert!(!logged.contains("alice") && !logged.is_empty(), "{logged}");
    }
}
