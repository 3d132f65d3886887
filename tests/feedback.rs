//! Quality feedback, tier recommendations and template ratings, on both engines.

mod common;

use common::{Kind, Options, TestApp, TestKeys, problem_field};
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
