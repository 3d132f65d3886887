//! In-process fan-out of the event log.
//!
//! One tailer per process reads the log (`XREAD BLOCK` on its own Redis
//! connection, or the memory engine's equivalent) and hands every event to
//!
//! - a `broadcast` channel that every WebSocket and SSE subscriber reads,
//!   with server-side filtering in each subscriber's task, and
//! - the [`Waiters`] registry, which wakes long-poll requests (signal
//!   inboxes, approval waits) whose wake-up key the event carries.
//!
//! Because replicas each run a tailer over the same log, a signal sent or an
//! approval decided through one replica wakes waiters on all of them, and
//! the number of Redis connections is one per process whatever the number of
//! clients. The tailer remembers the last id it delivered and continues from
//! it after an outage, so subscribers see no gap and no duplicate.
//!
//! While no client subscribes, the tailer reads only wake-ups (on Redis the
//! wake-up stream: the wake-up keys of the log's events, under the same ids;
//! on the memory engine the log's events that carry one) instead of every
//! event, so a busy log — a heartbeat event per beat — costs nothing to
//! read back when nobody watches it. A client that subscribes
//! then waits until the tailer has switched: it wakes the waiters of every
//! wake-up up to the log's current end, and reads the log from there, so
//! waiters miss nothing and subscribers get every event after they joined.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineError};
use crate::events::{Event, StreamId};

/// How long one blocking read of the log waits before it is re-issued.
const BLOCK: Duration = Duration::from_secs(5);
/// Most entries taken per read.
const BATCH: usize = 1000;
/// How long one blocking read of the wake-up stream waits: also how soon
/// the tailer notices a client that subscribed.
const WAKE_BLOCK: Duration = Duration::from_millis(100);

/// What the tailer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tailing {
    /// Nothing yet: the tailer has not found the end of the log, so it
    /// does not know where live events start.
    Starting,
    /// Every event: for subscribers and waiters.
    Log,
    /// Only wake-ups (while no client subscribes): for waiters.
    Wakes,
}

/// The process's fan-out point.
pub struct Hub {
    /// Every event, in log order, for live subscribers. A subscriber that
    /// falls more than the channel's capacity behind is told it lagged.
    tx: broadcast::Sender<Arc<Event>>,
    /// Long-poll waiters by wake-up key.
    waiters: Waiters,
    /// Connected WebSocket and SSE clients (for `/metrics`, and for
    /// shutdown to wait on).
    subscribers: AtomicUsize,
    /// Told when the last client leaves.
    no_clients: tokio::sync::Notify,
    /// Cancelled at shutdown: waits answer at once, streams close.
    shutdown: CancellationToken,
    /// What the tailer reads. Joining the broadcast and reading this, and
    /// the tailer's switch to wake-ups when nobody has joined, happen under
    /// `gate`, so a client never joins while the tailer stops reading the log.
    tailing: watch::Sender<Tailing>,
    gate: Mutex<()>,
}

impl Hub {
    /// A hub whose subscribers may fall up to `capacity` events behind.
    pub fn new(capacity: usize, shutdown: CancellationToken) -> Arc<Self> {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Arc::new(Self {
            tx,
            waiters: Waiters::default(),
            subscribers: AtomicUsize::new(0),
            no_clients: tokio::sync::Notify::new(),
            shutdown,
            tailing: watch::Sender::new(Tailing::Starting),
            gate: Mutex::new(()),
        })
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Connected WebSocket and SSE clients.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Returns once no WebSocket or SSE client is connected: at shutdown,
    /// when each has been sent its end (and where to resume).
    pub async fn clients_gone(&self) {
        loop {
            let notified = self.no_clients.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.subscribers.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Joins the live stream: every event the tailer reads from now on.
    /// If the tailer reads only wake-ups, or has not found the end of the
    /// log yet (the engine was unreachable when it started), waits (at most
    /// `within`) until it reads the log: a subscriber that joined earlier
    /// would miss what is appended between its replay and the tailer's
    /// start.
    pub async fn subscribe(
        &self,
        within: Duration,
    ) -> Result<broadcast::Receiver<Arc<Event>>, EngineError> {
        let (live, mut tailing) = {
            let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            (self.tx.subscribe(), self.tailing.subscribe())
        };
        let switch = tailing.wait_for(|t| *t == Tailing::Log);
        match tokio::time::timeout(within + WAKE_BLOCK, switch).await {
            Ok(Ok(_)) => Ok(live),
            _ => Err(EngineError::Unavailable(
                "the event log cannot be read right now".into(),
            )),
        }
    }

    /// Counts a live client for as long as the returned guard lives.
    pub fn client_guard(self: &Arc<Self>) -> ClientGuard {
        let n = self.subscribers.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("attune_event_subscribers").set(n as f64);
        ClientGuard(self.clone())
    }

    /// Hands one event to subscribers and waiters.
    fn deliver(&self, event: Event) {
        if let Some(key) = &event.wake {
            self.waiters.wake(key);
        }
        metrics::counter!("attune_events_delivered_total").increment(1);
        // No receivers is fine: nobody is listening right now.
        let _ = self.tx.send(Arc::new(event));
    }

    /// Starts the tailer. It stops when `shutdown` is cancelled.
    pub fn spawn_tailer(
        self: &Arc<Self>,
        engine: Engine,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move { hub.tail(engine, shutdown).await })
    }

    async fn tail(&self, engine: Engine, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        // Start at the current end of the log: earlier events are history,
        // which subscribers read from the engine themselves.
        let mut last = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                bounds = engine.log_bounds() => match bounds {
                    Ok(b) => break b.newest.unwrap_or(StreamId::ZERO),
                    Err(err) => {
                        tracing::warn!(error = %err, "event tailer cannot read the log yet");
                        backoff.wait().await;
                    }
                },
            }
        };
        backoff.reset();
        tracing::debug!(from = %last, "event tailer started");
        {
            let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            self.tailing.send_replace(Tailing::Log);
        }
        loop {
            let read = match self.choose_tailing() {
                Tailing::Wakes => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        read = self.follow_wakes(&engine, &mut last) => read,
                    }
                }
                // `Starting` ended before the loop.
                Tailing::Log | Tailing::Starting => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        read = engine.wait_events(last, BATCH, BLOCK) => read.map(|events| {
                            for event in events {
                                last = event.id;
                                self.deliver(event);
                            }
                        }),
                    }
                }
            };
            match read {
                Ok(()) => {
                    if backoff.failures > 0 {
                        tracing::info!(from = %last, "event tailer reconnected");
                    }
                    backoff.reset();
                }
                Err(err) => {
                    metrics::counter!("attune_engine_errors_total", "op" => "tail").increment(1);
                    if backoff.failures == 0 {
                        tracing::warn!(error = %err, "event tailer lost the log; retrying");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = backoff.wait() => {}
                    }
                }
            }
        }
        tracing::debug!("event tailer stopped");
    }

    /// Switches to wake-ups when no client has joined the live stream.
    fn choose_tailing(&self) -> Tailing {
        let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if self.tx.receiver_count() == 0 {
            self.tailing.send_if_modified(|t| {
                let changed = *t != Tailing::Wakes;
                *t = Tailing::Wakes;
                changed
            });
        }
        *self.tailing.borrow()
    }

    /// One step of tailing wake-ups: wakes the waiters of the next ones; or,
    /// when a client has joined, wakes those of every wake-up up to the
    /// log's end and switches to reading the log from there.
    async fn follow_wakes(&self, engine: &Engine, last: &mut StreamId) -> Result<(), EngineError> {
        if self.tx.receiver_count() == 0 {
            for (id, key) in engine.wait_wakes(*last, BATCH, WAKE_BLOCK).await? {
                *last = id;
                self.waiters.wake(&key);
            }
            return Ok(());
        }
        // The end first: a wake-up appended after it is in the log after it.
        let end = engine.log_bounds().await?.newest.unwrap_or(*last);
        for (id, key) in engine.read_wakes(*last, end).await? {
            *last = id;
            self.waiters.wake(&key);
        }
        *last = (*last).max(end);
        self.tailing.send_replace(Tailing::Log);
        tracing::debug!(from = %last, "event tailer reads the log for subscribers");
        Ok(())
    }
}

/// Decrements the subscriber count when a client goes away.
pub struct ClientGuard(Arc<Hub>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let n = self.0.subscribers.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("attune_event_subscribers").set(n as f64);
        if n == 0 {
            self.0.no_clients.notify_waiters();
        }
    }
}

/// Capped exponential backoff for reconnect loops.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    async fn wait(&mut self) {
        let ms = (50u64 << self.failures.min(4)).min(500);
        self.failures += 1;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Long-poll waiters, by wake-up key.
///
/// A waiter calls [`Waiters::watch`] *before* it checks storage and then
/// waits on the returned [`Watch`]; an event carrying its key wakes it, and
/// it checks storage again. Registration before the check means a wake-up
/// between the check and the wait is not lost.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Waiters {
    /// Registers interest in `key` for as long as the `Watch` lives.
    pub fn watch(&self, key: &str) -> Watch<'_> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let notify = match map.get(key).and_then(Weak::upgrade) {
            Some(n) => n,
            None => {
                let n = Arc::new(Notify::new());
                map.insert(key.to_owned(), Arc::downgrade(&n));
                n
            }
        };
        Watch {
            waiters: self,
            key: key.to_owned(),
            notify,
        }
    }

    fn wake(&self, key: &str) {
        let notify = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.get(key).and_then(Weak::upgrade)
        };
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    /// Number of keys with live waiters (tests and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One waiter's registration on one key.
pub struct Watch<'a> {
    waiters: &'a Waiters,
    key: String,
    notify: Arc<Notify>,
}

impl Watch<'_> {
    /// A future that completes at the next wake-up of this key. Create (and
    /// `enable`) it before checking storage.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock().unwrap_or_else(|p| p.into_inner());
        // Upgrades happen under this lock too, so a count of one means that
        // this is the last registration of the key.
        if Arc::strong_count(&self.notify) == 1 {
            map.remove(&self.key);
        }
    }
}

/// Waits until `check` says it is done or `wait` elapses (or the server
/// shuts down), re-checking each time one of `keys` is woken. Returns the
/// last check's value either way. `check` returns `(value, done)`.
pub async fn wait_for<T, E, F, Fut>(
    hub: &Hub,
    keys: &[String],
    wait: Duration,
    mut check: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(T, bool), E>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let watches: Vec<Watch<'_>> = keys.iter().map(|k| hub.waiters.watch(k)).collect();
    loop {
        let mut notified: Vec<_> = watches.iter().map(|w| Box::pin(w.notified())).collect();
        for n in &mut notified {
            n.as_mut().enable();
        }
        let (value, done) = check().await?;
        if done || tokio::time::Instant::now() >= deadline || hub.shutdown.is_cancelled() {
            return Ok(value);
        }
        let woken = futures_util::future::select_all(notified);
        tokio::select! {
            _ = woken => {}
            // The wait ended, or the server is stopping: answer with the
            // current state.
            _ = tokio::time::sleep_until(deadline) => return check().await.map(|(v, _)| v),
            _ = hub.shutdown.cancelled() => return check().await.map(|(v, _)| v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_between_check_and_wait_is_not_lost() {
        let hub = Hub::new(16, CancellationToken::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let h = hub.clone();
        let c = calls.clone();
        let result: Result<usize, ()> =
            wait_for(&hub, &["k".into()], Duration::from_secs(5), || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                async move {
                    if n == 0 {
                        // Woken after registration, before waiting.
                        h.waiters.wake("k");
                    }
                    Ok((n, n >= 1))
                }
            })
            .await;
        assert_eq!(result, Ok(1));
        assert!(
            hub.waiters.is_empty(),
            "registrations are removed when waiters leave"
        );
    }

    #[tokio::test]
    async fn subscribers_wait_until_the_tailer_knows_where_the_log_ends() {
        let shutdown = CancellationToken::new();
        let hub = Hub::new(16, shutdown.clone());
        // No tailer yet (as while the engine is unreachable at start).
        let early = hub.subscribe(Duration::from_millis(10)).await;
        assert!(matches!(early, Err(EngineError::Unavailable(_))));
        let engine = Engine::Memory(Arc::new(crate::engine::memory::MemoryEngine::new(100)));
        let tailer = hub.spawn_tailer(engine, shutdown.clone());
        assert!(hub.subscribe(Duration::from_secs(5)).await.is_ok());
        shutdown.cancel();
        tailer.await.unwrap();
    }

    #[tokio::test]
    async fn a_wait_that_ends_returns_the_current_state() {
        let hub = Hub::new(16, CancellationToken::new());
        let started = tokio::time::Instant::now();
        let result: Result<&str, ()> =
            wait_for(&hub, &["k".into()], Duration::from_millis(50), || async {
                Ok(("pending", false))
            })
            .await;
        assert_eq!(result, Ok("pending"));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
