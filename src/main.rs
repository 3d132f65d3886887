//! The `attune-telemetry` binary: the server and its command-line client.

use std::process::ExitCode;

// mimalloc: the service allocates many small, short-lived buffers per
// request across threads; it measurably beats the system allocator here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use attune_telemetry::config::{Cli, Command, KeysCommand, LogFormat, ServeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            attune_telemetry::cli::report(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::Migrate(args)) => runtime.block_on(migrate(args)),
        Some(Command::Keys(KeysCommand::New { name, role, agents })) => {
            let (secret, entry) = attune_telemetry::auth::new_key(&name, role, &agents);
            // The entry must load as the server will load it.
            attune_telemetry::auth::KeyRing::parse(&entry)
                .and_then(|_| nowhere("standard error", "entry", &std::io::stderr()))
                .and_then(|()| nowhere("standard output", "secret", &std::io::stdout()))
                .and_then(|()| {
                use std::io::Write;
                // Standard error is only TOML (comments and the entry), so
                // `keys new … 2>> keys.toml` appends a loadable entry. It is
                // written first: if it cannot be, no secret is handed out
                // that nobody could install.
                let mut stderr = std::io::stderr().lock();
                write!(
                    stderr,
                    "# The secret, shown once, is on standard output: give it to the key's holder.\n\
                     # Add this entry to the keys file:\n{entry}"
                )
                .and_then(|()| stderr.flush())
                .map_err(|e| format!("cannot write the entry to standard error: {e}"))?;
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{secret}")
                    .and_then(|()| stdout.flush())
                    .map_err(|e| format!("cannot write the secret to standard output: {e}"))
            })
        }
        Some(Command::Client(command)) => runtime.block_on(attune_telemetry::cli::run(command)),
        Some(Command::Openapi) => {
            let doc = attune_telemetry::app::openapi();
            match doc.to_pretty_json() {
                Ok(json) => {
                    attune_telemetry::cli::out(format_args!("{json}"));
                    Ok(())
                }
                Err(e) => Err(format!("cannot render the OpenAPI document: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            attune_telemetry::cli::report(format_args!("{reason}"));
            ExitCode::FAILURE
        }
    }
}

/// Refuses to hand a key's `part` to a stream that goes nowhere: one that
/// was closed when the command started (the process then finds
/// `/dev/null` in its place, and writes there succeed) or `/dev/null`
/// itself. Half a key is no key: an entry whose secret nobody has, or a
/// secret no keys file knows.
fn nowhere(stream: &str, part: &str, fd: &impl std::os::fd::AsFd) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return Ok(());
    };
    let is_null =
        |meta: &std::fs::Metadata| meta.file_type().is_char_device() && meta.rdev() == null.rdev();
    let target = fd
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|file| file.metadata());
    match target {
        Ok(meta) if is_null(&meta) => Err(format!(
            "{stream} is closed or /dev/null: the key's {part} would be lost, so none was made"
        )),
        _ => Ok(()),
    }
}

/// Logs to standard output (`serve`: a service's log stream), or to
/// standard error for a command whose output is its result (`migrate`).
fn init_logging(format: LogFormat, filter: &str, to_stderr: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in a file or a pipe.
    let (writer, terminal) = if to_stderr {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        )
    } else {
        (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        )
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(terminal);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // First of all: a hang-up while Redis is awaited must not end the process.
    let shutdown = shutdown_signal();
    let config = args.into_config()?;
    init_logging(config.log_format, &config.log, false);
    let listen = config.listen;
    // Build first: a configuration the server would refuse (anonymous
    // access off loopback, unreachable Redis) fails before the port opens.
    let app = attune_telemetry::app::build(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // The port bound, when `--listen` asked for any (`:0`).
    let address = listener.local_addr().unwrap_or(listen);
    tracing::info!(
        address = %address,
        engine = app.state.engine.name(),
        "attune-telemetry listening"
    );
    attune_telemetry::app::serve(app, listener, shutdown).await
}

async fn migrate(args: attune_telemetry::config::MigrateArgs) -> Result<(), String> {
    init_logging(LogFormat::Text, "info", true);
    args.redis.check()?;
    let url = args
        .redis
        .url()
        .ok_or("migrate needs --redis-url (or ATTUNE_REDIS_URL / REDIS_URL)")?;
    let timeout = std::time::Duration::from_millis(args.redis.redis_timeout_ms);
    let engine = attune_telemetry::engine::redis::RedisEngine::connect(
        &url,
        &args.redis.key_prefix,
        timeout,
        1,
    )
    .await
    .map_err(|e| format!("cannot reach Redis: {e}"))?;
    let applied = attune_telemetry::migrate::run(&engine)
        .await
        .map_err(|e| format!("migration failed: {e}"))?;
    if applied.is_empty() {
        attune_telemetry::cli::out(format_args!("keyspace is up to date"));
    } else {
        attune_telemetry::cli::out(format_args!("applied: {}", applied.join(", ")));
    }
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C. SIGHUP (a closed terminal session, or
/// an operator expecting a reload) is logged and ignored: every setting and
/// the keys file are read once, at start. Its handler is installed when
/// this is called, before the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        shutdown_on(
            #[cfg(unix)]
            hangups,
        )
        .await
    }
}

async fn shutdown_on(#[cfg(unix)] hangups: std::io::Result<tokio::signal::unix::Signal>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(unix)]
    let hangup = async {
        if let Ok(mut hangups) = hangups {
            while hangups.recv().await.is_some() {
                tracing::warn!(
                    "SIGHUP ignored: settings and the keys file are read at start; \
                     restart to change them"
                );
            }
        }
        std::future::pending::<()>().await
    };
    #[cfg(not(unix))]
    let (term, hangup) = (std::future::pending::<()>(), std::future::pending::<()>());
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
        _ = hangup => {}
    }
}
