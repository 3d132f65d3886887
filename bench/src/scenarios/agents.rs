//! Scenario 2: stale and state queries over 100,000 agents.
//!
//! 100,000 agents beat once with `ttl_seconds: 1` (64 requests in flight),
//! so two seconds later all of them are `down`. The run waits until the
//! service's own `/metrics` count them all as down (that delay is the
//! sweeper's lag, reported too), then times 200 sequential first pages of
//! each query.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::report::Target;
use crate::scenarios::{Ctx, array_len};

const AGENTS: usize = 100_000;
const IN_FLIGHT: usize = 64;
const REQUESTS: usize = 200;
/// ttl (1 s) + grace (defaults to the ttl).
const DOWN_AFTER: Duration = Duration::from_secs(2);

pub async fn run(ctx: &mut Ctx<'_>) -> Result<(), String> {
    let started = Instant::now();
    let client = ctx.http.clone();
    let base = ctx.service.clone();
    let accepted = futures_util::stream::iter(0..AGENTS)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/agents/stale-{i}/heartbeats");
            async move {
                client
                    .post(url)
                    .json(&json!({"ttl_seconds": 1, "current_task": "bench"}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let seeded_in = started.elapsed();
    let seeded_at = Instant::now();
    if accepted < AGENTS {
        return Err(format!(
            "only {accepted} of {AGENTS} seeding heartbeats were accepted"
        ));
    }
    ctx.report
        .add(
            2,
            "seeding heartbeats/s (bench client)",
            AGENTS as f64 / seeded_in.as_secs_f64(),
            "req/s",
            None,
        )
        .note = format!("{IN_FLIGHT} in flight, reqwest; not a target");

    // Wait until the sweeper has marked every seeded agent down.
    let deadline = seeded_at + Duration::from_secs(30);
    let mut all_down = None;
    while Instant::now() < deadline {
        if down_count(ctx).await.is_some_and(|n| n >= AGENTS as u64) {
            all_down = Some(seeded_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match all_down {
        Some(t) => {
            ctx.report
                .add(
                    2,
                    "all down, s after the last deadline",
                    t.saturating_sub(DOWN_AFTER).as_secs_f64(),
                    "s",
                    Some(Target::Below(1.0)),
                )
                .note = "sweeper lag read from /metrics (100 ms polling)".into();
        }
        None => {
            ctx.report.unavailable(
                2,
                "all down, s after the last deadline",
                "/metrics did not show 100,000 down agents within 30 s",
            );
            tokio::time::sleep(DOWN_AFTER.saturating_sub(seeded_at.elapsed())).await;
        }
    }
    let (_, probe) = ctx.time_gets("/v1/agents?state=down&limit=1", 1).await?;
    if array_len(&probe, "/agents") == 0 {
        return Err("no agent is down after seeding".into());
    }

    for (name, path) in [
        (
            "stale?threshold_seconds=60",
            "/v1/agents/stale?threshold_seconds=60&limit=100",
        ),
        (
            "stale?threshold_seconds=2",
            "/v1/agents/stale?threshold_seconds=2&limit=100",
        ),
        ("agents?state=down", "/v1/agents?state=down&limit=100"),
    ] {
        let (lat, body) = ctx.time_gets(path, REQUESTS).await?;
        let rows = array_len(&body, "/agents");
        let mut note = format!("{rows} rows per page");
        if rows == 0 {
            note.push_str(" (every agent beat less than 60 s ago)");
        }
        ctx.add_latencies(2, name, &lat, Some(10.0), &note);
    }
    Ok(())
}

/// `attune_agents{state="down"}` from the service's `/metrics`.
async fn down_count(ctx: &Ctx<'_>) -> Option<u64> {
    let text = ctx
        .http
        .get(ctx.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("attune_agents{state=\"down\"} "))?
        .trim()
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}
