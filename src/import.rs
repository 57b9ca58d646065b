//! `cohort import salesforce-contacts`: streams a Bulk API 2.0 CSV export of any size to a
//! running Cohort in chunks, in bounded memory, with a progress bar.

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ImportSummary {
    pub rows: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Rows of people who were erased with suppression: dropped, as every source's events are.
    pub suppressed: u64,
    pub requests: u64,
    pub seconds: f64,
}

#[derive(Deserialize)]
struct Receipt {
    accepted: u64,
    duplicates: u64,
    rejected: Vec<serde_json::Value>,
    #[serde(default)]
    suppressed: u64,
}

/// The column delimiter of a header line: the Bulk API's candidates, most frequent wins.
pub fn sniff_delimiter(header: &str) -> u8 {
    [b',', b';', b'\t', b'|', b'^', b'`']
        .into_iter()
        .max_by_key(|d| header.bytes().filter(|b| b == d).count())
        .unwrap_or(b',')
}

pub async fn salesforce_contacts(
    file: &Path,
    base_url: &str,
    token: &str,
    chunk_rows: usize,
    progress: bool,
) -> anyhow::Result<ImportSummary> {
    if chunk_rows == 0 {
        bail!("--chunk-rows must be positive");
    }
    let started = Instant::now();
    let len = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
    let mut first_line = String::new();
    BufReader::new(File::open(file)?).read_line(&mut first_line)?;
    let delimiter = sniff_delimiter(&first_line);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 20, File::open(file)?));
    let header = reader.headers().context("reading the CSV header")?.clone();
    let bar = if progress { ProgressBar::new(len) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {bytes}/{total_bytes} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let url = format!("{}/v1/import/salesforce/contacts", base_url.trim_end_matches('/'));
    let mut summary = ImportSummary::default();
    // Each chunk reads into the records of the one before: no allocation per row.
    let mut records: Vec<csv::StringRecord> = Vec::new();
    loop {
        let mut n = 0;
        while n < chunk_rows {
            if n == records.len() {
                records.push(csv::StringRecord::new());
            }
            if !reader.read_record(&mut records[n])? {
                break;
            }
            n += 1;
        }
        if n == 0 {
            break;
        }
        let rows = &records[..n];
        let chunk = Chunk { header: &header, delimiter, rows };
        summary.rows += rows.len() as u64;
        post_rows(&client, &url, token, chunk, &mut summary).await?;
        bar.set_position(reader.position().byte());
        bar.set_message(format!("{} rows", summary.rows));
    }
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Rows to post with the file's header, as the file delimits them.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    header: &'a csv::StringRecord,
    delimiter: u8,
    rows: &'a [csv::StringRecord],
}

impl Chunk<'_> {
    fn body(&self) -> anyhow::Result<Vec<u8>> {
        let mut writer = csv::WriterBuilder::new().delimiter(self.delimiter).from_writer(Vec::with_capacity(1 << 20));
        writer.write_record(self.header)?;
        for row in self.rows {
            writer.write_record(row)?;
        }
        writer.into_inner().map_err(|e| anyhow!("buffering a chunk: {e}"))
    }
}

/// Posts a chunk and adds its receipt to `summary`. A chunk Cohort refuses as too large (413: on
/// Kafka, a request is one message of at most 1 MB) is posted again in halves.
async fn post_rows(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    chunk: Chunk<'_>,
    summary: &mut ImportSummary,
) -> anyhow::Result<()> {
    let mut pending = vec![chunk];
    while let Some(chunk) = pending.pop() {
        match post_chunk(client, url, token, chunk.body()?).await? {
            Posted::Receipt(receipt) => {
                summary.accepted += receipt.accepted;
                summary.duplicates += receipt.duplicates;
                summary.rejected += receipt.rejected.len() as u64;
                summary.suppressed += receipt.suppressed;
                summary.requests += 1;
            }
            Posted::TooLarge(_) if chunk.rows.len() > 1 => {
                tracing::info!(rows = chunk.rows.len(), "chunk too large for Cohort, sending it in halves");
                let (first, second) = chunk.rows.split_at(chunk.rows.len() / 2);
                // Last in, first out: the first half goes first.
                pending.push(Chunk { rows: second, ..chunk });
                pending.push(Chunk { rows: first, ..chunk });
            }
            Posted::TooLarge(why) => bail!("a single row is larger than Cohort takes in one request: {why}"),
        }
    }
    Ok(())
}

/// What posting a chunk came to.
enum Posted {
    Receipt(Receipt),
    /// 413, with Cohort's reason.
    TooLarge(String),
}

/// Posts one chunk, retrying while Cohort answers 503 (it never drops accepted rows).
async fn post_chunk(client: &reqwest::Client, url: &str, token: &str, body: Vec<u8>) -> anyhow::Result<Posted> {
    let mut backoff = Duration::from_millis(200);
    for attempt in 0..10 {
        let resp =
            client.post(url).bearer_auth(token).header("content-type", "text/csv").body(body.clone()).send().await;
        match resp {
            Ok(r) if r.status().is_success() => {
                return r.json::<Receipt>().await.context("reading the import receipt").map(Posted::Receipt)
            }
            Ok(r) if r.status().as_u16() == 413 => return Ok(Posted::TooLarge(r.text().await.unwrap_or_default())),
            Ok(r) if r.status().as_u16() == 503 && attempt < 9 => {}
            Ok(r) if r.status().as_u16() == 400 => {
                // Every row of this chunk was rejected; the server dead-lettered them.
                let text = r.text().await.unwrap_or_default();
                tracing::warn!(body = %text, "chunk rejected");
                return Ok(Posted::Receipt(Receipt {
                    accepted: 0,
                    duplicates: 0,
                    rejected: vec![serde_json::Value::Null; count_rows(&body)],
                    suppressed: 0,
                }));
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!("import request failed with {status}: {text}");
            }
            Err(e) if attempt < 9 => tracing::warn!(error = %e, "import request failed, retrying"),
            Err(e) => return Err(e).context("sending an import chunk"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    bail!("Cohort stayed unavailable; import stopped (rows so far are durable and re-importing is idempotent)")
}

fn count_rows(body: &[u8]) -> usize {
    csv::ReaderBuilder::new().flexible(true).from_reader(body).records().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_bulk_api_delimiters() {
        assert_eq!(sniff_delimiter("Id,FirstName,LastName\n"), b',');
        assert_eq!(sniff_delimiter("Id;FirstName;LastName\r\n"), b';');
        assert_eq!(sniff_delimiter("Id\tFirstName\tLastName"), b'\t');
        assert_eq!(sniff_delimiter("Id|FirstName|LastName"), b'|');
    }
}
