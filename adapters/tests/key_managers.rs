//! The key-manager contract, run against the local key file and against Cloud KMS's REST API as
//! served by an in-process stand-in that checks request shapes and really encrypts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use serde_json::{json, Value};

use cohort_adapters::crypto::{
    key_manager_from_url, new_data_key, open_data_key, CryptoError, GcpKms, KeyManager, KeyedHasher, KmsOptions,
    LocalKeyFile, TokenSource, WrappedKey,
};

const KEY_NAME: &str = "projects/test-proj/locations/europe-west1/keyRings/cohort/cryptoKeys/kek";
const TOKEN: &str = "ya29.test-token";

// ---------------------------------------------------------------------------------------------
// The shared contract

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

/// What every `KeyManager` must do; `what` names the implementation in failure messages.
async fn key_manager_contract(km: &dyn KeyManager, what: &str) {
    let dk = random_key();
    let secret_forms = [STANDARD.encode(dk), dk.iter().map(|b| format!("{b:02x}")).collect::<String>()];
    let no_secret = |msg: &str| {
        for s in &secret_forms {
            assert!(!msg.contains(s.as_str()), "{what}: error reveals the data key: {msg}");
        }
    };

    // Round trip, and the wrapped form is not the key.
    let w1 = km.wrap(&dk).await.unwrap();
    assert!(!w1.windows(dk.len()).any(|w| w == dk), "{what}: wrapped form contains the key");
    assert_eq!(km.unwrap(&w1).await.unwrap(), dk, "{what}: round trip");

    // Wrapping twice gives different outputs; both unwrap.
    let w2 = km.wrap(&dk).await.unwrap();
    assert_ne!(w1, w2, "{what}: wrapping is deterministic");
    assert_eq!(km.unwrap(&w2).await.unwrap(), dk, "{what}: second round trip");

    // Other lengths round-trip too.
    for len in [1usize, 16, 64] {
        let other = vec![0xa5u8; len];
        assert_eq!(km.unwrap(&km.wrap(&other).await.unwrap()).await.unwrap(), other, "{what}: {len}-byte key");
    }

    // Tampering anywhere fails, cleanly.
    for i in [0, w1.len() / 2, w1.len() - 1] {
        let mut bad = w1.clone();
        bad[i] ^= 0x01;
        let err = km.unwrap(&bad).await.expect_err(&format!("{what}: tampered byte {i} unwrapped"));
        no_secret(&err.to_string());
        no_secret(&format!("{err:?}"));
    }
    assert!(km.unwrap(&w1[..w1.len() - 1]).await.is_err(), "{what}: truncated");

    // Garbage fails cleanly.
    let mut noise = vec![0u8; 80];
    rand::thread_rng().fill_bytes(&mut noise);
    for garbage in [&b""[..], b"garbage", &noise] {
        let err = km.unwrap(garbage).await.expect_err(&format!("{what}: garbage unwrapped"));
        assert!(!err.to_string().is_empty());
    }

    let described = km.describe();
    assert!(!described.is_empty());
    no_secret(&described);

    // Data keys through this key manager.
    let (envelope, record) = new_data_key(km).await.unwrap();
    assert!(record.key_id.starts_with("dk_") && record.key_id.len() == 35, "{}", record.key_id);
    assert_eq!(record.kek, described);
    assert_eq!(record.created_at.len(), 20, "{}", record.created_at);
    let sealed = envelope.seal("jane@example.com");
    let stored = serde_json::to_string(&record).unwrap();
    assert!(!stored.contains("jane"));
    let record: WrappedKey = serde_json::from_str(&stored).unwrap();
    let reopened = open_data_key(km, &record).await.unwrap();
    assert_eq!(reopened.open(&sealed).unwrap(), "jane@example.com", "{what}: data key round trip");
    assert_eq!(
        KeyedHasher::derive(&envelope).hash("email", "jane@example.com"),
        KeyedHasher::derive(&reopened).hash("email", "jane@example.com")
    );
    let (other, _) = new_data_key(km).await.unwrap();
    assert!(matches!(other.open(&sealed), Err(CryptoError::Decrypt { .. })), "{what}: data keys must differ");

    let mut tampered = record.clone();
    let mut raw = STANDARD.decode(&tampered.wrapped).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x80;
    tampered.wrapped = STANDARD.encode(raw);
    assert!(open_data_key(km, &tampered).await.is_err(), "{what}: tampered record opened");
    let not_base64 = WrappedKey { wrapped: "%%%".into(), ..record };
    assert!(matches!(open_data_key(km, &not_base64).await, Err(CryptoError::Malformed { .. })));
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the Cloud KMS REST API

struct FakeKms {
    key_name: String,
    /// The bearer token it accepts.
    token: Mutex<String>,
    cipher: Aes256Gcm,
    hits: AtomicUsize,
    /// Requests whose shape was wrong (path, auth, body): must stay empty unless a test provokes it.
    shape_errors: Mutex<Vec<String>>,
    /// Answer every request with this instead.
    forced: Mutex<Option<(StatusCode, String)>>,
}

const FAKE_PREFIX: &[u8] = b"fakekms1";

impl FakeKms {
    fn new(token: &str) -> Arc<Self> {
        Arc::new(Self {
            key_name: KEY_NAME.to_string(),
            token: Mutex::new(token.to_string()),
            cipher: Aes256Gcm::new(&random_key().into()),
            hits: AtomicUsize::new(0),
            shape_errors: Mutex::new(Vec::new()),
            forced: Mutex::new(None),
        })
    }

    fn shape_errors(&self) -> Vec<String> {
        self.shape_errors.lock().unwrap().clone()
    }

    fn reject(&self, status: StatusCode, google_status: &str, message: &str) -> Response {
        self.shape_errors.lock().unwrap().push(format!("{status}: {message}"));
        google_error(status, google_status, message)
    }
}

fn google_error(status: StatusCode, google_status: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "status": google_status}})))
        .into_response()
}

async fn fake_kms(
    State(kms): State<Arc<FakeKms>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kms.hits.fetch_add(1, Ordering::SeqCst);
    if let Some((status, body)) = kms.forced.lock().unwrap().clone() {
        return (status, [("content-type", "application/json")], body).into_response();
    }
    if method != Method::POST {
        return kms.reject(StatusCode::METHOD_NOT_ALLOWED, "INVALID_ARGUMENT", "expected POST");
    }
    if uri.query().is_some() {
        return kms.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "unexpected query string");
    }
    let Some((name, op)) = uri.path().strip_prefix("/v1/").and_then(|p| p.rsplit_once(':')) else {
        return kms.reject(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("bad path {}", uri.path()));
    };
    if name != kms.key_name {
        return kms.reject(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("CryptoKey {name} not found."));
    }
    let field = match op {
        "encrypt" => "plaintext",
        "decrypt" => "ciphertext",
        _ => return kms.reject(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("unknown method {op}")),
    };
    let expected_auth = format!("Bearer {}", kms.token.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected_auth.as_str()) {
        return kms.reject(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        );
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return kms.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &format!("content-type {content_type:?}"));
    }
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(&body) else {
        return kms.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "body is not a JSON object");
    };
    if object.len() != 1 {
        let names: Vec<_> = object.keys().collect();
        return kms.reject(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("expected only {field:?}, got {names:?}"),
        );
    }
    let Some(Value::String(encoded)) = object.get(field) else {
        return kms.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &format!("missing string field {field:?}"));
    };
    let Ok(bytes) = STANDARD.decode(encoded) else {
        return kms.reject(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &format!("{field} is not base64"));
    };
    let aad = kms.key_name.as_bytes();
    if op == "encrypt" {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = kms.cipher.encrypt(&Nonce::from(nonce), Payload { msg: &bytes, aad }).unwrap();
        let ciphertext = [FAKE_PREFIX, &nonce, &sealed].concat();
        Json(json!({
            "name": format!("{}/cryptoKeyVersions/1", kms.key_name),
            "ciphertext": STANDARD.encode(ciphertext),
            "ciphertextCrc32c": "0",
            "verifiedPlaintextCrc32c": false,
            "protectionLevel": "SOFTWARE",
        }))
        .into_response()
    } else {
        let invalid = || {
            google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        };
        let Some(rest) = bytes.strip_prefix(FAKE_PREFIX).filter(|r| r.len() >= 12 + 16) else {
            return invalid();
        };
        let (nonce, sealed) = rest.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().unwrap();
        match kms.cipher.decrypt(&Nonce::from(nonce), Payload { msg: sealed, aad }) {
            Ok(plaintext) => Json(
                json!({"plaintext": STANDARD.encode(plaintext), "usedPrimary": true, "protectionLevel": "SOFTWARE"}),
            )
            .into_response(),
            Err(_) => invalid(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the GCE metadata server

struct FakeMetadata {
    hits: AtomicUsize,
    expires_in: u64,
    /// Answer with this status instead of a token.
    status: Option<StatusCode>,
}

impl FakeMetadata {
    fn new(expires_in: u64) -> Arc<Self> {
        Arc::new(Self { hits: AtomicUsize::new(0), expires_in, status: None })
    }
}

/// Hands out `meta-token-1`, `meta-token-2`, … so tests can tell fetches apart.
async fn fake_metadata(State(md): State<Arc<FakeMetadata>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method != Method::GET || uri.path() != "/computeMetadata/v1/instance/service-accounts/default/token" {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    }
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header.").into_response();
    }
    let n = md.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(status) = md.status {
        return (status, "<html>oops</html>").into_response();
    }
    Json(json!({"access_token": format!("meta-token-{n}"), "expires_in": md.expires_in, "token_type": "Bearer"}))
        .into_response()
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn start_kms(token: &str) -> (Arc<FakeKms>, String) {
    let kms = FakeKms::new(token);
    let url = serve(Router::new().fallback(fake_kms).with_state(kms.clone())).await;
    (kms, url)
}

async fn start_metadata(md: Arc<FakeMetadata>) -> String {
    serve(Router::new().fallback(fake_metadata).with_state(md)).await
}

fn static_kms(endpoint: &str, token: &str) -> GcpKms {
    GcpKms::new(KEY_NAME, Some(endpoint), TokenSource::Static(token.into())).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The contract against each implementation

#[tokio::test]
async fn local_key_file_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let km = LocalKeyFile::open_or_create(dir.path().join("keys/nested/kek.b64")).unwrap();
    key_manager_contract(&km, "LocalKeyFile").await;
}

#[tokio::test]
async fn gcp_kms_meets_the_contract() {
    let (fake, endpoint) = start_kms(TOKEN).await;
    let km = static_kms(&endpoint, TOKEN);
    key_manager_contract(&km, "GcpKms").await;
    assert_eq!(fake.shape_errors(), Vec::<String>::new());
    assert!(fake.hits.load(Ordering::SeqCst) >= 10);
    assert_eq!(km.describe(), format!("gcpkms://{KEY_NAME} at {endpoint}"));
}

#[tokio::test]
async fn gcp_kms_from_url_with_metadata_tokens_meets_the_contract_and_caches_the_token() {
    let md = FakeMetadata::new(3599);
    let metadata = start_metadata(md.clone()).await;
    let (fake, endpoint) = start_kms("meta-token-1").await;
    let options = KmsOptions { endpoint: Some(endpoint), token: None, metadata_endpoint: Some(metadata) };
    let km = key_manager_from_url(&format!("gcpkms://{KEY_NAME}"), &options).unwrap();

    let wrapped = km.wrap(&[1u8; 32]).await.unwrap();
    assert_eq!(md.hits.load(Ordering::SeqCst), 1);
    assert_eq!(km.unwrap(&wrapped).await.unwrap(), vec![1u8; 32]);
    assert_eq!(md.hits.load(Ordering::SeqCst), 1, "second call must use the cached token");

    key_manager_contract(km.as_ref(), "GcpKms via metadata").await;
    assert_eq!(md.hits.load(Ordering::SeqCst), 1);
    assert_eq!(fake.shape_errors(), Vec::<String>::new());
}

#[tokio::test]
async fn expiring_metadata_tokens_are_fetched_again() {
    let md = FakeMetadata::new(0);
    let metadata = start_metadata(md.clone()).await;
    let (fake, endpoint) = start_kms("meta-token-1").await;
    let km = GcpKms::new(KEY_NAME, Some(&endpoint), TokenSource::Metadata { endpoint: metadata }).unwrap();
    km.wrap(&[1u8; 32]).await.unwrap();
    // The token expired at once, so the next call must fetch (and present) the next one.
    *fake.token.lock().unwrap() = "meta-token-2".into();
    km.wrap(&[1u8; 32]).await.unwrap();
    assert_eq!(md.hits.load(Ordering::SeqCst), 2);
    assert_eq!(fake.shape_errors(), Vec::<String>::new());
}

#[tokio::test]
async fn a_rejected_token_is_dropped_from_the_cache() {
    let md = FakeMetadata::new(3599);
    let metadata = start_metadata(md.clone()).await;
    let (fake, endpoint) = start_kms("meta-token-2").await;
    let km = GcpKms::new(KEY_NAME, Some(&endpoint), TokenSource::Metadata { endpoint: metadata }).unwrap();
    assert!(matches!(km.wrap(&[1u8; 32]).await, Err(CryptoError::Kms { status: 401, .. })));
    let wrapped = km.wrap(&[1u8; 32]).await.unwrap();
    km.unwrap(&wrapped).await.unwrap();
    assert_eq!(md.hits.load(Ordering::SeqCst), 2, "401 must drop the cached token, and only once");
    assert_eq!(fake.shape_errors().len(), 1);
}

#[tokio::test]
async fn metadata_server_errors_are_reported() {
    let md = Arc::new(FakeMetadata {
        hits: AtomicUsize::new(0),
        expires_in: 3599,
        status: Some(StatusCode::SERVICE_UNAVAILABLE),
    });
    let metadata = start_metadata(md.clone()).await;
    let (_fake, endpoint) = start_kms(TOKEN).await;
    let km = GcpKms::new(KEY_NAME, Some(&endpoint), TokenSource::Metadata { endpoint: metadata }).unwrap();
    let err = km.wrap(&[1u8; 32]).await.unwrap_err();
    assert!(matches!(err, CryptoError::Token { status: Some(503), .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(!err.to_string().contains("oops"), "non-Google bodies are not quoted: {err}");

    // Nothing listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let km = GcpKms::new(KEY_NAME, Some(&endpoint), TokenSource::Metadata { endpoint: closed }).unwrap();
    let err = km.wrap(&[1u8; 32]).await.unwrap_err();
    assert!(matches!(err, CryptoError::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn kms_errors_carry_status_and_google_message() {
    let (fake, endpoint) = start_kms(TOKEN).await;
    let km = static_kms(&endpoint, TOKEN);
    let denied = "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource \
                  'projects/test-proj/locations/europe-west1/keyRings/cohort/cryptoKeys/kek' (or it may not exist).";
    *fake.forced.lock().unwrap() = Some((
        StatusCode::FORBIDDEN,
        json!({"error": {"code": 403, "message": denied, "status": "PERMISSION_DENIED"}}).to_string(),
    ));
    let err = km.wrap(&random_key()).await.unwrap_err();
    match &err {
        CryptoError::Kms { operation, status, message } => {
            assert_eq!((*operation, *status), ("encrypt", 403));
            assert!(message.contains(denied) && message.contains("PERMISSION_DENIED"), "{message}");
        }
        other => panic!("expected a KMS error, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(shown.contains("403") && shown.contains("Permission 'cloudkms"), "{shown}");
    assert!(!err.is_retryable());

    *fake.forced.lock().unwrap() =
        Some((StatusCode::SERVICE_UNAVAILABLE, "<html>upstream echo: plaintext=AAAA</html>".into()));
    let err = km.unwrap(b"whatever").await.unwrap_err();
    assert!(matches!(err, CryptoError::Kms { operation: "decrypt", status: 503, .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(!err.to_string().contains("plaintext="), "non-Google bodies are not quoted: {err}");

    *fake.forced.lock().unwrap() = Some((StatusCode::OK, r#"{"name":"x"}"#.into()));
    let err = km.wrap(&random_key()).await.unwrap_err();
    assert!(matches!(err, CryptoError::BadResponse { .. }), "{err:?}");
}

#[tokio::test]
async fn a_wrong_static_token_is_a_401() {
    let (fake, endpoint) = start_kms(TOKEN).await;
    let err = static_kms(&endpoint, "wrong").wrap(&random_key()).await.unwrap_err();
    assert!(matches!(err, CryptoError::Kms { status: 401, .. }), "{err:?}");
    assert!(err.to_string().contains("UNAUTHENTICATED"), "{err}");
    assert!(!err.to_string().contains("wrong"), "the token must not appear: {err}");
    assert_eq!(fake.shape_errors().len(), 1);
}

#[tokio::test]
async fn unreachable_kms_is_unavailable() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = static_kms(&closed, TOKEN).wrap(&random_key()).await.unwrap_err();
    assert!(matches!(err, CryptoError::Unavailable { service: "Cloud KMS", .. }), "{err:?}");
    assert!(!err.to_string().contains(TOKEN));
}

// ---------------------------------------------------------------------------------------------
// LocalKeyFile specifics

#[tokio::test]
async fn local_key_file_is_private_and_stable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/kek");
    let km = LocalKeyFile::open_or_create(&path).unwrap();
    assert_eq!(km.path(), path);
    assert_eq!(km.describe(), format!("file:{}", path.display()));
    let contents = std::fs::read_to_string(&path).unwrap();
    assert_eq!(STANDARD.decode(contents.trim()).unwrap().len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o077, 0);
    }

    let dk = random_key();
    let wrapped = km.wrap(&dk).await.unwrap();
    drop(km);
    let reopened = LocalKeyFile::open_or_create(&path).unwrap();
    assert_eq!(reopened.unwrap(&wrapped).await.unwrap(), dk);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), contents, "reopening must not rewrite the key");
    assert_eq!(LocalKeyFile::open(&path).unwrap().unwrap(&wrapped).await.unwrap(), dk);

    // A different key file cannot unwrap it.
    let foreign = LocalKeyFile::open_or_create(dir.path().join("other")).unwrap();
    assert!(matches!(foreign.unwrap(&wrapped).await, Err(CryptoError::Decrypt { .. })));
}

#[test]
fn bad_key_files_are_named_but_not_quoted() {
    let dir = tempfile::tempdir().unwrap();
    let short = STANDARD.encode([0x5au8; 16]);
    let cases = [
        ("short", format!("{short}\n"), "16 bytes"),
        ("long", STANDARD.encode([0x5au8; 48]), "48 bytes"),
        ("not-base64", "QUJD*&^%RUZH===not-base64!\n".to_string(), "base64"),
        ("empty", String::new(), "empty"),
    ];
    for (name, contents, expect) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &contents).unwrap();
        let err = LocalKeyFile::open_or_create(&path).unwrap_err();
        assert!(matches!(err, CryptoError::BadKeyFile { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains(expect), "{name}: {msg}");
        if !contents.is_empty() {
            assert!(!msg.contains(contents.trim()) && !msg.contains(&short), "{name} quotes the key: {msg}");
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), contents, "{name}: a bad file must not be replaced");
    }
    let err = LocalKeyFile::open_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, CryptoError::BadKeyFile { .. } | CryptoError::Io { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// key_manager_from_url

#[tokio::test]
async fn file_urls_open_local_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek");
    let km = key_manager_from_url(&format!("file://{}", path.display()), &KmsOptions::default()).unwrap();
    assert_eq!(km.describe(), format!("file:{}", path.display()));
    assert!(path.exists());
    let same = key_manager_from_url(&format!("file:{}", path.display()), &KmsOptions::default()).unwrap();
    assert_eq!(same.unwrap(&km.wrap(b"k").await.unwrap()).await.unwrap(), b"k");
}

#[tokio::test]
async fn gcpkms_urls_take_a_static_token_from_options() {
    let (fake, endpoint) = start_kms(TOKEN).await;
    let options = KmsOptions { endpoint: Some(endpoint), token: Some(TOKEN.into()), metadata_endpoint: None };
    let km = key_manager_from_url(&format!("gcpkms://{KEY_NAME}"), &options).unwrap();
    assert_eq!(km.unwrap(&km.wrap(b"k").await.unwrap()).await.unwrap(), b"k");
    assert_eq!(fake.shape_errors(), Vec::<String>::new());
}

#[test]
fn bad_urls_are_clear_errors() {
    let opts = KmsOptions::default();
    let err = key_manager_from_url("awskms://arn:aws:kms:eu-west-1:1:key/x", &opts).err().unwrap();
    assert!(matches!(err, CryptoError::UnknownScheme { ref scheme } if scheme == "awskms"), "{err:?}");
    assert!(err.to_string().contains("gcpkms://") && err.to_string().contains("file:"), "{err}");
    for bad in
        ["gcpkms://projects/p/keyRings/r", "gcpkms://", "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k/"]
    {
        let err = key_manager_from_url(bad, &opts).err().unwrap();
        assert!(matches!(err, CryptoError::InvalidConfig(_)), "{bad}: {err:?}");
        assert!(err.to_string().contains("projects/PROJECT/locations/LOCATION"), "{err}");
    }
    let err = key_manager_from_url(
        &format!("gcpkms://{KEY_NAME}"),
        &KmsOptions { endpoint: Some("ftp://x".into()), ..Default::default() },
    )
    .err()
    .unwrap();
    assert!(matches!(err, CryptoError::InvalidConfig(_)), "{err:?}");
}
