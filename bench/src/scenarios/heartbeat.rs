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
//!
//! The service on Redis and the gateway take turns, [`ROUNDS`] times: the
//! speed of a shared machine drifts by a fifth or more over tens of
//! seconds, so measuring one after the other compares two machines rather
//! than two programs. Each gets the same share of the drift, and the ratio
//! compares their totals.

use std::path::Path;
use std::time::Duration;

use crate::procs;
use crate::report::Target;
use crate::scenarios::Ctx;
use crate::wrk::{self, WrkResult};

const CONNECTIONS: u32 = 64;
const DURATION: Duration = Duration::from_secs(10);
/// Turns the gateway and the service on Redis take, each [`ROUND`] long.
const ROUNDS: usize = 3;
const ROUND: Duration = Duration::from_secs(5);
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
    /// Runs combined into this one.
    runs: usize,
}

impl Measured {
    /// Several runs as one: their totals, CPU and commands per request
    /// averaged over all requests, and the worst p50 and p99.
    fn combine(runs: &[Measured]) -> Measured {
        let requests: u64 = runs.iter().map(|m| m.wrk.requests).sum();
        let seconds: f64 = runs
            .iter()
            .map(|m| m.wrk.requests as f64 / m.wrk.requests_per_sec)
            .sum();
        let worst = |f: fn(&Measured) -> f64| runs.iter().map(f).fold(f64::NAN, f64::max);
        let per_req = |f: fn(&Measured) -> Option<f64>| {
            let mut total = 0.0;
            for m in runs {
                total += f(m)? * m.wrk.requests as f64;
            }
            (requests > 0).then(|| total / requests as f64)
        };
        Measured {
            wrk: WrkResult {
                requests,
                requests_per_sec: requests as f64 / seconds,
                p50_ms: worst(|m| m.wrk.p50_ms),
                p99_ms: worst(|m| m.wrk.p99_ms),
                non_2xx: runs.iter().map(|m| m.wrk.non_2xx).sum(),
                socket_errors: runs.iter().map(|m| m.wrk.socket_errors).sum(),
            },
            target_cpu_us: per_req(|m| m.target_cpu_us),
            redis_cpu_us: per_req(|m| m.redis_cpu_us),
            redis_cmds: per_req(|m| m.redis_cmds),
            runs: runs.len(),
        }
    }

    fn note(&self) -> String {
        let mut parts = vec![format!(
            "{} requests, {} non-2xx, {} socket errors",
            self.wrk.requests, self.wrk.non_2xx, self.wrk.socket_errors
        )];
        if self.runs > 1 {
            parts.push(format!(
                "{} turns of {} s taken with the other, worst p99",
                self.runs,
                ROUND.as_secs()
            ));
        }
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
    measure_for(ctx, url, pid, DURATION).await
}

async fn measure_for(
    ctx: &mut Ctx<'_>,
    url: &str,
    pid: Option<u32>,
    duration: Duration,
) -> Result<Measured, String> {
    let script = ctx.gateway_dir.join("heartbeat.lua");
    measure_with(ctx, Some(&script), url, pid, duration).await
}

/// The gateway (if any) and the service on Redis taking turns.
async fn measure_in_turns(
    ctx: &mut Ctx<'_>,
    gateway: Option<(&str, Option<u32>)>,
    service: &str,
) -> Result<(Option<Measured>, Measured), String> {
    let (mut g, mut s) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        if let Some((url, pid)) = gateway {
            g.push(measure_for(ctx, url, pid, ROUND).await?);
        }
        s.push(measure_for(ctx, service, ctx.service_pid, ROUND).await?);
    }
    let gateway = gateway.is_some().then(|| Measured::combine(&g));
    Ok((gateway, Measured::combine(&s)))
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
        runs: 1,
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
    let service = ctx.service.clone();
    let mut gateway_plain = None;
    let (gateway, main) = if let Some(url) = ctx.gateway_url.clone() {
        measure_in_turns(ctx, Some((&url, None)), &service).await?
    } else if let (Some((bin, redis_url)), Some(launch)) = (gateway_bin, &ctx.launch) {
        let child = launch.spawner.gateway(&bin, &redis_url).await?;
        let url = child.url.clone();
        let turns = measure_in_turns(ctx, Some((&url, Some(child.pid()))), &service).await;
        let plain = measure_with(
            ctx,
            None,
            &format!("{url}/hello"),
            Some(child.pid()),
            PLAIN_DURATION,
        )
        .await;
        drop(child);
        gateway_plain = Some(plain?);
        turns?
    } else {
        measure_in_turns(ctx, None, &service).await?
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

    let redis_engine = if ctx.redis_url.is_some() {
        "redis"
    } else {
        "given by URL"
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(requests: u64, per_sec: f64, p99_ms: f64, cpu_us: Option<f64>) -> Measured {
        Measured {
            wrk: WrkResult {
                requests,
                requests_per_sec: per_sec,
                p50_ms: p99_ms / 2.0,
                p99_ms,
                non_2xx: 1,
                socket_errors: 0,
            },
            target_cpu_us: cpu_us,
            redis_cpu_us: None,
            redis_cmds: Some(2.0),
            runs: 1,
        }
    }

    #[test]
    fn turns_combine_into_totals_per_request_averages_and_the_worst_p99() {
        // 10 s at 10/s and 10 s at 30/s: 400 requests in 20 s.
        let m = Measured::combine(&[
            run(100, 10.0, 4.0, Some(10.0)),
            run(300, 30.0, 2.0, Some(20.0)),
        ]);
        assert_eq!(m.wrk.requests, 400);
        assert!((m.wrk.requests_per_sec - 20.0).abs() < 1e-9);
        assert_eq!(m.wrk.p99_ms, 4.0);
        assert_eq!(m.wrk.non_2xx, 2);
        assert!((m.target_cpu_us.unwrap() - 17.5).abs() < 1e-9);
        assert_eq!(m.redis_cpu_us, None);
        assert_eq!(m.redis_cmds, Some(2.0));
        assert_eq!(m.runs, 2);
    }
}
