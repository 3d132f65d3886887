//! Heartbeats and liveness, on both engines.

mod common;

use std::time::Duration;

use common::{Kind, Options, TestApp, TestKeys, eventually, problem_field};
use serde_json::{Value, json};

async fn beat(app: &TestApp, id: &str, body: Value) -> Value {
    let (status, view) = app.post(&format!("/v1/agents/{id}/heartbeats"), body).await;
    assert_eq!(status, 200, "{view}");
    view
}

async fn stale_ids(app: &TestApp, threshold: u64) -> Vec<String> {
    let (status, body) = app
        .get(&format!("/v1/agents/stale?threshold_seconds={threshold}"))
        .await;
    assert_eq!(status, 200, "{body}");
    ids(&body)
}

/// Runs started in the last hour, and how many of them completed (the
/// total row of `performance`).
async fn runs_and_completed(app: &TestApp) -> (u64, u64) {
    let (status, perf) = app.get("/v1/agents/performance?hours=1").await;
    assert_eq!(status, 200, "{perf}");
    let total = &perf["total"];
    let count = |name: &str| {
        total[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {perf}"))
    };
    (count("runs"), count("completed"))
}

/// The ids of every page of `query` (which sets `limit`), following
/// `next_cursor`.
async fn all_pages(app: &TestApp, query: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..20 {
        let (status, page) = app.get(&format!("{query}&cursor={cursor}")).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => return seen,
        }
    }
    panic!("{query}: more than 20 pages");
}

fn ids(list: &Value) -> Vec<String> {
    list["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn a_first_beat_creates_the_agent_with_defaults(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let view = beat(&app, "agent-1", json!({})).await;
    assert_eq!(view["agent_id"], "agent-1");
    assert_eq!(view["status"], "running");
    assert_eq!(view["ttl_seconds"], 30);
    assert_eq!(view["alive"], true);
    assert_eq!(view["state"], "up");
    let (status, got) = app.get("/v1/agents/agent-1").await;
    assert_eq!(status, 200);
    assert_eq!(got["agent_id"], "agent-1");
    let (status, _) = app.get("/v1/agents/nobody").await;
    assert_eq!(status, 404);
}

async fn stale_finds_an_agent_whose_ttl_is_shorter_than_the_threshold(kind: Kind) {
    // The original could never do this: its record expired after the 30 s
    // ttl, before a 60 s threshold was reached.
    let app = TestApp::spawn(kind).await;
    beat(&app, "slow", json!({"ttl_seconds": 30})).await;
    beat(
        &app,
        "done",
        json!({"ttl_seconds": 30, "status": "completed"}),
    )
    .await;
    app.state.clock.advance(Duration::from_secs(61));
    beat(&app, "fresh", json!({"ttl_seconds": 30})).await;
    assert_eq!(stale_ids(&app, 60).await, vec!["slow".to_owned()]);
    // Any threshold up to the longest retention (ten years) is a question.
    assert!(stale_ids(&app, 315_360_000).await.is_empty());
    let (_, view) = app.get("/v1/agents/slow").await;
    assert_eq!(view["alive"], false);
    assert_eq!(view["state"], "down");
    assert!(view["seconds_since_beat"].as_f64().unwrap() >= 61.0);
}

async fn stale_never_lists_a_completed_agent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for status in ["completed", "failed", "cancelled"] {
        beat(&app, &format!("agent-{status}"), json!({"status": status})).await;
    }
    app.state.clock.advance(Duration::from_secs(3600));
    assert!(stale_ids(&app, 60).await.is_empty());
    let (_, finished) = app.get("/v1/agents?state=finished").await;
    assert_eq!(ids(&finished).len(), 3);
}

async fn stale_lists_oldest_first_and_pages(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for i in 0..5 {
        beat(&app, &format!("a{i}"), json!({})).await;
        app.state.clock.advance(Duration::from_secs(1));
    }
    app.state.clock.advance(Duration::from_secs(120));
    let (_, first) = app
        .get("/v1/agents/stale?threshold_seconds=60&limit=2")
        .await;
    assert_eq!(ids(&first), vec!["a0", "a1"]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_owned();
    let (_, second) = app
        .get(&format!(
            "/v1/agents/stale?threshold_seconds=60&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(ids(&second), vec!["a2", "a3"]);
    let cursor = second["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_owned();
    let (_, third) = app
        .get(&format!(
            "/v1/agents/stale?threshold_seconds=60&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(ids(&third), vec!["a4"]);
    assert_eq!(third["next_cursor"], Value::Null);
}

/// A position in one index means nothing in another: a cursor is taken
/// back only by the listing that gave it out.
async fn a_cursor_is_refused_by_another_listing(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for i in 0..3 {
        beat(&app, &format!("a{i}"), json!({})).await;
    }
    let (_, first) = app.get("/v1/agents?limit=1").await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_owned();
    for listing in [
        "/v1/agents/stale?threshold_seconds=1&",
        "/v1/agents?state=up&",
        "/v1/agents?state=down&",
        "/v1/signals?",
    ] {
        let (status, body) = app.get(&format!("{listing}cursor={cursor}")).await;
        assert_eq!(status, 422, "{listing}: {body}");
        assert_eq!(problem_field(&body), "cursor", "{body}");
    }
    let (status, second) = app
        .get(&format!("/v1/agents?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second), vec!["a1"]);
}

async fn metadata_and_display_name_persist_across_beats_without_them(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(
        &app,
        "agent-1",
        json!({"metadata": {"model": "opus", "n": [1, 2]}, "display_name": "Summarizer"}),
    )
    .await;
    for i in 0..10 {
        beat(&app, "agent-1", json!({"progress": i as f64 / 10.0})).await;
    }
    let (_, view) = app.get("/v1/agents/agent-1").await;
    assert_eq!(view["metadata"], json!({"model": "opus", "n": [1, 2]}));
    assert_eq!(view["display_name"], "Summarizer");
    assert_eq!(view["progress"], 0.9);
    let view = beat(&app, "agent-1", json!({"metadata": {"model": "haiku"}})).await;
    assert_eq!(view["metadata"], json!({"model": "haiku"}));
}

async fn state_goes_up_late_down_and_alive_flips_after_the_ttl(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(&app, "short", json!({"ttl_seconds": 1})).await;
    let (_, view) = app.get("/v1/agents/short").await;
    assert_eq!(
        (view["alive"].clone(), view["state"].clone()),
        (json!(true), json!("up"))
    );
    let late = eventually(Duration::from_secs(3), || async {
        let (_, v) = app.get("/v1/agents/short").await;
        (v["state"] == "late").then_some(v)
    })
    .await;
    assert_eq!(late["alive"], false);
    let (_, alive) = app.get("/v1/agents/short/alive").await;
    assert_eq!(alive, json!({"agent_id": "short", "alive": false}));
    eventually(Duration::from_secs(3), || async {
        let (_, v) = app.get("/v1/agents/short").await;
        (v["state"] == "down").then_some(())
    })
    .await;
    // The down index is written by the sweeper, within one sweep interval.
    eventually(Duration::from_secs(1), || async {
        let (_, down) = app.get("/v1/agents?state=down").await;
        (ids(&down) == vec!["short"]).then_some(())
    })
    .await;
}

/// Waits for `agent.down` of an agent with ttl 1 s (and grace 1 s) whose
/// last beat answered at `last_beat`: down at 2 s, the event within a
/// second of that and never before (less a little for the beat's own
/// round trip).
async fn expect_down_two_to_three_seconds_after(app: &TestApp, last_beat: std::time::Instant) {
    eventually(Duration::from_secs(4), || async {
        (!app.events_of("agent.down").await.is_empty()).then_some(())
    })
    .await;
    let took = last_beat.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "down too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(3000),
        "down too late: {took:?}"
    );
}

async fn agent_down_is_emitted_once_within_a_second_and_recovery_after(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    // Two sweepers on the same Redis: the replica runs its own.
    let replica = match kind {
        Kind::Redis => Some(app.replica().await),
        Kind::Memory => None,
    };
    beat(&app, "flaky", json!({"ttl_seconds": 1})).await;
    expect_down_two_to_three_seconds_after(&app, std::time::Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let downs = app.events_of("agent.down").await;
    assert_eq!(downs.len(), 1, "{downs:?}");
    assert_eq!(downs[0]["agent_id"], "flaky");
    assert_eq!(downs[0]["source"], "system");
    beat(&app, "flaky", json!({"ttl_seconds": 30})).await;
    assert_eq!(app.events_of("agent.recovered").await.len(), 1);
    let (_, view) = app.get("/v1/agents/flaky").await;
    assert_eq!(view["state"], "up");
    drop(replica);
}

async fn runs_open_close_and_count_in_performance(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(
        &app,
        "worker",
        json!({"status": "starting", "run_id": "r1"}),
    )
    .await;
    app.state.clock.advance(Duration::from_secs(10));
    beat(&app, "worker", json!({"status": "completed"})).await;
    beat(
        &app,
        "worker",
        json!({"status": "starting", "run_id": "r2"}),
    )
    .await;
    app.state.clock.advance(Duration::from_secs(20));
    beat(&app, "worker", json!({"status": "failed"})).await;
    beat(&app, "other", json!({"status": "running"})).await;
    assert_eq!(app.events_of("agent.started").await.len(), 3);
    assert_eq!(app.events_of("agent.finished").await.len(), 2);
    let (status, perf) = app.get("/v1/agents/performance?hours=24").await;
    assert_eq!(status, 200, "{perf}");
    let worker = perf["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent_id"] == "worker")
        .unwrap()
        .clone();
    assert_eq!(worker["runs"], 2);
    assert_eq!(worker["completed"], 1);
    assert_eq!(worker["failed"], 1);
    assert_eq!(worker["success_rate"], 0.5);
    // 10 s and 20 s of clock advance, plus the few ms the requests took.
    let avg = worker["avg_duration_seconds"].as_f64().unwrap();
    assert!((15.0..15.5).contains(&avg), "{avg}");
    assert_eq!(perf["total"]["runs"], 3);
    assert_eq!(perf["total"]["running"], 1);
}

async fn a_run_that_goes_down_counts_as_lost(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(
        &app,
        "lost-one",
        json!({"status": "starting", "ttl_seconds": 1}),
    )
    .await;
    eventually(Duration::from_secs(4), || async {
        (!app.events_of("agent.down").await.is_empty()).then_some(())
    })
    .await;
    let (_, perf) = app.get("/v1/agents/performance").await;
    assert_eq!(perf["total"]["lost"], 1, "{perf}");
    assert_eq!(perf["total"]["success_rate"], 0.0);
}

async fn every_beat_emits_a_heartbeat_event(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for _ in 0..3 {
        beat(&app, "chatty", json!({"current_task": "summarize"})).await;
    }
    let beats = app.events_of("agent.heartbeat").await;
    assert_eq!(beats.len(), 3);
    assert_eq!(beats[0]["data"]["current_task"], "summarize");
    let quiet =
        TestApp::spawn_with(Options::new(kind).configure(|c| c.heartbeat_events = false)).await;
    beat(&quiet, "chatty", json!({})).await;
    assert!(quiet.events_of("agent.heartbeat").await.is_empty());
    assert_eq!(quiet.events_of("agent.started").await.len(), 1);
}

async fn bad_heartbeats_are_422s_naming_the_field(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let cases = [
        ("agent-1", json!({"progress": 1.5}), "progress"),
        ("agent-1", json!({"status": "sleeping"}), "status"),
        ("agent-1", json!({"status": 5}), "status"),
        ("agent-1", json!({"status": true}), "status"),
        ("agent-1", json!({"ttl_seconds": 0}), "ttl_seconds"),
        ("agent-1", json!({"ttl_seconds": 3601}), "ttl_seconds"),
        // A number in a string is text, as for `progress`.
        ("agent-1", json!({"ttl_seconds": "30"}), "ttl_seconds"),
        ("agent-1", json!({"metadata": [1, 2]}), "metadata"),
        // serde would read it as the fields in order: status, progress, …
        ("agent-1", json!(["completed", 0.5]), "body"),
        ("agent-1", json!({"run_id": "a b"}), "run_id"),
    ];
    for (id, body, field) in cases {
        let (status, problem) = app
            .post(&format!("/v1/agents/{id}/heartbeats"), body.clone())
            .await;
        assert_eq!(status, 422, "{body} -> {problem}");
        assert_eq!(problem_field(&problem), field, "{problem}");
    }
    let long = "a".repeat(200);
    // `stale` and `performance` would be agents no one could read or
    // delete: those paths are the listings.
    for id in ["a:b", "a*", long.as_str(), "stale", "performance"] {
        let (status, problem) = app
            .post(&format!("/v1/agents/{id}/heartbeats"), json!({}))
            .await;
        assert_eq!(status, 422, "{id} -> {problem}");
        assert_eq!(problem_field(&problem), "agent_id");
    }
    // Not UTF-8 once percent-decoded: still a problem naming the field.
    for path in ["/v1/agents/%FF", "/v1/agents/%FF/heartbeats"] {
        let (status, problem) = if path.ends_with("heartbeats") {
            app.post(path, json!({})).await
        } else {
            app.get(path).await
        };
        assert_eq!(
            (status, problem_field(&problem).as_str()),
            (422, "agent_id"),
            "{path}"
        );
    }
    let (status, _) = app.get("/v1/agents?state=sideways").await;
    assert_eq!(status, 422);
    let (status, _) = app.get("/v1/agents?cursor=garbage").await;
    assert_eq!(status, 422);
}

async fn keys_scoped_to_ci_agents_can_beat_only_as_ci_agents(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let ci = Some(keys.ci_agent.as_str());
    let (status, _) = app
        .post_as("/v1/agents/ci-7/heartbeats", json!({}), ci)
        .await;
    assert_eq!(status, 200);
    let (status, problem) = app
        .post_as("/v1/agents/prod-1/heartbeats", json!({}), ci)
        .await;
    assert_eq!(status, 403, "{problem}");
    let (status, _) = app
        .post_as(
            "/v1/agents/prod-1/heartbeats",
            json!({}),
            Some(&keys.viewer),
        )
        .await;
    assert_eq!(status, 403, "viewers cannot beat");
    let (status, _) = app.get_as("/v1/agents", Some(&keys.viewer)).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_as("/v1/agents", None).await;
    assert_eq!(status, 401);
}

async fn only_admins_delete_agents(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    app.post_as("/v1/agents/gone/heartbeats", json!({}), Some(&keys.agent))
        .await;
    let (status, _) = app.delete_as("/v1/agents/gone", Some(&keys.agent)).await;
    assert_eq!(status, 403);
    let (status, _) = app.delete_as("/v1/agents/gone", Some(&keys.admin)).await;
    assert_eq!(status, 204);
    let (status, _) = app.get_as("/v1/agents/gone", Some(&keys.admin)).await;
    assert_eq!(status, 404);
    let (status, _) = app.delete_as("/v1/agents/gone", Some(&keys.admin)).await;
    assert_eq!(status, 404);
    let (_, all) = app.get_as("/v1/agents", Some(&keys.admin)).await;
    assert!(ids(&all).is_empty());
}

/// Like every listing, `performance` comes in pages: rows by agent id, the
/// total row (all agents) on each.
async fn performance_pages_its_agents(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for i in 0..5 {
        beat(&app, &format!("p{i}"), json!({"status": "starting"})).await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/agents/performance?limit=2".to_owned();
    loop {
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"]["runs"], 5, "{page}");
        let rows = page["agents"].as_array().unwrap();
        assert!(rows.len() <= 2, "{page}");
        seen.extend(
            rows.iter()
                .map(|r| r["agent_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/agents/performance?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4"]);
    let (status, body) = app.get("/v1/agents/performance?cursor=nope").await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cursor"));
}

/// `performance?hours=1`, and a lookup of one agent's row in it.
async fn performance_rows(app: &TestApp) -> (Value, impl Fn(&str) -> Value) {
    let (status, perf) = app.get("/v1/agents/performance?hours=1").await;
    assert_eq!(status, 200, "{perf}");
    let rows = perf.clone();
    let row = move |id: &str| {
        rows["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["agent_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {id}: {rows}"))
    };
    (perf, row)
}

/// A `starting` beat sent twice for the same run (a client retrying after
/// an error, say) is one run; `starting` without a `run_id`, or with
/// another, opens a new one.
async fn a_retried_start_is_the_same_run(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for _ in 0..2 {
        beat(&app, "retry", json!({"status": "starting", "run_id": "r1"})).await;
    }
    beat(&app, "retry", json!({"status": "completed"})).await;
    for _ in 0..2 {
        beat(&app, "anew", json!({"status": "starting"})).await;
        app.state.clock.advance(Duration::from_millis(5));
    }
    beat(&app, "anew", json!({"status": "starting", "run_id": "x"})).await;
    let (perf, row) = performance_rows(&app).await;
    let counts = |id: &str| {
        let r = row(id);
        (r["runs"].clone(), r["completed"].clone(), r["lost"].clone())
    };
    assert_eq!(counts("retry"), (json!(1), json!(1), json!(0)), "{perf}");
    assert_eq!(counts("anew"), (json!(3), json!(0), json!(2)), "{perf}");
    let started = app.events_of("agent.started").await;
    let of = |id: &str| started.iter().filter(|e| e["agent_id"] == id).count();
    assert_eq!((of("retry"), of("anew")), (1, 3));
}

/// A run opened without a `run_id` — a `running` beat after the last run
/// finished, or `starting` without one — has none: it does not take the
/// id of the run before it, in the view, the run record or `agent.started`.
async fn a_run_opened_without_a_run_id_has_none(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let run_id = |view: &Value| view["run_id"].clone();
    beat(&app, "w", json!({"status": "starting", "run_id": "r1"})).await;
    // Beats of the open run keep its id.
    assert_eq!(run_id(&beat(&app, "w", json!({})).await), "r1");
    assert_eq!(
        run_id(&beat(&app, "w", json!({"status": "completed"})).await),
        "r1"
    );
    app.state.clock.advance(Duration::from_millis(5));
    // A new run, opened implicitly; its beats (quick ones on Redis too)
    // keep it nameless.
    for _ in 0..3 {
        assert_eq!(run_id(&beat(&app, "w", json!({})).await), Value::Null);
    }
    let (_, view) = app.get("/v1/agents/w").await;
    assert_eq!(run_id(&view), Value::Null, "{view}");
    app.state.clock.advance(Duration::from_millis(5));
    beat(&app, "w", json!({"status": "starting", "run_id": "r2"})).await;
    app.state.clock.advance(Duration::from_millis(5));
    assert_eq!(
        run_id(&beat(&app, "w", json!({"status": "starting"})).await),
        Value::Null
    );
    let started: Vec<Value> = app
        .events_of("agent.started")
        .await
        .iter()
        .map(|e| e["data"]["run_id"].clone())
        .collect();
    assert_eq!(
        started,
        [json!("r1"), Value::Null, json!("r2"), Value::Null]
    );
    let (perf, row) = performance_rows(&app).await;
    assert_eq!(row("w")["runs"], 4, "{perf}");
}

async fn deleting_an_agent_ends_its_open_run_as_lost(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(&app, "gone", json!({"status": "starting", "run_id": "r1"})).await;
    beat(&app, "done", json!({"status": "starting"})).await;
    beat(&app, "done", json!({"status": "completed"})).await;
    for id in ["gone", "done"] {
        let (status, _) = app.delete(&format!("/v1/agents/{id}")).await;
        assert_eq!(status, 204);
    }
    let (perf, row) = performance_rows(&app).await;
    assert_eq!(
        (row("gone")["runs"].clone(), row("gone")["lost"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(row("done")["completed"], 1, "{perf}");
    assert_eq!(row("done")["lost"], 0, "{perf}");
    assert_eq!(perf["total"]["running"], 0, "{perf}");
}

async fn listing_filters_by_state_and_status(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    // A millisecond apart at least, so that "most recent first" is not
    // decided by the ids of beats that landed in the same millisecond.
    for (id, status) in [("r1", "running"), ("s1", "starting"), ("c1", "completed")] {
        beat(&app, id, json!({ "status": status })).await;
        app.state.clock.advance(Duration::from_millis(5));
    }
    let (_, up) = app.get("/v1/agents?state=up").await;
    let mut up = ids(&up);
    up.sort();
    assert_eq!(up, vec!["r1", "s1"]);
    let (_, starting) = app.get("/v1/agents?status=starting").await;
    assert_eq!(ids(&starting), vec!["s1"]);
    let (_, all) = app.get("/v1/agents").await;
    assert_eq!(ids(&all), vec!["r1", "s1", "c1"], "least recent first");
}

async fn paging_with_a_status_filter_returns_every_match_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut expected = Vec::new();
    for i in 0..12 {
        // Newest first this reads running, starting, starting, starting, …:
        // pages of two hold one match, then two.
        let status = if i % 4 == 3 { "running" } else { "starting" };
        let id = format!("p{i:02}");
        beat(&app, &id, json!({"status": status})).await;
        if status == "starting" {
            expected.push(id);
        }
    }
    let mut seen = all_pages(&app, "/v1/agents?status=starting&limit=2").await;
    seen.sort();
    assert_eq!(seen, expected);
}

/// The unfiltered listing pages through finished and active agents
/// together, most recent beat first, each once.
async fn listing_everything_pages_oldest_first_across_states(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut expected = Vec::new();
    for i in 0..9 {
        let status = if i % 3 == 0 { "completed" } else { "running" };
        let id = format!("e{i}");
        beat(&app, &id, json!({"status": status})).await;
        expected.push(id);
        app.state.clock.advance(Duration::from_millis(5));
    }
    assert_eq!(all_pages(&app, "/v1/agents?limit=2").await, expected);
}

/// Agents beat while a client pages through them: each beat moves an
/// agent behind the cursor, so every agent is still listed.
async fn paging_never_misses_an_agent_that_beats_meanwhile(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let all: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    for id in &all {
        beat(&app, id, json!({})).await;
        app.state.clock.advance(Duration::from_millis(5));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut path = "/v1/agents?limit=3".to_owned();
    for page in 0.. {
        assert!(page < 20, "paging does not end");
        let (status, body) = app.get(&path).await;
        assert_eq!(status, 200, "{body}");
        seen.extend(ids(&body));
        // Every agent not listed yet beats now (and one that was).
        for id in all
            .iter()
            .filter(|id| !seen.contains(*id))
            .chain(seen.first())
        {
            beat(&app, id, json!({})).await;
            app.state.clock.advance(Duration::from_millis(5));
        }
        match body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/agents?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), {
        let mut sorted = all.clone();
        sorted.sort();
        sorted
    });
}

/// A page reads a bounded stretch of its index: a filter that matches
/// little gives short (even empty) pages with a cursor, and following the
/// cursor reaches every match once.
async fn a_page_examines_a_bounded_stretch_of_its_index(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for i in 0..30 {
        beat(&app, &format!("common-{i}"), json!({})).await;
        app.state.clock.advance(Duration::from_millis(2));
    }
    beat(&app, "rare", json!({"status": "starting"})).await;
    // Oldest first: the one match is the 31st entry.
    let (status, first) = app.get("/v1/agents?status=starting&limit=1").await;
    assert_eq!(status, 200, "{first}");
    assert!(ids(&first).is_empty(), "{first}");
    assert!(first["next_cursor"].is_string(), "{first}");
    assert_eq!(
        all_pages(&app, "/v1/agents?status=starting&limit=1").await,
        vec!["rare"]
    );
}

/// A beat as the engine takes it, at an exact time (no HTTP, no clock).
fn engine_beat(
    id: &str,
    status: attune_telemetry::agents::AgentStatus,
    now: chrono::DateTime<chrono::Utc>,
) -> attune_telemetry::agents::Beat {
    attune_telemetry::agents::Beat {
        agent_id: attune_telemetry::types::Id::new(id).unwrap(),
        status,
        progress: None,
        current_task: None,
        metadata: None,
        display_name: None,
        run_id: None,
        ttl_seconds: 30,
        grace_seconds: 30,
        now,
        retention: Duration::from_secs(86_400),
        source: "test".into(),
        heartbeat_event: None,
    }
}

/// Runs are keyed by agent and start time: two runs started in the same
/// millisecond are still two runs.
async fn runs_started_in_the_same_millisecond_are_counted_apart(kind: Kind) {
    use attune_telemetry::agents::AgentStatus::{Completed, Failed, Starting};
    let app = TestApp::spawn(kind).await;
    let now = app.state.clock.now();
    for status in [Starting, Completed, Starting, Failed, Starting] {
        app.state
            .engine
            .record_beat(engine_beat("quick", status, now))
            .await
            .unwrap();
    }
    let (status, perf) = app.get("/v1/agents/performance?hours=24").await;
    assert_eq!(status, 200, "{perf}");
    let quick = &perf["agents"][0];
    assert_eq!(quick["agent_id"], "quick", "{perf}");
    assert_eq!(quick["runs"], 3, "{perf}");
    assert_eq!(quick["completed"], 1, "{perf}");
    assert_eq!(quick["failed"], 1, "{perf}");
    assert_eq!(perf["total"]["running"], 1, "{perf}");
}

/// Beats queued together (batched into script calls on Redis) apply as if
/// each were alone, in order: an agent that finishes and starts again
/// within one batch ends up active, one that finishes last ends up finished.
async fn beats_queued_together_apply_in_order(kind: Kind) {
    use attune_telemetry::agents::AgentStatus;
    let app = TestApp::spawn(kind).await;
    let start = app.state.clock.now();
    // Each beat a millisecond after the previous one.
    let beat_of = |id: &str, status: AgentStatus, k: i64| {
        engine_beat(id, status, start + chrono::Duration::milliseconds(k))
    };
    use AgentStatus::{Completed, Running};
    let mut beats = Vec::new();
    for i in 0..20 {
        // "again-i": finishes, then runs again; "done-i": runs, then finishes.
        for (prefix, statuses) in [
            ("again", [Running, Completed, Running]),
            ("done", [Running, Running, Completed]),
        ] {
            for status in statuses {
                let k = beats.len() as i64;
                beats.push(beat_of(&format!("{prefix}-{i}"), status, k));
            }
        }
    }
    // `join_all` polls in order, so the beats are queued in this order.
    let engine = &app.state.engine;
    let results =
        futures_util::future::join_all(beats.into_iter().map(|b| engine.record_beat(b))).await;
    assert!(results.iter().all(Result::is_ok));

    let state_ids = |state: &'static str| {
        let app = &app;
        async move {
            let (status, page) = app
                .get(&format!("/v1/agents?state={state}&limit=100"))
                .await;
            assert_eq!(status, 200, "{page}");
            let mut ids = ids(&page);
            ids.sort();
            ids
        }
    };
    let mut again: Vec<String> = (0..20).map(|i| format!("again-{i}")).collect();
    let mut done: Vec<String> = (0..20).map(|i| format!("done-{i}")).collect();
    again.sort();
    done.sort();
    assert_eq!(state_ids("up").await, again);
    assert_eq!(state_ids("finished").await, done);
    let (_, all) = app.get("/v1/agents?limit=100").await;
    assert_eq!(ids(&all).len(), 40);
    assert_eq!(runs_and_completed(&app).await, (60, 40));
}

/// The agents per state that `/metrics` reports.
async fn agent_counts(app: &TestApp) -> Vec<(String, u64)> {
    let text = app.metrics_text().await;
    ["up", "late", "down", "finished"]
        .into_iter()
        .map(|state| {
            let prefix = format!("attune_agents{{state=\"{state}\"}} ");
            let n = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count for {state}: {text}"));
            (state.to_owned(), n)
        })
        .collect()
}

async fn metrics_count_agents_per_state(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    beat(&app, "steady", json!({"ttl_seconds": 3600})).await;
    beat(&app, "slow", json!({"ttl_seconds": 10})).await;
    beat(&app, "gone", json!({"ttl_seconds": 5})).await;
    beat(&app, "done", json!({"status": "completed"})).await;
    beat(&app, "failed", json!({"status": "failed"})).await;
    let expect = |up, late, down, finished| {
        vec![
            ("up".to_owned(), up),
            ("late".to_owned(), late),
            ("down".to_owned(), down),
            ("finished".to_owned(), finished),
        ]
    };
    assert_eq!(agent_counts(&app).await, expect(3, 0, 0, 2));
    // 15 s on (grace defaults to the ttl): `slow` is past its ttl but not
    // its grace, `gone` past both; the sweeper marks it down at once.
    app.state.clock.advance(Duration::from_secs(15));
    let mut counts = Vec::new();
    for _ in 0..100 {
        counts = agent_counts(&app).await;
        if counts == expect(1, 1, 1, 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts, expect(1, 1, 1, 2));
    // A beat brings `gone` back up; deleting `done` leaves one finished.
    beat(&app, "gone", json!({"ttl_seconds": 5})).await;
    let (status, _) = app.delete("/v1/agents/done").await;
    assert_eq!(status, 204);
    assert_eq!(agent_counts(&app).await, expect(2, 1, 0, 1));
}

/// Before the sweeper marks an agent past its ttl and grace, the memory
/// engine counts it `down` (it sees every record) and Redis `late` (its
/// counts are index sizes).
async fn counts_before_the_sweeper_marks_an_agent(kind: Kind) -> Vec<(String, u64)> {
    let app = TestApp::spawn_with(
        Options::new(kind).configure(|c| c.sweep_interval = Duration::from_secs(3600)),
    )
    .await;
    // The sweepers' first sweep, at start, is behind us: the next is an hour off.
    tokio::time::sleep(Duration::from_millis(100)).await;
    beat(&app, "gone", json!({"ttl_seconds": 5})).await;
    beat(&app, "slow", json!({"ttl_seconds": 10})).await;
    app.state.clock.advance(Duration::from_secs(15));
    let counts = agent_counts(&app).await;
    let (_, view) = app.get("/v1/agents/gone").await;
    assert_eq!(view["state"], "down");
    counts
}

#[tokio::test]
async fn memory_counts_an_agent_past_its_grace_as_down_before_the_sweeper_marks_it() {
    let counts = counts_before_the_sweeper_marks_an_agent(Kind::Memory).await;
    assert_eq!(counts[1..3], [("late".into(), 1), ("down".into(), 1)]);
}

#[tokio::test]
async fn redis_counts_an_agent_past_its_grace_as_late_until_the_sweeper_marks_it() {
    let counts = counts_before_the_sweeper_marks_an_agent(Kind::Redis).await;
    assert_eq!(counts[1..3], [("late".into(), 2), ("down".into(), 0)]);
}

conformance!(
    metrics_count_agents_per_state,
    performance_pages_its_agents,
    a_cursor_is_refused_by_another_listing,
    listing_everything_pages_oldest_first_across_states,
    paging_never_misses_an_agent_that_beats_meanwhile,
    a_page_examines_a_bounded_stretch_of_its_index,
    beats_queued_together_apply_in_order,
    runs_started_in_the_same_millisecond_are_counted_apart,
    paging_with_a_status_filter_returns_every_match_once,
    a_first_beat_creates_the_agent_with_defaults,
    stale_finds_an_agent_whose_ttl_is_shorter_than_the_threshold,
    stale_never_lists_a_completed_agent,
    stale_lists_oldest_first_and_pages,
    metadata_and_display_name_persist_across_beats_without_them,
    state_goes_up_late_down_and_alive_flips_after_the_ttl,
    agent_down_is_emitted_once_within_a_second_and_recovery_after,
    runs_open_close_and_count_in_performance,
    a_run_that_goes_down_counts_as_lost,
    every_beat_emits_a_heartbeat_event,
    bad_heartbeats_are_422s_naming_the_field,
    keys_scoped_to_ci_agents_can_beat_only_as_ci_agents,
    only_admins_delete_agents,
    deleting_an_agent_ends_its_open_run_as_lost,
    a_retried_start_is_the_same_run,
    a_run_opened_without_a_run_id_has_none,
    listing_filters_by_state_and_status,
);

/// Milliseconds until the agent's record expires in Redis.
fn record_pttl(app: &TestApp, id: &str) -> i64 {
    let mut conn = app.redis.as_ref().expect("redis").conn();
    ::redis::cmd("PTTL")
        .arg(format!("{{{}}}:agent:{id}", app.prefix))
        .query(&mut conn)
        .expect("PTTL")
}

#[tokio::test]
async fn redis_the_record_expires_after_the_retention_period_renewed_by_beats() {
    // Retention 200 s: the expiry is set 1 % (2 s) beyond it and renewed
    // once a beat finds it closer than 200 s.
    let app = TestApp::spawn_with(
        Options::new(Kind::Redis).configure(|c| c.agent_retention = Duration::from_secs(200)),
    )
    .await;
    beat(&app, "keeper", json!({})).await;
    let first = record_pttl(&app, "keeper");
    assert!((198_000..=202_000).contains(&first), "PTTL {first}");

    // Time passing is simulated on both clocks: the key's remaining
    // lifetime in Redis, and the service's clock.
    let shorten = |app: &TestApp| {
        let mut conn = app.redis.as_ref().expect("redis").conn();
        let _: () = ::redis::cmd("PEXPIRE")
            .arg(format!("{{{}}}:agent:{}", app.prefix, "keeper"))
            .arg(150_000)
            .query(&mut conn)
            .expect("PEXPIRE");
    };
    // 1 s later, within the slack: the expiry is left alone.
    shorten(&app);
    app.state.clock.advance(Duration::from_secs(1));
    beat(&app, "keeper", json!({"progress": 0.5})).await;
    let kept = record_pttl(&app, "keeper");
    assert!(kept <= 150_000, "PTTL {kept}");

    // 50 s later the next beat pushes it out to the full period again.
    app.state.clock.advance(Duration::from_secs(49));
    beat(&app, "keeper", json!({"progress": 0.6})).await;
    let renewed = record_pttl(&app, "keeper");
    assert!((198_000..=202_000).contains(&renewed), "PTTL {renewed}");
    let (_, view) = app.get("/v1/agents/keeper").await;
    assert_eq!(view["progress"], 0.6);
}

/// Calls of `command` the test's Redis has run, those inside scripts included.
fn redis_calls(app: &TestApp, command: &str) -> u64 {
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let stats: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a count"))
}

/// Clients that send their metadata and name with every beat change
/// nothing stored by doing so: such beats take the quick path (no `HMGET`
/// of the record), and new values are still written.
#[tokio::test]
async fn redis_beats_resending_unchanged_metadata_take_the_quick_path() {
    let app = TestApp::spawn(Kind::Redis).await;
    let body = json!({"metadata": {"model": "m", "n": 3}, "display_name": "Summarizer"});
    beat(&app, "resender", body.clone()).await;
    let full_beats = redis_calls(&app, "hmget");
    assert!(full_beats >= 1);
    for _ in 0..5 {
        let view = beat(&app, "resender", body.clone()).await;
        assert_eq!(view["metadata"], body["metadata"]);
        assert_eq!(view["display_name"], "Summarizer");
    }
    assert_eq!(redis_calls(&app, "hmget"), full_beats);

    let view = beat(&app, "resender", json!({"metadata": {"model": "m2"}})).await;
    assert_eq!(view["metadata"], json!({"model": "m2"}));
    assert_eq!(redis_calls(&app, "hmget"), full_beats + 1);
    let (_, stored) = app.get("/v1/agents/resender").await;
    assert_eq!(stored["metadata"], json!({"model": "m2"}));
    assert_eq!(stored["display_name"], "Summarizer");
}

/// A writer remembers an agent's stored fields to answer its quick beats,
/// but not past 1 KiB of them: an agent with large metadata beats in the
/// full form (an `HMGET` of its record each time), so that what writers
/// keep stays bounded; its answers are the same.
#[tokio::test]
async fn redis_agents_with_large_metadata_beat_in_the_full_form() {
    let app = TestApp::spawn(Kind::Redis).await;
    let small = json!({"model": "m"});
    beat(&app, "small", json!({ "metadata": small })).await;
    let before = redis_calls(&app, "hmget");
    for _ in 0..3 {
        assert_eq!(beat(&app, "small", json!({})).await["metadata"], small);
    }
    assert_eq!(redis_calls(&app, "hmget"), before, "quick beats");

    let large = json!({"notes": "x".repeat(2000)});
    beat(&app, "large", json!({ "metadata": large })).await;
    let before = redis_calls(&app, "hmget");
    for _ in 0..3 {
        assert_eq!(beat(&app, "large", json!({})).await["metadata"], large);
    }
    assert_eq!(redis_calls(&app, "hmget"), before + 3, "full beats");
}

/// A replica answers a typical beat from what it learned of the agent's
/// last beat; whatever another replica, the sweeper or a delete changed in
/// between must show in its answer and in the agent's state.
#[tokio::test]
async fn redis_a_replica_sees_what_others_changed_between_its_beats() {
    let app = TestApp::spawn(Kind::Redis).await;
    let other = app.replica().await;
    let beat_on = |app, body| beat(app, "shared", body);
    beat_on(&app, json!({"metadata": {"v": 1}})).await;
    beat_on(&app, json!({})).await;

    // New metadata and name from the other replica.
    beat_on(&other, json!({"metadata": {"v": 2}, "display_name": "two"})).await;
    let view = beat_on(&app, json!({})).await;
    assert_eq!(view["metadata"], json!({"v": 2}));
    assert_eq!(view["display_name"], "two");

    // A longer ttl from the other replica, then the default one here.
    beat_on(&other, json!({"ttl_seconds": 60})).await;
    beat_on(&app, json!({})).await;
    let (_, view) = app.get("/v1/agents/shared").await;
    assert_eq!(view["ttl_seconds"], 30, "{view}");

    // The other replica finishes the run: the next beat here opens a new one.
    beat_on(&other, json!({"status": "completed"})).await;
    let view = beat_on(&app, json!({})).await;
    assert_eq!(view["state"], "up");
    assert_eq!(app.events_of("agent.started").await.len(), 2);
    let (_, finished) = app.get("/v1/agents?state=finished").await;
    assert!(ids(&finished).is_empty(), "{finished}");

    // The sweeper marks it down: the next beat here recovers it.
    beat_on(&app, json!({"ttl_seconds": 1})).await;
    eventually(Duration::from_secs(4), || async {
        (!app.events_of("agent.down").await.is_empty()).then_some(())
    })
    .await;
    let view = beat_on(&app, json!({})).await;
    assert_eq!(view["state"], "up");
    assert_eq!(app.events_of("agent.recovered").await.len(), 1);

    // Deleted elsewhere: the next beat here creates it anew, without the
    // old metadata.
    let (status, _) = other.delete("/v1/agents/shared").await;
    assert_eq!(status, 204);
    let view = beat_on(&app, json!({})).await;
    assert_eq!(view["metadata"], json!({}));
    assert_eq!(view["display_name"], Value::Null);
    assert_eq!(app.events_of("agent.started").await.len(), 3);
}

/// Beats queued behind one that finds the record changed by another
/// replica wait for it and still apply in order.
#[tokio::test]
async fn redis_beats_behind_a_changed_record_still_apply_in_order() {
    use attune_telemetry::agents::AgentStatus::{Completed, Running};
    let app = TestApp::spawn(Kind::Redis).await;
    let other = app.replica().await;
    let start = app.state.clock.now();
    let at =
        |status, k: i64| engine_beat("worker", status, start + chrono::Duration::milliseconds(k));
    let engine = &app.state.engine;
    engine.record_beat(at(Running, 0)).await.unwrap();
    engine.record_beat(at(Running, 1)).await.unwrap();
    // Finished by the other replica: the first run is closed.
    other
        .state
        .engine
        .record_beat(at(Completed, 2))
        .await
        .unwrap();
    // Queued together here: runs again (a second run), finishes it, and
    // runs again (a third).
    let queued = [(Running, 3), (Running, 4), (Completed, 5), (Running, 6)];
    let results =
        futures_util::future::join_all(queued.map(|(status, k)| engine.record_beat(at(status, k))))
            .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let (_, view) = app.get("/v1/agents/worker").await;
    assert_eq!(view["state"], "up", "{view}");
    assert_eq!(runs_and_completed(&app).await, (3, 2));
    assert_eq!(app.events_of("agent.started").await.len(), 3);
    assert_eq!(app.events_of("agent.finished").await.len(), 2);
}

/// Beats queued behind calls Redis does not answer fail within two calls'
/// bounds of their arrival (the calls ahead of them, then their own), not
/// one bound per batch ahead: those that already waited a bound fail
/// unsent. Here 300 beats (three batches) queue behind a call in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_beats_queued_behind_a_hung_redis_fail_within_two_bounds() {
    use attune_telemetry::agents::AgentStatus::Running;
    use attune_telemetry::engine::EngineError;
    let bound = Duration::from_secs(1);
    let app = TestApp::spawn_with(Options::new(Kind::Redis).configure(move |c| {
        c.redis_timeout = bound;
        c.request_timeout = Duration::from_secs(60);
    }))
    .await;
    let engine = &app.state.engine;
    let now = || app.state.clock.now();
    engine
        .record_beat(engine_beat("a", Running, now()))
        .await
        .unwrap();
    app.redis.as_ref().expect("redis").pause(4000);
    let timed = |at| async move {
        let started = std::time::Instant::now();
        let result = engine.record_beat(engine_beat("a", Running, at)).await;
        (result.map(|_| ()), started.elapsed())
    };
    let in_flight = timed(now());
    let queued = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        futures_util::future::join_all((0..300).map(|_| timed(now()))).await
    };
    let (first, rest) = tokio::join!(in_flight, queued);
    for (result, took) in std::iter::once(first).chain(rest) {
        assert!(
            matches!(result, Err(EngineError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            took < bound * 2 + Duration::from_millis(500),
            "answered after {took:?}"
        );
    }
    // Redis answers again once the pause ends.
    eventually(Duration::from_secs(10), || async {
        engine
            .record_beat(engine_beat("a", Running, now()))
            .await
            .ok()
    })
    .await;
}

/// Another program's key where an agent's record belongs (a string, not a
/// hash) fails that agent's beats alone: the beats queued with it, in the
/// same script call on Redis, apply and answer as usual. Both forms of the
/// script are covered: "squatter" was never seen by its writer, "shifty"
/// beat before, so its writer holds a token for it. Deleting the agent
/// clears such a key.
#[tokio::test]
async fn redis_a_key_of_another_type_fails_only_its_own_beats() {
    use attune_telemetry::agents::AgentStatus::Running;
    let app = TestApp::spawn(Kind::Redis).await;
    beat(&app, "shifty", json!({})).await;
    beat(&app, "shifty", json!({})).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    for id in ["squatter", "shifty"] {
        let _: () = ::redis::pipe()
            .cmd("DEL")
            .arg(format!("{{{}}}:agent:{id}", app.prefix))
            .cmd("SET")
            .arg(format!("{{{}}}:agent:{id}", app.prefix))
            .arg("not a hash")
            .query(&mut conn)
            .expect("SET");
    }
    let heartbeats_before = app.events_of("agent.heartbeat").await.len();

    let start = app.state.clock.now();
    let mut agents = Vec::new();
    for i in 0..30 {
        agents.push(format!("good-{i}"));
        if i % 10 == 0 {
            agents.push("squatter".to_owned());
            agents.push("shifty".to_owned());
        }
    }
    let beats = agents.iter().enumerate().map(|(k, id)| {
        let now = start + chrono::Duration::milliseconds(k as i64);
        let mut beat = engine_beat(id, Running, now);
        beat.heartbeat_event = Some(attune_telemetry::events::EventBody::new(
            "agent.heartbeat",
            "test",
            Some(&beat.agent_id),
            now,
            json!({}),
        ));
        beat
    });
    // `join_all` polls in order and the test runtime has one thread, so
    // every beat is queued before the writers take their first batch.
    let engine = &app.state.engine;
    let results = futures_util::future::join_all(beats.map(|b| engine.record_beat(b))).await;
    for (id, result) in agents.iter().zip(&results) {
        if id.starts_with("good-") {
            assert!(result.is_ok(), "{id}: {result:?}");
        } else {
            let err = result.as_ref().expect_err(id).to_string();
            assert!(err.contains(id.as_str()), "{id}: {err}");
        }
    }
    let (status, page) = app.get("/v1/agents?state=up&limit=100").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        ids(&page)
            .iter()
            .filter(|id| id.starts_with("good-"))
            .count(),
        30
    );
    assert_eq!(
        app.events_of("agent.heartbeat").await.len() - heartbeats_before,
        30,
        "one heartbeat event per good beat, none for the failed ones"
    );
    let (status, problem) = app.post("/v1/agents/squatter/heartbeats", json!({})).await;
    assert_eq!(status, 500, "{problem}");

    // Deleting the agent clears the key; its next beat starts afresh.
    let (status, body) = app.delete("/v1/agents/squatter").await;
    assert_eq!(status, 204, "{body}");
    let view = beat(&app, "squatter", json!({})).await;
    assert_eq!(view["state"], "up", "{view}");
}

/// The sweeper passes over a key of another type in a record's place:
/// the agents due with it still go down, in the same claim.
#[tokio::test]
async fn redis_the_sweeper_passes_over_a_key_of_another_type() {
    let app = TestApp::spawn_with(
        Options::new(Kind::Redis).configure(|c| c.sweep_interval = Duration::from_secs(3600)),
    )
    .await;
    // The sweepers' first sweep, at start, is behind us: the next is an hour off.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The squatter beats first, so its claim comes first.
    beat(&app, "squatter", json!({"ttl_seconds": 1})).await;
    app.state.clock.advance(Duration::from_millis(10));
    beat(&app, "victim", json!({"ttl_seconds": 1})).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let record = format!("{{{}}}:agent:squatter", app.prefix);
    let _: () = ::redis::pipe()
        .cmd("DEL")
        .arg(&record)
        .cmd("SET")
        .arg(&record)
        .arg("not a hash")
        .query(&mut conn)
        .expect("SET");

    app.state.clock.advance(Duration::from_secs(5));
    let now_ms = app.state.clock.now_ms();
    let claimed = app.state.engine.sweep_down_agents(now_ms, 500).await;
    assert_eq!(claimed.expect("the claim goes through"), 2);
    let downs = app.events_of("agent.down").await;
    let downs: Vec<_> = downs.iter().map(|e| e["agent_id"].clone()).collect();
    assert_eq!(downs, vec![json!("victim")]);
    let (_, page) = app.get("/v1/agents?state=down").await;
    assert_eq!(ids(&page), vec!["victim"]);
    // Nothing is left due: the next claim finds nothing.
    let again = app.state.engine.sweep_down_agents(now_ms, 500).await;
    assert_eq!(again.expect("claim"), 0);
    let value: String = ::redis::cmd("GET")
        .arg(&record)
        .query(&mut conn)
        .expect("GET");
    assert_eq!(value, "not a hash", "the other program's key is left alone");
}

/// Only a key of another type fails a beat alone: an error every beat
/// would meet (a Redis user not allowed a command the script runs) fails
/// the call, named as what it is.
#[tokio::test]
async fn redis_a_refused_command_fails_the_beat_as_itself() {
    use attune_telemetry::agents::AgentStatus::Running;
    let app = TestApp::spawn(Kind::Redis).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let _: () = ::redis::cmd("ACL")
        .arg(
            &[
                "SETUSER", "limited", "on", ">secret", "~*", "&*", "+@all", "-hmget",
            ][..],
        )
        .query(&mut conn)
        .expect("ACL SETUSER");
    let url = app
        .redis_url()
        .unwrap()
        .replacen("redis://", "redis://limited:secret@", 1);
    let limited =
        TestApp::spawn_with(Options::new(Kind::Redis).shared_redis(&url, &app.prefix)).await;
    let now = limited.state.clock.now();
    let err = limited
        .state
        .engine
        .record_beat(engine_beat("newcomer", Running, now))
        .await
        .expect_err("HMGET is refused")
        .to_string();
    assert!(!err.contains("not a hash"), "{err}");
    assert!(
        err.to_lowercase().contains("hmget")
            || err.contains("permission")
            || err.contains("can't run"),
        "{err}"
    );
}

/// Writers that know nothing of the token (earlier versions of the
/// service during a rolling upgrade) still rewrite `down` whenever they
/// change an agent's state, which is enough to send the next beat here
/// through the full path.
#[tokio::test]
async fn redis_a_beat_after_a_state_change_by_an_older_writer_takes_the_full_path() {
    let app = TestApp::spawn(Kind::Redis).await;
    beat(&app, "legacy", json!({})).await;
    beat(&app, "legacy", json!({})).await;
    // What an earlier version's script does when the agent completes.
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let record = format!("{{{}}}:agent:legacy", app.prefix);
    let _: () = ::redis::pipe()
        .cmd("HSET")
        .arg(&record)
        .arg(&["status", "completed", "down", "0"][..])
        .cmd("HDEL")
        .arg(&record)
        .arg("run_key")
        .query(&mut conn)
        .expect("HSET");
    let view = beat(&app, "legacy", json!({})).await;
    assert_eq!(view["state"], "up");
    // Running again after completing opens a new run.
    assert_eq!(app.events_of("agent.started").await.len(), 2);
}

/// An agent's score in the down-due index on Redis (ms).
fn down_due_score(app: &TestApp, id: &str) -> i64 {
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let score: f64 = ::redis::cmd("ZSCORE")
        .arg(format!("{{{}}}:agents:down-due", app.prefix))
        .arg(id)
        .query(&mut conn)
        .expect("ZSCORE");
    score as i64
}

/// Quick beats write the down-due score only now and then, a little beyond
/// the deadline; whatever the order of beats from this writer and another
/// replica, the score is never behind the last beat's deadline (an agent
/// claimed early) nor more than a quarter second past it.
#[tokio::test]
async fn redis_the_down_due_score_is_never_behind_the_deadline() {
    use attune_telemetry::agents::AgentStatus::Running;
    let app = TestApp::spawn(Kind::Redis).await;
    let other = app.replica().await;
    let start = app.state.clock.now();
    let at = |k: i64| engine_beat("steady", Running, start + chrono::Duration::milliseconds(k));
    // ttl + grace of `engine_beat`.
    let deadline_after = 60_000;
    let start_ms = start.timestamp_millis();
    // Here, here (quick), here, there (a typical beat keeping the token),
    // here (quick again), and so on, ms after the start.
    let beats = [
        (&app, 0),
        (&app, 1),
        (&app, 100),
        (&app, 300),
        (&other, 350),
        (&app, 400),
        (&app, 560),
        (&other, 900),
        (&app, 1000),
    ];
    for (on, k) in beats {
        on.state.engine.record_beat(at(k)).await.unwrap();
        let behind = down_due_score(&app, "steady") - (start_ms + k + deadline_after);
        assert!(
            (0..=250).contains(&behind),
            "after the beat at {k} ms the score is {behind} ms past the deadline"
        );
    }
}

/// An agent beating less often than every quarter second gains nothing
/// from a down-due score put ahead of its deadline (every beat moves the
/// deadline past it): its score is the deadline itself, so it goes down
/// within a sweep interval of it.
#[tokio::test]
async fn redis_an_agent_beating_seldom_is_due_down_at_its_deadline() {
    use attune_telemetry::agents::AgentStatus::Running;
    let app = TestApp::spawn(Kind::Redis).await;
    let start = app.state.clock.now();
    let start_ms = start.timestamp_millis();
    let mut full_beats = 0;
    for k in [0, 300, 1300, 3300] {
        let at = start + chrono::Duration::milliseconds(k);
        app.state
            .engine
            .record_beat(engine_beat("seldom", Running, at))
            .await
            .unwrap();
        if k == 0 {
            full_beats = redis_calls(&app, "hmget");
        }
        // ttl + grace of `engine_beat`.
        let deadline = start_ms + k + 60_000;
        assert_eq!(
            down_due_score(&app, "seldom"),
            deadline,
            "after the beat at {k} ms"
        );
    }
    assert_eq!(
        redis_calls(&app, "hmget"),
        full_beats,
        "the later beats went in the quick form"
    );
}

/// Two replicas holding the same token, one whose clock is behind: its
/// quick beat must not pull the down-due score back behind what the other
/// put ahead and counts on, or the sweepers claim a live agent early.
#[tokio::test]
async fn redis_a_replica_behind_in_time_never_pulls_the_down_due_score_back() {
    use attune_telemetry::agents::AgentStatus::Running;
    let app = TestApp::spawn(Kind::Redis).await;
    let ahead = app.replica().await;
    let start = app.state.clock.now();
    let at = |k: i64| engine_beat("skewed", Running, start + chrono::Duration::milliseconds(k));
    // Here (the first beat), there two seconds ahead (a typical beat that
    // keeps the token, then a quick one that puts the score ahead), here
    // again by its own clock (quick), and there again, within the quarter
    // second its score still covers (quick, leaving the score alone).
    for (on, k) in [
        (&app, 0),
        (&ahead, 2000),
        (&ahead, 2001),
        (&app, 10),
        (&ahead, 2100),
    ] {
        on.state.engine.record_beat(at(k)).await.unwrap();
    }
    let score = down_due_score(&app, "skewed");
    // ttl + grace of `engine_beat` after the last beat applied.
    let deadline = start.timestamp_millis() + 2100 + 60_000;
    assert!(
        score >= deadline,
        "the score is {} ms behind the last beat's deadline",
        deadline - score
    );
}

/// An agent that beat for a while goes down within a second of its last
/// beat's deadline, not its first.
#[tokio::test]
async fn redis_an_agent_goes_down_after_its_last_beat_not_its_first() {
    let app = TestApp::spawn(Kind::Redis).await;
    let started = std::time::Instant::now();
    let mut last = started;
    while started.elapsed() < Duration::from_millis(1500) {
        beat(&app, "busy", json!({"ttl_seconds": 1})).await;
        last = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expect_down_two_to_three_seconds_after(&app, last).await;
}

/// Quick beats do not write the status: a writer only takes that path for
/// a record it saw stored as `running`.
#[tokio::test]
async fn redis_a_running_beat_after_starting_is_stored_as_running() {
    let app = TestApp::spawn(Kind::Redis).await;
    beat(&app, "booting", json!({"status": "starting"})).await;
    beat(&app, "booting", json!({})).await;
    let (_, view) = app.get("/v1/agents/booting").await;
    assert_eq!(view["status"], "running", "{view}");
    let (_, starting) = app.get("/v1/agents?status=starting").await;
    assert!(ids(&starting).is_empty(), "{starting}");
}

/// A record the service cannot decode (written by hand, or by another
/// version of the service) costs only itself: beats of that agent still
/// apply, listings and the performance report pass over it and count it,
/// and reading that one agent is an error.
#[tokio::test]
async fn redis_an_unreadable_record_does_not_fail_beats_listings_or_reports() {
    let app = TestApp::spawn(Kind::Redis).await;
    for id in ["good", "broken", "binary", "mangled", "squatter"] {
        beat(&app, id, json!({"status": "starting"})).await;
    }
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let record = |id: &str| format!("{{{}}}:agent:{id}", app.prefix);
    let run_key = |conn: &mut ::redis::Connection, id: &str| -> String {
        ::redis::cmd("HGET")
            .arg(record(id))
            .arg("run_key")
            .query(conn)
            .expect("HGET")
    };
    let runs = format!("{{{}}}:runs", app.prefix);
    let (broken_run, binary_run) = (run_key(&mut conn, "broken"), run_key(&mut conn, "binary"));
    let _: () = ::redis::pipe()
        // Runs that are not JSON, or not even UTF-8.
        .cmd("HSET")
        .arg(&runs)
        .arg(&broken_run)
        .arg("{not json")
        .cmd("HSET")
        .arg(&runs)
        .arg(&binary_run)
        .arg(&b"\xff\xfe{"[..])
        // A record with a status no version wrote.
        .cmd("HSET")
        .arg(record("mangled"))
        .arg("status")
        .arg("dozing")
        // Another program's key where a listed agent's record belongs.
        .cmd("DEL")
        .arg(record("squatter"))
        .cmd("SET")
        .arg(record("squatter"))
        .arg("not a hash")
        .query(&mut conn)
        .expect("HSET");

    // Closing a run rewrites its record: the beats apply all the same.
    for id in ["broken", "binary"] {
        let view = beat(&app, id, json!({"status": "completed"})).await;
        assert_eq!(view["state"], "finished");
    }
    beat(&app, "good", json!({"status": "completed"})).await;

    let (status, list) = app.get("/v1/agents?limit=10").await;
    assert_eq!(status, 200, "{list}");
    let mut listed = ids(&list);
    listed.sort();
    assert_eq!(listed, ["binary", "broken", "good"]);

    let (perf, row) = performance_rows(&app).await;
    assert_eq!(row("good")["completed"], 1);
    assert_eq!(
        perf["total"]["runs"], 3,
        "good's, mangled's and squatter's runs: {perf}"
    );

    let (status, problem) = app.get("/v1/agents/mangled").await;
    assert_eq!(status, 500, "{problem}");
    let metrics = app.metrics_text().await;
    for kind in ["agent", "run"] {
        assert!(
            metrics.contains(&format!(
                "attune_records_unreadable_total{{kind=\"{kind}\"}}"
            )),
            "{kind}: {metrics}"
        );
    }
}

/// The simplest beat is `curl -X POST …/heartbeats`: no body, or a JSON
/// `null`, is a beat with every field left out.
#[tokio::test]
async fn a_beat_needs_no_body() {
    let app = TestApp::spawn(Kind::Memory).await;
    let url = app.url("/v1/agents/bare/heartbeats");
    let none = app.client.post(&url).send().await.expect("no body");
    assert_eq!(none.status(), 200);
    let empty = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("an empty JSON body");
    assert_eq!(empty.status(), 200);
    let null = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .expect("null body");
    assert_eq!(null.status(), 200);
    let view: Value = null.json().await.expect("a view");
    assert_eq!(view["status"], "running");
    assert_eq!(view["ttl_seconds"], 30);
}

/// A key of another type where an agent's record belongs (another program
/// sharing the key prefix) is a 500 to look into, not a 503 that tells
/// clients to retry.
#[tokio::test]
async fn redis_a_key_of_another_type_is_an_error_not_an_outage() {
    let app = TestApp::spawn(Kind::Redis).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let _: () = ::redis::cmd("SET")
        .arg(format!("{{{}}}:agent:squatter", app.prefix))
        .arg("not a hash")
        .query(&mut conn)
        .expect("SET");
    let (status, problem) = app.get("/v1/agents/squatter").await;
    assert_eq!(status, 500, "{problem}");
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200, "the engine itself answers");
}

/// The agents a random history beats as.
const AGENTS: [&str; 4] = ["a1", "a2", "a3", "a4"];

/// A random beat for a random agent at `now`: mostly `running`, sometimes
/// a start, a finish, new metadata, a display name, a run id or a ttl.
fn random_beat(
    rng: &mut rand::rngs::StdRng,
    n: u64,
    now: chrono::DateTime<chrono::Utc>,
) -> attune_telemetry::agents::Beat {
    use attune_telemetry::agents::AgentStatus::*;
    use attune_telemetry::events::EventBody;
    use attune_telemetry::types::{Id, JsonObject};
    use rand::RngExt;
    let agent_id = Id::new(AGENTS[rng.random_range(0..AGENTS.len())]).unwrap();
    let status = match rng.random_range(0..20) {
        0..=14 => Running,
        15 => Starting,
        16..=17 => Completed,
        18 => Failed,
        _ => Cancelled,
    };
    // Mostly the agent's usual ttl, so that most beats change nothing a
    // Redis writer remembers and take the quick form.
    let usual = [5, 5, 10, 30][AGENTS.iter().position(|a| *a == agent_id.as_str()).unwrap()];
    let ttl_seconds = if rng.random_bool(0.9) { usual } else { 10 };
    let progress = rng
        .random_bool(0.7)
        .then(|| f64::from(rng.random_range(0..=4u8)) / 4.0);
    let current_task = rng.random_bool(0.5).then(|| format!("task {n}"));
    let metadata = rng.random_bool(0.15).then(|| {
        let object = json!({ "k": rng.random_range(0..3) });
        serde_json::from_value::<JsonObject>(object).unwrap()
    });
    let display_name = rng
        .random_bool(0.1)
        .then(|| ["Ada", "Bob"][rng.random_range(0..2)].to_owned());
    let run_id = rng
        .random_bool(0.15)
        .then(|| Id::new(["r1", "r2", "r3"][rng.random_range(0..3)]).unwrap());
    let heartbeat_event = Some(EventBody::new(
        "agent.heartbeat",
        "test",
        Some(&agent_id),
        now,
        json!({ "status": status, "progress": progress, "current_task": current_task,
                "run_id": run_id.as_ref().map(Id::as_str), "ttl_seconds": ttl_seconds }),
    ));
    attune_telemetry::agents::Beat {
        agent_id,
        status,
        progress,
        current_task,
        metadata,
        display_name,
        run_id,
        ttl_seconds,
        grace_seconds: ttl_seconds,
        now,
        retention: Duration::from_secs(86_400),
        source: "test".into(),
        heartbeat_event,
    }
}

/// A service whose sweeper never runs by itself: the history sweeps.
async fn unswept(options: Options) -> TestApp {
    TestApp::spawn_with(options.configure(|c| c.sweep_interval = Duration::from_secs(86_400))).await
}

/// Everything an engine can be asked about the agents at `now_ms`: each
/// record, each listing (every selection, with and without a status, in one
/// page, and if `paged` also a page per agent), and the runs.
async fn agents_seen(app: &TestApp, now_ms: i64, paged: bool) -> Value {
    use attune_telemetry::agents::{AgentQuery, AgentSelection, AgentState, AgentStatus};
    use attune_telemetry::types::Id;
    let engine = &app.state.engine;
    let mut records = Vec::new();
    for id in AGENTS {
        let record = engine.get_agent(&Id::new(id).unwrap()).await.unwrap();
        records.push(format!("{record:?}"));
    }
    let mut listings = Vec::new();
    for selection in [
        AgentSelection::All,
        AgentSelection::StaleBefore(now_ms - 10_000),
        AgentSelection::State(AgentState::Up),
        AgentSelection::State(AgentState::Late),
        AgentSelection::State(AgentState::Down),
        AgentSelection::State(AgentState::Finished),
    ] {
        for status in [None, Some(AgentStatus::Running)] {
            let query = AgentQuery { selection, status };
            let (page, _) = engine.list_agents(query, now_ms, None, 100).await.unwrap();
            let ids: Vec<String> = page.iter().map(|r| r.agent_id.to_string()).collect();
            let (mut pages, mut cursor) = (Vec::new(), None);
            // A page per agent and a last one: a cursor that goes round
            // shows as more pages than the memory engine gives instead of
            // paging forever.
            let most_pages = if paged { AGENTS.len() + 1 } else { 0 };
            for _ in 0..most_pages {
                let (page, next) = engine.list_agents(query, now_ms, cursor, 1).await.unwrap();
                pages.extend(page.iter().map(|r| r.agent_id.to_string()));
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            listings.push(json!([format!("{selection:?} {status:?}"), ids, pages]));
        }
    }
    let mut runs: Vec<String> = engine
        .runs_since(0)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect();
    runs.sort();
    json!({ "records": records, "listings": listings, "runs": runs })
}

/// Each agent's events in the log, without their stream ids. Beats of
/// different agents queued together may reach the log in either order (on
/// Redis they go to different writers); each agent's stay in order.
async fn events_seen(app: &TestApp) -> Vec<Vec<Value>> {
    let events = app.all_events().await;
    AGENTS
        .iter()
        .map(|id| {
            let mut mine: Vec<Value> = events
                .iter()
                .filter(|e| e["agent_id"] == *id)
                .cloned()
                .collect();
            for event in &mut mine {
                event.as_object_mut().unwrap().remove("id");
            }
            mine
        })
        .collect()
}

/// The Redis engine applies beats in batches, in quick and full forms, with
/// tokens cached per writer and a down-due score kept ahead of the
/// deadline; none of that may change what a history of beats, sweeps and
/// deletes leaves behind. A random history (several seeds) is applied to
/// the memory engine and to two replicas sharing one Redis, and after every
/// step each record, listing, run and the answer of every beat and sweep
/// must be the same; at the end, each agent's events too. (Sweeps fall on
/// whole seconds after the beats: a quarter second after a deadline, the
/// Redis engine may claim an agent one sweep later by design.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_agents_answer_as_the_memory_engines_do() {
    use attune_telemetry::events::EventBody;
    use attune_telemetry::types::Id;
    use rand::{RngExt, SeedableRng};
    for seed in 1..=3u64 {
        let memory = unswept(Options::new(Kind::Memory)).await;
        let redis = unswept(Options::new(Kind::Redis)).await;
        let url = redis.redis_url().unwrap();
        let replica = unswept(Options::new(Kind::Redis).shared_redis(&url, &redis.prefix)).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Whole seconds, so that a sweep is never within the quarter second
        // the Redis engine's down-due score may run ahead of a deadline.
        let mut now =
            chrono::DateTime::from_timestamp(memory.state.clock.now().timestamp(), 0).unwrap();
        let mut n = 0;
        for step in 0..250 {
            let at = format!("seed {seed}, step {step}");
            // Both replicas take turns, each with its own writers' tokens.
            let redis_app = if rng.random_bool(0.5) {
                &redis
            } else {
                &replica
            };
            match rng.random_range(0..20) {
                0..=10 => {
                    // Beats queued together, so that Redis batches them.
                    let beats: Vec<_> = (0..rng.random_range(1..=6))
                        .map(|k| {
                            n += 1;
                            random_beat(&mut rng, n, now + chrono::Duration::milliseconds(k))
                        })
                        .collect();
                    let engines = [&memory.state.engine, &redis_app.state.engine];
                    let [expected, got] = engines.map(|engine| {
                        futures_util::future::join_all(
                            beats.iter().map(|b| engine.record_beat(b.clone())),
                        )
                    });
                    let (expected, got) = (expected.await, got.await);
                    for ((beat, expected), got) in beats.iter().zip(expected).zip(got) {
                        assert_eq!(
                            got.unwrap(),
                            expected.unwrap(),
                            "{at}: the answer to {beat:?}"
                        );
                    }
                }
                11..=14 => {
                    let ms = now.timestamp_millis();
                    let expected = memory.state.engine.sweep_down_agents(ms, 500).await;
                    let got = redis_app.state.engine.sweep_down_agents(ms, 500).await;
                    assert_eq!(got.unwrap(), expected.unwrap(), "{at}: agents swept");
                }
                15 => {
                    let id = Id::new(AGENTS[rng.random_range(0..AGENTS.len())]).unwrap();
                    let event =
                        || EventBody::new("agent.deleted", "test", Some(&id), now, json!({}));
                    let expected = memory.state.engine.delete_agent(&id, event()).await;
                    let got = redis_app.state.engine.delete_agent(&id, event()).await;
                    assert_eq!(got.unwrap(), expected.unwrap(), "{at}: deleting {id}");
                }
                _ => {
                    // Past some deadlines, often far past every one.
                    now += chrono::Duration::seconds(rng.random_range(1..=25));
                }
            }
            let ms = now.timestamp_millis() + 5;
            let paged = step % 10 == 0;
            let expected = agents_seen(&memory, ms, paged).await;
            for app in [&redis, &replica] {
                assert_eq!(agents_seen(app, ms, paged).await, expected, "{at}");
            }
        }
        let (expected, got) = (events_seen(&memory).await, events_seen(&redis).await);
        for ((id, expected), got) in AGENTS.iter().zip(expected).zip(got) {
            for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
                assert_eq!(g, e, "seed {seed}: event {i} of {id}'s {}", expected.len());
            }
            assert_eq!(got.len(), expected.len(), "seed {seed}: {id}'s events");
        }
    }
}
