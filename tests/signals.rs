//! Coordination signals: delivery, isolation, broadcasts, expiry, waits,
//! validation and scope — on both engines.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Kind, Options, TestApp, TestKeys, eventually, problem_field};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// Ten seconds and the Redis timeout, and then some: broadcasts older than
/// this are what an agent's watermark may cover.
const PAST_THE_SEEN_MARGIN: Duration = Duration::from_secs(12 + common::REDIS_TIMEOUT.as_secs());

/// Sends a signal and returns the stored signal, asserting a 201.
async fn send(app: &TestApp, body: Value) -> Value {
    let (status, signal) = app.post("/v1/signals", body).await;
    assert_eq!(status, 201, "{signal}");
    signal
}

/// Reads an inbox (with a query string) and returns its signals.
async fn inbox(app: &TestApp, agent: &str, query: &str) -> Vec<Value> {
    let (status, body) = app
        .get(&format!("/v1/agents/{agent}/signals?{query}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["signals"].as_array().expect("signals").clone()
}

fn ids(signals: &[Value]) -> Vec<String> {
    signals
        .iter()
        .map(|s| s["signal_id"].as_str().expect("signal_id").to_owned())
        .collect()
}

/// Sends `count` copies of `body`, fifty at a time.
async fn send_many(app: &TestApp, count: usize, body: Value) {
    for start in (0..count).step_by(50) {
        let batch = (start..count.min(start + 50)).map(|_| send(app, body.clone()));
        futures_util::future::join_all(batch).await;
    }
}

/// A Redis app whose sweepers stay idle, so that a test can count the
/// Redis calls its own requests make.
async fn redis_without_sweeps() -> TestApp {
    TestApp::spawn_with(
        Options::new(Kind::Redis).configure(|c| c.sweep_interval = Duration::from_secs(3600)),
    )
    .await
}

/// A broadcast of type `note` from `hub` that lives an hour.
fn hour_long_note() -> Value {
    json!({"signal_type": "note", "source_agent": "hub", "ttl_seconds": 3600})
}

/// Every page of an inbox read that does not consume (`query` sets its
/// filters and `limit`), following `next_cursor`; and how many pages.
async fn page_through(app: &TestApp, agent: &str, query: &str) -> (Vec<String>, usize) {
    let (mut seen, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (status, body) = app
            .get(&format!(
                "/v1/agents/{agent}/signals?{query}&cursor={cursor}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        seen.extend(ids(body["signals"].as_array().unwrap()));
        match body["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return (seen, pages),
        }
        assert!(pages < 100, "the cursor goes round: {seen:?}");
    }
}

async fn a_send_answers_201_with_the_full_signal(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let signal = send(
        &app,
        json!({"signal_type": "task_complete", "source_agent": "agent-1",
               "target_agent": "agent-2", "payload": {"task": 7}}),
    )
    .await;
    let id = signal["signal_id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert_eq!(signal["signal_type"], "task_complete");
    assert_eq!(signal["source_agent"], "agent-1");
    assert_eq!(signal["target_agent"], "agent-2");
    assert_eq!(signal["payload"], json!({"task": 7}));
    assert_eq!(signal["ttl_seconds"], 60, "the default TTL is 60 s");
    let created =
        chrono::DateTime::parse_from_rfc3339(signal["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(signal["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_milliseconds(), 60_000);

    let (status, broadcast) = app
        .post(
            "/v1/signals/broadcast",
            json!({"signal_type": "abort", "source_agent": "agent-1"}),
        )
        .await;
    assert_eq!(status, 201, "{broadcast}");
    assert_eq!(broadcast["target_agent"], Value::Null);
    assert_eq!(broadcast["payload"], json!({}));
}

async fn a_signal_for_one_agent_is_invisible_to_another(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let signal = send(
        &app,
        json!({"signal_type": "abort", "source_agent": "agent-1", "target_agent": "agent-3"}),
    )
    .await;
    for query in [
        "",
        "type=abort",
        "type=abort&source=agent-1",
        "consume=true",
        "type=abort&consume=true",
    ] {
        assert!(
            inbox(&app, "agent-2", query).await.is_empty(),
            "agent-2 saw it with {query:?}"
        );
    }
    let (_, listed) = app.get("/v1/signals?target=agent-2").await;
    assert_eq!(listed["signals"], json!([]));
    // Still there for its target, after all of agent-2's consuming reads.
    let got = inbox(&app, "agent-3", "type=abort").await;
    assert_eq!(ids(&got), [signal["signal_id"].as_str().unwrap()]);
}

async fn a_consumed_broadcast_is_still_delivered_once_to_every_other_agent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let broadcast = send(
        &app,
        json!({"signal_type": "checkpoint", "source_agent": "lead"}),
    )
    .await;
    let id = broadcast["signal_id"].as_str().unwrap();

    assert_eq!(ids(&inbox(&app, "agent-1", "consume=true").await), [id]);
    assert!(
        inbox(&app, "agent-1", "consume=true").await.is_empty(),
        "agent-1 got it twice"
    );

    assert_eq!(ids(&inbox(&app, "agent-2", "consume=true").await), [id]);
    assert!(
        inbox(&app, "agent-2", "consume=true").await.is_empty(),
        "agent-2 got it twice"
    );

    // Reading without consuming leaves it in place.
    assert_eq!(ids(&inbox(&app, "agent-3", "").await), [id]);
    assert_eq!(ids(&inbox(&app, "agent-3", "consume=true").await), [id]);

    // It stays live (and listed) for agents that have not read it yet.
    let (_, listed) = app.get("/v1/signals").await;
    assert_eq!(ids(listed["signals"].as_array().unwrap()), [id]);
}

async fn a_broadcast_sent_before_an_agent_first_beats_is_delivered_to_it(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let broadcast = send(
        &app,
        json!({"signal_type": "ready", "source_agent": "lead"}),
    )
    .await;
    let (status, _) = app.post("/v1/agents/newcomer/heartbeats", json!({})).await;
    assert_eq!(status, 200);
    let got = inbox(&app, "newcomer", "consume=true").await;
    assert_eq!(ids(&got), [broadcast["signal_id"].as_str().unwrap()]);
}

async fn the_inbox_merges_targeted_signals_and_broadcasts_oldest_first(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut sent = Vec::new();
    for (i, target) in [Some("worker"), None, Some("worker"), None, Some("other")]
        .iter()
        .enumerate()
    {
        let mut body = json!({"signal_type": if i % 2 == 0 { "ready" } else { "abort" },
                              "source_agent": if i < 2 { "lead" } else { "helper" }});
        if let Some(t) = target {
            body["target_agent"] = json!(t);
        }
        sent.push(
            send(&app, body).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        // Distinct creation milliseconds make "oldest first" unambiguous.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(ids(&inbox(&app, "worker", "").await), sent[..4]);
    assert_eq!(
        ids(&inbox(&app, "worker", "type=ready").await),
        [sent[0].as_str(), sent[2].as_str()]
    );
    assert_eq!(
        ids(&inbox(&app, "worker", "source=helper").await),
        [sent[2].as_str(), sent[3].as_str()]
    );
    assert_eq!(
        ids(&inbox(&app, "worker", "limit=3&consume=true").await),
        sent[..3]
    );
    assert_eq!(ids(&inbox(&app, "worker", "").await), [sent[3].as_str()]);
}

async fn concurrent_consumers_never_receive_the_same_targeted_signal(kind: Kind) {
    let app = Arc::new(TestApp::spawn(kind).await);
    let mut sent = HashSet::new();
    for i in 0..40 {
        let s = send(
            &app,
            json!({"signal_type": "job", "source_agent": "lead", "target_agent": "pool",
                   "payload": {"n": i}}),
        )
        .await;
        sent.insert(s["signal_id"].as_str().unwrap().to_owned());
    }
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = inbox(&app, "pool", "consume=true&limit=3").await;
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(ids(&batch));
                }
            })
        })
        .collect();
    let mut received = Vec::new();
    for reader in readers {
        received.extend(reader.await.unwrap());
    }
    let unique: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(unique.len(), received.len(), "a signal was delivered twice");
    assert_eq!(unique, sent, "every signal is delivered exactly once");
}

async fn an_expired_signal_is_gone_from_the_inbox_and_from_storage(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let targeted = send(
        &app,
        json!({"signal_type": "ping", "source_agent": "agent-1", "target_agent": "agent-2",
               "ttl_seconds": 1}),
    )
    .await;
    let broadcast = send(
        &app,
        json!({"signal_type": "ping", "source_agent": "agent-1", "ttl_seconds": 1}),
    )
    .await;
    // agent-3 consumes the broadcast, so a consumption marker exists too.
    assert_eq!(inbox(&app, "agent-3", "consume=true").await.len(), 1);
    assert_eq!(inbox(&app, "agent-2", "").await.len(), 2);

    eventually(Duration::from_secs(3), || async {
        inbox(&app, "agent-2", "").await.is_empty().then_some(())
    })
    .await;
    assert!(
        inbox(&app, "agent-4", "").await.is_empty(),
        "the broadcast expired for everyone"
    );
    let (_, listed) = app.get("/v1/signals").await;
    assert_eq!(listed["signals"], json!([]));

    if let Some(redis) = &app.redis {
        let mut conn = redis.conn();
        let pattern = format!("\\{{{}\\}}:*", app.prefix);
        let left: Vec<String> = ::redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
        let signal_keys: Vec<&String> = left
            .iter()
            .filter(|k| k.contains(":signal") || k.contains(":inbox"))
            .collect();
        assert!(
            signal_keys.is_empty(),
            "expired signals left keys behind: {signal_keys:?}"
        );
        for signal in [&targeted, &broadcast] {
            let key = format!(
                "{{{}}}:signal:{}",
                app.prefix,
                signal["signal_id"].as_str().unwrap()
            );
            let exists: bool = ::redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
            assert!(!exists, "{key} still exists");
        }
    }
}

/// Memory only (Redis expires keys by itself): the sweeper frees expired
/// signals even when no signal operation comes after them.
#[tokio::test]
async fn memory_expired_signals_are_freed_without_another_signal_operation() {
    let app = TestApp::spawn(Kind::Memory).await;
    let attune_telemetry::engine::Engine::Memory(memory) = app.state.engine.clone() else {
        unreachable!("a memory app");
    };
    send(
        &app,
        json!({"signal_type": "ping", "source_agent": "a", "target_agent": "b", "ttl_seconds": 1}),
    )
    .await;
    send(
        &app,
        json!({"signal_type": "ping", "source_agent": "a", "ttl_seconds": 1}),
    )
    .await;
    send(
        &app,
        json!({"signal_type": "ping", "source_agent": "a", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(memory.stored_signals(), 3);
    app.state.clock.advance(Duration::from_secs(2));
    eventually(Duration::from_secs(2), || async {
        (memory.stored_signals() == 1).then_some(())
    })
    .await;
    assert_eq!(inbox(&app, "b", "").await.len(), 1, "the live broadcast");
}

/// Redis only: an inbox key that outlives an expired signal (because it
/// holds a longer-lived one) loses the expired member on the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_prunes_expired_signals_from_indexes_that_live_on() {
    let app = TestApp::spawn(Kind::Redis).await;
    let short = send(
        &app,
        json!({"signal_type": "ping", "source_agent": "a", "target_agent": "b", "ttl_seconds": 1}),
    )
    .await;
    let long = send(
        &app,
        json!({"signal_type": "ping", "source_agent": "a", "target_agent": "b", "ttl_seconds": 600}),
    )
    .await;
    let short_id = short["signal_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(3), || async {
        (ids(&inbox(&app, "b", "").await) == [long["signal_id"].as_str().unwrap()]).then_some(())
    })
    .await;
    let mut conn = app.redis.as_ref().unwrap().conn();
    let p = &app.prefix;
    for index in [format!("{{{p}}}:inbox:b"), format!("{{{p}}}:signals:all")] {
        let score: Option<f64> = ::redis::cmd("ZSCORE")
            .arg(&index)
            .arg(&short_id)
            .query(&mut conn)
            .unwrap();
        assert_eq!(score, None, "{index} still holds the expired signal");
        let ttl: i64 = ::redis::cmd("PTTL").arg(&index).query(&mut conn).unwrap();
        assert!(ttl > 0, "{index} expires with its last signal");
    }
    let queued: Vec<String> = ::redis::cmd("ZRANGE")
        .arg(format!("{{{p}}}:signals:expiry"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert!(
        queued.iter().all(|m| !m.starts_with(&short_id)),
        "{queued:?}"
    );
}

/// Starts a long-poll read of `agent`'s inbox on `app` and returns when it
/// answered: `(signals, instant of the answer)`.
fn spawn_waiter(
    app: Arc<TestApp>,
    agent: &'static str,
) -> tokio::task::JoinHandle<(Vec<Value>, Instant)> {
    tokio::spawn(async move {
        let got = inbox(&app, agent, "wait_seconds=10&consume=true").await;
        (got, Instant::now())
    })
}

/// How long a waiter may take to answer after the send's response. The
/// push path (event log → tailer → wake-up → one read) takes a few ms; the
/// bound leaves room for a loaded CI machine without admitting polling.
const WAKE_BOUND: Duration = Duration::from_millis(50);

/// Lets a spawned waiter reach its wait before the send.
const SETTLE: Duration = Duration::from_millis(300);

async fn a_waiter_is_answered_within_50_ms_of_the_send(kind: Kind) {
    let app = Arc::new(TestApp::spawn(kind).await);
    let waiter = spawn_waiter(app.clone(), "sleeper");
    tokio::time::sleep(SETTLE).await;
    assert!(
        !waiter.is_finished(),
        "the waiter answered before anything was sent"
    );
    let signal = send(
        &app,
        json!({"signal_type": "wake", "source_agent": "lead", "target_agent": "sleeper"}),
    )
    .await;
    let sent_at = Instant::now();
    let (got, answered_at) = waiter.await.unwrap();
    assert_eq!(ids(&got), [signal["signal_id"].as_str().unwrap()]);
    let latency = answered_at.saturating_duration_since(sent_at);
    assert!(latency < WAKE_BOUND, "answered {latency:?} after the send");
}

async fn a_broadcast_wakes_every_waiting_agent(kind: Kind) {
    let app = Arc::new(TestApp::spawn(kind).await);
    let waiters = [
        spawn_waiter(app.clone(), "w-1"),
        spawn_waiter(app.clone(), "w-2"),
    ];
    tokio::time::sleep(SETTLE).await;
    let broadcast = send(
        &app,
        json!({"signal_type": "abort", "source_agent": "lead"}),
    )
    .await;
    let sent_at = Instant::now();
    for waiter in waiters {
        let (got, answered_at) = waiter.await.unwrap();
        assert_eq!(ids(&got), [broadcast["signal_id"].as_str().unwrap()]);
        let latency = answered_at.saturating_duration_since(sent_at);
        assert!(latency < WAKE_BOUND, "answered {latency:?} after the send");
    }
}

/// Redis only: the send goes through one instance, the waiter waits on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_one_replica_is_woken_by_a_send_through_another() {
    let app = TestApp::spawn(Kind::Redis).await;
    let replica = Arc::new(app.replica().await);
    let waiter = spawn_waiter(replica.clone(), "remote");
    tokio::time::sleep(SETTLE).await;
    assert!(!waiter.is_finished());
    let signal = send(
        &app,
        json!({"signal_type": "wake", "source_agent": "lead", "target_agent": "remote"}),
    )
    .await;
    let sent_at = Instant::now();
    let (got, answered_at) = waiter.await.unwrap();
    assert_eq!(ids(&got), [signal["signal_id"].as_str().unwrap()]);
    let latency = answered_at.saturating_duration_since(sent_at);
    assert!(latency < WAKE_BOUND, "answered {latency:?} after the send");
}

async fn a_wait_that_ends_returns_200_with_an_empty_list(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    // A signal for someone else, and one of another type, do not end the wait.
    send(
        &app,
        json!({"signal_type": "x", "source_agent": "a", "target_agent": "other"}),
    )
    .await;
    send(
        &app,
        json!({"signal_type": "x", "source_agent": "a", "target_agent": "patient"}),
    )
    .await;
    let started = Instant::now();
    let (status, body) = app
        .get("/v1/agents/patient/signals?wait_seconds=1&type=never")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"signals": [], "next_cursor": null}));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered before the wait ended"
    );
}

async fn a_wait_ignores_signals_that_do_not_match_its_filter(kind: Kind) {
    let app = Arc::new(TestApp::spawn(kind).await);
    let waiter = {
        let app = app.clone();
        tokio::spawn(async move { inbox(&app, "picky", "wait_seconds=10&type=wanted").await })
    };
    tokio::time::sleep(SETTLE).await;
    send(
        &app,
        json!({"signal_type": "unwanted", "source_agent": "a", "target_agent": "picky"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "a non-matching signal ended the wait"
    );
    let wanted = send(
        &app,
        json!({"signal_type": "wanted", "source_agent": "a", "target_agent": "picky"}),
    )
    .await;
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&got), [wanted["signal_id"].as_str().unwrap()]);
}

async fn invalid_signals_are_422s_naming_the_field(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let base = json!({"signal_type": "ready", "source_agent": "a"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let cases = [
        ("/v1/signals", with("ttl_seconds", json!(0)), "ttl_seconds"),
        (
            "/v1/signals",
            with("ttl_seconds", json!(86_401)),
            "ttl_seconds",
        ),
        (
            "/v1/signals",
            with("payload", json!({"blob": "x".repeat(70_000)})),
            "payload",
        ),
        ("/v1/signals", with("payload", json!([1, 2])), "payload"),
        ("/v1/signals", json!({"source_agent": "a"}), "signal_type"),
        (
            "/v1/signals",
            json!({"signal_type": "ready"}),
            "source_agent",
        ),
        (
            "/v1/signals",
            with("signal_type", json!("a:b")),
            "signal_type",
        ),
        (
            "/v1/signals",
            with("target_agent", json!("x*")),
            "target_agent",
        ),
        (
            "/v1/signals/broadcast",
            with("target_agent", json!("b")),
            "target_agent",
        ),
    ];
    for (path, body, field) in cases {
        let (status, problem) = app.post(path, body).await;
        assert_eq!(status, 422, "{path} {field}: {problem}");
        assert_eq!(problem_field(&problem), field, "{problem}");
    }
    let (status, problem) = app.get("/v1/agents/a/signals?wait_seconds=61").await;
    assert_eq!(
        (status, problem_field(&problem)),
        (422, "wait_seconds".to_owned())
    );
    let (status, problem) = app.get("/v1/agents/a:b/signals").await;
    assert_eq!(
        (status, problem_field(&problem)),
        (422, "agent_id".to_owned())
    );
    let (_, listed) = app.get("/v1/signals").await;
    assert_eq!(listed["signals"], json!([]), "nothing invalid was stored");
}

async fn agent_keys_send_and_read_only_within_their_scope(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let ci = Some(keys.ci_agent.as_str());
    let body = |source: &str, target: &str| json!({"signal_type": "ready", "source_agent": source, "target_agent": target});

    let (status, _) = app.post_as("/v1/signals", body("prod-1", "ci-1"), ci).await;
    assert_eq!(status, 403, "the ci key cannot send as prod-1");
    let (status, _) = app
        .post_as(
            "/v1/signals",
            body("prod-2", "prod-1"),
            Some(keys.agent.as_str()),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = app.get_as("/v1/agents/prod-1/signals", ci).await;
    assert_eq!(
        status, 404,
        "another agent's inbox does not exist for this key"
    );
    let (status, _) = app.delete_as("/v1/agents/prod-1/signals", ci).await;
    assert_eq!(status, 404);

    // Within its scope it may send, read and clear.
    let (status, _) = app.post_as("/v1/signals", body("ci-1", "ci-2"), ci).await;
    assert_eq!(status, 201);
    let (status, got) = app.get_as("/v1/agents/ci-2/signals?consume=true", ci).await;
    assert_eq!((status, got["signals"].as_array().unwrap().len()), (200, 1));
    let (status, _) = app.delete_as("/v1/agents/ci-2/signals", ci).await;
    assert_eq!(status, 200);

    // Viewers read inboxes and the list, but neither send nor consume.
    let viewer = Some(keys.viewer.as_str());
    let (status, _) = app
        .post_as("/v1/signals", body("prod-2", "prod-1"), viewer)
        .await;
    assert_eq!(status, 403);
    let (status, got) = app.get_as("/v1/agents/prod-1/signals", viewer).await;
    assert_eq!((status, got["signals"].as_array().unwrap().len()), (200, 1));
    let (status, _) = app
        .get_as("/v1/agents/prod-1/signals?consume=true", viewer)
        .await;
    assert_eq!(status, 403);
    let (status, _) = app.get_as("/v1/signals", viewer).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_as("/v1/signals", ci).await;
    assert_eq!(status, 403, "listing every signal needs the viewer role");
    let (status, _) = app.delete_as("/v1/agents/prod-1/signals", viewer).await;
    assert_eq!(status, 403);
    let (status, _) = app.get("/v1/agents/prod-1/signals").await;
    assert_eq!(status, 401);

    // Admins clear any inbox.
    let (status, cleared) = app
        .delete_as("/v1/agents/prod-1/signals", Some(keys.admin.as_str()))
        .await;
    assert_eq!((status, cleared["cleared"].as_u64()), (200, Some(1)));
}

async fn clearing_an_inbox_hides_broadcasts_for_that_agent_only(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    send(
        &app,
        json!({"signal_type": "ready", "source_agent": "a", "target_agent": "c"}),
    )
    .await;
    let keep = send(
        &app,
        json!({"signal_type": "keep", "source_agent": "a", "target_agent": "c"}),
    )
    .await;
    let broadcast = send(&app, json!({"signal_type": "ready", "source_agent": "a"})).await;

    let (status, cleared) = app.delete("/v1/agents/c/signals?type=ready").await;
    assert_eq!(
        (status, cleared["cleared"].as_u64()),
        (200, Some(2)),
        "{cleared}"
    );
    assert_eq!(
        ids(&inbox(&app, "c", "").await),
        [keep["signal_id"].as_str().unwrap()]
    );
    assert_eq!(
        ids(&inbox(&app, "d", "").await),
        [broadcast["signal_id"].as_str().unwrap()]
    );

    // A blank type would widen the clear to every type: refused.
    let (status, body) = app.delete("/v1/agents/c/signals?type=").await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "type"));
    let (_, cleared) = app.delete("/v1/agents/c/signals").await;
    assert_eq!(cleared["cleared"], 1);
    assert!(inbox(&app, "c", "").await.is_empty());
    assert_eq!(app.events_of("signal.cleared").await.len(), 2);
}

async fn every_send_emits_signal_sent_with_the_signal(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let targeted = send(
        &app,
        json!({"signal_type": "ready", "source_agent": "a", "target_agent": "b"}),
    )
    .await;
    let broadcast = send(&app, json!({"signal_type": "abort", "source_agent": "a"})).await;
    let events = app.events_of("signal.sent").await;
    assert_eq!(events.len(), 2);
    for (event, signal) in events.iter().zip([&targeted, &broadcast]) {
        assert_eq!(&event["data"], signal);
        assert_eq!(event["agent_id"], "a");
    }
}

async fn live_signals_are_listed_oldest_first_with_filters_and_pages(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let mut body = json!({"signal_type": if i < 3 { "ready" } else { "abort" },
                              "source_agent": format!("s-{}", i % 2)});
        if i != 4 {
            body["target_agent"] = json!("t-1");
        }
        sent.push(
            send(&app, body).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let list = |query: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app.get(&format!("/v1/signals?{query}")).await;
            assert_eq!(status, 200, "{body}");
            (
                ids(body["signals"].as_array().unwrap()),
                body["next_cursor"].clone(),
            )
        }
    };
    assert_eq!(list("").await.0, sent);
    assert_eq!(list("type=abort").await.0, sent[3..]);
    assert_eq!(
        list("source=s-1").await.0,
        [sent[1].as_str(), sent[3].as_str()]
    );
    assert_eq!(list("target=t-1").await.0, sent[..4]);
    assert_eq!(list("type=abort&target=t-1").await.0, [sent[3].as_str()]);

    let mut pages = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = app
            .get(&format!("/v1/signals?limit=2&cursor={cursor}"))
            .await;
        assert_eq!(status, 200, "{body}");
        pages.extend(ids(body["signals"].as_array().unwrap()));
        match body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, sent, "pages cover every signal once, in order");
    let (status, problem) = app.get("/v1/signals?cursor=garbage!").await;
    assert_eq!(
        (status, problem_field(&problem)),
        (422, "cursor".to_owned())
    );
}

/// A consuming read with an `Idempotency-Key`, and the ids it answered.
async fn take(app: &TestApp, agent: &str, key: &str, query: &str) -> (u16, Value) {
    let resp = app
        .client
        .get(app.url(&format!("/v1/agents/{agent}/signals?consume=true{query}")))
        .header("Idempotency-Key", key)
        .send()
        .await
        .expect("inbox read");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON answer"))
}

fn taken_ids(answer: &Value) -> Vec<String> {
    ids(answer["signals"].as_array().expect("signals"))
}

/// An agent whose consuming read lost its answer (a timeout, a dropped
/// connection) retries it with the same `Idempotency-Key` and gets the same
/// signals, targeted and broadcast; the retry takes nothing more. Another
/// key reads afresh; the same key with another query is a 422.
async fn a_consuming_read_retried_with_its_key_gets_the_same_signals(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let task = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
    )
    .await;
    let pause = send(
        &app,
        json!({"signal_type": "pause", "source_agent": "boss"}),
    )
    .await;
    let first = [&task, &pause].map(|s| s["signal_id"].as_str().unwrap().to_owned());

    let (status, answer) = take(&app, "worker", "read-1", "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(taken_ids(&answer), first);
    let later = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
    )
    .await;
    for _ in 0..2 {
        let (status, again) = take(&app, "worker", "read-1", "").await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again, answer, "a retry gets the first answer, whole");
    }
    assert_eq!(
        ids(&inbox(&app, "worker", "").await),
        [later["signal_id"].as_str().unwrap()],
        "the retries took nothing more"
    );

    let (status, problem) = take(&app, "worker", "read-1", "&type=task").await;
    assert_eq!(
        (status, problem_field(&problem)),
        (422, "Idempotency-Key".to_owned())
    );
    let (_, fresh) = take(&app, "worker", "read-2", "").await;
    assert_eq!(taken_ids(&fresh), [later["signal_id"].as_str().unwrap()]);
    // A read that does not consume ignores the key.
    let (status, peeked) = app.get("/v1/agents/worker/signals?consume=false").await;
    assert_eq!(
        (status, peeked["signals"].as_array().map(Vec::len)),
        (200, Some(0))
    );
}

/// An `Idempotency-Key` belongs to the API key that sent it: another API
/// key's consuming read with the same one reads afresh and never gets what
/// the first took.
async fn an_idempotency_key_belongs_to_its_api_key(kind: Kind) {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(kind).keys(&keys.toml)).await;
    let sent = app
        .post_as(
            "/v1/signals",
            json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
            Some(&keys.admin),
        )
        .await
        .1;
    let read = |token: &str| {
        app.client
            .get(app.url("/v1/agents/worker/signals?consume=true"))
            .bearer_auth(token.to_owned())
            .header("Idempotency-Key", "shared-7")
            .send()
    };
    let taken: Value = read(&keys.agent).await.unwrap().json().await.unwrap();
    assert_eq!(taken_ids(&taken), [sent["signal_id"].as_str().unwrap()]);
    let other: Value = read(&keys.admin).await.unwrap().json().await.unwrap();
    assert_eq!(taken_ids(&other), Vec::<String>::new(), "{other}");
    let again: Value = read(&keys.agent).await.unwrap().json().await.unwrap();
    assert_eq!(again, taken);
}

/// Reads racing with one key (a client that retried before its first read
/// answered) take once between them and answer alike; a retry after a
/// signal's TTL leaves it out, as every read does.
async fn reads_racing_with_one_key_take_once_and_expired_signals_stay_out(kind: Kind) {
    let app = Arc::new(TestApp::spawn(kind).await);
    let short = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker",
               "ttl_seconds": 5}),
    )
    .await;
    let long = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker",
               "ttl_seconds": 3600}),
    )
    .await;
    let both = [&short, &long].map(|s| s["signal_id"].as_str().unwrap().to_owned());
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { take(&app, "worker", "race", "").await })
        })
        .collect();
    for racer in racers {
        let (status, answer) = racer.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(taken_ids(&answer), both);
    }
    assert!(inbox(&app, "worker", "").await.is_empty());
    app.state.clock.advance(Duration::from_secs(6));
    let (_, again) = take(&app, "worker", "race", "").await;
    assert_eq!(taken_ids(&again), [both[1].clone()]);
}

/// Only a read that took something keeps its answer: a retry of one that
/// found nothing (a long poll whose client gave up) reads afresh.
async fn a_consuming_read_that_took_nothing_keeps_nothing(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, empty) = take(&app, "worker", "poll-1", "").await;
    assert_eq!((status, taken_ids(&empty).len()), (200, 0));
    let task = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
    )
    .await;
    let (_, answer) = take(&app, "worker", "poll-1", "").await;
    assert_eq!(taken_ids(&answer), [task["signal_id"].as_str().unwrap()]);
}

/// Broadcasts a filtered read or clear leaves behind stay for the agent,
/// however many reads and clears pass them and however old they get; each
/// is delivered once.
async fn broadcasts_a_filter_passes_over_stay_until_taken(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let broadcast = |signal_type: &'static str| {
        let app = &app;
        async move {
            let signal = send(
                app,
                json!({"signal_type": signal_type, "source_agent": "hub", "ttl_seconds": 3600}),
            )
            .await;
            signal["signal_id"].as_str().unwrap().to_owned()
        }
    };
    let (note_1, task_1, note_2) = (
        broadcast("note").await,
        broadcast("task").await,
        broadcast("note").await,
    );
    assert_eq!(
        ids(&inbox(&app, "w", "type=task&consume=true").await),
        [task_1.as_str()]
    );
    app.state.clock.advance(Duration::from_secs(20));
    assert!(inbox(&app, "w", "type=task&consume=true").await.is_empty());
    let note_3 = broadcast("note").await;
    assert_eq!(
        ids(&inbox(&app, "w", "consume=true").await),
        [note_1, note_2, note_3]
    );
    app.state.clock.advance(Duration::from_secs(20));
    assert!(inbox(&app, "w", "consume=true").await.is_empty());
    let note_4 = broadcast("note").await;
    assert_eq!(ids(&inbox(&app, "w", "consume=true").await), [note_4]);

    // Another agent clears the notes only: the task stays in its inbox,
    // also after the clear has passed it by twice.
    for _ in 0..2 {
        let (status, cleared) = app.delete("/v1/agents/v/signals?type=note").await;
        assert_eq!(status, 200, "{cleared}");
        app.state.clock.advance(Duration::from_secs(20));
    }
    assert_eq!(ids(&inbox(&app, "v", "consume=true").await), [task_1]);
    assert!(inbox(&app, "v", "").await.is_empty());
}

/// What a read that does not consume finds stays in the inbox, read after
/// read, until it is taken, cleared or expires, whatever came after it
/// (on Redis: listed with the watermark, at most a hundred of them).
async fn a_match_read_without_consuming_stays_until_taken(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let broadcast = |signal_type: &'static str, ttl: u64| {
        let app = &app;
        async move {
            let signal = send(
                app,
                json!({"signal_type": signal_type, "source_agent": "hub", "ttl_seconds": ttl}),
            )
            .await;
            signal["signal_id"].as_str().unwrap().to_owned()
        }
    };
    let task_1 = broadcast("task", 3600).await;
    broadcast("note", 3600).await;
    let task_2 = broadcast("task", 5).await;
    broadcast("note", 3600).await;
    assert_eq!(
        ids(&inbox(&app, "w", "type=task").await),
        [task_1.as_str(), task_2.as_str()]
    );
    app.state.clock.advance(Duration::from_secs(20));
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), [task_1.as_str()]);
    let task_3 = broadcast("task", 3600).await;
    for _ in 0..2 {
        assert_eq!(
            ids(&inbox(&app, "w", "type=task").await),
            [task_1.as_str(), task_3.as_str()]
        );
        app.state.clock.advance(Duration::from_secs(20));
    }
    // A read that stops at its limit leaves what it did not reach.
    assert_eq!(
        ids(&inbox(&app, "w", "type=task&consume=true&limit=1").await),
        [task_1.as_str()]
    );
    app.state.clock.advance(Duration::from_secs(20));
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), [task_3.as_str()]);
    assert_eq!(
        ids(&inbox(&app, "v", "type=task").await),
        [task_1.as_str(), task_3.as_str()]
    );
    let (status, cleared) = app.delete("/v1/agents/w/signals?type=task").await;
    assert_eq!(
        (status, cleared["cleared"].as_u64()),
        (200, Some(1)),
        "{cleared}"
    );
    assert!(inbox(&app, "w", "type=task").await.is_empty());

    // More matches than a watermark lists: every one is still read.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let sends = (0..50).map(|_| broadcast("task", 3600));
        tasks.extend(futures_util::future::join_all(sends).await);
        broadcast("note", 3600).await;
    }
    tasks.sort();
    for _ in 0..2 {
        app.state.clock.advance(Duration::from_secs(20));
        let mut read = ids(&inbox(&app, "w", "type=task&limit=1000").await);
        read.sort();
        assert_eq!(read, tasks);
    }
}

/// A reader that only looks pages through the whole inbox, targeted
/// signals and broadcasts interleaved, each once and in order, and takes
/// nothing doing so; a consuming read takes from the oldest, so it has no
/// cursor.
async fn an_inbox_read_that_does_not_consume_pages_with_a_cursor(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut sent = Vec::new();
    for i in 0..7 {
        let mut body = json!({"signal_type": "step", "source_agent": "lead", "ttl_seconds": 600});
        if i % 3 != 1 {
            body["target_agent"] = json!("pager");
        }
        sent.push(
            send(&app, body).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        send(
            &app,
            json!({"signal_type": "step", "source_agent": "lead", "target_agent": "other"}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (seen, pages) = page_through(&app, "pager", "limit=3").await;
    assert_eq!(seen, sent, "every signal once, oldest first");
    assert_eq!(pages, 3);
    // Looking took nothing: a consuming read gets them all, and has no
    // cursor to give or take.
    let (status, body) = app.get("/v1/agents/pager/signals?consume=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(body["signals"].as_array().unwrap()), sent);
    assert!(body["next_cursor"].is_null(), "{body}");
    let (_, first) = app.get("/v1/agents/other/signals?limit=1").await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a full page has a cursor");
    let (status, body) = app
        .get(&format!(
            "/v1/agents/other/signals?consume=true&cursor={cursor}"
        ))
        .await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cursor"));
    // A cursor this endpoint could not have made is refused.
    use base64::Engine as _;
    let id = &sent[0];
    for position in [format!("1000000000000000:{id}"), format!("-5:{id}")] {
        let forged =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("inbox:{position}"));
        let (status, body) = app
            .get(&format!("/v1/agents/pager/signals?cursor={forged}"))
            .await;
        assert_eq!(
            (status, problem_field(&body).as_str()),
            (422, "cursor"),
            "{position}"
        );
    }
    // A cursor of another listing is refused.
    let (_, listed) = app.get("/v1/signals?limit=1").await;
    let other = listed["next_cursor"].as_str().expect("more live signals");
    let (status, body) = app
        .get(&format!("/v1/agents/other/signals?cursor={other}"))
        .await;
    assert_eq!((status, problem_field(&body).as_str()), (422, "cursor"));
}

/// Paging past more unconsumed broadcasts than a Redis watermark lists
/// (a hundred), with targeted signals among them and several sent in the
/// same millisecond, still gives each signal once, in the inbox's order.
async fn paging_a_long_inbox_gives_each_signal_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for i in 0..180 {
        let mut body = json!({"signal_type": "step", "source_agent": "lead", "ttl_seconds": 600});
        if i % 6 == 0 {
            body["target_agent"] = json!("pager");
        }
        send(&app, body).await;
    }
    let (paged, _) = page_through(&app, "pager", "limit=40").await;
    let (_, all) = app.get("/v1/agents/pager/signals?limit=1000").await;
    let all = ids(all["signals"].as_array().unwrap());
    assert_eq!(all.len(), 180);
    assert_eq!(paged, all);
}

/// A page whose walk passes more broadcasts than one Redis script call
/// walks (1,000 of another type) goes on in further calls from where the
/// last stopped, still after its cursor.
async fn a_page_past_a_long_run_of_other_broadcasts_continues_after_its_cursor(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let wanted = |target: Option<&str>| {
        let mut body = json!({"signal_type": "wanted", "source_agent": "lead", "ttl_seconds": 600});
        if let Some(t) = target {
            body["target_agent"] = json!(t);
        }
        body
    };
    let mut sent = Vec::new();
    for _ in 0..2 {
        sent.push(
            send(&app, wanted(None)).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for _ in 0..1100 {
        send(
            &app,
            json!({"signal_type": "noise", "source_agent": "lead", "ttl_seconds": 600}),
        )
        .await;
    }
    for target in [None, Some("pager"), None] {
        sent.push(
            send(&app, wanted(target)).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Redis splits a walk only over broadcasts older than its ten-second
    // margin for clocks.
    app.state.clock.advance(Duration::from_secs(15));
    let (paged, _) = page_through(&app, "pager", "type=wanted&limit=2").await;
    assert_eq!(paged, sent);
}

conformance!(
    an_inbox_read_that_does_not_consume_pages_with_a_cursor,
    paging_a_long_inbox_gives_each_signal_once,
    a_page_past_a_long_run_of_other_broadcasts_continues_after_its_cursor,
    a_send_answers_201_with_the_full_signal,
    a_signal_for_one_agent_is_invisible_to_another,
    a_consumed_broadcast_is_still_delivered_once_to_every_other_agent,
    a_broadcast_sent_before_an_agent_first_beats_is_delivered_to_it,
    the_inbox_merges_targeted_signals_and_broadcasts_oldest_first,
    concurrent_consumers_never_receive_the_same_targeted_signal,
    an_expired_signal_is_gone_from_the_inbox_and_from_storage,
    a_waiter_is_answered_within_50_ms_of_the_send,
    a_broadcast_wakes_every_waiting_agent,
    a_wait_that_ends_returns_200_with_an_empty_list,
    a_wait_ignores_signals_that_do_not_match_its_filter,
    invalid_signals_are_422s_naming_the_field,
    agent_keys_send_and_read_only_within_their_scope,
    clearing_an_inbox_hides_broadcasts_for_that_agent_only,
    every_send_emits_signal_sent_with_the_signal,
    live_signals_are_listed_oldest_first_with_filters_and_pages,
    a_consuming_read_retried_with_its_key_gets_the_same_signals,
    an_idempotency_key_belongs_to_its_api_key,
    a_consuming_read_that_took_nothing_keeps_nothing,
    reads_racing_with_one_key_take_once_and_expired_signals_stay_out,
    broadcasts_a_filter_passes_over_stay_until_taken,
    a_match_read_without_consuming_stays_until_taken,
);

/// Calls of a Redis command so far, those made by scripts included.
fn calls_of(conn: &mut ::redis::Connection, command: &str) -> u64 {
    let stats: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// On the memory engine too, a listing page examines at most 10,000
/// entries: a filter that matches little answers a short page with a
/// cursor, and the next page goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_matches_little_answers_a_short_page_with_a_cursor() {
    let app = TestApp::spawn(Kind::Memory).await;
    send_many(&app, 10_050, hour_long_note()).await;
    let task = send(&app, json!({"signal_type": "task", "source_agent": "hub"})).await;
    let (status, first) = app.get("/v1/signals?type=task&limit=10").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        first["signals"],
        json!([]),
        "10,050 entries, 10,000 examined"
    );
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor: more follow");
    let (_, second) = app
        .get(&format!("/v1/signals?type=task&limit=10&cursor={cursor}"))
        .await;
    assert_eq!(
        ids(second["signals"].as_array().unwrap()),
        vec![task["signal_id"].as_str().unwrap().to_owned()]
    );
    assert_eq!(second["next_cursor"], Value::Null);
}

/// `GET /v1/signals` with a filter that matches little examines up to
/// 10,000 entries per page, in script calls of a thousand: one call doing
/// it all held Redis for a tenth of a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_long_listing_scan_is_split_into_short_calls() {
    // No sweeps (scripts too) while script calls are counted.
    let app = redis_without_sweeps().await;
    send_many(&app, 2_500, hour_long_note()).await;
    let task = send(&app, json!({"signal_type": "task", "source_agent": "hub"})).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let script_calls = |conn: &mut ::redis::Connection| calls_of(conn, "evalsha");
    // Once, so that the script is loaded before calls are counted.
    let (status, _) = app.get("/v1/signals?type=other&limit=1").await;
    assert_eq!(status, 200);
    let before = script_calls(&mut conn);
    let (status, page) = app.get("/v1/signals?type=task&limit=10").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        ids(page["signals"].as_array().unwrap()),
        vec![task["signal_id"].as_str().unwrap().to_owned()]
    );
    assert_eq!(page["next_cursor"], Value::Null, "{page}");
    assert_eq!(script_calls(&mut conn) - before, 3, "2,501 signals");
}

/// On Redis the first read with a filter walks every live broadcast; it
/// does so in script calls of at most a thousand broadcasts, each moving the
/// watermark on and resuming past the targeted signals already walked, so
/// that no call holds Redis for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_long_walk_past_broadcasts_is_split_into_short_calls() {
    // No sweeps (scripts too) while script calls are counted.
    let app = redis_without_sweeps().await;
    // Older than every broadcast: targeted signals that match nothing.
    send_many(
        &app,
        300,
        json!({"signal_type": "note", "source_agent": "hub", "target_agent": "w"}),
    )
    .await;
    send_many(&app, 2_500, hour_long_note()).await;
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);
    let task = send(&app, json!({"signal_type": "task", "source_agent": "hub"})).await;

    let mut conn = app.redis.as_ref().expect("redis").conn();
    let script_calls = |conn: &mut ::redis::Connection| calls_of(conn, "evalsha");
    // Once, so that the script is loaded before calls are counted.
    assert!(inbox(&app, "v", "type=other").await.is_empty());
    let before = (script_calls(&mut conn), calls_of(&mut conn, "hmget"));
    assert_eq!(
        ids(&inbox(&app, "w", "type=task&consume=true").await),
        [task["signal_id"].as_str().unwrap()]
    );
    let calls = script_calls(&mut conn) - before.0;
    assert_eq!(calls, 3, "2,500 broadcasts, then the one it finds");
    // Each signal looked at once: the later calls resume past the
    // targeted signals the first one walked.
    let looked_at = calls_of(&mut conn, "hmget") - before.1;
    assert_eq!(looked_at, 300 + 2_500 + 1);
    // The next read starts past all of them.
    let before = script_calls(&mut conn);
    assert!(inbox(&app, "w", "type=task").await.is_empty());
    assert_eq!(script_calls(&mut conn) - before, 1);
}

/// A page deep in an inbox that only looks starts its broadcasts at its
/// cursor (past the watermark, which stops at a hundred listed matches)
/// instead of walking every broadcast before it in one call: with 100,000
/// of them, that held Redis past its time limit (503 on every replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_deep_page_starts_at_its_cursor() {
    let app = redis_without_sweeps().await;
    send_many(&app, 600, hour_long_note()).await;
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);
    let (mut cursor, mut pages) = (String::new(), Vec::new());
    for _ in 0..5 {
        let (status, body) = app
            .get(&format!("/v1/agents/w/signals?limit=100&cursor={cursor}"))
            .await;
        assert_eq!(status, 200, "{body}");
        pages.push(ids(body["signals"].as_array().unwrap()));
        cursor = body["next_cursor"].as_str().expect("more").to_owned();
    }
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let before = calls_of(&mut conn, "hmget");
    let (_, sixth) = app
        .get(&format!("/v1/agents/w/signals?limit=100&cursor={cursor}"))
        .await;
    let looked_at = calls_of(&mut conn, "hmget") - before;
    assert_eq!(sixth["signals"].as_array().unwrap().len(), 100);
    assert_eq!(
        looked_at, 100,
        "the 500 broadcasts before the cursor walked again"
    );
    let seen: std::collections::HashSet<_> = pages.concat().into_iter().collect();
    assert_eq!(seen.len(), 500);
    assert!(
        ids(sixth["signals"].as_array().unwrap())
            .iter()
            .all(|id| !seen.contains(id))
    );
}

/// On Redis a clear walks the live broadcasts in script calls of at most a
/// thousand too, each moving the watermark on, and answers and logs the
/// count of all of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_long_clear_is_split_into_short_calls() {
    let app = redis_without_sweeps().await;
    let note = json!({"signal_type": "note", "source_agent": "hub", "target_agent": "w"});
    futures_util::future::join_all((0..10).map(|_| send(&app, note.clone()))).await;
    send_many(&app, 2_500, hour_long_note()).await;
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);

    let mut conn = app.redis.as_ref().expect("redis").conn();
    let script_calls = |conn: &mut ::redis::Connection| calls_of(conn, "evalsha");
    // Once, so that the script is loaded before calls are counted.
    let (status, body) = app.delete("/v1/agents/v/signals?type=other").await;
    assert_eq!((status, body["cleared"].as_u64()), (200, Some(0)), "{body}");
    let before = script_calls(&mut conn);
    let (status, body) = app.delete("/v1/agents/w/signals?type=note").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(script_calls(&mut conn) - before, 3, "2,500 broadcasts");
    assert_eq!(body["cleared"], 10 + 2_500);
    let logged = app.events_of("signal.cleared").await;
    let logged: Vec<_> = logged.iter().map(|e| e["agent_id"].clone()).collect();
    assert_eq!(
        logged,
        vec![json!("w")],
        "one event, for the clear that took some"
    );

    assert!(inbox(&app, "w", "type=note").await.is_empty());
    assert_eq!(inbox(&app, "v", "type=note&limit=1000").await.len(), 1000);
    // The next clear starts past all of them.
    let before = script_calls(&mut conn);
    let (_, body) = app.delete("/v1/agents/w/signals?type=note").await;
    assert_eq!(body["cleared"], 0);
    assert_eq!(script_calls(&mut conn) - before, 1);
}

/// A clear takes what was sent up to its moment: on Redis a broadcast
/// stamped later (by a replica whose clock is ahead, or sent while a long
/// clear is under way) stays in the inbox, as a targeted signal sent after
/// the clear's first call does.
#[tokio::test]
async fn redis_a_clear_leaves_broadcasts_sent_after_its_moment() {
    let app = TestApp::spawn(Kind::Redis).await;
    let ahead = app.replica().await;
    ahead.state.clock.advance(Duration::from_secs(60));
    let note = hour_long_note();
    send(&app, note.clone()).await;
    let later = send(&ahead, note).await;
    let (status, body) = app.delete("/v1/agents/w/signals").await;
    assert_eq!((status, body["cleared"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(
        ids(&inbox(&app, "w", "").await),
        [later["signal_id"].as_str().unwrap()]
    );
}

/// On Redis a read that does not consume lists what it found with the
/// agent's watermark, so the next one goes over those and then only what
/// came after, instead of every broadcast after its oldest match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_read_that_does_not_consume_goes_on_from_where_it_stopped() {
    let app = redis_without_sweeps().await;
    let task = || async {
        let task = json!({"signal_type": "task", "source_agent": "hub", "ttl_seconds": 3600});
        send(&app, task).await["signal_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = task().await;
    send_many(&app, 2_000, hour_long_note()).await;
    // The last broadcast walked: listed, and where the walk starts after.
    let last = task().await;
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let looked_at = |conn: &mut ::redis::Connection| calls_of(conn, "hmget");

    // The first read walks them all.
    let both = [first.as_str(), last.as_str()];
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), both);
    let before = looked_at(&mut conn);
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), both);
    assert_eq!(
        looked_at(&mut conn) - before,
        2,
        "the tasks it found before"
    );
    let watermark: String = ::redis::cmd("GET")
        .arg(format!("{{{}}}:settled:w:task:", app.prefix))
        .query(&mut conn)
        .expect("GET");
    let lines: Vec<&str> = watermark.lines().collect();
    assert_eq!(lines.len(), 3, "{watermark}");
    assert!(lines[0].ends_with(&format!(" {last}")), "{watermark}");
    assert!(lines[1].ends_with(&format!(" {first}")), "{watermark}");
    assert_eq!(lines[2], lines[0], "{watermark}");

    // Taken, they are no longer listed.
    let taken = inbox(&app, "w", "type=task&consume=true").await;
    assert_eq!(ids(&taken), both);
    let before = looked_at(&mut conn);
    assert!(inbox(&app, "w", "type=task").await.is_empty());
    assert_eq!(looked_at(&mut conn) - before, 0);
}

/// A first read that does not consume is split into short calls too, also
/// after it found something: what it found is listed with the watermark
/// (or, targeted, before where the next call resumes) and found again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_long_first_read_that_does_not_consume_is_split_too() {
    let app = redis_without_sweeps().await;
    let task = |target: Option<&str>| {
        let mut body = json!({"signal_type": "task", "source_agent": "hub", "ttl_seconds": 3600});
        if let Some(target) = target {
            body["target_agent"] = json!(target);
        }
        let app = &app;
        async move {
            send(app, body).await["signal_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let mut found = vec![task(Some("w")).await, task(None).await];
    send_many(&app, 2_500, hour_long_note()).await;
    found.push(task(Some("w")).await);
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);
    let mut conn = app.redis.as_ref().expect("redis").conn();
    // Once, so that the script is loaded before calls are counted.
    assert!(inbox(&app, "v", "type=other").await.is_empty());
    let before = calls_of(&mut conn, "evalsha");
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), found);
    assert_eq!(
        calls_of(&mut conn, "evalsha") - before,
        3,
        "2,501 broadcasts"
    );
    let before = calls_of(&mut conn, "evalsha");
    assert_eq!(ids(&inbox(&app, "w", "type=task").await), found);
    assert_eq!(calls_of(&mut conn, "evalsha") - before, 1);
}

/// On Redis an inbox read walks only the broadcasts after the agent's
/// watermark, which covers what the agent has settled up to ten seconds
/// (and the Redis timeout) before now: with the per-broadcast consumption
/// markers gone, what it covers still stays consumed. Each pair of
/// filters has its own, which also passes what it does not match. A
/// watermark that does not parse is passed over.
#[tokio::test]
async fn redis_an_inbox_read_starts_after_what_the_agent_has_settled() {
    let app = TestApp::spawn(Kind::Redis).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let signal = send(
            &app,
            json!({"signal_type": "note", "source_agent": "hub", "payload": {"i": i}, "ttl_seconds": 3600}),
        )
        .await;
        sent.push(signal["signal_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids(&inbox(&app, "w", "consume=true").await), sent);
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let seen_key = format!("{{{}}}:settled:w", app.prefix);
    let seen = |conn: &mut ::redis::Connection| -> Option<String> {
        ::redis::cmd("GET").arg(&seen_key).query(conn).expect("GET")
    };
    assert_eq!(seen(&mut conn), None, "nothing is ten seconds old yet");

    // Ten seconds and the Redis timeout later.
    app.state.clock.advance(PAST_THE_SEEN_MARGIN);
    assert!(inbox(&app, "w", "consume=true").await.is_empty());
    let mark = seen(&mut conn).expect("a watermark");
    assert!(mark.ends_with(&format!(" {}", sent[4])), "{mark}");
    // A filtered read has its own, past the broadcasts it does not match.
    assert!(inbox(&app, "w", "type=task&source=hub").await.is_empty());
    let filtered: String = ::redis::cmd("GET")
        .arg(format!("{{{}}}:settled:w:task:hub", app.prefix))
        .query(&mut conn)
        .expect("GET");
    assert!(filtered.ends_with(&format!(" {}", sent[4])), "{filtered}");
    let markers: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{{{}}}:signal:*:consumed", app.prefix))
        .query(&mut conn)
        .expect("KEYS");
    assert_eq!(markers.len(), 5, "{markers:?}");
    let _: () = ::redis::cmd("DEL")
        .arg(&markers)
        .query(&mut conn)
        .expect("DEL");
    assert!(inbox(&app, "w", "").await.is_empty());
    // Another agent has no watermark: every broadcast is its to read.
    assert_eq!(ids(&inbox(&app, "v", "").await), sent);

    // A watermark this service did not write is passed over: the walk
    // starts at the first broadcast.
    let mut entry = |i: usize| -> String {
        let score: String = ::redis::cmd("ZSCORE")
            .arg(format!("{{{}}}:signals:broadcast", app.prefix))
            .arg(&sent[i])
            .query(&mut conn)
            .expect("ZSCORE");
        format!("{score} {}", sent[i])
    };
    let (first, middle, last) = (entry(0), entry(2), entry(4));
    let mut bad: Vec<String> = [
        "nan x",
        "inf x",
        "0x10 x",
        "99999999999999999 x",
        "12",
        "-5 x",
    ]
    .map(String::from)
    .to_vec();
    // Listed broadcasts after the start, or out of order.
    bad.push(format!("{first}\n{last}"));
    bad.push(format!("{last}\n{middle}\n{first}"));
    bad.push(format!("{last}\n{first}\nnan x"));
    for bad in bad {
        let _: () = ::redis::cmd("SET")
            .arg(format!("{{{}}}:settled:u", app.prefix))
            .arg(&bad)
            .query(&mut conn)
            .expect("SET");
        assert_eq!(ids(&inbox(&app, "u", "").await), sent, "{bad}");
    }
}

/// The kept answer lives ten minutes: on Redis, by the key's own expiry.
#[tokio::test]
async fn redis_a_kept_answer_expires_after_ten_minutes() {
    let app = TestApp::spawn(Kind::Redis).await;
    send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
    )
    .await;
    take(&app, "worker", "read-1", "").await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let receipts: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{{{}}}:receipt:worker:*", app.prefix))
        .query(&mut conn)
        .expect("KEYS");
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert!(
        !receipts[0].contains("read-1"),
        "the client's key is hashed"
    );
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&receipts[0])
        .query(&mut conn)
        .expect("PTTL");
    assert!((590_000..=600_000).contains(&ttl), "PTTL {ttl}");
}

/// On the memory engine, by the service's clock.
#[tokio::test]
async fn memory_a_kept_answer_expires_after_ten_minutes() {
    let app = TestApp::spawn(Kind::Memory).await;
    let send_task = || {
        send(
            &app,
            json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker",
                   "ttl_seconds": 3600}),
        )
    };
    let first = send_task().await;
    let (_, answer) = take(&app, "worker", "read-1", "").await;
    assert_eq!(taken_ids(&answer), [first["signal_id"].as_str().unwrap()]);
    let second = send_task().await;
    app.state.clock.advance(Duration::from_secs(599));
    let (_, again) = take(&app, "worker", "read-1", "").await;
    assert_eq!(again, answer);
    app.state.clock.advance(Duration::from_secs(2));
    let (_, fresh) = take(&app, "worker", "read-1", "").await;
    assert_eq!(taken_ids(&fresh), [second["signal_id"].as_str().unwrap()]);
}

/// A kept answer the service cannot read (not written by it) is dropped,
/// and the read goes on as a new one instead of failing until it expires.
#[tokio::test]
async fn redis_an_unreadable_kept_answer_is_dropped() {
    use sha2::Digest;
    let app = TestApp::spawn(Kind::Redis).await;
    let task = send(
        &app,
        json!({"signal_type": "task", "source_agent": "boss", "target_agent": "worker"}),
    )
    .await;
    let digest = hex::encode(sha2::Sha256::digest(b"read-1"));
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let _: () = ::redis::cmd("SET")
        .arg(format!("{{{}}}:receipt:worker:{digest}", app.prefix))
        .arg("no newline here")
        .query(&mut conn)
        .expect("SET");
    let (status, answer) = take(&app, "worker", "read-1", "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(taken_ids(&answer), [task["signal_id"].as_str().unwrap()]);
    let (_, again) = take(&app, "worker", "read-1", "").await;
    assert_eq!(again, answer, "kept anew");
}

/// The Redis engine answers inbox reads and clears as the memory engine
/// does, whatever came before them. A memory app and a Redis app go side by
/// side through the same random sends (targeted and broadcast, short and
/// long TTLs), reads (filtered, limited, consuming or not, some with an
/// `Idempotency-Key`, some retried), clears and clock moves, and every
/// answer must be the same on both: the status, the count of a clear, and
/// the signals in order by payload, type, source and target (ids and
/// timestamps differ between the apps).
///
/// On Redis what an inbox holds of the broadcasts is settled by the agent's
/// watermark for the read's filters (ten seconds behind the clock, listing
/// the matches that reads which do not consume left), and long walks are
/// split into calls that go on where the last one stopped: none of that may
/// change an answer. The memory engine has none of it, so it is the
/// reference. (A walk splits only past a thousand live broadcasts, and a
/// watermark lists at most a hundred: these runs stay below both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_inboxes_answer_as_the_memory_engines_do() {
    for seed in TWIN_SEEDS {
        let mut twins = Twins::spawn().await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut last_keyed = None;
        let mut found = 0;
        for step in 0..TWIN_STEPS {
            twins.pass_close_expiries();
            let op = random_op(&mut rng, step, last_keyed.as_ref());
            if let Op::Advance(by) = op {
                twins.advance(by.min(MOST_ADVANCED.saturating_sub(twins.advanced)));
                continue;
            }
            let [memory, redis] = twins.apply(&op).await;
            let answer = comparable(&memory);
            assert_eq!(
                answer,
                comparable(&redis),
                "seed {seed}, step {step}: {op:?} (left: memory, right: Redis)"
            );
            match &op {
                Op::Send { .. } if memory.0 == 201 => {
                    twins
                        .expiries
                        .push([expires_ms(&memory.1), expires_ms(&redis.1)]);
                }
                Op::Read { key: Some(_), .. } => last_keyed = Some(op.clone()),
                _ => {}
            }
            if matches!(&op, Op::Read { .. }) && answer.1.as_array().is_some_and(|a| !a.is_empty())
            {
                found += 1;
            }
        }
        assert!(
            found >= TWIN_STEPS / 10,
            "seed {seed}: only {found} reads found anything"
        );
    }
}

/// Seeds and steps of the engine comparison.
const TWIN_SEEDS: [u64; 3] = [1, 2, 3];
const TWIN_STEPS: usize = 300;

/// What the engine comparison's operations draw from.
const AGENTS: [&str; 3] = ["w-1", "w-2", "w-3"];
const TYPES: [&str; 3] = ["task", "note", "abort"];
const SOURCES: [&str; 2] = ["hub", "lead"];
const TTLS: [u64; 5] = [5, 10, 20, 30, 3600];

/// How close to its expiry a signal is moved past it before an operation
/// (see [`Twins::pass_close_expiries`]).
const EXPIRY_GUARD: Duration = Duration::from_secs(1);

/// The most both clocks move in one run: less than the ten minutes a kept
/// answer lives, which Redis counts on its own clock, not the service's.
const MOST_ADVANCED: Duration = Duration::from_secs(540);

/// One operation of the engine comparison, applied to both apps.
#[derive(Debug, Clone)]
enum Op {
    /// `POST` a signal to `path`: `/v1/signals` (targeted) or
    /// `/v1/signals/broadcast`.
    Send { path: &'static str, body: Value },
    /// `GET` an inbox with `query`, with an `Idempotency-Key` or not.
    Read {
        agent: &'static str,
        query: String,
        key: Option<String>,
    },
    /// `DELETE` an inbox with `query`.
    Clear { agent: &'static str, query: String },
    /// Moves both clocks on.
    Advance(Duration),
}

fn pick<T: Copy>(rng: &mut StdRng, set: &[T]) -> T {
    *set.choose(rng).expect("a non-empty set")
}

/// A random operation; `n` (the step) marks a sent signal and keys a
/// read, and `last_keyed` is the last read with a key, which a retry
/// repeats (now and then with another query: a 422).
fn random_op(rng: &mut StdRng, n: usize, last_keyed: Option<&Op>) -> Op {
    match rng.random_range(0..100) {
        0..45 => random_send(rng, n),
        45..80 => random_read(rng, n),
        80..85 => match (last_keyed, random_read(rng, n)) {
            (Some(Op::Read { agent, key, .. }), Op::Read { query, .. })
                if rng.random_ratio(1, 4) =>
            {
                let (agent, key) = (*agent, key.clone());
                Op::Read { agent, query, key }
            }
            (Some(last), _) => last.clone(),
            (None, read) => read,
        },
        85..91 => {
            let agent = pick(rng, &AGENTS);
            let query = random_filters(rng, false).join("&");
            Op::Clear { agent, query }
        }
        _ => Op::Advance(Duration::from_secs(rng.random_range(1..=15))),
    }
}

fn random_send(rng: &mut StdRng, n: usize) -> Op {
    let mut body = json!({
        "signal_type": pick(rng, &TYPES),
        "source_agent": pick(rng, &SOURCES),
        "ttl_seconds": pick(rng, &TTLS),
        "payload": {"n": n},
    });
    let path = if rng.random_bool(0.5) {
        "/v1/signals/broadcast"
    } else {
        body["target_agent"] = json!(pick(rng, &AGENTS));
        "/v1/signals"
    };
    Op::Send { path, body }
}

fn random_read(rng: &mut StdRng, n: usize) -> Op {
    let agent = pick(rng, &AGENTS);
    let mut query = random_filters(rng, true);
    let limit = rng.random_range(0..=5);
    if limit > 0 {
        query.push(format!("limit={limit}"));
    }
    let consume = rng.random_bool(0.5);
    query.push(format!("consume={consume}"));
    let key = (consume && rng.random_ratio(1, 3)).then(|| format!("read-{n}"));
    let query = query.join("&");
    Op::Read { agent, query, key }
}

/// None, a `type`, a `source` (if `with_source`) or both.
fn random_filters(rng: &mut StdRng, with_source: bool) -> Vec<String> {
    let mut query = Vec::new();
    if rng.random_bool(0.5) {
        query.push(format!("type={}", pick(rng, &TYPES)));
    }
    if with_source && rng.random_bool(0.5) {
        query.push(format!("source={}", pick(rng, &SOURCES)));
    }
    query
}

/// A memory app and a Redis app, driven in step.
struct Twins {
    /// The memory app, then the Redis app.
    apps: [TestApp; 2],
    /// The expiry (ms) of every signal sent, on each app.
    expiries: Vec<[i64; 2]>,
    /// How far both clocks have been moved.
    advanced: Duration,
}

impl Twins {
    async fn spawn() -> Self {
        Self {
            apps: [
                TestApp::spawn(Kind::Memory).await,
                TestApp::spawn(Kind::Redis).await,
            ],
            expiries: Vec::new(),
            advanced: Duration::ZERO,
        }
    }

    fn advance(&mut self, by: Duration) {
        for app in &self.apps {
            app.state.clock.advance(by);
        }
        self.advanced += by;
    }

    /// Moves both clocks past every expiry due within [`EXPIRY_GUARD`] on
    /// either app. The clocks run on real time and the apps answer a few
    /// milliseconds apart: without this, a signal could expire between the
    /// two answers.
    fn pass_close_expiries(&mut self) {
        let guard = EXPIRY_GUARD.as_millis() as i64;
        loop {
            let now = self.apps.each_ref().map(|app| app.state.clock.now_ms());
            let closest = self
                .expiries
                .iter()
                .flat_map(|e| [e[0] - now[0], e[1] - now[1]])
                .filter(|left| (1..=guard).contains(left))
                .max();
            let Some(left) = closest else {
                self.expiries.retain(|e| e[0] > now[0] || e[1] > now[1]);
                return;
            };
            self.advance(Duration::from_millis(left as u64 + 1));
        }
    }

    /// Applies `op` to the memory app, then to the Redis app.
    async fn apply(&self, op: &Op) -> [(u16, Value); 2] {
        let [memory, redis] = &self.apps;
        [request(memory, op).await, request(redis, op).await]
    }
}

/// The request of `op` (not a clock move) and its answer.
async fn request(app: &TestApp, op: &Op) -> (u16, Value) {
    match op {
        Op::Send { path, body } => app.post(path, body.clone()).await,
        Op::Read { agent, query, key } => {
            let path = format!("/v1/agents/{agent}/signals?{query}");
            let mut req = app.client.get(app.url(&path));
            if let Some(key) = key {
                req = req.header("Idempotency-Key", key);
            }
            let resp = req.send().await.expect("inbox read");
            let status = resp.status().as_u16();
            (status, resp.json().await.expect("a JSON answer"))
        }
        Op::Clear { agent, query } => {
            app.delete(&format!("/v1/agents/{agent}/signals?{query}"))
                .await
        }
        Op::Advance(_) => unreachable!("a clock move is no request"),
    }
}

/// What the two apps' answers must agree on: the status and, for signals,
/// `[payload n, type, source, target]` (in order, for an inbox), for a
/// clear its count, for a problem the field it names.
fn comparable((status, body): &(u16, Value)) -> (u16, Value) {
    let signal = |s: &Value| {
        json!([
            s["payload"]["n"],
            s["signal_type"],
            s["source_agent"],
            s["target_agent"]
        ])
    };
    let answer = if let Some(signals) = body["signals"].as_array() {
        signals.iter().map(signal).collect()
    } else if body.get("signal_id").is_some() {
        signal(body)
    } else if let Some(cleared) = body.get("cleared") {
        cleared.clone()
    } else {
        json!(problem_field(body))
    };
    (*status, answer)
}

/// The `expires_at` of a sent signal, in ms.
fn expires_ms(signal: &Value) -> i64 {
    let at = signal["expires_at"].as_str().expect("expires_at");
    chrono::DateTime::parse_from_rfc3339(at)
        .expect("RFC 3339")
        .timestamp_millis()
}
