//! Erasure at the destinations reverse ETL writes to: the Salesforce Contact and the SendGrid
//! marketing contact. Twilio and FCM keep no contact record Cohort created, so there is
//! nothing to delete there.

use cohort_config::{DestinationConfig, ReverseEtlConfig};
use cohort_messages::{ErasureTarget, IdentifierKind};
use serde_json::{json, Value};
use std::time::Duration;

/// Destinations with a deletion API, as configured for reverse ETL.
#[derive(Debug, Clone)]
pub struct ErasureDestinations {
    http: reqwest::Client,
    salesforce: Option<DestinationConfig>,
    sendgrid: Option<DestinationConfig>,
}

fn configured(c: &DestinationConfig) -> Option<DestinationConfig> {
    (!c.url.trim().is_empty()).then(|| c.clone())
}

impl ErasureDestinations {
    pub fn new(config: &ReverseEtlConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .build()
            .map_err(|e| format!("cannot build the destination HTTP client: {e}"))?;
        Ok(Self { http, salesforce: configured(&config.salesforce), sendgrid: configured(&config.sendgrid) })
    }

    pub fn any(&self) -> bool {
        self.salesforce.is_some() || self.sendgrid.is_some()
    }

    /// Deletes the person at every configured destination. Idempotent: a contact already gone
    /// counts as deleted. Errors carry statuses only (answers may echo personal data).
    pub async fn erase(&self, target: &ErasureTarget) -> Result<Value, String> {
        let mut detail = serde_json::Map::new();
        if let Some(sf) = &self.salesforce {
            detail.insert("salesforce".into(), self.erase_salesforce(sf, target).await?);
        }
        if let Some(sg) = &self.sendgrid {
            detail.insert("sendgrid".into(), self.erase_sendgrid(sg, target).await?);
        }
        Ok(Value::Object(detail))
    }

    async fn erase_salesforce(&self, c: &DestinationConfig, target: &ErasureTarget) -> Result<Value, String> {
        let (mut deleted, mut gone) = (0, 0);
        for id in target.identifiers.iter().filter(|i| i.kind == IdentifierKind::SalesforceId) {
            let url = format!(
                "{}/services/data/{}/sobjects/Contact/{}",
                c.url.trim_end_matches('/'),
                c.api_version,
                id.value
            );
            let answer = self.http.delete(&url).bearer_auth(&c.token).send().await;
            let status = answer.map_err(|e| format!("salesforce delete failed: {e}"))?.status();
            match status.as_u16() {
                200..=299 => deleted += 1,
                404 => gone += 1,
                _ => return Err(format!("salesforce answered {status} to a Contact delete")),
            }
        }
        Ok(json!({ "contacts_deleted": deleted, "already_gone": gone }))
    }

    async fn erase_sendgrid(&self, c: &DestinationConfig, target: &ErasureTarget) -> Result<Value, String> {
        let mut emails: Vec<String> = target.contact_emails.clone();
        emails.extend(target.identifiers.iter().filter(|i| i.kind == IdentifierKind::Email).map(|i| i.value.clone()));
        emails.sort();
        emails.dedup();
        if emails.is_empty() {
            return Ok(json!({ "contacts_deleted": 0 }));
        }
        let base = c.url.trim_end_matches('/');
        let answer = self
            .http
            .post(format!("{base}/v3/marketing/contacts/search/emails"))
            .bearer_auth(&c.token)
            .json(&json!({ "emails": emails }))
            .send()
            .await
            .map_err(|e| format!("sendgrid search failed: {e}"))?;
        let status = answer.status();
        if status.as_u16() == 404 {
            return Ok(json!({ "contacts_deleted": 0, "already_gone": emails.len() }));
        }
        if !status.is_success() {
            return Err(format!("sendgrid answered {status} to a contact search"));
        }
        let found: Value = answer.json().await.map_err(|_| "sendgrid search answer is not JSON".to_string())?;
        let ids: Vec<String> = found["result"]
            .as_object()
            .map(|m| m.values().filter_map(|r| r["contact"]["id"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return Ok(json!({ "contacts_deleted": 0, "already_gone": emails.len() }));
        }
        let answer = self
            .http
            .delete(format!("{base}/v3/marketing/contacts"))
            .bearer_auth(&c.token)
            .query(&[("ids", ids.join(","))])
            .send()
            .await
            .map_err(|e| format!("sendgrid delete failed: {e}"))?;
        let status = answer.status();
        if !status.is_success() {
            return Err(format!("sendgrid answered {status} to a contact delete"));
        }
        Ok(json!({ "contacts_deleted": ids.len() }))
    }
}
