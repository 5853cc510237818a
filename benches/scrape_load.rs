//! Scrape load against a training run. The guarded digits CNN (exporter and server on, every
//! report exported) trains in segments of a fixed number of steps, alternately without scrape
//! load and while concurrent clients (threads, loopback only, each on a keep-alive connection
//! like Prometheus) scrape `/metrics`; rounds repeat (ABBA order, so drift from other load on
//! a shared machine cancels) until the clients' lifetime bound is reached. Prints scrape latency
//! p50/p90/p99/max, scrapes and failures, and the step-time ratio loaded / unloaded.
//!
//!     cargo bench --bench scrape_load -- [--steps 60] [--clients 100] [--interval-ms 1000]
//!                                         [--threads 0] [--estimate-every 10] [--max-secs 10]
//!
//! `--steps`: steps per segment (rounded up to whole estimate periods). `--interval-ms`: each
//! client's period between scrapes (1000: 100 clients make 100 scrapes/s; 0: back to back, a
//! stress test that saturates a small machine). Clients block while a segment is unloaded and
//! all stop after `--max-secs`. `--threads`: libtorch intra-op threads (0: its default).
use gradguard::data::Digits;
use gradguard::exporter::{Exporter, MetricsServer};
use gradguard::models::DigitsCnn;
use gradguard::guard::{LayerMap, Settings};
use gradguard::{Batch, GuardedOptimizer};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tch::{nn, nn::OptimizerConfig, Device, Tensor};

struct Args {
    steps: usize,
    clients: usize,
    interval_ms: u64,
    threads: i32,
    estimate_every: u64,
    max_secs: u64,
}

fn parse_args() -> Args {
    let mut a = Args { steps: 60, clients: 100, interval_ms: 1000, threads: 0, estimate_every: 10, max_secs: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => a.steps = value().parse().expect("--steps"),
            "--clients" => a.clients = value().parse().expect("--clients"),
            "--interval-ms" => a.interval_ms = value().parse().expect("--interval-ms"),
            "--threads" => a.threads = value().parse().expect("--threads"),
            "--estimate-every" => a.estimate_every = value().parse().expect("--estimate-every"),
            "--max-secs" => a.max_secs = value().parse().expect("--max-secs"),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// One keep-alive HTTP/1.1 connection that GETs /metrics.
struct Scraper {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Scraper {
    fn scrape(&mut self) -> std::io::Result<usize> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            self.conn = Some(BufReader::new(s));
        }
        let result = (|| {
            let conn = self.conn.as_mut().unwrap();
            conn.get_mut().write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: text/plain\r\n\r\n")?;
            let mut line = String::new();
            conn.read_line(&mut line)?;
            if !line.starts_with("HTTP/1.1 200") {
                return Err(std::io::Error::other(format!("status line {line:?}")));
            }
            let mut len = None;
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse::<usize>().ok();
                    }
                }
            }
            let len = len.ok_or_else(|| std::io::Error::other("no content-length"))?;
            let mut body = vec![0u8; len];
            conn.read_exact(&mut body)?;
            if !body.starts_with(b"# HELP gradguard_") {
                return Err(std::io::Error::other("unexpected body"));
            }
            Ok(len)
        })();
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

struct Trainer<'a> {
    digits: Digits,
    train: Vec<usize>,
    net: &'a DigitsCnn,
    opt: GuardedOptimizer<'a>,
    step: usize,
    last: Option<gradguard::Report>,
}

impl Trainer<'_> {
    /// `n` guarded steps feeding the exporter (as examples/exporter_demo does); returns the wall time.
    fn run(&mut self, n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        for _ in 0..n {
            let idx: Vec<usize> = (0..64).map(|i| self.train[(self.step * 64 + i) % self.train.len()]).collect();
            let (x, y, a) = self.digits.batch(&idx, Device::Cpu)?;
            let loss = self.net.f_loss(&x, &y)?;
            // The report reaches the exporter too (a guard report sink, off this thread).
            self.last = Some(self.opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&a))?.into_report());
            self.step += 1;
        }
        Ok(started.elapsed())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Clients scrape only while the gate is open; they block (no CPU) while it is closed.
struct Gate {
    state: Mutex<(bool, bool)>, // (open, stop)
    changed: Condvar,
}

impl Gate {
    fn set(&self, open: bool, stop: bool) {
        *self.state.lock().unwrap() = (open, stop);
        self.changed.notify_all();
    }

    /// Waits until open (true) or stopped (false).
    fn wait_open(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        while !s.0 && !s.1 {
            s = self.changed.wait(s).unwrap();
        }
        !s.1
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args();
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let digits = Digits::embedded()?;
    let (train, _) = digits.split(0.2, 0);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let layers = LayerMap::from_var_store(&vs)?;
    let exporter = Arc::new(Exporter::for_layers(&layers.names())?);
    let server = MetricsServer::start("127.0.0.1:0".parse()?, exporter.clone())?;
    let addr = server.local_addr();
    let sink = exporter.clone();
    // The budget of the old default (the whole wall time): every estimate period is spent,
    // so loaded and unloaded segments do the same work.
    let settings = Settings { estimate_every: args.estimate_every, max_estimate_age_steps: args.estimate_every.max(50), budget_share: 1.0, ..Default::default() };
    let loss_fn = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let opt = GuardedOptimizer::builder_for_layers(Ok(layers), nn::Adam::default().build(&vs, 1e-3)?)
        .settings(settings)
        .loss(loss_fn)
        .report_sink(Arc::new(move |report: &gradguard::Report| {
            let _ = sink.observe_report(report);
        }))
        .build()?;
    let mut trainer = Trainer { digits, train, net: &net, opt, step: 0, last: None };
    // Segments hold whole estimate periods, so loaded and unloaded segments do the same work.
    let segment = args.steps.div_ceil(args.estimate_every as usize).max(1) * args.estimate_every as usize;
    println!(
        "scrape_load: digits CNN, batch 64, estimate every {} steps, libtorch threads {}, {} cores; \
         {} clients on keep-alive connections, {} ms between a client's scrapes, client lifetime <= {} s; \
         segments of {segment} steps, alternating unloaded/loaded (ABBA)",
        args.estimate_every,
        tch::get_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.clients,
        args.interval_ms,
        args.max_secs,
    );
    trainer.run(segment)?; // warm-up
    let t0 = Instant::now();
    let mut bytes = 0;
    for _ in 0..1000 {
        bytes = exporter.render().len();
    }
    let render = t0.elapsed() / 1000;
    let t0 = Instant::now();
    let report = trainer.last.clone().expect("a report after warm-up");
    for _ in 0..1000 {
        exporter.observe_report(&report)?;
    }
    let observe = t0.elapsed() / 1000;
    println!(
        "exposition: {bytes} bytes, {} lines; render {:.1} us per call (scrape thread); observe_report {:.1} us per call (training thread)",
        exporter.render().lines().count(),
        render.as_secs_f64() * 1e6,
        observe.as_secs_f64() * 1e6
    );
    let gate = Arc::new(Gate { state: Mutex::new((false, false)), changed: Condvar::new() });
    let interval = Duration::from_millis(args.interval_ms);
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let gate = gate.clone();
            // Spread the clients' schedules over one interval, as independent scrapers are.
            let offset = interval.mul_f64(i as f64 / args.clients as f64);
            std::thread::spawn(move || {
                let mut s = Scraper { addr, conn: None };
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                let mut due = Instant::now() + offset;
                while gate.wait_open() {
                    let now = Instant::now();
                    if interval.is_zero() {
                        due = now;
                    } else if due + Duration::from_millis(5) < now {
                        // Slots missed while the gate was closed are skipped, not made up in a
                        // burst when it reopens.
                        while due < now {
                            due += interval;
                        }
                    }
                    if now < due {
                        std::thread::sleep(due - now);
                        continue; // the gate may have closed meanwhile
                    }
                    let t0 = Instant::now();
                    match s.scrape() {
                        Ok(_) => latencies.push(t0.elapsed()),
                        Err(_) => failures += 1,
                    }
                    due += interval;
                }
                (latencies, failures)
            })
        })
        .collect();

    let started = Instant::now();
    let max = Duration::from_secs(args.max_secs);
    let (mut unloaded, mut loaded, mut rounds, mut ratios) = (Duration::ZERO, Duration::ZERO, 0usize, Vec::new());
    let mut last_round = Duration::ZERO;
    while started.elapsed() + last_round < max {
        let round = Instant::now();
        let mut times = [Duration::ZERO; 2];
        // ABBA: unloaded, loaded, loaded, unloaded (then the mirror) cancels linear drift.
        let order: [bool; 2] = if rounds % 2 == 0 { [false, true] } else { [true, false] };
        for load in order {
            gate.set(load, false);
            times[usize::from(load)] += trainer.run(segment)?;
        }
        gate.set(false, false);
        unloaded += times[0];
        loaded += times[1];
        ratios.push(times[1].as_secs_f64() / times[0].as_secs_f64());
        rounds += 1;
        last_round = round.elapsed();
    }
    let wall = started.elapsed();
    gate.set(false, true);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for c in clients {
        let (l, f) = c.join().expect("client thread");
        latencies.extend(l);
        failures += f;
    }
    drop(server);

    latencies.sort();
    ratios.sort_by(f64::total_cmp);
    let steps = (rounds * segment) as u32;
    let ratio = loaded.as_secs_f64() / unloaded.as_secs_f64();
    println!(
        "scrapes: {} ok, {failures} failed, in {:.2} s of loaded training ({:.0} scrapes/s); whole run {:.2} s",
        latencies.len(),
        loaded.as_secs_f64(),
        latencies.len() as f64 / loaded.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "scrape latency: p50 {}  p90 {}  p99 {}  max {}",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 90.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!("step time over {rounds} rounds x {segment} steps each way: unloaded {}, loaded {}", ms(unloaded / steps), ms(loaded / steps));
    println!(
        "step-time ratio loaded/unloaded: {ratio:.3} (median of rounds {:.3}, range {:.3}..{:.3}); target < 1.05: {}; failed scrapes: {failures}",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        if ratio < 1.05 && failures == 0 { "met" } else { "NOT met" }
    );
    Ok(())
}
