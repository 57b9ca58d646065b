//! Small helpers shared by the source normalizers.

use super::NormalizeError;
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Reads a body as UTF-8 text, saying where it stops being UTF-8.
pub(crate) fn utf8<'a>(body: &'a [u8], format: &'static str) -> Result<&'a str, NormalizeError> {
    std::str::from_utf8(body).map_err(|e| NormalizeError::Malformed {
        format,
        detail: format!("body is not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
    })
}

/// Parses a JSON body. The message keeps serde's line and column but never the input itself.
pub(crate) fn parse_json(body: &[u8], format: &'static str) -> Result<Value, NormalizeError> {
    let text = utf8(body, format)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str::<Value>(text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Eof => "unexpected end of input".to_string(),
            serde_json::error::Category::Syntax => {
                // Syntax messages name the expected token, never a value; drop serde's own
                // position suffix since we add ours.
                let msg = e.to_string();
                match msg.rfind(" at line ") {
                    Some(pos) => msg[..pos].to_string(),
                    None => msg,
                }
            }
            _ => "invalid JSON".to_string(),
        };
        NormalizeError::Malformed {
            format,
            detail: format!("invalid JSON at line {}, column {}: {what}", e.line(), e.column()),
        }
    })
}

/// Makes a source's values storable in every backend: an integer above `i64::MAX` becomes a
/// double (as JavaScript, which most senders are, reads it anyway) and a NUL in a key becomes
/// U+FFFD. BSON holds neither, and one such value made every MongoDB flush fail.
pub(crate) fn storable_map(map: &mut serde_json::Map<String, Value>) {
    if map.keys().any(|k| k.contains('\0')) {
        let entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
        map.extend(entries.into_iter().map(|(k, v)| (k.replace('\0', "\u{fffd}"), v)));
    }
    map.values_mut().for_each(storable);
}

fn storable(value: &mut Value) {
    match value {
        Value::Number(n) if n.as_u64().is_some_and(|u| i64::try_from(u).is_err()) => {
            if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *n = f;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(storable),
        Value::Object(map) => storable_map(map),
        _ => {}
    }
}

/// Refuses bodies over a byte limit before any parsing.
pub(crate) fn check_size(len: usize, limit: usize) -> Result<(), NormalizeError> {
    if len > limit {
        return Err(NormalizeError::TooLarge { limit, actual: len, unit: "bytes" });
    }
    Ok(())
}

/// The JSON type of a value, for error messages that must not quote the value.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An id-like value: a non-empty string, or an integer (some SDKs send numeric user ids).
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_string())
        }
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// A scalar rendered as a string (UTM values, session ids), or `None` for empty and composite.
pub(crate) fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_string())
        }
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses the date-times sources send: RFC 3339 / ISO-8601 with any offset (`Z`, `+02:00`,
/// `+0200`, `+02`), a space instead of `T`, no offset (taken as UTC), or a bare date.
pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    for fmt in
        ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%:z"]
    {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    // An offset of hours only, as ISO-8601 allows: `+02`.
    let b = s.as_bytes();
    if b.len() > 3 && matches!(b[b.len() - 3], b'+' | b'-') && b[b.len() - 2..].iter().all(u8::is_ascii_digit) {
        return parse_datetime(&format!("{s}:00"));
    }
    let naive = s.strip_suffix('Z').unwrap_or(s);
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(ndt) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Some(Utc.from_utc_datetime(&ndt));
        }
    }
    NaiveDate::parse_from_str(naive, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|ndt| Utc.from_utc_datetime(&ndt))
}

/// Unix time in seconds or, if implausibly large for seconds, milliseconds.
pub(crate) fn from_unix(n: f64) -> Option<DateTime<Utc>> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let millis = if n >= 100_000_000_000.0 { n } else { n * 1000.0 };
    if millis > 253_402_300_799_000.0 {
        return None; // after year 9999
    }
    Utc.timestamp_millis_opt(millis as i64).single()
}

/// A JSON date-time: an ISO-8601 string or a Unix number.
pub(crate) fn json_datetime(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => parse_datetime(s),
        Value::Number(n) => n.as_f64().and_then(from_unix),
        _ => None,
    }
}

/// Deep-merges `overlay` into `base`; the overlay wins except where both hold objects.
pub(crate) fn deep_merge(base: &mut Map<String, Value>, overlay: &Map<String, Value>) {
    for (k, v) in overlay {
        match (base.get_mut(k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => deep_merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// An element index as stored in `RawRef` (saturating: chunks are far smaller than u32::MAX).
pub(crate) fn raw_index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// `{"channel": ..., "status": ...}`: a consent change the profile and the activation side act on.
pub(crate) fn consent_change(channel: &str, status: &str) -> Value {
    json!({ "channel": channel, "status": status })
}

/// Hex SHA-256 prefix over length-prefixed parts, for ids of rows without a key of their own.
pub(crate) fn content_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds an identifier once.
pub(crate) fn push_unique(ids: &mut Vec<cohort_messages::Identifier>, id: cohort_messages::Identifier) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_with_offsets_become_utc() {
        let utc = |s: &str| parse_datetime(s).map(|d| d.to_rfc3339());
        let want = Some("2026-11-02T08:30:00+00:00".to_string());
        assert_eq!(utc("2026-11-02T09:30:00+01:00"), want);
        assert_eq!(utc("2026-11-02T09:30:00+0100"), want);
        assert_eq!(utc("2026-11-02T09:30:00+01"), want);
        assert_eq!(utc("2026-11-02 09:30:00+01:00"), want);
        assert_eq!(utc("2026-11-02T08:30:00Z"), want);
        assert_eq!(utc("2026-11-02T08:30:00"), want);
        assert_eq!(utc("2026-11-02T03:30:00-05:00"), want);
        assert!(parse_datetime("yesterday").is_none());
        assert!(parse_datetime("").is_none());
    }

    #[test]
    fn unix_seconds_and_millis() {
        assert_eq!(from_unix(1_721_136_551.0), from_unix(1_721_136_551_000.0));
        assert!(from_unix(-1.0).is_none());
        assert!(from_unix(f64::NAN).is_none());
        assert!(from_unix(1e30).is_none());
    }
}
