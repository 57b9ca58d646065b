//! The default key manager: a key-encryption key in a local file.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use super::envelope::{aead_open, aead_seal};
use super::{decode_base64_lenient, hex, CryptoError, KeyManager, KEY_LEN};

/// Bound into every wrapped key, so this file only unwraps what it wrapped for this purpose.
const WRAP_AAD: &[u8] = b"cohort/kek-wrap/v1";
/// A key file is 45 bytes; anything much larger is the wrong file.
const MAX_FILE_LEN: u64 = 4096;

/// A 32-byte AES-256-GCM key-encryption key, stored base64 in a file readable only by its owner.
/// Fine for one machine; back the file up, since losing it loses every sealed value.
pub struct LocalKeyFile {
    path: PathBuf,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for LocalKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LocalKeyFile {
    /// Opens an existing key file; a missing file is an error (use this once data exists, so a
    /// lost file is noticed instead of silently replaced).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CryptoError> {
        let path = absolute(path.as_ref())?;
        match read_key(&path)? {
            Some(key) => Ok(Self::with_key(path, &key)),
            None => Err(CryptoError::Io { path, source: ErrorKind::NotFound.into() }),
        }
    }

    /// Opens the key file, or creates it with a fresh random key (and its parent directories).
    /// Creation is atomic and never replaces an existing file, so two processes starting at once
    /// end up sharing one key.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<Self, CryptoError> {
        let path = absolute(path.as_ref())?;
        if let Some(key) = read_key(&path)? {
            return Ok(Self::with_key(path, &key));
        }
        if let Some(key) = create_key(&path)? {
            tracing::warn!(path = %path.display(), "created a new key-encryption key file; back it up");
            return Ok(Self::with_key(path, &key));
        }
        // Another process created it between our read and our create: use theirs.
        match read_key(&path)? {
            Some(key) => Ok(Self::with_key(path, &key)),
            None => Err(CryptoError::Io { path, source: ErrorKind::NotFound.into() }),
        }
    }

    /// Where the key lives (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_key(path: PathBuf, key: &[u8; KEY_LEN]) -> Self {
        Self { path, cipher: Aes256Gcm::new(key.into()) }
    }
}

#[async_trait]
impl KeyManager for LocalKeyFile {
    async fn wrap(&self, data_key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        aead_seal(&self.cipher, WRAP_AAD, data_key).map_err(|_| CryptoError::KeyLength {
            what: "data key",
            len: data_key.len(),
            expected: KEY_LEN,
        })
    }

    async fn unwrap(&self, wrapped: &[u8]) -> Result<Vec<u8>, CryptoError> {
        aead_open(&self.cipher, WRAP_AAD, wrapped, "wrapped data key")
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

fn absolute(path: &Path) -> Result<PathBuf, CryptoError> {
    if path.as_os_str().is_empty() {
        return Err(CryptoError::InvalidConfig("empty key file path".into()));
    }
    std::path::absolute(path).map_err(|source| CryptoError::Io { path: path.to_path_buf(), source })
}

fn bad(path: &Path, reason: impl Into<String>) -> CryptoError {
    CryptoError::BadKeyFile { path: path.to_path_buf(), reason: reason.into() }
}

/// The key in `path`, or `None` if there is no such file.
fn read_key(path: &Path) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>, CryptoError> {
    let io = |source| CryptoError::Io { path: path.to_path_buf(), source };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(bad(path, format!("{} bytes, far too large for a key file", meta.len())));
    }
    warn_if_readable_by_others(path, &meta);
    let mut contents = Zeroizing::new(Vec::new());
    file.read_to_end(&mut contents).map_err(io)?;
    let text = std::str::from_utf8(&contents).map_err(|_| bad(path, "not text (expected base64 of 32 bytes)"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(bad(path, "empty (expected base64 of 32 random bytes)"));
    }
    // The decode error is dropped on purpose: it would quote a character of the key.
    let raw = Zeroizing::new(
        decode_base64_lenient(text).map_err(|_| bad(path, "not valid base64 (expected 32 random bytes)"))?,
    );
    let key: &[u8; KEY_LEN] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad(path, format!("decodes to {} bytes, expected {KEY_LEN}", raw.len())))?;
    Ok(Some(Zeroizing::new(*key)))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, meta: &fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "key file is accessible to other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path, _meta: &fs::Metadata) {}

/// Writes a fresh key to `path` unless it exists. `None` means another process won the race.
///
/// The key goes to a private temp file first and is then hard-linked into place: unlike a rename,
/// a link never replaces an existing file, so readers see either no file or a complete one. Where
/// links are unsupported it falls back to exclusive creation of the file itself.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CryptoError + '_ {
    move |source| CryptoError::Io { path: path.to_path_buf(), source }
}

fn create_key(path: &Path) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>, CryptoError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_private_dir(dir).map_err(io(dir))?;

    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(key.as_mut_slice());
    let mut contents = Zeroizing::new(STANDARD.encode(key.as_slice()));
    contents.push('\n');

    let mut suffix = [0u8; 8];
    OsRng.fill_bytes(&mut suffix);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "key".into());
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), hex(&suffix)));

    write_new_private(&tmp, contents.as_bytes()).map_err(io(&tmp))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
        Err(_) => match write_new_private(path, contents.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        },
    }
    sync_dir(dir);
    Ok(Some(key))
}

/// Creates `path` (failing if it exists) with mode 0600, writes and fsyncs it.
fn write_new_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Makes the new directory entry durable; best effort (not every platform can fsync a directory).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_creators_share_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || LocalKeyFile::open_or_create(&path).unwrap())
            })
            .collect();
        let managers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let wrapped = rt.block_on(managers[0].wrap(&[9u8; 32])).unwrap();
        for km in &managers {
            assert_eq!(rt.block_on(km.unwrap(&wrapped)).unwrap(), vec![9u8; 32]);
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("kek")], "temp files left behind");
    }

    #[test]
    fn open_without_create_fails_on_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalKeyFile::open(dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
