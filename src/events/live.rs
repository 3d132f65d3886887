//! Live streams: `GET /v1/events/ws` (WebSocket) and `GET /v1/events/sse`.
//!
//! A [`Subscription`] joins the hub's broadcast *first*, then replays the
//! log from `since` in batches, then switches to the broadcast, dropping
//! anything at or before the last id it sent. Joining before replaying
//! means no event can fall between the two phases; comparing ids means none
//! is sent twice. If `since` has been trimmed away, the first frame is a
//! `stream.reset` naming the oldest id still there, and replay starts from
//! the beginning of what is left; the same frame comes mid-replay if
//! trimming overtakes a replay in progress. A `since` after the newest
//! event and in the future (no id the log gave out) gets the same frame,
//! then the events after the newest: taken as it is, it would silently
//! hold back every event until the clock reached it.
//!
//! A subscriber that falls more than `--subscriber-buffer` events behind the
//! live stream is disconnected (WebSocket close code 4008, or a final SSE
//! `error` event) with the id to resume from, so one slow client can never
//! hold memory or stall the others.
//!
//! A WebSocket's writer is woken once per event; it writes every frame
//! already queued for it before flushing, so under load a socket catches up
//! with a few large writes instead of one system call per event, and under
//! sustained traffic it writes at most once per `--ws-write-interval-ms`. The
//! client's side of the socket is read by a separate task, so the writer's
//! wake-ups never touch the read path.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;
use crate::auth::{Caller, Subscribe};
use crate::engine::{Engine, EngineError};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::http::parse_position;
use crate::events::{Event, EventFilter, StreamId};

/// Server pings keep idle connections (and the proxies between) alive.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Client frames above this close the socket with 1009.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Entries read per replay round trip.
const REPLAY_BATCH: usize = 500;
/// Most frames written to one socket with one flush.
const WRITE_BATCH: usize = 64;
/// Longest a write to one socket may take. A client that stops reading
/// (while its connection stays open) would otherwise hold its socket and
/// task for as long as the kernel keeps the connection, never reaching
/// the lag check; after this it is dropped and reconnects with `since`.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames are buffered up to this size before being written (the flush
/// after each batch writes the rest), so a batch is a few large writes.
const WRITE_BUFFER: usize = 16 * 1024;

/// Close code sent to a subscriber that fell too far behind.
pub const CLOSE_LAGGED: u16 = 4008;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_events_ws))
        .routes(routes!(get_events_sse))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Replay every event after this id (`<ms>-<seq>`), then go live.
    #[param(value_type = Option<crate::events::EventIdParam>, inline)]
    since: Option<String>,
    /// Comma-separated types; `prefix.*` matches a prefix.
    #[param(value_type = Option<crate::types::TypeFilterParam>, inline)]
    types: Option<String>,
    /// Only events about this agent.
    #[param(value_type = Option<crate::types::IdFilterParam>, inline)]
    agent_id: Option<String>,
    /// The API key, for clients that cannot set headers (browsers).
    /// Read by the auth extractor; declared here for the API description.
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// One frame for a subscriber.
#[derive(Debug, Clone)]
pub enum Frame {
    /// `since` was trimmed away, or lies ahead of the log and of the clock:
    /// replay continues from `oldest`, the first event replayed.
    Reset {
        oldest: Option<StreamId>,
    },
    Event(Arc<Event>),
}

impl Frame {
    pub fn json(&self) -> Utf8Bytes {
        match self {
            Frame::Reset { oldest } => serde_json::json!({
                "type": "stream.reset",
                "oldest_id": oldest.map(|id| id.to_string()),
            })
            .to_string()
            .into(),
            Frame::Event(e) => e.json.clone(),
        }
    }
}

/// Why a subscription ended.
#[derive(Debug)]
pub enum Ended {
    /// Fell too far behind; resume after `last`.
    Lagged { last: Option<StreamId> },
    /// The server is shutting down.
    Shutdown,
    /// The engine failed during replay.
    Engine(EngineError),
}

/// A subscriber's position: replay, then live.
pub struct Subscription {
    engine: Engine,
    live: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    /// The last id sent (or skipped by the filter); `None` before any.
    last: Option<StreamId>,
    /// The last event handed out of `pending` (replay), or `since`.
    handed: Option<StreamId>,
    replaying: bool,
    /// `since` was trimmed away: a `stream.reset` goes out with the first
    /// replayed batch, naming the log's oldest id when `start` looked.
    trimmed: Option<Option<StreamId>>,
    pending: VecDeque<Frame>,
}

impl Subscription {
    /// Joins the live stream and prepares the replay from `since`.
    pub async fn start(
        state: &AppState,
        since: Option<StreamId>,
        filter: EventFilter,
    ) -> Result<Self, EngineError> {
        let live = state.hub.subscribe(state.config.redis_timeout * 2).await?;
        let mut since = since;
        let mut trimmed = None;
        if let Some(asked) = since {
            let bounds = state.engine.log_bounds().await?;
            let now_ms = u64::try_from(state.clock.now().timestamp_millis()).unwrap_or(0);
            if bounds.trimmed_after(asked) {
                trimmed = Some(bounds.oldest);
            } else if asked.ms > now_ms && bounds.newest.is_none_or(|newest| asked > newest) {
                // No event of this log has that id, nor will one until the
                // clock gets there: taken as it is, every event before then
                // would be dropped as already sent. Such an id comes from
                // another log (one Redis lost, on a host whose clock ran
                // ahead), so every event of this one is news to the client:
                // as for an id trimmed away, it is told, and replay starts
                // from the oldest event.
                trimmed = Some(bounds.oldest);
                since = Some(StreamId::ZERO);
            }
        }
        Ok(Self {
            engine: state.engine.clone(),
            live,
            filter,
            last: since,
            handed: since,
            replaying: since.is_some(),
            trimmed,
            pending: VecDeque::new(),
        })
    }

    /// The next frame. Cancel-safe: state changes only after an await completes.
    pub async fn next(&mut self) -> Result<Frame, Ended> {
        loop {
            if let Some(ready) = self.ready() {
                return ready;
            }
            if self.replaying {
                let after = self.last.unwrap_or(StreamId::ZERO);
                let batch = self
                    .engine
                    .read_events(after, REPLAY_BATCH)
                    .await
                    .map_err(Ended::Engine)?;
                // Trimming can overtake a long replay of a busy log, or
                // pass `since` between `start`'s look and the first read:
                // the client is told, as when `since` itself was trimmed,
                // and replay goes on from what is left. The log is looked
                // at after the read, so trimming before it cannot go
                // unseen (trimming only moves forward; trimming just after
                // the read is told too, though the read missed nothing).
                let mut reset = self.trimmed;
                let bounds = self.engine.log_bounds().await.map_err(Ended::Engine)?;
                if bounds.trimmed_after(after) {
                    reset = Some(bounds.oldest);
                }
                if let Some(oldest) = reset {
                    // The oldest event left when the batch was read is its
                    // first (the next the client gets, unless its filter
                    // passes over it), not one trimmed since.
                    let oldest = batch.first().map(|event| event.id).or(oldest);
                    self.pending.push_back(Frame::Reset { oldest });
                    self.trimmed = None;
                }
                if batch.len() < REPLAY_BATCH {
                    self.replaying = false;
                }
                for event in batch {
                    self.last = Some(event.id);
                    if self.filter.matches(&event) {
                        self.pending.push_back(Frame::Event(Arc::new(event)));
                    }
                }
                continue;
            }
            let received = self.live.recv().await;
            if let Some(outcome) = self.admit(received) {
                return outcome;
            }
        }
    }

    /// A frame that is ready now, without waiting and without reading the
    /// log: lets a writer put everything already queued into one write.
    pub fn try_next(&mut self) -> Option<Result<Frame, Ended>> {
        loop {
            if let Some(ready) = self.ready() {
                return Some(ready);
            }
            if self.replaying {
                return None;
            }
            let received = match self.live.try_recv() {
                Ok(event) => Ok(event),
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
            };
            if let Some(outcome) = self.admit(received) {
                return Some(outcome);
            }
        }
    }

    fn ready(&mut self) -> Option<Result<Frame, Ended>> {
        let frame = self.pending.pop_front()?;
        if let Frame::Event(event) = &frame {
            self.handed = Some(event.id);
        }
        Some(Ok(frame))
    }

    /// Where a client that received every frame handed out so far resumes
    /// (its `since`): after the last event examined, or while replayed
    /// frames are still queued, after the last event handed out (a queued
    /// `stream.reset` is then sent again when it resumes).
    pub fn resume_point(&self) -> Option<StreamId> {
        if self.pending.is_empty() {
            self.last
        } else {
            self.handed
        }
    }

    /// What a live receive yields: a frame, the end, or `None` for an event
    /// already sent during replay or not matching the filter.
    fn admit(
        &mut self,
        received: Result<Arc<Event>, broadcast::error::RecvError>,
    ) -> Option<Result<Frame, Ended>> {
        match received {
            Ok(event) => {
                if self.last.is_some_and(|last| event.id <= last) {
                    return None;
                }
                self.last = Some(event.id);
                self.filter
                    .matches(&event)
                    .then_some(Ok(Frame::Event(event)))
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                Some(Err(Ended::Lagged { last: self.last }))
            }
            Err(broadcast::error::RecvError::Closed) => Some(Err(Ended::Shutdown)),
        }
    }
}

fn check_origin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let allowed = &state.config.allowed_origins;
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return Ok(());
    }
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // The service's own pages (a dashboard it serves) are never foreign.
    if crate::app::is_same_origin(origin, host)
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "origin {origin:?} is not in --allowed-origins"
        )))
    }
}

/// Live events over WebSocket.
///
/// One JSON text frame per event. With `since`, replays everything after
/// that id and then goes live with no gap and no duplicate; if `since` was
/// trimmed away the first frame is `{"type":"stream.reset","oldest_id":…}`,
/// as it is for a `since` after the newest event and in the future (an id
/// of another log: replay then starts from the oldest event).
/// The server pings every 15 s; client frames over 64 KiB close the socket
/// with 1009, a text frame that is not UTF-8 with 1007; a subscriber that falls too far behind is closed with 4008 and
/// the id to resume from.
#[utoipa::path(
    get, path = "/v1/events/ws", tag = "events", params(StreamQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_events_ws(
    _caller: Caller<Subscribe>,
    State(state): State<AppState>,
    headers: HeaderMap,
    crate::extract::ValidQuery(q): crate::extract::ValidQuery<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    check_origin(&state, &headers)?;
    let (since, filter) = parse_position(
        ("since", q.since.as_deref()),
        q.types.as_deref(),
        q.agent_id.as_deref(),
    )?;
    // Checked after the query so that a bad `since` is a 422 either way.
    let ws = ws.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let subscription = Subscription::start(&state, since, filter).await?;
    let guard = state.hub.client_guard();
    let shutdown = state.shutdown.clone();
    let write_interval = state.config.ws_write_interval;
    Ok(ws
        .read_buffer_size(4 * 1024)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            run_socket(socket, subscription, shutdown, write_interval).await;
        }))
}

/// Streams `subscription` to `socket` until either ends.
///
/// Under sustained traffic the socket is written at most once per
/// `write_interval` (`--ws-write-interval-ms`): frames that arrive sooner
/// after the previous write wait for the rest of the interval and go out
/// together, while a frame after a quiet spell is written at once. Each
/// write costs a system call and a trip through the TCP stack; with
/// thousands of sockets and hundreds of events a second, that, not the
/// frames, is what a fan-out spends its CPU on. A write that took a full
/// [`WRITE_BATCH`] left more waiting: the next one goes at once, so the
/// interval never caps how fast a subscriber can read.
async fn run_socket(
    socket: WebSocket,
    mut subscription: Subscription,
    shutdown: tokio_util::sync::CancellationToken,
    write_interval: Duration,
) {
    // The client side is read by a task of its own, so that the writer's
    // wake-ups (one per event) never poll the socket for input.
    let (mut sink, stream) = socket.split();
    let mut client = AbortOnDropHandle::new(tokio::spawn(read_client(stream)));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    // Registered once, not on every wake-up: all sockets share the token.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut last_write: Option<tokio::time::Instant> = None;
    let ended = loop {
        tokio::select! {
            frame = subscription.next() => match frame {
                Ok(frame) => {
                    let due = last_write.map(|at| at + write_interval);
                    if let Some(due) = due.filter(|due| *due > tokio::time::Instant::now()) {
                        tokio::time::sleep_until(due).await;
                    }
                    let sent = tokio::time::timeout(
                        WRITE_TIMEOUT,
                        send_ready(&mut sink, &mut subscription, frame),
                    )
                    .await;
                    match sent {
                        Ok(Ok(Sent { ended: None, full })) => {
                            last_write = (!full).then(tokio::time::Instant::now);
                        }
                        Ok(Ok(Sent { ended: Some(ended), .. })) => break ended,
                        Ok(Err(_)) | Err(_) => return,
                    }
                }
                Err(ended) => break ended,
            },
            end = &mut client => {
                let message = match end {
                    Ok(ClientEnd::TooLarge) => close(1009, "frame too large (limit 64 KiB)".into()),
                    Ok(ClientEnd::NotUtf8) => close(1007, "a text frame that is not UTF-8".into()),
                    _ => return,
                };
                let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await;
                return;
            }
            _ = ping.tick() => {
                let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default())));
                if !matches!(sent.await, Ok(Ok(()))) {
                    return;
                }
            }
            _ = &mut cancelled => break Ended::Shutdown,
        }
    };
    let resume = subscription
        .resume_point()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let message = match ended {
        Ended::Lagged { last } => {
            let resume = last.map(|id| id.to_string()).unwrap_or_default();
            close(CLOSE_LAGGED, format!("lagged; resume with since={resume}"))
        }
        Ended::Shutdown => close(
            1001,
            format!("server shutting down; resume with since={resume}"),
        ),
        Ended::Engine(err) => {
            tracing::warn!(error = %err, "event replay failed");
            close(
                1011,
                format!("storage unavailable; reconnect with since={resume}"),
            )
        }
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await;
}

/// How the client side of a socket ended.
enum ClientEnd {
    /// A close frame, an error, or the connection went away.
    Gone,
    /// A frame over [`MAX_CLIENT_FRAME`].
    TooLarge,
    /// A text frame that is not UTF-8 (RFC 6455: close with 1007).
    NotUtf8,
}

/// Reads (and discards) client frames until the client goes; answering
/// pings is done by the protocol layer while reading. After a client's
/// close frame, the next read sends the protocol's reply and ends the
/// stream, so the client sees a clean close.
async fn read_client(mut stream: SplitStream<WebSocket>) -> ClientEnd {
    while let Some(incoming) = stream.next().await {
        match incoming {
            Ok(_) => {}
            Err(err) => {
                // Frames over the limit surface as capacity errors.
                let text = err.to_string();
                let too_large = text.contains("too long")
                    || text.contains("Space limit")
                    || text.contains("capacity");
                return if too_large {
                    ClientEnd::TooLarge
                } else if text.contains("UTF-8") {
                    ClientEnd::NotUtf8
                } else {
                    ClientEnd::Gone
                };
            }
        }
    }
    ClientEnd::Gone
}

fn close(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// What one [`send_ready`] did.
struct Sent {
    /// How the subscription ended, if it did while draining.
    ended: Option<Ended>,
    /// It wrote a full [`WRITE_BATCH`]: more may be waiting.
    full: bool,
}

/// Writes `first` and every frame already waiting behind it, up to
/// [`WRITE_BATCH`], with one flush: a subscriber that fell behind catches up
/// in a few large writes instead of one system call per event.
async fn send_ready(
    socket: &mut SplitSink<WebSocket, Message>,
    subscription: &mut Subscription,
    first: Frame,
) -> Result<Sent, axum::Error> {
    socket.feed(Message::Text(first.json())).await?;
    let mut sent = Sent {
        ended: None,
        full: true,
    };
    for _ in 1..WRITE_BATCH {
        match subscription.try_next() {
            None => {
                sent.full = false;
                break;
            }
            Some(Ok(frame)) => socket.feed(Message::Text(frame.json())).await?,
            Some(Err(end)) => {
                sent.ended = Some(end);
                break;
            }
        }
    }
    socket.flush().await?;
    Ok(sent)
}

/// One event of `GET /v1/events/sse`, as its fields arrive on the wire (for
/// the API description; the stream is written by axum's SSE support).
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "only described, never built: axum writes the stream"
)]
struct SseEvent {
    /// The frame's JSON: an event envelope, `stream.reset`, or, on an
    /// `error` event, why the stream ends (`stream.lagged`,
    /// `stream.closed`, `stream.unavailable`) and where to resume
    /// (`resume_from`: the id to send as `Last-Event-ID`, null to start
    /// from the live end).
    data: String,
    /// The event's id, for `Last-Event-ID` (absent on other frames).
    id: Option<String>,
    /// `error` on the last event of a stream that ends; absent otherwise.
    event: Option<String>,
}

/// Live events as Server-Sent Events.
///
/// The same stream as the WebSocket, as `text/event-stream` with `id:` lines,
/// so `curl -N` can tail it; honours `Last-Event-ID` (over `since`).
#[utoipa::path(
    get, path = "/v1/events/sse", tag = "events",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header,
         description = "Where a reconnecting client stopped: the id of the last event it received"),
    ),
    responses(
        (status = 200, description = "An event stream, one `SseEvent` per event",
         content_type = "text/event-stream", body = SseEvent),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_events_sse(
    _caller: Caller<Subscribe>,
    State(state): State<AppState>,
    headers: HeaderMap,
    crate::extract::ValidQuery(q): crate::extract::ValidQuery<StreamQuery>,
) -> ApiResult<Response> {
    check_origin(&state, &headers)?;
    let (since, filter) = parse_position(
        ("since", q.since.as_deref()),
        q.types.as_deref(),
        q.agent_id.as_deref(),
    )?;
    // A reconnecting browser sends where it stopped; that wins over `since`.
    let not_an_id = || ApiError::invalid("Last-Event-ID", "is not an event id");
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().map_err(|_| not_an_id()))
        .transpose()?
        .filter(|s| !s.is_empty());
    let since = match last_event_id {
        Some(id) => Some(id.parse::<StreamId>().map_err(|_| not_an_id())?),
        None => since,
    };
    let subscription = Subscription::start(&state, since, filter).await?;
    let guard = state.hub.client_guard();
    let shutdown = state.shutdown.clone();
    Ok(Sse::new(sse_stream(subscription, shutdown, guard))
        .keep_alive(sse::KeepAlive::new().interval(PING_EVERY))
        .into_response())
}

fn sse_stream(
    subscription: Subscription,
    shutdown: tokio_util::sync::CancellationToken,
    guard: crate::events::hub::ClientGuard,
) -> impl Stream<Item = Result<sse::Event, Infallible>> {
    // Registered with the shutdown token once, not again for every event.
    let cancelled = Box::pin(shutdown.cancelled_owned());
    futures_util::stream::unfold(Some((subscription, cancelled, guard)), |state| async move {
        let (mut sub, mut cancelled, guard) = state?;
        let next = tokio::select! {
            next = sub.next() => next,
            _ = &mut cancelled => Err(Ended::Shutdown),
        };
        match next {
            Ok(frame) => {
                let mut event = sse::Event::default().data(frame.json().as_str());
                if let Frame::Event(e) = &frame {
                    event = event.id(e.id.to_string());
                }
                Some((Ok(event), Some((sub, cancelled, guard))))
            }
            Err(ended) => {
                let (kind, resume_from) = match ended {
                    Ended::Lagged { last } => ("stream.lagged", last),
                    Ended::Shutdown => ("stream.closed", sub.resume_point()),
                    Ended::Engine(_) => ("stream.unavailable", sub.resume_point()),
                };
                let detail = serde_json::json!({
                    "type": kind,
                    "resume_from": resume_from.map(|id| id.to_string()),
                });
                // A final event, then the stream ends (the client resumes
                // with Last-Event-ID).
                Some((
                    Ok(sse::Event::default()
                        .event("error")
                        .data(detail.to_string())),
                    None,
                ))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventBody;

    /// A stream that ends while replayed events are still queued resumes
    /// after the last one handed out, not after the end of the queue; once
    /// the queue is empty, after the last event examined.
    #[tokio::test]
    async fn the_resume_point_is_the_last_event_handed_out() {
        let state = crate::app::build(crate::config::Config::for_tests())
            .await
            .expect("app builds")
            .state;
        let tailer = state
            .hub
            .spawn_tailer(state.engine.clone(), state.shutdown.clone());
        let mut ids = Vec::new();
        for n in 0..10 {
            let body = EventBody::new(
                "test.resume",
                "test",
                None,
                state.clock.now(),
                serde_json::json!({ "n": n }),
            );
            ids.push(state.engine.publish(body).await.expect("published"));
        }
        let mut sub = Subscription::start(&state, Some(StreamId::ZERO), EventFilter::default())
            .await
            .expect("subscribed");
        assert_eq!(sub.resume_point(), Some(StreamId::ZERO));
        let Ok(Frame::Event(first)) = sub.next().await else {
            panic!("an event first");
        };
        assert_eq!(first.id, ids[0]);
        // The other nine are read and queued, not yet handed out.
        assert_eq!(sub.resume_point(), Some(ids[0]));
        for _ in 1..10 {
            sub.next().await.expect("a frame");
        }
        assert_eq!(sub.resume_point(), Some(ids[9]));
        state.shutdown.cancel();
        tailer.await.expect("the tailer stops");
    }
}
