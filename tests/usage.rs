//! Usage records, savings, cache statistics and prices, on both engines.

mod common;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, TimeDelta, Timelike, Utc};
use common::{Kind, Options, TestApp, TestKeys, first_difference, problem_field, rename_strings};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// A usage record with the given tokens (input, output, cache read, cache creation).
fn call(workflow: &str, tier: &str, model: &str, provider: &str, tokens: [u64; 4]) -> Value {
    json!({
        "workflow": workflow,
        "stage": "main",
        "tier": tier,
        "model": model,
        "provider": provider,
        "tokens": {
            "input": tokens[0],
            "output": tokens[1],
            "cache_read": tokens[2],
            "cache_creation": tokens[3],
        },
        "duration_ms": 100,
    })
}

fn simple(id: &str) -> Value {
    let mut r = call(
        "wf",
        "cheap",
        "claude-haiku-4-5",
        "anthropic",
        [1000, 100, 0, 0],
    );
    r["id"] = json!(id);
    r
}

const HAIKU: &str = "claude-haiku-4-5";
const SONNET: &str = "claude-sonnet-5";
const OPUS: &str = "claude-opus-4-8";

#[track_caller]
fn assert_usd(actual: &Value, expected: f64) {
    let got = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{actual} is not a number"));
    assert!(
        (got - expected).abs() < 1e-9,
        "expected ${expected}, got ${got}"
    );
}

#[track_caller]
fn assert_close(actual: &Value, expected: f64) {
    let got = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{actual} is not a number"));
    assert!(
        (got - expected).abs() < 1e-9,
        "expected {expected}, got {got}"
    );
}

/// Ten calls whose figures are worked out by hand below. Prices per
/// million tokens (input / output / cache read / cache write): haiku
/// $1 / $5 / $0.10 / $1.25, sonnet $3 / $15 / $0.30 / $3.75, opus
/// $5 / $25 / $0.50 / $6.25, the unknown `gpt-x` like sonnet. The baseline
/// prices every call at opus with cache reads at opus's full input price.
///
/// | # | workflow  | tier    | model  | in / out / read / write     | own cost | baseline | prompt-cache saving  |
/// |---|-----------|---------|--------|-----------------------------|----------|----------|----------------------|
/// | 1 | review    | cheap   | haiku  | 10k / 2k / – / –            | 0.020    | 0.100    |                      |
/// | 2 | review    | cheap   | haiku  | 10k / 2k / 20k / –          | 0.022    | 0.200    | 20k × $0.90 = 0.018  |
/// | 3 | review    | cheap   | haiku  | 5k / 1k / – / 8k            | 0.020    | 0.100    |                      |
/// | 4 | review    | capable | sonnet | 20k / 4k / – / –            | 0.120    | 0.200    |                      |
/// | 5 | review    | capable | sonnet | 10k / 2k / 40k / –          | 0.072    | 0.300    | 40k × $2.70 = 0.108  |
/// | 6 | summarize | capable | gpt-x  | 10k / 1k / – / –            | 0.045    | 0.075    |                      |
/// | 7 | summarize | premium | opus   | 10k / 2k / – / –            | 0.100    | 0.100    |                      |
/// | 8 | summarize | premium | opus   | 4k / 1k / 100k / –          | 0.095    | 0.545    | 100k × $4.50 = 0.450 |
/// | 9 | summarize | cheap   | haiku  | 10k / 2k, response-cache hit| 0.020    | 0.100    |                      |
/// |10 | summarize | premium | opus   | 10k / 4k, cost_usd 0.16     | 0.160    | 0.150    |                      |
///
/// - actual = every own cost except the hit (#9): 0.654
/// - baseline = 1.870; savings = 1.870 − 0.654 = 1.216 (65.0267… %)
/// - prompt-cache savings = 0.018 + 0.108 + 0.450 = 0.576;
///   response-cache savings = #9's own cost = 0.020; cache savings = 0.596
/// - routing savings = 1.216 − 0.596 = 0.620
fn worked_example() -> Vec<Value> {
    let mut hit = call(
        "summarize",
        "cheap",
        HAIKU,
        "anthropic",
        [10_000, 2_000, 0, 0],
    );
    hit["cache"] = json!({ "hit": true, "type": "semantic" });
    let mut priced = call(
        "summarize",
        "premium",
        OPUS,
        "anthropic",
        [10_000, 4_000, 0, 0],
    );
    priced["cost_usd"] = json!(0.16);
    vec![
        call("review", "cheap", HAIKU, "anthropic", [10_000, 2_000, 0, 0]),
        call(
            "review",
            "cheap",
            HAIKU,
            "anthropic",
            [10_000, 2_000, 20_000, 0],
        ),
        call(
            "review",
            "cheap",
            HAIKU,
            "anthropic",
            [5_000, 1_000, 0, 8_000],
        ),
        call(
            "review",
            "capable",
            SONNET,
            "anthropic",
            [20_000, 4_000, 0, 0],
        ),
        call(
            "review",
            "capable",
            SONNET,
            "anthropic",
            [10_000, 2_000, 40_000, 0],
        ),
        call(
            "summarize",
            "capable",
            "gpt-x",
            "openai",
            [10_000, 1_000, 0, 0],
        ),
        call(
            "summarize",
            "premium",
            OPUS,
            "anthropic",
            [10_000, 2_000, 0, 0],
        ),
        call(
            "summarize",
            "premium",
            OPUS,
            "anthropic",
            [4_000, 1_000, 100_000, 0],
        ),
        hit,
        priced,
    ]
}

async fn the_worked_example_adds_up_to_the_cent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, body) = app
        .post("/v1/usage", json!({ "records": worked_example() }))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["accepted"], 10);

    let (status, s) = app.get("/v1/usage/savings?days=30").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["total_calls"], 10);
    assert_usd(&s["actual_cost_usd"], 0.654);
    assert_usd(&s["baseline_cost_usd"], 1.87);
    assert_usd(&s["savings_usd"], 1.216);
    assert_close(&s["savings_percent"], 1.216 / 1.87 * 100.0);
    assert_usd(&s["prompt_cache_savings_usd"], 0.576);
    assert_usd(&s["response_cache_savings_usd"], 0.02);
    assert_usd(&s["cache_savings_usd"], 0.596);
    assert_usd(&s["routing_savings_usd"], 0.62);
    // Calls per tier: cheap #1 #2 #3 #9, capable #4 #5 #6, premium #7 #8 #10.
    assert_close(&s["tier_distribution"]["cheap"], 40.0);
    assert_close(&s["tier_distribution"]["capable"], 30.0);
    assert_close(&s["tier_distribution"]["premium"], 30.0);
    assert_eq!(s["baseline_model"], OPUS);
    assert_eq!(s["price_table_version"], "attune-2026-11");

    // Prompt cache: #2, #5 and #8 read from it; #3 wrote to it.
    let (status, c) = app.get("/v1/usage/cache-stats?days=7").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["total_requests"], 10);
    assert_eq!(c["hit_count"], 3);
    assert_close(&c["hit_rate"], 0.3);
    assert_eq!(c["total_reads"], 160_000);
    assert_eq!(c["total_writes"], 8_000);
    assert_usd(&c["estimated_savings_usd"], 0.576);
    let review = &c["by_workflow"]["review"];
    assert_eq!(
        (
            review["total_requests"].as_u64(),
            review["hit_count"].as_u64()
        ),
        (Some(5), Some(2))
    );
    assert_close(&review["hit_rate"], 0.4);
    assert_eq!(
        (
            review["total_reads"].as_u64(),
            review["total_writes"].as_u64()
        ),
        (Some(60_000), Some(8_000))
    );
    assert_usd(&review["estimated_savings_usd"], 0.126);
    let summarize = &c["by_workflow"]["summarize"];
    assert_eq!(
        (
            summarize["total_requests"].as_u64(),
            summarize["hit_count"].as_u64()
        ),
        (Some(5), Some(1))
    );
    assert_close(&summarize["hit_rate"], 0.2);
    assert_eq!(summarize["total_reads"], 100_000);
    assert_usd(&summarize["estimated_savings_usd"], 0.45);

    let (status, st) = app.get("/v1/usage/stats?days=30").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["total_calls"], 10);
    assert_usd(&st["total_cost_usd"], 0.654);
    // 10k+10k+5k+20k+10k+10k+10k+4k+10k+10k and 2k+2k+1k+4k+2k+1k+2k+1k+2k+4k.
    assert_eq!(st["tokens_input"], 99_000);
    assert_eq!(st["tokens_output"], 21_000);
    assert_eq!(st["cache_hits"], 1);
    assert_eq!(st["cache_misses"], 9);
    assert_close(&st["cache_hit_rate"], 0.1);
    let group = |g: &str, name: &str, calls: u64, cost: f64| {
        let row = &st[g][name];
        assert_eq!(row["calls"].as_u64(), Some(calls), "{g}.{name}: {row}");
        assert_usd(&row["cost_usd"], cost);
    };
    group("by_tier", "cheap", 4, 0.062); // 0.020 + 0.022 + 0.020 (#9 spent nothing)
    group("by_tier", "capable", 3, 0.237); // 0.120 + 0.072 + 0.045
    group("by_tier", "premium", 3, 0.355); // 0.100 + 0.095 + 0.160
    group("by_workflow", "review", 5, 0.254);
    group("by_workflow", "summarize", 5, 0.4);
    group("by_provider", "anthropic", 9, 0.609);
    group("by_provider", "openai", 1, 0.045);
    group("by_model", HAIKU, 4, 0.062);
    group("by_model", SONNET, 2, 0.192);
    group("by_model", "gpt-x", 1, 0.045);
    group("by_model", OPUS, 3, 0.355);
}

async fn a_repeated_usage_id_is_counted_once_even_in_a_later_batch(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [simple("call-a"), simple("call-b"), simple("call-a")] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["ids"], json!(["call-a", "call-b", "call-a"]));
    assert_eq!(body["duplicate_ids"], json!(["call-a"]));

    let (_, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [simple("call-c"), simple("call-b")] }),
        )
        .await;
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(body["duplicate_ids"], json!(["call-b"]));
    let (status, body) = app.post("/v1/usage", simple("call-a")).await;
    assert_eq!(status, 201);
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 3);
    assert_eq!(stats["tokens_input"], 3000);
    let (_, recent) = app.get("/v1/usage/recent").await;
    assert_eq!(recent["records"].as_array().unwrap().len(), 3);
    // Records without an id get a server-made one and are never deduplicated.
    let anonymous = call("wf", "cheap", HAIKU, "anthropic", [1, 1, 0, 0]);
    let (_, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [anonymous.clone(), anonymous] }),
        )
        .await;
    assert_eq!(body["accepted"], 2);
    assert_ne!(body["ids"][0], body["ids"][1]);
}

async fn a_batch_of_1001_records_is_refused_naming_records(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let records: Vec<Value> = (0..1001).map(|i| simple(&format!("r-{i}"))).collect();
    let (status, body) = app.post("/v1/usage", json!({ "records": records })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(problem_field(&body), "records");
    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 0);

    let records: Vec<Value> = (0..1000).map(|i| simple(&format!("r-{i}"))).collect();
    let (status, body) = app.post("/v1/usage", json!({ "records": records })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["accepted"], 1000);
    let (status, body) = app.post("/v1/usage", json!({ "records": [] })).await;
    assert_eq!(status, 422);
    assert_eq!(problem_field(&body), "records");
    // A bare array is not a batch (nor a record read field by field).
    let (status, body) = app.post("/v1/usage", json!([simple("r-x")])).await;
    assert_eq!(
        (status, problem_field(&body).as_str()),
        (422, "body"),
        "{body}"
    );
}

/// A field the record does not have is refused by name, not dropped: the
/// original's `cost` and `prompt_cache`, or a misspelt cache count, would
/// otherwise leave the figures silently wrong.
async fn an_unknown_usage_field_is_refused_naming_it(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let with = |path: &[&str], value: Value| {
        let mut record = simple("u");
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut record;
        for p in parents {
            at = &mut at[*p];
        }
        at[*last] = value;
        record
    };
    for (record, field) in [
        (with(&["cost"], json!(0.5)), "cost"),
        (
            with(&["prompt_cache"], json!({"read_tokens": 10})),
            "prompt_cache",
        ),
        (
            with(&["tokens", "cache_reads"], json!(5000)),
            "tokens.cache_reads",
        ),
        (with(&["cache", "kind"], json!("exact")), "cache.kind"),
    ] {
        let (status, body) = app.post("/v1/usage", record.clone()).await;
        assert_eq!(
            (status, problem_field(&body).as_str()),
            (422, field),
            "{body}"
        );
        let batch = json!({ "records": [simple("ok"), record] });
        let (status, body) = app.post("/v1/usage", batch).await;
        let in_batch = format!("records[1].{field}");
        assert_eq!((status, problem_field(&body)), (422, in_batch), "{body}");
    }
    let batch = json!({ "records": [simple("ok")], "workflow": "x" });
    let (status, body) = app.post("/v1/usage", batch).await;
    assert_eq!(
        (status, problem_field(&body).as_str()),
        (422, "workflow"),
        "{body}"
    );
    // A field sent twice is refused too, not read as its last value.
    let record = simple("twice").to_string();
    let twice = format!(
        r#"{},"tokens":{{"input":1,"output":0}}}}"#,
        &record[..record.len() - 1]
    );
    for (body, field) in [
        (twice.clone(), "tokens"),
        (format!(r#"{{"records":[{twice}]}}"#), "records[0].tokens"),
    ] {
        let (status, problem) = app.post_text("/v1/usage", body).await;
        assert_eq!(status, 422);
        assert_eq!(problem_field(&problem), field, "{problem}");
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("duplicate field")),
            "{problem}"
        );
    }
    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 0, "nothing was recorded: {stats}");
}

async fn a_negative_token_count_is_refused_naming_the_field(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut bad = simple("x");
    bad["tokens"]["input"] = json!(-5);
    let (status, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [simple("ok"), bad.clone()] }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(problem_field(&body), "records[1].tokens.input");
    let (status, body) = app.post("/v1/usage", bad).await;
    assert_eq!(status, 422);
    assert_eq!(problem_field(&body), "tokens.input");

    let mut bad = simple("y");
    bad["tokens"]["cache_read"] = json!(-1);
    let (_, body) = app.post("/v1/usage", bad).await;
    assert_eq!(problem_field(&body), "tokens.cache_read");
    let mut bad = simple("z");
    bad["cost_usd"] = json!(-0.5);
    let (status, body) = app.post("/v1/usage", bad).await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cost_usd"));
    let mut bad = simple("w");
    bad["tier"] = json!("gold");
    let (status, body) = app.post("/v1/usage", bad).await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "tier"));
    // Objects are objects: an array is not read as the fields in order.
    for (field, value) in [
        ("tokens", json!([1, 2, 3, 4])),
        ("cache", json!([true, "exact"])),
        ("user_id", json!("")),
    ] {
        let mut bad = simple("v");
        bad[field] = value;
        let (status, body) = app
            .post("/v1/usage", json!({ "records": [simple("ok"), bad] }))
            .await;
        assert_eq!(status, 422, "{field}: {body}");
        assert_eq!(
            problem_field(&body),
            format!("records[1].{field}"),
            "{body}"
        );
    }
    let (status, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [simple("ok"), ["a", "b"]] }),
        )
        .await;
    assert_eq!(
        (status, problem_field(&body).as_str()),
        (422, "records[1]"),
        "{body}"
    );
    // Nothing of the refused batches was recorded.
    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 0);
}

async fn user_ids_are_never_stored_in_clear(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let raw = "alice.secret-user@example.com";
    let mut r = simple("with-user");
    r["user_id"] = json!(raw);
    let (status, _) = app.post("/v1/usage", r).await;
    assert_eq!(status, 201);
    let (_, recent) = app.get("/v1/usage/recent").await;
    let hash = recent["records"][0]["user_hash"]
        .as_str()
        .expect("a hash")
        .to_owned();
    assert_eq!(hash.len(), 16);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!recent.to_string().contains(raw));
    assert!(
        !Value::Array(app.all_events().await)
            .to_string()
            .contains(raw)
    );

    // The same user hashes the same way every time.
    let mut again = simple("with-user-2");
    again["user_id"] = json!(raw);
    app.post("/v1/usage", again).await;
    let (_, recent) = app.get("/v1/usage/recent").await;
    assert_eq!(recent["records"][0]["user_hash"], hash.as_str());

    if let Some(redis) = &app.redis {
        let mut conn = redis.conn();
        let pattern = attune_telemetry::engine::keys::Keys::new(&app.prefix).pattern();
        let keys: Vec<String> = ::redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
        assert!(keys.iter().any(|k| k.contains("usage:recent:")), "{keys:?}");
        for key in keys {
            assert!(!key.contains(raw));
            let kind: String = ::redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
            let read = match kind.as_str() {
                "string" => ::redis::cmd("GET").arg(&key).clone(),
                "hash" => ::redis::cmd("HGETALL").arg(&key).clone(),
                "zset" => ::redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).clone(),
                "set" => ::redis::cmd("SMEMBERS").arg(&key).clone(),
                "list" => ::redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone(),
                "stream" => ::redis::cmd("XRANGE").arg(&key).arg("-").arg("+").clone(),
                other => panic!("unexpected key type {other} of {key}"),
            };
            let value: ::redis::Value = read.query(&mut conn).unwrap();
            let mut texts = Vec::new();
            flatten(value, &mut texts);
            for text in texts {
                assert!(!text.contains(raw), "{key} holds the raw user id");
            }
        }
    }
}

fn flatten(value: ::redis::Value, out: &mut Vec<String>) {
    match value {
        ::redis::Value::BulkString(bytes) => out.push(String::from_utf8_lossy(&bytes).into_owned()),
        ::redis::Value::SimpleString(s) => out.push(s),
        ::redis::Value::Array(items) | ::redis::Value::Set(items) => {
            items.into_iter().for_each(|v| flatten(v, out));
        }
        ::redis::Value::Map(pairs) => pairs.into_iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        other => out.push(format!("{other:?}")),
    }
}

async fn recent_lists_newest_first_with_totals(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let now = Utc::now();
    let mut records = Vec::new();
    for (i, minutes_ago) in [30, 10, 20].into_iter().enumerate() {
        let mut r = simple(&format!("call-{i}"));
        r["ts"] = json!((now - chrono::Duration::minutes(minutes_ago)).to_rfc3339());
        r["duration_ms"] = json!(100 * (i + 1));
        records.push(r);
    }
    // A response-cache hit: listed with its own cost, but spent nothing.
    records[2]["cache"] = json!({ "hit": true });
    app.post("/v1/usage", json!({ "records": records })).await;

    let (status, body) = app.get("/v1/usage/recent?limit=2").await;
    assert_eq!(status, 200, "{body}");
    let rows = body["records"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["call-1", "call-2"]);
    // 1000 input and 100 output tokens on haiku cost $0.0015.
    assert_usd(&rows[0]["cost_usd"], 0.0015);
    assert_eq!(rows[0]["tier"], "cheap");
    assert_eq!(rows[0]["stage"], "main");
    assert_eq!(rows[1]["cache"]["hit"], true);
    let totals = &body["totals"];
    assert_eq!(totals["calls"], 2);
    assert_usd(&totals["cost_usd"], 0.0015);
    assert_eq!(totals["cache_hits"], 1);
    assert_eq!(totals["tokens_input"], 2000);
    assert_eq!(totals["duration_ms"], 500);
    let (_, all) = app.get("/v1/usage/recent?days=").await;
    assert_eq!(all["records"].as_array().unwrap().len(), 3);
    let (status, body) = app.get("/v1/usage/recent?limit=0").await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "limit"));
}

/// Pages of `recent` follow one another with no record twice or missing,
/// across records filed in the same millisecond and across days.
async fn recent_pages_with_a_cursor(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let now = Utc::now();
    let at = |minutes_ago: i64| (now - chrono::Duration::minutes(minutes_ago)).to_rfc3339();
    let mut records = Vec::new();
    // Three in one millisecond, two of them at the page boundary; two a
    // little earlier; three a day and more earlier.
    for (i, when) in [0, 0, 0, 5, 5, 1500, 1500, 3000].into_iter().enumerate() {
        let mut r = simple(&format!("p-{i}"));
        r["ts"] = json!(at(when));
        records.push(r);
    }
    let (status, body) = app.post("/v1/usage", json!({ "records": records })).await;
    assert_eq!(status, 201, "{body}");
    let (_, all) = app.get("/v1/usage/recent?limit=100").await;
    let ids = |page: &Value| -> Vec<String> {
        page["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let everything = ids(&all);
    assert_eq!(everything.len(), 8, "{all}");
    assert_eq!(all["next_cursor"], Value::Null);
    let mut paged = Vec::new();
    let mut pages = 0;
    let mut path = "/v1/usage/recent?limit=2".to_owned();
    loop {
        pages += 1;
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["totals"]["calls"],
            page["records"].as_array().unwrap().len()
        );
        paged.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/usage/recent?limit=2&cursor={cursor}"),
            None => break,
        }
        assert!(paged.len() <= 8, "{paged:?}");
    }
    assert_eq!(paged, everything);
    // The last full page says there is no more (it looked one record ahead).
    assert_eq!(pages, 4);
    let (status, body) = app.get("/v1/usage/recent?cursor=abc").await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cursor"));
    // A well-formed cursor at a time no record can have.
    use base64::Engine as _;
    let forged =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("recent:{}:x", i64::MAX));
    let (status, body) = app.get(&format!("/v1/usage/recent?cursor={forged}")).await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cursor"));
}

async fn tiers_are_accepted_in_any_case_and_stored_lower_case(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut r = simple("upper");
    r["tier"] = json!("PREMIUM");
    let (status, body) = app.post("/v1/usage", r).await;
    assert_eq!(status, 201, "{body}");
    let (_, recent) = app.get("/v1/usage/recent").await;
    assert_eq!(recent["records"][0]["tier"], "premium");
    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["by_tier"]["premium"]["calls"], 1);
}

async fn timestamps_too_far_ahead_or_beyond_retention_are_refused(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let now = Utc::now();
    let at = |offset: chrono::Duration| {
        let mut r = simple(&format!("t{}", offset.num_minutes()));
        r["ts"] = json!((now + offset).to_rfc3339());
        r
    };
    let (status, body) = app
        .post("/v1/usage", at(chrono::Duration::minutes(10)))
        .await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "ts"));
    let (status, body) = app
        .post(
            "/v1/usage",
            json!({ "records": [at(chrono::Duration::days(-91))] }),
        )
        .await;
    assert_eq!(
        (status, problem_field(&body).as_str()),
        (422, "records[0].ts")
    );
    // A time without its offset says what a time must look like.
    let mut local = simple("no-offset");
    local["ts"] = json!("2026-05-01T12:00:00");
    let (status, body) = app.post("/v1/usage", local).await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "ts"));
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("RFC 3339 time with a UTC offset")),
        "{body}"
    );
    let (status, _) = app
        .post("/v1/usage", at(chrono::Duration::minutes(4)))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app.post("/v1/usage", at(chrono::Duration::days(-3))).await;
    assert_eq!(status, 201);

    // Windows are whole UTC days: the 3-day-old call is in a 7-day window only.
    let (_, week) = app.get("/v1/usage/stats?days=7").await;
    assert_eq!(week["total_calls"], 2);
    let (_, today) = app.get("/v1/usage/stats?days=1").await;
    assert_eq!(today["total_calls"], 1);
    let (_, recent) = app.get("/v1/usage/recent?days=1").await;
    assert_eq!(recent["records"].as_array().unwrap().len(), 1);
    let (status, body) = app.get("/v1/usage/stats?days=0").await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "days"));
    // An offset without its colon is read as before.
    let mut compact = simple("compact-offset");
    compact["ts"] = json!(
        (now - chrono::Duration::hours(1))
            .format("%Y-%m-%dT%H:%M:%S%z")
            .to_string()
    );
    let (status, body) = app.post("/v1/usage", compact).await;
    assert_eq!(status, 201, "{body}");
}

async fn agent_keys_record_usage_only_for_their_agents_and_viewers_read_it(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let mut mine = simple("mine");
    mine["agent_id"] = json!("ci-7");
    let mut theirs = simple("theirs");
    theirs["agent_id"] = json!("prod-1");
    let (status, body) = app
        .post_as(
            "/v1/usage",
            json!({ "records": [mine.clone(), theirs] }),
            Some(&keys.ci_agent),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = app
        .post_as("/v1/usage", mine.clone(), Some(&keys.ci_agent))
        .await;
    assert_eq!(status, 201);
    // A key limited to some agents writes only for them, so it names one.
    let (status, body) = app
        .post_as("/v1/usage", simple("nobodys"), Some(&keys.ci_agent))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(problem_field(&body).ends_with("agent_id"), "{body}");
    let (status, _) = app.post_as("/v1/usage", mine, Some(&keys.viewer)).await;
    assert_eq!(status, 403);
    for path in [
        "/v1/usage/stats",
        "/v1/usage/savings",
        "/v1/usage/cache-stats",
        "/v1/usage/recent",
        "/v1/usage/prices",
    ] {
        let (status, _) = app.get_as(path, Some(&keys.agent)).await;
        assert_eq!(status, 403, "{path}");
        let (status, body) = app.get_as(path, Some(&keys.viewer)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, stats) = app.get_as("/v1/usage/stats", Some(&keys.viewer)).await;
    assert_eq!(stats["total_calls"], 1);
}

/// A record's `id` is its key's: another key's record with the same id is
/// another record (a key scoped to some agents cannot set the records of
/// others aside by sending their ids first), and a repeat through the same
/// key is still ignored.
async fn usage_ids_belong_to_the_key_that_sends_them(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let mut ci = simple("call-1");
    ci["agent_id"] = json!("ci-7");
    let mut prod = simple("call-1");
    prod["agent_id"] = json!("prod-1");
    for (record, key) in [(&ci, &keys.ci_agent), (&prod, &keys.agent)] {
        let (status, body) = app.post_as("/v1/usage", record.clone(), Some(key)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["duplicate_ids"], json!([]), "{body}");
    }
    let (_, body) = app.post_as("/v1/usage", prod, Some(&keys.agent)).await;
    assert_eq!(body["duplicate_ids"], json!(["call-1"]), "{body}");
    // Two keys' records alike to the millisecond are two records in
    // `recent` too.
    let mut twin = simple("call-2");
    twin["agent_id"] = json!("prod-1");
    twin["ts"] = json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    for key in [&keys.agent, &keys.admin] {
        let (status, body) = app.post_as("/v1/usage", twin.clone(), Some(key)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["duplicate_ids"], json!([]), "{body}");
    }
    let (_, stats) = app.get_as("/v1/usage/stats", Some(&keys.viewer)).await;
    assert_eq!(stats["total_calls"], 4);
    let (_, recent) = app
        .get_as("/v1/usage/recent?limit=10", Some(&keys.viewer))
        .await;
    let ids: Vec<&str> = recent["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.iter().filter(|id| **id == "call-2").count(),
        2,
        "{recent}"
    );
    assert_eq!(recent["totals"]["calls"], 4, "{recent}");
    assert!(
        recent["records"][0].get("key").is_none(),
        "only the view is shown: {recent}"
    );
    // Paged a row at a time, each of them comes once.
    let mut seen = Vec::new();
    let mut path = "/v1/usage/recent?limit=1".to_owned();
    loop {
        let (status, page) = app.get_as(&path, Some(&keys.viewer)).await;
        assert_eq!(status, 200, "{page}");
        let rows = page["records"].as_array().unwrap();
        seen.extend(rows.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/usage/recent?limit=1&cursor={cursor}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["call-1", "call-1", "call-2", "call-2"]);
}

/// A day breaks its totals down by its first 500 workflows (and models,
/// providers); later ones count together under `_other`, so a client that
/// names a new workflow on every call cannot grow what summaries read
/// without bound. Nothing is lost from the totals.
async fn a_day_breaks_down_by_its_first_500_names_and_the_rest_as_other(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let batch: Vec<Value> = (0..1000)
        .map(|i| {
            call(
                &format!("run-{i}"),
                "cheap",
                HAIKU,
                "anthropic",
                [1000, 100, 0, 0],
            )
        })
        .collect();
    let (status, body) = app.post("/v1/usage", json!({ "records": batch })).await;
    assert_eq!(status, 201, "{body}");
    let late = [
        call("run-0", "cheap", HAIKU, "anthropic", [1000, 100, 0, 0]),
        call("run-1000", "cheap", HAIKU, "anthropic", [1000, 100, 0, 0]),
    ];
    let (status, body) = app.post("/v1/usage", json!({ "records": late })).await;
    assert_eq!(status, 201, "{body}");

    let (_, stats) = app.get("/v1/usage/stats?days=1").await;
    assert_eq!(stats["total_calls"], 1002);
    let by_workflow = stats["by_workflow"].as_object().unwrap();
    assert_eq!(by_workflow.len(), 501, "500 names and the rest");
    let kept = by_workflow.keys().filter(|k| k.starts_with("run-")).count();
    assert_eq!(kept, 500);
    let calls = |name: &str| by_workflow[name]["calls"].as_u64().unwrap();
    assert_eq!(calls("_other"), 501);
    assert_eq!(calls("run-0"), 2, "a name the day has goes on counting");
    let sum: u64 = by_workflow
        .values()
        .map(|g| g["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 1002);
    assert_eq!(stats["by_model"][HAIKU]["calls"], 1002);
    let (_, cache) = app.get("/v1/usage/cache-stats?days=1").await;
    assert_eq!(
        cache["by_workflow"].as_object().unwrap().len(),
        501,
        "{cache}"
    );
}

async fn a_batch_emits_one_usage_recorded_event_with_its_totals(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut records: Vec<Value> = (0..3).map(|i| simple(&format!("e-{i}"))).collect();
    for r in &mut records {
        r["agent_id"] = json!("agent-9");
    }
    app.post("/v1/usage", json!({ "records": records.clone() }))
        .await;
    let events = app.events_of("usage.recorded").await;
    assert_eq!(events.len(), 1);
    let data = &events[0]["data"];
    assert_eq!(data["accepted"], 3);
    assert_eq!(data["duplicates"], 0);
    assert_eq!(data["tokens_input"], 3000);
    assert_usd(&data["cost_usd"], 0.0045);
    assert_eq!(events[0]["agent_id"], "agent-9");
    // A request of repeats records nothing and emits nothing.
    app.post("/v1/usage", json!({ "records": records })).await;
    assert_eq!(app.events_of("usage.recorded").await.len(), 1);
}

async fn prices_show_the_builtin_table(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, p) = app.get("/v1/usage/prices").await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["version"], "attune-2026-11");
    assert_eq!(p["baseline_model"], OPUS);
    let models = p["models"].as_array().unwrap();
    let find = |name: &str| models.iter().find(|m| m["model"] == name).unwrap().clone();
    let haiku = find(HAIKU);
    assert_eq!(haiku["tier"], "cheap");
    assert_close(&haiku["input"], 1.0);
    assert_close(&haiku["output"], 5.0);
    assert_close(&haiku["cache_read"], 0.1);
    assert_close(&haiku["cache_write"], 1.25);
    assert_eq!(find(SONNET)["tier"], "capable");
    assert_eq!(find(OPUS)["tier"], "premium");
    assert_close(&find(OPUS)["output"], 25.0);
    assert_close(&p["unknown_model"]["input"], 3.0);
    assert_close(&p["unknown_model"]["output"], 15.0);
}

async fn a_prices_file_replaces_the_table(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.toml");
    std::fs::write(
        &path,
        r#"
version = "acme-1"
[[models]]
model = "small"
tier = "cheap"
input = 2
output = 4
[[models]]
model = "large"
tier = "premium"
input = 10
output = 20
"#,
    )
    .unwrap();
    let app =
        TestApp::spawn_with(Options::new(kind).configure(move |c| c.prices_file = Some(path)))
            .await;
    let (_, p) = app.get("/v1/usage/prices").await;
    assert_eq!(p["version"], "acme-1");
    assert_eq!(p["baseline_model"], "large");
    app.post(
        "/v1/usage",
        call("wf", "cheap", "small", "acme", [1_000_000, 1_000_000, 0, 0]),
    )
    .await;
    let (_, s) = app.get("/v1/usage/savings").await;
    // $2 + $4 spent; the same tokens on `large` would cost $10 + $20.
    assert_usd(&s["actual_cost_usd"], 6.0);
    assert_usd(&s["baseline_cost_usd"], 30.0);
    assert_usd(&s["routing_savings_usd"], 24.0);
    assert_eq!(s["price_table_version"], "acme-1");
    assert_eq!(s["price_tables"], json!({"acme-1": 1}));
}

/// Costs are fixed when a call is recorded: replicas on different price
/// tables (or one table replaced by another) add up figures priced by
/// each, and the savings say which tables, and for how many calls.
#[tokio::test]
async fn savings_name_every_price_table_that_priced_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.toml");
    std::fs::write(
        &path,
        "version = \"acme-2\"\n[[models]]\nmodel = \"large\"\ntier = \"premium\"\ninput = 10\noutput = 20\n",
    )
    .unwrap();
    let app = TestApp::spawn(Kind::Redis).await;
    let url = app.redis_url().unwrap();
    let other = TestApp::spawn_with(
        Options::new(Kind::Redis)
            .shared_redis(&url, &app.prefix)
            .configure(move |c| c.prices_file = Some(path)),
    )
    .await;
    let one_million = [1_000_000, 0, 0, 0];
    app.post(
        "/v1/usage",
        call("wf", "premium", OPUS, "anthropic", one_million),
    )
    .await;
    for _ in 0..2 {
        other
            .post(
                "/v1/usage",
                call("wf", "premium", "large", "acme", one_million),
            )
            .await;
    }
    for (replica, version) in [(&app, "attune-2026-11"), (&other, "acme-2")] {
        let (_, s) = replica.get("/v1/usage/savings").await;
        assert_eq!(s["price_table_version"], version, "{s}");
        assert_eq!(
            s["price_tables"],
            json!({"attune-2026-11": 1, "acme-2": 2}),
            "{s}"
        );
        // $5 at opus's built-in price, then $10 twice at acme's.
        assert_usd(&s["baseline_cost_usd"], 25.0);
    }
}

/// A batch of 1000 calls at $1,000,000 each, ids `big-<n>-<i>`, at `ts`
/// (now if `None`).
fn big_batch(n: usize, ts: Option<&str>) -> Value {
    let records: Vec<Value> = (0..1000)
        .map(|i| {
            let mut r = simple(&format!("big-{n}-{i}"));
            r["cost_usd"] = json!(1_000_000.0);
            if let Some(ts) = ts {
                r["ts"] = json!(ts);
            }
            r
        })
        .collect();
    json!({ "records": records })
}

/// Nine big batches ([`big_batch`]) fill a day to the $9 billion it holds.
async fn fill_a_day(app: &TestApp, first: usize, ts: Option<&str>) {
    for n in first..first + 9 {
        let (status, body) = app.post("/v1/usage", big_batch(n, ts)).await;
        assert_eq!(status, 201, "{body}");
    }
}

async fn a_day_total_that_would_overflow_refuses_the_whole_batch(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    fill_a_day(&app, 0, None).await;
    let batch = |n: usize| big_batch(n, None);
    let (status, body) = app.post("/v1/usage", batch(9)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(problem_field(&body), "records");
    let (_, stats) = app.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 9000);
    assert_usd(&stats["total_cost_usd"], 9.0e9);
    // None of the refused batch's ids was claimed.
    let mut small = simple("big-9-0");
    small["cost_usd"] = json!(0.0);
    let (status, body) = app.post("/v1/usage", small).await;
    assert_eq!((status, body["accepted"].as_u64()), (201, Some(1)));
    // The limit holds to the nano-dollar: near it, a double (as Redis's Lua
    // counts) cannot tell 9e18 + 1 from 9e18.
    let mut tiny = simple("tiny");
    tiny["cost_usd"] = json!(1e-9);
    let (status, body) = app.post("/v1/usage", tiny).await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "records"));
}

/// Two full days add up to more than one day may hold (and than an `i64`
/// of nano-dollars): summaries over both still answer, exactly.
async fn summaries_add_up_days_past_what_one_day_holds(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let yesterday = (Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc()
        .to_rfc3339();
    fill_a_day(&app, 0, Some(&yesterday)).await;
    fill_a_day(&app, 9, None).await;
    let (status, stats) = app.get("/v1/usage/stats?days=2").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["total_calls"], 18_000);
    assert_usd(&stats["total_cost_usd"], 1.8e10);
    assert_usd(&stats["by_workflow"]["wf"]["cost_usd"], 1.8e10);
    let (status, savings) = app.get("/v1/usage/savings?days=2").await;
    assert_eq!(status, 200, "{savings}");
    assert_usd(&savings["actual_cost_usd"], 1.8e10);
}

conformance!(
    the_worked_example_adds_up_to_the_cent,
    a_repeated_usage_id_is_counted_once_even_in_a_later_batch,
    a_batch_of_1001_records_is_refused_naming_records,
    a_negative_token_count_is_refused_naming_the_field,
    an_unknown_usage_field_is_refused_naming_it,
    user_ids_are_never_stored_in_clear,
    recent_lists_newest_first_with_totals,
    recent_pages_with_a_cursor,
    a_leap_second_record_is_filed_where_it_is_listed,
    tiers_are_accepted_in_any_case_and_stored_lower_case,
    timestamps_too_far_ahead_or_beyond_retention_are_refused,
    agent_keys_record_usage_only_for_their_agents_and_viewers_read_it,
    a_batch_emits_one_usage_recorded_event_with_its_totals,
    prices_show_the_builtin_table,
    a_prices_file_replaces_the_table,
    a_day_total_that_would_overflow_refuses_the_whole_batch,
    summaries_add_up_days_past_what_one_day_holds,
    usage_ids_belong_to_the_key_that_sends_them,
    a_day_breaks_down_by_its_first_500_names_and_the_rest_as_other,
);

/// Two replicas posting the same batches at the same time count each id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_the_same_ids_count_each_once() {
    let app = TestApp::spawn(Kind::Redis).await;
    let replica = app.replica().await;
    let records: Vec<Value> = (0..300).map(|i| simple(&format!("race-{i}"))).collect();
    let body = json!({ "records": records });
    let mut tasks = Vec::new();
    for target in [&app, &replica, &app, &replica] {
        let url = target.url("/v1/usage");
        let client = target.client.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 201);
            resp.json::<Value>().await.unwrap()["accepted"]
                .as_u64()
                .unwrap()
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(accepted, 300);
    let (_, stats) = replica.get("/v1/usage/stats").await;
    assert_eq!(stats["total_calls"], 300);
    // The events of the requests that recorded something add up to the same.
    let events = app.events_of("usage.recorded").await;
    let total: u64 = events
        .iter()
        .map(|e| e["data"]["accepted"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 300);
}

// The Redis engine against the memory engine, on random histories.

/// What the random histories' records are made of: a few values each, so
/// that records collide on every breakdown. Client ids are `call-0` to
/// `call-29`.
const WORKFLOWS: [&str; 4] = ["review", "summarize", "triage", "plan"];
const TIERS: [&str; 5] = ["cheap", "capable", "premium", "Premium", "CHEAP"];
const MODELS: [&str; 5] = [HAIKU, SONNET, OPUS, "gpt-x", "llama-70b"];
const PROVIDERS: [&str; 3] = ["anthropic", "openai", "local"];
const AGENT_IDS: [&str; 3] = ["a1", "a2", "a3"];
const CLIENT_IDS: u32 = 30;

fn one_of<T: Clone>(rng: &mut StdRng, values: &[T]) -> T {
    values[rng.random_range(0..values.len())].clone()
}

/// `at` as a record's `ts`, in whole seconds.
fn ts(at: DateTime<Utc>) -> Value {
    json!(at.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// A random call. Most carry a `ts` (whole seconds) up to four days before
/// `now` and most of those a client id; a quarter carry neither, and each
/// app stamps them with its own now and gives them its own id.
fn random_record(rng: &mut StdRng, now: DateTime<Utc>) -> Value {
    let mut r = call(
        one_of(rng, &WORKFLOWS),
        one_of(rng, &TIERS),
        one_of(rng, &MODELS),
        one_of(rng, &PROVIDERS),
        [
            one_of(rng, &[0, 1, 999, 10_000, 123_457]),
            one_of(rng, &[0, 7, 2_000, 40_000]),
            one_of(rng, &[0, 0, 3, 20_000, 100_000]),
            one_of(rng, &[0, 0, 8_000]),
        ],
    );
    r["duration_ms"] = json!(rng.random_range(0..=5_000));
    match rng.random_range(0..10) {
        0..=2 => r["stage"] = Value::Null,
        3..=5 => r["stage"] = json!("lint"),
        _ => {}
    }
    if rng.random_bool(0.6) {
        r["agent_id"] = json!(one_of(rng, &AGENT_IDS));
    }
    match rng.random_range(0..10) {
        0..=1 => r["cache"] = json!({ "hit": true, "type": one_of(rng, &["semantic", "hash"]) }),
        2 => r["cache"] = json!({ "hit": false }),
        _ => {}
    }
    if rng.random_bool(0.35) {
        // From a nano-dollar, the smallest amount, to the largest a call may cost.
        r["cost_usd"] = json!(one_of(rng, &[0.0, 1e-9, 0.0123, 0.16, 2.5, 1_000_000.0]));
    }
    if rng.random_bool(0.75) {
        r["ts"] = ts(now - TimeDelta::seconds(rng.random_range(0..=4 * 86_400)));
        if rng.random_bool(0.8) {
            r["id"] = json!(format!("call-{}", rng.random_range(0..CLIENT_IDS)));
        }
    }
    r
}

/// A body of 1–8 records (a single one half the time, not as a batch).
/// Some repeat an earlier record's id: with the very same body, or with
/// another one; either way the first record of an id is the one counted.
fn random_body(rng: &mut StdRng, now: DateTime<Utc>, sent: &mut Vec<Value>) -> Value {
    let count = if rng.random_bool(0.5) {
        1
    } else {
        rng.random_range(2..=8)
    };
    let records: Vec<Value> = (0..count)
        .map(|_| {
            let mut r = random_record(rng, now);
            if !sent.is_empty() && rng.random_bool(0.2) {
                let earlier = one_of(rng, sent);
                if rng.random_bool(0.5) {
                    r = earlier;
                } else if r.get("ts").is_some() {
                    r["id"] = earlier["id"].clone();
                }
            }
            if r.get("id").is_some() {
                sent.push(r.clone());
            }
            r
        })
        .collect();
    match <[Value; 1]>::try_from(records) {
        Ok([one]) => one,
        Err(records) => json!({ "records": records }),
    }
}

/// A batch of 150–400 calls on `day`, each of a workflow the seed never
/// named before or (a third of them) of one it named in an earlier flood,
/// some of a new model or provider too: a few floods on the same day take
/// it past the 500 names it breaks each group down by.
fn flood(rng: &mut StdRng, day: DateTime<Utc>, named: &mut u32) -> Value {
    let records: Vec<Value> = (0..rng.random_range(150..=400))
        .map(|_| {
            let workflow = if *named > 0 && rng.random_bool(0.3) {
                format!("run-{}", rng.random_range(1..=*named))
            } else {
                *named += 1;
                format!("run-{named}")
            };
            let n = rng.random_range(0..10_000);
            let model = if rng.random_bool(0.05) {
                format!("m-{n}")
            } else {
                one_of(rng, &MODELS).to_owned()
            };
            let provider = if rng.random_bool(0.05) {
                format!("p-{n}")
            } else {
                one_of(rng, &PROVIDERS).to_owned()
            };
            let mut r = call(
                &workflow,
                one_of(rng, &TIERS),
                &model,
                &provider,
                [1_000, 100, one_of(rng, &[0, 0, 0, 5_000]), 0],
            );
            r["ts"] = ts(day - TimeDelta::seconds(rng.random_range(0..60)));
            r
        })
        .collect();
    json!({ "records": records })
}

/// One of the usage reads, with random windows and limits.
fn random_read(rng: &mut StdRng) -> String {
    let days = one_of(
        rng,
        &[
            "",
            "days=",
            "days=1",
            "days=2",
            "days=3",
            "days=5",
            "days=30",
            "days=3660",
        ],
    );
    match rng.random_range(0..20) {
        0..=4 => format!("/v1/usage/stats?{days}"),
        5..=8 => format!("/v1/usage/savings?{days}"),
        9..=12 => format!("/v1/usage/cache-stats?{days}"),
        13..=18 => {
            let limit = one_of(
                rng,
                &[
                    "",
                    "limit=1",
                    "limit=5",
                    "limit=20",
                    "limit=200",
                    "limit=1000",
                ],
            );
            format!("/v1/usage/recent?{limit}&{days}")
        }
        _ => "/v1/usage/prices".to_owned(),
    }
}

/// A body short enough for an assertion message.
fn describe(body: &Value) -> String {
    match body["records"].as_array() {
        Some(records) if records.len() > 8 => {
            format!(
                "a batch of {} records, the first {}",
                records.len(),
                records[0]
            )
        }
        _ => body.to_string(),
    }
}

/// A memory app and a Redis app given the same history, and what must
/// differ between their answers: the ids each makes for records sent
/// without one, and the `ts` of records sent without one (each app's own
/// now).
struct Twins {
    memory: TestApp,
    redis: TestApp,
    /// Redis's ids of records → memory's ids of the same records.
    made_ids: HashMap<String, String>,
    /// (Memory's) ids of the records stamped with each app's now.
    stamped: HashSet<String>,
}

impl Twins {
    async fn spawn(keys: &TestKeys) -> Self {
        Self {
            memory: TestApp::spawn_as_admin(Kind::Memory, keys).await,
            redis: TestApp::spawn_as_admin(Kind::Redis, keys).await,
            made_ids: HashMap::new(),
            stamped: HashSet::new(),
        }
    }

    /// Moves both clocks by `by`, or a little further so as to stay two
    /// minutes from a UTC midnight: the apps read their clocks
    /// milliseconds apart, and must agree on which day it is.
    fn advance(&self, mut by: TimeDelta) {
        let clear = |by: TimeDelta| {
            let at = self.memory.state.clock.now() + by;
            (120..86_400 - 120).contains(&at.num_seconds_from_midnight())
        };
        while !clear(by) {
            by += TimeDelta::minutes(5);
        }
        for app in [&self.memory, &self.redis] {
            app.state.clock.advance(by.to_std().expect("forward"));
        }
    }

    /// Memory's now, in whole seconds.
    fn now(&self) -> DateTime<Utc> {
        let now = self.memory.state.clock.now();
        DateTime::from_timestamp(now.timestamp(), 0).expect("a time")
    }

    /// Redis's answer with memory's ids, and either answer's records
    /// stamped by the service with their `ts` set aside, as well as a
    /// `next_cursor` (which holds a record's id); whether there is one is
    /// still compared.
    fn normalize(&self, mut answer: Value) -> Value {
        rename_strings(&mut answer, &self.made_ids);
        if let Some(cursor) = answer.get_mut("next_cursor").filter(|c| c.is_string()) {
            *cursor = json!("<cursor>");
        }
        if let Some(records) = answer.get_mut("records").and_then(Value::as_array_mut) {
            for r in records {
                if r["id"].as_str().is_some_and(|id| self.stamped.contains(id)) {
                    r["ts"] = json!("<now>");
                }
            }
        }
        answer
    }

    /// Panics unless both apps gave the same answer (status and body).
    fn assert_same(&self, at: &str, what: &str, memory: (u16, Value), redis: (u16, Value)) {
        let memory = json!({ "status": memory.0, "body": self.normalize(memory.1) });
        let redis = json!({ "status": redis.0, "body": self.normalize(redis.1) });
        if memory == redis {
            return;
        }
        let path = first_difference(&memory, &redis, "").unwrap_or_default();
        panic!(
            "{at}: {what}: the engines answer differently at {path}: memory {}, redis {}\n\
             memory answered {memory}\nredis answered {redis}",
            memory.pointer(&path).unwrap_or(&Value::Null),
            redis.pointer(&path).unwrap_or(&Value::Null),
        );
    }

    async fn get(&self, at: &str, path: &str) -> Value {
        let (memory, redis) = tokio::join!(self.memory.get(path), self.redis.get(path));
        let body = memory.1.clone();
        self.assert_same(at, &format!("GET {path}"), memory, redis);
        body
    }

    /// Posts `body` to both apps as `key` (the admin's when `None`), and
    /// learns which of their ids and times are their own.
    async fn post(&mut self, at: &str, body: Value, key: Option<&str>) {
        let (memory, redis) = tokio::join!(
            self.memory.post_as("/v1/usage", body.clone(), key),
            self.redis.post_as("/v1/usage", body.clone(), key),
        );
        let records = match body["records"].as_array() {
            Some(records) => records.clone(),
            None => vec![body.clone()],
        };
        let mut stamped = false;
        if (memory.0, redis.0) == (201, 201) {
            for (i, r) in records.iter().enumerate() {
                let (Some(mine), Some(theirs)) =
                    (memory.1["ids"][i].as_str(), redis.1["ids"][i].as_str())
                else {
                    continue;
                };
                if r.get("id").is_none() {
                    self.made_ids.insert(theirs.to_owned(), mine.to_owned());
                }
                if r.get("ts").is_none() {
                    self.stamped.insert(mine.to_owned());
                    stamped = true;
                }
            }
        }
        let what = format!(
            "POST /v1/usage as {} {}",
            key.map_or("admin", |_| "agent"),
            describe(&body)
        );
        self.assert_same(at, &what, memory, redis);
        if stamped {
            // Records stamped by a later request are later on either app.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

/// The Redis engine keeps a usage hash per UTC day whose breakdowns stop at
/// 500 names per group (later ones count under `_other`), a record set per
/// day capped at 1000, and one claim per key and client id, all written by
/// one script that also checks the day totals against their limit; the
/// memory engine keeps the same in maps. None of that may change an answer.
///
/// A random history (3 seeds × 250 steps) goes to a memory app and a Redis
/// app: single records and batches through two keys, with client ids that
/// repeat (the same body again, or another one), floods of new workflow
/// names that take one day past the 500-name cap (and its record set past
/// 1000), clock moves of minutes to two days, and every usage read with
/// random windows and limits. After each step both must have answered
/// alike (status and whole body), but for what each app makes itself: the
/// ids of records sent without one, and the `ts` of records sent without
/// one. The second seed starts by filling today with 9000 calls of
/// exactly the $9 billion a day may hold, so that every later record of
/// today that costs anything must be refused, on both. At the end, both event logs
/// must hold the same `usage.recorded` events.
///
/// The clocks move a few weeks at most in all: claims and day hashes
/// expire on real time on Redis, and well within the 90-day retention
/// nothing may have expired on either engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_usage_answers_as_the_memory_engines_do() {
    let keys = TestKeys::new();
    // Whether any read saw a day past its 500 workflows.
    let mut crossed = false;
    for seed in 1..=3u64 {
        let mut twins = Twins::spawn(&keys).await;
        let mut rng = StdRng::seed_from_u64(seed);
        twins.advance(TimeDelta::zero());
        let (mut sent, mut named) = (Vec::new(), 0);
        // Floods all go to the day before the history starts, which thus
        // has one large hash, not every day.
        let start = twins.now();
        let flooded = start - TimeDelta::days(1);
        if seed == 2 {
            let now = start;
            for batch in 0..9 {
                let records: Vec<Value> = (0..1000)
                    .map(|i| {
                        let mut r = simple(&format!("full-{batch}-{i}"));
                        r["cost_usd"] = json!(1_000_000.0);
                        r["ts"] = ts(now - TimeDelta::seconds(i % 60));
                        r
                    })
                    .collect();
                let at = format!("seed {seed}, filling today, batch {batch}");
                twins.post(&at, json!({ "records": records }), None).await;
            }
            // Today, the newest day, is past the 1000 records a day keeps:
            // these are the ones kept.
            let at = format!("seed {seed}, today filled");
            twins.get(&at, "/v1/usage/recent?limit=1000&days=1").await;
        }
        for step in 0..250 {
            let at = format!("seed {seed}, step {step}");
            let now = twins.now();
            match rng.random_range(0..100) {
                0..=39 => {
                    let body = random_body(&mut rng, now, &mut sent);
                    let key = rng.random_bool(0.3).then_some(keys.agent.as_str());
                    twins.post(&at, body, key).await;
                }
                40..=42 => {
                    let body = flood(&mut rng, flooded, &mut named);
                    twins.post(&at, body, None).await;
                }
                43..=50 => {
                    let by = match rng.random_range(0..20) {
                        0..=9 => TimeDelta::minutes(rng.random_range(1..=180)),
                        10..=16 => TimeDelta::hours(rng.random_range(1..=20)),
                        _ => TimeDelta::hours(rng.random_range(24..=48)),
                    };
                    twins.advance(by);
                }
                _ => {
                    let path = random_read(&mut rng);
                    let answer = twins.get(&at, &path).await;
                    crossed |= answer["by_workflow"]
                        .get(attune_telemetry::usage::OTHER)
                        .is_some();
                }
            }
        }
        let (memory, redis) = (
            usage_events(&twins.memory).await,
            usage_events(&twins.redis).await,
        );
        if let Some(path) = first_difference(&memory, &redis, "") {
            panic!(
                "seed {seed}, after the last step: the usage.recorded events differ at {path}: \
                 memory {}, redis {}",
                memory.pointer(&path).unwrap_or(&Value::Null),
                redis.pointer(&path).unwrap_or(&Value::Null),
            );
        }
    }
    assert!(crossed, "no read saw a day past its 500 workflows");
}

/// An app's `usage.recorded` events, oldest first, without what the log
/// itself gives them (their id and time).
async fn usage_events(app: &TestApp) -> Value {
    let mut events = app.events_of("usage.recorded").await;
    for e in &mut events {
        let e = e.as_object_mut().expect("an event");
        e.remove("id");
        e.remove("ts");
    }
    Value::Array(events)
}

/// Two replicas recording different calls at the same time lose none of
/// them: every total adds up exactly, read through either replica (the
/// original kept usage in local files, and concurrent writers lost updates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_recording_at_once_lose_no_update() {
    let app = TestApp::spawn(Kind::Redis).await;
    let replica = app.replica().await;
    let mut tasks = Vec::new();
    for (n, target) in [&app, &replica, &app, &replica].into_iter().enumerate() {
        let records: Vec<Value> = (0..250)
            .map(|i| simple(&format!("at-once-{n}-{i}")))
            .collect();
        let (url, client) = (target.url("/v1/usage"), target.client.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&json!({ "records": records }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 201);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Each record: 1,000 input and 100 output tokens of the cheap model.
    let (_, one) = app.get("/v1/usage/stats").await;
    let (_, other) = replica.get("/v1/usage/stats").await;
    assert_eq!(one, other);
    assert_eq!(one["total_calls"], 1000, "{one}");
    assert_eq!(one["tokens_input"], 1_000_000, "{one}");
    assert_eq!(one["tokens_output"], 100_000, "{one}");
    let (_, prices) = app.get("/v1/usage/prices").await;
    let model = prices["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "claude-haiku-4-5")
        .expect("the cheap model's prices")
        .clone();
    let per_call = (1000.0 * model["input"].as_f64().unwrap()
        + 100.0 * model["output"].as_f64().unwrap())
        / 1e6;
    let total = one["total_cost_usd"].as_f64().unwrap();
    assert!(
        (total - 1000.0 * per_call).abs() < 1e-9,
        "{total} vs {per_call}"
    );
}

/// The `user_hash` of `user` in a record posted through `app`.
async fn hash_through(app: &TestApp, user: &str, id: &str) -> String {
    let mut r = simple(id);
    r["user_id"] = json!(user);
    let (status, body) = app.post("/v1/usage", r).await;
    assert_eq!(status, 201, "{body}");
    let (_, recent) = app.get("/v1/usage/recent?limit=1").await;
    assert_eq!(recent["records"][0]["id"], id, "{recent}");
    recent["records"][0]["user_hash"]
        .as_str()
        .expect("a hash")
        .to_owned()
}

/// After Redis lost its data (restarted empty), replicas still hash a user
/// one way: a running replica's first write puts its secret back, and one
/// holding another secret than the stored one (a replica started meanwhile
/// made a new one) takes the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replicas_hash_a_user_alike_after_redis_lost_its_data() {
    let app = TestApp::spawn(Kind::Redis).await;
    let flush = || {
        let _: () = ::redis::cmd("FLUSHALL")
            .query(&mut app.redis.as_ref().unwrap().conn())
            .unwrap();
    };
    let first = hash_through(&app, "alice", "u-1").await;

    // Lost, then written through the running replica first.
    flush();
    assert_eq!(hash_through(&app, "alice", "u-2").await, first);
    let later = app.replica().await;
    assert_eq!(hash_through(&later, "alice", "u-3").await, first);

    // Lost, then a replica starts first (and makes a new secret).
    flush();
    let newer = app.replica().await;
    let fresh = hash_through(&newer, "alice", "u-4").await;
    assert_ne!(fresh, first);
    assert_eq!(hash_through(&app, "alice", "u-5").await, fresh);
    assert_eq!(hash_through(&later, "alice", "u-6").await, fresh);
}

/// A record sent in a leap second is filed by the millisecond it counts as
/// (the next day's first second), so paging over it ends.
async fn a_leap_second_record_is_filed_where_it_is_listed(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let day = (Utc::now() - chrono::Duration::days(2)).date_naive();
    let next = day.succ_opt().unwrap();
    let mut leap = simple("leap");
    leap["ts"] = json!(format!("{day}T23:59:60.500Z"));
    let mut before = simple("before");
    before["ts"] = json!(format!("{day}T12:00:00.000Z"));
    let mut after = simple("after");
    after["ts"] = json!(format!("{next}T12:00:00.000Z"));
    let (status, body) = app
        .post("/v1/usage", json!({ "records": [leap, before, after] }))
        .await;
    assert_eq!(status, 201, "{body}");
    let mut seen = Vec::new();
    let mut path = "/v1/usage/recent?limit=1".to_owned();
    for _ in 0..5 {
        let (_, page) = app.get(&path).await;
        let record = &page["records"][0];
        seen.push(record["id"].as_str().unwrap().to_owned());
        if record["id"] == "leap" {
            assert_eq!(record["ts"], format!("{next}T00:00:00.500Z"));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/usage/recent?limit=1&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["after", "leap", "before"]);
}

/// A page whose last record was dropped meanwhile (a day keeps its newest
/// records) goes on with the records older than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_recent_goes_on_after_a_dropped_cursor_record() {
    let app = TestApp::spawn(Kind::Redis).await;
    let now = Utc::now();
    let records: Vec<Value> = (0..5)
        .map(|i| {
            let mut r = simple(&format!("d-{i}"));
            r["ts"] = json!((now - chrono::Duration::seconds(i)).to_rfc3339());
            r
        })
        .collect();
    app.post("/v1/usage", json!({ "records": records })).await;
    let (_, first) = app.get("/v1/usage/recent?limit=2").await;
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    // Drop the page's last record, d-1, from its day's set.
    let mut conn = app.redis.as_ref().unwrap().conn();
    let pattern = format!("{{{}}}:usage:recent:*", app.prefix);
    let keys: Vec<String> = ::redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
    for key in keys {
        let members: Vec<String> = ::redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        for m in members.iter().filter(|m| m.starts_with(r#"{"id":"d-1","#)) {
            let _: () = ::redis::cmd("ZREM")
                .arg(&key)
                .arg(m)
                .query(&mut conn)
                .unwrap();
        }
    }
    let (status, next) = app
        .get(&format!("/v1/usage/recent?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(status, 200, "{next}");
    let ids: Vec<&str> = next["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d-2", "d-3"], "{next}");
}
