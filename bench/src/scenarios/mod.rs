//! The scenarios, and what they share: the [`Ctx`] (where the service and
//! Redis are, the report being filled) and latency histograms.
//!
//! 1 heartbeat ingest (`heartbeat`) · 2 stale/state pages over 100,000
//! agents (`agents`) · 3 signal → waiting receiver and 4 approval decision
//! → waiting client (`waits`) · 5 WebSocket fan-out and 6 idle WebSockets
//! (`events`) · 7 usage ingest and stats (`usage`). Scenarios 8 (Redis
//! connections) and 9 (RSS) are sampled by the others and by `main`.

pub mod agents;
pub mod events;
pub mod heartbeat;
pub mod usage;
pub mod waits;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;

use crate::procs::{self, Child, Spawner};
use crate::report::{Report, Target};

/// Name the bench gives its own Redis connection, so that `CLIENT LIST`
/// can tell it apart from the service's.
pub const BENCH_CLIENT_NAME: &str = "attune-bench";

/// What a run needs to start extra processes (scenario 1 starts a gateway
/// and more service instances for the length of one measurement).
pub struct Launch {
    pub spawner: Spawner,
    pub service_bin: PathBuf,
    pub gateway_bin: Option<PathBuf>,
}

/// Everything the scenarios share.
pub struct Ctx<'a> {
    pub report: &'a mut Report,
    pub http: reqwest::Client,
    /// Base URL of the service under test (`http://host:port`).
    pub service: String,
    /// Its process id, when this run started it (for RSS).
    pub service_pid: Option<u32>,
    pub redis_url: Option<String>,
    /// The bench's own Redis connection, for `CLIENT LIST` and `INFO`.
    pub redis: Option<redis::aio::MultiplexedConnection>,
    pub redis_pid: Option<u32>,
    pub gateway_url: Option<String>,
    pub gateway_dir: PathBuf,
    pub launch: Option<Launch>,
    /// Redis connections the service held at idle (scenario 8's baseline).
    pub idle_clients: Option<u64>,
    /// Processes started for the whole run, held only so that they are
    /// killed when the context drops.
    #[allow(dead_code)]
    pub children: Vec<Child>,
}

impl Ctx<'_> {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.service)
    }

    pub fn ws_url(&self, path: &str) -> String {
        let base = self
            .service
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
            .unwrap_or_else(|| self.service.replacen("https://", "wss://", 1));
        format!("{base}{path}")
    }

    /// False when the route does not exist (404/405): the domain has not
    /// been built into this service yet.
    pub async fn available(&self, path: &str) -> Result<bool, String> {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        Ok(!matches!(r.status().as_u16(), 404 | 405))
    }

    /// Redis connections held by everyone but the bench (`CLIENT LIST`).
    pub async fn service_redis_clients(&mut self) -> Option<u64> {
        let conn = self.redis.as_mut()?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(conn)
            .await
            .ok()?;
        let ours = format!(" name={BENCH_CLIENT_NAME} ");
        Some(
            list.lines()
                .filter(|l| !l.trim().is_empty() && !l.contains(&ours))
                .count() as u64,
        )
    }

    /// `INFO stats` `total_commands_processed`.
    pub async fn redis_commands(&mut self) -> Option<u64> {
        let conn = self.redis.as_mut()?;
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))?
            .trim()
            .parse()
            .ok()
    }

    /// Scenario 8: the service's Redis connections now, against idle.
    pub async fn record_redis_clients(&mut self, during: &str) {
        let name = format!("Redis connections during {during}");
        match (self.service_redis_clients().await, self.idle_clients) {
            (Some(n), Some(idle)) => {
                self.report
                    .add(8, name, n as f64, "", Some(Target::Equal(idle as f64)));
            }
            _ => self
                .report
                .unavailable(8, name, "no Redis to ask (give --redis-url)"),
        }
    }

    pub fn service_rss(&self) -> Option<u64> {
        procs::rss_kib(self.service_pid?)
    }

    /// `n` sequential GETs of `path`; every answer must be 2xx. Returns the
    /// latencies and the last body.
    pub async fn time_gets(&self, path: &str, n: usize) -> Result<(Latencies, Value), String> {
        let url = self.url(path);
        let mut lat = Latencies::new();
        let mut last = Value::Null;
        for _ in 0..n {
            let start = Instant::now();
            let r = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            let body = r.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
            lat.record(start.elapsed());
            if !status.is_success() {
                return Err(format!(
                    "GET {path} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            last = serde_json::from_slice(&body).unwrap_or(Value::Null);
        }
        Ok((lat, last))
    }

    /// Adds `name p50` and `name p99` rows; the target applies to p99.
    pub fn add_latencies(
        &mut self,
        scenario: u8,
        name: &str,
        lat: &Latencies,
        p99_below_ms: Option<f64>,
        note: &str,
    ) {
        self.report
            .add(scenario, format!("{name} p50"), lat.ms(50.0), "ms", None)
            .note = format!("n={}", lat.count());
        let mut p99_note = format!("max {:.2} ms", lat.ms(100.0));
        if !note.is_empty() {
            p99_note = format!("{p99_note}; {note}");
        }
        self.report
            .add(
                scenario,
                format!("{name} p99"),
                lat.ms(99.0),
                "ms",
                p99_below_ms.map(Target::Below),
            )
            .note = p99_note;
    }
}

/// Latencies in microseconds, 1 µs to 2 minutes, 3 significant digits.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Latencies {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros() as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn record_all_us(&mut self, samples: &[u32]) {
        for &us in samples {
            self.record_us(u64::from(us));
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q`th percentile, in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q / 100.0) as f64 / 1000.0
    }
}

/// A JSON array's length at `pointer`, or 0.
pub fn array_len(body: &Value, pointer: &str) -> usize {
    body.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// Microseconds since the Unix epoch (the clock shared by every process
/// on this machine, so the bench can compare it across processes).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An HTTP client with a short connect bound and a request bound above
/// every long-poll wait the scenarios ask for.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client with these settings")
}
