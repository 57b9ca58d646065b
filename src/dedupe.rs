//! `cohort identity dedupe`: clusters the people of a CSV file (a CRM export, say) with the same
//! normalizers and match model the live system uses, before the first load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use cohort_actors::matching::{fold_national_id, match_score, MatchModel, MatchRecord};
use cohort_actors::normalize::NormalizeOptions;
use cohort_actors::normalize::{normalize_email, normalize_name, normalize_phone, parse_date_of_birth};
use serde::Serialize;

/// Fields a column can be mapped to.
pub const FIELDS: &[&str] = &[
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "date_of_birth",
    "street",
    "house_number",
    "postcode",
    "city",
    "region",
    "national_id",
];

/// Blocks larger than this are not compared pair by pair (a key shared by that many records
/// says nothing); they are counted in the summary.
const MAX_BLOCK: usize = 500;

/// `id=COL,first_name=COL,...` → field → column name. `id` is required.
pub fn parse_map(spec: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, column) = part.split_once('=').ok_or_else(|| anyhow!("`{part}` in --map is not FIELD=COLUMN"))?;
        let field = field.trim();
        if !FIELDS.contains(&field) {
            bail!("unknown field `{field}` in --map (known: {})", FIELDS.join(", "));
        }
        map.insert(field.to_string(), column.trim().to_string());
    }
    if !map.contains_key("id") {
        bail!("--map must name the id column (id=COL)");
    }
    Ok(map)
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct DedupeSummary {
    pub records: usize,
    pub clusters: usize,
    pub pairs_compared: usize,
    pub pairs_matched: usize,
    pub oversized_blocks: usize,
    pub seconds: f64,
}

struct Person {
    id: String,
    record: MatchRecord,
}

fn person(row: &csv::StringRecord, columns: &HashMap<String, usize>, opts: &NormalizeOptions) -> Option<Person> {
    let get = |f: &str| columns.get(f).and_then(|i| row.get(*i)).map(str::trim).filter(|v| !v.is_empty());
    let id = get("id")?.to_string();
    let street = match (get("street"), get("house_number")) {
        (Some(s), Some(n)) => Some(format!("{s} {n}")),
        (Some(s), None) => Some(s.to_string()),
        _ => None,
    };
    let record = MatchRecord {
        first_name: get("first_name").and_then(normalize_name),
        last_name: get("last_name").and_then(normalize_name),
        date_of_birth: get("date_of_birth").and_then(|d| parse_date_of_birth(d, opts.date_order)),
        email: get("email").and_then(normalize_email).map(|e| opts.email_key(&e)),
        phone: get("phone").and_then(|p| normalize_phone(p, &opts.default_region)),
        postal_code: get("postcode").map(|p| p.replace(' ', "").to_uppercase()),
        city: get("city").and_then(normalize_name),
        street: street.as_deref().and_then(normalize_name),
        national_id: get("national_id").map(fold_national_id),
    };
    Some(Person { id, record })
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// The people of a CSV file (delimiter sniffed from the header), normalized; rows without an id
/// are skipped.
fn read_people(input: &Path, map: &BTreeMap<String, String>, opts: &NormalizeOptions) -> anyhow::Result<Vec<Person>> {
    // Exports use `,` `;` tab and more: the header line tells which.
    let first_line = {
        use std::io::BufRead;
        let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(file).read_line(&mut line).with_context(|| format!("reading {}", input.display()))?;
        line
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .delimiter(crate::import::sniff_delimiter(&first_line))
        .from_path(input)
        .with_context(|| format!("opening {}", input.display()))?;
    let headers = reader.headers().with_context(|| format!("reading the header of {}", input.display()))?.clone();
    let mut columns = HashMap::new();
    for (field, column) in map {
        let idx = headers
            .iter()
            .position(|h| h.trim() == column)
            .ok_or_else(|| anyhow!("column `{column}` (for {field}) is not in the header of {}", input.display()))?;
        columns.insert(field.clone(), idx);
    }
    let mut people = Vec::new();
    for (line, row) in reader.records().enumerate() {
        let row = row.with_context(|| format!("reading row {} of {}", line + 2, input.display()))?;
        if let Some(p) = person(&row, &columns, opts) {
            people.push(p);
        }
    }
    Ok(people)
}

fn score(a: &Person, b: &Person, model: &MatchModel) -> f64 {
    match_score(&a.record, &b.record, model)
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct LinkSummary {
    pub left: usize,
    pub right: usize,
    pub pairs_compared: usize,
    pub pairs_written: usize,
    pub oversized_blocks: usize,
    pub seconds: f64,
}

/// Links two files: writes `left_id,right_id,score` for every cross pair at or above
/// `threshold` that shares a blocking key, best scores first per left record.
pub fn link(
    left: &Path,
    right: &Path,
    map: &BTreeMap<String, String>,
    output: &Path,
    threshold: f64,
    opts: &NormalizeOptions,
) -> anyhow::Result<LinkSummary> {
    let started = std::time::Instant::now();
    let lefts = read_people(left, map, opts)?;
    let rights = read_people(right, map, opts)?;
    let mut blocks: HashMap<String, Vec<usize>> = HashMap::new();
    for (j, p) in rights.iter().enumerate() {
        for key in p.record.blocking_keys() {
            blocks.entry(key).or_default().push(j);
        }
    }
    let model = MatchModel::default();
    let mut summary = LinkSummary { left: lefts.len(), right: rights.len(), ..LinkSummary::default() };
    let mut writer = csv::Writer::from_path(output).with_context(|| format!("creating {}", output.display()))?;
    writer.write_record(["left_id", "right_id", "score"])?;
    for l in &lefts {
        let mut candidates: HashSet<usize> = HashSet::new();
        for key in l.record.blocking_keys() {
            match blocks.get(&key) {
                Some(members) if members.len() > MAX_BLOCK => summary.oversized_blocks += 1,
                Some(members) => candidates.extend(members.iter().copied()),
                None => {}
            }
        }
        let mut matches: Vec<(f64, usize)> = candidates
            .into_iter()
            .map(|j| (score(l, &rights[j], &model), j))
            .inspect(|_| summary.pairs_compared += 1)
            .filter(|(s, _)| *s >= threshold)
            .collect();
        matches.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (s, j) in matches {
            writer.write_record([l.id.as_str(), rights[j].id.as_str(), &format!("{s:.4}")])?;
            summary.pairs_written += 1;
        }
    }
    writer.flush().with_context(|| format!("writing {}", output.display()))?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Reads `input`, clusters its people and writes `record_id,cluster_id,confidence` to `output`
/// (the cluster id is the smallest record id in the cluster; confidence is the best score that
/// joined the record to it, 1 for a record alone).
pub fn dedupe(
    input: &Path,
    map: &BTreeMap<String, String>,
    output: &Path,
    threshold: f64,
    opts: &NormalizeOptions,
) -> anyhow::Result<DedupeSummary> {
    let started = std::time::Instant::now();
    let people = read_people(input, map, opts)?;
    let mut blocks: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, p) in people.iter().enumerate() {
        for key in p.record.blocking_keys() {
            blocks.entry(key).or_default().push(i);
        }
    }
    let model = MatchModel::default();
    let mut summary = DedupeSummary { records: people.len(), ..DedupeSummary::default() };
    let mut seen: HashSet<(usize, usize)> = HashSet::new();
    let mut parent: Vec<usize> = (0..people.len()).collect();
    let mut confidence = vec![1.0_f64; people.len()];
    let mut best = vec![0.0_f64; people.len()];
    for members in blocks.values() {
        if members.len() > MAX_BLOCK {
            summary.oversized_blocks += 1;
            continue;
        }
        for (x, &i) in members.iter().enumerate() {
            for &j in &members[x + 1..] {
                if !seen.insert((i.min(j), i.max(j))) {
                    continue;
                }
                summary.pairs_compared += 1;
                let score = score(&people[i], &people[j], &model);
                if score >= threshold {
                    summary.pairs_matched += 1;
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    if ri != rj {
                        parent[ri] = rj;
                    }
                    best[i] = best[i].max(score);
                    best[j] = best[j].max(score);
                }
            }
        }
    }
    let mut cluster_of: HashMap<usize, String> = HashMap::new();
    for i in 0..people.len() {
        let root = find(&mut parent, i);
        let id = &people[i].id;
        cluster_of
            .entry(root)
            .and_modify(|c| {
                if id < c {
                    *c = id.clone()
                }
            })
            .or_insert_with(|| id.clone());
        if best[i] > 0.0 {
            confidence[i] = best[i];
        }
    }
    summary.clusters = cluster_of.len();
    let mut writer = csv::Writer::from_path(output).with_context(|| format!("creating {}", output.display()))?;
    writer.write_record(["record_id", "cluster_id", "confidence"])?;
    for (i, p) in people.iter().enumerate() {
        let root = find(&mut parent, i);
        let cluster = cluster_of.get(&root).cloned().unwrap_or_else(|| p.id.clone());
        writer.write_record([p.id.as_str(), cluster.as_str(), &format!("{:.4}", confidence[i])])?;
    }
    writer.flush().with_context(|| format!("writing {}", output.display()))?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
