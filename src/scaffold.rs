//! `cohort generate-connector`: scaffolds a new source as a crate under `connectors/NAME/`: the
//! connector (record splitter and field mapping), its JSON Schema and Gate 1 expectations, a
//! README, and a test that runs it through a real Cohort. The crate is a workspace member at
//! once (`connectors/*`); with `register`, the binary serves it too.

use anyhow::{bail, Context};
use cohort_messages::Source;
use std::path::{Path, PathBuf};

/// How the source delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The source calls Cohort per event or batch.
    Webhook,
    /// The source streams records, one per line (NDJSON, CSV rows, logfmt lines).
    Streaming,
}

/// The records' wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Csv,
    /// logfmt lines: `id=r1 event=quiz_submitted user_id=stu-1`.
    Text,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Scaffold {
    pub name: String,
    pub kind: Kind,
    pub format: Format,
    /// The channel its events feed.
    pub channel: Source,
    /// Add it to the binary (`Cargo.toml` and `src/connectors.rs`).
    pub register: bool,
}

impl Scaffold {
    fn type_name(&self) -> String {
        self.name
            .split('_')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let mut c = p.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .collect::<String>()
            + "Connector"
    }

    fn crate_name(&self) -> String {
        format!("cohort-connector-{}", self.name.replace('_', "-"))
    }

    fn splitter(&self) -> &'static str {
        match (self.format, self.kind) {
            (Format::Json, Kind::Webhook) => "json_records",
            (Format::Json, Kind::Streaming) => "ndjson_records",
            (Format::Csv, _) => "csv_records",
            (Format::Text, _) => "logfmt_records",
        }
    }

    fn content_type(&self) -> &'static str {
        match (self.format, self.kind) {
            (Format::Json, Kind::Webhook) => "application/json",
            (Format::Json, Kind::Streaming) => "application/x-ndjson",
            (Format::Csv, _) => "text/csv",
            (Format::Text, _) => "text/plain",
        }
    }

    fn channel_variant(&self) -> &'static str {
        match self.channel {
            Source::Web => "Web",
            Source::Mobile => "Mobile",
            Source::Crm => "Crm",
            Source::Email => "Email",
            Source::Whatsapp => "Whatsapp",
        }
    }

    fn kind_text(&self) -> &'static str {
        match self.kind {
            Kind::Webhook => "webhook",
            Kind::Streaming => "streaming",
        }
    }

    fn format_text(&self) -> &'static str {
        match self.format {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Text => "text",
        }
    }

    /// A body with two good records and one the schema refuses (no `id`, no `timestamp`).
    fn sample(&self) -> String {
        match (self.format, self.kind) {
            (Format::Json, Kind::Webhook) => concat!(
                "[\n",
                "    {\"id\": \"r1\", \"event\": \"course_viewed\", \"timestamp\": \"{at}\", \"user_id\": \"stu-1\", \"email\": \" Ana.Lima@Example.EDU \", \"course\": \"MBA-101\"},\n",
                "    {\"id\": \"r2\", \"event\": \"quiz_submitted\", \"timestamp\": \"{at}\", \"user_id\": \"stu-1\", \"score\": 80},\n",
                "    {\"event\": \"course_viewed\", \"user_id\": \"stu-2\"}\n",
                "]"
            )
            .to_string(),
            (Format::Json, Kind::Streaming) => concat!(
                "{\"id\": \"r1\", \"event\": \"course_viewed\", \"timestamp\": \"{at}\", \"user_id\": \"stu-1\", \"email\": \" Ana.Lima@Example.EDU \", \"course\": \"MBA-101\"}\n",
                "{\"id\": \"r2\", \"event\": \"quiz_submitted\", \"timestamp\": \"{at}\", \"user_id\": \"stu-1\", \"score\": 80}\n",
                "{\"event\": \"course_viewed\", \"user_id\": \"stu-2\"}\n"
            )
            .to_string(),
            (Format::Csv, _) => concat!(
                "id,event,timestamp,user_id,email,course\n",
                "r1,course_viewed,{at},stu-1, Ana.Lima@Example.EDU ,MBA-101\n",
                "r2,quiz_submitted,{at},stu-1,,MBA-101\n",
                ",course_viewed,,stu-2,,\n"
            )
            .to_string(),
            (Format::Text, _) => concat!(
                "id=r1 event=course_viewed timestamp={at} user_id=stu-1 email=\" Ana.Lima@Example.EDU \" course=MBA-101\n",
                "id=r2 event=quiz_submitted timestamp={at} user_id=stu-1 course=MBA-101\n",
                "event=course_viewed user_id=stu-2\n"
            )
            .to_string(),
        }
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{type}}", &self.type_name())
            .replace("{{crate}}", &self.crate_name())
            .replace("{{crate_ident}}", &self.crate_name().replace('-', "_"))
            .replace("{{splitter}}", self.splitter())
            .replace("{{content_type}}", self.content_type())
            .replace("{{channel}}", self.channel_variant())
            .replace("{{channel_name}}", self.channel.as_str())
            .replace("{{kind}}", self.kind_text())
            .replace("{{format}}", self.format_text())
            .replace("{{sample}}", &self.sample())
            .replace("{{sample_literal}}", &format!("{:?}", self.sample()))
    }

    /// The files of the connector crate: relative path → contents.
    pub fn files(&self) -> Vec<(String, String)> {
        let mut files = vec![
            ("Cargo.toml".to_string(), self.fill(CARGO_TOML)),
            ("README.md".to_string(), self.fill(README)),
            ("schema.json".to_string(), self.fill(SCHEMA)),
            ("expectations.toml".to_string(), self.fill(EXPECTATIONS)),
            ("src/lib.rs".to_string(), self.fill(LIB_RS)),
            ("tests/connector.rs".to_string(), self.fill(TEST_RS)),
        ];
        files.push(("sample.txt".to_string(), self.sample().replace("{at}", "2026-11-01T10:00:00Z")));
        files
    }

    /// Writes the crate under `root/connectors/NAME` (refusing to overwrite one) and, with
    /// `register`, wires it into the binary. Returns the files written or changed.
    pub fn write(&self, root: &Path) -> anyhow::Result<Vec<PathBuf>> {
        if !cohort_actors::normalize::connector::valid_name(&self.name) {
            bail!("`{}`: a connector name is lowercase letters, digits and `_`, starting with a letter", self.name);
        }
        if self.name.parse::<Source>().is_ok() {
            bail!("`{}` is a built-in source", self.name);
        }
        let cargo = root.join("Cargo.toml");
        let manifest = std::fs::read_to_string(&cargo)
            .with_context(|| format!("{} is not Cohort's repository root", root.display()))?;
        let dir = root.join("connectors").join(&self.name);
        if dir.exists() {
            bail!("{} exists already", dir.display());
        }
        let mut written = Vec::new();
        if !manifest.contains("\"connectors/*\"") {
            std::fs::write(&cargo, add_member(&manifest)?).with_context(|| format!("writing {}", cargo.display()))?;
            written.push(cargo);
        }
        for (rel, text) in self.files() {
            let path = dir.join(&rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        if self.register {
            written.extend(self.register_in(root)?);
        }
        Ok(written)
    }

    /// Adds the crate to the binary's dependencies and to `connectors::compiled_in`.
    pub fn register_in(&self, root: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let cargo = root.join("Cargo.toml");
        let text = std::fs::read_to_string(&cargo).with_context(|| format!("reading {}", cargo.display()))?;
        let text = register_dependency(&text, &self.crate_name(), &self.name)?;
        std::fs::write(&cargo, text).with_context(|| format!("writing {}", cargo.display()))?;
        let list = root.join("src/connectors.rs");
        let text = std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
        let line = format!("Arc::new({}::{}),", self.crate_name().replace('-', "_"), self.type_name());
        let text = register_line(&text, &line)?;
        std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
        Ok(vec![cargo, list])
    }
}

/// The root Cargo.toml with `connectors/*` among the workspace members.
pub fn add_member(text: &str) -> anyhow::Result<String> {
    let start = text.find("members = [").context("Cargo.toml has no workspace members list")?;
    let end = start + text[start..].find(']').context("Cargo.toml's members list is not closed")?;
    Ok(format!("{}, \"connectors/*\"{}", &text[..end], &text[end..]))
}

const MARKER: &str = "// generate-connector: registrations (keep this line)";

/// `src/connectors.rs` with `line` added before the marker (once).
pub fn register_line(text: &str, line: &str) -> anyhow::Result<String> {
    if text.contains(line) {
        return Ok(text.to_string());
    }
    let Some(at) = text.find(MARKER) else { bail!("src/connectors.rs has lost its marker line `{MARKER}`") };
    let indent_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let indent = &text[indent_start..at];
    Ok(format!("{}{line}\n{indent}{}", &text[..at], &text[at..]))
}

/// The root Cargo.toml with the connector crate added to the binary's `[dependencies]`.
pub fn register_dependency(text: &str, crate_name: &str, dir: &str) -> anyhow::Result<String> {
    let entry = format!("{crate_name} = {{ path = \"connectors/{dir}\" }}");
    if text.contains(&entry) {
        return Ok(text.to_string());
    }
    // The binary's table is the `[dependencies]` after `[package]` (not the workspace's).
    let package = text.find("\n[package]").context("Cargo.toml has no [package]")?;
    let deps = text[package..].find("\n[dependencies]\n").map(|i| package + i + "\n[dependencies]\n".len());
    let Some(at) = deps else { bail!("Cargo.toml has no [dependencies] table for the binary") };
    Ok(format!("{}{entry}\n{}", &text[..at], &text[at..]))
}

const CARGO_TOML: &str = r#"[package]
name = "{{crate}}"
version.workspace = true
edition.workspace = true
license.workspace = true
publish.workspace = true
description = "Cohort connector `{{name}}` ({{kind}}, {{format}}), generated by `cohort generate-connector`"

[lints]
workspace = true

[dependencies]
cohort-actors.workspace = true
cohort-messages.workspace = true
serde_json.workspace = true

[dev-dependencies]
cohort = { path = "../.." }
chrono.workspace = true
reqwest.workspace = true
tokio.workspace = true
"#;

const README: &str = r#"# Connector `{{name}}`

A {{kind}} source sending {{format}} records (`{{content_type}}`), feeding Cohort's
`{{channel_name}}` channel. Generated by
`cohort generate-connector --name {{name}} --type {{kind}} --format {{format}}`.

| file | what |
|---|---|
| `src/lib.rs` | the connector: how a body splits into records (`{{splitter}}`) and how a record becomes an event (`map`) |
| `schema.json` | the JSON Schema every record must meet (Gate 1): required fields and their types |
| `expectations.toml` | Gate 1 expectations beyond the schema: an identifier per record, records per body, allowed event names |
| `tests/connector.rs` | the normalizer on `sample.txt`, then the connector end to end through a running Cohort |

Records failing the schema, the expectations or `map` are refused one by one and kept as dead
letters with the reason; the others are journaled before the answer. Event ids are
`{{channel_name}}+{{name}}:<id>`, so a record sent twice counts once. Every event carries
`properties.connector = "{{name}}"`.

Send records with a token holding the scope `ingest:{{name}}`:

```sh
cohort token new --name {{name}}-relay --scope ingest:{{name}}
curl -X POST http://127.0.0.1:8080/webhooks/connectors/{{name}} \
  -H "Authorization: Bearer $TOKEN" -H "Content-Type: {{content_type}}" --data-binary @sample.txt
```

Run its tests with `cargo test -p {{crate}}`. The `cohort` binary serves it once it is
registered (`generate-connector` does this unless given `--no-register`): a dependency in the root
`Cargo.toml` and a line in `src/connectors.rs`.
"#;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "{{name}} record",
  "type": "object",
  "required": ["id", "event", "timestamp"],
  "properties": {
    "id": { "type": "string", "minLength": 1, "maxLength": 200 },
    "event": { "type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_ .-]{0,99}$" },
    "timestamp": { "type": ["string", "number"] },
    "user_id": { "type": "string", "minLength": 1, "maxLength": 200 },
    "email": { "type": "string", "maxLength": 320 },
    "phone": { "type": "string", "maxLength": 40 }
  }
}
"#;

const EXPECTATIONS: &str = r#"# Gate 1 expectations of connector `{{name}}`, checked on every record after schema.json.
# A record must carry a user id, or an email or phone that normalizes.
require_identifier = true
# A body with more records is refused whole.
max_records = 1000
# Event names this connector may produce; empty: any.
allowed_names = []
"#;

const LIB_RS: &str = r#"//! Cohort connector `{{name}}`: a {{kind}} source of {{format}} records feeding the
//! `{{channel_name}}` channel. Edit `map` for the source's fields, `schema.json` and
//! `expectations.toml` for its checks.

use cohort_actors::normalize::connector::{{splitter}};
use cohort_actors::normalize::connector::{field, timestamp_field, Connector, EventDraft, Record};
use cohort_messages::{EventKind, Source};
use serde_json::Map;

/// Fields `map` reads itself; the others become event properties.
const KNOWN: [&str; 6] = ["id", "event", "timestamp", "user_id", "email", "phone"];

pub struct {{type}};

impl Connector for {{type}} {
    fn name(&self) -> &'static str {
        "{{name}}"
    }

    fn channel(&self) -> Source {
        Source::{{channel}}
    }

    fn schema(&self) -> &'static str {
        include_str!("../schema.json")
    }

    fn expectations(&self) -> &'static str {
        include_str!("../expectations.toml")
    }

    fn records(&self, body: &[u8]) -> Result<Vec<Record>, String> {
        {{splitter}}(body)
    }

    fn map(&self, record: &Record) -> Result<EventDraft, String> {
        let key = field(record, "id").ok_or("field `id` is missing")?.to_string();
        let event = field(record, "event").ok_or("field `event` is missing")?;
        let properties: Map<String, serde_json::Value> =
            record.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        let identify = event == "identify";
        Ok(EventDraft {
            key,
            kind: if identify { EventKind::Identify } else { EventKind::Track },
            name: (!identify).then(|| event.to_string()),
            occurred_at: timestamp_field(record, "timestamp")?,
            user_id: field(record, "user_id").map(str::to_string),
            email: field(record, "email").map(str::to_string),
            phone: field(record, "phone").map(str::to_string),
            traits: Map::new(),
            properties,
        })
    }
}
"#;

const TEST_RS: &str = r#"//! Connector `{{name}}`: its normalizer on a sample body, then end to end through a Cohort.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::DemoServer;
use cohort::SystemOptions;
use cohort_actors::normalize::connector::{format_of, Connector, ConnectorSet};
use cohort_actors::normalize::{normalize, NormalizeOptions};
use {{crate_ident}}::{{type}};
use cohort_messages::msgs::RawPayload;
use cohort_messages::IdentifierKind;
use std::sync::Arc;
use std::time::Duration;

/// Two good records and one without `id` and `timestamp`.
fn sample() -> String {
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    {{sample_literal}}.replace("{at}", &at)
}

#[test]
fn the_sample_becomes_two_events_and_one_refusal() {
    let connectors = ConnectorSet::new(vec![Arc::new({{type}})]).unwrap();
    let opts = NormalizeOptions { connectors, ..NormalizeOptions::default() };
    let payload = RawPayload {
        source: {{type}}.channel(),
        format: format_of(&{{type}}),
        body: sample().into_bytes().into(),
        content_type: "{{content_type}}".into(),
        received_at: chrono::Utc::now(),
    };
    let out = normalize(&payload, &opts).unwrap();
    assert_eq!(out.events.len(), 2, "{:?}", out.rejected);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, Some(2));
    assert!(out.rejected[0].reason.contains("schema"), "{}", out.rejected[0].reason);
    let first = &out.events[0];
    assert_eq!(first.event_id.as_str(), "{{channel_name}}+{{name}}:r1");
    assert_eq!(first.name.as_deref(), Some("course_viewed"));
    assert_eq!(first.properties["connector"], "{{name}}");
    assert_eq!(first.properties["course"], "MBA-101");
    let kinds: Vec<IdentifierKind> = first.identifiers.iter().map(|i| i.kind).collect();
    assert!(kinds.contains(&IdentifierKind::UserId) && kinds.contains(&IdentifierKind::Email), "{kinds:?}");
    assert_eq!(first.traits["email"], "ana.lima@example.edu", "emails are normalized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_to_the_webhook_reach_a_live_profile() {
    let options = SystemOptions { connectors: vec![Arc::new({{type}})], ..SystemOptions::default() };
    let demo = DemoServer::start(None, "", options).await.unwrap();
    let url = format!("{}/webhooks/connectors/{{name}}", demo.base);
    let post = |token: &'static str| {
        demo.client.http.post(&url).bearer_auth(token).header("content-type", "{{content_type}}").body(sample()).send()
    };
    assert_eq!(post("wrong-token").await.unwrap().status(), 401);
    let answer = post("dev-api-token").await.unwrap();
    assert_eq!(answer.status(), 200);
    let receipt: serde_json::Value = answer.json().await.unwrap();
    assert_eq!((receipt["accepted"].as_u64(), receipt["rejected"].as_array().map(Vec::len)), (Some(2), Some(1)));
    // The same body again: nothing new.
    let again: serde_json::Value = post("dev-api-token").await.unwrap().json().await.unwrap();
    assert_eq!(again["duplicates"], 2);

    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let profile = demo.client.get("/v1/profiles/user_id:stu-1").await.unwrap();
    assert_eq!(profile.status, 200, "{}", profile.body);
    assert_eq!(profile.body["counters"]["events_total"], 2);
    assert_eq!(profile.body["counters"]["by_source"]["{{channel_name}}"], 2);
    let dlq = demo.client.get("/v1/dlq").await.unwrap();
    assert_eq!(dlq.body["total"], 2, "the refused record, once per send: {}", dlq.body);
    demo.stop().await.unwrap();
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn scaffold(name: &str) -> Scaffold {
        Scaffold { name: name.into(), kind: Kind::Webhook, format: Format::Json, channel: Source::Web, register: true }
    }

    #[test]
    fn names_become_rust_and_crate_names() {
        let s = scaffold("new_lms");
        assert_eq!(s.type_name(), "NewLmsConnector");
        assert_eq!(s.crate_name(), "cohort-connector-new-lms");
        assert!(s.files().iter().all(|(_, text)| !text.contains("{{")), "every placeholder is filled");
    }

    #[test]
    fn registration_edits_are_placed_and_idempotent() {
        let list = "pub fn compiled_in() -> Vec<Arc<dyn Connector>> {\n    vec![\n        // generate-connector: registrations (keep this line)\n    ]\n}\n";
        let once = register_line(list, "Arc::new(a::A),").unwrap();
        assert!(once.contains("        Arc::new(a::A),\n        // generate-connector"), "{once}");
        assert_eq!(register_line(&once, "Arc::new(a::A),").unwrap(), once);
        assert!(register_line("fn f() {}", "x").is_err());
        let cargo = "[workspace]\n[workspace.dependencies]\nx = 1\n\n[package]\nname = \"cohort\"\n\n[dependencies]\ncohort-api.workspace = true\n";
        let with = register_dependency(cargo, "cohort-connector-a", "a").unwrap();
        assert!(
            with.contains("[dependencies]\ncohort-connector-a = { path = \"connectors/a\" }\ncohort-api"),
            "{with}"
        );
        assert_eq!(register_dependency(&with, "cohort-connector-a", "a").unwrap(), with);
    }

    #[test]
    fn bad_names_and_existing_connectors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), "[workspace]\nmembers = [\"messages\"]\n").unwrap();
        assert!(scaffold("New-LMS").write(dir.path()).is_err());
        assert!(scaffold("web").write(dir.path()).unwrap_err().to_string().contains("built-in"));
        let s = Scaffold { register: false, ..scaffold("lms") };
        assert_eq!(s.write(dir.path()).unwrap().len(), 8, "seven files and the members list");
        let manifest = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("members = [\"messages\", \"connectors/*\"]"), "{manifest}");
        assert!(s.write(dir.path()).unwrap_err().to_string().contains("exists already"));
    }
}
