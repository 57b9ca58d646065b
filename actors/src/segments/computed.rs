//! Computed traits (slide 11's inputs), derived from a profile's activity at a moment: windowed
//! counts, recency, engagement, sentiment and the funnel stage. Pure functions of the record and
//! the clock, so the Profile API, segment rules and models all see the same numbers.

use chrono::{DateTime, Duration, Utc};
use cohort_messages::{IdentifierKind, ProfileRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

use super::lang::{Facts, Val};
use super::models::Models;

/// Where a student is in the enrollment funnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunnelStage {
    Inquiry,
    Application,
    Enrollment,
    Active,
    Alumni,
}

impl FunnelStage {
    pub fn as_str(self) -> &'static str {
        match self {
            FunnelStage::Inquiry => "inquiry",
            FunnelStage::Application => "application",
            FunnelStage::Enrollment => "enrollment",
            FunnelStage::Active => "active",
            FunnelStage::Alumni => "alumni",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Computed {
    pub page_views_7d: u64,
    pub page_views_30d: u64,
    /// Page views by topic in the last 7 and 30 days (topics with at least one view).
    pub page_views_by_topic_7d: BTreeMap<String, u64>,
    pub page_views_by_topic_30d: BTreeMap<String, u64>,
    /// The most viewed topic of all time, and every topic viewed (most viewed first, at most 20).
    pub top_topic: Option<String>,
    pub topics: Vec<String>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub days_since_last_login: Option<i64>,
    pub assignments_completed_30d: u64,
    pub email_opens_30d: u64,
    pub email_clicks_30d: u64,
    /// 0-100, saturating in opens + 3 × clicks over 30 days.
    pub email_engagement_score: f64,
    /// Average sentiment of WhatsApp messages, -1..1.
    pub whatsapp_sentiment_avg: Option<f64>,
    pub funnel_stage: FunnelStage,
    /// 0-100, saturating in a weighted sum of 30-day activity (see `engagement_score`).
    pub engagement_score: f64,
}

impl Computed {
    /// A numeric trait by name, for models (no serialization per score).
    pub fn feature(&self, name: &str) -> Option<f64> {
        Some(match name {
            "page_views_7d" => self.page_views_7d as f64,
            "page_views_30d" => self.page_views_30d as f64,
            "days_since_last_login" => self.days_since_last_login? as f64,
            "assignments_completed_30d" => self.assignments_completed_30d as f64,
            "email_opens_30d" => self.email_opens_30d as f64,
            "email_clicks_30d" => self.email_clicks_30d as f64,
            "email_engagement_score" => self.email_engagement_score,
            "whatsapp_sentiment_avg" => self.whatsapp_sentiment_avg?,
            "engagement_score" => self.engagement_score,
            _ => return None,
        })
    }
}

/// The windows computed traits count activity in, in days; `stable_until` watches exactly these.
const WEEK: i64 = 7;
const MONTH: i64 = 30;
/// How far back an application event keeps a student in the application stage.
const FUNNEL: i64 = 90;
const WINDOWS_DAYS: [i64; 3] = [WEEK, MONTH, FUNNEL];

fn saturate(x: f64, half: f64) -> f64 {
    // 50 at `half`, approaching 100: bounded and monotonic, so a score means the same at any size.
    100.0 * x / (x + half)
}

fn text(record: &ProfileRecord, name: &str) -> Option<String> {
    record.traits.get(name).and_then(|t| t.value.as_str()).map(|s| s.trim().to_lowercase())
}

/// The funnel stage from Salesforce's enrollment fields and behaviour: alumni and enrolled come
/// from `enrollment_status`; enrolled students active in the last 30 days are `active`; an
/// application stage or an application event makes an `application`; everyone else is an
/// `inquiry`.
fn funnel_stage(record: &ProfileRecord, now: DateTime<Utc>, active: bool) -> FunnelStage {
    let status = text(record, "enrollment_status").unwrap_or_default();
    if ["alumni", "alumnus", "alumna", "graduated", "graduate"].contains(&status.as_str()) {
        return FunnelStage::Alumni;
    }
    if ["enrolled", "active", "student", "registered"].contains(&status.as_str()) {
        return if active { FunnelStage::Active } else { FunnelStage::Enrollment };
    }
    let applied = text(record, "application_stage").is_some_and(|s| !s.is_empty())
        || ["application", "applicant", "applied"].contains(&status.as_str())
        || ["event:application started", "event:application submitted"]
            .iter()
            .any(|k| !record.activity.since(k, now - Duration::days(FUNNEL)).is_empty());
    if applied {
        FunnelStage::Application
    } else {
        FunnelStage::Inquiry
    }
}

pub fn compute(record: &ProfileRecord, now: DateTime<Utc>) -> Computed {
    let a = &record.activity;
    let since = |days: i64| now - Duration::days(days);
    let now_ms = now.timestamp_millis();
    let n = |key: &str, days: i64| a.since(key, since(days)).iter().filter(|t| **t <= now_ms).count() as u64;
    let by_topic = |days: i64| -> BTreeMap<String, u64> {
        a.recent
            .keys()
            .filter_map(|k| k.strip_prefix("page:"))
            .map(|t| (t.to_string(), n(&format!("page:{t}"), days)))
            .filter(|(_, c)| *c > 0)
            .collect()
    };
    let mut topics: Vec<(&String, &u64)> = a.topics.iter().collect();
    topics.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
    let opens = n("email:open", MONTH);
    let clicks = n("email:click", MONTH);
    let events_30d: u64 = a.recent.keys().filter(|k| k.starts_with("event:")).map(|k| n(k, MONTH)).sum();
    let logins_30d = n("login", MONTH);
    let pages_30d = n("page", MONTH);
    let activity = pages_30d + events_30d + opens + clicks;
    Computed {
        page_views_7d: n("page", WEEK),
        page_views_30d: pages_30d,
        page_views_by_topic_7d: by_topic(WEEK),
        page_views_by_topic_30d: by_topic(MONTH),
        top_topic: topics.first().map(|(t, _)| (*t).clone()),
        topics: topics.iter().take(20).map(|(t, _)| (*t).clone()).collect(),
        first_seen: record.counters.first_seen,
        last_seen: record.counters.last_seen,
        days_since_last_login: a.last_login.map(|l| (now - l).num_days().max(0)),
        assignments_completed_30d: n("event:assignment completed", MONTH) + n("event:assignment submitted", MONTH),
        email_opens_30d: opens,
        email_clicks_30d: clicks,
        email_engagement_score: saturate((opens + 3 * clicks) as f64, 5.0),
        whatsapp_sentiment_avg: (a.sentiment_count > 0).then(|| a.sentiment_sum / a.sentiment_count as f64),
        funnel_stage: funnel_stage(record, now, activity > 0),
        engagement_score: saturate(
            pages_30d as f64 + 2.0 * events_30d as f64 + opens as f64 + 3.0 * clicks as f64 + 5.0 * logins_30d as f64,
            20.0,
        ),
    }
}

/// The earliest instant after `now` at which `compute(record, ·)` may answer differently: an
/// activity timestamp leaves a window or one in the future is reached, or the days since the
/// last login tick over. Until then a computed answer can be reused as it is. Conservative:
/// an instant it names may change nothing.
pub fn stable_until(record: &ProfileRecord, now: DateTime<Utc>) -> DateTime<Utc> {
    const DAY_MS: i64 = 86_400_000;
    let now_ms = now.timestamp_millis();
    let mut next = i64::MAX;
    for times in record.activity.recent.values() {
        // Sorted ascending: the first timestamp after `now` is the next one to enter a count.
        if let Some(t) = times.get(times.partition_point(|t| *t <= now_ms)) {
            next = next.min(*t);
        }
        for days in WINDOWS_DAYS {
            let span = days * DAY_MS;
            // The oldest timestamp still in the window is the next to leave it.
            if let Some(t) = times.get(times.partition_point(|t| t.saturating_add(span) <= now_ms)) {
                next = next.min(t.saturating_add(span));
            }
        }
    }
    if let Some(login) = record.activity.last_login {
        let days = (now - login).num_days().max(0);
        next = next.min(login.timestamp_millis().saturating_add((days + 1) * DAY_MS));
    }
    DateTime::from_timestamp_millis(next).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A profile as segment rules and models read it.
pub struct ProfileFacts<'a> {
    pub record: &'a ProfileRecord,
    pub computed: Computed,
    pub now: DateTime<Utc>,
    pub models: &'a Models,
    computed_json: std::sync::OnceLock<serde_json::Map<String, Value>>,
}

impl<'a> ProfileFacts<'a> {
    pub fn new(record: &'a ProfileRecord, now: DateTime<Utc>, models: &'a Models) -> Self {
        Self { record, computed: compute(record, now), now, models, computed_json: std::sync::OnceLock::new() }
    }

    fn computed_field(&self, name: &str) -> Val {
        // Serialized once per evaluation, however many rules read it.
        let map = self.computed_json.get_or_init(|| match serde_json::to_value(&self.computed) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        });
        map.get(name).map_or(Val::Null, Val::from_json)
    }
}

impl Facts for ProfileFacts<'_> {
    fn now(&self) -> DateTime<Utc> {
        self.now
    }

    fn activity_since(&self, key: &str, since: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let now = self.now.timestamp_millis();
        self.record
            .activity
            .since(key, since)
            .iter()
            .filter(|t| **t <= now)
            .filter_map(|t| DateTime::from_timestamp_millis(*t))
            .collect()
    }

    fn field(&self, root: Option<&str>, name: &str) -> Val {
        match root {
            // A category is stored folded (`marketing_email` as `marketing email`), a channel as is.
            Some("consent") => Val::Bool(
                self.record
                    .consent
                    .get(&name.to_lowercase())
                    .or_else(|| self.record.consent.get(&cohort_messages::profile::fold_key(name)))
                    .is_some_and(|c| c.granted),
            ),
            Some("computed") => self.computed_field(name),
            Some("traits") | None => self.record.traits.get(name).map_or(Val::Null, |t| Val::from_json(&t.value)),
            Some(_) => Val::Null,
        }
    }

    fn call(&self, name: &str, arg: Option<&str>) -> Val {
        let c = &self.computed;
        match name {
            "days_since_last_login" => self
                .record
                .activity
                .last_login
                .map_or(Val::Null, |l| Val::Num((self.now - l).num_seconds() as f64 / 86_400.0)),
            "days_since" => arg
                .and_then(|t| self.record.traits.get(t))
                .and_then(|t| t.value.as_str())
                .and_then(|s| {
                    DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).ok().or_else(|| {
                        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                            .ok()
                            .and_then(|d| d.and_hms_opt(0, 0, 0))
                            .map(|d| d.and_utc())
                    })
                })
                .map_or(Val::Null, |d| Val::Num((self.now - d).num_seconds() as f64 / 86_400.0)),
            "email_engagement" => Val::Num(c.email_engagement_score),
            "engagement_score" => Val::Num(c.engagement_score),
            "sentiment" => c.whatsapp_sentiment_avg.map_or(Val::Null, Val::Num),
            "funnel_stage" => Val::Str(c.funnel_stage.as_str().into()),
            "score" => arg.and_then(|m| self.models.score(m, c)).map_or(Val::Null, Val::Num),
            "has" => Val::Bool(
                arg.and_then(|k| k.parse::<IdentifierKind>().ok())
                    .is_some_and(|k| self.record.identifiers.iter().any(|l| l.identifier.kind == k)),
            ),
            "in_segment" => Val::Bool(arg.is_some_and(|s| self.record.segments.contains_key(s))),
            _ => Val::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_messages::{CustomerEvent, EventId, EventKind, Identifier, RawRef, Source, Utm};
    use serde_json::{json, Map};

    fn event(
        kind: EventKind,
        name: Option<&str>,
        days_ago: i64,
        props: Value,
        traits: Value,
        now: DateTime<Utc>,
    ) -> CustomerEvent {
        let at = now - Duration::days(days_ago);
        CustomerEvent {
            event_id: EventId::new(Source::Web, &format!("{kind:?}-{name:?}-{days_ago}-{props}")),
            source: if kind == EventKind::MessageReceived { Source::Whatsapp } else { Source::Web },
            kind,
            name: name.map(String::from),
            occurred_at: at,
            received_at: at,
            identifiers: vec![Identifier::new(IdentifierKind::UserId, "u1")],
            traits: traits.as_object().cloned().unwrap_or_default(),
            properties: props.as_object().cloned().unwrap_or_else(Map::new),
            utm: Utm::default(),
            trace: None,
            raw: RawRef { seq: None, index: 0 },
        }
    }

    fn profile(key: &str, now: DateTime<Utc>) -> ProfileRecord {
        ProfileRecord::new(cohort_messages::ProfileId::derive_from_event(&EventId::from_raw(key), now), now)
    }

    /// A category the website sends with `_` or `-` in its name is found by a rule that names
    /// it as sent (it is stored folded).
    #[test]
    fn a_consent_category_is_found_as_the_website_names_it() {
        let now = Utc::now();
        let mut p = profile("c", now);
        let consent = json!({ "consent": { "marketing_email": true, "ad-tracking": false } });
        p.apply(1, &event(EventKind::Identify, None, 0, consent, json!({}), now), 100);
        let models = crate::segments::models::Models::default();
        let facts = ProfileFacts::new(&p, now, &models);
        assert_eq!(facts.field(Some("consent"), "marketing_email"), Val::Bool(true));
        assert_eq!(facts.field(Some("consent"), "ad-tracking"), Val::Bool(false));
        assert_eq!(facts.field(Some("consent"), "nothing_sent"), Val::Bool(false));
    }

    #[test]
    fn computed_traits_follow_the_activity_and_the_clock() {
        let now = Utc::now();
        let mut p = profile("x", now);
        let mut apply = |e: CustomerEvent| {
            let seq = p.applied_seqs.len() as u64 + 1;
            p.apply(seq, &e, 100);
        };
        for days in [1, 2, 10, 40] {
            apply(event(EventKind::Page, None, days, json!({ "path": "/programs/mba/fees" }), json!({}), now));
        }
        apply(event(EventKind::Page, None, 3, json!({ "path": "/campus", "category": "Visit" }), json!({}), now));
        apply(event(EventKind::Track, Some("Logged In"), 4, json!({}), json!({}), now));
        apply(event(EventKind::Track, Some("Assignment Completed"), 5, json!({}), json!({}), now));
        apply(event(EventKind::EmailActivity, Some("open"), 2, json!({}), json!({}), now));
        apply(event(EventKind::EmailActivity, Some("click"), 2, json!({}), json!({}), now));
        apply(event(EventKind::MessageReceived, None, 1, json!({ "sentiment": -0.5 }), json!({}), now));
        apply(event(EventKind::MessageReceived, None, 1, json!({ "sentiment": 0.3 }), json!({}), now));
        apply(event(EventKind::Identify, None, 0, json!({}), json!({ "enrollment_status": "Enrolled" }), now));
        let c = compute(&p, now);
        assert_eq!((c.page_views_7d, c.page_views_30d), (3, 4));
        assert_eq!(c.page_views_by_topic_7d.get("mba"), Some(&2));
        assert_eq!(c.page_views_by_topic_30d.get("visit"), Some(&1));
        assert_eq!(c.top_topic.as_deref(), Some("fees"), "mba, programs and fees tie at 4; fees sorts first");
        assert_eq!(c.days_since_last_login, Some(4));
        assert_eq!(c.assignments_completed_30d, 1);
        assert_eq!((c.email_opens_30d, c.email_clicks_30d), (1, 1));
        assert!((c.email_engagement_score - 100.0 * 4.0 / 9.0).abs() < 1e-9);
        assert!((c.whatsapp_sentiment_avg.unwrap_or_default() - -0.1).abs() < 1e-9);
        assert_eq!(c.funnel_stage, FunnelStage::Active);
        assert!(c.engagement_score > 0.0 && c.engagement_score < 100.0);
        // Two months later nothing is recent: the counts drop and the student is enrolled, not active.
        let later = compute(&p, now + Duration::days(60));
        assert_eq!((later.page_views_30d, later.funnel_stage), (0, FunnelStage::Enrollment));
        assert_eq!(later.engagement_score, 0.0);
    }

    #[test]
    fn computed_traits_hold_until_stable_until_and_change_there() {
        let now = Utc::now();
        let mut p = profile("y", now);
        let mut apply = |e: CustomerEvent| {
            let seq = p.applied_seqs.len() as u64 + 1;
            p.apply(seq, &e, 100);
        };
        // Days ago; negative is an event stamped in the future (a client clock ahead).
        // Hours apart, so that no two kinds of change fall on one instant and hide each other.
        let hours = |h: i64| now + Duration::hours(h);
        for (days, base) in [(-2, hours(7)), (1, hours(1)), (6, hours(2)), (20, hours(3)), (45, hours(4))] {
            apply(event(EventKind::Page, None, days, json!({ "path": "/programs/mba" }), json!({}), base));
        }
        apply(event(EventKind::Track, Some("Logged In"), 3, json!({}), json!({}), hours(-5)));
        apply(event(EventKind::Track, Some("Application Started"), 85, json!({}), json!({}), hours(-9)));
        apply(event(EventKind::EmailActivity, Some("click"), 29, json!({}), json!({}), hours(-11)));
        let (mut t, mut changes) = (now, 0);
        while t < now + Duration::days(100) {
            let until = stable_until(&p, t);
            assert!(until > t, "{until} after {t}");
            let c = compute(&p, t);
            for probe in [t + (until - t) / 2, until - Duration::microseconds(1)] {
                if probe > t {
                    assert_eq!(compute(&p, probe), c, "unchanged at {probe}, before {until}");
                }
            }
            if compute(&p, until + Duration::milliseconds(1)) != c {
                changes += 1;
            }
            t = until + Duration::milliseconds(1);
        }
        // The future view, the 7-, 30- and 90-day exits and the daily login count all move it.
        assert!(changes >= 20, "only {changes} of the instants named changed anything");
    }
}
