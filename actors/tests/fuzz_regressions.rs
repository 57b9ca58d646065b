//! Replays the fuzzing corpus under `cargo test`, on stable, so CI keeps checking it.
//!
//! Every file of `fuzz/corpus/<target>/` (the committed seeds) and `fuzz/regressions/<target>/`
//! (minimised inputs of crashes the fuzzer found, kept after the fix) goes through the same
//! entry point and the same invariants as the fuzz target of that name: the checks live in
//! `fuzz/src/checks.rs`, compiled here too, so a finding cannot be "fixed" in one place only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted; none if the directory does not exist.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file() && !is_hidden(p)).collect();
    files.sort();
    files
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

fn check(name: &str) -> checks::Check {
    checks::TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).unwrap()
}

/// Runs one target's seeds and regressions; returns how many inputs were replayed.
fn replay(target: &str) -> usize {
    let run = check(target);
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        for path in inputs(kind, target) {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} breaks an invariant (see the panic above)", path.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn every_fuzz_target_has_a_check_and_seeds() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in checks::TARGETS {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "{name} is not a fuzz target in fuzz/Cargo.toml");
        let seeds = inputs("corpus", name);
        assert!(seeds.len() >= 2, "fuzz/corpus/{name} needs seeds, found {}", seeds.len());
    }
}

#[test]
fn segment_corpus() {
    assert!(replay("segment") > 0);
}

#[test]
fn connector_corpus() {
    assert!(replay("connector") > 0);
}

#[test]
fn twilio_corpus() {
    assert!(replay("twilio") > 0);
}

#[test]
fn sendgrid_corpus() {
    assert!(replay("sendgrid") > 0);
}

#[test]
fn salesforce_cdc_corpus() {
    assert!(replay("salesforce_cdc") > 0);
}

#[test]
fn salesforce_csv_corpus() {
    assert!(replay("salesforce_csv") > 0);
}

#[test]
fn signatures_corpus() {
    assert!(replay("signatures") > 0);
}

#[test]
fn segment_rules_corpus() {
    assert!(replay("segment_rules") > 0);
}

#[test]
fn config_corpus() {
    assert!(replay("config") > 0);
}

/// Finding of `segment_rules`: every nesting level of a rule was a level of recursion in the
/// parser, validator and evaluator, so a rule of a few thousand `(`, `[` or `not` (a 500 kB
/// `PUT /v1/segments` body allows far more) overflowed the stack and aborted the process. Deep
/// nesting is now a rule error at the column where the limit is passed.
#[test]
fn deeply_nested_rules_are_refused_not_a_stack_overflow() {
    use cohort_actors::segments::lang::compile;
    for (open, close) in [("(", ")"), ("[", "]"), ("not ", ""), ("!", ""), ("has(", ")")] {
        let rule = format!("{}x{}", open.repeat(100_000), close.repeat(100_000));
        let err = compile(&rule, &[]).unwrap_err();
        assert!(err.message.contains("nests more than 64 levels"), "{open}: {}", err.message);
        assert_eq!(err.column, open.chars().count() * 64 + 1, "{open}: the column of the 65th level");
    }
    // Realistic nesting is unaffected.
    let nested = format!("{}enrollment_status == \"inquiry\"{}", "(".repeat(64), ")".repeat(64));
    assert!(compile(&nested, &[]).is_ok());
    assert!(compile(&format!("{}consent.email", "not ".repeat(64)), &[]).is_ok());
}
