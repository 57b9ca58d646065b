//! Google Cloud KMS as the key manager, over its REST API (v1), so the KEK never leaves Google.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use zeroize::{Zeroize, Zeroizing};

use super::{decode_base64_lenient, CryptoError, KeyManager};

pub const DEFAULT_KMS_ENDPOINT: &str = "https://cloudkms.googleapis.com";
pub const DEFAULT_METADATA_ENDPOINT: &str = "http://metadata.google.internal";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

const KMS: &str = "Cloud KMS";
const METADATA: &str = "GCE metadata server";
const KMS_TIMEOUT: Duration = Duration::from_secs(30);
const KMS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The metadata server is link-local: if it does not answer fast, we are not on GCP.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Refresh a cached token this long before it expires, so no request goes out with a stale one.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// Where bearer tokens for Cloud KMS come from.
#[derive(Clone)]
pub enum TokenSource {
    /// A token supplied by the caller (tests, or a sidecar that mints tokens). Never refreshed.
    Static(String),
    /// The GCE/GKE metadata server's default service account; tokens are cached until shortly
    /// before they expire.
    Metadata { endpoint: String },
}

impl TokenSource {
    /// The metadata server at its usual address.
    pub fn metadata() -> Self {
        Self::Metadata { endpoint: DEFAULT_METADATA_ENDPOINT.to_string() }
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Static(<redacted>)"),
            Self::Metadata { endpoint } => f.debug_struct("Metadata").field("endpoint", endpoint).finish(),
        }
    }
}

/// A Cloud KMS symmetric key (`purpose = ENCRYPT_DECRYPT`) used as the KEK. Needs the
/// `cloudkms.cryptoKeyVersions.useToEncrypt` and `useToDecrypt` permissions on the key.
pub struct GcpKms {
    key_name: String,
    endpoint: String,
    http: reqwest::Client,
    tokens: Tokens,
}

impl std::fmt::Debug for GcpKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = match &self.tokens {
            Tokens::Static(_) => "static",
            Tokens::Metadata { .. } => "metadata server",
        };
        f.debug_struct("GcpKms")
            .field("key_name", &self.key_name)
            .field("endpoint", &self.endpoint)
            .field("tokens", &tokens)
            .finish()
    }
}

enum Tokens {
    Static(Zeroizing<String>),
    Metadata { url: String, http: reqwest::Client, cache: Mutex<Option<CachedToken>> },
}

struct CachedToken {
    token: Zeroizing<String>,
    refresh_at: Instant,
}

impl GcpKms {
    /// `key_name` is `projects/P/locations/L/keyRings/R/cryptoKeys/K`; `endpoint` defaults to
    /// [`DEFAULT_KMS_ENDPOINT`].
    pub fn new(key_name: &str, endpoint: Option<&str>, tokens: TokenSource) -> Result<Self, CryptoError> {
        validate_key_name(key_name)?;
        let endpoint = validate_endpoint(endpoint.unwrap_or(DEFAULT_KMS_ENDPOINT), "KMS endpoint")?;
        let http = reqwest::Client::builder()
            .connect_timeout(KMS_CONNECT_TIMEOUT)
            .timeout(KMS_TIMEOUT)
            .user_agent(concat!("cohort/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CryptoError::InvalidConfig(format!("could not build the HTTP client: {e}")))?;
        let tokens = match tokens {
            TokenSource::Static(token) => {
                if token.trim().is_empty() {
                    return Err(CryptoError::InvalidConfig("empty static KMS token".into()));
                }
                Tokens::Static(Zeroizing::new(token))
            }
            TokenSource::Metadata { endpoint } => {
                let base = validate_endpoint(&endpoint, "metadata endpoint")?;
                // Never through a proxy: the metadata server is link-local.
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .connect_timeout(METADATA_CONNECT_TIMEOUT)
                    .timeout(METADATA_TIMEOUT)
                    .build()
                    .map_err(|e| CryptoError::InvalidConfig(format!("could not build the HTTP client: {e}")))?;
                Tokens::Metadata { url: format!("{base}{TOKEN_PATH}"), http, cache: Mutex::new(None) }
            }
        };
        Ok(Self { key_name: key_name.to_string(), endpoint, http, tokens })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    async fn call<Req: Serialize, Resp: for<'de> Deserialize<'de>>(
        &self,
        operation: &'static str,
        body: &Req,
    ) -> Result<Resp, CryptoError> {
        let url = format!("{}/v1/{}:{operation}", self.endpoint, self.key_name);
        let token = self.tokens.get().await?;
        let response = self
            .http
            .post(&url)
            .bearer_auth(token.as_str())
            .json(body)
            .send()
            .await
            .map_err(|e| unavailable(KMS, &e))?;
        let status = response.status();
        if !status.is_success() {
            if status == reqwest::StatusCode::UNAUTHORIZED {
                self.tokens.invalidate().await;
            }
            let message = error_message(response).await;
            return Err(CryptoError::Kms { operation, status: status.as_u16(), message });
        }
        let bytes = response.bytes().await.map_err(|e| unavailable(KMS, &e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CryptoError::BadResponse { service: KMS, message: json_problem(operation, &e) })
    }
}

#[derive(Serialize)]
struct EncryptRequest<'a> {
    plaintext: &'a str,
}

#[derive(Deserialize)]
struct EncryptResponse {
    ciphertext: String,
}

#[derive(Serialize)]
struct DecryptRequest<'a> {
    ciphertext: &'a str,
}

#[derive(Deserialize)]
struct DecryptResponse {
    /// proto3 JSON leaves out empty bytes fields.
    #[serde(default)]
    plaintext: String,
}

#[async_trait]
impl KeyManager for GcpKms {
    async fn wrap(&self, data_key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let plaintext = Zeroizing::new(STANDARD.encode(data_key));
        let response: EncryptResponse = self.call("encrypt", &EncryptRequest { plaintext: &plaintext }).await?;
        let ciphertext = decode_base64_lenient(&response.ciphertext).map_err(|_| CryptoError::BadResponse {
            service: KMS,
            message: "encrypt: ciphertext is not base64".into(),
        })?;
        if ciphertext.is_empty() {
            return Err(CryptoError::BadResponse { service: KMS, message: "encrypt: empty ciphertext".into() });
        }
        Ok(ciphertext)
    }

    async fn unwrap(&self, wrapped: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if wrapped.is_empty() {
            return Err(CryptoError::malformed("wrapped data key", "empty"));
        }
        let ciphertext = STANDARD.encode(wrapped);
        let mut response: DecryptResponse = self.call("decrypt", &DecryptRequest { ciphertext: &ciphertext }).await?;
        let plaintext = decode_base64_lenient(&response.plaintext)
            .map_err(|_| CryptoError::BadResponse { service: KMS, message: "decrypt: plaintext is not base64".into() });
        response.plaintext.zeroize();
        plaintext
    }

    fn describe(&self) -> String {
        if self.endpoint == DEFAULT_KMS_ENDPOINT {
            format!("gcpkms://{}", self.key_name)
        } else {
            format!("gcpkms://{} at {}", self.key_name, self.endpoint)
        }
    }
}

impl Tokens {
    async fn get(&self) -> Result<Zeroizing<String>, CryptoError> {
        match self {
            Self::Static(token) => Ok(token.clone()),
            Self::Metadata { url, http, cache } => {
                // Held across the fetch so concurrent callers wait for one request, not stampede.
                let mut cached = cache.lock().await;
                if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
                    return Ok(c.token.clone());
                }
                let fresh = fetch_metadata_token(http, url).await?;
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
        }
    }

    /// Forgets a token KMS rejected (revoked, or the clock was off), so the next call fetches anew.
    async fn invalidate(&self) {
        if let Self::Metadata { cache, .. } = self {
            *cache.lock().await = None;
        }
    }
}

#[derive(Deserialize)]
struct MetadataToken {
    access_token: String,
    expires_in: u64,
    #[serde(default)]
    token_type: Option<String>,
}

async fn fetch_metadata_token(http: &reqwest::Client, url: &str) -> Result<CachedToken, CryptoError> {
    let asked_at = Instant::now();
    let response =
        http.get(url).header("Metadata-Flavor", "Google").send().await.map_err(|e| unavailable(METADATA, &e))?;
    let status = response.status();
    if !status.is_success() {
        let message = error_message(response).await;
        return Err(CryptoError::Token { status: Some(status.as_u16()), message });
    }
    let bytes = Zeroizing::new(response.bytes().await.map_err(|e| unavailable(METADATA, &e))?.to_vec());
    let mut parsed: MetadataToken = serde_json::from_slice(&bytes)
        .map_err(|e| CryptoError::Token { status: None, message: json_problem("token", &e) })?;
    let token = Zeroizing::new(std::mem::take(&mut parsed.access_token));
    if token.trim().is_empty() {
        return Err(CryptoError::Token {
            status: None,
            message: "metadata server returned an empty access_token".into(),
        });
    }
    if let Some(kind) = parsed.token_type.as_deref().filter(|t| !t.eq_ignore_ascii_case("bearer")) {
        return Err(CryptoError::Token { status: None, message: format!("unexpected token_type {kind:?}") });
    }
    let lifetime = Duration::from_secs(parsed.expires_in);
    let margin = TOKEN_MARGIN.min(lifetime / 2);
    Ok(CachedToken { token, refresh_at: asked_at + (lifetime - margin) })
}

/// Google's `error.message` (with its status name), or just the HTTP reason. Other bodies are not
/// quoted: a misbehaving proxy could echo the request, which may carry a data key.
async fn error_message(response: reqwest::Response) -> String {
    #[derive(Deserialize)]
    struct GoogleError {
        error: GoogleErrorBody,
    }
    #[derive(Deserialize)]
    struct GoogleErrorBody {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        status: Option<String>,
    }
    let status = response.status();
    let reason = status.canonical_reason().unwrap_or("error").to_string();
    let bytes = response.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<GoogleError>(&bytes) {
        Ok(GoogleError { error: GoogleErrorBody { message: Some(message), status: Some(code) } }) => {
            format!("{code}: {}", sanitize(&message))
        }
        Ok(GoogleError { error: GoogleErrorBody { message: Some(message), status: None } }) => sanitize(&message),
        _ if bytes.is_empty() => reason,
        _ => format!("{reason} (not a Google API error body, {} bytes)", bytes.len()),
    }
}

/// Single line, bounded length: messages end up in logs.
fn sanitize(message: &str) -> String {
    let mut out: String = message.chars().map(|c| if c.is_control() { ' ' } else { c }).take(500).collect();
    if message.chars().count() > 500 {
        out.push('…');
    }
    out
}

/// Describes a JSON decoding failure without quoting the document (it may hold a token or key).
fn json_problem(what: &str, e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "could not be read",
        Category::Syntax | Category::Eof => "is not valid JSON",
        Category::Data => "lacks or mistypes an expected field",
    };
    format!("{what} response {kind}")
}

fn unavailable(service: &'static str, e: &reqwest::Error) -> CryptoError {
    let mut message = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    CryptoError::Unavailable { service, message }
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`, with ids as Cloud KMS allows them.
fn validate_key_name(name: &str) -> Result<(), CryptoError> {
    let parts: Vec<&str> = name.split('/').collect();
    let id_ok = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.len() <= 255
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c) || extra.contains(&c))
    };
    let ok = matches!(
        parts.as_slice(),
        ["projects", p, "locations", l, "keyRings", r, "cryptoKeys", k]
            if id_ok(p, &['.', ':']) && id_ok(l, &[]) && id_ok(r, &[]) && id_ok(k, &[])
    );
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(200).collect();
        Err(CryptoError::InvalidConfig(format!(
            "KMS key name {shown:?} is not projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
        )))
    }
}

/// An http(s) base URL without credentials, query or fragment, trailing slash removed. The URL is
/// not echoed back in errors, in case it holds credentials.
fn validate_endpoint(endpoint: &str, what: &str) -> Result<String, CryptoError> {
    let invalid = |why: &str| CryptoError::InvalidConfig(format!("{what} {why}"));
    let url = reqwest::Url::parse(endpoint.trim()).map_err(|e| invalid(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("must be http:// or https://"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not contain credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        for good in [
            "projects/p/locations/global/keyRings/r/cryptoKeys/k",
            "projects/my-proj-123/locations/europe-west1/keyRings/cohort_ring/cryptoKeys/kek-1",
            "projects/example.com:proj/locations/us/keyRings/r/cryptoKeys/k",
        ] {
            assert!(validate_key_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "projects/p/locations/l/keyRings/r",
            "projects/p/locations/l/keyRings/r/cryptoKeys/",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "/projects/p/locations/l/keyRings/r/cryptoKeys/k",
            "projects/p/locations/l/keyrings/r/cryptoKeys/k",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k:encrypt",
            "projects/p/locations/l/keyRings/r/cryptoKeys/k?x",
            "projects/p q/locations/l/keyRings/r/cryptoKeys/k",
        ] {
            assert!(matches!(validate_key_name(bad), Err(CryptoError::InvalidConfig(_))), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            validate_endpoint("https://cloudkms.googleapis.com/", "e").unwrap(),
            "https://cloudkms.googleapis.com"
        );
        assert_eq!(validate_endpoint("http://127.0.0.1:8080", "e").unwrap(), "http://127.0.0.1:8080");
        assert_eq!(validate_endpoint("http://proxy/kms/", "e").unwrap(), "http://proxy/kms");
        for bad in ["ftp://x", "not a url", "https://user:pw@x", "https://x/?q", "https://x/#f"] {
            let err = validate_endpoint(bad, "e").unwrap_err().to_string();
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn debug_hides_static_tokens() {
        let kms = GcpKms::new(
            "projects/p/locations/l/keyRings/r/cryptoKeys/k",
            None,
            TokenSource::Static("ya29.secret".into()),
        )
        .unwrap();
        assert!(!format!("{kms:?}").contains("ya29"));
        assert!(!format!("{:?}", TokenSource::Static("ya29.secret".into())).contains("ya29"));
        assert_eq!(kms.describe(), "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k");
    }
}
