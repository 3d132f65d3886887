//! The Redis engine: the source of truth shared by every replica.
//!
//! One [`ConnectionManager`] (a multiplexed connection that reconnects by
//! itself when its socket fails) carries every ordinary command; it is
//! configured with explicit connect and response timeouts, and every call
//! is additionally bounded by [`RedisEngine::run`], so a dead or stalled
//! Redis turns into a 503 within `--redis-timeout-ms` instead of a hung
//! request. A connection that stays open but stops answering is replaced
//! (see [`Link`]).
//!
//! Blocking reads of the event log (`XREAD BLOCK`) would stall every other
//! command multiplexed on the same connection, so they get a connection of
//! their own, each call bounded by its block time plus the ordinary bound.
//! Only the process's single tailer makes them (see [`crate::events::hub`]).
//!
//! Atomic multi-key steps are Lua scripts. Each one starts with the shared
//! [`EMIT_PRELUDE`] so that it can append events to the log in the same
//! atomic step as its state change.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, ErrorKind, IntoConnectionInfo, RedisError, Script, ServerErrorKind,
};
use tokio::sync::Mutex;

use crate::engine::keys::Keys;
use crate::engine::{EngineError, EngineResult};

/// Lua prepended to every script that appends events.
///
/// Convention: `KEYS[1]` is the event stream and `ARGV[1]` its maximum
/// length; a script's own keys and arguments start at index 2.
///
/// An event with a wake-up key is also appended, under the same id and with
/// only that key, to the wake-up stream (`KEYS[1]` + `:wakes`, the same hash
/// tag), which the hub's tailer reads instead of the whole log while no
/// client subscribes (see [`crate::events::hub`]).
///
/// The log is trimmed to `ARGV[1]` entries exactly while that is under
/// [`EXACT_TRIM_BELOW`]; from there on approximately, which costs Redis far
/// less: it only drops whole nodes of the stream (at most 100 entries by
/// default, `stream-node-max-entries`), so the log may hold up to a node more.
pub const EMIT_PRELUDE: &str = r#"
local function trim_mode()
  if tonumber(ARGV[1]) < EXACT_TRIM_BELOW then return '=' end
  return '~'
end
local function emit(kind, agent, wake, body)
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', trim_mode(), ARGV[1], '*',
    't', kind, 'a', agent or '', 'w', wake or '', 'b', body)
  if wake and wake ~= '' then
    redis.call('XADD', KEYS[1] .. ':wakes', 'MAXLEN', trim_mode(), ARGV[1], id, 'w', wake)
  end
  return id
end
"#;

/// Logs shorter than this are trimmed exactly (see [`EMIT_PRELUDE`]): above
/// it, a node's worth of extra entries is at most 1 % of the log.
pub const EXACT_TRIM_BELOW: usize = 10_000;

/// Stringifies script arguments: `args![id, ttl, json]` (an array, which
/// borrows as the `&[String]` that [`RedisEngine::invoke`] takes).
macro_rules! args {
    ($($arg:expr),* $(,)?) => { [$($arg.to_string()),*] };
}
pub(crate) use args;

/// A stored record that decodes. One that does not (written by hand, or by
/// another version of the service) is logged, counted by `kind` and
/// passed over, so that it cannot fail every listing page or report it
/// falls in; reading that one record by itself still answers with the
/// error.
pub fn readable<T>(kind: &'static str, record: EngineResult<T>) -> Option<T> {
    passed_over(
        record,
        kind,
        || metrics::counter!("attune_records_unreadable_total", "kind" => kind),
    )
}

/// `item` if it decodes; otherwise logs what it is (`what`), counts it
/// with `counter` and gives `None`: the one policy for whatever stored
/// data the service cannot read and reads past.
pub fn passed_over<T>(
    item: EngineResult<T>,
    what: &str,
    counter: impl FnOnce() -> metrics::Counter,
) -> Option<T> {
    item.inspect_err(|err| {
        counter().increment(1);
        tracing::warn!(error = %err, what, "skipping what cannot be read");
    })
    .ok()
}

/// Builds a script with the event prelude.
pub fn script(body: &str) -> Script {
    let prelude = EMIT_PRELUDE.replace("EXACT_TRIM_BELOW", &EXACT_TRIM_BELOW.to_string());
    Script::new(&format!("{prelude}\n{body}"))
}

pub struct RedisEngine {
    /// Multiplexed, self-reconnecting connection for every ordinary command.
    pub(crate) link: Arc<Link>,
    /// Used to open the tailer's dedicated blocking connection.
    client: redis::Client,
    /// The tailer's connection for `XREAD BLOCK`, opened on first use and
    /// dropped after an error so that the next read reconnects.
    blocking: Mutex<Option<MultiplexedConnection>>,
    /// Key names of this deployment.
    pub keys: Keys,
    /// Bound on every ordinary call, connecting included.
    pub timeout: Duration,
    /// Most entries of the event log (see [`EMIT_PRELUDE`] for how exactly).
    pub stream_max_len: usize,
    /// Group commit of heartbeats, started on the first beat (see
    /// [`crate::agents`]'s Redis engine).
    pub(crate) beat_batcher: std::sync::OnceLock<crate::agents::redis::BeatBatcher>,
}

/// Sockets to Redis: no Nagle delay (script calls and their answers are
/// small writes that must not wait for the previous one's acknowledgement),
/// and a bound on unacknowledged data. The connection manager reconnects
/// when its socket fails, not when calls time out; if Redis's host
/// vanishes without closing the connection (a crash, a failover that moves
/// its address), the kernel would keep retransmitting for a quarter of an
/// hour, every call a 503 until then. With the bound the socket fails
/// after [`UNACKED_LIMIT`] and the manager reconnects.
fn tcp_settings() -> TcpSettings {
    let settings = TcpSettings::default().set_nodelay(true);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(UNACKED_LIMIT);
    settings
}

/// How long data sent to Redis may go unacknowledged by its host's kernel
/// (which acknowledges at once, however busy Redis is).
const UNACKED_LIMIT: Duration = Duration::from_secs(10);

impl RedisEngine {
    /// Connects to `url`. Fails (without hanging) if Redis does not answer
    /// within `timeout`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        stream_max_len: usize,
    ) -> EngineResult<Self> {
        let info = url
            .into_connection_info()
            .map_err(|e| EngineError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let client = redis::Client::open(info.set_tcp_settings(tcp_settings()))
            .map_err(|e| EngineError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            timeout * 2,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await
        .map_err(|_| EngineError::Unavailable("timed out connecting to Redis".into()))?
        .map_err(connect_error)?;
        Ok(Self {
            link: Arc::new(Link::new(conn, client.clone(), config, timeout)),
            client,
            blocking: Mutex::new(None),
            keys: Keys::new(prefix),
            timeout,
            stream_max_len,
            beat_batcher: std::sync::OnceLock::new(),
        })
    }

    /// Runs one Redis call with the engine's time bound.
    pub async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> EngineResult<T> {
        self.link.run(call).await
    }

    /// A clone of the shared connection (cheap: it is a handle).
    pub fn conn(&self) -> ConnectionManager {
        self.link.conn()
    }

    /// Invokes `script` with the event stream as `KEYS[1]`, the stream length
    /// as `ARGV[1]`, then `keys` and `args`.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[impl AsRef<str>],
        args: &[String],
    ) -> EngineResult<T> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.keys.events()).arg(self.stream_max_len);
        for key in keys {
            invocation.key(key.as_ref());
        }
        for arg in args {
            invocation.arg(arg.as_str());
        }
        let mut conn = self.conn();
        self.run(invocation.invoke_async(&mut conn)).await
    }

    pub async fn ping(&self) -> EngineResult<()> {
        let mut conn = self.conn();
        self.run(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }

    /// Runs a blocking command on the dedicated connection, bounded by
    /// `block` plus the ordinary bound. The connection itself has no
    /// response timeout: calls block for different times (the tailer reads
    /// the log and the wake-up stream with different blocks), so each call
    /// carries its own bound.
    pub async fn blocking_query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        block: Duration,
    ) -> EngineResult<T> {
        let mut slot = self.blocking.lock().await;
        if slot.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(None);
            let conn = tokio::time::timeout(
                self.timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .map_err(|_| EngineError::Unavailable("timed out connecting to Redis".into()))?
            .map_err(unavailable)?;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("set above");
        let result = tokio::time::timeout(block + self.timeout, cmd.query_async::<T>(conn)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                *slot = None;
                Err(classify(err))
            }
            Err(_) => {
                *slot = None;
                Err(EngineError::Unavailable("blocking read timed out".into()))
            }
        }
    }
}

/// An `HGETALL` reply (`field, value, field, value, …`) as a map.
pub fn hash_fields(reply: &[String]) -> std::collections::HashMap<&str, &str> {
    reply
        .chunks_exact(2)
        .map(|pair| (pair[0].as_str(), pair[1].as_str()))
        .collect()
}

/// The connection every ordinary command shares, replaced by a new one
/// when it stops answering.
///
/// The manager reconnects when its socket fails, not when calls time out.
/// A peer that takes commands and never answers (a proxy in front of Redis
/// that lost its upstream but keeps its clients' connections open) would
/// fail every call with a timeout for as long as the socket lives, however
/// healthy Redis is again. So when calls keep timing out with no answer for
/// [`STALLED_AFTER`] bounds, the connection is replaced by a new one,
/// opened by the next call; calls still in flight on the old one end with
/// their own bound. While new connections stay silent too (Redis itself
/// hangs), each further replacement waits twice as long, up to
/// [`MOST_DOUBLINGS`] times, so that replicas do not churn sockets.
pub(crate) struct Link {
    current: ArcSwap<ConnectionManager>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Bound on every call.
    timeout: Duration,
    /// Whether calls have timed out since the last answer: the common path
    /// (an answer) reads only this.
    silent: AtomicBool,
    silence: SyncMutex<Silence>,
}

/// Calls timing out with no answer between them (see [`Link`]).
#[derive(Default)]
struct Silence {
    /// Since when nothing has answered: the start of the first call that
    /// timed out.
    since: Option<Instant>,
    /// When the last call timed out.
    last_timeout: Option<Instant>,
    /// Connections replaced since the last answer.
    replaced: u32,
}

/// Bounds of silence, with calls timing out, after which the shared
/// connection is replaced (see [`Link`]).
const STALLED_AFTER: u32 = 2;
/// Most times the silence before a replacement doubles: 64 bounds.
const MOST_DOUBLINGS: u32 = 5;

impl Link {
    fn new(
        conn: ConnectionManager,
        client: redis::Client,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Self {
        Self {
            current: ArcSwap::from_pointee(conn),
            client,
            config,
            timeout,
            silent: AtomicBool::new(false),
            silence: SyncMutex::new(Silence::default()),
        }
    }

    /// The bound on every call.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A clone of the current connection (cheap: it is a handle).
    pub(crate) fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.current.load())
    }

    /// Runs one call within the bound, classifying its failure, and
    /// replaces the connection once it has stalled.
    pub(crate) async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> EngineResult<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                self.answered();
                Ok(value)
            }
            Ok(Err(err)) if err.is_timeout() => {
                self.timed_out();
                Err(classify(err))
            }
            Ok(Err(err)) => {
                // Redis's own error replies are answers; a failed socket is
                // the manager's to reconnect.
                if !err.is_io_error() {
                    self.answered();
                }
                Err(classify(err))
            }
            Err(_) => {
                self.timed_out();
                Err(EngineError::Unavailable(
                    "Redis did not answer in time".into(),
                ))
            }
        }
    }

    fn silence(&self) -> std::sync::MutexGuard<'_, Silence> {
        self.silence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn answered(&self) {
        if !self.silent.load(Ordering::Relaxed) {
            return;
        }
        let mut silence = self.silence();
        if silence.replaced > 0 {
            tracing::info!(replaced = silence.replaced, "Redis answers again");
        }
        *silence = Silence::default();
        self.silent.store(false, Ordering::Relaxed);
    }

    fn timed_out(&self) {
        let now = Instant::now();
        let stalled = self.timeout * STALLED_AFTER;
        let mut silence = self.silence();
        self.silent.store(true, Ordering::Relaxed);
        // A spell without calls tells nothing: count from this call, which
        // was sent a bound ago.
        let counting = silence
            .last_timeout
            .is_some_and(|last| now.duration_since(last) <= stalled);
        silence.last_timeout = Some(now);
        let since = match silence.since {
            Some(since) if counting => since,
            _ => *silence
                .since
                .insert(now.checked_sub(self.timeout).unwrap_or(now)),
        };
        let needed = stalled * 2u32.pow(silence.replaced.min(MOST_DOUBLINGS));
        if now.duration_since(since) < needed {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                self.current.store(Arc::new(fresh));
                silence.since = Some(now);
                silence.replaced += 1;
                metrics::counter!("attune_redis_reconnects_total").increment(1);
                if silence.replaced == 1 {
                    tracing::warn!(
                        silent_ms = now.duration_since(since).as_millis() as u64,
                        "Redis has not answered on its connection while calls timed out; opening a new one"
                    );
                } else {
                    tracing::debug!(
                        replaced = silence.replaced,
                        "Redis is still silent; opening another connection"
                    );
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not open a new Redis connection"),
        }
    }
}

/// A failed connection: refused for good when Redis answered that the
/// credentials or the database number are wrong (waiting will not change
/// that), otherwise an outage. (redis-rs reports any error answer to
/// `AUTH` as a failed authentication, so a Redis refusing clients for
/// another reason at that moment, such as `maxclients`, stops start-up
/// too.)
fn connect_error(err: RedisError) -> EngineError {
    let refused = match err.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Server(ServerErrorKind::NoPerm) => true,
        // `SELECT` of a database Redis does not have.
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            err.to_string().contains("refused to switch database")
        }
        _ => matches!(server_code(&err).as_deref(), Some("NOAUTH" | "WRONGPASS")),
    };
    if refused {
        EngineError::Refused(err.to_string())
    } else {
        EngineError::Unavailable(err.to_string())
    }
}

fn unavailable(err: RedisError) -> EngineError {
    EngineError::Unavailable(err.to_string())
}

/// Errors that mean "our code, data or configuration is wrong" become
/// [`EngineError::Corrupt`] (500, logged as errors): retrying will not
/// help, and an operator must look — a key of another type where ours
/// should be (`WRONGTYPE`: another program shares the key prefix), a Redis
/// user not allowed our commands (`NOPERM`). Everything else (I/O,
/// timeouts, loading, failover, a busy script, out of memory, …) is an
/// outage (503).
fn classify(err: RedisError) -> EngineError {
    // Redis answers a protocol error and closes the connection: what it
    // says to a client that has not authenticated and sends a long
    // command, when a password is set under a running service. Another
    // connection is opened; it is an outage until that one works.
    if err.to_string().contains("Protocol error") {
        return EngineError::Unavailable(err.to_string());
    }
    match err.kind() {
        ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::Server(
            ServerErrorKind::ResponseError | ServerErrorKind::CrossSlot | ServerErrorKind::NoPerm,
        ) => EngineError::Corrupt(err.to_string()),
        ErrorKind::Extension if server_code(&err).as_deref() == Some("WRONGTYPE") => {
            EngineError::Corrupt(err.to_string())
        }
        _ => EngineError::Unavailable(err.to_string()),
    }
}

/// The code Redis answered with (`WRONGTYPE`, …); for a pipeline, that of
/// its first failure.
fn server_code(err: &RedisError) -> Option<String> {
    err.code().map(str::to_owned).or_else(|| {
        let failures = err.clone().into_server_errors()?;
        failures
            .first()
            .map(|(_, failure)| failure.code().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_are_not_outages() {
        let corrupt = |err| matches!(classify(err), EngineError::Corrupt(_));
        assert!(corrupt(RedisError::from((
            ErrorKind::Server(ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'evalsha' command"
        ))));
        assert!(corrupt(redis::make_extension_error(
            "WRONGTYPE".into(),
            None
        )));
        // Transient conditions stay retryable.
        assert!(!corrupt(RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "Protocol error",
            "unauthenticated multibulk length".to_owned()
        ))));
        assert!(!corrupt(redis::make_extension_error("BUSY".into(), None)));
        assert!(!corrupt(redis::make_extension_error("OOM".into(), None)));
        assert!(!corrupt(RedisError::from((
            ErrorKind::Server(ServerErrorKind::BusyLoading),
            "loading"
        ))));
    }
}
