#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: cohort_fuzz::install_panic_hook(), |data: &[u8]| cohort_fuzz::checks::connector(data));
