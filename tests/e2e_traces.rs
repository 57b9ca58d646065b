//! OpenTelemetry traces end to end: the real binary exports over OTLP/HTTP to a local receiver,
//! and one event's trace runs from the HTTP request through ingest, identity resolution, its
//! profile, the store and the destination request it triggered, each span the child of the one
//! before.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "common/destinations.rs"]
mod destinations;

use axum::body::Bytes;
use axum::routing::post;
use cohort::client::CohortClient;
use cohort::payloads;
use cohort_config::Config;
use common::{free_port, spawn_cohort, wait_ready};
use destinations::Destinations;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// name → (span id, parent span id), for the spans of one trace.
type Spans = Arc<Mutex<Vec<(String, String, String, String)>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A local OTLP/HTTP trace receiver: decodes each export (protobuf) and keeps
/// (trace id, span id, parent span id, name) of every span.
async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut kept = kept.lock().unwrap();
                for rs in request.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            kept.push((hex(&s.trace_id), hex(&s.span_id), hex(&s.parent_span_id), s.name));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, spans)
}

/// The spans of one trace seen so far: name → (span id, parent span id).
fn trace_spans(spans: &Spans, trace_id: &str) -> HashMap<String, (String, String)> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, ..)| t == trace_id)
        .map(|(_, id, parent, name)| (name.clone(), (id.clone(), parent.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_events_trace_runs_from_http_through_every_actor_to_the_store_and_the_destination() {
    let (otlp, spans) = receiver().await;
    let d = Destinations::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cohort.toml");
    let toml = format!(
        "[storage]\nurl = \"embedded://{}\"\n{}\n[[segments.define]]\nname = \"known\"\nrule = 'has(\"email\")'\n\
         [[activations]]\nname = \"list\"\nsegment = \"known\"\ndestination = \"sendgrid\"\naction = \"add_to_list\"\nlist_id = \"l1\"\n",
        dir.path().join("cohort.redb").display(),
        d.config_toml()
    );
    std::fs::write(&cfg, toml).unwrap();
    let port = free_port();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
    let _proc =
        spawn_cohort(&["--config", cfg.to_str().unwrap()], &[("COHORT__TELEMETRY__OTLP_ENDPOINT", otlp.clone())], port);
    wait_ready(&c).await;

    // The caller's own trace: Cohort's spans join it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut identify = payloads::segment_identify(
        "traced-1",
        Some("anon-traced"),
        None,
        json!({ "email": "tia@uni.eu" }),
        None,
        chrono::Utc::now(),
    );
    identify["context"]["consent"] = json!({ "categoryPreferences": { "email": true } });
    let answer = c
        .http
        .post(format!("{}/v1/identify", c.base))
        .basic_auth(&c.web_key, Some(""))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&identify)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The batch exporter sends every few seconds.
    let wanted = ["request", "ingest", "identity.resolve", "profile.apply", "store.flush", "destination.send"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours: HashMap<String, (String, String)> = loop {
        let ours = trace_spans(&spans, trace_id);
        if wanted.iter().all(|w| ours.contains_key(*w)) {
            break ours;
        }
        assert!(Instant::now() < deadline, "spans of the trace so far: {:?}", ours.keys().collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let parent = |name: &str| ours[name].1.clone();
    let id = |name: &str| ours[name].0.clone();
    assert_eq!(parent("request"), caller_span, "the request continues the caller's trace");
    assert_eq!(parent("ingest"), id("request"), "ingest is the request's child (context in the actor message)");
    assert_eq!(parent("identity.resolve"), id("ingest"), "resolution continues the ingest (context in the event)");
    assert_eq!(parent("profile.apply"), id("identity.resolve"));
    assert_eq!(parent("store.flush"), id("identity.resolve"));
    assert_eq!(parent("destination.send"), id("profile.apply"), "the destination request was caused by the update");
    assert!(!d.received("sendgrid").is_empty(), "the traced destination request was really sent");
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `scripts/services.sh start` and `source ~/.cache/cohort/run/env` (scripts/test.sh does both)")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_trace_context_rides_in_a_record_header_and_the_chain_holds() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message as _;
    let (otlp, spans) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let id = format!("traces_{}_{}", std::process::id(), chrono::Utc::now().timestamp_micros());
    let cfg = dir.path().join("cohort.toml");
    let toml = format!(
        "[storage]\nurl = \"{}\"\ndatabase = \"{id}\"\n[bus]\nurl = \"kafka://{}\"\ntopic_prefix = \"{id}.\"\ngroup_id = \"{id}\"\npartitions = 1\n\
         [warehouse]\nurl = \"none://\"\n[gdpr]\nkey_url = \"file:{}\"\n",
        service("COHORT_TEST_MONGODB"),
        service("COHORT_TEST_KAFKA"),
        dir.path().join("kek").display()
    );
    std::fs::write(&cfg, toml).unwrap();
    let port = free_port();
    let c = CohortClient::new(format!("http://127.0.0.1:{port}"), &Config::from_toml_str("").unwrap()).unwrap();
    let _proc = spawn_cohort(&["--config", cfg.to_str().unwrap()], &[("COHORT__TELEMETRY__OTLP_ENDPOINT", otlp)], port);
    wait_ready(&c).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let page = payloads::segment_page("traced-k", "anon-k", "/programs/mba", chrono::Utc::now());
    let answer = c
        .http
        .post(format!("{}/v1/page", c.base))
        .basic_auth(&c.web_key, Some(""))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&page)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", service("COHORT_TEST_KAFKA"))
        .set("group.id", format!("{id}-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{id}.cdp.raw.web")]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let header = loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let found = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "traceparent").and_then(|h| h.value.map(<[u8]>::to_vec)));
            if let Some(v) = found {
                break String::from_utf8(v).unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no raw record with a traceparent header");
    };
    assert!(header.contains(trace_id), "{header}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ours = trace_spans(&spans, trace_id);
        if let (Some(ingest), Some(resolve)) = (ours.get("ingest"), ours.get("identity.resolve")) {
            assert_eq!(resolve.1, ingest.0, "resolution, after Kafka, continues the ingest");
            assert!(header.contains(&ingest.0), "the header names the ingest span: {header}");
            break;
        }
        assert!(Instant::now() < deadline, "spans so far: {:?}", ours.keys().collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
