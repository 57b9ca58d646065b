//! Cohort connector `example_lms`: a webhook source of json records feeding the
//! `web` channel. Edit `map` for the source's fields, `schema.json` and
//! `expectations.toml` for its checks.

use cohort_actors::normalize::connector::json_records;
use cohort_actors::normalize::connector::{field, timestamp_field, Connector, EventDraft, Record};
use cohort_messages::{EventKind, Source};
use serde_json::Map;

/// Fields `map` reads itself; the others become event properties.
const KNOWN: [&str; 6] = ["id", "event", "timestamp", "user_id", "email", "phone"];

pub struct ExampleLmsConnector;

impl Connector for ExampleLmsConnector {
    fn name(&self) -> &'static str {
        "example_lms"
    }

    fn channel(&self) -> Source {
        Source::Web
    }

    fn schema(&self) -> &'static str {
        include_str!("../schema.json")
    }

    fn expectations(&self) -> &'static str {
        include_str!("../expectations.toml")
    }

    fn records(&self, body: &[u8]) -> Result<Vec<Record>, String> {
        json_records(body)
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
