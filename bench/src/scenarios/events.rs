//! Scenarios 5 and 6: WebSocket subscribers.
//!
//! 5 — 1,000 subscribers to `bench.tick`, 200 events/s published for 10 s,
//! each event carrying its send time; every subscriber must receive every
//! event, and publish → receive latency is measured per delivery. The
//! subscribers run in this process and share the cores with the service
//! and Redis, so their own scheduling delay is part of the figure. One more
//! subscriber, the probe, runs on a thread and runtime of its own: its
//! latency is not queued behind the other 1,000 sockets' frames, which
//! tells the service's delay from the bench's.
//!
//! 6 — 10,000 idle subscribers; the service's RSS before and after says
//! what one connection costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::report::Target;
use crate::scenarios::{Ctx, Latencies, unix_micros};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SUBSCRIBERS: usize = 1000;
const EVENTS_PER_SEC: u64 = 200;
const PUBLISH_FOR: Duration = Duration::from_secs(10);
/// How long the last events may take to reach everyone.
const DRAIN: Duration = Duration::from_secs(5);
const IDLE_SOCKETS: usize = 10_000;
/// Handshakes in flight while opening many sockets.
const CONNECTING: usize = 200;
/// Client read buffer: several frames per read.
const READ_BUFFER: usize = 4 * 1024;

/// Opens one WebSocket to `url`.
///
/// The frames are small, and the protocol layer zero-fills its whole read
/// buffer before every read: with the default 128 KiB buffer, 1,000
/// subscribers would spend more CPU clearing memory than reading frames.
async fn connect(url: &str) -> Result<Socket, String> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| format!("WebSocket {url}: {e}"))
}

/// Opens `n` WebSockets to `url`, `CONNECTING` at a time.
async fn open(url: &str, n: usize) -> Result<Vec<Socket>, String> {
    let sockets: Vec<Result<Socket, String>> = futures_util::stream::iter(0..n)
        .map(|_| connect(url))
        .buffer_unordered(CONNECTING)
        .collect()
        .await;
    sockets.into_iter().collect()
}

/// `"sent_at_us":123` → 123, without parsing the whole frame (the bench
/// reads 200,000 frames a second on the same cores as the service).
fn sent_at_us(frame: &str) -> Option<u64> {
    const KEY: &str = "\"sent_at_us\":";
    let start = frame.find(KEY)? + KEY.len();
    let digits: &str = frame[start..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// What one subscriber saw.
struct Seen {
    /// Publish → receive per frame, µs. A plain vector while reading: a
    /// histogram per subscriber (1,000 of them, written 200 times a second
    /// each) would keep missing the cache; they are merged at the end.
    lat_us: Vec<u32>,
    closed_early: bool,
}

/// Reads ticks until told to stop; counts into `count`.
///
/// Each subscriber has its own stop signal: a channel shared by 1,000
/// subscribers would put one shared lock on every frame's path.
async fn subscribe(
    mut socket: Socket,
    count: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) -> Seen {
    let mut seen = Seen {
        lat_us: Vec::with_capacity((EVENTS_PER_SEC * PUBLISH_FOR.as_secs()) as usize + 16),
        closed_early: false,
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Some(sent) = sent_at_us(text.as_str()) {
                        let lat = unix_micros().saturating_sub(sent);
                        seen.lat_us.push(u32::try_from(lat).unwrap_or(u32::MAX));
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    seen.closed_early = true;
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    seen
}

/// The probe: one subscriber on its own OS thread and single-threaded
/// runtime, counting into `count`.
fn spawn_probe(
    url: String,
    count: Arc<AtomicU64>,
    stop: oneshot::Receiver<()>,
) -> std::thread::JoinHandle<Result<Seen, String>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("probe runtime: {e}"))?;
        runtime.block_on(async move {
            let socket = connect(&url).await?;
            Ok(subscribe(socket, count, stop).await)
        })
    })
}

/// Scenario 5: fan-out to 1,000 WebSocket subscribers.
pub async fn fan_out(ctx: &mut Ctx<'_>) -> Result<(), String> {
    let sockets = open(&ctx.ws_url("/v1/events/ws?types=bench.tick"), SUBSCRIBERS).await?;
    let counts: Vec<Arc<AtomicU64>> = (0..SUBSCRIBERS)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut stops = Vec::with_capacity(SUBSCRIBERS + 1);
    let subscribers: Vec<_> = sockets
        .into_iter()
        .zip(&counts)
        .map(|(socket, count)| {
            let (stop_tx, stop_rx) = oneshot::channel();
            stops.push(stop_tx);
            tokio::spawn(subscribe(socket, count.clone(), stop_rx))
        })
        .collect();
    let probe_count = Arc::new(AtomicU64::new(0));
    let (probe_stop, probe_stop_rx) = oneshot::channel();
    stops.push(probe_stop);
    let probe = spawn_probe(
        ctx.ws_url("/v1/events/ws?types=bench.tick"),
        probe_count.clone(),
        probe_stop_rx,
    );
    // The server joins the live stream right after the handshake.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.record_redis_clients("5 (1,000 WebSockets)").await;

    let pids = [
        ("service", ctx.service_pid),
        ("bench", Some(std::process::id())),
        ("redis", ctx.redis_pid),
    ];
    let cpu0 = pids.map(|(_, pid)| pid.and_then(crate::procs::cpu_seconds));
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / EVENTS_PER_SEC));
    let mut publishes = Vec::new();
    let mut seq = 0u64;
    while started.elapsed() < PUBLISH_FOR {
        pace.tick().await;
        let client = ctx.http.clone();
        let url = ctx.url("/v1/events");
        seq += 1;
        publishes.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"type": "bench.tick",
                              "data": {"sent_at_us": unix_micros(), "seq": seq}}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }));
    }
    let mut published = 0u64;
    for p in publishes {
        if p.await.map_err(|e| e.to_string())? {
            published += 1;
        }
    }
    let attempted = seq;
    let drain_until = Instant::now() + DRAIN;
    while Instant::now() < drain_until
        && counts.iter().any(|c| c.load(Ordering::Relaxed) < published)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    for stop in stops {
        let _ = stop.send(());
    }
    let cpu1 = pids.map(|(_, pid)| pid.and_then(crate::procs::cpu_seconds));
    let cores: Vec<String> = pids
        .iter()
        .zip(cpu0.iter().zip(&cpu1))
        .filter_map(|((name, _), (a, b))| {
            Some(format!(
                "{name} {:.0}%",
                (b.as_ref()? - a.as_ref()?) * 100.0 / elapsed.as_secs_f64()
            ))
        })
        .collect();

    let mut lat = Latencies::new();
    let mut closed = 0;
    for s in subscribers {
        let seen = s.await.map_err(|e| e.to_string())?;
        lat.record_all_us(&seen.lat_us);
        closed += usize::from(seen.closed_early);
    }
    let probe = tokio::task::spawn_blocking(move || probe.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the probe thread panicked".to_owned())??;
    let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let complete = got.iter().filter(|&&n| n == published).count();
    let delivered: u64 = got.iter().sum();
    let lost = (published * SUBSCRIBERS as u64).saturating_sub(delivered);

    ctx.report
        .add(
            5,
            "subscribers missing events",
            (SUBSCRIBERS - complete) as f64,
            "",
            Some(Target::Equal(0.0)),
        )
        .note = format!(
        "{published}/{attempted} events published; {lost} deliveries lost; \
         {closed} sockets closed early; min/max per subscriber {}/{}",
        got.iter().min().copied().unwrap_or(0),
        got.iter().max().copied().unwrap_or(0)
    );
    ctx.report
        .add(
            5,
            "deliveries/s",
            delivered as f64 / elapsed.as_secs_f64(),
            "deliveries/s",
            None,
        )
        .note = format!(
        "{delivered} deliveries to {SUBSCRIBERS} sockets in {:.1} s; CPU (% of one core): {}",
        elapsed.as_secs_f64(),
        cores.join(", ")
    );
    ctx.add_latencies(
        5,
        "publish → receive",
        &lat,
        Some(50.0),
        "subscribers run in the bench, on the same cores",
    );
    ctx.add_latencies(
        5,
        "publish → receive, probe",
        &{
            let mut probe_lat = Latencies::new();
            probe_lat.record_all_us(&probe.lat_us);
            probe_lat
        },
        None,
        &format!(
            "one more subscriber on its own thread; received {} of {published}",
            probe_count.load(Ordering::Relaxed)
        ),
    );
    Ok(())
}

/// Scenario 6: what 10,000 idle WebSockets cost the service.
pub async fn idle(ctx: &mut Ctx<'_>) -> Result<(), String> {
    let Some(pid) = ctx.service_pid else {
        ctx.report.unavailable(
            6,
            "RSS per idle WebSocket",
            "the service was given by URL (no process to read RSS from)",
        );
        return Ok(());
    };
    let read = || crate::procs::rss_kib(pid).ok_or("cannot read the service's RSS");
    let before = read()?;
    let sockets = open(&ctx.ws_url("/v1/events/ws?types=bench.idle"), IDLE_SOCKETS).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = read()?;
    ctx.record_redis_clients("6 (10,000 idle WebSockets)").await;
    drop(sockets);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = read()?;
    // Freed memory may stay with the allocator; opening the same number
    // again tells retention (RSS stays) from a leak (RSS grows again).
    let sockets = open(&ctx.ws_url("/v1/events/ws?types=bench.idle"), IDLE_SOCKETS).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reopened = read()?;
    drop(sockets);
    ctx.report
        .add(
            6,
            "RSS per idle WebSocket",
            after.saturating_sub(before) as f64 / IDLE_SOCKETS as f64,
            "KiB/conn",
            Some(Target::Below(15.0)),
        )
        .note = format!(
        "RSS {before} KiB → {after} KiB with {IDLE_SOCKETS} sockets → {closed} KiB 2 s after \
         closing → {reopened} KiB with {IDLE_SOCKETS} again"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sent_at_us;

    #[test]
    fn the_send_time_is_read_from_an_event_frame() {
        let frame =
            r#"{"id":"1-0","type":"bench.tick","data":{"sent_at_us":1700000000123456,"seq":3}}"#;
        assert_eq!(sent_at_us(frame), Some(1_700_000_000_123_456));
        assert_eq!(sent_at_us(r#"{"data":{"sent_at_us": 42}}"#), Some(42));
        assert_eq!(sent_at_us(r#"{"type":"stream.reset"}"#), None);
    }
}
