//! Data-key encryption of individual field values, and the wrapped data-key record.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{decode_base64_lenient, hex, CryptoError, KeyManager};

/// Length of a data key (AES-256).
pub const KEY_LEN: usize = 32;
/// Prefix of every sealed value; the version lets the format change without guessing.
pub const SEALED_PREFIX: &str = "enc:v1:";

pub(crate) const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bound into every sealed value, so a token only opens as an `enc:v1` token.
const SEAL_AAD: &[u8] = b"cohort/enc/v1";

/// A data key ready to seal and open field values with AES-256-GCM.
pub struct Envelope {
    key: Zeroizing<[u8; KEY_LEN]>,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Envelope { key: <redacted> }")
    }
}

impl Envelope {
    /// A fresh random data key. The raw key is returned so it can be wrapped; drop it soon
    /// (it zeroizes itself). [`new_data_key`] does both steps.
    pub fn generate() -> (Self, Zeroizing<[u8; KEY_LEN]>) {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(key.as_mut_slice());
        (Self::from_array(&key), key)
    }

    /// Wraps an existing 32-byte data key (e.g. one just unwrapped by a [`KeyManager`]).
    pub fn from_key(key: &[u8]) -> Result<Self, CryptoError> {
        let key: &[u8; KEY_LEN] = key.try_into().map_err(|_| CryptoError::KeyLength {
            what: "data key",
            len: key.len(),
            expected: KEY_LEN,
        })?;
        Ok(Self::from_array(key))
    }

    fn from_array(key: &[u8; KEY_LEN]) -> Self {
        Self { key: Zeroizing::new(*key), cipher: Aes256Gcm::new(key.into()) }
    }

    pub(crate) fn key_bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// Encrypts a value into `enc:v1:<base64url(nonce || ciphertext+tag)>`. A random nonce per call
    /// means equal values give different tokens; use [`super::KeyedHasher`] for look-ups.
    ///
    /// # Panics
    /// Only if `plaintext` exceeds AES-GCM's 64 GiB per-message limit.
    pub fn seal(&self, plaintext: &str) -> String {
        match aead_seal(&self.cipher, SEAL_AAD, plaintext.as_bytes()) {
            Ok(sealed) => {
                let mut token = String::with_capacity(SEALED_PREFIX.len() + (sealed.len() * 4).div_ceil(3));
                token.push_str(SEALED_PREFIX);
                URL_SAFE_NO_PAD.encode_string(sealed, &mut token);
                token
            }
            Err(_) => panic!("value too large for AES-GCM ({} bytes)", plaintext.len()),
        }
    }

    /// Decrypts a token from [`Envelope::seal`]; fails if it was altered or sealed under another key.
    pub fn open(&self, token: &str) -> Result<String, CryptoError> {
        const WHAT: &str = "sealed value";
        let body = token
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| CryptoError::malformed(WHAT, format!("does not start with {SEALED_PREFIX:?}")))?;
        let sealed = URL_SAFE_NO_PAD.decode(body).map_err(|_| CryptoError::malformed(WHAT, "not base64url"))?;
        let plaintext = aead_open(&self.cipher, SEAL_AAD, &sealed, WHAT)?;
        String::from_utf8(plaintext).map_err(|_| CryptoError::malformed(WHAT, "decrypted value is not UTF-8"))
    }

    /// Whether a stored string looks like a sealed value. See [`is_sealed`].
    pub fn is_sealed(s: &str) -> bool {
        is_sealed(s)
    }
}

/// Whether a stored string looks like a sealed value (prefix plus enough base64url for a nonce and
/// tag), so migrations can seal legacy plaintext in place and skip what is done. A plaintext that
/// happens to have this exact shape is indistinguishable; do not rely on it for untrusted input.
pub fn is_sealed(s: &str) -> bool {
    const MIN_BODY: usize = ((NONCE_LEN + TAG_LEN) * 4).div_ceil(3);
    s.strip_prefix(SEALED_PREFIX).is_some_and(|body| {
        body.len() >= MIN_BODY
            && body.len() % 4 != 1
            && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// `nonce || ciphertext+tag` under a fresh random 96-bit nonce.
pub(crate) fn aead_seal(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, aes_gcm::Error> {
    let mut nonce = [0u8; NONCE_LEN];
    // The thread's CSPRNG (ChaCha, reseeded from the OS): a getrandom system call per sealed
    // field was a quarter of sealing's cost.
    rand::thread_rng().fill_bytes(&mut nonce);
    let ciphertext = cipher.encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad })?;
    let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Inverse of [`aead_seal`].
pub(crate) fn aead_open(
    cipher: &Aes256Gcm,
    aad: &[u8],
    sealed: &[u8],
    what: &'static str,
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::malformed(what, format!("{} bytes, shorter than nonce and tag", sealed.len())));
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::malformed(what, "bad nonce"))?;
    cipher.decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad }).map_err(|_| CryptoError::Decrypt { what })
}

/// A data key as stored: wrapped by the KEK, never in the clear. Safe to persist and to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Random id (`dk_<32 hex>`), so stored rows can name the key that sealed them.
    pub key_id: String,
    /// [`KeyManager::describe`] of the KEK that wrapped it, to diagnose a mismatched config.
    pub kek: String,
    /// The wrapped key, standard base64.
    pub wrapped: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
}

/// Generates a data key and wraps it with `km`: persist the [`WrappedKey`], use the [`Envelope`].
pub async fn new_data_key(km: &dyn KeyManager) -> Result<(Envelope, WrappedKey), CryptoError> {
    let (envelope, raw) = Envelope::generate();
    let wrapped = km.wrap(raw.as_slice()).await?;
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let record = WrappedKey {
        key_id: format!("dk_{}", hex(&id)),
        kek: km.describe(),
        wrapped: STANDARD.encode(wrapped),
        created_at: now_rfc3339(),
    };
    Ok((envelope, record))
}

/// Unwraps a stored data key with `km`.
pub async fn open_data_key(km: &dyn KeyManager, record: &WrappedKey) -> Result<Envelope, CryptoError> {
    let wrapped = decode_base64_lenient(&record.wrapped).map_err(|_| {
        CryptoError::malformed("wrapped key record", format!("{}: wrapped is not base64", record.key_id))
    })?;
    let current = km.describe();
    if record.kek != current {
        tracing::warn!(key_id = %record.key_id, wrapped_by = %record.kek, key_manager = %current,
            "data key was wrapped by a different key manager; trying to unwrap anyway");
    }
    let raw = Zeroizing::new(km.unwrap(&wrapped).await?);
    Envelope::from_key(&raw)
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without pulling in a date crate.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let (env, _) = Envelope::generate();
        for value in ["", "a@b.example", "+44 20 7946 0000", "Zoë Ångström 🎓 — 你好", &"x".repeat(10_000)] {
            let token = env.seal(value);
            assert!(token.starts_with("enc:v1:"), "{token}");
            assert!(is_sealed(&token) && Envelope::is_sealed(&token));
            assert!(!token.contains(value) || value.is_empty());
            assert_eq!(env.open(&token).unwrap(), value);
        }
    }

    #[test]
    fn two_seals_differ() {
        let (env, _) = Envelope::generate();
        let (a, b) = (env.seal("same"), env.seal("same"));
        assert_ne!(a, b);
        assert_eq!(env.open(&a).unwrap(), env.open(&b).unwrap());
    }

    /// A repeated nonce under one key would break AES-GCM: every seal, on any thread, draws
    /// a fresh one.
    #[test]
    fn nonces_do_not_repeat_across_seals_and_threads() {
        let (env, _) = Envelope::generate();
        let env = std::sync::Arc::new(env);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let env = env.clone();
                std::thread::spawn(move || {
                    (0..5_000)
                        .map(|_| {
                            let body = URL_SAFE_NO_PAD.decode(&env.seal("same")[SEALED_PREFIX.len()..]).unwrap();
                            body[..NONCE_LEN].to_vec()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let nonces: Vec<Vec<u8>> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let distinct: std::collections::HashSet<&Vec<u8>> = nonces.iter().collect();
        assert_eq!(distinct.len(), 20_000);
    }

    #[test]
    fn another_key_fails() {
        let (env, _) = Envelope::generate();
        let (other, _) = Envelope::generate();
        let err = other.open(&env.seal("secret@example.com")).unwrap_err();
        assert!(matches!(err, CryptoError::Decrypt { .. }), "{err:?}");
    }

    #[test]
    fn tampered_tokens_fail() {
        let (env, _) = Envelope::generate();
        let token = env.seal("secret@example.com");
        let body = URL_SAFE_NO_PAD.decode(&token[SEALED_PREFIX.len()..]).unwrap();
        for i in [0, NONCE_LEN, body.len() - 1] {
            let mut bad = body.clone();
            bad[i] ^= 0x01;
            let bad = format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bad));
            assert!(matches!(env.open(&bad), Err(CryptoError::Decrypt { .. })), "byte {i}");
        }
        let truncated = format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(&body[..body.len() - 1]));
        assert!(matches!(env.open(&truncated), Err(CryptoError::Decrypt { .. })));
        for bad in ["", "secret@example.com", "enc:v1:", "enc:v1:!!!!", "enc:v2:AAAA", "enc:v1:AAAA"] {
            let err = env.open(bad).unwrap_err();
            assert!(matches!(err, CryptoError::Malformed { .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn errors_and_debug_reveal_nothing() {
        let (env, raw) = Envelope::generate();
        let debug = format!("{env:?}");
        assert!(
            !debug.contains(&STANDARD.encode(raw.as_slice())) && !debug.contains(&format!("{:?}", raw[0..4].to_vec()))
        );
        let (other, _) = Envelope::generate();
        let msg = other.open(&env.seal("jane@example.com")).unwrap_err().to_string();
        assert!(!msg.contains("jane"), "{msg}");
    }

    #[test]
    fn is_sealed_rejects_plain_values() {
        for s in [
            "",
            "jane@example.com",
            "enc:v1:",
            "enc:v1:short",
            "enc:v1:has spaces in it and is long enough......",
            "ENC:V1:x",
        ] {
            assert!(!is_sealed(s), "{s}");
        }
    }

    #[test]
    fn from_key_checks_length() {
        assert!(matches!(Envelope::from_key(&[0u8; 16]), Err(CryptoError::KeyLength { len: 16, .. })));
        let (env, raw) = Envelope::generate();
        let again = Envelope::from_key(raw.as_slice()).unwrap();
        assert_eq!(again.open(&env.seal("x")).unwrap(), "x");
    }

    /// Pins the token format (made independently with Python's `cryptography`): a value sealed by
    /// this version must open in every later one.
    #[test]
    fn opens_a_pinned_token() {
        let env = Envelope::from_key(&[7u8; KEY_LEN]).unwrap();
        assert_eq!(env.open(PINNED_TOKEN).unwrap(), "jane@example.com");
    }
    const PINNED_TOKEN: &str = "enc:v1:AAECAwQFBgcICQoLcuCHFV1soSgawon5zDsDl7tB7cFqid_Bc0Yy1CrSY3w";

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z");
    }
}
