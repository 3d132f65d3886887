//! Scenario 1: heartbeat ingest at 64 connections, the service against the
//! reference gateway in the same run with the same wrk script.
//!
//! Besides rate and p99, each run records the CPU time the target process
//! and Redis spent per request and how many Redis commands a request cost:
//! on a machine where the load generator, the server and Redis share the
//! cores, throughput is CPU per request, so these say where it goes. Two
//! shorter runs of a plain GET that touches no storage (the service's
//! `/healthz`, the gateway's `/hello`) isolate what the HTTP stack and
//! its layers cost per request.

use std::path::Path;
use std::time::Duration;

use crate::procs;
use crate::report::Target;
use crate::scenarios::Ctx;
use crate::wrk::{self, WrkResult};

const CONNECTIONS: u32 = 64;
const DURATION: Duration = Duration::from_secs(10);
/// The plain-GET runs only need a stable CPU-per-request figure.
const PLAIN_DURATION: Duration = Duration::from_secs(5);

/// One wrk run and what it cost.
struct Measured {
    wrk: WrkResult,
    /// CPU µs the target process spent per request.
    target_cpu_us: Option<f64>,
    /// CPU µs Redis spent per request.
    redis_cpu_us: Option<f64>,
    /// Redis commands per request (`total_commands_processed`).
    redis_cmds: Option<f64>,
}

impl Measured {
    fn note(&self) -> String {
        let mut parts = vec![format!(
            "{} requests, {} non-2xx, {} socket errors",
            self.wrk.requests, self.wrk.non_2xx, self.wrk.socket_errors
        )];
        if let Some(c) = self.target_cpu_us {
            parts.push(format!("process {c:.1} µs CPU/req"));
        }
        if let Some(c) = self.redis_cpu_us {
            parts.push(format!("redis {c:.1} µs CPU/req"));
        }
        if let Some(c) = self.redis_cmds {
            parts.push(format!("{c:.2} redis cmds/req"));
        }
        parts.join("; ")
    }
}

/// Heartbeats against `url` with the gateway's wrk script.
async fn measure(ctx: &mut Ctx<'_>, url: &str, pid: Option<u32>) -> Result<Measured, String> {
    let script = ctx.gateway_dir.join("heartbeat.lua");
    measure_with(ctx, Some(&script), url, pid, DURATION).await
}

async fn measure_with(
    ctx: &mut Ctx<'_>,
    script: Option<&Path>,
    url: &str,
    pid: Option<u32>,
    duration: Duration,
) -> Result<Measured, String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = pid.and_then(procs::cpu_seconds);
    let redis0 = ctx.redis_pid.and_then(procs::cpu_seconds);
    let cmds0 = ctx.redis_commands().await;
    let wrk = wrk::run(script, url, CONNECTIONS, duration).await?;
    let cpu1 = pid.and_then(procs::cpu_seconds);
    let redis1 = ctx.redis_pid.and_then(procs::cpu_seconds);
    let cmds1 = ctx.redis_commands().await;
    let per_req = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if wrk.requests > 0 => Some((b - a) * 1e6 / wrk.requests as f64),
        _ => None,
    };
    let redis_cmds = match (cmds0, cmds1) {
        // The INFO call itself counts as one command.
        (Some(a), Some(b)) if wrk.requests > 0 => {
            Some(b.saturating_sub(a + 1) as f64 / wrk.requests as f64)
        }
        _ => None,
    };
    Ok(Measured {
        target_cpu_us: per_req(cpu0, cpu1),
        redis_cpu_us: per_req(redis0, redis1),
        redis_cmds,
        wrk,
    })
}

pub async fn run(ctx: &mut Ctx<'_>) -> Result<(), String> {
    if !ctx.gateway_dir.join("heartbeat.lua").is_file() {
        return Err(format!(
            "no heartbeat.lua in {} (give --gateway-dir)",
            ctx.gateway_dir.display()
        ));
    }

    // The ceiling: the gateway, started for this measurement only.
    let gateway_bin = match (&ctx.launch, &ctx.redis_url) {
        (Some(launch), Some(redis_url)) => launch
            .gateway_bin
            .clone()
            .map(|bin| (bin, redis_url.clone())),
        _ => None,
    };
    let mut gateway_plain = None;
    let gateway = if let Some(url) = ctx.gateway_url.clone() {
        Some(measure(ctx, &url, None).await?)
    } else if let (Some((bin, redis_url)), Some(launch)) = (gateway_bin, &ctx.launch) {
        let child = launch.spawner.gateway(&bin, &redis_url).await?;
        let m = measure(ctx, &child.url.clone(), Some(child.pid())).await;
        let plain = measure_with(
            ctx,
            None,
            &format!("{}/hello", child.url),
            Some(child.pid()),
            PLAIN_DURATION,
        )
        .await;
        drop(child);
        gateway_plain = Some(plain?);
        Some(m?)
    } else {
        None
    };
    match &gateway {
        Some(g) => {
            ctx.report
                .add(
                    1,
                    "heartbeats/s, gateway",
                    g.wrk.requests_per_sec,
                    "req/s",
                    None,
                )
                .note = g.note();
            ctx.report.add(1, "p99, gateway", g.wrk.p99_ms, "ms", None);
        }
        None => ctx.report.unavailable(
            1,
            "heartbeats/s, gateway",
            "no gateway (give --gateway-url or --gateway-dir with a Redis)",
        ),
    }

    let service = ctx.service.clone();
    let redis_engine = if ctx.redis_url.is_some() {
        "redis"
    } else {
        "given by URL"
    };
    let main = measure(ctx, &service, ctx.service_pid).await?;
    record(ctx, redis_engine, &main, gateway.as_ref(), true);
    let plain = measure_with(
        ctx,
        None,
        &format!("{service}/healthz"),
        ctx.service_pid,
        PLAIN_DURATION,
    )
    .await?;

    let Some(launch) = &ctx.launch else {
        ctx.report.unavailable(
            1,
            "heartbeats/s, service (memory)",
            "the service was given by URL",
        );
        record_plain(ctx, "GET /healthz, service", &plain);
        return Ok(());
    };
    let bin = launch.service_bin.clone();
    let child = launch
        .spawner
        .service("service-memory", &bin, None, "bench", &[])
        .await?;
    let memory = measure(ctx, &child.url.clone(), Some(child.pid())).await;
    drop(child);
    record(ctx, "memory", &memory?, gateway.as_ref(), true);

    if let (Some(redis_url), Some(launch)) = (ctx.redis_url.clone(), &ctx.launch) {
        let child = launch
            .spawner
            .service(
                "service-no-heartbeat-events",
                &bin,
                Some(&redis_url),
                "bench-nohb",
                &["--no-heartbeat-events"],
            )
            .await?;
        let quiet = measure(ctx, &child.url.clone(), Some(child.pid())).await;
        drop(child);
        record(
            ctx,
            "redis, --no-heartbeat-events",
            &quiet?,
            gateway.as_ref(),
            false,
        );
    }
    record_plain(ctx, "GET /healthz, service", &plain);
    if let Some(g) = &gateway_plain {
        record_plain(ctx, "GET /hello, gateway", g);
    }
    Ok(())
}

/// Rate, p99 and ratio to the gateway of one service configuration.
fn record(
    ctx: &mut Ctx<'_>,
    engine: &str,
    m: &Measured,
    gateway: Option<&Measured>,
    targets: bool,
) {
    ctx.report
        .add(
            1,
            format!("heartbeats/s, service ({engine})"),
            m.wrk.requests_per_sec,
            "req/s",
            None,
        )
        .note = m.note();
    ctx.report.add(
        1,
        format!("p99, service ({engine})"),
        m.wrk.p99_ms,
        "ms",
        targets.then_some(Target::Below(5.0)),
    );
    if let Some(g) = gateway {
        ctx.report.add(
            1,
            format!("ratio service ({engine}) / gateway"),
            m.wrk.requests_per_sec / g.wrk.requests_per_sec,
            "ratio",
            targets.then_some(Target::AtLeast(0.75)),
        );
    }
}

/// A plain-GET diagnostic row: no target, the cost is in the note.
fn record_plain(ctx: &mut Ctx<'_>, name: &str, m: &Measured) {
    ctx.report
        .add(1, name, m.wrk.requests_per_sec, "req/s", None)
        .note = format!("diagnostic, no storage; {}", m.note());
}
