//! The command-line client: the same binary, talking to a server over HTTP.
//!
//! Every command prints a table for people or, with `--json`, the server's
//! JSON for scripts. Any failure exits non-zero with the server's problem
//! `detail` (or a plain sentence when the server cannot be reached).

mod render;

/// `println!` for command output (see [`out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out(format_args!($($arg)*))
    };
}
pub(crate) use outln;

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use render::short_time;

/// Where the server is and how to present answers; shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the server (`http://host:port`).
    #[arg(
        long,
        env = "ATTUNE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        value_parser = server_url
    )]
    pub url: String,
    /// API key (sent as a bearer token; empty: none).
    #[arg(long, env = "ATTUNE_TOKEN", global = true, hide_env_values = true,
          value_parser = token)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds the server has to answer a request, beyond any wait it asks
    /// the server for (`--wait`); `tail` instead fails after 45 s without a
    /// keep-alive.
    #[arg(
        long,
        env = "ATTUNE_TIMEOUT_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..),
        global = true,
        value_name = "SECONDS"
    )]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Recent LLM calls, newest first, then totals.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        /// How many calls (1–1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=MAX_PAGE_ROWS as i64))]
        limit: u32,
        /// Only calls from the last N days.
        #[arg(long)]
        days: Option<u32>,
    },
    /// What routing and caching saved against an all-premium baseline.
    Savings {
        #[command(flatten)]
        client: ClientArgs,
        /// Over the last N days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Prompt-cache hit rate, reads, writes and savings, overall and per workflow.
    CacheStats {
        #[command(flatten)]
        client: ClientArgs,
        /// Over the last N days.
        #[arg(long, default_value_t = 7)]
        days: u32,
    },
    /// Runs per agent: completed, failed, cancelled, lost, success rate, duration.
    AgentPerformance {
        #[command(flatten)]
        client: ClientArgs,
        /// Runs started in the last N hours.
        #[arg(long, default_value_t = 168)]
        hours: u32,
    },
    /// Agents and their liveness.
    Agents {
        #[command(flatten)]
        client: ClientArgs,
        /// Only non-terminal agents silent for more than N seconds.
        #[arg(long, value_name = "SECONDS", conflicts_with = "state",
              value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
        stale: Option<u64>,
        /// Only agents in this state (up, late, down, finished).
        #[arg(long)]
        state: Option<String>,
        /// Only agents with this status (starting, running, completed,
        /// failed, cancelled).
        #[arg(long, conflicts_with = "stale")]
        status: Option<String>,
        /// Most agents to show (1–10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_ROWS as i64))]
        limit: u32,
    },
    /// List and decide approval requests.
    Approvals {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        action: Option<ApprovalAction>,
    },
    /// Send signals and read inboxes.
    Signals {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        action: SignalAction,
    },
    /// Follow the live event stream.
    Tail {
        #[command(flatten)]
        client: ClientArgs,
        /// Comma-separated types; `prefix.*` matches a prefix.
        #[arg(long)]
        types: Option<String>,
        /// Only events about this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Replay everything after this event id first.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalAction {
    /// Requests, oldest first (default: pending).
    List {
        /// pending, approved, rejected, timeout, cancelled, or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// Only requests of this type.
        #[arg(long = "type")]
        approval_type: Option<String>,
        /// Only requests from this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Most requests to show (1–10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_ROWS as i64))]
        limit: u32,
    },
    /// Approve a request.
    Approve {
        /// The request's id.
        id: String,
        /// Why, for the requesting agent and the record.
        #[arg(long, value_parser = not_blank)]
        reason: Option<String>,
    },
    /// Reject a request.
    Reject {
        /// The request's id.
        id: String,
        /// Why: a rejection must say.
        #[arg(long, value_parser = not_blank)]
        reason: String,
    },
}

/// `--url`: an `http://` URL with a host. The client speaks plain HTTP
/// (put a TLS-terminating proxy's plain side, or a tunnel, in front of it).
fn server_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| format!("not a URL ({e}); give it as http://host:port"))?;
    match url.scheme() {
        "http" if url.has_host() => Ok(text.to_owned()),
        "http" => Err("names no host; give it as http://host:port".into()),
        "https" => Err(
            "https is not spoken by this client: give the server's plain \
                        http:// address (or a tunnel to it)"
                .into(),
        ),
        other => Err(format!("{other}: is not http; give it as http://host:port")),
    }
}

/// `--token`: text a header can carry (visible ASCII); an empty one (an
/// empty `ATTUNE_TOKEN`) is no token.
fn token(text: &str) -> Result<String, String> {
    if text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(text.to_owned())
    } else {
        Err("must be visible ASCII characters only (an API key as `keys new` printed it)".into())
    }
}

/// `--idempotency-key`: what the server takes, 1–255 visible ASCII
/// characters.
fn idempotency_key(text: &str) -> Result<String, String> {
    if crate::extract::is_idempotency_key(text) {
        Ok(text.to_owned())
    } else {
        Err("must be 1 to 255 visible ASCII characters".into())
    }
}

/// A flag's text that says something: not empty, not only spaces.
fn not_blank(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be blank".into())
    } else {
        Ok(text.to_owned())
    }
}

#[derive(Debug, Subcommand)]
pub enum SignalAction {
    /// Send a signal (a broadcast without --to).
    Send {
        /// Signal type, e.g. `task_complete`, `abort`, `ready`.
        #[arg(long = "type")]
        signal_type: String,
        /// The sending agent.
        #[arg(long)]
        from: String,
        /// The receiving agent; omit to broadcast.
        #[arg(long)]
        to: Option<String>,
        /// JSON object payload.
        #[arg(long)]
        payload: Option<String>,
        /// Seconds the signal stays deliverable (server default: 60).
        #[arg(long, value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        ttl: Option<u64>,
    },
    /// Read an agent's inbox.
    Inbox {
        /// The agent whose inbox to read.
        agent: String,
        /// Remove what is returned from the inbox (retried safely, with an
        /// Idempotency-Key, if the answer is lost).
        #[arg(long)]
        consume: bool,
        /// With --consume: the Idempotency-Key to send (default: a new one);
        /// the same key again returns what its first read took.
        #[arg(long, requires = "consume", value_parser = idempotency_key)]
        idempotency_key: Option<String>,
        /// Wait up to N seconds (0–60) for a signal when the inbox is empty.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60))]
        wait: u64,
        /// Only signals of this type.
        #[arg(long = "type")]
        signal_type: Option<String>,
        /// Most signals to show (1–10000) or take (1–1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_ROWS as i64))]
        limit: u32,
    },
}

/// Most pages one listing command reads to fill its `--limit`.
const MAX_PAGES: usize = 100;

/// Most rows the server answers per page.
const MAX_PAGE_ROWS: usize = 1000;

/// Fewest rows a listing command asks for per page while it looks for its
/// rows (see [`Api::page`]).
const LOOKAHEAD: usize = 100;

/// Most rows a listing command shows (`--limit`): it reads them in pages.
const MAX_ROWS: u32 = 10_000;

/// Whether a listing has rows after those shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum More {
    No,
    Yes,
    /// Not found out within [`MAX_PAGES`] pages.
    Unknown,
}

/// How often the client asks for a consuming read whose answer it did not
/// get (waiting 1, 2 and 4 s between: a restart or a failover).
const TAKE_ATTEMPTS: u32 = 4;

/// A thin HTTP client that turns failures into one-line reasons.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// `--timeout`.
    answer_limit: Duration,
}

impl Api {
    fn new(args: &ClientArgs) -> Result<Self, String> {
        // A server that stops answering fails a command instead of hanging
        // it: every request has its own limit (see `request`), and `tail`
        // hears from the server at least every 15 s (keep-alive comments).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot create an HTTP client: {e}"))?;
        Ok(Self {
            http,
            base: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            answer_limit: Duration::from_secs(args.timeout),
        })
    }

    /// A request that must be answered within `--timeout`, plus the
    /// `wait` it asks the server to hold it for.
    fn request(&self, method: Method, path: &str, wait: Duration) -> reqwest::RequestBuilder {
        self.stream_request(method, path)
            .timeout(self.answer_limit + wait)
    }

    /// A request whose answer may last (a stream): only each read is bounded.
    fn stream_request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        self.check(resp).await
    }

    /// The response if it succeeded; otherwise the server's reason, in one line.
    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, String> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let detail = body["detail"].as_str().unwrap_or("").to_owned();
        let fields: Vec<String> = body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["field"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        let mut message = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        if !detail.is_empty() {
            message = format!("{message}: {detail}");
        }
        if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            message.push_str(" (set --token or ATTUNE_TOKEN)");
        }
        if !fields.is_empty() && detail.is_empty() {
            message = format!("{message}: {}", fields.join("; "));
        }
        Err(message)
    }

    /// The error of a request not answered within `--timeout`.
    fn no_answer(&self) -> String {
        format!(
            "the server at {} did not answer in time (--timeout {} s)",
            self.base,
            self.answer_limit.as_secs()
        )
    }

    fn unreachable(&self, err: reqwest::Error) -> String {
        if err.is_timeout() && !err.is_connect() {
            self.no_answer()
        } else if err.is_connect() {
            format!(
                "cannot reach the server at {} — is it running? (set --url or ATTUNE_URL)",
                self.base
            )
        } else {
            format!("request to {} failed: {err}", self.base)
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, String> {
        self.send(req)
            .await?
            .json()
            .await
            .map_err(|e| format!("the server sent something that is not JSON: {e}"))
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.json(self.request(Method::GET, path, Duration::ZERO))
            .await
    }

    /// Up to `limit` rows of a listing (`path` without its `limit`; the rows
    /// under `rows`), and whether more follow them. Answers the first page's
    /// body with the rows gathered and the cursor that follows the last of
    /// them (null when nothing does).
    ///
    /// A filtered listing may answer fewer rows than asked for, even none,
    /// with a cursor to go on from (the server reads a bounded number of
    /// entries per page, more for a larger page), and a full page has a
    /// cursor whether or not anything follows it. So pages are asked for
    /// one row beyond what is still wanted, and at least [`LOOKAHEAD`]
    /// rows: a page with more than that settles that more follow, and the
    /// rows up to it are then read again in pages of exactly what is still
    /// wanted, so that the cursor given follows the last row shown.
    async fn page(&self, path: &str, rows: &str, limit: u32) -> Result<(Value, More), String> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = |cursor: Option<&str>, n: usize| match cursor {
            Some(c) => format!("{path}{sep}limit={n}&cursor={}", q(c)),
            None => format!("{path}{sep}limit={n}"),
        };
        let limit = limit as usize;
        let mut first: Option<Value> = None;
        let mut shown: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut more = More::Unknown;
        let mut exact = false;
        for _ in 0..MAX_PAGES {
            let wanted = limit - shown.len();
            let ask = if exact {
                wanted
            } else {
                (wanted + 1).clamp(LOOKAHEAD, MAX_PAGE_ROWS)
            };
            let mut page = self.get(&url(cursor.as_deref(), ask)).await?;
            let found = page[rows]
                .as_array_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            let next = page["next_cursor"].as_str().map(str::to_owned);
            first.get_or_insert(page);
            if !exact && found.len() > wanted {
                more = More::Yes;
                if wanted == 0 {
                    break;
                }
                exact = true;
                continue;
            }
            shown.extend(found);
            cursor = next;
            if cursor.is_none() {
                more = More::No;
                break;
            }
            if shown.len() == limit && exact {
                break;
            }
        }
        let mut body = first.unwrap_or_else(|| json!({}));
        body[rows] = Value::Array(shown);
        body["next_cursor"] = match (more, cursor) {
            (More::No, _) | (_, None) => Value::Null,
            (_, Some(c)) => Value::String(c),
        };
        Ok((body, more))
    }

    /// A consuming read (`GET path`), made safe to retry with an
    /// `Idempotency-Key` (`key`, or a new one): when its answer may have been
    /// lost on the way (no answer, a broken body, a 502, 503 or 504), it is
    /// asked again with the same key, [`TAKE_ATTEMPTS`] times in all with
    /// waits of 1, 2, 4 … s — and gets what the first attempt took instead
    /// of losing it. The last error names the key, which keeps the answer
    /// for ten minutes (`--idempotency-key` to ask again by hand).
    async fn take(&self, path: &str, key: Option<String>, held: Duration) -> Result<Value, String> {
        let key = key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut wait = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            let req = self
                .request(Method::GET, path, held)
                .header("Idempotency-Key", &key);
            let lost = match req.send().await {
                Ok(resp) if matches!(resp.status().as_u16(), 502..=504) => {
                    self.check(resp).await.err().unwrap_or_default()
                }
                Ok(resp) => match self.check(resp).await?.bytes().await {
                    Ok(body) => {
                        return serde_json::from_slice(&body).map_err(|e| {
                            format!("the server sent something that is not JSON: {e}")
                        });
                    }
                    Err(err) => format!("the answer broke off: {err}"),
                },
                Err(err) => self.unreachable(err),
            };
            if attempt == TAKE_ATTEMPTS {
                return Err(format!(
                    "{lost} (what the read took is kept for ten minutes: \
                     repeat it with --idempotency-key {key})"
                ));
            }
            attempt += 1;
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.json(self.request(Method::POST, path, Duration::ZERO).json(body))
            .await
    }
}

fn print_json(value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    outln!("{}", terminal_safe_json(&text));
    Ok(())
}

/// The line after a listing's table that says whether it goes on: how to
/// see more (`--limit` up to `max`), or that the listing stopped looking.
fn print_more(more: More, limit: u32, max: u32) {
    match more {
        More::No => {}
        More::Yes if limit < max => outln!("(more: raise --limit)"),
        More::Yes => outln!("(more than {max}: narrow the listing with its filters)"),
        More::Unknown => outln!(
            "(more may follow: the listing stopped after {MAX_PAGES} pages; narrow it or raise --limit)"
        ),
    }
}

/// JSON text with the characters [`render::unsafe_for_terminals`] that
/// JSON leaves as they are (DEL, C1 controls, bidirectional marks) written
/// as `\uXXXX` escapes: the same JSON to a parser, inert on a terminal.
/// They occur only inside strings (JSON's own whitespace and punctuation
/// are ASCII, and it escapes the controls below 0x20 itself).
fn terminal_safe_json(text: &str) -> String {
    let unsafe_here = |c: char| u32::from(c) >= 0x7f && render::unsafe_for_terminals(c);
    if !text.chars().any(unsafe_here) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_here(c) {
            // Every such character is in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes one line of command output. A reader that went away (`| head`)
/// ends the command quietly, as it ends any Unix tool, rather than with a
/// panic; any other failure to write is reported and exits non-zero.
pub fn out(line: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{line}") {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        report(format_args!("cannot write the output: {err}"));
        std::process::exit(1);
    }
}

/// Reports an error on standard error, as `error: …`, on one line: a
/// reason may quote what a server or a user sent, so characters that would
/// act on the terminal are shown escaped. Standard error itself may be
/// unwritable (closed, a full disk); the exit status still tells, so that
/// is not a second failure.
pub fn report(reason: std::fmt::Arguments<'_>) {
    let reason = render::printable(&reason.to_string());
    let _ = writeln!(std::io::stderr(), "error: {reason}");
}

/// Longest silence `tail` waits out (the stream's keep-alives come every
/// 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// Percent-encodes a query value.
fn q(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Everything but the characters a URL never needs escaped (RFC 3986's
/// unreserved ones).
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment: a space is `%20` there, not `+`.
fn segment(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, NOT_UNRESERVED).to_string()
}

/// Runs one client command.
pub async fn run(command: ClientCommand) -> Result<(), String> {
    match command {
        ClientCommand::Show {
            client,
            limit,
            days,
        } => {
            let api = Api::new(&client)?;
            let days = days.map(|d| format!("&days={d}")).unwrap_or_default();
            let body = api
                .get(&format!("/v1/usage/recent?limit={limit}{days}"))
                .await?;
            if client.json {
                return print_json(&body);
            }
            render::recent(&body);
            // A full page has a cursor whether or not anything follows it.
            if let Some(cursor) = body["next_cursor"].as_str() {
                let next = api
                    .get(&format!(
                        "/v1/usage/recent?limit=1{days}&cursor={}",
                        q(cursor)
                    ))
                    .await?;
                if next["records"].as_array().is_some_and(|r| !r.is_empty()) {
                    print_more(More::Yes, limit, MAX_PAGE_ROWS as u32);
                }
            }
            Ok(())
        }
        ClientCommand::Savings { client, days } => {
            let api = Api::new(&client)?;
            let body = api.get(&format!("/v1/usage/savings?days={days}")).await?;
            if client.json {
                return print_json(&body);
            }
            render::savings(&body, days);
            Ok(())
        }
        ClientCommand::CacheStats { client, days } => {
            let api = Api::new(&client)?;
            let body = api
                .get(&format!("/v1/usage/cache-stats?days={days}"))
                .await?;
            if client.json {
                return print_json(&body);
            }
            render::cache_stats(&body, days);
            Ok(())
        }
        ClientCommand::AgentPerformance { client, hours } => {
            let api = Api::new(&client)?;
            // Every agent's row: the pages, one after the other, as one.
            let first = format!("/v1/agents/performance?hours={hours}&limit=1000");
            let mut body = api.get(&first).await?;
            for _ in 1..MAX_PAGES {
                let Some(cursor) = body["next_cursor"].as_str().map(q) else {
                    break;
                };
                let mut next = api.get(&format!("{first}&cursor={cursor}")).await?;
                if let (Some(rows), Some(more)) =
                    (body["agents"].as_array_mut(), next["agents"].as_array_mut())
                {
                    rows.append(more);
                }
                body["next_cursor"] = next["next_cursor"].take();
            }
            if client.json {
                return print_json(&body);
            }
            render::performance(&body);
            if body["next_cursor"].is_string() {
                outln!(
                    "(more agents: the listing stopped after {} rows)",
                    MAX_PAGES * MAX_PAGE_ROWS
                );
            }
            Ok(())
        }
        ClientCommand::Agents {
            client,
            stale,
            state,
            status,
            limit,
        } => {
            let api = Api::new(&client)?;
            let path = match stale {
                Some(seconds) => format!("/v1/agents/stale?threshold_seconds={seconds}"),
                None => {
                    let mut path = "/v1/agents".to_owned();
                    for (name, value) in [("state", state), ("status", status)] {
                        if let Some(value) = value {
                            let sep = if path.contains('?') { '&' } else { '?' };
                            path.push_str(&format!("{sep}{name}={}", q(&value)));
                        }
                    }
                    path
                }
            };
            let (body, more) = api.page(&path, "agents", limit).await?;
            if client.json {
                return print_json(&body);
            }
            render::agents(&body);
            print_more(more, limit, MAX_ROWS);
            Ok(())
        }
        ClientCommand::Approvals { client, action } => {
            let api = Api::new(&client)?;
            let action = action.unwrap_or(ApprovalAction::List {
                status: "pending".into(),
                approval_type: None,
                agent: None,
                limit: 100,
            });
            match action {
                ApprovalAction::List {
                    status,
                    approval_type,
                    agent,
                    limit,
                } => {
                    let mut path = format!("/v1/approvals?status={}", q(&status));
                    if let Some(t) = approval_type {
                        path.push_str(&format!("&type={}", q(&t)));
                    }
                    if let Some(a) = agent {
                        path.push_str(&format!("&agent_id={}", q(&a)));
                    }
                    let (body, more) = api.page(&path, "approvals", limit).await?;
                    if client.json {
                        return print_json(&body);
                    }
                    render::approvals(&body);
                    print_more(more, limit, MAX_ROWS);
                    Ok(())
                }
                ApprovalAction::Approve { id, reason } => {
                    decide(&api, &client, &id, true, reason).await
                }
                ApprovalAction::Reject { id, reason } => {
                    decide(&api, &client, &id, false, Some(reason)).await
                }
            }
        }
        ClientCommand::Signals { client, action } => {
            let api = Api::new(&client)?;
            match action {
                SignalAction::Send {
                    signal_type,
                    from,
                    to,
                    payload,
                    ttl,
                } => {
                    let payload: Value = match payload {
                        Some(text) => serde_json::from_str(&text)
                            .map_err(|e| format!("--payload is not JSON: {e}"))?,
                        None => json!({}),
                    };
                    let mut body = json!({"signal_type": signal_type, "source_agent": from, "payload": payload});
                    if let Some(to) = to {
                        body["target_agent"] = json!(to);
                    }
                    if let Some(ttl) = ttl {
                        body["ttl_seconds"] = json!(ttl);
                    }
                    let sent = api.post("/v1/signals", &body).await?;
                    if client.json {
                        return print_json(&sent);
                    }
                    outln!(
                        "sent {} {} (expires {})",
                        sent["signal_type"].as_str().unwrap_or(""),
                        sent["signal_id"].as_str().unwrap_or(""),
                        short_time(&sent["expires_at"]),
                    );
                    Ok(())
                }
                SignalAction::Inbox {
                    agent,
                    consume,
                    idempotency_key,
                    wait,
                    signal_type,
                    limit,
                } => {
                    let mut path = format!("/v1/agents/{}/signals?", segment(&agent));
                    if let Some(t) = signal_type {
                        path.push_str(&format!("type={}&", q(&t)));
                    }
                    let held = Duration::from_secs(wait);
                    let waiting = format!("{path}wait_seconds={wait}");
                    if consume {
                        // One read takes them: it cannot be paged.
                        if limit as usize > MAX_PAGE_ROWS {
                            return Err(format!(
                                "--consume takes at most {MAX_PAGE_ROWS} signals at a time (--limit)"
                            ));
                        }
                        let path = format!("{waiting}&consume=true&limit={limit}");
                        let body = api.take(&path, idempotency_key, held).await?;
                        if client.json {
                            return print_json(&body);
                        }
                        render::signals(&body);
                        return Ok(());
                    }
                    if wait > 0 {
                        // Until a signal is there (a read that takes nothing),
                        // then the inbox page by page without waiting.
                        api.json(api.request(Method::GET, &format!("{waiting}&limit=1"), held))
                            .await?;
                    }
                    let path = format!("{path}wait_seconds=0");
                    let (body, more) = api.page(&path, "signals", limit).await?;
                    if client.json {
                        return print_json(&body);
                    }
                    render::signals(&body);
                    print_more(more, limit, MAX_ROWS);
                    Ok(())
                }
            }
        }
        ClientCommand::Tail {
            client,
            types,
            agent,
            since,
        } => tail(&client, types, agent, since).await,
    }
}

async fn decide(
    api: &Api,
    client: &ClientArgs,
    id: &str,
    approved: bool,
    reason: Option<String>,
) -> Result<(), String> {
    let mut body = json!({ "approved": approved });
    if let Some(reason) = reason {
        body["reason"] = json!(reason);
    }
    let decided = api
        .post(&format!("/v1/approvals/{}/decision", segment(id)), &body)
        .await?;
    if client.json {
        return print_json(&decided);
    }
    outln!(
        "{} {} as {}",
        if approved { "approved" } else { "rejected" },
        id,
        decided["response"]["responder"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Follows the SSE stream, printing one line per event until interrupted.
async fn tail(
    client: &ClientArgs,
    types: Option<String>,
    agent: Option<String>,
    since: Option<String>,
) -> Result<(), String> {
    let api = Api::new(client)?;
    let mut query = Vec::new();
    if let Some(t) = types {
        query.push(format!("types={}", q(&t)));
    }
    if let Some(a) = agent {
        query.push(format!("agent_id={}", q(&a)));
    }
    if let Some(s) = since {
        query.push(format!("since={}", q(&s)));
    }
    let path = format!("/v1/events/sse?{}", query.join("&"));
    // The stream's first answer is bounded like any request's.
    let resp = tokio::time::timeout(
        api.answer_limit,
        api.send(api.stream_request(Method::GET, &path)),
    )
    .await
    .map_err(|_| api.no_answer())??;
    let mut stream = resp.bytes_stream();
    let mut buffer = Vec::new();
    // The last event printed: where to resume when the stream breaks.
    let mut last: Option<String> = None;
    let resume = |last: &Option<String>| {
        last.as_ref()
            .map(|id| format!(" (resume with --since {id})"))
            .unwrap_or_default()
    };
    loop {
        let next = tokio::time::timeout(STREAM_SILENCE, stream.next())
            .await
            .map_err(|_| {
                format!(
                    "the event stream went silent for {} s{}",
                    STREAM_SILENCE.as_secs(),
                    resume(&last)
                )
            })?;
        let Some(chunk) = next else {
            break;
        };
        let chunk = chunk.map_err(|e| format!("the event stream broke: {e}{}", resume(&last)))?;
        buffer.extend_from_slice(&chunk);
        while let Some(block) = next_sse_block(&mut buffer) {
            let is_error = block.lines().any(|l| l.trim() == "event: error");
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect();
            if data.is_empty() {
                continue;
            }
            let event: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
            if is_error {
                return Err(format!(
                    "the server ended the stream: {event}{}",
                    resume(&last)
                ));
            }
            if let Some(id) = event["id"].as_str() {
                last = Some(id.to_owned());
            }
            let line = if client.json {
                terminal_safe_json(&serde_json::to_string(&event).unwrap_or_default())
            } else {
                render::event_line(&event)
            };
            // Line by line, as events come (standard output is flushed at
            // each newline); a closed pipe (`tail | head`) ends the command.
            outln!("{line}");
        }
    }
    Ok(())
}

/// Takes the next complete Server-Sent Events block (up to its blank line)
/// off `buffer`. A block is decoded whole, so a character that arrived
/// split across two network chunks is never mangled.
fn next_sse_block(buffer: &mut Vec<u8>) -> Option<String> {
    let end = buffer.windows(2).position(|w| w == b"\n\n")?;
    let block: Vec<u8> = buffer.drain(..end + 2).collect();
    Some(String::from_utf8_lossy(&block).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_escapes_what_json_leaves_raw_for_terminals() {
        let value = json!({"task": "a\u{9b}b\u{7f}c\u{202e}d\u{1b}e é"});
        let text = terminal_safe_json(&serde_json::to_string_pretty(&value).unwrap());
        assert!(text.contains(r"a\u009bb\u007fc\u202ed\u001be é"), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
        // The layout's own line breaks are kept.
        assert!(text.starts_with("{\n"), "{text}");
    }

    #[test]
    fn path_segments_escape_all_but_unreserved_characters() {
        assert_eq!(segment("a b/é?~-._Z9"), "a%20b%2F%C3%A9%3F~-._Z9");
    }

    #[test]
    fn an_sse_block_split_inside_a_character_is_decoded_whole() {
        let text = "data: {\"who\":\"José\"}\n\n".as_bytes();
        let split = text.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let mut buffer = text[..split].to_vec();
        assert_eq!(next_sse_block(&mut buffer), None);
        buffer.extend_from_slice(&text[split..]);
        assert_eq!(
            next_sse_block(&mut buffer).as_deref(),
            Some("data: {\"who\":\"José\"}\n\n")
        );
        assert!(buffer.is_empty());
    }
}
