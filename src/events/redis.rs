//! The Redis engine's event log: one Stream.
//!
//! Each entry stores `t` (type), `a` (agent id or empty), `w` (wake-up key
//! or empty) and `b` (the envelope without its id), written by the `emit`
//! function of [`EMIT_PRELUDE`](crate::engine::redis::EMIT_PRELUDE) or by
//! [`RedisEngine::publish`].

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use crate::engine::redis::{RedisEngine, passed_over, script};
use crate::engine::{EngineError, EngineResult};
use crate::events::{Event, EventBody, LogBounds, StreamId, Wake};

type Entry = (String, Vec<(String, String)>);

/// Appends one event through `emit`, so that a wake-up key also reaches the
/// wake-up stream. ARGV: 2 type, 3 agent id or '', 4 wake-up key or '',
/// 5 body.
static PUBLISH: LazyLock<Script> =
    LazyLock::new(|| script("return emit(ARGV[2], ARGV[3], ARGV[4], ARGV[5])"));

fn decode_wakes(entries: Vec<Entry>) -> EngineResult<Vec<Wake>> {
    Ok(skip_unreadable(entries.into_iter().map(|(id, fields)| {
        let id: StreamId = id.parse().map_err(EngineError::Corrupt)?;
        let key = fields
            .into_iter()
            .find_map(|(name, value)| (name == "w").then_some(value))
            .ok_or_else(|| EngineError::Corrupt(format!("wake-up {id} lacks its key")))?;
        Ok((id, key))
    })))
}

/// The entries that decode. One that does not (written by hand, or by a
/// future version) is logged, counted and passed over: failing the whole
/// read would stop the tailer at it for good, and every subscriber and
/// waiter with it, until trimming removed it.
fn skip_unreadable<T>(decoded: impl Iterator<Item = EngineResult<T>>) -> Vec<T> {
    decoded
        .filter_map(|entry| {
            passed_over(entry, "event log entry", || {
                metrics::counter!("attune_events_unreadable_total")
            })
        })
        .collect()
}

fn decode(entry: Entry) -> EngineResult<Event> {
    let (id, fields) = entry;
    let id: StreamId = id.parse().map_err(EngineError::Corrupt)?;
    let mut kind = String::new();
    let mut agent = None;
    let mut wake = None;
    let mut body = String::new();
    for (name, value) in fields {
        match name.as_str() {
            "t" => kind = value,
            "a" if !value.is_empty() => agent = Some(value),
            "w" if !value.is_empty() => wake = Some(value),
            "b" => body = value,
            _ => {}
        }
    }
    if kind.is_empty() || body.is_empty() {
        return Err(EngineError::Corrupt(format!(
            "event {id} lacks its type or body"
        )));
    }
    Ok(Event::assemble(id, kind, agent, wake, &body))
}

impl RedisEngine {
    pub async fn publish(&self, event: EventBody) -> EngineResult<StreamId> {
        let id: String = self
            .invoke(
                &PUBLISH,
                &[] as &[&str],
                &[
                    event.kind,
                    event.agent_id.unwrap_or_default(),
                    event.wake.unwrap_or_default(),
                    event.json,
                ],
            )
            .await?;
        id.parse().map_err(EngineError::Corrupt)
    }

    pub async fn read_events(&self, after: StreamId, count: usize) -> EngineResult<Vec<Event>> {
        // Redis refuses an exclusive range that starts past the last id.
        if after == StreamId::MAX {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let entries: Vec<Entry> = self
            .run(
                redis::cmd("XRANGE")
                    .arg(self.keys.events())
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(skip_unreadable(entries.into_iter().map(decode)))
    }

    pub async fn log_bounds(&self) -> EngineResult<LogBounds> {
        let mut conn = self.conn();
        let info: Result<HashMap<String, Value>, _> = self
            .run(
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(self.keys.events())
                    .query_async(&mut conn),
            )
            .await;
        let info = match info {
            Ok(info) => info,
            // No stream yet: an empty log that never trimmed anything.
            Err(EngineError::Corrupt(msg)) if msg.contains("no such key") => {
                return Ok(LogBounds {
                    oldest: None,
                    newest: None,
                    max_deleted: StreamId::ZERO,
                });
            }
            Err(e) => return Err(e),
        };
        let entry_id = |name: &str| -> Option<StreamId> {
            match info.get(name)? {
                Value::Array(items) => match items.first()? {
                    Value::BulkString(id) => std::str::from_utf8(id).ok()?.parse().ok(),
                    _ => None,
                },
                _ => None,
            }
        };
        let int = |name: &str| match info.get(name) {
            Some(Value::Int(n)) => *n,
            _ => 0,
        };
        let oldest = entry_id("first-entry");
        // `max-deleted-entry-id` only tracks XDEL; MAXLEN trimming removes
        // from the front without recording what it removed. When more
        // entries were ever added than remain, everything before the oldest
        // remaining entry may be gone: report the id just before it.
        let max_deleted = match oldest {
            Some(oldest) if int("entries-added") > int("length") => oldest.prev(),
            _ => StreamId::ZERO,
        };
        Ok(LogBounds {
            oldest,
            newest: entry_id("last-entry"),
            max_deleted,
        })
    }

    /// `XREAD BLOCK` of one stream on the dedicated connection: its entries
    /// after `after`, at most `count`.
    async fn blocking_read(
        &self,
        stream: String,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Entry>> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(stream)
            .arg(after.to_string());
        let reply: Option<Vec<(String, Vec<Entry>)>> = self.blocking_query(&cmd, block).await?;
        Ok(reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .collect())
    }

    /// `XREAD BLOCK` of the log on the dedicated connection.
    pub async fn wait_events(
        &self,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Event>> {
        let entries = self
            .blocking_read(self.keys.events(), after, count, block)
            .await?;
        Ok(skip_unreadable(entries.into_iter().map(decode)))
    }

    /// Wake-ups after `after` up to and including `through`, oldest first.
    pub async fn read_wakes(&self, after: StreamId, through: StreamId) -> EngineResult<Vec<Wake>> {
        let mut conn = self.conn();
        let entries: Vec<Entry> = self
            .run(
                redis::cmd("XRANGE")
                    .arg(self.keys.event_wakes())
                    .arg(format!("({after}"))
                    .arg(through.to_string())
                    .query_async(&mut conn),
            )
            .await?;
        decode_wakes(entries)
    }

    /// `XREAD BLOCK` of the wake-up stream on the dedicated connection.
    pub async fn wait_wakes(
        &self,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Wake>> {
        let entries = self
            .blocking_read(self.keys.event_wakes(), after, count, block)
            .await?;
        decode_wakes(entries)
    }
}
