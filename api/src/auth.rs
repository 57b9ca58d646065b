//! Credentials: scoped bearer tokens kept as SHA-256 digests, the route → scope policy enforced
//! in front of every handler, and Segment write keys. Secrets are compared in constant time and
//! never logged; a token is named by its `name` only.

use crate::error::ApiError;
use crate::state::ApiState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use cohort_config::{AuthConfig, TokenConfig};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use subtle::ConstantTimeEq;

pub fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Hex SHA-256 of a token: what configuration and token files hold instead of the secret.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_bytes(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

struct Entry {
    name: String,
    digest: [u8; 32],
    scopes: Arc<BTreeSet<String>>,
    revoked: bool,
}

/// Who a request authenticated as.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    scopes: Arc<BTreeSet<String>>,
}

impl Principal {
    pub fn allows(&self, scope: &str) -> bool {
        self.scopes.contains("*") || self.scopes.contains(scope)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Invalid,
    Revoked,
}

impl Denied {
    fn reason(self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Invalid => "invalid",
            Denied::Revoked => "revoked",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Denied::Missing => "missing bearer token",
            Denied::Invalid => "invalid bearer token",
            Denied::Revoked => "this token has been revoked",
        }
    }
}

/// The tokens Cohort accepts: configured ones, the CRM source's token, and a tokens file that is
/// read again when it changes (so a new token and the old one are valid side by side, and the old
/// one can then be revoked, without a restart).
pub struct Credentials {
    fixed: Vec<Entry>,
    from_file: RwLock<Vec<Entry>>,
    file: Option<PathBuf>,
    seen: Mutex<Option<(SystemTime, u64)>>,
    reload_every: Duration,
}

fn entry(t: &TokenConfig) -> Option<Entry> {
    Some(Entry {
        name: t.name.clone(),
        digest: digest_bytes(&t.sha256)?,
        scopes: Arc::new(t.scopes.iter().cloned().collect()),
        revoked: t.revoked,
    })
}

fn plain(name: String, token: &str, scopes: &[&str]) -> Entry {
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&Sha256::digest(token.as_bytes()));
    Entry { name, digest, scopes: Arc::new(scopes.iter().map(|s| s.to_string()).collect()), revoked: false }
}

impl Credentials {
    /// Builds the token set and reads the tokens file once; a bad file is an error at start.
    pub fn new(auth: &AuthConfig, crm_token: &str) -> Result<Self, String> {
        let mut fixed: Vec<Entry> = auth
            .api_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| plain(format!("auth.api_tokens[{i}]"), t, &["*"]))
            .collect();
        fixed.push(plain("sources.crm.token".into(), crm_token, &["ingest:crm"]));
        fixed.extend(auth.tokens.iter().filter_map(entry));
        let file = Some(auth.tokens_file.trim()).filter(|f| !f.is_empty()).map(PathBuf::from);
        let creds = Self {
            fixed,
            from_file: RwLock::new(Vec::new()),
            file,
            seen: Mutex::new(None),
            reload_every: Duration::from_secs(auth.reload_interval_secs.max(1)),
        };
        creds.reload()?;
        Ok(creds)
    }

    /// Reads the tokens file again if it changed. On error the tokens in force stay.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.file else { return Ok(false) };
        let meta = std::fs::metadata(path).map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?;
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        if let Ok(seen) = self.seen.lock() {
            if *seen == Some(stamp) {
                return Ok(false);
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?;
        let tokens = cohort_config::parse_tokens_file(&text).map_err(|e| e.to_string())?;
        let entries: Vec<Entry> = tokens.iter().filter_map(entry).collect();
        let count = entries.len();
        if let Ok(mut current) = self.from_file.write() {
            *current = entries;
        }
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(stamp);
        }
        tracing::info!(tokens = count, "API tokens file loaded");
        Ok(true)
    }

    /// Checks the tokens file every `auth.reload_interval_secs` until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(self.reload_every);
        loop {
            tick.tick().await;
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "API tokens file not reloaded; the tokens already loaded stay in force");
            }
        }
    }

    /// The principal a token belongs to. Every entry is compared, so timing does not tell which.
    pub fn authenticate(&self, token: &str) -> Result<Principal, Denied> {
        let mut presented = [0u8; 32];
        presented.copy_from_slice(&Sha256::digest(token.as_bytes()));
        let file = self.from_file.read().map_err(|_| Denied::Invalid)?;
        let mut found: Option<&Entry> = None;
        for e in self.fixed.iter().chain(file.iter()) {
            // A revoked entry wins over any other with the same digest: revoking must work even
            // if the token is also listed elsewhere.
            if bool::from(e.digest.ct_eq(&presented)) && found.is_none_or(|f| !f.revoked) {
                found = Some(e);
            }
        }
        match found {
            None => Err(Denied::Invalid),
            Some(e) if e.revoked => Err(Denied::Revoked),
            Some(e) => Ok(Principal { name: e.name.clone(), scopes: e.scopes.clone() }),
        }
    }
}

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Health probes only.
    Open,
    /// Any valid token.
    AnyToken,
    /// A token holding one of these scopes.
    Scoped(&'static [&'static str]),
    /// The source's own credential (write key, signature), checked by the handler, or a token
    /// holding one of these scopes.
    SourceOrScoped(&'static [&'static str]),
    /// A connector's webhook: a token holding `ingest:{name}` for the connector in the path.
    Connector,
}

const PROFILES_READ: &[&str] = &["profiles:read"];
const SEGMENTS_READ: &[&str] = &["segments:admin", "profiles:read"];
const SEGMENTS_ADMIN: &[&str] = &["segments:admin"];
const IDENTITY_READ: &[&str] = &["identity:review", "profiles:read"];
const IDENTITY_REVIEW: &[&str] = &["identity:review"];
const GDPR_ADMIN: &[&str] = &["gdpr:admin"];
const CONSENT_READ: &[&str] = &["gdpr:admin", "profiles:read"];
const OPS_READ: &[&str] = &["ops:read"];
const OPS_ADMIN: &[&str] = &["ops:admin"];
/// Metrics hold counts only; a scrape token needs nothing more (dead letters hold raw payloads).
const METRICS_READ: &[&str] = &["metrics:read", "ops:read"];

/// The policy of every route, by method and route template. `None`: no such route (refused).
pub fn policy(method: &Method, route: &str) -> Option<Policy> {
    use Policy::*;
    let read = method == Method::GET || method == Method::HEAD;
    Some(match route {
        "/health/live" | "/health/ready" => Open,
        "/openapi.json" => AnyToken,
        "/v1/{call}" => SourceOrScoped(&["ingest:web", "ingest:mobile"]),
        "/webhooks/twilio/whatsapp" => SourceOrScoped(&["ingest:whatsapp"]),
        "/webhooks/sendgrid/events" => SourceOrScoped(&["ingest:email"]),
        "/webhooks/salesforce/cdc" | "/v1/import/salesforce/contacts" => Scoped(&["ingest:crm"]),
        "/webhooks/connectors/{name}" => Connector,
        "/v1/profiles/stats"
        | "/v1/profiles/{ref}"
        | "/v1/profiles/{ref}/traits"
        | "/v1/profiles/{ref}/events"
        | "/v1/profiles/{ref}/identities"
        | "/v1/profiles/{ref}/features" => Scoped(PROFILES_READ),
        "/v1/identity/explain" | "/v1/profiles/{ref}/merges" => Scoped(IDENTITY_READ),
        "/v1/identity/reviews" | "/v1/identity/reviews/{id}/{decision}" | "/v1/profiles/{ref}/unmerge" => {
            Scoped(IDENTITY_REVIEW)
        }
        "/v1/profiles/{ref}/segments" | "/v1/segment-changes" | "/v1/segments/{name}/members" => Scoped(SEGMENTS_READ),
        "/v1/segments" | "/v1/segments/{name}" if read => Scoped(SEGMENTS_READ),
        "/v1/segments" | "/v1/segments/{name}" => Scoped(SEGMENTS_ADMIN),
        "/v1/reverse-etl/status" | "/v1/reverse-etl/retry" | "/v1/reverse-etl/confirm/{activation}" => {
            Scoped(SEGMENTS_ADMIN)
        }
        "/v1/profiles/{ref}/consent" if read => Scoped(CONSENT_READ),
        "/v1/profiles/{ref}/consent" | "/v1/gdpr/exports/{ref}" | "/v1/gdpr/deletions" | "/v1/gdpr/deletions/{id}" => {
            Scoped(GDPR_ADMIN)
        }
        "/v1/jobs/{name}/run" | "/v1/dlq/replay" => Scoped(OPS_ADMIN),
        "/metrics" => Scoped(METRICS_READ),
        "/v1/dlq"
        | "/v1/jobs"
        | "/v1/jobs/{name}/runs"
        | "/v1/supervisors"
        | "/v1/cluster"
        | "/v1/quality/runs"
        | "/v1/quality/runs/{id}"
        | "/v1/quality/report" => Scoped(OPS_READ),
        _ => return None,
    })
}

fn deny(state: &ApiState, route: &str, denied: Denied) -> Response {
    state.metrics.api_auth_denied.with_label_values(&[denied.reason()]).inc();
    tracing::info!(route, reason = denied.reason(), "request refused: authentication");
    ApiError::Unauthorized(denied.message().into()).into_response()
}

/// Enforces [`policy`] before any handler or body extractor runs, and hands the handler the
/// request's [`Principal`] as an extension.
pub async fn authorize(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let Some(route) = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()) else {
        return next.run(req).await; // no route: the router answers 404
    };
    let Some(policy) = policy(req.method(), &route) else {
        tracing::error!(route, "route without an authorization policy refused");
        return ApiError::Forbidden("this route has no authorization policy".into()).into_response();
    };
    // A connector's scope is named after the connector in the path.
    let connector_scope = match policy {
        Policy::Connector => Some(format!("ingest:{}", req.uri().path().rsplit('/').next().unwrap_or_default())),
        _ => None,
    };
    let (scopes, optional) = match policy {
        Policy::Open => return next.run(req).await,
        Policy::AnyToken | Policy::Connector => (&[][..], false),
        Policy::Scoped(s) => (s, false),
        Policy::SourceOrScoped(s) => (s, true),
    };
    let principal = match bearer(req.headers()) {
        None if optional => return next.run(req).await,
        None => return deny(&state, &route, Denied::Missing),
        Some(token) => match state.credentials.authenticate(token) {
            Ok(p) => p,
            Err(d) => return deny(&state, &route, d),
        },
    };
    if let Some(scope) = connector_scope.filter(|s| !principal.allows(s)) {
        state.metrics.api_auth_denied.with_label_values(&["scope"]).inc();
        tracing::info!(route, token = %principal.name, "request refused: token lacks the connector's scope");
        return ApiError::Forbidden(format!("token `{}` lacks the scope this route needs: {scope}", principal.name))
            .into_response();
    }
    if !scopes.is_empty() && !scopes.iter().any(|s| principal.allows(s)) {
        state.metrics.api_auth_denied.with_label_values(&["scope"]).inc();
        tracing::info!(route, token = %principal.name, "request refused: token lacks the route's scope");
        return ApiError::Forbidden(format!(
            "token `{}` lacks the scope this route needs: {}",
            principal.name,
            scopes.join(" or ")
        ))
        .into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The Segment write key of a request: Basic auth user (`writeKey:`), else none.
pub fn basic_user(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let s = String::from_utf8(decoded).ok()?;
    Some(s.split_once(':').map(|(u, _)| u.to_string()).unwrap_or(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth(tokens: Vec<TokenConfig>, file: &str) -> AuthConfig {
        AuthConfig {
            api_tokens: vec!["admin-token-1".into()],
            tokens,
            tokens_file: file.into(),
            reload_interval_secs: 1,
        }
    }

    #[test]
    fn basic_auth_user_is_the_write_key() {
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode("wk_123:");
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {enc}")).unwrap());
        assert_eq!(basic_user(&h).as_deref(), Some("wk_123"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_user(&h), None);
    }

    #[test]
    fn tokens_are_matched_by_digest_with_their_scopes() {
        let reader = TokenConfig {
            name: "dashboard".into(),
            sha256: token_digest("reader-secret"),
            scopes: vec!["profiles:read".into()],
            revoked: false,
        };
        let old = TokenConfig {
            name: "old".into(),
            sha256: token_digest("old-secret"),
            scopes: vec!["ops:read".into()],
            revoked: true,
        };
        let creds = Credentials::new(&auth(vec![reader, old], ""), "crm-secret-1").unwrap();
        let p = creds.authenticate("reader-secret").unwrap();
        assert_eq!(p.name, "dashboard");
        assert!(p.allows("profiles:read") && !p.allows("gdpr:admin"));
        assert!(creds.authenticate("admin-token-1").unwrap().allows("gdpr:admin"));
        let crm = creds.authenticate("crm-secret-1").unwrap();
        assert!(crm.allows("ingest:crm") && !crm.allows("profiles:read"));
        assert_eq!(creds.authenticate("old-secret").unwrap_err(), Denied::Revoked);
        // Revoked in the file while still listed in configuration: revoked wins.
        let listed = TokenConfig {
            name: "listed".into(),
            sha256: token_digest("both-secret"),
            scopes: vec!["ops:read".into()],
            revoked: false,
        };
        let revoked = TokenConfig { name: "revoked".into(), revoked: true, ..listed.clone() };
        let both = Credentials::new(&auth(vec![listed.clone(), revoked.clone()], ""), "crm-secret-1").unwrap();
        assert_eq!(both.authenticate("both-secret").unwrap_err(), Denied::Revoked);
        let both = Credentials::new(&auth(vec![revoked, listed], ""), "crm-secret-1").unwrap();
        assert_eq!(both.authenticate("both-secret").unwrap_err(), Denied::Revoked);
        assert_eq!(creds.authenticate("nobody").unwrap_err(), Denied::Invalid);
    }

    #[test]
    fn a_changed_tokens_file_is_read_again_and_a_broken_one_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let line = |name: &str, secret: &str, revoked: bool| {
            format!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"ops:read\"]\nrevoked = {revoked}\n",
                token_digest(secret)
            )
        };
        std::fs::write(&path, line("a", "secret-a", false)).unwrap();
        let creds = Credentials::new(&auth(vec![], path.to_str().unwrap()), "crm-secret-1").unwrap();
        assert!(creds.authenticate("secret-a").is_ok());
        assert!(creds.authenticate("secret-b").is_err());
        std::fs::write(&path, line("a", "secret-a", false) + &line("b", "secret-b", false)).unwrap();
        assert!(creds.reload().unwrap());
        assert!(creds.authenticate("secret-a").is_ok() && creds.authenticate("secret-b").is_ok());
        std::fs::write(&path, line("a", "secret-a", true) + &line("b", "secret-b", false)).unwrap();
        creds.reload().unwrap();
        assert_eq!(creds.authenticate("secret-a").unwrap_err(), Denied::Revoked);
        std::fs::write(&path, "[[tokens]]\nname = \"c\"\nsha256 = \"short\"\nscopes = []\n").unwrap();
        assert!(creds.reload().is_err());
        assert!(creds.authenticate("secret-b").is_ok(), "a broken file leaves the tokens in force");
    }
}
