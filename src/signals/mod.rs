//! Coordination signals: typed messages between agents, with TTLs.
//!
//! `POST /v1/signals` stores a signal for one agent (`target_agent`) or for
//! every agent (a broadcast) until `ttl_seconds` have passed. An agent reads
//! its inbox — the signals targeted at it plus the live broadcasts it has not
//! consumed — oldest first, optionally consuming what it reads and optionally
//! holding the request until something arrives.
//!
//! Broadcasts are stored once, globally, not fanned out per agent: an agent
//! that appears after a broadcast was sent still receives it while it is
//! live. Consuming a broadcast records a per-broadcast marker for that agent
//! only, which lives exactly as long as the broadcast, so every agent
//! receives each broadcast at most once — and exactly once if it reads with
//! `consume=true` before the TTL ends.
//!
//! Expiry needs no sweeper: every stored piece carries the signal's expiry
//! (Redis key expiry, or an expiry queue pruned by every operation on the
//! memory engine and lazily on Redis), and reads skip anything past it.
//!
//! Long-poll waits are pushed, never polled: a send appends `signal.sent`
//! with the wake-up key of its inbox ([`wake_key`]) in the same atomic step,
//! and every replica's event tailer wakes its own waiters
//! ([`crate::events::hub::wait_for`]).
//!
//! A consuming read takes its signals in the same atomic step that answers
//! it, so an answer lost on the way (the client gave up, the connection
//! broke, Redis answered after the service stopped waiting) would lose
//! them. A consuming read may therefore carry an `Idempotency-Key`: the
//! step that takes signals also keeps what it took under that key for
//! [`RECEIPT_TTL`], and a retry with the same key and query gets the same
//! signals again instead of taking more.

pub mod http;
pub mod memory;
mod redis;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agents::IndexCursor;
use crate::app::AppState;
use crate::auth::{Identity, Role};
use crate::engine::{Engine, EngineResult, dispatch};
use crate::error::{ApiError, ApiResult};
use crate::events::EventBody;
use crate::events::hub::wait_for;
use crate::types::{Bounded, Id, JsonObject, from_millis, rfc3339};

/// `ttl_seconds` of a signal: 1–86400, default 60.
pub type SignalTtl = Bounded<1, 86_400>;
const DEFAULT_TTL: SignalTtl = SignalTtl::constant(60);

/// `wait_seconds` of an inbox read: 0–60.
pub type WaitSeconds = crate::types::Param<0, 60>;

/// How long a consuming read with an `Idempotency-Key` keeps its answer
/// for a retry.
pub const RECEIPT_TTL: Duration = Duration::from_secs(600);

/// Most index entries one `GET /v1/signals` page examines, on either
/// engine: a filter that matches little answers a short page (with a
/// cursor to go on) in bounded time.
pub const LIST_SCAN_BUDGET: usize = 10_000;

/// The wake-up key of waiters on the broadcast inbox. `*` cannot occur in an
/// [`Id`], so it never collides with an agent's key.
pub const BROADCAST_WAKE: &str = "signal:*broadcast";

/// The wake-up key a send to `target` carries (`None`: a broadcast).
pub fn wake_key(target: Option<&Id>) -> String {
    match target {
        Some(agent) => format!("signal:{agent}"),
        None => BROADCAST_WAKE.to_owned(),
    }
}

/// The body of `POST /v1/signals` and `POST /v1/signals/broadcast`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SignalRequest {
    /// What the signal means to its readers: `task_complete`, `abort`, `ready`, …
    pub signal_type: Id,
    /// The sending agent (must be in the key's scope).
    pub source_agent: Id,
    /// The receiving agent; absent for a broadcast to every agent. Must be
    /// absent on `/v1/signals/broadcast`.
    pub target_agent: Option<Id>,
    /// Free-form data for the readers (at most 64 KiB serialized, 32 levels deep).
    pub payload: Option<JsonObject>,
    /// Seconds the signal stays deliverable: 1–86400, default 60.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 86400)]
    pub ttl_seconds: Option<SignalTtl>,
}

/// A signal as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Signal {
    /// UUIDv7, assigned by the server.
    pub signal_id: String,
    pub signal_type: String,
    pub source_agent: String,
    /// Null for a broadcast.
    #[schema(required = true)]
    pub target_agent: Option<String>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    /// After this instant the signal is never delivered again.
    pub expires_at: String,
    pub ttl_seconds: u64,
}

impl Signal {
    /// Where this signal stands in an inbox, `(created ms, id)`; `None`
    /// only for a `created_at` this service did not write.
    pub fn position(&self) -> Option<IndexCursor> {
        let created = DateTime::parse_from_rfc3339(&self.created_at).ok()?;
        Some(IndexCursor {
            score: created.timestamp_millis(),
            member: self.signal_id.clone(),
        })
    }
}

/// A validated signal with everything the engines index it by.
#[derive(Debug, Clone)]
pub struct SignalRecord {
    pub signal_id: String,
    pub signal_type: Id,
    pub source_agent: Id,
    pub target_agent: Option<Id>,
    pub payload: JsonObject,
    pub created_ms: i64,
    /// The signal is live while `now < expires_ms`.
    pub expires_ms: i64,
    pub ttl_seconds: u64,
}

impl SignalRecord {
    pub fn view(&self) -> Signal {
        Signal {
            signal_id: self.signal_id.clone(),
            signal_type: self.signal_type.to_string(),
            source_agent: self.source_agent.to_string(),
            target_agent: self.target_agent.as_ref().map(Id::to_string),
            payload: self.payload.as_map().clone(),
            created_at: rfc3339(from_millis(self.created_ms)),
            expires_at: rfc3339(from_millis(self.expires_ms)),
            ttl_seconds: self.ttl_seconds,
        }
    }

    pub fn is_live(&self, now_ms: i64) -> bool {
        now_ms < self.expires_ms
    }
}

/// What an inbox read wants.
#[derive(Debug, Clone)]
pub struct InboxQuery {
    pub signal_type: Option<Id>,
    pub source: Option<Id>,
    pub limit: usize,
    /// Remove what is returned from this agent's inbox.
    pub consume: bool,
    /// The `Idempotency-Key` of a consuming read (ignored otherwise): what
    /// the read takes is kept under it, and a read with the same key gets
    /// that again.
    pub receipt: Option<String>,
    /// Only signals after this position (a read that does not consume,
    /// paging): `(created ms, signal id)`, the inbox's order.
    pub after: Option<IndexCursor>,
}

impl InboxQuery {
    /// The key a consuming read keeps its answer under, if it has one.
    pub fn receipt(&self) -> Option<&str> {
        self.receipt.as_deref().filter(|_| self.consume)
    }

    /// What a retry must ask again to be answered from the receipt.
    pub fn fingerprint(&self) -> String {
        let text = |id: &Option<Id>| id.as_ref().map_or("", Id::as_str).to_owned();
        format!(
            "type={} source={} limit={}",
            text(&self.signal_type),
            text(&self.source),
            self.limit
        )
    }
}

/// The signals of a kept answer that have not expired since: a retry never
/// returns an expired signal either.
pub fn live_only(mut signals: Vec<Signal>, now_ms: i64) -> Vec<Signal> {
    let now = rfc3339(from_millis(now_ms));
    // Both are RFC 3339 UTC with milliseconds: they order as text.
    signals.retain(|s| s.expires_at > now);
    signals
}

/// What an inbox read answered.
#[derive(Debug)]
pub enum InboxAnswer {
    /// The signals: those just read, or, for a retried consuming read,
    /// those its key's first read took.
    Signals(Vec<Signal>),
    /// The `Idempotency-Key` belongs to a read with another query.
    KeyReused,
}

/// Which live signals `GET /v1/signals` lists.
#[derive(Debug, Clone, Default)]
pub struct SignalFilter {
    pub signal_type: Option<Id>,
    pub source: Option<Id>,
    /// Only signals targeted at this agent (broadcasts excluded).
    pub target: Option<Id>,
}

impl SignalFilter {
    pub fn matches(&self, signal_type: &str, source: &str, target: Option<&str>) -> bool {
        self.signal_type
            .as_ref()
            .is_none_or(|t| t.as_str() == signal_type)
            && self.source.as_ref().is_none_or(|s| s.as_str() == source)
            && self
                .target
                .as_ref()
                .is_none_or(|t| Some(t.as_str()) == target)
    }
}

impl Engine {
    /// Stores a signal and appends its `signal.sent` event atomically.
    pub async fn send_signal(&self, record: SignalRecord, event: EventBody) -> EngineResult<()> {
        dispatch!(self, send_signal(record, event))
    }

    /// The live signals in `agent`'s inbox (targeted at it, plus broadcasts
    /// it has not consumed), oldest first; consumes them atomically if asked,
    /// keeping a non-empty answer under the query's receipt key.
    pub async fn read_inbox(
        &self,
        agent: &Id,
        query: &InboxQuery,
        now_ms: i64,
    ) -> EngineResult<InboxAnswer> {
        dispatch!(self, read_inbox(agent, query, now_ms))
    }

    /// One page of live signals, oldest first, from `cursor`.
    pub async fn list_signals(
        &self,
        filter: &SignalFilter,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<Signal>, Option<IndexCursor>)> {
        dispatch!(self, list_signals(filter, now_ms, cursor, limit))
    }

    /// Empties `agent`'s inbox (of one type, if given): targeted signals are
    /// deleted, broadcasts are marked consumed for this agent only. Returns
    /// how many signals left the inbox; appends `event` if any did.
    pub async fn clear_inbox(
        &self,
        agent: &Id,
        signal_type: Option<&Id>,
        now_ms: i64,
        event: EventBody,
    ) -> EngineResult<u64> {
        dispatch!(self, clear_inbox(agent, signal_type, now_ms, event))
    }
}

/// Validates scope and sends a signal. `broadcast` is true on
/// `/v1/signals/broadcast`, where a `target_agent` is a mistake.
pub async fn send_signal(
    state: &AppState,
    caller: &Identity,
    req: SignalRequest,
    broadcast: bool,
) -> ApiResult<Signal> {
    if broadcast && req.target_agent.is_some() {
        return Err(ApiError::invalid(
            "target_agent",
            "must be absent: a broadcast goes to every agent",
        ));
    }
    caller.ensure_may_act_as(&req.source_agent, "source_agent")?;
    let now = state.clock.now();
    let ttl_seconds = req.ttl_seconds.unwrap_or(DEFAULT_TTL).get();
    let created_ms = now.timestamp_millis();
    let record = SignalRecord {
        signal_id: uuid::Uuid::now_v7().to_string(),
        signal_type: req.signal_type,
        source_agent: req.source_agent,
        target_agent: req.target_agent,
        payload: req.payload.unwrap_or_default(),
        created_ms,
        expires_ms: created_ms + (ttl_seconds * 1000) as i64,
        ttl_seconds,
    };
    let view = record.view();
    let event = sent_event(&caller.name, &record, &view, now);
    state.engine.send_signal(record, event).await?;
    Ok(view)
}

/// The `signal.sent` event: the whole signal, waking the target's inbox.
fn sent_event(source: &str, record: &SignalRecord, view: &Signal, ts: DateTime<Utc>) -> EventBody {
    EventBody::new("signal.sent", source, Some(&record.source_agent), ts, view)
        .waking(wake_key(record.target_agent.as_ref()))
}

/// Reads an inbox, waiting up to `wait` for something to arrive when it is
/// empty. Agent keys may only read the inboxes in their scope (others are a
/// 404, as if they did not exist); consuming needs a role that writes.
pub async fn read_inbox(
    state: &AppState,
    caller: &Identity,
    agent: Id,
    query: InboxQuery,
    wait: Duration,
) -> ApiResult<Vec<Signal>> {
    if !caller.may_act_as(&agent) {
        return Err(ApiError::not_found(format!("no inbox for agent {agent:?}")));
    }
    if query.consume && !matches!(caller.role, Role::Agent | Role::Admin) {
        return Err(ApiError::Forbidden(format!(
            "key {:?} ({}) may read inboxes but not consume from them",
            caller.name,
            caller.role.as_str()
        )));
    }
    let engine = &state.engine;
    let read = || async {
        match engine
            .read_inbox(&agent, &query, state.clock.now_ms())
            .await?
        {
            InboxAnswer::Signals(signals) => {
                let found = !signals.is_empty();
                Ok((signals, found))
            }
            InboxAnswer::KeyReused => Err(ApiError::invalid(
                crate::extract::IDEMPOTENCY_KEY,
                "was used by a consuming read with another type, source or limit",
            )),
        }
    };
    if wait.is_zero() {
        return read().await.map(|(signals, _)| signals);
    }
    let keys = [wake_key(Some(&agent)), BROADCAST_WAKE.to_owned()];
    wait_for(&state.hub, &keys, wait, read).await
}

/// Clears an inbox: the agent itself (an agent key in scope) or an admin.
pub async fn clear_inbox(
    state: &AppState,
    caller: &Identity,
    agent: Id,
    signal_type: Option<Id>,
) -> ApiResult<u64> {
    if !caller.may_act_as(&agent) {
        return Err(ApiError::not_found(format!("no inbox for agent {agent:?}")));
    }
    let now = state.clock.now();
    let event = EventBody::new(
        "signal.cleared",
        &caller.name,
        Some(&agent),
        now,
        serde_json::json!({ "signal_type": signal_type }),
    );
    let cleared = state
        .engine
        .clear_inbox(&agent, signal_type.as_ref(), now.timestamp_millis(), event)
        .await?;
    Ok(cleared)
}

/// Starts the sweeper that frees expired signals on the memory engine,
/// where nothing else would until the next signal operation. Redis needs
/// none: a signal's keys expire by themselves, and the scripts drop its
/// index entries.
pub fn spawn_sweeper(state: AppState) -> Option<tokio::task::JoinHandle<()>> {
    let Engine::Memory(memory) = &state.engine else {
        return None;
    };
    let memory = memory.clone();
    Some(crate::sweeper::spawn(
        state,
        "sweep_signals",
        move |_, now_ms, limit| std::future::ready(Ok(memory.prune_signals(now_ms, limit))),
        |_, _| async { Ok(()) },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_keys_of_agents_never_collide_with_the_broadcast_key() {
        let agent = Id::new("broadcast").unwrap();
        assert_eq!(wake_key(Some(&agent)), "signal:broadcast");
        assert_ne!(wake_key(Some(&agent)), wake_key(None));
    }

    #[test]
    fn a_signal_is_live_until_its_expiry_instant() {
        let record = SignalRecord {
            signal_id: "x".into(),
            signal_type: Id::new("ready").unwrap(),
            source_agent: Id::new("a").unwrap(),
            target_agent: None,
            payload: JsonObject::default(),
            created_ms: 1_000,
            expires_ms: 61_000,
            ttl_seconds: 60,
        };
        assert!(record.is_live(60_999));
        assert!(!record.is_live(61_000));
        let view = record.view();
        assert_eq!(view.created_at, "1970-01-01T00:00:01.000Z");
        assert_eq!(view.target_agent, None);
    }

    #[test]
    fn filters_match_type_source_and_target() {
        let f = SignalFilter {
            signal_type: Some(Id::new("ready").unwrap()),
            source: None,
            target: Some(Id::new("b").unwrap()),
        };
        assert!(f.matches("ready", "a", Some("b")));
        assert!(!f.matches("ready", "a", None));
        assert!(!f.matches("abort", "a", Some("b")));
        assert!(SignalFilter::default().matches("x", "y", None));
    }
}
