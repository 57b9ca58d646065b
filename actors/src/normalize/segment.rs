//! The Segment HTTP Tracking API (web and mobile): single calls and `/v1/batch`.
//!
//! Being drop-in compatible means accepting what every Segment SDK sends and rejecting what
//! Segment rejects: a call needs a `userId` or an `anonymousId`; events over 32 KB are refused;
//! batches over 500 KB or 2,500 events are a 413.

use super::contact::{normalize_email, normalize_phone};
use super::util::{
    check_size, deep_merge, id_string, json_datetime, parse_json, push_unique, raw_index, scalar_string, type_name,
};
use super::{NormalizeError, NormalizeOptions, Normalized};
use chrono::{DateTime, Utc};
use cohort_messages::msgs::{RawPayload, Rejection, SegmentCall};
use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, IdentifierKind, RawRef, Utm};
use serde_json::{Map, Value};

const FORMAT: &str = "Segment";

/// Segment's reserved traits (and common education ones) in camelCase → canonical snake_case.
const TRAIT_NAMES: &[(&str, &str)] = &[
    ("firstName", "first_name"),
    ("lastName", "last_name"),
    ("createdAt", "created_at"),
    ("phoneNumber", "phone"),
    ("enrollmentStatus", "enrollment_status"),
    ("applicationStage", "application_stage"),
    ("postalCode", "postal_code"),
    ("birthday", "date_of_birth"),
    ("dateOfBirth", "date_of_birth"),
];

/// Page fields analytics.js puts in `context.page`; a page event's properties must have them.
const PAGE_FIELDS: &[&str] = &["path", "url", "referrer", "title", "search"];

fn kind_of(call: &str) -> Option<EventKind> {
    Some(match call {
        "identify" => EventKind::Identify,
        "track" => EventKind::Track,
        "page" => EventKind::Page,
        "screen" => EventKind::Screen,
        "group" => EventKind::Group,
        "alias" => EventKind::Alias,
        _ => return None,
    })
}

fn endpoint_kind(call: SegmentCall) -> Option<EventKind> {
    Some(match call {
        SegmentCall::Identify => EventKind::Identify,
        SegmentCall::Track => EventKind::Track,
        SegmentCall::Page => EventKind::Page,
        SegmentCall::Screen => EventKind::Screen,
        SegmentCall::Group => EventKind::Group,
        SegmentCall::Alias => EventKind::Alias,
        SegmentCall::Batch => return None,
    })
}

pub(crate) fn normalize_segment(
    payload: &RawPayload,
    call: SegmentCall,
    opts: &NormalizeOptions,
) -> Result<Normalized, NormalizeError> {
    let limits = &opts.segment;
    let Some(kind) = endpoint_kind(call) else {
        return normalize_batch(payload, opts);
    };
    check_size(payload.body.len(), limits.max_event_bytes)?;
    let value = parse_json(&payload.body, FORMAT)?;
    let Value::Object(obj) = value else {
        return Err(NormalizeError::Segment(format!("a call must be a JSON object, found {}", type_name(&value))));
    };
    let mut out = Normalized::default();
    match event_from(obj, Some(kind), &payload.body, payload, 0, opts) {
        Ok(e) => out.events.push(e),
        Err(reason) => out.rejected.push(Rejection { index: None, reason }),
    }
    Ok(out)
}

/// An optional object field: absent and `null` are `None`, any other non-object is an error.
fn object_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Map<String, Value>>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(format!("`{key}` must be an object, found {}", type_name(other))),
    }
}

fn normalize_batch(payload: &RawPayload, opts: &NormalizeOptions) -> Result<Normalized, NormalizeError> {
    let limits = &opts.segment;
    check_size(payload.body.len(), limits.max_batch_bytes)?;
    let value = parse_json(&payload.body, FORMAT)?;
    let Value::Object(mut top) = value else {
        return Err(NormalizeError::Segment(format!(
            "a batch must be a JSON object with a `batch` array, found {}",
            type_name(&value)
        )));
    };
    let items = match top.remove("batch") {
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(NormalizeError::Segment(format!("`batch` must be an array, found {}", type_name(&other))))
        }
        None => return Err(NormalizeError::Segment("missing `batch` array".into())),
    };
    if items.len() > limits.max_batch_events {
        return Err(NormalizeError::TooLarge { limit: limits.max_batch_events, actual: items.len(), unit: "events" });
    }
    let batch_context = object_field(&top, "context").map_err(NormalizeError::Segment)?.cloned();
    let batch_integrations = object_field(&top, "integrations").map_err(NormalizeError::Segment)?.cloned();
    let batch_sent_at = top.get("sentAt").filter(|v| json_datetime(v).is_some()).cloned();

    let mut out = Normalized::default();
    for (index, item) in items.into_iter().enumerate() {
        let raw = serde_json::to_vec(&item).unwrap_or_default();
        if raw.len() > limits.max_event_bytes {
            out.rejected.push(Rejection {
                index: Some(index),
                reason: format!("event is {} bytes, over the {}-byte limit", raw.len(), limits.max_event_bytes),
            });
            continue;
        }
        let Value::Object(mut obj) = item else {
            out.rejected.push(Rejection {
                index: Some(index),
                reason: format!("batch element must be an object, found {}", type_name(&item)),
            });
            continue;
        };
        // Batch-level context and integrations sit under each event's own.
        for (key, shared) in [("context", &batch_context), ("integrations", &batch_integrations)] {
            let Some(shared) = shared else { continue };
            match obj.get(key) {
                None | Some(Value::Null) => {
                    obj.insert(key.to_string(), Value::Object(shared.clone()));
                }
                Some(Value::Object(own)) => {
                    let mut merged = shared.clone();
                    deep_merge(&mut merged, own);
                    obj.insert(key.to_string(), Value::Object(merged));
                }
                Some(_) => {} // rejected below with the type error
            }
        }
        if let Some(sent_at) = &batch_sent_at {
            if obj.get("sentAt").is_none_or(Value::is_null) {
                obj.insert("sentAt".into(), sent_at.clone());
            }
        }
        match event_from(obj, None, &raw, payload, index, opts) {
            Ok(e) => out.events.push(e),
            Err(reason) => out.rejected.push(Rejection { index: Some(index), reason }),
        }
    }
    Ok(out)
}

/// An optional id field: absent, `null` or empty is `None`; objects, arrays, booleans are errors.
fn id_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ (Value::String(_) | Value::Number(_))) => Ok(id_string(v)),
        Some(other) => Err(format!("`{key}` must be a string, found {}", type_name(other))),
    }
}

fn path<'a>(obj: Option<&'a Map<String, Value>>, keys: &[&str]) -> Option<&'a Value> {
    let (last, init) = keys.split_last()?;
    let mut cur = obj?;
    for k in init {
        cur = cur.get(*k)?.as_object()?;
    }
    cur.get(*last)
}

/// The event time: Segment's clock-skew correction, `timestamp + (receivedAt - sentAt)`, or the
/// receipt time when the client sent none.
fn occurred_at(obj: &Map<String, Value>, received_at: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let ts = ["timestamp", "originalTimestamp"]
        .into_iter()
        .find_map(|k| obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
    let Some((key, ts)) = ts else {
        return Ok(received_at);
    };
    let ts = json_datetime(ts).ok_or_else(|| format!("`{key}` is not an ISO-8601 date-time"))?;
    let sent = obj.get("sentAt").and_then(json_datetime);
    Ok(match sent {
        Some(sent) => ts.checked_add_signed(received_at.signed_duration_since(sent)).unwrap_or(ts),
        None => ts,
    })
}

/// Canonical traits; email and phone are normalized and become identifiers, values that do
/// not normalize are kept as `email_raw` / `phone_raw`.
fn canonical_traits(raw: Map<String, Value>, opts: &NormalizeOptions, ids: &mut Vec<Identifier>) -> Map<String, Value> {
    let region = opts.default_region.as_str();
    let mut traits = Map::new();
    for (k, v) in raw {
        let name = TRAIT_NAMES.iter().find(|(from, _)| *from == k).map_or(k.as_str(), |(_, to)| to).to_string();
        match name.as_str() {
            "email" => match v.as_str().map(normalize_email) {
                Some(Some(e)) => {
                    push_unique(ids, Identifier::new(IdentifierKind::Email, opts.email_key(&e)));
                    traits.insert(name, Value::String(e));
                }
                Some(None) => {
                    traits.insert("email_raw".into(), v);
                }
                None => {
                    traits.insert(name, v);
                }
            },
            "phone" => match scalar_string(&v).map(|s| normalize_phone(&s, region)) {
                Some(Some(p)) => {
                    push_unique(ids, Identifier::new(IdentifierKind::Phone, p.clone()));
                    traits.insert(name, Value::String(p));
                }
                Some(None) => {
                    traits.insert("phone_raw".into(), v);
                }
                None => {
                    traits.insert(name, v);
                }
            },
            "date_of_birth" => match super::person::date_of_birth_trait(&v, opts.date_order) {
                Some(date) => {
                    traits.insert(name, date);
                }
                None => {
                    traits.insert("date_of_birth_raw".into(), v);
                }
            },
            "address" => {
                if let Some(city) = v.get("city").and_then(scalar_string) {
                    traits.entry("city").or_insert(Value::String(city));
                }
                traits.insert(name, v);
            }
            _ => {
                traits.insert(name, v);
            }
        }
    }
    traits
}

fn utm(ctx: Option<&Map<String, Value>>) -> Utm {
    let campaign = path(ctx, &["campaign"]).and_then(Value::as_object);
    let get = |keys: &[&str]| campaign.and_then(|c| keys.iter().find_map(|k| c.get(*k).and_then(scalar_string)));
    Utm {
        source: get(&["source", "utm_source"]),
        medium: get(&["medium", "utm_medium"]),
        campaign: get(&["name", "campaign", "utm_campaign"]),
        term: get(&["term", "utm_term"]),
        content: get(&["content", "utm_content"]),
    }
}

/// One Segment call → one event, or the reason it is refused.
fn event_from(
    obj: Map<String, Value>,
    endpoint: Option<EventKind>,
    raw: &[u8],
    payload: &RawPayload,
    index: usize,
    opts: &NormalizeOptions,
) -> Result<CustomerEvent, String> {
    let body_type = match obj.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.trim().to_ascii_lowercase()),
        Some(other) => return Err(format!("`type` must be a string, found {}", type_name(other))),
    };
    let kind = match (endpoint, body_type.as_deref()) {
        (Some(k), None) => k,
        (Some(k), Some(t)) => match kind_of(t) {
            Some(tk) if tk == k => k,
            Some(tk) => return Err(format!("`type` is `{}` but the call was sent to /v1/{}", tk.as_str(), k.as_str())),
            None => return Err(format!("unknown `type` for a call sent to /v1/{}", k.as_str())),
        },
        (None, Some(t)) => {
            kind_of(t).ok_or("unknown `type` (expected identify, track, page, screen, group or alias)")?
        }
        (None, None) => return Err("missing `type`".into()),
    };

    let user_id = id_field(&obj, "userId")?;
    let anonymous_id = id_field(&obj, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err("either `userId` or `anonymousId` is required".into());
    }
    let ctx = object_field(&obj, "context")?;
    let props = object_field(&obj, "properties")?;
    let top_traits = object_field(&obj, "traits")?;
    let integrations = object_field(&obj, "integrations")?;

    let name = match kind {
        EventKind::Track => match obj.get("event") {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => return Err("a track call requires a non-empty `event` string".into()),
        },
        EventKind::Page | EventKind::Screen => obj.get("name").and_then(scalar_string),
        _ => None,
    };
    let previous_id = id_field(&obj, "previousId")?;
    let group_id = id_field(&obj, "groupId")?;
    match kind {
        EventKind::Alias if previous_id.is_none() || user_id.is_none() => {
            return Err("an alias call requires `userId` and `previousId`".into())
        }
        EventKind::Group if group_id.is_none() => return Err("a group call requires `groupId`".into()),
        _ => {}
    }

    let source = payload.source;
    let event_id = match id_field(&obj, "messageId")? {
        Some(m) => EventId::new(source, &m),
        None => EventId::from_content(source, &[raw]),
    };
    let occurred_at = occurred_at(&obj, payload.received_at)?;

    let mut identifiers = Vec::new();
    if let Some(u) = &user_id {
        identifiers.push(Identifier::new(IdentifierKind::UserId, u.clone()));
    }
    if let Some(a) = &anonymous_id {
        identifiers.push(Identifier::new(IdentifierKind::AnonymousId, a.clone()));
    }
    if let Some(prev) = &previous_id {
        // analytics.js aliases the anonymous id; server libraries alias an older user id.
        let kind =
            if Some(prev) == anonymous_id.as_ref() { IdentifierKind::AnonymousId } else { IdentifierKind::UserId };
        push_unique(&mut identifiers, Identifier::new(kind, prev.clone()));
    }

    // User traits: those the SDK carries in context, then the call's own (not a group's).
    let mut raw_traits = Map::new();
    if let Some(ct) = path(ctx, &["traits"]).and_then(Value::as_object) {
        raw_traits.extend(ct.clone());
    }
    if kind != EventKind::Group {
        if let Some(t) = top_traits {
            raw_traits.extend(t.clone());
        }
    }
    let mut traits = canonical_traits(raw_traits, opts, &mut identifiers);
    if let Some(device) = path(ctx, &["device", "id"]).and_then(scalar_string) {
        push_unique(&mut identifiers, Identifier::new(IdentifierKind::DeviceId, device));
    }
    let session = path(ctx, &["sessionId"])
        .or_else(|| path(ctx, &["session_id"]))
        .or_else(|| path(props, &["session_id"]))
        .or_else(|| path(integrations, &["Amplitude", "session_id"]))
        .and_then(scalar_string);
    if let Some(session) = session {
        push_unique(&mut identifiers, Identifier::new(IdentifierKind::SessionId, session));
    }
    if let Some(token) = path(ctx, &["device", "token"]).and_then(scalar_string) {
        traits.insert("push_token".into(), Value::String(token));
    }
    if let Some(version) = path(ctx, &["app", "version"]).and_then(scalar_string) {
        traits.insert("app_version".into(), Value::String(version));
    }
    if let Some(platform) = path(ctx, &["os", "name"]).and_then(scalar_string) {
        traits.insert("platform".into(), Value::String(platform));
    }

    let mut properties = props.cloned().unwrap_or_default();
    if kind == EventKind::Page {
        if let Some(page) = path(ctx, &["page"]).and_then(Value::as_object) {
            for field in PAGE_FIELDS {
                if properties.get(*field).is_none_or(Value::is_null) {
                    if let Some(v) = page.get(*field).filter(|v| !v.is_null()) {
                        properties.insert(field.to_string(), v.clone());
                    }
                }
            }
        }
    }
    if matches!(kind, EventKind::Page | EventKind::Screen) {
        if let Some(category) = obj.get("category").filter(|v| !v.is_null()) {
            properties.entry("category").or_insert_with(|| category.clone());
        }
    }
    if let Some(consent) = path(ctx, &["consent", "categoryPreferences"]).filter(|v| !v.is_null()) {
        properties.insert("consent".into(), consent.clone());
    }
    if kind == EventKind::Group {
        if let Some(g) = &group_id {
            properties.insert("group_id".into(), Value::String(g.clone()));
        }
        if let Some(t) = top_traits {
            properties.insert("group_traits".into(), Value::Object(t.clone()));
        }
    }
    if let (EventKind::Alias, Some(prev)) = (kind, &previous_id) {
        properties.insert("previous_id".into(), Value::String(prev.clone()));
    }

    Ok(CustomerEvent {
        event_id,
        source,
        kind,
        name,
        occurred_at,
        received_at: payload.received_at,
        identifiers,
        traits,
        properties,
        utm: utm(ctx),
        trace: None,
        raw: RawRef { seq: None, index: raw_index(index) },
    })
}
