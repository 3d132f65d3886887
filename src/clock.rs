//! The service's wall clock.
//!
//! Domain logic reads time from a [`Clock`] held in the app state instead of
//! calling `Utc::now()` directly, so that minute-scale behaviour (an agent
//! stale after 61 s, a run's duration) can be tested by advancing the clock
//! rather than by sleeping. In production the offset is always zero.
//! Storage TTLs (Redis `PEXPIRE`) still run on real time; the retention
//! periods they enforce are hours or days, far beyond any test offset.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// Real time plus an offset that only tests move.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    pub fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}
