//! Credentials: bearer tokens and Segment write keys, compared in constant time.

use crate::error::ApiError;
use axum::http::{header, HeaderMap};
use base64::Engine;
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

/// Requires a bearer token from `allowed`.
pub fn require_bearer(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let token = bearer(headers).ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    // Compare against every token so timing does not reveal which one matched.
    let ok = allowed.iter().fold(false, |acc, t| acc | ct_eq(token, t));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid bearer token".into()))
    }
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
    fn bearer_tokens_are_checked() {
        let mut h = HeaderMap::new();
        let allowed = vec!["secret-token-1".to_string()];
        assert!(require_bearer(&h, &allowed).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret-token-1"));
        assert!(require_bearer(&h, &allowed).is_ok());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer secret-token-2"));
        assert!(require_bearer(&h, &allowed).is_err());
    }
}
