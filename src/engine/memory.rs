//! The embedded engine: all state in one process, behind one mutex.
//!
//! Semantics match the Redis engine exactly — the conformance suite checks
//! that — including TTLs (checked on read, purged by the sweepers), the
//! event log's ids and trimming, and blocking reads of the log. The mutex
//! is a `std` one and is never held across an `.await`; every operation is
//! a short critical section, which is also what makes each one atomic.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::agents::memory::AgentTable;
use crate::approvals::memory::ApprovalTable;
use crate::engine::EngineResult;
use crate::events::{Event, EventBody, EventRing, LogBounds, StreamId, Wake};
use crate::feedback::memory::FeedbackTable;
use crate::signals::memory::SignalTable;
use crate::usage::memory::UsageTable;

/// Everything the memory engine stores, one table per domain.
#[derive(Default)]
pub struct MemoryState {
    pub events: EventRing,
    pub agents: AgentTable,
    pub signals: SignalTable,
    pub approvals: ApprovalTable,
    pub usage: UsageTable,
    pub feedback: FeedbackTable,
    /// Applied migration versions, in order.
    pub migrations: Vec<String>,
}

pub struct MemoryEngine {
    state: Mutex<MemoryState>,
    /// The id of the newest event, so blocking log reads can wait for more.
    newest: watch::Sender<StreamId>,
    /// The id of the newest event with a wake-up key, so that the tailer,
    /// while no client follows the log, wakes only for those.
    newest_wake: watch::Sender<StreamId>,
}

impl MemoryEngine {
    pub fn new(stream_max_len: usize) -> Self {
        let state = MemoryState {
            events: EventRing::new(stream_max_len),
            ..MemoryState::default()
        };
        Self {
            state: Mutex::new(state),
            newest: watch::Sender::new(StreamId::ZERO),
            newest_wake: watch::Sender::new(StreamId::ZERO),
        }
    }

    /// Locks the state. A panic while the lock was held cannot leave a
    /// half-applied operation behind (each one validates before it writes),
    /// so a poisoned lock is safe to keep using.
    pub fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the locked state and then wakes blocked log readers if it
    /// appended events. Every mutating operation goes through here.
    pub fn write<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        let (result, newest, newest_wake) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.events.newest(), state.events.newest_wake())
        };
        // Sent after the lock is released, so two writers may get here in
        // either order: a watch only ever moves forward.
        if let Some(newest) = newest {
            advance(&self.newest, newest);
        }
        advance(&self.newest_wake, newest_wake);
        result
    }

    pub async fn ping(&self) -> EngineResult<()> {
        Ok(())
    }

    pub async fn publish(&self, event: EventBody) -> EngineResult<StreamId> {
        Ok(self.write(|s| s.events.append(event).id))
    }

    pub async fn read_events(&self, after: StreamId, count: usize) -> EngineResult<Vec<Event>> {
        Ok(self.lock().events.after(after, count))
    }

    pub async fn log_bounds(&self) -> EngineResult<LogBounds> {
        Ok(self.lock().events.bounds())
    }

    /// Waits up to `block` for entries after `after`, like `XREAD BLOCK`.
    pub async fn wait_events(
        &self,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Event>> {
        wait_past(&self.newest, after, block).await;
        self.read_events(after, count).await
    }

    /// Wake-ups of events with ids in `(after, through]`.
    pub async fn read_wakes(&self, after: StreamId, through: StreamId) -> EngineResult<Vec<Wake>> {
        Ok(self.lock().events.wakes(after, through, usize::MAX))
    }

    /// Waits up to `block` for events with a wake-up key after `after`, and
    /// returns up to `count` of their wake-ups.
    pub async fn wait_wakes(
        &self,
        after: StreamId,
        count: usize,
        block: Duration,
    ) -> EngineResult<Vec<Wake>> {
        if !wait_past(&self.newest_wake, after, block).await {
            // None came: no need to look through the events since.
            return Ok(Vec::new());
        }
        Ok(self.lock().events.wakes(after, StreamId::MAX, count))
    }
}

/// Waits up to `block` for `newest` to pass `after`; whether it has.
async fn wait_past(newest: &watch::Sender<StreamId>, after: StreamId, block: Duration) -> bool {
    let mut newest = newest.subscribe();
    let _ = tokio::time::timeout(block, newest.wait_for(|id| *id > after)).await;
    *newest.borrow() > after
}

/// Moves `watch` to `id` if that is newer, waking its receivers; an older
/// id (from a writer that released the lock earlier but got here later)
/// leaves it alone, so readers never see the log go back and miss a wake-up.
fn advance(watch: &watch::Sender<StreamId>, id: StreamId) {
    watch.send_if_modified(|current| {
        let newer = id > *current;
        if newer {
            *current = id;
        }
        newer
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_writer_never_moves_the_newest_id_back() {
        let watch = watch::Sender::new(StreamId::ZERO);
        let mut seen = watch.subscribe();
        let (older, newer) = (StreamId { ms: 5, seq: 0 }, StreamId { ms: 5, seq: 1 });
        advance(&watch, newer);
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), newer);
        // The writer of `older` released the lock first but wakes readers
        // last: the readers must still see `newer`, and not be woken.
        advance(&watch, older);
        assert!(!seen.has_changed().unwrap());
        assert_eq!(*watch.borrow(), newer);
        advance(&watch, newer);
        assert!(!seen.has_changed().unwrap());
    }
}
