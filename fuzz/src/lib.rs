//! Shared by the fuzz targets: the checks (also replayed by `cargo test`, see `checks.rs`) and
//! the panic policy.

pub mod checks;

/// Makes every panic a crash libFuzzer reports, except panics inside the `phonenumber` crate:
/// `normalize_phone` runs that parser under `catch_unwind` on purpose (it has internal unwraps),
/// so those panics are handled in production and are not findings. libfuzzer-sys's own hook
/// aborts on any panic, caught or not; this one delegates to it for everything else.
pub fn install_panic_hook() {
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_phonenumber = info.location().is_some_and(|l| {
            let file = l.file().replace('\\', "/");
            file.contains("/phonenumber-") || file.starts_with("phonenumber-")
        });
        if !in_phonenumber {
            abort_hook(info);
        }
    }));
}
