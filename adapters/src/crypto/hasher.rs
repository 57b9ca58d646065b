//! Keyed hashes of personal data, so sealed values can be found by equality without decrypting.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{hex, CryptoError, Envelope, KEY_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Domain label for deriving the hashing secret from a data key, so one wrapped key serves both
/// sealing and hashing while the two keys stay independent.
const DERIVE_LABEL: &[u8] = b"cohort/lookup-hash/v1";
/// Separates kind from value so (`email`, `a`) and (`phone`, `a`) never collide.
const SEPARATOR: u8 = 0x1f;

/// HMAC-SHA256 with a secret key: unlike a plain hash, nobody without the key can confirm a guessed
/// email or phone number against a stored hash. Normalise values (lower-case email, E.164 phone)
/// before hashing: the hash is of the exact bytes.
pub struct KeyedHasher {
    secret: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedHasher { secret: <redacted> }")
    }
}

impl KeyedHasher {
    /// The hasher belonging to a data key: secret = HMAC(data_key, "cohort/lookup-hash/v1").
    pub fn derive(envelope: &Envelope) -> Self {
        Self { secret: Zeroizing::new(hmac(envelope.key_bytes(), &[DERIVE_LABEL])) }
    }

    /// A hasher from a 32-byte secret held elsewhere.
    pub fn from_secret(secret: &[u8]) -> Result<Self, CryptoError> {
        let secret: &[u8; KEY_LEN] = secret.try_into().map_err(|_| CryptoError::KeyLength {
            what: "hashing secret",
            len: secret.len(),
            expected: KEY_LEN,
        })?;
        Ok(Self { secret: Zeroizing::new(*secret) })
    }

    /// Deterministic look-up hash `h1:<64 lower-case hex>` of `kind` (e.g. `email`) and `value`.
    /// `kind` is a fixed label chosen by code and must not contain the 0x1f separator.
    pub fn hash(&self, kind: &str, value: &str) -> String {
        format!("h1:{}", hex(&self.digest(kind, value)))
    }

    /// Shorter pseudonym for the warehouse, `tok_<32 hex>` (the first 128 bits of [`Self::hash`]'s
    /// HMAC): stable per person so analytics can join on it, but not reversible without the key.
    pub fn token(&self, kind: &str, value: &str) -> String {
        let digest = self.digest(kind, value);
        format!("tok_{}", hex(&digest[..16]))
    }

    fn digest(&self, kind: &str, value: &str) -> [u8; 32] {
        debug_assert!(!kind.as_bytes().contains(&SEPARATOR), "hash kind must not contain 0x1f");
        hmac(&self.secret[..], &[kind.as_bytes(), &[SEPARATOR], value.as_bytes()])
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(byte: u8) -> KeyedHasher {
        KeyedHasher::from_secret(&[byte; 32]).unwrap()
    }

    #[test]
    fn deterministic_and_well_formed() {
        let h = hasher(1);
        let a = h.hash("email", "jane@example.com");
        assert_eq!(a, h.hash("email", "jane@example.com"));
        assert_eq!(a, hasher(1).hash("email", "jane@example.com"));
        let hex = a.strip_prefix("h1:").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{a}");
    }

    #[test]
    fn differs_by_kind_value_and_key() {
        let h = hasher(1);
        assert_ne!(h.hash("email", "a"), h.hash("phone", "a"));
        assert_ne!(h.hash("email", "a"), h.hash("email", "b"));
        assert_ne!(h.hash("ab", "c"), h.hash("a", "bc"));
        assert_ne!(h.hash("email", "a"), hasher(2).hash("email", "a"));
    }

    #[test]
    fn token_format() {
        let h = hasher(1);
        let t = h.token("email", "jane@example.com");
        let hex = t.strip_prefix("tok_").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{t}");
        assert_eq!(t, h.token("email", "jane@example.com"));
        assert_ne!(t, h.token("phone", "jane@example.com"));
        assert!(h.hash("email", "jane@example.com").starts_with(&format!("h1:{hex}")));
    }

    #[test]
    fn derived_from_the_data_key() {
        let (env, raw) = Envelope::generate();
        let again = Envelope::from_key(raw.as_slice()).unwrap();
        assert_eq!(KeyedHasher::derive(&env).hash("email", "a"), KeyedHasher::derive(&again).hash("email", "a"));
        let (other, _) = Envelope::generate();
        assert_ne!(KeyedHasher::derive(&env).hash("email", "a"), KeyedHasher::derive(&other).hash("email", "a"));
        // The hashing secret is not the data key itself.
        assert_ne!(
            KeyedHasher::derive(&env).hash("email", "a"),
            KeyedHasher::from_secret(&raw[..]).unwrap().hash("email", "a")
        );
        assert!(!format!("{:?}", KeyedHasher::derive(&env)).contains(&hex(&raw[..])));
    }

    #[test]
    fn from_secret_checks_length() {
        assert!(matches!(KeyedHasher::from_secret(&[0u8; 31]), Err(CryptoError::KeyLength { len: 31, .. })));
    }

    /// Pinned vectors (computed independently): changing the derivation would orphan every stored hash.
    #[test]
    fn known_answers() {
        assert_eq!(hasher(7).hash("email", "jane@example.com"), PINNED_HASH);
        let derived = KeyedHasher::derive(&Envelope::from_key(&[7u8; 32]).unwrap());
        assert_eq!(derived.hash("phone", "+447700900123"), PINNED_DERIVED);
    }
    const PINNED_HASH: &str = "h1:660020efdf1a9917193b23c608e0fa23d830f19cc7ed5f78f7eeaf6b3561105e";
    const PINNED_DERIVED: &str = "h1:25a3e0b537d30938835bfde2aa8b097e162219370160770fe530872fcfdf4eee";
}
