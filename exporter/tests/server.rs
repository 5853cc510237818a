//! The metrics server: endpoints (the live page included), a busy port, shutdown on drop.
mod common;
use common::{real_reports, value, LAYERS};
use gradguard_exporter::client::get;
use gradguard_exporter::{Exporter, ExporterError, MetricsServer, DEFAULT_ADDR};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

fn exporter() -> Arc<Exporter> {
    Arc::new(Exporter::for_layers(&LAYERS).unwrap())
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn default_address_is_loopback_9464() {
    assert_eq!(DEFAULT_ADDR, "127.0.0.1:9464".parse::<SocketAddr>().unwrap());
}

#[test]
fn serves_metrics_healthz_and_report_and_stops_on_drop() {
    let ex = exporter();
    for r in real_reports() {
        ex.observe_report(&r).unwrap();
    }
    let server = MetricsServer::start(loopback0(), ex.clone()).expect("start");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let m = get(addr, "/metrics", T).expect("GET /metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"), "{:?}", m.header("content-type"));
    assert_eq!(value(&m.body, "gradguard_training_steps_total"), 2.0);
    assert!(m.body.contains("gradguard_layer_leakage{layer=\"fc1\",metric=\"sensitivity\"}"));

    let h = get(addr, "/healthz", T).unwrap();
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));

    let r = get(addr, "/report", T).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(json["report"]["step"], 1);
    assert_eq!(json["report"]["layers"].as_array().unwrap().len(), 2);

    // The live page: HTML whose inline script polls /report; nothing fetched from elsewhere.
    let page = get(addr, "/", T).unwrap();
    assert_eq!((page.status, page.header("content-type")), (200, Some("text/html; charset=utf-8")));
    assert!(page.body.contains("<script>") && page.body.contains("fetch(\"/report\""), "the page polls /report");
    assert!(page.body.contains("<canvas id=\"overview\""), "the page draws an overview");
    assert!(!page.body.contains(" src=") && !page.body.contains("<link rel=\"stylesheet\""), "no external script or style");
    assert_eq!(page.body.matches("://").count(), page.body.matches("http://www.w3.org/2000/svg").count(), "no URL but the SVG namespace");

    assert_eq!(get(addr, "/nope", T).unwrap().status, 404);
    // Read-only: no state-changing method is routed.
    let post = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // Many concurrent scrapes are all answered.
    let handles: Vec<_> = (0..16).map(|_| std::thread::spawn(move || get(addr, "/metrics", T).map(|r| r.status))).collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), 200);
    }

    // An idle keep-alive connection must not hold the shutdown.
    let idle = std::net::TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(7), "drop took {:?}", started.elapsed());
    drop(idle);
    assert!(get(addr, "/healthz", Duration::from_millis(500)).is_err(), "nothing answers after drop");
    TcpListener::bind(addr).expect("the port is free again after drop");
}

#[test]
fn busy_port_is_a_typed_error_naming_the_address() {
    let taken = TcpListener::bind(loopback0()).unwrap();
    let addr = taken.local_addr().unwrap();
    let err = MetricsServer::start(addr, exporter()).unwrap_err();
    match &err {
        ExporterError::AddrInUse { addr: a } => assert_eq!(*a, addr),
        other => panic!("expected AddrInUse, got {other:?}"),
    }
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    // Two exporters on one port: the second is refused the same way.
    let first = MetricsServer::start(loopback0(), exporter()).unwrap();
    let second = MetricsServer::start(first.local_addr(), exporter());
    assert!(matches!(second, Err(ExporterError::AddrInUse { .. })), "{second:?}");
    assert_eq!(get(first.local_addr(), "/healthz", T).unwrap().status, 200, "the first keeps serving");
}

#[test]
fn explicit_shutdown_frees_the_port() {
    let server = MetricsServer::start(loopback0(), exporter()).unwrap();
    let addr = server.local_addr();
    assert_eq!(get(addr, "/metrics", T).unwrap().status, 200);
    server.shutdown();
    let again = MetricsServer::start(addr, exporter()).expect("restart on the same port");
    assert_eq!(get(again.local_addr(), "/healthz", T).unwrap().status, 200);
}
