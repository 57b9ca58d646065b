//! Model-driven segments (slide 11): a threshold on a score such as churn risk. The scorer is a
//! trait, so a hosted model (Vertex AI in the brief) can stand behind it; the default is a
//! logistic model over computed traits whose weights are in config.

use super::computed::Computed;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Scores a profile from its computed traits, in [0, 1].
pub trait Scorer: Send + Sync + 'static {
    fn score(&self, features: &Computed) -> f64;
}

/// `sigmoid(bias + Σ weight × feature)`; a feature that is missing (no login yet, no message)
/// counts as 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticModel {
    pub bias: f64,
    pub weights: BTreeMap<String, f64>,
}

/// Computed traits a model may weigh.
pub const FEATURES: &[&str] = &[
    "page_views_7d",
    "page_views_30d",
    "days_since_last_login",
    "assignments_completed_30d",
    "email_opens_30d",
    "email_clicks_30d",
    "email_engagement_score",
    "whatsapp_sentiment_avg",
    "engagement_score",
];

impl LogisticModel {
    /// Checks that every weight names a known feature.
    pub fn new(bias: f64, weights: BTreeMap<String, f64>) -> Result<Self, String> {
        if let Some(unknown) = weights.keys().find(|k| !FEATURES.contains(&k.as_str())) {
            // (`Computed::feature` answers for exactly these names.)
            return Err(format!("unknown feature `{unknown}` (known: {})", FEATURES.join(", ")));
        }
        Ok(Self { bias, weights })
    }
}

impl Scorer for LogisticModel {
    fn score(&self, features: &Computed) -> f64 {
        let z = self.weights.iter().fold(self.bias, |z, (name, w)| z + w * features.feature(name).unwrap_or(0.0));
        1.0 / (1.0 + (-z).exp())
    }
}

/// The configured scorers by name.
#[derive(Clone, Default)]
pub struct Models {
    scorers: BTreeMap<String, Arc<dyn Scorer>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.scorers.keys()).finish()
    }
}

impl Models {
    pub fn insert(&mut self, name: impl Into<String>, scorer: Arc<dyn Scorer>) {
        self.scorers.insert(name.into(), scorer);
    }

    pub fn names(&self) -> Vec<String> {
        self.scorers.keys().cloned().collect()
    }

    pub fn score(&self, name: &str, features: &Computed) -> Option<f64> {
        self.scorers.get(name).map(|s| s.score(features))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segments::computed::compute;
    use chrono::Utc;
    use cohort_messages::{EventId, ProfileId, ProfileRecord};

    #[test]
    fn every_model_feature_is_a_computed_trait_and_the_score_follows_the_weights() {
        let now = Utc::now();
        let record = ProfileRecord::new(ProfileId::derive_from_event(&EventId::from_raw("m"), now), now);
        let c = compute(&record, now);
        let json = serde_json::to_value(&c).unwrap_or_default();
        for f in FEATURES {
            assert!(json.get(*f).is_some(), "{f} is not a computed trait");
        }
        assert_eq!(c.feature("page_views_30d"), Some(0.0));
        assert_eq!(c.feature("days_since_last_login"), None, "no login yet");
        let m = LogisticModel::new(0.0, BTreeMap::from([("engagement_score".to_string(), 1.0)]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!((m.score(&c) - 0.5).abs() < 1e-9, "no activity: sigmoid(0)");
        assert!(LogisticModel::new(0.0, BTreeMap::from([("shoe_size".to_string(), 1.0)])).is_err());
    }
}
