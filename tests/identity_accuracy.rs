//! The accuracy promise of identity matching, on synthetic EU students with known truth: the
//! same code as `cohort identity dedupe` and `link`, the targets as assertions.
//! (Speed is reported by `cohort-identity-bench`, not asserted here.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::synth;
use cohort_actors::normalize::NormalizeOptions;
use std::collections::HashMap;

fn read_pairs(path: &std::path::Path) -> Vec<(String, String)> {
    let mut r = csv::Reader::from_path(path).unwrap();
    r.records().map(|row| row.unwrap()).map(|row| (row[0].to_string(), row[1].to_string())).collect()
}

#[test]
fn dedupe_and_link_reach_the_accuracy_targets_and_never_merge_a_family_through_its_phone() {
    let dir = tempfile::tempdir().unwrap();
    let opts = NormalizeOptions::default();
    let map = cohort::dedupe::parse_map(&synth::column_map()).unwrap();
    for seed in [3, 11] {
        let data = synth::generate(8_000, seed);
        let people = dir.path().join("people.csv");
        data.write_csv(&people).unwrap();
        let clusters = dir.path().join("clusters.csv");
        cohort::dedupe::dedupe(&people, &map, &clusters, 0.85, &opts).unwrap();
        let cluster_of: HashMap<String, String> = read_pairs(&clusters).into_iter().collect();
        let eval = synth::evaluate_clusters(&data, &cluster_of).unwrap();
        assert!(eval.complete.true_pairs > 1_000, "enough duplicates to measure: {eval:?}");
        assert!(eval.complete.f1 >= 0.99, "seed {seed}: F1 with name, birthday and address: {eval:?}");
        assert!(eval.all.f1 >= 0.98, "seed {seed}: {eval:?}");
        assert_eq!(eval.false_pairs_sharing_a_phone, 0, "seed {seed}: a family phone merged siblings");

        let (left, right) = synth::link_split(&data);
        let (l, r, out) = (dir.path().join("l.csv"), dir.path().join("r.csv"), dir.path().join("pairs.csv"));
        data.write_subset(&l, &left).unwrap();
        data.write_subset(&r, &right).unwrap();
        cohort::dedupe::link(&l, &r, &map, &out, 0.85, &opts).unwrap();
        let linked = synth::evaluate_links(&data, &left, &right, &read_pairs(&out));
        assert!(linked.f1 >= 0.98, "seed {seed}: link {linked:?}");
    }
}
