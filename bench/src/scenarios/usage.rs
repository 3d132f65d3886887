//! Scenario 7: usage ingest and the stats query over a million records.
//!
//! Eight senders post batches of 1,000 records for ten seconds (the ingest
//! rate), then keep going until a million records exist (at most
//! `FILL_LIMIT`), and 200 sequential `GET /v1/usage/stats?days=30` are
//! timed. Record ids are unique per run, so nothing is ignored as a repeat.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::report::Target;
use crate::scenarios::{Ctx, unix_micros};

const BATCH: usize = 1000;
const SENDERS: usize = 8;
const MEASURE_FOR: Duration = Duration::from_secs(10);
const TOTAL: u64 = 1_000_000;
/// Bound on the whole fill, so a slow service cannot stall the run.
const FILL_LIMIT: Duration = Duration::from_secs(120);
const REQUESTS: usize = 200;

const TIERS: [(&str, &str); 3] = [
    ("cheap", "claude-haiku-4-5"),
    ("capable", "claude-sonnet-5"),
    ("premium", "claude-opus-4-8"),
];

/// One `{"records":[…]}` body with ids `u-{run}-{first}…`.
fn batch(run: u64, first: u64) -> String {
    let mut body = String::with_capacity(BATCH * 280);
    body.push_str("{\"records\":[");
    for n in first..first + BATCH as u64 {
        let (tier, model) = TIERS[(n % 3) as usize];
        if n != first {
            body.push(',');
        }
        let _ = write!(
            body,
            "{{\"id\":\"u-{run}-{n}\",\"workflow\":\"wf-{w}\",\"stage\":\"stage-{s}\",\
             \"tier\":\"{tier}\",\"model\":\"{model}\",\"provider\":\"anthropic\",\
             \"tokens\":{{\"input\":{i},\"output\":{o},\"cache_read\":{c},\"cache_creation\":0}},\
             \"duration_ms\":{d}}}",
            w = n % 8,
            s = n % 4,
            i = 500 + n % 1500,
            o = 100 + n % 400,
            c = (n % 2) * 800,
            d = 200 + n % 3000,
        );
    }
    body.push_str("]}");
    body
}

/// Sends batches from `SENDERS` tasks until `until` or `TOTAL` records are
/// accepted; `next` numbers the batches across calls.
async fn ingest(
    ctx: &Ctx<'_>,
    run: u64,
    next: &Arc<AtomicU64>,
    accepted: &Arc<AtomicU64>,
    until: Instant,
) -> Result<(), String> {
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let client = ctx.http.clone();
            let url = ctx.url("/v1/usage");
            let next = next.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while Instant::now() < until && accepted.load(Ordering::Relaxed) < TOTAL {
                    let first = next.fetch_add(1, Ordering::Relaxed) * BATCH as u64;
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(batch(run, first))
                        .send()
                        .await
                        .map_err(|e| format!("POST /v1/usage: {e}"))?;
                    let status = r.status();
                    if !status.is_success() {
                        let text = r.text().await.unwrap_or_default();
                        return Err(format!("POST /v1/usage answered {status}: {text}"));
                    }
                    accepted.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for s in senders {
        s.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

pub async fn run(ctx: &mut Ctx<'_>) -> Result<(), String> {
    if !ctx.available("/v1/usage/stats?days=30").await? {
        ctx.report.unavailable(
            7,
            "usage records/s",
            "not available (usage endpoints answer 404)",
        );
        return Ok(());
    }
    let run = unix_micros();
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));

    let started = Instant::now();
    ingest(ctx, run, &next, &accepted, started + MEASURE_FOR).await?;
    let rate = accepted.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    ctx.report
        .add(
            7,
            "usage records/s",
            rate,
            "records/s",
            Some(Target::AtLeast(50_000.0)),
        )
        .note = format!("batches of {BATCH}, {SENDERS} senders, {:?}", MEASURE_FOR);

    let fill = Instant::now();
    ingest(ctx, run, &next, &accepted, fill + FILL_LIMIT).await?;
    let sent = accepted.load(Ordering::Relaxed);

    let (lat, body) = ctx.time_gets("/v1/usage/stats?days=30", REQUESTS).await?;
    let calls = body
        .get("total_calls")
        .and_then(Value::as_u64)
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    let mut note = format!("{sent} records sent this run; stats total_calls {calls}");
    if sent < TOTAL {
        note.push_str(&format!("; fill stopped after {} s", FILL_LIMIT.as_secs()));
    }
    ctx.add_latencies(7, "usage/stats?days=30", &lat, Some(20.0), &note);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_valid_json_with_unique_ids() {
        let body: Value = serde_json::from_str(&batch(7, 2000)).unwrap();
        let records = body["records"].as_array().unwrap();
        assert_eq!(records.len(), BATCH);
        let ids: std::collections::HashSet<&str> =
            records.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), BATCH);
        assert_eq!(records[0]["id"], "u-7-2000");
        assert_eq!(records[0]["tokens"]["cache_creation"], 0);
    }
}
