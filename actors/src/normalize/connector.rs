//! Connectors: sources beyond the built-in five, added without touching the core. A connector
//! names itself, says which of Cohort's channels its events feed (trait precedence, topics and
//! metrics follow the channel), splits a body into records, and maps one record to an event;
//! its JSON Schema is checked on every record first (Gate 1), and this module does the rest the
//! built-in normalizers do: identifiers normalized, event ids namespaced, failures per record.
//!
//! `cohort generate-connector` scaffolds one (see `src/scaffold.rs`).

use super::contact::{normalize_email, normalize_phone};
use super::util::{check_size, push_unique, raw_index};
use super::{NormalizeError, NormalizeOptions, Normalized};
use chrono::{DateTime, Utc};
use cohort_messages::msgs::{PayloadFormat, RawPayload, Rejection};
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Source, Utm};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// One record of a connector's payload: field name → value.
pub type Record = Map<String, Value>;

/// What a connector's record means, before Cohort normalizes it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    /// The record's own id in the source system: with the connector's name it makes the event
    /// id, so a record sent twice counts once.
    pub key: String,
    pub kind: EventKind,
    pub name: Option<String>,
    pub occurred_at: DateTime<Utc>,
    /// The source system's id of the student (becomes a `user_id` identifier).
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub traits: Map<String, Value>,
    pub properties: Map<String, Value>,
}

/// A source beyond the built-in five.
pub trait Connector: Send + Sync + 'static {
    /// Lowercase `[a-z0-9_]`: the route `/webhooks/connectors/{name}`, the scope
    /// `ingest:{name}`, the Bronze format `connector:{name}`.
    fn name(&self) -> &'static str;
    /// The channel its events feed.
    fn channel(&self) -> Source;
    /// The JSON Schema every record must satisfy.
    fn schema(&self) -> &'static str;
    /// Largest body accepted, in bytes.
    fn max_bytes(&self) -> usize {
        1 << 20
    }
    /// Gate 1 expectations beyond the schema, as TOML (see [`Expectations`]); empty: defaults.
    fn expectations(&self) -> &'static str {
        ""
    }
    /// Splits a body into records; an error refuses the whole body.
    fn records(&self, body: &[u8]) -> Result<Vec<Record>, String>;
    /// Maps one valid record to an event; an error refuses that record only.
    fn map(&self, record: &Record) -> Result<EventDraft, String>;
}

/// A connector's declared Gate 1 expectations (its `expectations.toml`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expectations {
    /// A record must carry a user id, an email or a phone that normalizes.
    pub require_identifier: bool,
    /// A body with more records is refused whole.
    pub max_records: usize,
    /// Event names the connector may produce; empty: any.
    pub allowed_names: Vec<String>,
}

impl Default for Expectations {
    fn default() -> Self {
        Self { require_identifier: true, max_records: 1000, allowed_names: Vec::new() }
    }
}

struct Registered {
    connector: Arc<dyn Connector>,
    schema: jsonschema::Validator,
    expectations: Expectations,
}

/// The connectors a Cohort runs, each with its compiled schema.
#[derive(Clone, Default)]
pub struct ConnectorSet(Arc<Vec<Registered>>);

impl fmt::Debug for ConnectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|r| r.connector.name())).finish()
    }
}

impl PartialEq for ConnectorSet {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

/// Whether a connector name is usable in routes, scopes and labels.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

impl ConnectorSet {
    /// Checks names (valid, unique, not a built-in source) and compiles every schema.
    pub fn new(connectors: Vec<Arc<dyn Connector>>) -> Result<Self, String> {
        let mut out: Vec<Registered> = Vec::new();
        for c in connectors {
            let name = c.name();
            if !valid_name(name) {
                return Err(format!("connector name `{name}` must be lowercase letters, digits and `_`"));
            }
            if name.parse::<Source>().is_ok() || out.iter().any(|r| r.connector.name() == name) {
                return Err(format!("connector name `{name}` is taken"));
            }
            let schema: Value =
                serde_json::from_str(c.schema()).map_err(|e| format!("connector `{name}`: schema is not JSON: {e}"))?;
            let schema = jsonschema::validator_for(&schema)
                .map_err(|e| format!("connector `{name}`: schema is not a JSON Schema: {e}"))?;
            let expectations: Expectations =
                toml::from_str(c.expectations()).map_err(|e| format!("connector `{name}`: expectations: {e}"))?;
            out.push(Registered { connector: c, schema, expectations });
        }
        Ok(Self(Arc::new(out)))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|r| r.connector.name()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.0.iter().find(|r| r.connector.name() == name).map(|r| &r.connector)
    }

    fn registered(&self, name: &str) -> Option<&Registered> {
        self.0.iter().find(|r| r.connector.name() == name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a record fails its schema: where and which keyword, never the value.
fn schema_problems(validator: &jsonschema::Validator, record: &Value) -> Option<String> {
    let problems: Vec<String> = validator
        .iter_errors(record)
        .take(3)
        .map(|e| {
            // A missing field is named (a field name is no personal data); values never are.
            if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind() {
                return format!("field `{}` is missing", property.as_str().unwrap_or("?"));
            }
            let at = e.instance_path().to_string();
            let keyword = e.schema_path().to_string();
            let keyword = keyword.rsplit('/').next().unwrap_or("schema").to_string();
            format!("{} fails `{keyword}`", if at.is_empty() { "record".to_string() } else { format!("field {at}") })
        })
        .collect();
    (!problems.is_empty()).then(|| format!("schema: {}", problems.join("; ")))
}

fn build(
    c: &dyn Connector,
    d: EventDraft,
    index: usize,
    payload: &RawPayload,
    opts: &NormalizeOptions,
) -> CustomerEvent {
    let mut identifiers = Vec::new();
    let mut traits = d.traits;
    if let Some(u) = d.user_id.map(|u| u.trim().to_string()).filter(|u| !u.is_empty()) {
        push_unique(&mut identifiers, Identifier::new(IdentifierKind::UserId, u));
    }
    if let Some(raw) = d.email {
        match normalize_email(&raw) {
            Some(e) => {
                push_unique(&mut identifiers, Identifier::new(IdentifierKind::Email, opts.email_key(&e)));
                traits.insert("email".into(), Value::String(e));
            }
            None => {
                traits.insert("email_raw".into(), Value::String(raw));
            }
        }
    }
    if let Some(raw) = d.phone {
        match normalize_phone(&raw, &opts.default_region) {
            Some(p) => {
                push_unique(&mut identifiers, Identifier::new(IdentifierKind::Phone, p.clone()));
                traits.insert("phone".into(), Value::String(p));
            }
            None => {
                traits.insert("phone_raw".into(), Value::String(raw));
            }
        }
    }
    let mut properties = d.properties;
    properties.insert("connector".into(), Value::String(c.name().into()));
    CustomerEvent {
        event_id: EventId::for_connector(c.channel(), c.name(), &d.key),
        source: c.channel(),
        kind: d.kind,
        name: d.name,
        occurred_at: d.occurred_at,
        received_at: payload.received_at,
        identifiers,
        traits,
        properties,
        utm: Utm::default(),
        raw: RawRef { seq: None, index: raw_index(index) },
        trace: None,
    }
}

/// Normalizes a connector's payload: records, schema, mapping, identifiers.
pub fn normalize_connector(
    name: &str,
    payload: &RawPayload,
    opts: &NormalizeOptions,
) -> Result<Normalized, NormalizeError> {
    let Some(reg) = opts.connectors.registered(name) else {
        return Err(NormalizeError::Malformed { format: "connector", detail: format!("no connector `{name}`") });
    };
    let c = reg.connector.as_ref();
    check_size(payload.body.len(), c.max_bytes())?;
    let records = c.records(&payload.body).map_err(|detail| NormalizeError::Malformed { format: c.name(), detail })?;
    let expect = &reg.expectations;
    if records.len() > expect.max_records {
        return Err(NormalizeError::TooLarge { limit: expect.max_records, actual: records.len(), unit: "records" });
    }
    let mut out = Normalized { events: Vec::new(), rejected: Vec::new() };
    for (i, record) in records.into_iter().enumerate() {
        let value = Value::Object(record);
        if let Some(reason) = schema_problems(&reg.schema, &value) {
            out.rejected.push(Rejection { index: Some(i), reason });
            continue;
        }
        let Value::Object(record) = value else { continue };
        let draft = match c.map(&record) {
            Ok(d) => d,
            Err(reason) => {
                out.rejected.push(Rejection { index: Some(i), reason });
                continue;
            }
        };
        if let Some(name) =
            draft.name.as_ref().filter(|n| !expect.allowed_names.is_empty() && !expect.allowed_names.contains(n))
        {
            let reason = format!("expectations: event name `{name}` is not in allowed_names");
            out.rejected.push(Rejection { index: Some(i), reason });
            continue;
        }
        let event = build(c, draft, i, payload, opts);
        if expect.require_identifier && event.identifiers.is_empty() {
            let reason = "expectations: no identifier (user_id, or an email or phone that normalizes)".to_string();
            out.rejected.push(Rejection { index: Some(i), reason });
            continue;
        }
        out.events.push(event);
    }
    Ok(out)
}

/// The payload format of a connector's bodies.
pub fn format_of(c: &dyn Connector) -> PayloadFormat {
    PayloadFormat::Connector { name: cohort_messages::msgs::ConnectorName::new(c.name()) }
}

// Record splitters for the three formats `generate-connector` knows.

/// A JSON object, or an array of objects.
pub fn json_records(body: &[u8]) -> Result<Vec<Record>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match v {
        Value::Object(o) => Ok(vec![o]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(o) => Ok(o),
                _ => Err(format!("element {i} is not an object")),
            })
            .collect(),
        _ => Err("expected an object or an array of objects".into()),
    }
}

/// Newline-delimited JSON objects (a stream); blank lines are skipped.
pub fn ndjson_records(body: &[u8]) -> Result<Vec<Record>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(o)) => Ok(o),
            Ok(_) => Err(format!("line {} is not a JSON object", i + 1)),
            Err(e) => Err(format!("line {}: not JSON: {e}", i + 1)),
        })
        .collect()
}

/// CSV with a header row; every value is a string (empty cells are left out).
pub fn csv_records(body: &[u8]) -> Result<Vec<Record>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(body);
    let headers = reader.headers().map_err(|e| format!("CSV header: {e}"))?.clone();
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| format!("CSV row {}: {e}", i + 1))?;
        let mut record = Record::new();
        for (h, v) in headers.iter().zip(row.iter()) {
            if !v.is_empty() {
                record.insert(h.trim().to_string(), Value::String(v.to_string()));
            }
        }
        out.push(record);
    }
    Ok(out)
}

/// logfmt lines: `key=value key2="quoted value"`; every value is a string.
pub fn logfmt_records(body: &[u8]) -> Result<Vec<Record>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut record = Record::new();
        let mut rest = line.trim();
        while !rest.is_empty() {
            let eq = rest.find('=').ok_or_else(|| format!("line {}: expected key=value", n + 1))?;
            let key = rest[..eq].trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(format!("line {}: bad key", n + 1));
            }
            rest = &rest[eq + 1..];
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').ok_or_else(|| format!("line {}: unclosed quote", n + 1))?;
                rest = &quoted[end + 1..];
                quoted[..end].to_string()
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let v = rest[..end].to_string();
                rest = &rest[end..];
                v
            };
            record.insert(key.to_string(), Value::String(value));
            rest = rest.trim_start();
        }
        out.push(record);
    }
    Ok(out)
}

/// A record's text field, if present and not blank.
pub fn field<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
    record.get(name).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

/// A record's timestamp field: RFC 3339, or Unix seconds.
pub fn timestamp_field(record: &Record, name: &str) -> Result<DateTime<Utc>, String> {
    match record.get(name) {
        Some(Value::String(s)) => {
            super::util::parse_datetime(s).ok_or_else(|| format!("field `{name}` is not a timestamp"))
        }
        Some(Value::Number(n)) => {
            n.as_f64().and_then(super::util::from_unix).ok_or_else(|| format!("field `{name}` is not a timestamp"))
        }
        _ => Err(format!("field `{name}` is missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitters_read_each_format_and_refuse_what_is_not() {
        assert_eq!(json_records(br#"{"a":1}"#).unwrap().len(), 1);
        assert_eq!(json_records(br#"[{"a":1},{"b":2}]"#).unwrap().len(), 2);
        assert!(json_records(b"[1]").is_err() && json_records(b"nope").is_err());
        assert_eq!(ndjson_records(b"{\"a\":1}\n\n{\"a\":2}\n").unwrap().len(), 2);
        assert!(ndjson_records(b"{\"a\":1}\n[2]").unwrap_err().contains("line 2"));
        let rows = csv_records(b"id,email\n1,a@b.de\n2,\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert!(!rows[1].contains_key("email"), "empty cells are left out");
        let lines = logfmt_records(b"id=1 event=quiz_submitted note=\"two words\"\n").unwrap();
        assert_eq!(field(&lines[0], "note"), Some("two words"));
        assert!(logfmt_records(b"id=1 \"broken").is_err());
        assert!(logfmt_records(b"note=\"unclosed").is_err());
    }

    #[test]
    fn names_are_lowercase_identifiers() {
        assert!(valid_name("new_lms") && valid_name("lms2"));
        assert!(!valid_name("New") && !valid_name("2lms") && !valid_name("a-b") && !valid_name(""));
    }
}
