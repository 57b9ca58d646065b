//! The `cohort` binaries load DuckDB's shared library from `duckdb/` beside themselves, where
//! `adapters/build.rs` puts it (and where the image copies it), so they run without
//! `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/duckdb");
    }
}
