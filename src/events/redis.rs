//! The Redis engine's event log: one Stream.
//!
//! Each entry stores `t` (type), `a` (agent id or empty), `w` (wake-up key
//! or empty) and `b` (the envelope without its id), written by the `emit`
//! function of [`EMIT_PRELUDE`](crate::engine::redis::EMIT_PRELUDE) or by
//! [`RedisEngine::publish`].

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use crate::engine::redis::RedisEngine;
use crate::engine::{EngineError, EngineResult};
use crate::events::{Event, EventBody, LogBounds, StreamId};

type Entry = (String, Vec<(String, String)>);

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
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.keys.events())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.stream_max_len)
            .arg("*")
            .arg("t")
            .arg(&event.kind)
            .arg("a")
            .arg(event.agent_id.as_deref().unwrap_or(""))
            .arg("w")
            .arg(event.wake.as_deref().unwrap_or(""))
            .arg("b")
            .arg(&event.json);
        let mut conn = self.conn();
        let id: String = self.run(cmd.query_async(&mut conn)).await?;
        id.parse().map_err(EngineError::Corrupt)
    }

    pub async fn read_events(&self, after: StreamId, count: usize) -> EngineResult<Vec<Event>> {
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
        entries.into_iter().map(decode).collect()
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

    /// `XREAD BLOCK` on the dedicated connection.
    pub async fn wait_events(
        &self,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Event>> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.keys.events())
            .arg(after.to_string());
        let reply: Option<Vec<(String, Vec<Entry>)>> = self.blocking_query(&cmd, block).await?;
        reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .map(decode)
            .collect()
    }
}
