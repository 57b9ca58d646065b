//! A small HTTP client for Cohort's own API, authenticating the way each source does. Used by
//! the demo, the end-to-end tests and the load generator.

use anyhow::{anyhow, Context};
use base64::Engine;
use cohort_actors::normalize::signature::sign_twilio;
use cohort_config::Config;
use reqwest::{Response, StatusCode};
use serde_json::Value;

#[derive(Clone)]
pub struct CohortClient {
    pub base: String,
    pub http: reqwest::Client,
    pub web_key: String,
    pub mobile_key: String,
    pub crm_token: String,
    pub twilio_token: String,
    pub api_token: String,
}

/// A response's status and JSON body (or text, wrapped as a JSON string).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// A response header as text (`None` when absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn answer(r: Response) -> anyhow::Result<Answer> {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.context("reading the response")?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body, headers })
}

impl CohortClient {
    pub fn new(base: impl Into<String>, config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            base: base.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::builder().pool_max_idle_per_host(64).build()?,
            web_key: config.sources.web.write_key.clone(),
            mobile_key: config.sources.mobile.write_key.clone(),
            crm_token: config.sources.crm.token.clone(),
            twilio_token: config.sources.whatsapp.auth_token.clone(),
            api_token: config.auth.api_tokens.first().cloned().ok_or_else(|| anyhow!("no API token configured"))?,
        })
    }

    /// A Segment call (`identify`, `track`, `page`, `screen`, `group`, `alias`, `batch`) with the
    /// write key as Basic auth user, as analytics.js does.
    pub async fn segment(&self, mobile: bool, call: &str, body: &Value) -> anyhow::Result<Answer> {
        let key = if mobile { &self.mobile_key } else { &self.web_key };
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let r = self
            .http
            .post(format!("{}/v1/{call}", self.base))
            .header("authorization", format!("Basic {auth}"))
            .json(body)
            .send()
            .await?;
        answer(r).await
    }

    pub async fn salesforce_cdc(&self, body: &Value) -> anyhow::Result<Answer> {
        let r = self
            .http
            .post(format!("{}/webhooks/salesforce/cdc", self.base))
            .bearer_auth(&self.crm_token)
            .json(body)
            .send()
            .await?;
        answer(r).await
    }

    pub async fn salesforce_csv(&self, csv: &str) -> anyhow::Result<Answer> {
        let r = self
            .http
            .post(format!("{}/v1/import/salesforce/contacts", self.base))
            .bearer_auth(&self.crm_token)
            .header("content-type", "text/csv")
            .body(csv.to_string())
            .send()
            .await?;
        answer(r).await
    }

    pub async fn sendgrid(&self, body: &Value) -> anyhow::Result<Answer> {
        // Unsigned: a bearer token with `ingest:email` stands in for SendGrid's signature.
        let r = self
            .http
            .post(format!("{}/webhooks/sendgrid/events", self.base))
            .bearer_auth(&self.api_token)
            .json(body)
            .send()
            .await?;
        answer(r).await
    }

    /// A Twilio webhook, signed with the auth token over the URL Cohort was called at.
    pub async fn twilio(&self, form: &[(String, String)]) -> anyhow::Result<Answer> {
        let url = format!("{}/webhooks/twilio/whatsapp", self.base);
        let signature = sign_twilio(&self.twilio_token, &url, form);
        let body = serde_urlencoded::to_string(form).context("encoding the form")?;
        let r = self
            .http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(body)
            .send()
            .await?;
        answer(r).await
    }

    /// `GET` an API path with the bearer token.
    /// A Profile or operations API call with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Answer> {
        let r = self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.api_token).json(body).send().await?;
        answer(r).await
    }

    /// Any method with a JSON body (`PUT`, `DELETE`, ...).
    pub async fn call(&self, method: &str, path: &str, body: &Value) -> anyhow::Result<Answer> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.api_token)
            .json(body)
            .send()
            .await?;
        answer(r).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        let r = self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.api_token).send().await?;
        answer(r).await
    }
}
