//! [`MetricsServer`]: `/metrics`, `/healthz`, `/report` and the live page `/` on a thread and
//! tokio runtime of their own. Read-only: every route is a GET (HEAD answered too); anything else is 404/405.
use crate::error::ExporterError;
use crate::metrics::Exporter;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// Where the metrics are served unless told otherwise: loopback only, port 9464 (the
/// conventional port of OpenTelemetry's Prometheus exporter).
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));

/// How long a dropped server waits for in-flight requests before closing them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running metrics server. Dropping it (or [`MetricsServer::shutdown`]) stops accepting,
/// lets in-flight requests finish (up to [`SHUTDOWN_GRACE`]), joins the thread and frees the
/// port.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` now (so a busy port is [`ExporterError::AddrInUse`] here, not later) and
    /// serves `exporter` from a new thread. Port 0 picks a free port: see
    /// [`MetricsServer::local_addr`].
    pub fn start(addr: SocketAddr, exporter: Arc<Exporter>) -> Result<MetricsServer, ExporterError> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => ExporterError::AddrInUse { addr },
            _ => ExporterError::Bind { addr, source },
        })?;
        let local = listener.local_addr().map_err(|source| ExporterError::Bind { addr, source })?;
        listener.set_nonblocking(true).map_err(|source| ExporterError::Bind { addr, source })?;
        // One thread: scrapes never take more than one core from training.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| ExporterError::Start { context: "building the tokio runtime", source })?;
        let (tx, mut rx) = watch::channel(false);
        let app = router(exporter);
        let thread = std::thread::Builder::new()
            .name("gradguard-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("gradguard metrics server on {local}: cannot register the listener: {e}");
                            return;
                        }
                    };
                    use axum::serve::ListenerExt;
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let mut stop = rx.clone();
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    });
                    tokio::select! {
                        r = serve => if let Err(e) = r {
                            eprintln!("gradguard metrics server on {local}: {e}");
                        },
                        // Bound the graceful phase: stuck clients do not hold the drop forever.
                        _ = async {
                            let _ = rx.wait_for(|s| *s).await;
                            tokio::time::sleep(SHUTDOWN_GRACE).await;
                        } => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|source| ExporterError::Start { context: "spawning the server thread", source })?;
        Ok(MetricsServer { addr: local, shutdown: Some(tx), thread: Some(thread) })
    }

    /// The bound address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and waits for its thread (what dropping it does).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The read-only routes over one exporter.
pub fn router(exporter: Arc<Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/report", get(report))
        .route("/", get(live_page))
        .fallback(not_found)
        .with_state(exporter)
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    let body = exporter.render();
    ([(header::CONTENT_TYPE, exporter.content_type()), (header::CACHE_CONTROL, "no-store")], body)
}

async fn healthz() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], "ok\n")
}

async fn report(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], exporter.snapshot_json())
}

/// The live page: HTML and a little inline JavaScript that polls `/report` and draws each
/// layer's metrics, thresholds and protection level as they move. No external asset.
pub(crate) const LIVE_PAGE: &str = include_str!("live_page.html");

async fn live_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], LIVE_PAGE)
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found: gradguard serves /, /metrics, /healthz and /report\n")
}
