//! Command line and configuration.
//!
//! Every setting is a flag with an `ATTUNE_*` environment variable, listed
//! with its default in `--help`. [`ServeArgs::into_config`] checks them all
//! and turns the first problem into a one-line reason, so a bad deployment
//! stops at start-up instead of failing on its first request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::Role;
use crate::cli::ClientCommand;

/// The longest any retention period may be, in days.
const MAX_RETENTION_DAYS: u64 = 3650;

#[derive(Debug, Parser)]
#[command(
    name = "attune-telemetry",
    version,
    about = "Telemetry and coordination for multi-agent AI systems: heartbeats, signals, \
             approvals, usage and a live event stream over HTTP and WebSocket.",
    long_about = None,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, `serve` runs with these flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing the server's flags would buy nothing"
)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeArgs),
    /// Apply pending keyspace migrations to Redis and exit.
    Migrate(MigrateArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the OpenAPI document.
    Openapi,
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a fresh random secret once, and the `[[keys]]` entry to paste
    /// into the keys file.
    New {
        /// Key name: recorded as event source and approval responder.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Agent-id glob patterns an agent key may act as (repeat or
        /// comma-separate); absent means any agent id.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where Redis is, for `serve` and `migrate`.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL (`redis://host:port/db`); `REDIS_URL` is honoured too.
    /// Without it `serve` uses the embedded memory engine, and `migrate`
    /// refuses to run.
    #[arg(long, env = "ATTUNE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (also the Cluster hash tag).
    #[arg(long, env = "ATTUNE_KEY_PREFIX", default_value = "attune")]
    pub key_prefix: String,
    /// Bound on every Redis call, connecting included (milliseconds).
    #[arg(long, env = "ATTUNE_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,
}

/// Refuses 0 for the setting `--name`.
fn positive(name: &str, v: u64) -> Result<u64, String> {
    if v == 0 {
        Err(format!("--{name} must be greater than 0"))
    } else {
        Ok(v)
    }
}

/// Refuses a value of `--name` over `max` (`what` says how much that is).
fn at_most(name: &str, v: u64, max: u64, what: &str) -> Result<(), String> {
    if v > max {
        Err(format!("--{name} must be at most {max} ({what})"))
    } else {
        Ok(())
    }
}

impl RedisArgs {
    /// Refuses a prefix that is not a key-safe name (it is the Cluster hash
    /// tag: `{x y}z}` would tag `x y`) and a timeout outside 1 ms to a
    /// minute; `serve` and `migrate` alike.
    pub fn check(&self) -> Result<(), String> {
        crate::types::Id::new(self.key_prefix.clone()).map_err(|e| format!("--key-prefix {e}"))?;
        positive("redis-timeout-ms", self.redis_timeout_ms)?;
        at_most(
            "redis-timeout-ms",
            self.redis_timeout_ms,
            60_000,
            "a minute",
        )
    }

    /// The Redis URL from the flag, `ATTUNE_REDIS_URL` or `REDIS_URL`.
    pub fn url(&self) -> Option<String> {
        let given = |url: String| (!url.trim().is_empty()).then_some(url);
        // An empty flag or `ATTUNE_REDIS_URL` (a template left blank) does
        // not hide `REDIS_URL`.
        self.redis_url
            .clone()
            .and_then(given)
            .or_else(|| std::env::var("REDIS_URL").ok().and_then(given))
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ATTUNE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// TOML file of API keys. Without it every request is an anonymous
    /// admin, which is allowed only on a loopback address.
    #[arg(long, env = "ATTUNE_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Allow anonymous access on a non-loopback address.
    #[arg(long, env = "ATTUNE_INSECURE_ALLOW_ANONYMOUS", value_parser = BoolishValueParser::new())]
    pub insecure_allow_anonymous: bool,
    /// Comma-separated origins allowed for CORS and WebSocket `Origin`
    /// (`*` for any). Empty: no CORS; WebSockets from any origin with a
    /// keys file, only from the service's own without one.
    #[arg(long, env = "ATTUNE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Log format.
    #[arg(long, env = "ATTUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `attune_telemetry=debug`, …).
    #[arg(long, env = "ATTUNE_LOG", default_value = "info", value_parser = log_filter)]
    pub log: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "ATTUNE_BODY_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Time limit of a request, not counting a requested long-poll wait.
    #[arg(long, env = "ATTUNE_REQUEST_TIMEOUT_SECONDS", default_value_t = 10)]
    pub request_timeout_seconds: u64,
    /// How long in-flight requests may take to finish at shutdown.
    #[arg(long, env = "ATTUNE_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// How long a connection may take to send a request's head, counted
    /// from when the server is ready to read it (an idle kept-alive
    /// connection too): a client that stalls is disconnected.
    #[arg(long, env = "ATTUNE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 60)]
    pub header_read_timeout_seconds: u64,
    /// Maximum length of the event log (older events are trimmed).
    #[arg(long, env = "ATTUNE_STREAM_MAX_LEN", default_value_t = 100_000)]
    pub stream_max_len: usize,
    /// Events a live subscriber may fall behind before it is disconnected
    /// (it can resume with `since`). One buffer shared by every subscriber,
    /// allocated at start: about 50 bytes per event (at most 1048576).
    #[arg(long, env = "ATTUNE_SUBSCRIBER_BUFFER", default_value_t = 8192)]
    pub subscriber_buffer: usize,
    /// Under sustained traffic a WebSocket is written at most once per this
    /// many milliseconds; frames arriving sooner go out together. The first
    /// frame after a quiet spell is written at once. 0: every frame at once.
    #[arg(long, env = "ATTUNE_WS_WRITE_INTERVAL_MS", default_value_t = 20)]
    pub ws_write_interval_ms: u64,
    /// Do not write an `agent.heartbeat` event for every beat.
    #[arg(long, env = "ATTUNE_NO_HEARTBEAT_EVENTS", value_parser = BoolishValueParser::new())]
    pub no_heartbeat_events: bool,
    /// How long an agent record is kept after its last beat.
    #[arg(long, env = "ATTUNE_AGENT_RETENTION_SECONDS", default_value_t = 86_400)]
    pub agent_retention_seconds: u64,
    /// Grace after `ttl_seconds` before a silent agent is `down`
    /// (default: the agent's own ttl).
    #[arg(long, env = "ATTUNE_DOWN_GRACE_SECONDS")]
    pub down_grace_seconds: Option<u64>,
    /// How long decided approvals are kept.
    #[arg(long, env = "ATTUNE_APPROVAL_RETENTION_SECONDS", default_value_t = 7 * 86_400)]
    pub approval_retention_seconds: u64,
    /// How long usage records are kept.
    #[arg(long, env = "ATTUNE_USAGE_RETENTION_DAYS", default_value_t = 90)]
    pub usage_retention_days: u64,
    /// TOML price table replacing the built-in one.
    #[arg(long, env = "ATTUNE_PRICES_FILE")]
    pub prices_file: Option<PathBuf>,
    /// How often the sweepers look for agents going down and approvals
    /// timing out (milliseconds).
    #[arg(long, env = "ATTUNE_SWEEP_INTERVAL_MS", default_value_t = 200)]
    pub sweep_interval_ms: u64,
}

/// Validated settings of a running server.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub redis_timeout: Duration,
    pub keys_file: Option<PathBuf>,
    pub insecure_allow_anonymous: bool,
    pub allowed_origins: Vec<String>,
    pub log_format: LogFormat,
    pub log: String,
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `--header-read-timeout-seconds`.
    pub header_read_timeout: Duration,
    pub stream_max_len: usize,
    pub subscriber_buffer: usize,
    pub ws_write_interval: Duration,
    pub heartbeat_events: bool,
    pub agent_retention: Duration,
    pub down_grace: Option<Duration>,
    pub approval_retention: Duration,
    pub usage_retention_days: u64,
    pub prices_file: Option<PathBuf>,
    pub sweep_interval: Duration,
}

impl ServeArgs {
    /// Checks every setting; the error is a one-line reason.
    pub fn into_config(self) -> Result<Config, String> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "--listen {:?} is not an address like 127.0.0.1:8080",
                self.listen
            )
        })?;
        let redis_url = self.redis.url();
        if let Some(url) = &redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("--redis-url is not a valid Redis URL: {e}"))?;
        }
        self.redis.check()?;
        positive("request-timeout-seconds", self.request_timeout_seconds)?;
        positive(
            "header-read-timeout-seconds",
            self.header_read_timeout_seconds,
        )?;
        positive("agent-retention-seconds", self.agent_retention_seconds)?;
        positive(
            "approval-retention-seconds",
            self.approval_retention_seconds,
        )?;
        positive("usage-retention-days", self.usage_retention_days)?;
        positive("sweep-interval-ms", self.sweep_interval_ms)?;
        positive("stream-max-len", self.stream_max_len as u64)?;
        positive("subscriber-buffer", self.subscriber_buffer as u64)?;
        if self.body_limit_bytes < 1024 {
            return Err("--body-limit-bytes must be at least 1024".into());
        }
        // Bounds far past any sensible setting, short of values that would
        // overflow the time arithmetic, be refused by Redis, or allocate
        // gigabytes up front.
        at_most(
            "request-timeout-seconds",
            self.request_timeout_seconds,
            86_400,
            "a day",
        )?;
        at_most(
            "shutdown-grace-seconds",
            self.shutdown_grace_seconds,
            86_400,
            "a day",
        )?;
        at_most(
            "header-read-timeout-seconds",
            self.header_read_timeout_seconds,
            3_600,
            "an hour",
        )?;
        at_most(
            "sweep-interval-ms",
            self.sweep_interval_ms,
            60_000,
            "a minute",
        )?;
        at_most(
            "ws-write-interval-ms",
            self.ws_write_interval_ms,
            10_000,
            "ten seconds",
        )?;
        at_most(
            "body-limit-bytes",
            self.body_limit_bytes as u64,
            1 << 30,
            "1 GiB",
        )?;
        at_most(
            "stream-max-len",
            self.stream_max_len as u64,
            1_000_000_000,
            "a billion events",
        )?;
        at_most(
            "subscriber-buffer",
            self.subscriber_buffer as u64,
            1 << 20,
            "its slots are allocated at start",
        )?;
        if self.down_grace_seconds.is_some_and(|g| g > 3600) {
            // Like a ttl: ttl + grace must stay within the retention below.
            return Err("--down-grace-seconds must be at most 3600".into());
        }
        // Ten years: far beyond any use, and well within what the engines'
        // millisecond arithmetic and chrono's durations hold.
        let max_seconds = MAX_RETENTION_DAYS * 86_400;
        at_most(
            "agent-retention-seconds",
            self.agent_retention_seconds,
            max_seconds,
            "ten years",
        )?;
        at_most(
            "approval-retention-seconds",
            self.approval_retention_seconds,
            max_seconds,
            "ten years",
        )?;
        at_most(
            "usage-retention-days",
            self.usage_retention_days,
            MAX_RETENTION_DAYS,
            "ten years",
        )?;
        if self.agent_retention_seconds < 3600 * 2 {
            // A record must outlive ttl + grace (at most 2 h) to ever be `down`.
            return Err("--agent-retention-seconds must be at least 7200".into());
        }
        let allowed_origins = self
            .allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .map(origin)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(path) = &self.keys_file {
            if !path.is_file() {
                return Err(format!(
                    "--keys-file {} {}",
                    path.display(),
                    not_a_file(path)
                ));
            }
        }
        if let Some(path) = &self.prices_file {
            if !path.is_file() {
                return Err(format!(
                    "--prices-file {} {}",
                    path.display(),
                    not_a_file(path)
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| format!("--log {:?} is not a valid filter: {e}", self.log))?;
        Ok(Config {
            listen,
            redis_url,
            key_prefix: self.redis.key_prefix,
            redis_timeout: Duration::from_millis(self.redis.redis_timeout_ms),
            keys_file: self.keys_file,
            insecure_allow_anonymous: self.insecure_allow_anonymous,
            allowed_origins,
            log_format: self.log_format,
            log: self.log,
            body_limit_bytes: self.body_limit_bytes,
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds),
            stream_max_len: self.stream_max_len,
            subscriber_buffer: self.subscriber_buffer,
            ws_write_interval: Duration::from_millis(self.ws_write_interval_ms),
            heartbeat_events: !self.no_heartbeat_events,
            agent_retention: Duration::from_secs(self.agent_retention_seconds),
            down_grace: self.down_grace_seconds.map(Duration::from_secs),
            approval_retention: Duration::from_secs(self.approval_retention_seconds),
            usage_retention_days: self.usage_retention_days,
            prices_file: self.prices_file,
            sweep_interval: Duration::from_millis(self.sweep_interval_ms),
        })
    }
}

impl Config {
    /// Defaults for tests and embedding: memory engine, loopback, no keys.
    pub fn for_tests() -> Self {
        ServeArgs::parse_from(["serve"])
            .into_config()
            .expect("defaults are valid")
    }
}

/// Why `path`, which is not a readable file, cannot be used.
fn not_a_file(path: &std::path::Path) -> &'static str {
    if path.exists() {
        "is not a file"
    } else {
        "does not exist"
    }
}

/// A TOML file's error in one line, with where it is: `line N: message`
/// (the parser's own text spreads over several lines, quoting the file).
pub fn toml_error(text: &str, err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => {
            let line = 1 + text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            format!("line {line}: {}", err.message())
        }
        None => err.message().to_owned(),
    }
}

/// An `--allowed-origins` entry as browsers send an `Origin`: `*`, or
/// `scheme://host[:port]` in lower case with no path (a trailing `/` is
/// dropped), so that `https://Dash.example.com/` matches what a browser
/// sends instead of never matching.
fn origin(entry: &str) -> Result<String, String> {
    if entry == "*" {
        return Ok(entry.to_owned());
    }
    let lower = entry.to_ascii_lowercase();
    let bare = lower.strip_suffix('/').unwrap_or(&lower);
    let valid = bare.split_once("://").is_some_and(|(scheme, host)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"/?#@*\\".contains(&b))
            && valid_port(host)
    });
    if valid {
        // Browsers leave a scheme's default port out of `Origin`.
        let bare = [("https://", ":443"), ("http://", ":80")]
            .iter()
            .find(|(scheme, port)| bare.starts_with(scheme) && bare.ends_with(port))
            .map_or(bare, |(_, port)| &bare[..bare.len() - port.len()]);
        Ok(bare.to_owned())
    } else {
        Err(format!(
            "--allowed-origins entry {entry:?} is not an origin: `*` or \
             scheme://host[:port], such as https://dash.example.com"
        ))
    }
}

/// Whether an origin's `host[:port]` has, if any, a port as browsers write
/// it: 1–65535, no leading zero (`[v6]:port` for IPv6).
fn valid_port(host: &str) -> bool {
    let after_host = host.rfind(']').map_or(host, |end| &host[end + 1..]);
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => !port.starts_with('0') && port.parse::<u16>().is_ok_and(|p| p > 0),
    }
}

impl ServeArgs {
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Wrapper::parse_from(args).serve
    }
}

/// `--log`: a filter the logger takes. A blank one would turn every log
/// line off (the anonymous-access warning too), and one it cannot read
/// would be replaced by its default: both are refused at start.
fn log_filter(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("must name a filter, such as `info` or `attune_telemetry=debug`".into());
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("not a log filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_or_unreadable_log_filter_is_refused() {
        for bad in ["", "  ", "foo=bar"] {
            assert!(log_filter(bad).is_err(), "{bad:?}");
        }
        for good in ["info", "attune_telemetry=debug,tower_http=warn"] {
            assert_eq!(log_filter(good).as_deref(), Ok(good));
        }
    }

    #[test]
    fn retention_periods_over_ten_years_are_refused() {
        let config = |flag: &'static str, value: &'static str| {
            ServeArgs::parse_from(["serve", flag, value]).into_config()
        };
        assert!(config("--usage-retention-days", "3650").is_ok());
        let err = config("--usage-retention-days", "3651").unwrap_err();
        assert!(err.contains("--usage-retention-days"), "{err}");
        for flag in ["--agent-retention-seconds", "--approval-retention-seconds"] {
            assert!(config(flag, "315360000").is_ok());
            let err = config(flag, "315360001").unwrap_err();
            assert!(err.contains(&flag[2..]), "{err}");
        }
    }

    /// Values that passed before and then overflowed a duration (a
    /// panicking request), were refused by Redis on every write, or
    /// allocated gigabytes before the port opened.
    #[test]
    fn absurd_sizes_and_intervals_stop_start_up() {
        let config = |flag: &'static str, value: &'static str| {
            ServeArgs::parse_from(["serve", flag, value]).into_config()
        };
        for (flag, max, over) in [
            ("--redis-timeout-ms", "60000", "60001"),
            ("--request-timeout-seconds", "86400", "18446744073709551615"),
            ("--shutdown-grace-seconds", "86400", "86401"),
            ("--sweep-interval-ms", "60000", "18446744073709551615"),
            ("--ws-write-interval-ms", "10000", "10001"),
            ("--body-limit-bytes", "1073741824", "1073741825"),
            ("--stream-max-len", "1000000000", "18446744073709551615"),
            ("--subscriber-buffer", "1048576", "1000000000"),
        ] {
            assert!(config(flag, max).is_ok(), "{flag} {max}");
            let err = config(flag, over).unwrap_err();
            assert!(
                err.starts_with(&format!("{flag} must be at most {max}")),
                "{err}"
            );
        }
    }

    #[test]
    fn allowed_origins_are_written_as_browsers_send_them() {
        let origins = |value: &'static str| {
            ServeArgs::parse_from(["serve", "--allowed-origins", value])
                .into_config()
                .map(|c| c.allowed_origins)
        };
        assert_eq!(
            origins("https://dash.example.com/, HTTPS://Other.Example.com:8443,*").unwrap(),
            [
                "https://dash.example.com",
                "https://other.example.com:8443",
                "*"
            ]
        );
        assert_eq!(
            origins("http://[::1]:3000,tauri://localhost").unwrap(),
            ["http://[::1]:3000", "tauri://localhost"]
        );
        assert_eq!(
            origins("https://x.example.com:443,http://y.example.com:80,http://z:8080").unwrap(),
            [
                "https://x.example.com",
                "http://y.example.com",
                "http://z:8080"
            ]
        );
        for bad in [
            "notaurl",
            "https://x.example.com/app",
            "https://",
            "null",
            "http://d.example.com:99999",
            "http://a.example.com:0",
            "http://e.example.com:",
            "http://g.example.com:080",
            "http://*.f.example.com",
        ] {
            let err = origins(bad).unwrap_err();
            assert!(err.contains("is not an origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_directory_given_as_a_file_is_named_as_such() {
        let dir = std::env::temp_dir().display().to_string().leak() as &'static str;
        for flag in ["--keys-file", "--prices-file"] {
            let err = ServeArgs::parse_from(["serve", flag, dir])
                .into_config()
                .unwrap_err();
            assert!(err.ends_with("is not a file"), "{err}");
        }
    }

    #[test]
    fn a_down_grace_over_an_hour_is_refused() {
        let grace = |g: &'static str| {
            ServeArgs::parse_from(["serve", "--down-grace-seconds", g]).into_config()
        };
        assert!(grace("3600").is_ok());
        assert!(grace("3601").unwrap_err().contains("--down-grace-seconds"));
    }
}
