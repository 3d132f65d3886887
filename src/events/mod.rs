//! The event log: one ordered stream of everything that happens.
//!
//! Every domain module appends to it (a heartbeat, a signal sent, an approval
//! decided, …) through its engine operations, inside the same atomic step as
//! the state change. On Redis the log is a Stream; on the memory engine an
//! in-process ring with the same ids and the same trimming.
//!
//! Reading it live goes through the [`hub::Hub`]: one tailer per process
//! reads the log and fans each event out in-process to every WebSocket and
//! SSE subscriber and to every long-poll waiter, so the number of Redis
//! connections never grows with the number of clients.
//!
//! - [`http`] — `POST /v1/events`, `GET /v1/events` (history).
//! - [`live`] — `GET /v1/events/ws` and `GET /v1/events/sse`: replay from
//!   `since`, then live, with no gap and no duplicate.

pub mod http;
pub mod hub;
pub mod live;
mod memory;
mod redis;

pub use memory::EventRing;

use std::fmt;
use std::str::FromStr;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::{Engine, EngineResult, dispatch};
use crate::types::{Id, TypeFilter, rfc3339};

/// A stream entry id, `<milliseconds>-<sequence>`, ordered like Redis's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
    /// No id is larger.
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The largest id strictly smaller than this one (`0-0` stays `0-0`).
    pub fn prev(self) -> StreamId {
        match (self.ms, self.seq) {
            (0, 0) => self,
            (ms, 0) => StreamId {
                ms: ms - 1,
                seq: u64::MAX,
            },
            (ms, seq) => StreamId { ms, seq: seq - 1 },
        }
    }

    /// The smallest id strictly greater than this one.
    pub fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

// An event id as a query parameter, for the API description: what
// `StreamId::from_str` takes, or empty for none. (A plain comment: a doc
// comment would become the schema's description.)
#[derive(ToSchema)]
#[schema(value_type = String, pattern = r"^([0-9]{1,19}(-[0-9]{1,19})?)?$")]
#[expect(dead_code, reason = "only described: the value is read as a StreamId")]
pub struct EventIdParam(String);

impl FromStr for StreamId {
    type Err = String;

    /// Accepts `ms-seq` or a bare `ms` (meaning `ms-0`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an event id (expected <ms>-<seq>)");
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        // At most 19 digits a part, which any id Redis makes fits in (its
        // milliseconds have 13), and so does the API description's pattern.
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 19 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(StreamId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// An event before it has an id: what a domain operation appends.
#[derive(Debug, Clone)]
pub struct EventBody {
    /// Event type (`agent.down`, `approval.decided`, a custom type, …).
    pub kind: String,
    /// The agent the event is about, if any (for `agent_id` filters).
    pub agent_id: Option<String>,
    /// The envelope without its `id`, serialized once: `{"type",…,"data"}`.
    pub json: String,
    /// In-process wake-up key for long-poll waiters (`signal:agent-1`,
    /// `approval:<id>`); stored with the entry so that every replica's
    /// tailer wakes its own waiters. Not part of the envelope.
    pub wake: Option<String>,
}

#[derive(Serialize)]
struct Envelope<'a, D> {
    #[serde(rename = "type")]
    kind: &'a str,
    ts: String,
    source: &'a str,
    agent_id: Option<&'a str>,
    data: &'a D,
}

impl EventBody {
    /// Builds an event of `kind` from `source` (a key name or `system`);
    /// `data` is anything that serializes to a JSON object.
    pub fn new(
        kind: &str,
        source: &str,
        agent_id: Option<&Id>,
        ts: DateTime<Utc>,
        data: impl Serialize,
    ) -> Self {
        let json = serde_json::to_string(&Envelope {
            kind,
            ts: rfc3339(ts),
            source,
            agent_id: agent_id.map(Id::as_str),
            data: &data,
        })
        .expect("an envelope of JSON values always serializes");
        Self {
            kind: kind.to_owned(),
            agent_id: agent_id.map(|a| a.as_str().to_owned()),
            json,
            wake: None,
        }
    }

    /// Sets the wake-up key of long-poll waiters interested in this event.
    pub fn waking(mut self, key: impl Into<String>) -> Self {
        self.wake = Some(key.into());
        self
    }
}

/// A stored event: what subscribers receive.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: StreamId,
    pub kind: String,
    pub agent_id: Option<String>,
    pub wake: Option<String>,
    /// The full envelope with its `id`, serialized once and shared by every
    /// subscriber (cloning `Utf8Bytes` is a reference-count increment).
    pub json: Utf8Bytes,
}

impl Event {
    /// Splices the id into an envelope serialized without one.
    pub fn assemble(
        id: StreamId,
        kind: String,
        agent_id: Option<String>,
        wake: Option<String>,
        body: &str,
    ) -> Self {
        let rest = body.strip_prefix('{').unwrap_or(body);
        let json = format!("{{\"id\":\"{id}\",{rest}");
        Self {
            id,
            kind,
            agent_id,
            wake,
            json: json.into(),
        }
    }
}

/// The envelope, as documented in the API.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventEnvelope {
    /// Stream entry id (`<ms>-<seq>`); pass it back as `since` to resume.
    #[schema(example = "1764089000000-0")]
    pub id: String,
    #[serde(rename = "type")]
    #[schema(example = "agent.down")]
    pub kind: String,
    /// When the event was recorded (RFC 3339, UTC, milliseconds).
    pub ts: String,
    /// Who caused it: the API key's name, or `system` for the service itself.
    pub source: String,
    #[schema(required = true)]
    pub agent_id: Option<String>,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub types: TypeFilter,
    pub agent_id: Option<Id>,
}

impl EventFilter {
    pub fn matches(&self, event: &Event) -> bool {
        self.types.matches(&event.kind)
            && self
                .agent_id
                .as_ref()
                .is_none_or(|a| event.agent_id.as_deref() == Some(a.as_str()))
    }
}

/// What the log looks like from a reader at `since`.
#[derive(Debug, Clone, Copy)]
pub struct LogBounds {
    /// The oldest entry still in the log, if any.
    pub oldest: Option<StreamId>,
    /// The newest entry, if any.
    pub newest: Option<StreamId>,
    /// The largest id ever trimmed away (`0-0` if none).
    pub max_deleted: StreamId,
}

impl LogBounds {
    /// Whether entries after `since` may be gone: trimmed away, or lost
    /// with an earlier log. A log that never trimmed holds every entry it
    /// ever had, so a `since` before its oldest entry (other than `0-0`,
    /// the beginning) was never in it: it comes from the log Redis had
    /// before it lost its data (or the memory engine before a restart),
    /// and what followed it there is gone.
    pub fn trimmed_after(&self, since: StreamId) -> bool {
        self.max_deleted > since
            || (self.max_deleted == StreamId::ZERO
                && since != StreamId::ZERO
                && self.oldest.is_some_and(|oldest| since < oldest))
    }
}

/// A wake-up: the id of the event that carries it, and the key (read from
/// the Redis engine's wake-up stream, or the memory engine's log).
pub type Wake = (StreamId, String);

impl Engine {
    /// Entries with ids strictly after `after`, oldest first, at most `count`.
    pub async fn read_events(&self, after: StreamId, count: usize) -> EngineResult<Vec<Event>> {
        dispatch!(self, read_events(after, count))
    }

    /// The oldest, newest and largest-trimmed ids of the log.
    pub async fn log_bounds(&self) -> EngineResult<LogBounds> {
        dispatch!(self, log_bounds())
    }

    /// Waits up to `block` for entries after `after` (`XREAD BLOCK`). Only
    /// the hub's tailer calls this: on Redis it uses a dedicated connection.
    pub async fn wait_events(
        &self,
        after: StreamId,
        count: usize,
        block: std::time::Duration,
    ) -> EngineResult<Vec<Event>> {
        dispatch!(self, wait_events(after, count, block))
    }

    /// Wake-ups of events with ids in `(after, through]`.
    pub async fn read_wakes(&self, after: StreamId, through: StreamId) -> EngineResult<Vec<Wake>> {
        dispatch!(self, read_wakes(after, through))
    }

    /// Waits up to `block` for wake-ups after `after` (at most `count`).
    /// Only the hub's tailer calls this, while no client follows the log.
    pub async fn wait_wakes(
        &self,
        after: StreamId,
        count: usize,
        block: std::time::Duration,
    ) -> EngineResult<Vec<Wake>> {
        dispatch!(self, wait_wakes(after, count, block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_order_and_reject_garbage() {
        let a: StreamId = "1700000000000-5".parse().unwrap();
        let b: StreamId = "1700000000001".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "1700000000000-5");
        assert_eq!(a.next().to_string(), "1700000000000-6");
        for bad in [
            "",
            "abc",
            "1-",
            "-1",
            "1-2-3",
            "1 2",
            "99999999999999999999999",
            // 20 digits: beyond the documented pattern, though a u64.
            "10000000000000000000-0",
            "1-10000000000000000000",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
        let widest: StreamId = "9999999999999999999-9999999999999999999".parse().unwrap();
        assert_eq!(
            widest.to_string(),
            "9999999999999999999-9999999999999999999"
        );
    }

    #[test]
    fn assembling_splices_the_id_into_the_envelope() {
        let body = EventBody::new("x.y", "k", None, Utc::now(), serde_json::json!({"a": 1}));
        let event = Event::assemble("5-1".parse().unwrap(), body.kind, None, None, &body.json);
        let v: serde_json::Value = serde_json::from_str(event.json.as_str()).unwrap();
        assert_eq!(v["id"], "5-1");
        assert_eq!(v["type"], "x.y");
        assert_eq!(v["data"]["a"], 1);
    }
}
