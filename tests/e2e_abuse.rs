//! Connection-level abuse limits, spoken in raw HTTP/1.1 over TCP: slow headers are cut off,
//! oversized or too many headers get 431, and connections past the cap are closed on accept.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::DemoServer;
use cohort::SystemOptions;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(server: &str) -> DemoServer {
    DemoServer::start(None, &format!("[server]\n{server}"), SystemOptions::default()).await.expect("cohort starts")
}

async fn connect(demo: &DemoServer) -> TcpStream {
    TcpStream::connect(demo.base.trim_start_matches("http://")).await.unwrap()
}

/// Reads until the server closes the connection or `limit` passes; the bytes and whether it closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

async fn status_of(demo: &DemoServer, request: &[u8]) -> String {
    let mut s = connect(demo).await;
    s.write_all(request).await.unwrap();
    let (bytes, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    String::from_utf8_lossy(&bytes).lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dripping_its_header_is_disconnected_after_the_header_deadline() {
    let demo = start("header_read_timeout_ms = 1000\n").await;
    let mut s = connect(&demo).await;
    let started = Instant::now();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: cohort\r\n").await.unwrap();
    // One header line every 200 ms, never the blank line that ends the header.
    let mut closed = false;
    for i in 0..40 {
        if s.write_all(format!("X-Drip-{i}: a\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        let (_, c) = read_until_closed(&mut s, Duration::from_millis(200)).await;
        if c {
            closed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(closed, "the slow client was never disconnected");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "disconnected after {took:?}");

    // A client that sends one byte (the start of an HTTP/2 preface, say) and stalls is let go.
    let mut stalled = connect(&demo).await;
    stalled.write_all(b"P").await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut stalled, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(4), "a one-byte client held its slot");

    // A kept-alive connection that goes quiet after a request is let go.
    let mut quiet = connect(&demo).await;
    quiet.write_all(b"GET /health/live HTTP/1.1\r\nHost: cohort\r\n\r\n").await.unwrap();
    let (bytes, closed) = read_until_closed(&mut quiet, Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 200"));
    assert!(closed, "a quiet keep-alive connection was kept open");

    // A connection that never sends anything is also let go.
    let mut idle = connect(&demo).await;
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(closed, "an idle connection was kept open");

    // A well-behaved client on the same server is served.
    let line = status_of(&demo, b"GET /health/live HTTP/1.1\r\nHost: cohort\r\nConnection: close\r\n\r\n").await;
    assert!(line.contains(" 200"), "{line}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_too_many_headers_get_431() {
    let demo = start("max_header_bytes = 16384\nmax_headers = 20\n").await;
    let big = format!(
        "GET /health/live HTTP/1.1\r\nHost: cohort\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20_000)
    );
    let line = status_of(&demo, big.as_bytes()).await;
    assert!(line.contains(" 431"), "oversized header: {line}");
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /health/live HTTP/1.1\r\nHost: cohort\r\n{many}Connection: close\r\n\r\n");
    let line = status_of(&demo, req.as_bytes()).await;
    assert!(line.contains(" 431"), "too many headers: {line}");
    let line = status_of(&demo, b"GET /health/live HTTP/1.1\r\nHost: cohort\r\nConnection: close\r\n\r\n").await;
    assert!(line.contains(" 200"), "{line}");
    demo.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_on_accept_and_counted() {
    let demo = start("max_connections = 3\n").await;
    let keep_alive = b"GET /health/live HTTP/1.1\r\nHost: cohort\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect(&demo).await;
        s.write_all(keep_alive).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut fourth = connect(&demo).await;
    let _ = fourth.write_all(keep_alive).await;
    let (bytes, closed) = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(closed && bytes.is_empty(), "the fourth connection was served: {}", String::from_utf8_lossy(&bytes));

    // A freed slot takes a new client.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let line = status_of(&demo, b"GET /health/live HTTP/1.1\r\nHost: cohort\r\nConnection: close\r\n\r\n").await;
        if line.contains(" 200") {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came free: {line}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    // The held connections' slots come free once the server sees them close.
    let mut text = String::new();
    for _ in 0..50 {
        if let Ok(m) = demo.client.get("/metrics").await {
            text = m.body.as_str().unwrap_or_default().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = text
        .lines()
        .find(|l| l.starts_with("cohort_api_refused_total{route=\"connections\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "refused connections not counted");
    demo.stop().await.unwrap();
}

/// A body whose Content-Length is over the route's limit is read to its end before the 413, so a
/// client still sending it gets the answer, not a broken pipe (the server closing on unread
/// data resets the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_read_to_its_end_and_answered_413() {
    let demo = start("").await;
    let body = vec![b'x'; 8 << 20];
    let mut s = connect(&demo).await;
    let head = format!(
        "POST /webhooks/sendgrid/events HTTP/1.1\r\nHost: cohort\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.expect("the server reads the whole body");
    let (bytes, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&bytes);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\"") && answer.contains("512000"), "{answer}");
    demo.stop().await.unwrap();
}

/// The whole answer to `request`, as text.
async fn answer_to(demo: &DemoServer, request: &[u8]) -> String {
    let mut s = connect(demo).await;
    let _ = s.write_all(request).await;
    let (bytes, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    String::from_utf8_lossy(&bytes).to_string()
}

/// The framework's own refusals (an undecodable path, an unknown route, a streamed body over the
/// limit) carry the same JSON error body as Cohort's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frameworks_own_refusals_answer_with_the_json_error_body() {
    let demo = start("").await;
    let close = "Connection: close\r\n";
    let bad_path = answer_to(
        &demo,
        format!("POST /v1/%FF HTTP/1.1\r\nHost: c\r\n{close}Content-Length: 2\r\n\r\n{{}}").as_bytes(),
    )
    .await;
    assert!(bad_path.starts_with("HTTP/1.1 400"), "{bad_path}");
    assert!(bad_path.contains("application/json") && bad_path.contains("\"bad_request\""), "{bad_path}");
    assert!(bad_path.contains("UTF-8"), "the framework's reason is kept: {bad_path}");

    let unknown = answer_to(&demo, format!("GET /v1/nothing/here HTTP/1.1\r\nHost: c\r\n{close}\r\n").as_bytes()).await;
    assert!(unknown.starts_with("HTTP/1.1 404") && unknown.contains("\"not_found\""), "{unknown}");

    let auth = format!("Basic {}", base64_of(&format!("{}:", demo.client.web_key)));
    let mut request = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: c\r\n{close}Authorization: {auth}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..10 {
        request.extend_from_slice(format!("{:x}\r\n", 64 << 10).as_bytes());
        request.extend(std::iter::repeat_n(b' ', 64 << 10));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let streamed = answer_to(&demo, &request).await;
    assert!(streamed.starts_with("HTTP/1.1 413"), "{}", &streamed[..streamed.len().min(300)]);
    assert!(streamed.contains("\"payload_too_large\""), "{streamed}");
    demo.stop().await.unwrap();
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
