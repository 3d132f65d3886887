//! `attune-bench`: measures attune-telemetry against its performance
//! targets and prints one table (and optionally a JSON file) that can be
//! pasted as it is.
//!
//! Unless URLs are given, a run builds and starts what it needs itself — a
//! private `redis-server`, the service in release mode, and the reference
//! gateway for scenario 1 — and kills all of it at the end, on error and on
//! Ctrl-C too (every child is a guard that kills on drop). The load
//! generator, the service and Redis share the machine's cores; the header
//! says how many there are.

mod procs;
mod report;
mod scenarios;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser;

use crate::procs::Spawner;
use crate::report::Report;
use crate::scenarios::{BENCH_CLIENT_NAME, Ctx, Launch};

#[derive(Debug, Parser)]
#[command(
    name = "attune-bench",
    about = "Load benchmark of attune-telemetry: heartbeat ingest, agent queries, \
             long-poll wake-ups, WebSocket fan-out, usage ingest, Redis connections and memory."
)]
struct Args {
    /// Service to measure; without it the run builds and starts one
    /// (Redis engine).
    #[arg(long)]
    service_url: Option<String>,
    /// Reference gateway; without it the run builds and starts one from
    /// --gateway-dir.
    #[arg(long)]
    gateway_url: Option<String>,
    /// Redis the service uses (for CLIENT LIST); without it, and without
    /// --service-url, the run starts a private redis-server.
    #[arg(long)]
    redis_url: Option<String>,
    /// Directory of the reference gateway (and its `heartbeat.lua`);
    /// default `../shared/anchors/minimal-gateway` from the repository root.
    #[arg(long)]
    gateway_dir: Option<PathBuf>,
    /// Scenarios to run (8 and 9 are sampled during the others).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8,9")]
    scenarios: Vec<u8>,
    /// Also write every figure to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Use the binaries already built instead of running cargo.
    #[arg(long)]
    no_build: bool,
}

/// The repository root: this crate lives in `<root>/bench`.
fn repo_root() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Output of a command, trimmed, or `?`.
fn command_line(program: &str, args: &[&str], dir: &Path) -> String {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn header(report: &mut Report, root: &Path, fd_limit: u64) {
    let mut commit = command_line("git", &["rev-parse", "--short", "HEAD"], root);
    let status = command_line("git", &["status", "--porcelain"], root);
    if !status.is_empty() && status != "?" {
        commit.push_str(" (with uncommitted changes)");
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.header = vec![
        (
            "date".into(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        ),
        ("machine".into(), command_line("uname", &["-srm"], root)),
        (
            "cpus".into(),
            format!("{cpus} (shared by the load generator, the service and Redis)"),
        ),
        ("commit".into(), commit),
        ("fd limit".into(), fd_limit.to_string()),
    ];
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let root = repo_root();
    let fd_limit = procs::raise_fd_limit();
    let mut report = Report::default();
    header(&mut report, &root, fd_limit);
    report.print_header();

    let outcome = tokio::select! {
        r = run(&args, &root, &mut report) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    // Every process the run started has been killed by now.

    println!();
    report.print_table();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, root: &Path, report: &mut Report) -> Result<(), String> {
    let want = |n: u8| args.scenarios.contains(&n);
    let target = target_dir(root);
    let gateway_dir = args
        .gateway_dir
        .clone()
        .unwrap_or_else(|| root.join("../shared/anchors/minimal-gateway"));
    let start_service = args.service_url.is_none();
    let start_gateway = want(1) && args.gateway_url.is_none() && gateway_dir.is_dir();

    if !args.no_build {
        if start_service {
            procs::build(
                "the service",
                Command::new("cargo")
                    .args(["build", "--release", "--bin", "attune-telemetry"])
                    .current_dir(root),
            )?;
        }
        if start_gateway {
            procs::build(
                "the reference gateway",
                Command::new("cargo")
                    .args(["build", "--release", "--manifest-path"])
                    .arg(gateway_dir.join("Cargo.toml"))
                    .arg("--target-dir")
                    .arg(target.join("anchor"))
                    .current_dir(root),
            )?;
        }
    }

    let log_dir = target.join("attune-bench");
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    // Only this run's logs, so that the panic check below reads nothing old.
    for entry in std::fs::read_dir(&log_dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let spawner = Spawner {
        log_dir: log_dir.clone(),
    };
    let mut children = Vec::new();

    let redis_url = match &args.redis_url {
        Some(url) => Some(url.clone()),
        None if start_service => {
            let redis = spawner.redis().await?;
            let url = redis.url.clone();
            children.push(redis);
            Some(url)
        }
        None => None,
    };
    let redis_pid = children.first().map(procs::Child::pid);
    let redis = match &redis_url {
        Some(url) => {
            let client =
                redis::Client::open(url.as_str()).map_err(|e| format!("Redis {url}: {e}"))?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("Redis {url}: {e}"))?;
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(BENCH_CLIENT_NAME)
                .exec_async(&mut conn)
                .await
                .map_err(|e| format!("Redis {url}: {e}"))?;
            Some(conn)
        }
        None => None,
    };

    let service_bin = target.join("release/attune-telemetry");
    let (service, service_pid) = match &args.service_url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let child = spawner
                .service("service", &service_bin, redis_url.as_deref(), "bench", &[])
                .await?;
            let started = (child.url.clone(), Some(child.pid()));
            children.push(child);
            started
        }
    };
    let gateway_bin = target.join("anchor/release/minimal-gateway");
    let launch = start_service.then(|| Launch {
        spawner,
        service_bin,
        gateway_bin: (start_gateway && gateway_bin.is_file()).then_some(gateway_bin),
    });

    let mut ctx = Ctx {
        report,
        http: scenarios::http_client(),
        service,
        service_pid,
        redis_url,
        redis,
        redis_pid,
        gateway_url: args.gateway_url.clone(),
        gateway_dir,
        launch,
        idle_clients: None,
        children,
    };
    ctx.report.note(
        "wrk, the bench's own clients and its WebSocket subscribers run on the same cores \
         as the service and Redis: every figure includes that contention.",
    );
    eprintln!(
        "service {} · logs of started processes in {}",
        ctx.service,
        log_dir.display()
    );

    // Idle baselines: scenario 8 (Redis connections) and 9 (RSS).
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.idle_clients = ctx.service_redis_clients().await;
    match ctx.idle_clients {
        Some(n) => {
            ctx.report
                .add(8, "Redis connections at idle", n as f64, "", None)
                .note = "CLIENT LIST, less the bench's own connection".into();
        }
        None => ctx
            .report
            .unavailable(8, "Redis connections at idle", "no Redis to ask"),
    }
    record_rss(&mut ctx, "at start (idle)");

    type Scenario = for<'a, 'b> fn(
        &'a mut Ctx<'b>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), String>> + 'a>,
    >;
    let scenarios: [(u8, &str, Scenario); 7] = [
        (1, "heartbeat ingest", |c| {
            Box::pin(scenarios::heartbeat::run(c))
        }),
        (2, "stale and state queries", |c| {
            Box::pin(scenarios::agents::run(c))
        }),
        (3, "signal → waiter", |c| {
            Box::pin(scenarios::waits::signals(c))
        }),
        (4, "decision → waiter", |c| {
            Box::pin(scenarios::waits::approvals(c))
        }),
        (5, "WebSocket fan-out", |c| {
            Box::pin(scenarios::events::fan_out(c))
        }),
        (6, "idle WebSockets", |c| {
            Box::pin(scenarios::events::idle(c))
        }),
        (7, "usage ingest", |c| Box::pin(scenarios::usage::run(c))),
    ];
    for (n, name, scenario) in scenarios {
        if !want(n) {
            continue;
        }
        eprintln!("scenario {n}: {name} …");
        if let Err(e) = scenario(&mut ctx).await {
            eprintln!("scenario {n} failed: {e}");
            ctx.report
                .unavailable(n, format!("{name}: failed"), e.replace('\n', " "));
        }
        record_rss(&mut ctx, &format!("after scenario {n}"));
    }
    report_panics(&mut ctx, &log_dir);
    Ok(())
}

/// A panic in a started process is a finding in itself, and a symbolized
/// backtrace (`RUST_BACKTRACE`) also inflates that process's RSS.
fn report_panics(ctx: &mut Ctx<'_>, log_dir: &Path) {
    for entry in std::fs::read_dir(log_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let panics =
            std::fs::read_to_string(&path).map_or(0, |text| text.matches("panicked at").count());
        if panics > 0 {
            ctx.report
                .note(format!("{} holds {panics} panic(s)", path.display()));
        }
    }
}

/// Scenario 9: the service's resident memory now.
fn record_rss(ctx: &mut Ctx<'_>, when: &str) {
    let name = format!("service RSS {when}");
    match ctx.service_rss() {
        Some(kib) => {
            ctx.report.add(9, name, kib as f64 / 1024.0, "MiB", None);
        }
        None => ctx
            .report
            .unavailable(9, name, "no service process of this run"),
    }
}
