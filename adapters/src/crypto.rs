//! Encryption at rest for personal data (GDPR): envelope encryption plus keyed look-up hashes.
//!
//! Each deployment has one key-encryption key (KEK) held by a [`KeyManager`]: a local key file by
//! default, Google Cloud KMS in production. The KEK only ever wraps small data-encryption keys
//! ([`WrappedKey`], stored next to the data); the unwrapped data key drives an [`Envelope`] that
//! seals email, phone, names and message text as `enc:v1:…` tokens, and a [`KeyedHasher`] derived
//! from the same data key gives deterministic `h1:…` hashes so sealed values can still be looked
//! up by equality. Losing the KEK makes every sealed value unreadable: back it up.

mod envelope;
mod error;
mod gcp_kms;
mod hasher;
mod local;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

pub use envelope::{is_sealed, new_data_key, open_data_key, Envelope, WrappedKey, KEY_LEN, SEALED_PREFIX};
pub use error::CryptoError;
pub use gcp_kms::{GcpKms, TokenSource, DEFAULT_KMS_ENDPOINT, DEFAULT_METADATA_ENDPOINT};
pub use hasher::KeyedHasher;
pub use local::LocalKeyFile;

/// Holder of the key-encryption key. Implementations only wrap and unwrap data keys; the KEK
/// itself never leaves them (and, for Cloud KMS, never leaves Google).
#[async_trait]
pub trait KeyManager: Send + Sync + 'static {
    /// Encrypts a data-encryption key under the key-encryption key.
    async fn wrap(&self, data_key: &[u8]) -> Result<Vec<u8>, CryptoError>;

    /// Recovers a data key from [`KeyManager::wrap`]'s output; fails if it was altered or wrapped
    /// under another KEK. Callers should zeroize the result once they are done with it.
    async fn unwrap(&self, wrapped: &[u8]) -> Result<Vec<u8>, CryptoError>;

    /// Non-secret description for logs and status pages (`file:/path`, or the KMS key name).
    fn describe(&self) -> String;
}

/// Settings for `gcpkms://` key managers that do not belong in the URL (the token is a secret).
#[derive(Clone, Default)]
pub struct KmsOptions {
    /// Cloud KMS base URL; default [`DEFAULT_KMS_ENDPOINT`].
    pub endpoint: Option<String>,
    /// A ready-made bearer token; when absent, tokens come from the metadata server.
    pub token: Option<String>,
    /// Metadata server base URL; default [`DEFAULT_METADATA_ENDPOINT`].
    pub metadata_endpoint: Option<String>,
}

impl std::fmt::Debug for KmsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("metadata_endpoint", &self.metadata_endpoint)
            .finish()
    }
}

/// Opens the key manager named by a config URL:
/// `file:///abs/path` or `file:relative/path` (a local key file, created on first start) or
/// `gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K` (Cloud KMS, metadata-server auth unless
/// `options.token` is set).
pub fn key_manager_from_url(url: &str, options: &KmsOptions) -> Result<Arc<dyn KeyManager>, CryptoError> {
    match parse_url(url)? {
        Spec::File(path) => Ok(Arc::new(LocalKeyFile::open_or_create(path)?)),
        Spec::GcpKms(key_name) => {
            let tokens = match &options.token {
                Some(token) => TokenSource::Static(token.clone()),
                None => TokenSource::Metadata {
                    endpoint: options
                        .metadata_endpoint
                        .clone()
                        .unwrap_or_else(|| DEFAULT_METADATA_ENDPOINT.to_string()),
                },
            };
            Ok(Arc::new(GcpKms::new(&key_name, options.endpoint.as_deref(), tokens)?))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Spec {
    File(PathBuf),
    GcpKms(String),
}

fn parse_url(url: &str) -> Result<Spec, CryptoError> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("gcpkms://") {
        if rest.contains(['?', '#']) {
            return Err(CryptoError::InvalidConfig(
                "gcpkms:// URLs take no query or fragment; pass the endpoint and token as options".into(),
            ));
        }
        return Ok(Spec::GcpKms(rest.to_string()));
    }
    if let Some(rest) = url.strip_prefix("file:") {
        if rest.starts_with("//") {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| CryptoError::InvalidConfig(format!("bad file URL {url:?}: {e}")))?;
            if parsed.query().is_some() || parsed.fragment().is_some() {
                return Err(CryptoError::InvalidConfig(format!("file URL {url:?} must not have a query or fragment")));
            }
            let path = parsed.to_file_path().map_err(|()| {
                CryptoError::InvalidConfig(format!(
                    "file URL {url:?} must be file:///absolute/path (no host) or file:relative/path"
                ))
            })?;
            return Ok(Spec::File(path));
        }
        if rest.is_empty() {
            return Err(CryptoError::InvalidConfig("file: URL without a path".into()));
        }
        return Ok(Spec::File(PathBuf::from(rest)));
    }
    let scheme = match url.split_once(':') {
        Some((scheme, _)) if !scheme.is_empty() && scheme.len() <= 32 => scheme.to_string(),
        _ => String::new(),
    };
    Err(CryptoError::UnknownScheme { scheme })
}

/// Lower-case hex, for hashes and ids.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes base64 as Google's JSON mapping allows it: standard or URL-safe alphabet, padded or not.
fn decode_base64_lenient(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::{alphabet, Engine};
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    if s.contains(['-', '_']) {
        GeneralPurpose::new(&alphabet::URL_SAFE, config).decode(s)
    } else {
        GeneralPurpose::new(&alphabet::STANDARD, config).decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_urls() {
        assert_eq!(parse_url("file:///var/lib/cohort/kek").unwrap(), Spec::File("/var/lib/cohort/kek".into()));
        assert_eq!(parse_url("file://localhost/var/kek").unwrap(), Spec::File("/var/kek".into()));
        assert_eq!(parse_url("file:///a%20b/kek").unwrap(), Spec::File("/a b/kek".into()));
        assert_eq!(parse_url("file:data/kek.b64").unwrap(), Spec::File("data/kek.b64".into()));
        assert_eq!(parse_url(" file:/abs/kek ").unwrap(), Spec::File("/abs/kek".into()));
        assert!(matches!(parse_url("file://otherhost/kek"), Err(CryptoError::InvalidConfig(_))));
        assert!(matches!(parse_url("file:"), Err(CryptoError::InvalidConfig(_))));
    }

    #[test]
    fn parses_gcpkms_urls() {
        let name = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
        assert_eq!(parse_url(&format!("gcpkms://{name}")).unwrap(), Spec::GcpKms(name.into()));
        assert!(matches!(parse_url(&format!("gcpkms://{name}?x=1")), Err(CryptoError::InvalidConfig(_))));
    }

    #[test]
    fn unknown_schemes_list_the_accepted_ones() {
        for url in ["awskms://arn", "/var/lib/kek", "vault:secret/kek"] {
            let err = parse_url(url).unwrap_err();
            assert!(matches!(err, CryptoError::UnknownScheme { .. }), "{url}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains("file:///") && msg.contains("file:relative") && msg.contains("gcpkms://"), "{msg}");
        }
    }

    #[test]
    fn kms_options_debug_hides_the_token() {
        let opts = KmsOptions { token: Some("ya29.secret".into()), ..Default::default() };
        assert!(!format!("{opts:?}").contains("ya29"));
    }

    #[test]
    fn lenient_base64_accepts_every_google_form() {
        let bytes = [0xfbu8, 0xff, 0x01, 0x02];
        for s in ["+/8BAg==", "+/8BAg", "-_8BAg==", "-_8BAg"] {
            assert_eq!(decode_base64_lenient(s).unwrap(), bytes, "{s}");
        }
        assert!(decode_base64_lenient("not base64!").is_err());
    }
}
