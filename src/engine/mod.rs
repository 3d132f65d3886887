//! Storage engines behind narrow, domain-named operations.
//!
//! [`Engine`] is either the in-process [`memory::MemoryEngine`] (the default:
//! one process, no setup) or [`redis::RedisEngine`] (the source of truth for
//! several replicas). Each domain module (`agents`, `signals`, …) implements
//! the operations it needs once per engine, in its own `memory.rs` and
//! `redis.rs`, and exposes them on `Engine` through [`dispatch!`]. The
//! conformance suite in `tests/` runs unchanged against both.
//!
//! Every state change that clients can observe also appends an event to the
//! event log *in the same atomic step* (the same lock on memory, the same
//! Lua script on Redis), so "exactly one `approval.decided`" follows from
//! "exactly one decision" instead of being a second thing to get right.

pub mod keys;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use crate::events::{EventBody, StreamId};

/// A storage failure. Never caused by client input.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached or did not answer in time (503).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded, or storage refused an operation
    /// for a reason retrying will not fix: a key of another type, a command
    /// the Redis user may not run (500; logged, never sent).
    #[error("storage error: {0}")]
    Corrupt(String),
    /// Redis refused the service's connection: a wrong password or user,
    /// a database number it does not have. Only connecting gives it.
    #[error("Redis refused the connection: {0}")]
    Refused(String),
}

pub type EngineResult<T> = Result<T, EngineError>;

/// The configured storage engine. Cheap to clone.
#[derive(Clone)]
pub enum Engine {
    Memory(Arc<memory::MemoryEngine>),
    Redis(Arc<redis::RedisEngine>),
}

/// Calls the same-named operation on whichever engine is configured.
macro_rules! dispatch {
    ($engine:expr, $method:ident($($arg:expr),* $(,)?)) => {
        match $engine {
            $crate::engine::Engine::Memory(e) => e.$method($($arg),*).await,
            $crate::engine::Engine::Redis(e) => e.$method($($arg),*).await,
        }
    };
}
pub(crate) use dispatch;

impl Engine {
    /// `"memory"` or `"redis"`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Checks that the engine answers (used by `/readyz`).
    pub async fn ping(&self) -> EngineResult<()> {
        dispatch!(self, ping())
    }

    /// Appends one event to the log and returns its id.
    pub async fn publish(&self, event: EventBody) -> EngineResult<StreamId> {
        dispatch!(self, publish(event))
    }
}
