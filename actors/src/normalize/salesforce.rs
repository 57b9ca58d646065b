//! Salesforce: Change Data Capture events (JSON relay) and Bulk API 2.0 CSV query results.

use super::contact::{normalize_email, normalize_phone};
use super::util::{
    check_size, consent_change, content_hash, from_unix, id_string, parse_datetime, parse_json, push_unique, raw_index,
    type_name, utf8,
};
use super::{NormalizeError, NormalizeOptions, Normalized};
use chrono::{DateTime, Utc};
use cohort_messages::msgs::{RawPayload, Rejection};
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Source, Utm};
use serde_json::{json, Map, Value};

/// Audit fields every change carries: event properties, not student traits.
const SYSTEM_FIELDS: &[&str] = &[
    "CreatedDate",
    "CreatedById",
    "LastModifiedDate",
    "LastModifiedById",
    "SystemModstamp",
    "LastActivityDate",
    "LastViewedDate",
    "LastReferencedDate",
    "IsDeleted",
    "attributes",
];

/// Canonical traits holding email addresses: a valid address is also an identifier.
const EMAIL_TRAITS: &[&str] = &["email", "preferred_email", "university_email", "alternate_email", "work_email"];
/// Canonical traits holding phone numbers: E.164 and an identifier, or `<trait>_raw`.
const PHONE_TRAITS: &[&str] = &["phone", "mobile_phone"];

/// Sets one mapped field: emails and phones are normalized (and identify the contact), other
/// values are kept as given.
fn set_field(
    api_name: &str,
    value: Value,
    opts: &NormalizeOptions,
    traits: &mut Map<String, Value>,
    ids: &mut Vec<Identifier>,
) {
    let name = opts.salesforce_fields.get(api_name).map_or(api_name, String::as_str).to_string();
    if value.is_null() {
        traits.insert(name, Value::Null);
        return;
    }
    if name == "date_of_birth" {
        match super::person::date_of_birth_trait(&value, opts.date_order) {
            Some(date) => traits.insert(name, date),
            None => traits.insert("date_of_birth_raw".into(), value),
        };
        return;
    }
    if EMAIL_TRAITS.contains(&name.as_str()) {
        match value.as_str().and_then(normalize_email) {
            Some(e) => {
                push_unique(ids, Identifier::new(IdentifierKind::Email, opts.email_key(&e)));
                traits.insert(name, Value::String(e));
            }
            // `email` only ever holds an address; EDA's preferred_email is a picklist.
            None if name == "email" => {
                traits.insert("email_raw".into(), value);
            }
            None => {
                traits.insert(name, value);
            }
        }
        return;
    }
    if PHONE_TRAITS.contains(&name.as_str()) {
        let text = match &value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        match text.and_then(|t| normalize_phone(&t, &opts.default_region)) {
            Some(p) => {
                push_unique(ids, Identifier::new(IdentifierKind::Phone, p.clone()));
                traits.insert(name, Value::String(p));
            }
            None => {
                traits.insert(format!("{name}_raw"), value);
            }
        }
        return;
    }
    traits.insert(name, value);
}

/// Flattens compound fields (`Name`, `MailingAddress`) to the dotted names CDC uses in
/// `changedFields` and `nulledFields` (`Name.FirstName`).
fn flatten(prefix: &str, obj: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (k, v) in obj {
        let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Object(inner) => flatten(&name, inner, out),
            other => out.push((name, other.clone())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Change Data Capture

/// The change event inside its relay envelope: `{"data":{"payload","event"},"channel"}`, the
/// same without `data`, or the bare payload.
struct Envelope<'a> {
    payload: &'a Map<String, Value>,
    header: &'a Map<String, Value>,
    replay_id: Option<String>,
    channel: Option<&'a Value>,
}

fn envelope(root: &Map<String, Value>) -> Result<Envelope<'_>, NormalizeError> {
    let data = root.get("data").and_then(Value::as_object).unwrap_or(root);
    let payload = match data.get("payload") {
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(NormalizeError::SalesforceCdc(format!(
                "`data.payload` must be an object, found {}",
                type_name(other)
            )))
        }
        None if data.contains_key("ChangeEventHeader") => data,
        None => return Err(NormalizeError::SalesforceCdc("missing `data.payload`".into())),
    };
    let header = match payload.get("ChangeEventHeader") {
        Some(Value::Object(h)) => h,
        Some(other) => {
            return Err(NormalizeError::SalesforceCdc(format!(
                "`ChangeEventHeader` must be an object, found {}",
                type_name(other)
            )))
        }
        None => return Err(NormalizeError::SalesforceCdc("missing `data.payload.ChangeEventHeader`".into())),
    };
    let replay_id = data
        .get("event")
        .and_then(|e| e.get("replayId"))
        .or_else(|| root.get("event").and_then(|e| e.get("replayId")))
        .and_then(id_string);
    Ok(Envelope { payload, header, replay_id, channel: root.get("channel").filter(|c| !c.is_null()) })
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

pub(crate) fn normalize_cdc(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    check_size(payload.body.len(), opts.max_webhook_bytes)?;
    let value = parse_json(&payload.body, "Salesforce CDC")?;
    let Value::Object(root) = value else {
        return Err(NormalizeError::SalesforceCdc(format!(
            "a change event must be a JSON object, found {}",
            type_name(&value)
        )));
    };
    let env = envelope(&root)?;
    let header = env.header;
    let change_type = match header.get("changeType") {
        Some(Value::String(s)) => s.trim().to_ascii_uppercase(),
        _ => return Err(NormalizeError::SalesforceCdc("missing `ChangeEventHeader.changeType`".into())),
    };
    let kind = match change_type.as_str() {
        "CREATE" | "UPDATE" | "UNDELETE" => EventKind::ContactChanged,
        "DELETE" => EventKind::ContactDeleted,
        t if t.starts_with("GAP_") => EventKind::ContactGap,
        _ => return Err(NormalizeError::SalesforceCdc("unknown `changeType`".into())),
    };
    let record_ids = match header.get("recordIds") {
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(other) => {
            return Err(NormalizeError::SalesforceCdc(format!(
                "`recordIds` must be an array, found {}",
                type_name(other)
            )))
        }
    };
    // Only an overflow event names no records.
    if record_ids.is_empty() && change_type != "GAP_OVERFLOW" {
        return Err(NormalizeError::SalesforceCdc("`ChangeEventHeader.recordIds` is missing or empty".into()));
    }

    let occurred_at = header
        .get("commitTimestamp")
        .and_then(Value::as_f64)
        .and_then(|ms| from_unix(ms / 1000.0))
        .unwrap_or(payload.received_at);
    let transaction_key = header.get("transactionKey").and_then(id_string);
    let sequence = header.get("sequenceNumber").and_then(id_string);
    let nulled = string_list(header.get("nulledFields"));

    // Field values: only what the event carries (an UPDATE carries the changed fields; unchanged
    // ones are absent or null), plus explicit nulls for `nulledFields`.
    let mut fields: Vec<(String, Value)> = Vec::new();
    let mut audit = Map::new();
    if kind == EventKind::ContactChanged {
        let mut flat = Vec::new();
        let body: Map<String, Value> = env
            .payload
            .iter()
            .filter(|(k, _)| k.as_str() != "ChangeEventHeader")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        flatten("", &body, &mut flat);
        for (name, v) in flat {
            if SYSTEM_FIELDS.contains(&name.as_str()) {
                if !v.is_null() {
                    audit.insert(name, v);
                }
            } else if !v.is_null() {
                fields.push((name, v));
            }
        }
        for name in &nulled {
            if !fields.iter().any(|(n, _)| n == name) {
                fields.push((name.clone(), Value::Null));
            }
        }
    }

    let mut base_props = Map::new();
    base_props.insert("change_type".into(), Value::String(change_type.clone()));
    let header_props = [
        ("entityName", "entity_name"),
        ("changedFields", "changed_fields"),
        ("nulledFields", "nulled_fields"),
        ("diffFields", "diff_fields"),
        ("changeOrigin", "change_origin"),
        ("transactionKey", "transaction_key"),
        ("sequenceNumber", "sequence_number"),
        ("commitNumber", "commit_number"),
        ("commitUser", "commit_user"),
        ("commitTimestamp", "commit_timestamp"),
    ];
    for (from, to) in header_props {
        if let Some(v) = header.get(from).filter(|v| !v.is_null()) {
            base_props.insert(to.into(), v.clone());
        }
    }
    if let Some(r) = &env.replay_id {
        base_props.insert("replay_id".into(), Value::String(r.clone()));
    }
    if let Some(c) = env.channel {
        base_props.insert("channel".into(), c.clone());
    }
    if record_ids.len() > 1 {
        base_props.insert("record_ids".into(), Value::Array(record_ids.clone()));
    }
    base_props.extend(audit);
    let opted_out = fields.iter().find(|(n, _)| n == "HasOptedOutOfEmail").and_then(|(_, v)| v.as_bool());
    match opted_out {
        Some(true) => {
            base_props.insert("consent_change".into(), consent_change("email", "opted_out"));
        }
        // Only a change to false is an opt-in; a new contact merely starts out not opted out.
        Some(false) if change_type == "UPDATE" => {
            base_props.insert("consent_change".into(), consent_change("email", "opted_in"));
        }
        _ => {}
    }

    let mut out = Normalized::default();
    if record_ids.is_empty() {
        // Overflow: no record ids, the whole entity must be re-read. No identifier, so the
        // pipeline dead-letters it where an operator sees it.
        let mut props = base_props.clone();
        props.insert("reread_all".into(), Value::Bool(true));
        let key = match (&env.replay_id, &transaction_key) {
            (Some(r), _) => format!("cdc:{r}:overflow"),
            (None, Some(t)) => format!("cdc:{t}:{}:overflow", sequence.as_deref().unwrap_or("0")),
            (None, None) => format!("cdc:h{}:overflow", content_hash(&[&payload.body])),
        };
        out.events.push(CustomerEvent {
            event_id: EventId::new(payload.source, &key),
            source: payload.source,
            kind,
            name: Some(change_type.to_ascii_lowercase()),
            occurred_at,
            received_at: payload.received_at,
            identifiers: Vec::new(),
            traits: Map::new(),
            properties: props,
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        });
        return Ok(out);
    }

    for (index, rid) in record_ids.iter().enumerate() {
        let Some(record_id) = rid.as_str().map(str::trim).filter(|s| !s.is_empty()) else {
            out.rejected.push(Rejection {
                index: Some(index),
                reason: format!("recordIds entry must be a non-empty string, found {}", type_name(rid)),
            });
            continue;
        };
        let key = match (&env.replay_id, &transaction_key) {
            (Some(r), _) => format!("cdc:{r}:{record_id}"),
            (None, Some(t)) => format!("cdc:{t}:{}:{record_id}", sequence.as_deref().unwrap_or("0")),
            (None, None) => format!("cdc:h{}:{record_id}", content_hash(&[&payload.body])),
        };
        let mut props = base_props.clone();
        props.insert("record_id".into(), Value::String(record_id.to_string()));
        let mut identifiers = Vec::new();
        // `003*`: a wildcard for every record of the object (after some field conversions).
        if let Some(prefix) = record_id.strip_suffix('*') {
            props.insert("reread_all".into(), Value::Bool(true));
            props.insert("key_prefix".into(), Value::String(prefix.to_string()));
        } else {
            identifiers.push(Identifier::new(IdentifierKind::SalesforceId, record_id));
        }
        let mut traits = Map::new();
        for (name, v) in &fields {
            set_field(name, v.clone(), opts, &mut traits, &mut identifiers);
        }
        if kind == EventKind::ContactGap {
            props.insert("reread_record_ids".into(), json!([record_id]));
        }
        out.events.push(CustomerEvent {
            event_id: EventId::new(payload.source, &key),
            source: payload.source,
            kind,
            name: Some(change_type.to_ascii_lowercase()),
            occurred_at,
            received_at: payload.received_at,
            identifiers,
            traits,
            properties: props,
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: raw_index(index) },
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Bulk API 2.0 CSV

/// Column delimiters Bulk API 2.0 offers (`columnDelimiter`): COMMA, SEMICOLON, TAB, PIPE,
/// CARET, BACKQUOTE.
const DELIMITERS: [u8; 6] = [b',', b';', b'\t', b'|', b'^', b'`'];

/// The delimiter of a chunk: the candidate occurring most in the header row (outside quotes);
/// field API names never contain any of them. A one-column header is comma-separated.
fn detect_delimiter(text: &str) -> u8 {
    let header = text.split('\n').next().unwrap_or("");
    let mut counts = [0usize; DELIMITERS.len()];
    let mut quoted = false;
    for b in header.bytes() {
        if b == b'"' {
            quoted = !quoted;
        } else if !quoted {
            if let Some(i) = DELIMITERS.iter().position(|d| *d == b) {
                counts[i] += 1;
            }
        }
    }
    let best = counts.iter().enumerate().max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)));
    match best {
        Some((i, c)) if *c > 0 => DELIMITERS[i],
        _ => b',',
    }
}

fn id_column(header: &csv::StringRecord) -> Option<usize> {
    header.iter().position(|h| h.trim().eq_ignore_ascii_case("Id"))
}

pub(crate) fn normalize_csv(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    check_size(payload.body.len(), opts.max_csv_bytes)?;
    let text = utf8(&payload.body, "Salesforce CSV")?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(NormalizeError::SalesforceCsv("empty body (expected a header row of field API names)".into()));
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(detect_delimiter(text))
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| NormalizeError::Malformed {
            format: "Salesforce CSV",
            detail: format!("unreadable header row: {e}"),
        })?
        .clone();
    if id_column(&header).is_none() {
        return Err(NormalizeError::SalesforceCsv("the header row has no `Id` column".into()));
    }
    let mut out = Normalized::default();
    for (index, row) in reader.records().enumerate() {
        match row {
            Ok(row) => match normalize_csv_record(&header, &row, index, payload.received_at, opts) {
                Ok(e) => out.events.push(e),
                Err(r) => out.rejected.push(r),
            },
            Err(e) => out.rejected.push(Rejection {
                index: Some(index),
                reason: match e.position() {
                    Some(p) => format!("unreadable row at line {}", p.line()),
                    None => "unreadable row".into(),
                },
            }),
        }
    }
    Ok(out)
}

/// One data row of a Bulk API 2.0 export → a `ContactChanged` event (source CRM). `index` is
/// the data-row index (0 = first row after the header). Public so a streaming importer that
/// reads the file itself produces exactly the events the HTTP import does.
pub fn normalize_csv_record(
    header: &csv::StringRecord,
    row: &csv::StringRecord,
    index: usize,
    received_at: DateTime<Utc>,
    opts: &NormalizeOptions,
) -> Result<CustomerEvent, Rejection> {
    let reject = |reason: String| Rejection { index: Some(index), reason };
    if row.len() != header.len() {
        return Err(reject(format!("row has {} columns, the header has {}", row.len(), header.len())));
    }
    let id_col = id_column(header).ok_or_else(|| reject("the header row has no `Id` column".into()))?;
    let record_id = row.get(id_col).map(str::trim).unwrap_or("");
    if record_id.is_empty() {
        return Err(reject("empty `Id`".into()));
    }
    let mut identifiers = vec![Identifier::new(IdentifierKind::SalesforceId, record_id)];
    let mut traits = Map::new();
    let mut properties = Map::new();
    let mut last_modified = None;
    let mut modstamp = None;
    for (col, (name, cell)) in header.iter().zip(row.iter()).enumerate() {
        let name = name.trim();
        if col == id_col || name.is_empty() || cell.is_empty() {
            continue;
        }
        match name {
            "LastModifiedDate" => last_modified = Some(cell),
            "SystemModstamp" => modstamp = Some(cell),
            _ => {}
        }
        if SYSTEM_FIELDS.contains(&name) {
            properties.insert(name.to_string(), Value::String(cell.to_string()));
            continue;
        }
        // Bulk API writes checkboxes as true/false.
        let value = match cell {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            other => Value::String(other.to_string()),
        };
        if name == "HasOptedOutOfEmail" && value == Value::Bool(true) {
            properties.insert("consent_change".into(), consent_change("email", "opted_out"));
        }
        set_field(name, value, opts, &mut traits, &mut identifiers);
    }
    properties.insert("change_origin".into(), Value::String("bulk_api_csv".into()));
    properties.insert("record_id".into(), Value::String(record_id.to_string()));
    let version = match last_modified {
        // The columns count too: a re-export of the same record version with more fields
        // brings new facts, while the same file sent again (or reordered) is a duplicate.
        Some(lm) => {
            let mut columns: Vec<&[u8]> = header.iter().map(|h| h.trim().as_bytes()).collect();
            columns.sort_unstable();
            format!("{}:c{}", lm.trim(), content_hash(&columns))
        }
        None => {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(header.len() * 2);
            for (h, c) in header.iter().zip(row.iter()) {
                parts.push(h.as_bytes());
                parts.push(c.as_bytes());
            }
            format!("h{}", content_hash(&parts))
        }
    };
    let occurred_at = last_modified.or(modstamp).and_then(parse_datetime).unwrap_or(received_at);
    Ok(CustomerEvent {
        event_id: EventId::new(Source::Crm, &format!("csv:{record_id}:{version}")),
        source: Source::Crm,
        kind: EventKind::ContactChanged,
        name: None,
        occurred_at,
        received_at,
        identifiers,
        traits,
        properties,
        utm: Utm::default(),
        trace: None,
        raw: RawRef { seq: None, index: raw_index(index) },
    })
}
