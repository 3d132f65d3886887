//! Usage throughput and summary latency on Redis. Ignored by default; run it
//! in release mode, alone:
//!
//!     cargo nextest run --release --run-ignored only -E 'binary(usage_bench)' --no-capture
//!
//! It records 1,000,000 calls with client ids in batches of 1000 (four
//! clients at once, each batch on one of the last 30 UTC days), then times
//! `GET /v1/usage/stats?days=30` and `GET /v1/usage/savings?days=30`. The
//! targets: at least 50,000 records/s, and summaries under 20 ms.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Kind, TestApp};

const BATCHES: usize = 1000;
const PER_BATCH: usize = 1000;
const CLIENTS: usize = 4;

const WORKFLOWS: [&str; 8] = [
    "review",
    "summarize",
    "plan",
    "test-gen",
    "triage",
    "docs",
    "refactor",
    "search",
];
const CALLS: [(&str, &str); 4] = [
    ("cheap", "claude-haiku-4-5"),
    ("capable", "claude-sonnet-5"),
    ("premium", "claude-opus-4-8"),
    ("capable", "gpt-x"),
];

/// One batch as JSON text, all on the day `batch % 30` days ago.
fn batch_body(batch: usize) -> String {
    let ts =
        Utc::now() - chrono::Duration::days((batch % 30) as i64) - chrono::Duration::minutes(1);
    let ts = ts.to_rfc3339();
    let mut body = String::with_capacity(PER_BATCH * 320);
    body.push_str("{\"records\":[");
    for i in 0..PER_BATCH {
        let n = batch * PER_BATCH + i;
        let (tier, model) = CALLS[n % CALLS.len()];
        let workflow = WORKFLOWS[n % WORKFLOWS.len()];
        let cache_read = if n % 3 == 0 { 2048 } else { 0 };
        let hit = n % 10 == 0;
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "{{\"id\":\"call-{n}\",\"ts\":\"{ts}\",\"workflow\":\"{workflow}\",\"stage\":\"s{}\",\
             \"tier\":\"{tier}\",\"model\":\"{model}\",\"provider\":\"anthropic\",\
             \"agent_id\":\"agent-{}\",\"tokens\":{{\"input\":{},\"output\":{},\"cache_read\":{cache_read},\
             \"cache_creation\":0}},\"cache\":{{\"hit\":{hit}}},\"duration_ms\":{}}}",
            n % 5,
            n % 50,
            500 + n % 1500,
            100 + n % 700,
            200 + n % 3000,
        ));
    }
    body.push_str("]}");
    body
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release mode on its own"]
async fn usage_throughput_and_summary_latency_on_redis() {
    let app = Arc::new(TestApp::spawn(Kind::Redis).await);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (app, next) = (app.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            let url = app.url("/v1/usage");
            loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch >= BATCHES {
                    return;
                }
                let resp = app
                    .client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(batch_body(batch))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(
                    resp.status().as_u16(),
                    201,
                    "{}",
                    resp.text().await.unwrap_or_default()
                );
            }
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    let elapsed = started.elapsed();
    let records = BATCHES * PER_BATCH;
    let rate = records as f64 / elapsed.as_secs_f64();
    println!("recorded {records} records in {elapsed:.2?}: {rate:.0} records/s");

    let (_, stats) = app.get("/v1/usage/stats?days=30").await;
    assert_eq!(stats["total_calls"], records as u64, "{stats}");

    for path in [
        "/v1/usage/stats?days=30",
        "/v1/usage/savings?days=30",
        "/v1/usage/cache-stats?days=30",
    ] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let (status, _) = app.get(path).await;
            times.push(t.elapsed());
            assert_eq!(status, 200);
        }
        times.sort();
        println!(
            "{path}: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times[times.len() - 1]
        );
        assert!(
            percentile(&times, 0.99) < Duration::from_millis(20),
            "{path} is too slow"
        );
    }
    assert!(
        rate >= 50_000.0,
        "{rate:.0} records/s is below the 50,000 target"
    );
}
