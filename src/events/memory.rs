//! The memory engine's event log: a ring with Redis Stream ids.

use std::collections::VecDeque;

use crate::events::{Event, EventBody, LogBounds, StreamId, Wake};

/// An append-only log of events with `<ms>-<seq>` ids, trimmed to a maximum
/// length, remembering the largest id it ever trimmed (like Redis's
/// `max-deleted-entry-id`) so readers can tell when they missed entries.
#[derive(Debug, Default)]
pub struct EventRing {
    entries: VecDeque<Event>,
    last_id: StreamId,
    max_deleted: StreamId,
    max_len: usize,
    /// The id of the newest event carrying a wake-up key.
    newest_wake: StreamId,
}

impl EventRing {
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len: max_len.max(1),
            ..Self::default()
        }
    }

    /// Appends an event at the current time and returns it with its id.
    pub fn append(&mut self, body: EventBody) -> Event {
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let id = if now > self.last_id.ms {
            StreamId { ms: now, seq: 0 }
        } else {
            self.last_id.next()
        };
        self.last_id = id;
        if body.wake.is_some() {
            self.newest_wake = id;
        }
        let event = Event::assemble(id, body.kind, body.agent_id, body.wake, &body.json);
        self.entries.push_back(event.clone());
        while self.entries.len() > self.max_len.max(1) {
            if let Some(old) = self.entries.pop_front() {
                self.max_deleted = old.id;
            }
        }
        event
    }

    /// Up to `count` entries with ids strictly greater than `after`.
    pub fn after(&self, after: StreamId, count: usize) -> Vec<Event> {
        let start = self.entries.partition_point(|e| e.id <= after);
        self.entries.range(start..).take(count).cloned().collect()
    }

    pub fn newest(&self) -> Option<StreamId> {
        self.entries.back().map(|e| e.id)
    }

    /// The id of the newest event that carried a wake-up key (zero if none).
    pub fn newest_wake(&self) -> StreamId {
        self.newest_wake
    }

    /// Up to `count` wake-ups of events with ids in `(after, through]`.
    pub fn wakes(&self, after: StreamId, through: StreamId, count: usize) -> Vec<Wake> {
        let start = self.entries.partition_point(|e| e.id <= after);
        self.entries
            .range(start..)
            .take_while(|e| e.id <= through)
            .filter_map(|e| Some((e.id, e.wake.clone()?)))
            .take(count)
            .collect()
    }

    pub fn bounds(&self) -> LogBounds {
        LogBounds {
            oldest: self.entries.front().map(|e| e.id),
            newest: self.newest(),
            max_deleted: self.max_deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kind: &str) -> EventBody {
        EventBody::new(
            kind,
            "test",
            None,
            chrono::Utc::now(),
            serde_json::json!({}),
        )
    }

    #[test]
    fn ids_increase_and_trimming_is_remembered() {
        let mut ring = EventRing::new(3);
        let ids: Vec<StreamId> = (0..5).map(|_| ring.append(body("a.b")).id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let bounds = ring.bounds();
        assert_eq!(bounds.oldest, Some(ids[2]));
        assert_eq!(bounds.max_deleted, ids[1]);
        assert!(bounds.trimmed_after(ids[0]));
        assert!(!bounds.trimmed_after(ids[1]));
        // A log that never trimmed had nothing before its oldest entry: a
        // position before it comes from another log.
        let mut fresh = EventRing::new(3);
        let first = fresh.append(body("a.b")).id;
        let bounds = fresh.bounds();
        assert!(!bounds.trimmed_after(StreamId::ZERO));
        assert!(!bounds.trimmed_after(first));
        assert!(bounds.trimmed_after(first.prev()));
        let after: Vec<StreamId> = ring.after(ids[2], 10).iter().map(|e| e.id).collect();
        assert_eq!(after, vec![ids[3], ids[4]]);
    }
}
