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
//! Every configuration measured (the gateway, the service on Redis, on the
//! memory engine, with `--no-heartbeat-events`, and on Redis fed by a
//! typical client, see [`typical_client`]) takes its turn in each
//! of [`ROUNDS`] rounds: the speed of a shared machine drifts by a fifth or
//! more over tens of seconds, so measuring one after the other compares
//! machines rather than programs. Each gets the same share of the drift,
//! and every ratio compares totals over the same rounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs;
use crate::report::Target;
use crate::scenarios::{Ctx, Launch};
use crate::wrk::{self, WrkResult};

const CONNECTIONS: u32 = 64;
/// The row name of heartbeats as a typical client sends them (see
/// [`typical_client`]).
const TYPICAL_CLIENT: &str = "redis, typical client";
/// Turns each configuration takes, each [`ROUND`] long.
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
                "{} turns of {} s taken with the others, worst p99",
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

/// A configuration under load.
#[derive(Clone)]
struct Contestant {
    url: String,
    /// Its process id, when this run started it.
    pid: Option<u32>,
    /// Its own wrk script; the gateway's otherwise.
    script: Option<PathBuf>,
    /// What that script sends, for the report.
    about: Option<String>,
}

impl Contestant {
    fn new(url: String, pid: Option<u32>) -> Self {
        Self {
            url,
            pid,
            script: None,
            about: None,
        }
    }
}

/// Every contestant in turn, [`ROUNDS`] times; each one's turns combined.
async fn measure_in_turns(
    ctx: &mut Ctx<'_>,
    contestants: &[Contestant],
) -> Result<Vec<Measured>, String> {
    let gateway_script = ctx.gateway_dir.join("heartbeat.lua");
    let mut turns: Vec<Vec<Measured>> = contestants.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (c, turns) in contestants.iter().zip(&mut turns) {
            let script = c.script.as_deref().unwrap_or(&gateway_script);
            turns.push(measure_with(ctx, Some(script), &c.url, c.pid, ROUND).await?);
        }
    }
    Ok(turns.iter().map(|t| Measured::combine(t)).collect())
}

/// Keys in the typical client's keys file: the one it uses and others.
const TYPICAL_CLIENT_KEYS: usize = 200;

/// The wrk script and keys file of heartbeats as agents' HTTP clients
/// typically send them, which the gateway's script does not: gzip accepted
/// (most clients' default), `metadata` and `display_name` resent with every
/// beat, and an API key checked among [`TYPICAL_CLIENT_KEYS`]. Both are
/// written to the log directory.
fn typical_client(launch: &Launch) -> Result<(PathBuf, PathBuf), String> {
    let out = std::process::Command::new(&launch.service_bin)
        .args(["keys", "new", "--name", "bench-agent", "--role", "agent"])
        .output()
        .map_err(|e| format!("cannot run `keys new`: {e}"))?;
    // The secret on stdout, the entry to paste on stderr.
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let secret = stdout
        .lines()
        .find(|line| line.starts_with("atk_"))
        .ok_or("`keys new` printed no secret")?
        .trim();
    let entry = stderr
        .find("[[keys]]")
        .map(|at| &stderr[at..])
        .ok_or("`keys new` printed no entry")?;
    let mut keys = entry.to_owned();
    // Digests no secret will match: only their number matters.
    use std::hash::BuildHasher;
    let hasher = std::hash::RandomState::new();
    for i in 1..TYPICAL_CLIENT_KEYS {
        let digest: String = (0..4)
            .map(|part| format!("{:016x}", hasher.hash_one((i, part))))
            .collect();
        keys.push_str(&format!(
            "\n[[keys]]\nname = \"other-{i}\"\nrole = \"agent\"\nsha256 = \"{digest}\"\n"
        ));
    }
    let keys_file = launch.spawner.log_dir.join("typical-client-keys.toml");
    std::fs::write(&keys_file, keys).map_err(|e| format!("cannot write the keys file: {e}"))?;
    let script = launch.spawner.log_dir.join("typical-client.lua");
    let lua = format!(
        r#"-- Heartbeats as a typical agent client sends them (attune-bench).
wrk.method = "POST"
wrk.body = '{{"status":"running","progress":0.5,"current_task":"summarize","display_name":"Summarizer","metadata":{{"model":"claude","team":"docs","version":3}}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["Authorization"] = "Bearer {secret}"
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/v1/agents/agent-" .. (counter % 1000) .. "/heartbeats")
end
"#
    );
    std::fs::write(&script, lua).map_err(|e| format!("cannot write the wrk script: {e}"))?;
    Ok((script, keys_file))
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

    // Everything this scenario starts lives until it ends: the gateway, and
    // the service on the memory engine and without heartbeat events.
    let mut children = Vec::new();
    let gateway = match (&ctx.gateway_url, &ctx.launch, &ctx.redis_url) {
        (Some(url), ..) => Some((url.clone(), None)),
        (None, Some(launch), Some(redis_url)) => match &launch.gateway_bin {
            Some(bin) => {
                let child = launch.spawner.gateway(bin, redis_url).await?;
                let gateway = (child.url.clone(), Some(child.pid()));
                children.push(child);
                Some(gateway)
            }
            None => None,
        },
        _ => None,
    };
    let mut variants = Vec::new();
    if let Some(launch) = &ctx.launch {
        let bin = launch.service_bin.clone();
        let child = launch
            .spawner
            .service("service-memory", &bin, None, "bench", &[])
            .await?;
        variants.push((
            "memory",
            Contestant::new(child.url.clone(), Some(child.pid())),
        ));
        children.push(child);
        if let Some(redis_url) = &ctx.redis_url {
            let child = launch
                .spawner
                .service(
                    "service-no-heartbeat-events",
                    &bin,
                    Some(redis_url),
                    "bench-nohb",
                    &["--no-heartbeat-events"],
                )
                .await?;
            variants.push((
                "redis, --no-heartbeat-events",
                Contestant::new(child.url.clone(), Some(child.pid())),
            ));
            children.push(child);
            let (script, keys_file) = typical_client(launch)?;
            let keys_file = keys_file.to_string_lossy().into_owned();
            let child = launch
                .spawner
                .service(
                    "service-typical-client",
                    &bin,
                    Some(redis_url),
                    "bench-tc",
                    &["--keys-file", &keys_file],
                )
                .await?;
            variants.push((
                TYPICAL_CLIENT,
                Contestant {
                    script: Some(script),
                    about: Some(format!(
                        "its own wrk script: gzip accepted, metadata and display_name on every \
                         beat, a key among {TYPICAL_CLIENT_KEYS}"
                    )),
                    ..Contestant::new(child.url.clone(), Some(child.pid()))
                },
            ));
            children.push(child);
        }
    }

    let main = Contestant::new(ctx.service.clone(), ctx.service_pid);
    let contestants: Vec<Contestant> = gateway
        .iter()
        .map(|(url, pid)| Contestant::new(url.clone(), *pid))
        .chain(std::iter::once(main))
        .chain(variants.iter().map(|(_, c)| c.clone()))
        .collect();
    let mut measured = measure_in_turns(ctx, &contestants).await?.into_iter();
    let gateway_measured = match gateway {
        Some(_) => measured.next(),
        None => None,
    };
    let Some(main) = measured.next() else {
        return Err("the service was not measured".into());
    };

    match &gateway_measured {
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
    record(
        ctx,
        redis_engine,
        &main,
        gateway_measured.as_ref(),
        true,
        None,
    );
    if variants.is_empty() {
        ctx.report.unavailable(
            1,
            "heartbeats/s, service (memory)",
            "the service was given by URL",
        );
    }
    for ((name, c), m) in variants.iter().zip(measured) {
        let targets = *name == "memory";
        let about = c.about.as_deref();
        record(ctx, name, &m, gateway_measured.as_ref(), targets, about);
    }

    let service = ctx.service.clone();
    let plain = measure_with(
        ctx,
        None,
        &format!("{service}/healthz"),
        ctx.service_pid,
        PLAIN_DURATION,
    )
    .await?;
    record_plain(ctx, "GET /healthz, service", &plain);
    if let Some((url, pid)) = &gateway {
        let hello = measure_with(ctx, None, &format!("{url}/hello"), *pid, PLAIN_DURATION).await?;
        record_plain(ctx, "GET /hello, gateway", &hello);
    }
    drop(children);
    Ok(())
}

/// Rate, p99 and ratio to the gateway of one service configuration;
/// `about` says how it was driven, when not by the gateway's script.
fn record(
    ctx: &mut Ctx<'_>,
    engine: &str,
    m: &Measured,
    gateway: Option<&Measured>,
    targets: bool,
    about: Option<&str>,
) {
    ctx.report
        .add(
            1,
            format!("heartbeats/s, service ({engine})"),
            m.wrk.requests_per_sec,
            "req/s",
            None,
        )
        .note = match about {
        Some(about) => format!("{about}; {}", m.note()),
        None => m.note(),
    };
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
