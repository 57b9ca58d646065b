//! `cohort-identity-bench`: accuracy and speed of identity matching on synthetic EU students.
//!
//! Generates records with known truth (`cohort::synth`), runs `cohort identity dedupe` and
//! `cohort identity link` on them through the same code as the CLI, and prints pair precision,
//! recall and F1 and records/s. A report: missing a target still exits 0.

use anyhow::Context;
use clap::Parser;
use cohort::synth::{self, ClusterEvaluation, PairScores};
use cohort_actors::normalize::NormalizeOptions;
use cohort_config::Config;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;

const TARGET_F1_COMPLETE: f64 = 0.99;
const TARGET_DEDUPE_SECS_100K: f64 = 30.0;

#[derive(Parser, Debug)]
#[command(
    name = "cohort-identity-bench",
    version,
    about = "Identity matching accuracy (precision, recall, F1) and speed"
)]
struct Cli {
    /// Records to generate.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Generator seed (the same seed gives the same records).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Match threshold for dedupe and link.
    #[arg(long, default_value_t = 0.85)]
    threshold: f64,
    /// Keep the generated and output files in this folder.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print this many wrongly linked pairs (to study the model; contains synthetic data only).
    #[arg(long, default_value_t = 0)]
    show_errors: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn read_pairs(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut r = csv::Reader::from_path(path)?;
    r.records()
        .map(|row| {
            let row = row?;
            Ok((row.get(0).unwrap_or_default().to_string(), row.get(1).unwrap_or_default().to_string()))
        })
        .collect()
}

fn line(name: &str, s: &PairScores) {
    println!(
        "  {name:<34} precision {:.4}  recall {:.4}  F1 {:.4}  ({} true pairs, {} predicted, {} correct)",
        s.precision, s.recall, s.f1, s.true_pairs, s.predicted_pairs, s.correct_pairs
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(None)?;
    let opts = NormalizeOptions::from_config(&config.normalize).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tmp = tempfile::tempdir()?;
    let dir = cli.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let map = cohort::dedupe::parse_map(&synth::column_map())?;

    let data = synth::generate(cli.records, cli.seed);
    let people = dir.join("people.csv");
    data.write_csv(&people)?;
    let entities = data.truth.iter().collect::<std::collections::HashSet<_>>().len();
    println!("{} records of {} people (seed {}), threshold {}", data.records.len(), entities, cli.seed, cli.threshold);

    let clusters = dir.join("clusters.csv");
    let summary = cohort::dedupe::dedupe(&people, &map, &clusters, cli.threshold, &opts)?;
    let cluster_of: HashMap<String, String> = read_pairs(&clusters)?.into_iter().collect();
    let eval: ClusterEvaluation = synth::evaluate_clusters(&data, &cluster_of)?;
    let dedupe_rate = summary.records as f64 / summary.seconds.max(1e-9);
    println!(
        "dedupe: {:.2} s, {:.0} records/s, {} pairs compared",
        summary.seconds, dedupe_rate, summary.pairs_compared
    );
    line("all records", &eval.all);
    line("name + date of birth + address", &eval.complete);
    println!("  false pairs sharing a phone:       {}", eval.false_pairs_sharing_a_phone);
    for (i, j) in synth::false_pairs_sharing_a_phone(&data, &cluster_of).into_iter().take(cli.show_errors) {
        println!("  wrong cluster:\n    {:?}\n    {:?}", data.records[i], data.records[j]);
    }

    let (left, right) = synth::link_split(&data);
    let (lp, rp, pairs) = (dir.join("left.csv"), dir.join("right.csv"), dir.join("pairs.csv"));
    data.write_subset(&lp, &left)?;
    data.write_subset(&rp, &right)?;
    let link = cohort::dedupe::link(&lp, &rp, &map, &pairs, cli.threshold, &opts)?;
    let link_pairs = read_pairs(&pairs)?;
    let linked = synth::evaluate_links(&data, &left, &right, &link_pairs);
    if cli.show_errors > 0 {
        let index: HashMap<&str, usize> = data.records.iter().enumerate().map(|(i, r)| (r.id.as_str(), i)).collect();
        let wrong = link_pairs.iter().filter_map(|(l, r)| {
            let (i, j) = (*index.get(l.as_str())?, *index.get(r.as_str())?);
            (data.truth[i] != data.truth[j]).then_some((i, j))
        });
        for (i, j) in wrong.take(cli.show_errors) {
            println!("  wrong link:\n    {:?}\n    {:?}", data.records[i], data.records[j]);
        }
        let found: std::collections::HashSet<(&str, &str)> =
            link_pairs.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        let first_of: HashMap<u32, usize> = left.iter().map(|&i| (data.truth[i], i)).collect();
        let missed = right.iter().filter_map(|&j| {
            let i = *first_of.get(&data.truth[j])?;
            let (a, b) = (&data.records[i], &data.records[j]);
            (a.is_complete() && b.is_complete() && !found.contains(&(a.id.as_str(), b.id.as_str()))).then_some((i, j))
        });
        for (i, j) in missed.take(cli.show_errors) {
            println!("  missed link:\n    {:?}\n    {:?}", data.records[i], data.records[j]);
        }
    }
    let link_rate = (link.left + link.right) as f64 / link.seconds.max(1e-9);
    println!("link: {} × {} records in {:.2} s, {:.0} records/s", link.left, link.right, link.seconds, link_rate);
    line("linked pairs", &linked);

    let scaled = summary.seconds * 100_000.0 / summary.records.max(1) as f64;
    println!("targets:");
    println!(
        "  F1 ≥ {TARGET_F1_COMPLETE} with name, date of birth and address: {:.4} {}",
        eval.complete.f1,
        if eval.complete.f1 >= TARGET_F1_COMPLETE { "met" } else { "MISSED" }
    );
    println!(
        "  no false merge through a shared phone: {} {}",
        eval.false_pairs_sharing_a_phone,
        if eval.false_pairs_sharing_a_phone == 0 { "met" } else { "MISSED" }
    );
    println!(
        "  dedupe of 100,000 records < {TARGET_DEDUPE_SECS_100K} s: {scaled:.2} s {}",
        if scaled < TARGET_DEDUPE_SECS_100K { "met" } else { "MISSED" }
    );
    if let Some(path) = cli.json {
        let report = json!({
            "records": data.records.len(), "people": entities, "seed": cli.seed, "threshold": cli.threshold,
            "dedupe": { "seconds": summary.seconds, "records_per_sec": dedupe_rate, "all": eval.all,
                "complete": eval.complete, "false_pairs_sharing_a_phone": eval.false_pairs_sharing_a_phone },
            "link": { "seconds": link.seconds, "records_per_sec": link_rate, "scores": linked },
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
