//! Scenarios 3 and 4: how fast a held long-poll answers once what it waits
//! for happens.
//!
//! 1,000 requests wait at once (each on its own agent inbox, or its own
//! approval); after they have settled, the run counts the service's Redis
//! connections (scenario 8), then triggers each waiter in turn at a fixed
//! pace and measures from just before the trigger is sent to the moment
//! the waiter's answer has arrived.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::scenarios::{Ctx, Latencies, array_len, http_client};

const WAITERS: usize = 1000;
/// Triggers per second.
const PACE: u64 = 200;
/// Time for every waiter to be registered before the first trigger.
const SETTLE: Duration = Duration::from_secs(2);

/// What the waiters ask for and what answers them.
struct Plan {
    /// GET URLs, one per waiter.
    waits: Vec<String>,
    /// POST URL and body that should answer waiter `i`.
    triggers: Vec<(String, Value)>,
    /// Whether a waiter's answer carries what was triggered.
    answered: fn(&Value) -> bool,
    /// For scenario 8's row name.
    during: &'static str,
}

/// Latencies of answered waiters, and what went wrong with the others.
struct Outcome {
    lat: Latencies,
    early: usize,
    missed: usize,
    failed_triggers: usize,
}

async fn wait_and_trigger(ctx: &mut Ctx<'_>, plan: Plan) -> Result<Outcome, String> {
    // A client of its own: 1,000 connections held open by the waiters.
    let waiter_client = http_client();
    let answered = plan.answered;
    let waiters: Vec<_> = plan
        .waits
        .into_iter()
        .map(|url| {
            let client = waiter_client.clone();
            tokio::spawn(async move {
                let reply = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.ok(),
                    _ => None,
                };
                let at = Instant::now();
                let ok = reply
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| answered(&v));
                (at, ok)
            })
        })
        .collect();
    tokio::time::sleep(SETTLE).await;
    let early = waiters.iter().filter(|h| h.is_finished()).count();
    ctx.record_redis_clients(plan.during).await;

    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / PACE));
    let mut triggers = Vec::with_capacity(plan.triggers.len());
    for (url, body) in plan.triggers {
        pace.tick().await;
        let client = ctx.http.clone();
        triggers.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = client
                .post(url)
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (sent, ok)
        }));
    }

    let mut out = Outcome {
        lat: Latencies::new(),
        early,
        missed: 0,
        failed_triggers: 0,
    };
    for (waiter, trigger) in waiters.into_iter().zip(triggers) {
        let (sent, sent_ok) = trigger.await.map_err(|e| e.to_string())?;
        let (at, ok) = waiter.await.map_err(|e| e.to_string())?;
        if !sent_ok {
            out.failed_triggers += 1;
        } else if ok && at >= sent {
            out.lat.record(at - sent);
        } else {
            out.missed += 1;
        }
    }
    Ok(out)
}

fn record(ctx: &mut Ctx<'_>, scenario: u8, name: &str, out: &Outcome) {
    let note = format!(
        "{} answered, {} early, {} missed, {} failed sends; {PACE}/s",
        out.lat.count(),
        out.early,
        out.missed,
        out.failed_triggers
    );
    if out.lat.count() == 0 {
        ctx.report
            .unavailable(scenario, format!("{name} p99"), note);
        return;
    }
    ctx.add_latencies(scenario, name, &out.lat, Some(10.0), &note);
}

/// Scenario 3: signal send → waiting receiver.
pub async fn signals(ctx: &mut Ctx<'_>) -> Result<(), String> {
    if !ctx.available("/v1/agents/w-probe/signals").await? {
        ctx.report.unavailable(
            3,
            "signal → waiter p99",
            "not available (signals endpoints answer 404)",
        );
        ctx.report
            .unavailable(8, "Redis connections during 3", "scenario 3 not available");
        return Ok(());
    }
    let tag = crate::scenarios::unix_micros();
    let plan = Plan {
        waits: (0..WAITERS)
            .map(|i| ctx.url(&format!("/v1/agents/w-{tag}-{i}/signals?wait_seconds=30")))
            .collect(),
        triggers: (0..WAITERS)
            .map(|i| {
                (
                    ctx.url("/v1/signals"),
                    json!({"signal_type": "go", "source_agent": "bench",
                           "target_agent": format!("w-{tag}-{i}")}),
                )
            })
            .collect(),
        answered: |v| array_len(v, "/signals") > 0,
        during: "3 (1,000 signal waiters)",
    };
    let out = wait_and_trigger(ctx, plan).await?;
    record(ctx, 3, "signal → waiter", &out);
    Ok(())
}

/// Scenario 4: approval decision → waiting client.
pub async fn approvals(ctx: &mut Ctx<'_>) -> Result<(), String> {
    if !ctx.available("/v1/approvals?limit=1").await? {
        ctx.report.unavailable(
            4,
            "decision → waiter p99",
            "not available (approvals endpoints answer 404)",
        );
        ctx.report
            .unavailable(8, "Redis connections during 4", "scenario 4 not available");
        return Ok(());
    }
    let client = ctx.http.clone();
    let create = ctx.url("/v1/approvals");
    let ids: Vec<Result<String, String>> = futures_util::stream::iter(0..WAITERS)
        .map(|i| {
            let client = client.clone();
            let create = create.clone();
            async move {
                let r = client
                    .post(&create)
                    .json(
                        &json!({"approval_type": "deploy", "agent_id": format!("a-{i}"),
                                  "timeout_seconds": 300}),
                    )
                    .send()
                    .await
                    .map_err(|e| format!("POST /v1/approvals: {e}"))?;
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                body.pointer("/request/request_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("POST /v1/approvals answered {status}: {body}"))
            }
        })
        .buffered(32)
        .collect()
        .await;
    let ids = ids.into_iter().collect::<Result<Vec<_>, _>>()?;
    let plan = Plan {
        waits: ids
            .iter()
            .map(|id| ctx.url(&format!("/v1/approvals/{id}?wait_seconds=30")))
            .collect(),
        triggers: ids
            .iter()
            .map(|id| {
                (
                    ctx.url(&format!("/v1/approvals/{id}/decision")),
                    json!({"approved": true}),
                )
            })
            .collect(),
        answered: |v| {
            let status = v
                .pointer("/request/status")
                .or_else(|| v.get("status"))
                .and_then(Value::as_str);
            status == Some("approved")
        },
        during: "4 (1,000 approval waiters)",
    };
    let out = wait_and_trigger(ctx, plan).await?;
    record(ctx, 4, "decision → waiter", &out);
    Ok(())
}
