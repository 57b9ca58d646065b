//! Segments (slide 11): definitions, the shared registry ProfileActors evaluate against, and the
//! engine that records memberships, publishes changes, fires exits on time and hands changes to
//! reverse ETL.

pub mod computed;
pub mod engine;
pub mod lang;
pub mod models;

use chrono::{DateTime, Utc};
use cohort_messages::ProfileRecord;
use parking_lot::RwLock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use self::computed::ProfileFacts;
use self::lang::{compile, eval, Expr, RuleError};
use self::models::Models;
pub use cohort_messages::segment::{SegmentDefinition, SegmentKind};

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("segment name `{0}` must be 1-64 characters of a-z, 0-9, `_` and `-`")]
    Name(String),
    #[error("rule: {0}")]
    Rule(#[from] RuleError),
    #[error("{0}")]
    Invalid(String),
}

/// A validated segment.
#[derive(Debug, Clone)]
pub struct Segment {
    pub definition: SegmentDefinition,
    /// Real-time and model segments: what a profile is evaluated against.
    pub expr: Option<Expr>,
}

pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Segment {
    /// Validates a definition: the name, the rule (parsed, functions and arguments checked), the
    /// fields its kind needs.
    pub fn compile(definition: SegmentDefinition, models: &Models) -> Result<Segment, DefinitionError> {
        if !valid_name(&definition.name) {
            return Err(DefinitionError::Name(definition.name));
        }
        let expr = match definition.kind {
            SegmentKind::Realtime => {
                let rule = definition
                    .rule
                    .as_deref()
                    .ok_or_else(|| DefinitionError::Invalid("a real-time segment needs a `rule`".into()))?;
                Some(compile(rule, &models.names())?)
            }
            SegmentKind::Model => {
                let model = definition
                    .model
                    .as_deref()
                    .ok_or_else(|| DefinitionError::Invalid("a model segment needs a `model`".into()))?;
                let threshold = definition.threshold.filter(|t| (0.0..=1.0).contains(t)).ok_or_else(|| {
                    DefinitionError::Invalid("a model segment needs a `threshold` between 0 and 1".into())
                })?;
                let rule = format!("score({}) >= {threshold}", serde_json::Value::from(model));
                Some(compile(&rule, &models.names())?)
            }
            SegmentKind::Batch => {
                let sql = definition.sql.as_deref().map(str::trim).unwrap_or_default();
                if sql.is_empty() {
                    return Err(DefinitionError::Invalid(
                        "a batch segment needs `sql` returning a profile_id column".into(),
                    ));
                }
                if definition.every_secs.is_none_or(|s| !(10..=MAX_EVERY_SECS).contains(&s)) {
                    return Err(DefinitionError::Invalid(format!(
                        "a batch segment needs `every_secs` between 10 and {MAX_EVERY_SECS} (a year)"
                    )));
                }
                None
            }
        };
        Ok(Segment { definition, expr })
    }
}

/// Longest period of a batch segment: longer ones overflow the timer's clock.
pub(crate) const MAX_EVERY_SECS: u64 = 366 * 24 * 3600;

/// The segments ProfileActors evaluate: replaced as a whole when a definition changes, so an
/// evaluation always sees one consistent set.
#[derive(Debug, Default)]
pub struct SegmentRegistry {
    segments: RwLock<Arc<BTreeMap<String, Arc<Segment>>>>,
    pub models: Models,
}

impl SegmentRegistry {
    pub fn new(models: Models) -> Self {
        Self { segments: RwLock::default(), models }
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Segment>>> {
        self.segments.read().clone()
    }

    pub fn put(&self, segment: Segment) {
        let mut guard = self.segments.write();
        let mut next = (**guard).clone();
        next.insert(segment.definition.name.clone(), Arc::new(segment));
        *guard = Arc::new(next);
    }

    pub fn remove(&self, name: &str) -> bool {
        let mut guard = self.segments.write();
        let mut next = (**guard).clone();
        let had = next.remove(name).is_some();
        *guard = Arc::new(next);
        had
    }

    /// Whether any segment is evaluated per profile (nothing to do otherwise).
    pub fn has_realtime(&self) -> bool {
        self.segments.read().values().any(|s| s.expr.is_some())
    }

    /// Whether any batch segment is defined here.
    pub fn has_batch(&self) -> bool {
        self.segments.read().values().any(|s| s.definition.kind == SegmentKind::Batch)
    }

    /// The batch segments' names: their memberships are in the store, not in the profiles.
    pub fn batch_names(&self) -> Vec<String> {
        let segments = self.segments.read();
        segments.iter().filter(|(_, s)| s.definition.kind == SegmentKind::Batch).map(|(n, _)| n.clone()).collect()
    }
}

/// What evaluating a profile's real-time segments changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub entered: Vec<String>,
    pub exited: Vec<String>,
    /// When a windowed count in some rule will change by itself.
    pub next_change: Option<DateTime<Utc>>,
}

/// Evaluates every real-time and model segment for a profile and updates its memberships.
/// Memberships of segments no longer defined (or batch ones) are left to their owners.
pub fn evaluate(record: &mut ProfileRecord, registry: &SegmentRegistry, now: DateTime<Utc>) -> Evaluation {
    let segments = registry.snapshot();
    let mut out = Evaluation::default();
    let member: BTreeSet<String> = {
        let facts = ProfileFacts::new(record, now, &registry.models);
        segments
            .values()
            .filter_map(|s| s.expr.as_ref().map(|e| (s, e)))
            .filter(|(_, e)| eval(e, &facts, &mut out.next_change).truthy())
            .map(|(s, _)| s.definition.name.clone())
            .collect()
    };
    for name in &member {
        if !record.segments.contains_key(name) {
            record.segments.insert(name.clone(), now);
            out.entered.push(name.clone());
        }
    }
    let evaluated = |n: &String| segments.get(n).is_some_and(|s| s.expr.is_some());
    let gone: Vec<String> = record
        .segments
        .keys()
        .filter(|n| !member.contains(*n) && (evaluated(n) || !segments.contains_key(*n)))
        .cloned()
        .collect();
    for name in gone {
        record.segments.remove(&name);
        // A deleted segment's memberships vanish without an exit: nobody left the segment.
        if segments.contains_key(&name) {
            out.exited.push(name);
        }
    }
    out
}
