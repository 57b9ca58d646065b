//! Webhook signatures end to end: SendGrid's ECDSA signature when a key is configured, with a
//! replay window on its signed timestamp.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use base64::Engine;
use chrono::Utc;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use cohort_actors::normalize::signature::sign_sendgrid;
use p256::ecdsa::SigningKey;
use p256::pkcs8::EncodePublicKey;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendgrid_signatures_are_enforced_when_a_key_is_configured() {
    let signing = SigningKey::from_slice(&[7u8; 32]).unwrap();
    let public_der = signing.verifying_key().to_public_key_der().unwrap();
    let public_b64 = base64::engine::general_purpose::STANDARD.encode(public_der.as_bytes());
    let extra = format!("[sources.email]\nsendgrid_public_key = \"{public_b64}\"\n");
    let demo = DemoServer::start(None, &extra, SystemOptions::default()).await.unwrap();
    let c = &demo.client;
    let url = format!("{}/webhooks/sendgrid/events", c.base);
    let body =
        serde_json::to_vec(&payloads::sendgrid_event("sg-sig-1", "lena@uni-example.de", "click", Utc::now())).unwrap();
    let ts = Utc::now().timestamp().to_string();
    let sig = sign_sendgrid(&signing, &body, &ts);
    let post = |body: Vec<u8>, sig: Option<String>, ts: Option<String>| {
        let mut req = c.http.post(&url).header("content-type", "application/json").body(body);
        if let Some(s) = sig {
            req = req.header("X-Twilio-Email-Event-Webhook-Signature", s);
        }
        if let Some(t) = ts {
            req = req.header("X-Twilio-Email-Event-Webhook-Timestamp", t);
        }
        req.send()
    };
    // missing headers
    assert_eq!(post(body.clone(), None, None).await.unwrap().status(), 401);
    // tampered body
    let mut tampered = body.clone();
    let pos = tampered.iter().position(|b| *b == b'c').unwrap();
    tampered[pos] = b'C';
    assert_eq!(post(tampered, Some(sig.clone()), Some(ts.clone())).await.unwrap().status(), 401);
    // signature over another timestamp
    assert_eq!(post(body.clone(), Some(sig.clone()), Some("1".into())).await.unwrap().status(), 401);
    // garbage signature
    assert_eq!(post(body.clone(), Some("!!!".into()), Some(ts.clone())).await.unwrap().status(), 401);
    // a correctly signed request recorded an hour ago and played again
    let old = (Utc::now().timestamp() - 3600).to_string();
    let replayed = post(body.clone(), Some(sign_sendgrid(&signing, &body, &old)), Some(old)).await.unwrap();
    assert_eq!(replayed.status(), 401);
    let text = replayed.text().await.unwrap();
    assert!(text.contains("timestamp"), "{text}");
    // valid
    let ok = post(body.clone(), Some(sig), Some(ts)).await.unwrap();
    assert_eq!(ok.status(), 200);
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    let p = c.get("/v1/profiles/email:lena@uni-example.de").await.unwrap();
    assert_eq!(p.status, 200);
    assert_eq!(p.body["counters"]["by_source"]["email"], serde_json::json!(1));
    // nothing unauthenticated was dead-lettered
    assert_eq!(c.get("/v1/dlq").await.unwrap().body["total"], serde_json::json!(0));
    demo.stop().await.unwrap();
}
