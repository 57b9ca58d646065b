//! `cohort demo`: slide 18 of the brief, one student across five sources, played through the
//! real HTTP endpoints with real payload shapes.

use crate::client::{Answer, CohortClient};
use crate::payloads;
use crate::system::{Cohort, SystemOptions};
use anyhow::{bail, Context};
use chrono::{Duration as ChronoDuration, Utc};
use cohort_config::Config;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// A running demo instance: Cohort on embedded defaults, served on a free loopback port.
pub struct DemoServer {
    pub cohort: Cohort,
    pub client: CohortClient,
    pub base: String,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    _tmp: Option<tempfile::TempDir>,
}

impl DemoServer {
    /// Starts Cohort with its defaults, storing data in `data_dir` (a temporary folder if none).
    pub async fn start(data_dir: Option<PathBuf>, extra_config: &str, options: SystemOptions) -> anyhow::Result<Self> {
        let (dir, tmp) = match data_dir {
            Some(d) => (d, None),
            None => {
                let t = tempfile::tempdir().context("creating a temporary data folder")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let url = format!("embedded://{}", dir.join("cohort.redb").display());
        let storage = format!("[storage]\nurl = \"{url}\"\n");
        let config = Config::from_toml_layers(&[&storage, extra_config])?;
        let cohort = Cohort::start(config.clone(), options).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let router = cohort.router();
        let (server_cfg, metrics) = (config.server.clone(), cohort.api.metrics.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let signal = async {
                let _ = stopped.await;
            };
            cohort_api::serve::serve(listener, router, &server_cfg, metrics, signal, Duration::from_secs(5)).await;
        });
        let client = CohortClient::new(&base, &config)?;
        Ok(Self { cohort, client, base, server, stop, _tmp: tmp })
    }

    /// Stops serving (every connection closed), then shuts Cohort down.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.cohort.shutdown(Duration::from_secs(10)).await
    }
}

fn expect_ok(step: &str, a: Answer) -> anyhow::Result<Answer> {
    if !a.status.is_success() {
        bail!("{step}: HTTP {} {}", a.status, a.body);
    }
    Ok(a)
}

/// Plays the five steps of slide 18; returns the final profile as the Profile API shows it.
pub async fn play_slide_18(c: &CohortClient) -> anyhow::Result<Value> {
    let t0 = Utc::now() - ChronoDuration::minutes(30);
    let at = |m: i64| t0 + ChronoDuration::minutes(m);
    // Step 1: anonymous web visit (session "abc").
    let page = payloads::segment_page("demo-web-1", "abc", "/programmes/mba", at(0));
    expect_ok("step 1 (anonymous web visit)", c.segment(false, "page", &page).await?)?;
    // Step 2: form submission reveals the email in the same session.
    let form = payloads::segment_identify(
        "demo-web-2",
        Some("abc"),
        None,
        json!({ "email": "  Max@Gmail.com ", "firstName": "Max", "lastName": "Mustermann", "city": "Berlin" }),
        None,
        at(2),
    );
    expect_ok("step 2 (form with email)", c.segment(false, "identify", &form).await?)?;
    // Step 3: mobile app login with the same email on a new device.
    let login = payloads::segment_identify(
        "demo-app-1",
        None,
        Some("student-1001"),
        json!({ "email": "max@gmail.com" }),
        Some("dev_456"),
        at(10),
    );
    expect_ok("step 3 (mobile login)", c.segment(true, "identify", &login).await?)?;
    // Step 4: the advisor's Salesforce contact adds a phone number.
    let cdc = payloads::salesforce_contact_cdc(
        1_434_298,
        "003Dp00000A1b2cIAB",
        "CREATE",
        json!({
            "Name": { "FirstName": "Maximilian", "LastName": "Mustermann" },
            "Email": "max@gmail.com",
            "Phone": "+49 1512 3456789",
            "Enrollment_Status__c": "inquiry",
        }),
        at(20),
    );
    expect_ok("step 4 (Salesforce contact)", c.salesforce_cdc(&cdc).await?)?;
    // Step 5: a WhatsApp message from that phone.
    let wa = payloads::twilio_whatsapp_form(
        "SM1f0e8ae6ade43cb3c0ce4525424e404f",
        "+4915123456789",
        "Hi, when is the deadline for MBA?",
        "Max",
    );
    expect_ok("step 5 (WhatsApp message)", c.twilio(&wa).await?)?;
    // And the email tool reports the nurture email was opened.
    let open = payloads::sendgrid_event("ZGVtby1vcGVuLTE=", "max@gmail.com", "open", at(25));
    expect_ok("email open", c.sendgrid(&open).await?)?;
    Ok(json!(null))
}

/// Fetches the demo student's profile, identities and events through the Profile API.
pub async fn fetch_profile(c: &CohortClient, reference: &str) -> anyhow::Result<Value> {
    let profile = expect_ok("profile", c.get(&format!("/v1/profiles/{reference}")).await?)?.body;
    let events = expect_ok("events", c.get(&format!("/v1/profiles/{reference}/events?limit=50")).await?)?.body;
    Ok(json!({ "profile": profile, "events": events["events"] }))
}

pub async fn run(keep_running: bool, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let demo = DemoServer::start(data_dir, "", SystemOptions::default()).await?;
    println!("Cohort is running on {} (embedded defaults)", demo.base);
    println!("Playing slide 18: one student, five sources...");
    play_slide_18(&demo.client).await?;
    demo.cohort.settle(Duration::from_secs(10)).await?;
    let result = fetch_profile(&demo.client, "email:max@gmail.com").await?;
    println!("{}", serde_json::to_string_pretty(&result["profile"])?);
    let kinds: Vec<String> = result["profile"]["identifiers"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["kind"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    let sources = &result["profile"]["counters"]["by_source"];
    println!("\nOne profile: {}", result["profile"]["profile_id"]);
    println!("Linked identifier types: {}", kinds.join(", "));
    println!("Events per source: {sources}");
    if keep_running {
        println!("\nServing on {} until Ctrl-C (API token: dev-api-token)", demo.base);
        let _ = tokio::signal::ctrl_c().await;
    }
    demo.stop().await
}
