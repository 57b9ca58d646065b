//! Puts DuckDB's shared library (the embedded warehouse's engine) where the linker and the built
//! programs find it.
//!
//! `libduckdb-sys` can compile DuckDB from source, but that is about 1,800 C++ files: hours on a
//! two-core machine. Instead this takes the official prebuilt `libduckdb.so` of the same DuckDB
//! release (published to the npm registry as `@duckdb/node-bindings-linux-x64`), checks its
//! SHA-256, caches it under `~/.cache/cohort/duckdb/` and copies it to `target/<profile>/duckdb/`.
//! Cargo puts that folder on the library path of `cargo run` and `cargo test`; the `cohort`
//! binaries also carry it as an rpath (`$ORIGIN/duckdb`). Offline, point `COHORT_DUCKDB_LIB` at a
//! `libduckdb.so` of DuckDB 1.5.6.

use std::env;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The DuckDB release the `duckdb` crate's C API bindings were generated for (crate 1.10506.0).
const RELEASE: &str = "1.5.6-r.1";
const TARBALL_URL: &str =
    "https://registry.npmjs.org/@duckdb/node-bindings-linux-x64/-/node-bindings-linux-x64-1.5.6-r.1.tgz";
const TARBALL_SHA256: &str = "1b9f82478539bb9a1d1df44bd103121a12ae52142c07158dc52b97d2ec1d69ff";
const LIB: &str = "libduckdb.so";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=COHORT_DUCKDB_LIB");
    println!("cargo:rerun-if-env-changed=COHORT_CACHE_DIR");
    if let Err(e) = run() {
        panic!("DuckDB library: {e}");
    }
}

fn run() -> Result<(), String> {
    let source = match env::var_os("COHORT_DUCKDB_LIB") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            if !path.is_file() {
                return Err(format!("COHORT_DUCKDB_LIB={} is not a file", path.display()));
            }
            path
        }
        None => cached_or_fetched()?,
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    // OUT_DIR is target/<profile>/build/<crate>-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("cannot find the profile folder above {}", out_dir.display()))?;
    let dest_dir = profile_dir.join("duckdb");
    fs::create_dir_all(&dest_dir).map_err(|e| format!("creating {}: {e}", dest_dir.display()))?;
    let dest = dest_dir.join(LIB);
    if !same_size(&source, &dest) {
        // Copy then rename: a program running from this folder never sees half a library.
        let tmp = dest_dir.join(format!("{LIB}.tmp"));
        fs::copy(&source, &tmp).map_err(|e| format!("copying {} to {}: {e}", source.display(), tmp.display()))?;
        fs::rename(&tmp, &dest).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    println!("cargo:rustc-link-search=native={}", dest_dir.display());
    Ok(())
}

fn same_size(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.len() == b.len(),
        _ => false,
    }
}

/// The cached library, downloaded and verified first if it is not there yet.
fn cached_or_fetched() -> Result<PathBuf, String> {
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        return Err(format!(
            "no pinned prebuilt DuckDB for {target}: set COHORT_DUCKDB_LIB to a libduckdb of DuckDB 1.5.6"
        ));
    }
    let cache = match env::var_os("COHORT_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env::var_os("HOME").ok_or("HOME is not set; set COHORT_CACHE_DIR")?).join(".cache/cohort")
        }
    };
    let dir = cache.join("duckdb").join(RELEASE);
    let lib = dir.join(LIB);
    if lib.is_file() {
        return Ok(lib);
    }
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Names of this process alone: two first builds at once must not share half-written files.
    let tarball = dir.join(format!("bindings.{}.tgz", std::process::id()));
    let fetched = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--location", "--retry", "3", "--output"])
        .arg(&tarball)
        .arg(TARBALL_URL)
        .status()
        .map_err(|e| format!("running curl to fetch {TARBALL_URL}: {e} (or set COHORT_DUCKDB_LIB)"))?;
    if !fetched.success() {
        return Err(format!("curl could not fetch {TARBALL_URL} ({fetched}); set COHORT_DUCKDB_LIB to work offline"));
    }
    let digest = sha256_of(&tarball)?;
    if digest != TARBALL_SHA256 {
        let _ = fs::remove_file(&tarball);
        return Err(format!("{TARBALL_URL} has SHA-256 {digest}, expected {TARBALL_SHA256}"));
    }
    let staging = dir.join(format!("unpacked.{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    let unpacked = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .arg(format!("package/{LIB}"))
        .status()
        .map_err(|e| format!("running tar: {e}"))?;
    if !unpacked.success() {
        return Err(format!("tar could not unpack {LIB} from {} ({unpacked})", tarball.display()));
    }
    fs::rename(staging.join("package").join(LIB), &lib).map_err(|e| format!("placing {}: {e}", lib.display()))?;
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&tarball);
    Ok(lib)
}

fn sha256_of(path: &Path) -> Result<String, String> {
    let mut file = fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
