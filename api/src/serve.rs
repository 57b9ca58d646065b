//! The HTTP server loop: axum's router on hyper, with the connection-level limits axum's own
//! `serve` does not offer: a cap on open connections, a deadline for a request's header
//! (slowloris), and bounds on header size and count.

use axum::Router;
use cohort_config::ServerConfig;
use cohort_supervisors::Metrics;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Serves `router` on `listener` until `shutdown` completes, then lets open requests finish for
/// up to `grace`. When it returns, no connection (and so no clone of the router) is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
    let (max_header_bytes, max_headers) = (cfg.max_header_bytes, cfg.max_headers);
    let graceful = GracefulShutdown::new();
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.api_refused.with_label_values(&["connections"]).inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        // HTTP/1 only: every client here (load balancers, webhooks, Prometheus) speaks it, and
        // its header deadline covers every request; HTTP/2's preface detection and idle streams
        // would have none.
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(max_header_bytes)
            .max_headers(max_headers);
        let watcher = graceful.watcher();
        let mut closing = closing_rx.clone();
        tasks.spawn(async move {
            // hyper's header deadline starts with the first byte; a client that connects and
            // sends nothing would hold its slot forever, so it gets the same deadline to start.
            let mut first = [0u8; 1];
            let started = tokio::select! {
                r = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => matches!(r, Ok(Ok(1..))),
                _ = closing.changed() => false,
            };
            if started {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(conn).await;
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        graceful.shutdown().await;
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the shutdown grace period were closed");
        tasks.shutdown().await;
    }
}
