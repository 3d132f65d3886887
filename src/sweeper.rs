//! The loop behind every sweeper (agents going down, approvals timing out,
//! expired signals freed on the memory engine).
//!
//! Each replica runs one per domain. Every `--sweep-interval-ms` it drains
//! everything due, in batches, through an engine operation that claims each
//! item atomically — so several replicas sweeping together act on each item
//! exactly once — and once a minute it prunes what retention has expired.
//! Failures are counted and retried on the next tick; nothing here blocks a
//! request.

use std::future::Future;
use std::time::Duration;

use crate::app::AppState;
use crate::engine::EngineResult;

/// Most items one sweep call claims.
pub const BATCH: usize = 500;
/// How often retention pruning runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Starts a sweeper named `name` (for logs and metrics). `sweep(state,
/// now_ms, limit)` claims up to `limit` due items and returns how many;
/// `prune(state, now_ms)` drops what retention has expired.
pub fn spawn<S, SF, P, PF>(
    state: AppState,
    name: &'static str,
    sweep: S,
    prune: P,
) -> tokio::task::JoinHandle<()>
where
    S: Fn(AppState, i64, usize) -> SF + Send + 'static,
    SF: Future<Output = EngineResult<usize>> + Send,
    P: Fn(AppState, i64) -> PF + Send + 'static,
    PF: Future<Output = EngineResult<()>> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now_ms = state.clock.now_ms();
            // Drain everything due, in batches.
            loop {
                match sweep(state.clone(), now_ms, BATCH).await {
                    Ok(n) if n == BATCH => continue,
                    Ok(_) => break,
                    Err(err) => {
                        metrics::counter!("attune_engine_errors_total", "op" => name).increment(1);
                        tracing::debug!(error = %err, sweeper = name, "sweep failed; will retry");
                        break;
                    }
                }
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                if let Err(err) = prune(state.clone(), now_ms).await {
                    tracing::debug!(error = %err, sweeper = name, "pruning failed; will retry");
                }
            }
        }
    })
}
