//! Quality feedback, tier recommendations and template ratings, on both engines.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use attune_telemetry::events::StreamId;
use attune_telemetry::feedback::WINDOW;
use common::{Kind, Options, TestApp, TestKeys, first_difference, problem_field, rename_strings};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

async fn score(app: &TestApp, stage: &str, tier: &str, scores: &[f64]) {
    for s in scores {
        let (status, body) = app
            .post(
                "/v1/feedback",
                json!({ "workflow": "code-review", "stage": stage, "tier": tier, "quality_score": s }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

async fn recommend(app: &TestApp, stage: &str, tier: &str) -> Value {
    let (status, body) = app
        .get(&format!(
            "/v1/feedback/recommendation?workflow=code-review&stage={stage}&current_tier={tier}"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body
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

async fn fewer_than_ten_scores_keep_the_tier_with_no_confidence(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "lint", "cheap", &[0.1; 9]).await;
    let r = recommend(&app, "lint", "cheap").await;
    assert_eq!(r["current_tier"], "cheap");
    assert_eq!(r["recommended_tier"], "cheap");
    assert_close(&r["confidence"], 0.0);
    assert_eq!(r["stats"]["sample_count"], 9);
    assert!(
        r["reason"].as_str().unwrap().contains("insufficient"),
        "{r}"
    );
}

async fn an_average_below_0_7_moves_one_tier_up(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "lint", "cheap", &[0.5; 10]).await;
    let r = recommend(&app, "lint", "cheap").await;
    assert_eq!(r["recommended_tier"], "capable");
    // min(10 / 20, 1)
    assert_close(&r["confidence"], 0.5);
    score(&app, "tests", "capable", &[0.6; 30]).await;
    let r = recommend(&app, "tests", "CAPABLE").await;
    assert_eq!(r["recommended_tier"], "premium");
    assert_close(&r["confidence"], 1.0);
}

async fn premium_stays_premium_with_full_confidence_when_quality_is_low(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "design", "premium", &[0.4; 10]).await;
    let r = recommend(&app, "design", "premium").await;
    assert_eq!(r["recommended_tier"], "premium");
    assert_close(&r["confidence"], 1.0);
    assert_close(&r["stats"]["avg"], 0.4);
}

async fn an_average_above_0_9_moves_down_when_the_lower_tier_scores_above_0_85(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "summary", "capable", &[0.95; 12]).await;
    score(&app, "summary", "cheap", &[0.9; 10]).await;
    let r = recommend(&app, "summary", "capable").await;
    assert_eq!(r["recommended_tier"], "cheap", "{r}");
    assert_close(&r["confidence"], 0.6);
    score(&app, "summary", "premium", &[0.92; 10]).await;
    score(&app, "summary", "capable", &[0.95; 8]).await;
    let r = recommend(&app, "summary", "premium").await;
    assert_eq!(r["recommended_tier"], "capable", "{r}");
}

async fn an_average_above_0_9_stays_when_the_lower_tier_scores_0_85_or_less(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "summary", "capable", &[0.95; 10]).await;
    score(&app, "summary", "cheap", &[0.85; 10]).await;
    let r = recommend(&app, "summary", "capable").await;
    assert_eq!(r["recommended_tier"], "capable", "{r}");
    assert_close(&r["confidence"], 0.5);
    // A lower tier with no scores of its own is no evidence either.
    score(&app, "triage", "capable", &[0.95; 10]).await;
    let r = recommend(&app, "triage", "capable").await;
    assert_eq!(r["recommended_tier"], "capable", "{r}");
    // Any scores averaging above 0.85 are: the rule sets no minimum.
    score(&app, "triage", "cheap", &[0.99; 3]).await;
    let r = recommend(&app, "triage", "capable").await;
    assert_eq!(r["recommended_tier"], "cheap", "{r}");
    // And cheap has no lower tier at all.
    score(&app, "format", "cheap", &[0.99; 10]).await;
    assert_eq!(
        recommend(&app, "format", "cheap").await["recommended_tier"],
        "cheap"
    );
}

async fn an_acceptable_average_keeps_the_tier(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(
        &app,
        "plan",
        "capable",
        &[0.7, 0.8, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
    )
    .await;
    let r = recommend(&app, "plan", "capable").await;
    assert_eq!(r["recommended_tier"], "capable");
    assert_close(&r["confidence"], 0.6);
    assert!(r["reason"].as_str().unwrap().contains("acceptable"), "{r}");
}

async fn stats_report_average_extremes_and_the_recent_trend(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "lint", "cheap", &[0.4, 0.4, 0.6]).await;
    let (_, s) = app
        .get("/v1/feedback/stats?workflow=code-review&stage=lint&tier=cheap")
        .await;
    assert_close(&s["recent_trend"], 0.0);
    score(&app, "lint", "cheap", &[0.6]).await;
    let (status, s) = app
        .get("/v1/feedback/stats?workflow=code-review&stage=lint&tier=cheap")
        .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["sample_count"], 4);
    assert_close(&s["avg"], 0.5);
    assert_close(&s["min"], 0.4);
    assert_close(&s["max"], 0.6);
    // (mean(0.6, 0.6) − mean(0.4, 0.4)) / 0.4
    assert_close(&s["recent_trend"], 0.5);
    assert_eq!(s["tier"], "cheap");

    // Without a tier, every tier's scores together, in time order.
    score(&app, "lint", "premium", &[1.0, 1.0]).await;
    let (_, s) = app
        .get("/v1/feedback/stats?workflow=code-review&stage=lint")
        .await;
    assert_eq!(s["sample_count"], 6);
    assert_eq!(s["tier"], Value::Null);
    // older 0.4, 0.4, 0.6 (mean 0.4667); newer 0.6, 1.0, 1.0 (mean 0.8667)
    assert_close(&s["recent_trend"], (2.6 / 3.0 - 1.4 / 3.0) / (1.4 / 3.0));

    let (_, empty) = app
        .get("/v1/feedback/stats?workflow=code-review&stage=none")
        .await;
    assert_eq!(empty["sample_count"], 0);
    assert_eq!(empty["avg"], Value::Null);
}

async fn underperforming_lists_stages_below_the_threshold_worst_first(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    score(&app, "lint", "cheap", &[0.6; 10]).await;
    score(&app, "tests", "capable", &[0.3; 10]).await;
    score(&app, "docs", "cheap", &[0.9; 10]).await;
    score(&app, "sparse", "cheap", &[0.1; 3]).await;
    let (status, body) = app
        .get("/v1/feedback/underperforming?workflow=code-review")
        .await;
    assert_eq!(status, 200, "{body}");
    let stages: Vec<(&str, &str)> = body["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap(), s["tier"].as_str().unwrap()))
        .collect();
    assert_eq!(stages, [("tests", "capable"), ("lint", "cheap")]);
    assert_close(&body["threshold"], 0.7);
    assert_eq!(body["min_samples"], 10);
    let (_, body) = app
        .get("/v1/feedback/underperforming?threshold=0.5&min_samples=3")
        .await;
    let stages: Vec<&str> = body["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["sparse", "tests"]);
    let (_, other) = app.get("/v1/feedback/underperforming?workflow=other").await;
    assert_eq!(other["stages"], json!([]));
    assert_eq!(other["next_cursor"], json!(null));

    // Pages follow each other with no row lost or repeated, ties included.
    score(&app, "style", "cheap", &[0.6; 10]).await;
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = app
            .get(&format!(
                "/v1/feedback/underperforming?min_samples=3&limit=1&cursor={cursor}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let rows = page["stages"].as_array().unwrap();
        paged.extend(rows.iter().map(|s| s["stage"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
        assert_eq!(rows.len(), 1);
    }
    assert_eq!(paged, ["sparse", "tests", "lint", "style"]);
    let (status, problem) = app
        .get("/v1/feedback/underperforming?cursor=bm90LWEtY3Vyc29y")
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem_field(&problem), "cursor");
}

async fn quality_scores_outside_0_to_1_are_refused(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let body =
        |s: Value| json!({ "workflow": "w", "stage": "s", "tier": "cheap", "quality_score": s });
    let (status, b) = app.post("/v1/feedback", body(json!(1.5))).await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "quality_score"));
    let (status, b) = app.post("/v1/feedback", body(json!(-0.1))).await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "quality_score"));
    let (status, b) = app
        .post(
            "/v1/feedback",
            json!({ "workflow": "w", "stage": "a:b", "tier": "cheap", "quality_score": 0.5 }),
        )
        .await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "stage"));
    let (status, b) = app
        .get("/v1/feedback/recommendation?workflow=w&stage=s&current_tier=gold")
        .await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "current_tier"));
    // A misspelt field is refused, not dropped (the metadata would be lost).
    let mut misspelt = body(json!(0.5));
    misspelt["metdata"] = json!({"run": 1});
    let (status, b) = app.post("/v1/feedback", misspelt).await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "metdata"));
    let (_, stats) = app.get("/v1/feedback/stats?workflow=w&stage=s").await;
    assert_eq!(stats["sample_count"], 0, "{stats}");
}

async fn feedback_is_recorded_with_an_event_carrying_its_metadata(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, body) = app
        .post(
            "/v1/feedback",
            json!({
                "workflow": "w", "stage": "s", "tier": "Premium", "quality_score": 0.75,
                "metadata": { "reviewer": "ci" }, "agent_id": "agent-3",
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["tier"], "premium");
    assert_close(&body["quality_score"], 0.75);
    let events = app.events_of("feedback.recorded").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["agent_id"], "agent-3");
    assert_eq!(events[0]["data"]["kind"], "quality");
    assert_eq!(events[0]["data"]["feedback_id"], body["feedback_id"]);
    assert_eq!(events[0]["data"]["metadata"]["reviewer"], "ci");
}

async fn template_confidence_is_the_share_of_good_ratings(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, t) = app.get("/v1/templates/fresh").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!((t["good"].as_u64(), t["bad"].as_u64()), (Some(0), Some(0)));
    assert_close(&t["confidence"], 1.0);

    let rate = |id: &'static str, rating: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app
                .post(
                    &format!("/v1/templates/{id}/feedback"),
                    json!({ "rating": rating }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    rate("alpha", "good").await;
    rate("alpha", "good").await;
    let t = rate("alpha", "bad").await;
    assert_eq!(t["template_id"], "alpha");
    assert_eq!((t["good"].as_u64(), t["bad"].as_u64()), (Some(2), Some(1)));
    assert_close(&t["confidence"], 2.0 / 3.0);
    rate("beta", "bad").await;
    rate("gamma", "good").await;
    let (_, t) = app.get("/v1/templates/alpha").await;
    assert_close(&t["confidence"], 2.0 / 3.0);
    let (status, b) = app
        .post("/v1/templates/alpha/feedback", json!({ "rating": "meh" }))
        .await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "rating"));
    let (status, b) = app
        .post(
            "/v1/templates/alpha/feedback",
            json!({ "rating": "good", "weight": 2 }),
        )
        .await;
    assert_eq!((status, problem_field(&b).as_str()), (422, "weight"));

    let ids = |body: &Value| -> Vec<String> {
        body["templates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["template_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, by_id) = app.get("/v1/templates").await;
    assert_eq!(ids(&by_id), ["alpha", "beta", "gamma"]);
    let (_, best) = app.get("/v1/templates?order=confidence").await;
    assert_eq!(ids(&best), ["gamma", "alpha", "beta"]);
    let (_, worst) = app.get("/v1/templates?order=-confidence").await;
    assert_eq!(ids(&worst), ["beta", "alpha", "gamma"]);

    // Pages follow `next_cursor` to the end, in either order.
    for order in ["template_id", "confidence"] {
        let mut seen = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, page) = app
                .get(&format!(
                    "/v1/templates?order={order}&limit=2&cursor={cursor}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            seen.extend(ids(&page));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
        assert_eq!(seen.len(), 3, "{order}: {seen:?}");
    }
    // A forged cursor far past the end is a 422, not an overflow.
    use base64::Engine as _;
    let forged =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("offset:{}", usize::MAX));
    let (status, problem) = app
        .get(&format!("/v1/templates?order=confidence&cursor={forged}"))
        .await;
    assert_eq!((status, problem_field(&problem).as_str()), (422, "cursor"));
    let events = app.events_of("feedback.recorded").await;
    assert_eq!(events.len(), 5);
    assert_eq!(events[0]["data"]["kind"], "template");
}

async fn agents_write_feedback_and_read_recommendations_and_viewers_read_summaries(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let body = json!({ "workflow": "w", "stage": "s", "tier": "cheap", "quality_score": 0.9 });
    let (status, _) = app
        .post_as("/v1/feedback", body.clone(), Some(&keys.agent))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .post_as("/v1/feedback", body.clone(), Some(&keys.viewer))
        .await;
    assert_eq!(status, 403);
    // A key limited to some agents writes only for them, so it names one.
    let (status, problem) = app
        .post_as("/v1/feedback", body.clone(), Some(&keys.ci_agent))
        .await;
    assert_eq!(
        (status, problem_field(&problem).as_str()),
        (422, "agent_id")
    );
    let mut scoped = body;
    scoped["agent_id"] = json!("prod-1");
    let (status, _) = app
        .post_as("/v1/feedback", scoped, Some(&keys.ci_agent))
        .await;
    assert_eq!(status, 403);
    // Template ratings alike.
    let rate = |body: Value| app.post_as("/v1/templates/t/feedback", body, Some(&keys.ci_agent));
    let (status, problem) = rate(json!({"rating": "good"})).await;
    assert_eq!(
        (status, problem_field(&problem).as_str()),
        (422, "agent_id")
    );
    let (status, _) = rate(json!({"rating": "good", "agent_id": "prod-1"})).await;
    assert_eq!(status, 403);
    let (status, rated) = rate(json!({"rating": "good", "agent_id": "ci-1"})).await;
    assert_eq!((status, rated["good"].clone()), (200, json!(1)), "{rated}");
    let (_, page) = app
        .get_as("/v1/events?types=feedback.recorded", Some(&keys.viewer))
        .await;
    let last = page["events"].as_array().and_then(|e| e.last()).cloned();
    assert_eq!(
        last.map(|e| e["agent_id"].clone()),
        Some(json!("ci-1")),
        "{page}"
    );
    let recommendation = "/v1/feedback/recommendation?workflow=w&stage=s&current_tier=cheap";
    let (status, _) = app.get_as(recommendation, Some(&keys.agent)).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_as("/v1/templates/t", Some(&keys.agent)).await;
    assert_eq!(status, 200);
    for path in [
        "/v1/feedback/stats?workflow=w&stage=s",
        "/v1/feedback/underperforming",
        "/v1/templates",
    ] {
        let (status, _) = app.get_as(path, Some(&keys.agent)).await;
        assert_eq!(status, 403, "{path}");
        let (status, _) = app.get_as(path, Some(&keys.viewer)).await;
        assert_eq!(status, 200, "{path}");
    }
}

conformance!(
    fewer_than_ten_scores_keep_the_tier_with_no_confidence,
    an_average_below_0_7_moves_one_tier_up,
    premium_stays_premium_with_full_confidence_when_quality_is_low,
    an_average_above_0_9_moves_down_when_the_lower_tier_scores_above_0_85,
    an_average_above_0_9_stays_when_the_lower_tier_scores_0_85_or_less,
    an_acceptable_average_keeps_the_tier,
    stats_report_average_extremes_and_the_recent_trend,
    underperforming_lists_stages_below_the_threshold_worst_first,
    quality_scores_outside_0_to_1_are_refused,
    feedback_is_recorded_with_an_event_carrying_its_metadata,
    template_confidence_is_the_share_of_good_ratings,
    agents_write_feedback_and_read_recommendations_and_viewers_read_summaries,
);

// A differential test: random histories on both engines, every answer compared.

/// What a random history scores and rates: few names, so that scores land
/// in the same groups and ratings on the same templates. `Review` differs
/// from `review` only in case, and the template ids sort differently by
/// byte and by letter.
const WORKFLOWS: [&str; 3] = ["review", "deploy", "Review"];
const STAGES: [&str; 4] = ["lint", "tests", "docs", "plan"];
const TIERS: [&str; 3] = ["cheap", "capable", "premium"];
const TEMPLATES: [&str; 5] = ["t-1", "T-1", "t.2", "t_3", "alpha"];
const AGENT_IDS: [&str; 2] = ["a1", "ci-1"];

/// Scores on the edges of the range and of the rules (0.7, 0.85, 0.9),
/// and some that print with many digits.
const EDGE_SCORES: [f64; 9] = [0.0, -0.0, 1.0, 0.7, 0.85, 0.9, 0.1, 0.123456789, 1e-7];

/// How far from the 7-day window's edge every score stays whenever the
/// clocks move: the two apps stamp and read milliseconds apart, and a
/// score right on the edge could be in one app's window and out of the
/// other's. A minute is far more than the real time a history takes.
const EDGE_MARGIN_MS: i64 = 60_000;

fn pick<T: Clone>(rng: &mut StdRng, values: &[T]) -> T {
    values[rng.random_range(0..values.len())].clone()
}

/// Each stage's usual scores, so that averages fall on every side of the
/// rules: `lint` high (tiers move down), `tests` low (tiers move up),
/// `docs` around the lower tier's 0.85, `plan` anywhere.
fn usual_scores(stage: &str) -> &'static [f64] {
    match stage {
        "lint" => &[0.9, 0.95, 1.0, 0.92],
        "tests" => &[0.0, 0.3, 0.5, 0.65],
        "docs" => &[0.8, 0.85, 0.86, 0.95],
        _ => &[0.2, 0.7, 0.71, 0.99],
    }
}

/// A tier as a client may write it: mostly lower-case, sometimes in
/// another case, rarely one that does not exist.
fn random_tier(rng: &mut StdRng) -> String {
    match rng.random_range(0..20) {
        0..=15 => pick(rng, &TIERS).to_owned(),
        16..=18 => pick(rng, &["Cheap", "CAPABLE", "Premium"]).to_owned(),
        _ => "gold".to_owned(),
    }
}

/// A quality score for `stage`: mostly its usual ones, sometimes an edge
/// value, sometimes one the service must refuse.
fn random_score(rng: &mut StdRng, stage: &str) -> Value {
    match rng.random_range(0..10) {
        0..=6 => json!(pick(rng, usual_scores(stage))),
        7..=8 => json!(pick(rng, &EDGE_SCORES)),
        _ => pick(
            rng,
            &[
                json!(-0.1),
                json!(1.0000001),
                json!(1.5),
                json!("0.5"),
                Value::Null,
            ],
        ),
    }
}

/// A `POST /v1/feedback` body, mostly for the `busy` workflow, now and
/// then with metadata, an agent, or something invalid.
fn random_feedback(rng: &mut StdRng, busy: &str) -> Value {
    let stage = pick(rng, &STAGES);
    let workflow = match rng.random_bool(0.85) {
        true => busy,
        false => pick(rng, &WORKFLOWS),
    };
    let mut body = json!({
        "workflow": workflow,
        "stage": stage,
        "tier": random_tier(rng),
        "quality_score": random_score(rng, stage),
    });
    if rng.random_bool(0.3) {
        body["metadata"] =
            json!({ "reviewer": pick(rng, &["ci", "ada"]), "n": rng.random_range(0..3) });
    }
    if rng.random_bool(0.3) {
        body["agent_id"] = json!(pick(rng, &AGENT_IDS));
    }
    match rng.random_range(0..40) {
        0 => body["stage"] = json!("a:b"),
        1 => body["workflow"] = json!(""),
        2 => body["metadata"] = json!([1]),
        3 => body["agent_id"] = json!("-a"),
        _ => {}
    }
    body
}

/// `a=1&b=2` from the parameters given.
fn query(params: &[Option<String>]) -> String {
    params
        .iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join("&")
}

/// `name=<one of values>`, more often than not (`values` may hold invalid
/// ones).
fn maybe(rng: &mut StdRng, name: &str, values: &[&str]) -> Option<String> {
    rng.random_bool(0.6)
        .then(|| format!("{name}={}", pick(rng, values)))
}

/// One of the single-answer feedback reads: statistics (of one tier or
/// every tier), a recommendation, or a template's ratings.
fn random_read(rng: &mut StdRng) -> String {
    let (workflow, stage) = (pick(rng, &WORKFLOWS), pick(rng, &STAGES));
    match rng.random_range(0..3) {
        0 => {
            let stage = rng.random_bool(0.95).then(|| format!("stage={stage}"));
            let tier = rng
                .random_bool(0.6)
                .then(|| format!("tier={}", random_tier(rng)));
            let q = query(&[Some(format!("workflow={workflow}")), stage, tier]);
            format!("/v1/feedback/stats?{q}")
        }
        1 => format!(
            "/v1/feedback/recommendation?workflow={workflow}&stage={stage}&current_tier={}",
            random_tier(rng)
        ),
        _ => {
            let id = if rng.random_bool(0.95) {
                pick(rng, &TEMPLATES)
            } else {
                "-x"
            };
            format!("/v1/templates/{id}")
        }
    }
}

/// The first page of an underperforming listing with random filters
/// (thresholds and counts on and off the rules' edges, invalid ones too).
fn random_underperforming(rng: &mut StdRng) -> String {
    let q = query(&[
        maybe(rng, "workflow", &["review", "deploy", "Review", "none"]),
        maybe(
            rng,
            "threshold",
            &["0", "0.5", "0.7", "0.75", "0.86", "0.9", "0.95", "1", "1.5"],
        ),
        maybe(rng, "min_samples", &["1", "2", "3", "5", "10", "20", "0"]),
        maybe(rng, "limit", &["1", "2", "3", "5", "1000", "0"]),
    ]);
    format!("/v1/feedback/underperforming?{q}")
}

/// The first page of a template listing in a random order.
fn random_templates(rng: &mut StdRng) -> String {
    let q = query(&[
        maybe(
            rng,
            "order",
            &["template_id", "confidence", "-confidence", "best"],
        ),
        maybe(rng, "limit", &["1", "2", "3", "1000"]),
    ]);
    format!("/v1/templates?{q}")
}

/// A filtered read of the event log: types (exact, by prefix, several,
/// none that exist), an agent, a page size.
fn random_history(rng: &mut StdRng) -> String {
    let q = query(&[
        maybe(
            rng,
            "types",
            &[
                "feedback.recorded",
                "feedback.*",
                "workflow.*",
                "agent.log,feedback.recorded",
                "nothing.here",
                "Feedback.recorded",
            ],
        ),
        maybe(rng, "agent_id", &["a1", "ci-1", "nobody", "-a"]),
        Some(format!("limit={}", pick(rng, &[1, 2, 5, 20, 1000]))),
    ]);
    format!("/v1/events?{q}")
}

/// What the histories must meet between them, lest the comparisons pass
/// over states that matter (see [`Twins::note`]).
const OUTCOMES: [&str; 8] = [
    "a tier moved up",
    "a tier moved down",
    "a tier kept",
    "an underperforming stage",
    "scores left the window",
    "a second page of underperforming stages",
    "a second page of templates",
    "a second page of events",
];

/// Replaces every `recorded_at` and `ts` in `value` (each app's reading of
/// its own clock) with `<now>`, and returns them in order.
fn set_aside_times(value: &mut Value, times: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (name, v) in fields.iter_mut() {
                match v {
                    Value::String(s) if name == "recorded_at" || name == "ts" => {
                        times.push(std::mem::replace(s, "<now>".to_owned()));
                    }
                    _ => set_aside_times(v, times),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| set_aside_times(v, times)),
        _ => {}
    }
}

/// Whether two times the apps read from their clocks at the same step are
/// the same moment (the clocks have moved alike; the apps read them
/// milliseconds apart).
fn same_moment(a: &str, b: &str) -> bool {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => (a - b).num_milliseconds().abs() < 1_000,
        _ => false,
    }
}

/// A memory app and a Redis app given the same history, and what must
/// differ between their answers.
struct Twins {
    memory: TestApp,
    redis: TestApp,
    /// Redis's feedback ids → memory's, of the same scores.
    feedback_ids: HashMap<String, String>,
    /// When memory recorded each score it accepted (ms, by its clock).
    scored_at: Vec<i64>,
    /// Which of the rules' outcomes the history has met.
    seen: BTreeSet<&'static str>,
    /// The last `sample_count` each statistics or recommendation read answered.
    counts: HashMap<String, u64>,
}

impl Twins {
    async fn spawn(keys: &TestKeys) -> Self {
        Self {
            memory: TestApp::spawn_as_admin(Kind::Memory, keys).await,
            redis: TestApp::spawn_as_admin(Kind::Redis, keys).await,
            feedback_ids: HashMap::new(),
            scored_at: Vec::new(),
            seen: BTreeSet::new(),
            counts: HashMap::new(),
        }
    }

    /// Moves both clocks by `by`, or a few minutes more so that no score is
    /// within [`EDGE_MARGIN_MS`] of leaving the window.
    fn advance(&self, mut by: Duration) {
        let window = WINDOW.num_milliseconds();
        let near_edge = |by: Duration| {
            let now = self.memory.state.clock.now_ms() + by.as_millis() as i64;
            (self.scored_at.iter()).any(|ts| (now - ts - window).abs() < EDGE_MARGIN_MS)
        };
        while near_edge(by) {
            by += Duration::from_secs(300);
        }
        for app in [&self.memory, &self.redis] {
            app.state.clock.advance(by);
        }
    }

    /// `answer` comparable with the other app's: Redis's feedback ids
    /// replaced by memory's, the stream ids of history pages (and where
    /// they continue) dropped, and the apps' times set aside.
    fn comparable(&self, mut answer: Value) -> (Value, Vec<String>) {
        rename_strings(&mut answer, &self.feedback_ids);
        if let Some(events) = answer.get_mut("events").and_then(Value::as_array_mut) {
            for e in events.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("id");
            }
            if answer["next_cursor"].is_string() {
                answer["next_cursor"] = json!("<position>");
            }
        }
        let mut times = Vec::new();
        set_aside_times(&mut answer, &mut times);
        (answer, times)
    }

    /// Panics unless both apps gave the same answer (status and body).
    fn assert_same(&self, at: &str, what: &str, memory: &(u16, Value), redis: &(u16, Value)) {
        let ((m, m_times), (r, r_times)) = (
            self.comparable(memory.1.clone()),
            self.comparable(redis.1.clone()),
        );
        let m = json!({ "status": memory.0, "body": m });
        let r = json!({ "status": redis.0, "body": r });
        if let Some(path) = first_difference(&m, &r, "") {
            panic!(
                "{at}: {what}: the engines answer differently at {path}: memory {}, redis {}\n\
                 memory answered {} {}\nredis answered {} {}",
                m.pointer(&path).unwrap_or(&Value::Null),
                r.pointer(&path).unwrap_or(&Value::Null),
                memory.0,
                memory.1,
                redis.0,
                redis.1,
            );
        }
        for (a, b) in m_times.iter().zip(&r_times) {
            assert!(
                same_moment(a, b),
                "{at}: {what}: memory's time {a} and redis's {b} are not the same moment\n\
                 memory answered {}\nredis answered {}",
                memory.1,
                redis.1,
            );
        }
    }

    /// GETs `path` from both apps and compares.
    async fn get(&mut self, at: &str, path: &str) {
        let (memory, redis) = tokio::join!(self.memory.get(path), self.redis.get(path));
        self.assert_same(at, &format!("GET {path}"), &memory, &redis);
        self.note(path, &memory.1);
    }

    /// POSTs `body` to both apps as `key` (the admin's when `None`), learns
    /// the feedback ids they gave, and compares.
    async fn post(&mut self, at: &str, path: &str, body: Value, key: Option<&str>) {
        let (memory, mut redis) = tokio::join!(
            self.memory.post_as(path, body.clone(), key),
            self.redis.post_as(path, body.clone(), key),
        );
        let both_made = (memory.0, redis.0) == (201, 201);
        if both_made && path == "/v1/feedback" {
            let id = |answer: &Value| answer["feedback_id"].as_str().unwrap_or("").to_owned();
            (self.feedback_ids).insert(id(&redis.1), id(&memory.1));
            let recorded_at = memory.1["recorded_at"].as_str().unwrap_or("");
            let recorded_at = chrono::DateTime::parse_from_rfc3339(recorded_at)
                .unwrap_or_else(|e| panic!("{at}: {body}: memory's recorded_at: {e}"));
            self.scored_at.push(recorded_at.timestamp_millis());
        }
        if both_made && path == "/v1/events" {
            // Each log's own entry id: the history compares the entries.
            let entry_id = |answer: &Value| answer["id"].as_str()?.parse::<StreamId>().ok();
            if entry_id(&memory.1).is_some() && entry_id(&redis.1).is_some() {
                redis.1["id"] = memory.1["id"].clone();
            }
        }
        let who = key.map_or("admin", |_| "agent");
        self.assert_same(at, &format!("POST {path} as {who} {body}"), &memory, &redis);
    }

    /// Reads a listing from its first page to its last on both apps, each
    /// following its own `next_cursor` as `param`, and compares every page.
    /// `start` is where each app starts (`[memory's, redis's]`).
    async fn pages(&mut self, at: &str, first: &str, param: &str, start: [String; 2]) {
        let [mut mine, mut theirs] = start;
        for page in 0.. {
            assert!(page < 500, "{at}: GET {first}: more than 500 pages");
            let sep = if first.ends_with('?') { "" } else { "&" };
            let (m_path, r_path) = (
                format!("{first}{sep}{param}={mine}"),
                format!("{first}{sep}{param}={theirs}"),
            );
            let (memory, redis) = tokio::join!(self.memory.get(&m_path), self.redis.get(&r_path));
            let what = match m_path == r_path {
                true => format!("GET {m_path} (page {page})"),
                false => format!("GET {m_path} (page {page}; redis: {r_path})"),
            };
            self.assert_same(at, &what, &memory, &redis);
            self.note(first, &memory.1);
            if page == 1 {
                self.seen.insert(match first {
                    f if f.starts_with("/v1/feedback/") => {
                        "a second page of underperforming stages"
                    }
                    f if f.starts_with("/v1/templates") => "a second page of templates",
                    _ => "a second page of events",
                });
            }
            match (
                memory.1["next_cursor"].as_str(),
                redis.1["next_cursor"].as_str(),
            ) {
                (Some(m), Some(r)) => (mine, theirs) = (m.to_owned(), r.to_owned()),
                _ => return,
            }
        }
    }

    /// Notes which of the rules' outcomes an answer shows, and whether a
    /// read found fewer scores than the same read before (some left the
    /// window).
    fn note(&mut self, path: &str, answer: &Value) {
        if let (Some(now), Some(to)) = (
            answer["current_tier"].as_str(),
            answer["recommended_tier"].as_str(),
        ) {
            let moved = TIERS
                .iter()
                .position(|t| *t == to)
                .cmp(&TIERS.iter().position(|t| *t == now));
            self.seen.insert(match moved {
                std::cmp::Ordering::Greater => "a tier moved up",
                std::cmp::Ordering::Less => "a tier moved down",
                std::cmp::Ordering::Equal => "a tier kept",
            });
        }
        if answer["stages"].as_array().is_some_and(|s| !s.is_empty()) {
            self.seen.insert("an underperforming stage");
        }
        let count = (answer["sample_count"].as_u64()).or(answer["stats"]["sample_count"].as_u64());
        if let Some(n) = count {
            if self
                .counts
                .insert(path.to_owned(), n)
                .is_some_and(|before| n < before)
            {
                self.seen.insert("scores left the window");
            }
        }
    }

    /// Compares the event logs: whole, in pages of random size, then with
    /// random filters, each from the start or from the same entry of each
    /// app's own log.
    async fn compare_histories(&mut self, at: &str, rng: &mut StdRng) {
        let (mine, theirs) = tokio::join!(self.memory.all_events(), self.redis.all_events());
        self.assert_same(
            at,
            "the whole log",
            &(200, json!({ "events": mine })),
            &(200, json!({ "events": theirs })),
        );
        let paged = format!("/v1/events?limit={}", rng.random_range(1..=20));
        self.pages(at, &paged, "since", Default::default()).await;
        for _ in 0..12 {
            let first = random_history(rng);
            let start = match rng.random_range(0..=mine.len()) {
                0 => Default::default(),
                k => [&mine, &theirs].map(|log| log[k - 1]["id"].as_str().unwrap_or("").to_owned()),
            };
            self.pages(at, &first, "since", start).await;
        }
    }
}

/// The Redis engine keeps each group's scores in a sorted set pruned by a
/// script, finds the groups with recent scores through two more sorted sets
/// (stages per workflow, workflows) scored by their latest score, and keeps
/// template ratings in hashes with a sorted set per order; the memory
/// engine keeps the same in maps and sets. None of that may change an
/// answer.
///
/// A random history (3 seeds × 300 steps) goes to a memory app and a Redis
/// app: scores (single ones through two keys, with metadata and agents, and
/// bursts of 5–15 into one group so that the rules' 10 scores are reached),
/// on edge values (0, −0, 1, 0.7, 0.85, 0.9) and invalid ones, in a few
/// workflows, stages and tiers written in any case; template ratings;
/// custom events; clock moves of minutes to days, so that scores leave the
/// 7-day window; and every read — statistics, recommendations, templates,
/// and the underperforming and template listings with random filters and
/// limits, read page by page to the end. After each step both must have
/// answered alike (status and whole body), but for what each app makes
/// itself: feedback ids (Redis's are mapped to memory's) and the times
/// each reads from its own clock (which must still be the same moment). At
/// the end of each seed the event logs must hold the same events, read
/// whole, in pages and with filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_feedback_answers_as_the_memory_engines_do() {
    let keys = TestKeys::new();
    let mut seen = BTreeSet::new();
    for seed in 1..=3u64 {
        let mut twins = Twins::spawn(&keys).await;
        let mut rng = StdRng::seed_from_u64(seed);
        for step in 0..300 {
            let at = format!("seed {seed}, step {step}");
            // Each workflow has its busy spell of about six days, and is
            // quiet for days before and after: its scores, and then its
            // place in the indexes, age out of the window while the others'
            // stay.
            let busy = WORKFLOWS[step / 100];
            match rng.random_range(0..100) {
                0..=29 => {
                    let key = rng.random_bool(0.3).then_some(keys.agent.as_str());
                    let body = random_feedback(&mut rng, busy);
                    twins.post(&at, "/v1/feedback", body, key).await;
                }
                30..=37 => {
                    let stage = pick(&mut rng, &STAGES);
                    let (workflow, tier) = (busy, pick(&mut rng, &TIERS));
                    for i in 0..rng.random_range(5..=15) {
                        let score = pick(&mut rng, usual_scores(stage));
                        let body = json!({
                            "workflow": workflow, "stage": stage, "tier": tier, "quality_score": score,
                        });
                        let at = format!("{at}, score {i} of a burst");
                        twins.post(&at, "/v1/feedback", body, None).await;
                    }
                }
                38..=45 => {
                    let id = pick(&mut rng, &TEMPLATES);
                    let rating = pick(&mut rng, &["good", "good", "bad", "meh"]);
                    let path = format!("/v1/templates/{id}/feedback");
                    let body = json!({ "rating": rating });
                    twins.post(&at, &path, body, None).await;
                }
                46..=47 => {
                    let kind = pick(
                        &mut rng,
                        &["workflow.progress", "agent.log", "feedback.recorded"],
                    );
                    let mut body = json!({ "type": kind, "data": { "n": step } });
                    if rng.random_bool(0.5) {
                        body["agent_id"] = json!(pick(&mut rng, &AGENT_IDS));
                    }
                    twins.post(&at, "/v1/events", body, None).await;
                }
                48..=55 => {
                    let by = match rng.random_range(0..20) {
                        0..=7 => Duration::from_secs(60 * rng.random_range(1..=180)),
                        8..=14 => Duration::from_secs(3600 * rng.random_range(1..=30)),
                        _ => Duration::from_secs(86_400 * rng.random_range(1..=3)),
                    };
                    twins.advance(by);
                }
                56..=81 => {
                    let path = random_read(&mut rng);
                    twins.get(&at, &path).await;
                }
                82..=92 => {
                    let first = random_underperforming(&mut rng);
                    // Now and then from a cursor this endpoint never gave.
                    let start = match rng.random_bool(0.03) {
                        true => ["bm90LWEtY3Vyc29y".to_owned(), "bm90LWEtY3Vyc29y".to_owned()],
                        false => Default::default(),
                    };
                    twins.pages(&at, &first, "cursor", start).await;
                }
                _ => {
                    let first = random_templates(&mut rng);
                    twins.pages(&at, &first, "cursor", Default::default()).await;
                }
            }
        }
        let at = format!("seed {seed}, after the last step");
        twins.compare_histories(&at, &mut rng).await;
        seen.extend(twins.seen);
    }
    for outcome in OUTCOMES {
        assert!(seen.contains(outcome), "no history met this: {outcome}");
    }
}
