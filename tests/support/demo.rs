//! A `gradguard demo` (or `train`) child process for the tests that drive a running one: its stdout
//! lines as they come, the live page's address it prints, plain HTTP GETs to its exporter.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub struct Demo {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Demo {
    /// Starts the demo with its exporter on a free loopback port and `extra` flags.
    pub fn start(out: &Path, steps: usize, extra: &[&str]) -> Demo {
        let out = out.to_str().expect("a UTF-8 path");
        let mut args = vec!["demo", "--metrics-addr", "127.0.0.1:0", "--out", out];
        let steps = steps.to_string();
        args.extend(["--steps", steps.as_str()]);
        args.extend(extra);
        Self::spawn(&args)
    }

    /// Starts `gradguard ARGS`.
    pub fn spawn(args: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gradguard");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo { child, lines, seen: Vec::new() }
    }

    /// The first stdout line (from now on) containing `needle`, within `timeout`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {timeout:?}; the demo printed:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The exporter's address, from the `live page: http://ADDR/` line.
    pub fn live_addr(&mut self) -> SocketAddr {
        let line = self.wait_line("live page: http://", Duration::from_secs(120));
        line.trim().trim_start_matches("live page: http://").trim_end_matches('/').parse().expect("an address")
    }

    /// Waits until the exporter has inspected at least `steps` steps.
    pub fn wait_steps(&self, addr: SocketAddr, steps: u64, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let text = get(addr, "/metrics").unwrap_or_default();
            let done = metric(&text, "gradguard_training_steps_total").unwrap_or(0.0);
            if done >= steps as f64 {
                return;
            }
            assert!(Instant::now() < until, "the demo inspected {done} steps in {timeout:?}, wanted {steps}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET of `path`; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A sample's value in a Prometheus exposition (the series named exactly, labels included).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
