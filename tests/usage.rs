//! Usage records, savings, cache statistics and prices, on both engines.

mod common;

use chrono::Utc;
use common::{Kind, Options, TestApp, TestKeys, problem_field};
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
    let (_, stats) = app.get_as("/v1/usage/stats", Some(&keys.viewer)).await;
    assert_eq!(stats["total_calls"], 2);
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
}

async fn a_day_total_that_would_overflow_refuses_the_whole_batch(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    // Nine batches of 1000 calls at $1,000,000 reach the $9 billion a day holds.
    let batch = |n: usize| -> Value {
        let records: Vec<Value> = (0..1000)
            .map(|i| {
                let mut r = simple(&format!("big-{n}-{i}"));
                r["cost_usd"] = json!(1_000_000.0);
                r
            })
            .collect();
        json!({ "records": records })
    };
    for n in 0..9 {
        let (status, body) = app.post("/v1/usage", batch(n)).await;
        assert_eq!(status, 201, "{body}");
    }
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
}

conformance!(
    the_worked_example_adds_up_to_the_cent,
    a_repeated_usage_id_is_counted_once_even_in_a_later_batch,
    a_batch_of_1001_records_is_refused_naming_records,
    a_negative_token_count_is_refused_naming_the_field,
    user_ids_are_never_stored_in_clear,
    recent_lists_newest_first_with_totals,
    tiers_are_accepted_in_any_case_and_stored_lower_case,
    timestamps_too_far_ahead_or_beyond_retention_are_refused,
    agent_keys_record_usage_only_for_their_agents_and_viewers_read_it,
    a_batch_emits_one_usage_recorded_event_with_its_totals,
    prices_show_the_builtin_table,
    a_prices_file_replaces_the_table,
    a_day_total_that_would_overflow_refuses_the_whole_batch,
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
