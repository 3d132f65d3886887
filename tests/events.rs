//! The event log and live streams, on both engines.

mod common;

use std::time::Duration;

use common::{Kind, Options, TestApp, TestKeys, eventually};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, query: &str) -> Socket {
    let (socket, _) =
        tokio_tungstenite::connect_async(app.ws_url(&format!("/v1/events/ws{query}")))
            .await
            .expect("websocket connects");
    socket
}

/// The next JSON text frame, skipping pings.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return None,
            Ok(Some(Ok(other))) => panic!("unexpected frame {other:?}"),
            Ok(Some(Err(e))) => panic!("socket error {e}"),
            Err(_) => panic!("no frame within 10 s"),
        }
    }
}

async fn publish(app: &TestApp, kind: &str, n: usize) -> String {
    let (status, body) = app
        .post("/v1/events", json!({"type": kind, "data": {"n": n}}))
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Ids of the log's entries of type `kind`: `XRANGE` on Redis, history on memory.
async fn log_ids(app: &TestApp, kind: &str) -> Vec<String> {
    match &app.redis {
        Some(redis) => {
            let mut conn = redis.conn();
            let entries: Vec<(String, Vec<(String, String)>)> = ::redis::cmd("XRANGE")
                .arg(format!("{{{}}}:events", app.prefix))
                .arg("-")
                .arg("+")
                .query(&mut conn)
                .unwrap();
            entries
                .into_iter()
                .filter(|(_, fields)| fields.iter().any(|(k, v)| k == "t" && v == kind))
                .map(|(id, _)| id)
                .collect()
        }
        None => app
            .events_of(kind)
            .await
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect(),
    }
}

async fn a_subscriber_that_reconnects_with_since_gets_every_event_exactly_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut socket = connect(&app, "?types=test.burst").await;
    let publisher = {
        let client = app.client.clone();
        let url = app.url("/v1/events");
        tokio::spawn(async move {
            for n in 0..1000 {
                let resp = client
                    .post(&url)
                    .json(&json!({"type": "test.burst", "data": {"n": n}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
            }
        })
    };
    let mut received = Vec::new();
    while received.len() < 300 {
        let frame = next_json(&mut socket).await.expect("frame");
        received.push(frame["id"].as_str().unwrap().to_owned());
    }
    drop(socket);
    let last = received.last().unwrap().clone();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut socket = connect(&app, &format!("?types=test.burst&since={last}")).await;
    while received.len() < 1000 {
        let frame = next_json(&mut socket).await.expect("frame");
        received.push(frame["id"].as_str().unwrap().to_owned());
    }
    publisher.await.unwrap();
    assert_eq!(received, log_ids(&app, "test.burst").await);
    // Nothing more arrives: no duplicates after the last one.
    publish(&app, "test.marker", 0).await;
    let mut socket = connect(&app, &format!("?since={}", received.last().unwrap())).await;
    let next = next_json(&mut socket).await.unwrap();
    assert_eq!(next["type"], "test.marker");
}

async fn a_stream_filters_by_type_prefix_and_agent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut by_type = connect(&app, "?since=0&types=workflow.*,agent.error").await;
    let mut by_agent = connect(&app, "?since=0&agent_id=a-1").await;
    app.post("/v1/agents/a-1/heartbeats", json!({})).await;
    app.post("/v1/agents/a-2/heartbeats", json!({})).await;
    app.post(
        "/v1/events",
        json!({"type": "workflow.progress", "data": {}, "agent_id": "a-2"}),
    )
    .await;
    app.post("/v1/events", json!({"type": "workflows", "data": {}}))
        .await;
    app.post(
        "/v1/events",
        json!({"type": "agent.error", "data": {"e": 1}, "agent_id": "a-1"}),
    )
    .await;
    let t1 = next_json(&mut by_type).await.unwrap();
    let t2 = next_json(&mut by_type).await.unwrap();
    assert_eq!(
        (t1["type"].clone(), t2["type"].clone()),
        (json!("workflow.progress"), json!("agent.error"))
    );
    let mut agent_types = Vec::new();
    for _ in 0..3 {
        let e = next_json(&mut by_agent).await.unwrap();
        assert_eq!(e["agent_id"], "a-1");
        agent_types.push(e["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        agent_types,
        vec!["agent.started", "agent.heartbeat", "agent.error"]
    );
    let (_, history) = app.get("/v1/events?types=agent.*&agent_id=a-2").await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["agent.started", "agent.heartbeat"]);
}

async fn a_trimmed_cursor_starts_with_a_stream_reset(kind: Kind) {
    let app = TestApp::spawn_with(Options::new(kind).configure(|c| c.stream_max_len = 10)).await;
    let first = publish(&app, "test.old", 0).await;
    for n in 1..40 {
        publish(&app, "test.old", n).await;
    }
    let mut socket = connect(&app, &format!("?since={first}")).await;
    let reset = next_json(&mut socket).await.unwrap();
    assert_eq!(reset["type"], "stream.reset");
    let oldest = reset["oldest_id"].as_str().expect("oldest id").to_owned();
    let next = next_json(&mut socket).await.unwrap();
    assert_eq!(next["id"], oldest, "replay continues from the oldest entry");
    // A cursor that was not trimmed gets no reset.
    let mut fine = connect(&app, &format!("?since={oldest}")).await;
    assert_ne!(next_json(&mut fine).await.unwrap()["type"], "stream.reset");
}

/// Trimming goes on while subscribers connect: a reset's `oldest_id` is
/// the event that comes next, never one trimmed between the look at the
/// log and the replay.
async fn a_reset_names_the_event_that_comes_next_while_the_log_is_trimmed(kind: Kind) {
    let app = TestApp::spawn_with(Options::new(kind).configure(|c| c.stream_max_len = 10)).await;
    let first = publish(&app, "test.race", 0).await;
    let engine = app.state.engine.clone();
    // Stopped when dropped, a failed assertion included.
    let _writer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        for n in 1.. {
            let body = attune_telemetry::events::EventBody::new(
                "test.race",
                "test",
                None,
                chrono::Utc::now(),
                json!({ "n": n }),
            );
            engine.publish(body).await.expect("appended");
            // The memory engine appends without waiting: let others run.
            tokio::task::yield_now().await;
        }
    }));
    for _ in 0..40 {
        let mut socket = connect(&app, &format!("?since={first}")).await;
        let reset = next_json(&mut socket).await.unwrap();
        assert_eq!(reset["type"], "stream.reset", "{reset}");
        let next = next_json(&mut socket).await.unwrap();
        assert_eq!(next["id"], reset["oldest_id"], "{reset} then {next}");
    }
}

/// Trimming that passes `since` after the subscription looked at the log
/// but before it read is told as well: a reset, never a silent gap.
async fn trimming_between_the_subscription_and_its_first_read_is_a_reset(kind: Kind) {
    use attune_telemetry::events::StreamId;
    use attune_telemetry::events::live::{Frame, Subscription};
    let app = TestApp::spawn_with(Options::new(kind).configure(|c| c.stream_max_len = 10)).await;
    let since: StreamId = publish(&app, "test.gap", 0).await.parse().unwrap();
    let mut subscription = Subscription::start(&app.state, Some(since), Default::default())
        .await
        .unwrap();
    for n in 1..40 {
        publish(&app, "test.gap", n).await;
    }
    let Ok(Frame::Reset { oldest }) = subscription.next().await else {
        panic!("no reset before the replay");
    };
    let Ok(Frame::Event(next)) = subscription.next().await else {
        panic!("no replay after the reset");
    };
    assert_eq!(oldest, Some(next.id));
    let envelope: Value = serde_json::from_str(next.json.as_str()).unwrap();
    assert_eq!(envelope["data"], json!({"n": 30}), "the oldest left");
}

/// A short log is trimmed to its length exactly, beats' events included
/// (Redis's approximate trimming would keep a whole node of them).
async fn the_log_holds_at_most_its_maximum_length(kind: Kind) {
    let app = TestApp::spawn_with(Options::new(kind).configure(|c| c.stream_max_len = 5)).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(publish(&app, "test.trim", n).await);
    }
    assert_eq!(log_ids(&app, "test.trim").await, ids[25..]);
    for _ in 0..20 {
        let (status, _) = app
            .post("/v1/agents/trim/heartbeats", json!({"ttl_seconds": 60}))
            .await;
        assert_eq!(status, 200);
    }
    let (_, page) = app.get("/v1/events?limit=1000").await;
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len(), 5, "{page}");
    assert!(
        events.iter().all(|e| e["type"] == "agent.heartbeat"),
        "{page}"
    );
}

/// An id ahead of the log and of the clock (no event has it): taken as it
/// is, every event until the clock got there would count as already sent.
/// It comes from another log, so all of this one is news: a reset naming
/// the oldest event, then everything from it.
async fn a_since_ahead_of_the_log_is_a_reset_then_the_whole_log(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let oldest = publish(&app, "test.ahead", 0).await;
    let ahead = "99999999999999-0";
    let mut socket = connect(&app, &format!("?types=test.ahead&since={ahead}")).await;
    let reset = next_json(&mut socket).await.unwrap();
    assert_eq!(reset["type"], "stream.reset", "{reset}");
    assert_eq!(reset["oldest_id"], oldest, "{reset}");
    let replayed = next_json(&mut socket).await.unwrap();
    assert_eq!(replayed["id"], oldest, "replay starts at the oldest event");
    let sent = publish(&app, "test.ahead", 1).await;
    let next = next_json(&mut socket).await.unwrap();
    assert_eq!(next["id"], sent, "then the stream goes live");

    let resp = app
        .client
        .get(app.url("/v1/events/sse?types=test.ahead"))
        .header("Last-Event-ID", ahead)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent_too = publish(&app, "test.ahead", 2).await;
    assert_eq!(
        read_sse_ids(resp, 3).await,
        vec![oldest, sent, sent_too.clone()]
    );

    // The newest id itself is a place in the log: no reset.
    let mut fine = connect(&app, &format!("?types=test.ahead&since={sent_too}")).await;
    let later = publish(&app, "test.ahead", 3).await;
    let first = next_json(&mut fine).await.unwrap();
    assert_eq!(first["id"], later, "{first}");
}

async fn a_malformed_since_is_a_422(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for path in [
        "/v1/events?since=yesterday",
        "/v1/events/ws?since=1-2-3",
        "/v1/events/sse?since=x",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["errors"][0]["field"], "since");
    }
}

/// Event ids have at most 19 digits a part (Redis's milliseconds have 13):
/// the largest is an empty page, a longer one is not an event id.
async fn the_largest_possible_since_is_an_empty_page(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    publish(&app, "test.max", 1).await;
    let max = "9999999999999999999-9999999999999999999";
    let (status, body) = app.get(&format!("/v1/events?since={max}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "{body}");
    let beyond = "18446744073709551615-0";
    let (status, body) = app.get(&format!("/v1/events?since={beyond}")).await;
    assert_eq!(
        (status, &body["errors"][0]["field"]),
        (422, &json!("since"))
    );
}

async fn sse_blames_the_parameter_that_is_wrong(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let problem = |last_event_id: &'static [u8], query: &'static str| {
        let app = &app;
        async move {
            let last_event_id = reqwest::header::HeaderValue::from_bytes(last_event_id).unwrap();
            let resp = app
                .client
                .get(app.url(&format!("/v1/events/sse{query}")))
                .header("Last-Event-ID", last_event_id)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, body["errors"][0]["field"].clone())
        }
    };
    assert_eq!(
        problem(b"1-0", "?agent_id=a:b").await,
        (422, json!("agent_id"))
    );
    assert_eq!(
        problem(b"1-0", "?types=Bad%20Type").await,
        (422, json!("types"))
    );
    assert_eq!(problem(b"x-y", "").await, (422, json!("Last-Event-ID")));
    // Not text at all: refused, not passed over as if absent.
    assert_eq!(problem(b"1-\xff", "").await, (422, json!("Last-Event-ID")));
}

async fn a_history_cursor_is_blamed_by_name_and_an_empty_one_is_absent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let first = publish(&app, "test.cursor", 0).await;
    let newest = publish(&app, "test.cursor", 1).await;
    let (status, body) = app.get("/v1/events?cursor=abc").await;
    assert_eq!(
        (status, &body["errors"][0]["field"]),
        (422, &json!("cursor"))
    );
    let (status, body) = app.get("/v1/events?since=abc").await;
    assert_eq!(
        (status, &body["errors"][0]["field"]),
        (422, &json!("since"))
    );
    let (status, body) = app
        .get(&format!(
            "/v1/events?types=test.cursor&since={first}&cursor="
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![newest.as_str()], "`since` still applies");
}

async fn custom_events_are_validated_and_reserved_types_refused(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, _) = app
        .post("/v1/events", json!({"type": "Bad Type", "data": {}}))
        .await;
    assert_eq!(status, 422);
    let (status, body) = app
        .post(
            "/v1/events",
            json!({"type": "approval.decided", "data": {}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = app
        .post(
            "/v1/events",
            json!({"type": "agent.error", "data": {"msg": "oops"}}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .post("/v1/events", json!({"type": "x.y", "data": [1]}))
        .await;
    assert_eq!(status, 422);
}

async fn sse_sends_id_lines_and_resumes_from_last_event_id(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let ids: Vec<String> = futures_util::future::join_all((0..5).map(|n| {
        let app = &app;
        async move { publish(app, "test.sse", n).await }
    }))
    .await;
    let mut ids = ids;
    ids.sort_by_key(|id| id.parse::<StreamIdKey>().unwrap());
    let resp = app
        .client
        .get(app.url("/v1/events/sse?since=0&types=test.sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let got = read_sse_ids(resp, 5).await;
    assert_eq!(got, ids);
    let resp = app
        .client
        .get(app.url("/v1/events/sse?types=test.sse"))
        .header("Last-Event-ID", &ids[2])
        .send()
        .await
        .unwrap();
    assert_eq!(read_sse_ids(resp, 2).await, ids[3..].to_vec());
}

/// Sortable form of an event id.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct StreamIdKey(u64, u64);

impl std::str::FromStr for StreamIdKey {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (a, b) = s.split_once('-').ok_or(())?;
        Ok(Self(a.parse().map_err(|_| ())?, b.parse().map_err(|_| ())?))
    }
}

async fn read_sse_ids(resp: reqwest::Response, n: usize) -> Vec<String> {
    let mut stream = resp.bytes_stream();
    let mut buffer = String::new();
    let mut ids = Vec::new();
    while ids.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("sse data within 10 s")
            .expect("stream open")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let id = block
                .lines()
                .find_map(|l| l.strip_prefix("id:"))
                .map(|s| s.trim().to_owned());
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map(|s| s.trim().to_owned());
            if let (Some(id), Some(data)) = (id, data) {
                let v: Value = serde_json::from_str(&data).unwrap();
                assert_eq!(v["id"], id.as_str(), "id line matches the envelope");
                ids.push(id);
            }
        }
    }
    ids
}

async fn sse_streams_end_with_stream_closed_on_shutdown(kind: Kind) {
    let mut app = TestApp::spawn(kind).await;
    let resp = app
        .client
        .get(app.url("/v1/events/sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), resp.text())
            .await
            .expect("the stream ends within 5 s")
            .unwrap()
    });
    let sent = publish(&app, "test.closing", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.stop().await;
    let text = body.await.unwrap();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let field = |name: &str| {
        last.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("event:"), "error", "{text}");
    assert!(text.contains(&format!("id: {sent}")), "{text}");
    // Where to resume: after the last event it received.
    assert_eq!(
        serde_json::from_str::<Value>(&field("data:")).unwrap(),
        json!({"type": "stream.closed", "resume_from": sent})
    );
}

async fn websockets_close_with_going_away_on_shutdown(kind: Kind) {
    let mut app = TestApp::spawn(kind).await;
    let mut socket = connect(&app, "").await;
    let sent = publish(&app, "test.closing", 0).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["id"], sent.as_str());
    app.stop().await;
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("close within 5 s");
    match frame {
        Some(Ok(Message::Close(Some(close)))) => {
            assert_eq!(u16::from(close.code), 1001);
            assert!(
                close.reason.ends_with(&format!("since={sent}")),
                "{}",
                close.reason
            );
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// The process ends when serving ends: that must wait until every
/// WebSocket has been sent its close frame (within the grace period), here
/// one whose writer is still holding a frame back for its write interval.
async fn serving_ends_after_websockets_are_closed(kind: Kind) {
    let mut app = TestApp::spawn_with(Options::new(kind).configure(|c| {
        c.ws_write_interval = Duration::from_secs(2);
        c.shutdown_grace = Duration::from_secs(8);
    }))
    .await;
    let mut socket = connect(&app, "?types=test.*").await;
    // The first goes out at once; the second waits for the interval.
    let first = publish(&app, "test.first", 0).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["id"], first.as_str());
    let second = publish(&app, "test.second", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let serving = app.begin_stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !serving.is_finished(),
        "serving ended while a WebSocket had frames and its close to send"
    );
    assert_eq!(next_json(&mut socket).await.unwrap()["id"], second.as_str());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(close)))) => break close,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1001, "{}", close.reason);
    assert!(
        close.reason.ends_with(&format!("since={second}")),
        "{}",
        close.reason
    );
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serving ends once the socket closed")
        .unwrap()
        .unwrap();
}

/// A long-poll for a signal to `agent`, answered within `bound` of the send.
async fn waiter_is_woken_within(app: &TestApp, agent: &str, bound: Duration) {
    let url = app.url(&format!("/v1/agents/{agent}/signals?wait_seconds=10"));
    let client = app.client.clone();
    let waiter = tokio::spawn(async move {
        let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        (
            body["signals"].as_array().map_or(0, Vec::len),
            std::time::Instant::now(),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_at = std::time::Instant::now();
    let (status, body) = app
        .post(
            "/v1/signals",
            json!({"signal_type": "go", "source_agent": "boss", "target_agent": agent}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (n, answered_at) = waiter.await.unwrap();
    assert_eq!(n, 1);
    let took = answered_at.duration_since(sent_at);
    assert!(took < bound, "waiter answered {took:?} after the send");
}

/// While nobody subscribes the Redis tailer reads only wake-ups; a client
/// that joins gets exactly what follows, and waiters wake promptly before,
/// while and after anyone watches.
async fn a_subscriber_joining_a_busy_log_gets_only_what_follows(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    waiter_is_woken_within(&app, "w1", Duration::from_secs(1)).await;
    // Events after the last wake-up, read by nobody.
    for n in 0..30 {
        publish(&app, "test.before", n).await;
    }

    let mut socket = connect(&app, "").await;
    let after = publish(&app, "test.after", 0).await;
    let first = next_json(&mut socket).await.expect("an event");
    assert_eq!(
        (first["type"].as_str(), first["id"].as_str()),
        (Some("test.after"), Some(after.as_str()))
    );
    waiter_is_woken_within(&app, "w2", Duration::from_secs(1)).await;
    let woken = next_json(&mut socket).await.expect("the signal event");
    assert_eq!(woken["type"], "signal.sent");

    drop(socket);
    // The tailer notices at its next read.
    publish(&app, "test.alone", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    waiter_is_woken_within(&app, "w3", Duration::from_secs(1)).await;
    let mut again = connect(&app, "").await;
    let last = publish(&app, "test.again", 0).await;
    let first = next_json(&mut again).await.expect("an event");
    assert_eq!(first["id"].as_str(), Some(last.as_str()));
}

async fn history_pages_are_envelopes_as_streams_send_them(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut socket = connect(&app, "?types=test.page").await;
    for n in 0..3 {
        publish(&app, "test.page", n).await;
    }
    let resp = app
        .client
        .get(app.url("/v1/events?types=test.page&limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let first: Value = resp.json().await.unwrap();
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor: more follow");
    let (_, rest) = app
        .get(&format!("/v1/events?types=test.page&since={cursor}"))
        .await;
    assert_eq!(rest["next_cursor"], Value::Null, "{rest}");
    let page: Vec<Value> = [&first, &rest]
        .iter()
        .flat_map(|p| p["events"].as_array().unwrap().clone())
        .collect();
    assert_eq!(page.len(), 3);
    for (n, event) in page.iter().enumerate() {
        // Every field of the documented envelope, and the very event the
        // live stream delivered.
        serde_json::from_value::<attune_telemetry::events::EventEnvelope>(event.clone())
            .expect("an envelope");
        assert_eq!(event["data"], json!({"n": n}));
        assert_eq!(Some(event.clone()), next_json(&mut socket).await);
    }
}

conformance!(
    history_pages_are_envelopes_as_streams_send_them,
    a_subscriber_joining_a_busy_log_gets_only_what_follows,
    a_subscriber_that_reconnects_with_since_gets_every_event_exactly_once,
    a_stream_filters_by_type_prefix_and_agent,
    a_trimmed_cursor_starts_with_a_stream_reset,
    a_reset_names_the_event_that_comes_next_while_the_log_is_trimmed,
    trimming_between_the_subscription_and_its_first_read_is_a_reset,
    the_log_holds_at_most_its_maximum_length,
    a_since_ahead_of_the_log_is_a_reset_then_the_whole_log,
    a_malformed_since_is_a_422,
    a_history_cursor_is_blamed_by_name_and_an_empty_one_is_absent,
    the_largest_possible_since_is_an_empty_page,
    sse_blames_the_parameter_that_is_wrong,
    custom_events_are_validated_and_reserved_types_refused,
    sse_sends_id_lines_and_resumes_from_last_event_id,
    websockets_close_with_going_away_on_shutdown,
    serving_ends_after_websockets_are_closed,
    sse_streams_end_with_stream_closed_on_shutdown,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_across_a_redis_restart_gets_every_later_event_once() {
    let mut app = TestApp::spawn(Kind::Redis).await;
    let mut socket = connect(&app, "?types=test.*").await;
    publish(&app, "test.before", 0).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "test.before");
    let redis = app.redis.as_mut().unwrap();
    redis.kill();
    let (status, _) = app
        .post("/v1/events", json!({"type": "test.lost", "data": {}}))
        .await;
    assert_eq!(status, 503);
    app.redis.as_mut().unwrap().restart();
    eventually(Duration::from_secs(5), || async {
        let (status, _) = app
            .post("/v1/events", json!({"type": "test.probe", "data": {}}))
            .await;
        (status == 201).then_some(())
    })
    .await;
    let mut sent = Vec::new();
    for n in 0..50 {
        sent.push(publish(&app, "test.after", n).await);
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        let e = next_json(&mut socket).await.expect("still connected");
        if e["type"] == "test.after" {
            got.push(e["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(got, sent);
}

/// Redis restarted without its data starts a new log: a reader resuming
/// from an id of the old one is told (`stream.reset`) that what followed
/// it is gone, not silently handed the new log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_log_redis_lost_starts_with_a_stream_reset() {
    let mut app = TestApp::spawn(Kind::Redis).await;
    let old = publish(&app, "test.before", 0).await;
    publish(&app, "test.lost", 1).await;
    let redis = app.redis.as_mut().unwrap();
    redis.kill();
    redis.restart();
    eventually(Duration::from_secs(5), || async {
        let (status, _) = app
            .post("/v1/events", json!({"type": "test.after", "data": {}}))
            .await;
        (status == 201).then_some(())
    })
    .await;
    let mut socket = connect(&app, &format!("?since={old}")).await;
    let reset = next_json(&mut socket).await.unwrap();
    assert_eq!(reset["type"], "stream.reset", "{reset}");
    let next = next_json(&mut socket).await.unwrap();
    assert_eq!(next["id"], reset["oldest_id"], "the new log from its start");
    assert_eq!(next["type"], "test.after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_check_origin_and_credentials_before_upgrading() {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory)
            .keys(&keys.toml)
            .configure(|c| c.allowed_origins = vec!["https://dash.example".into()]),
    )
    .await;
    let status_of = |result: Result<_, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    // No token: 401 before the upgrade.
    let no_token = tokio_tungstenite::connect_async(app.ws_url("/v1/events/ws")).await;
    assert_eq!(status_of(no_token.map(drop)), 401);
    // An agent key may not subscribe.
    let agent = tokio_tungstenite::connect_async(
        app.ws_url(&format!("/v1/events/ws?access_token={}", keys.agent)),
    )
    .await;
    assert_eq!(status_of(agent.map(drop)), 403);
    // A disallowed origin.
    let mut req = app
        .ws_url(&format!("/v1/events/ws?access_token={}", keys.viewer))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().unwrap());
    assert_eq!(
        status_of(tokio_tungstenite::connect_async(req).await.map(drop)),
        403
    );
    // The service's own origin (a page it serves) is never foreign.
    let mut req = app
        .ws_url(&format!("/v1/events/ws?access_token={}", keys.viewer))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", format!("http://{}", app.addr).parse().unwrap());
    assert_eq!(
        status_of(tokio_tungstenite::connect_async(req).await.map(drop)),
        101
    );
    // The allowed origin with a viewer token.
    let mut req = app
        .ws_url(&format!("/v1/events/ws?access_token={}", keys.viewer))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", "https://dash.example".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    app.post_as("/v1/agents/a/heartbeats", json!({}), Some(&keys.agent))
        .await;
    assert_eq!(
        next_json(&mut socket).await.unwrap()["type"],
        "agent.started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frames_over_64_kib_close_the_socket_with_1009() {
    let app = TestApp::spawn(Kind::Memory).await;
    let mut socket = connect(&app, "").await;
    socket
        .send(Message::Text("x".repeat(70 * 1024).into()))
        .await
        .unwrap();
    expect_close(&mut socket, 1009).await;
}

/// The next frame on `socket` is a close with `code`.
async fn expect_close(socket: &mut Socket, code: u16) {
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("answer");
    match frame {
        Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), code),
        other => panic!("expected close {code}, got {other:?}"),
    }
}

/// RFC 6455: an endpoint that receives text that is not UTF-8 closes with
/// 1007, rather than dropping the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_closes_the_socket_with_1007() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let app = TestApp::spawn(Kind::Memory).await;
    let mut socket = connect(&app, "").await;
    let bad = Frame::message(vec![0xff, 0xfe, b'x'], OpCode::Data(Data::Text), true);
    socket.send(Message::Frame(bad)).await.unwrap();
    expect_close(&mut socket, 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_too_far_behind_is_closed_with_a_resume_point() {
    let app =
        TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| c.subscriber_buffer = 16))
            .await;
    let mut socket = connect(&app, "").await;
    // Publish far more than the buffer and the sockets' kernel buffers can
    // hold (500 × 60 KiB) without reading, so the server's writes block.
    let blob = "x".repeat(60 * 1024);
    for n in 0..500 {
        let (status, _) = app
            .post(
                "/v1/events",
                json!({"type": "test.flood", "data": {"n": n, "blob": blob}}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("frame")
        {
            Some(Ok(Message::Close(Some(close)))) => break close,
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4008);
    assert!(close.reason.contains("since="), "{}", close.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_pinged_every_15_seconds_and_stays_open() {
    let app = TestApp::spawn(Kind::Memory).await;
    let mut socket = connect(&app, "?types=test.after-ping").await;
    let started = std::time::Instant::now();
    let ping = tokio::time::timeout(Duration::from_secs(20), socket.next())
        .await
        .expect("a frame within 20 s");
    assert!(
        matches!(ping, Some(Ok(Message::Ping(_)))),
        "expected a ping, got {ping:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(14) && waited <= Duration::from_secs(17),
        "pinged after {waited:?}"
    );
    // The client answered with a pong while reading; the socket still works.
    publish(&app, "test.after-ping", 1).await;
    let frame = next_json(&mut socket)
        .await
        .expect("an event after the ping");
    assert_eq!(frame["type"], "test.after-ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sustained_traffic_a_websocket_is_written_once_per_interval() {
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory).configure(|c| c.ws_write_interval = Duration::from_millis(600)),
    )
    .await;
    let mut socket = connect(&app, "?types=test.paced").await;
    // After a quiet spell the first frame goes out at once.
    let started = std::time::Instant::now();
    publish(&app, "test.paced", 1).await;
    let first = next_json(&mut socket).await.expect("first frame");
    assert_eq!(first["data"]["n"], 1);
    let first_after = started.elapsed();
    assert!(first_after < Duration::from_millis(400), "{first_after:?}");
    // The next two come within the interval: they wait for its end and
    // arrive together, in order.
    publish(&app, "test.paced", 2).await;
    publish(&app, "test.paced", 3).await;
    let second = next_json(&mut socket).await.expect("second frame");
    let second_after = started.elapsed();
    let third = next_json(&mut socket).await.expect("third frame");
    let third_after = started.elapsed();
    assert_eq!(
        (second["data"]["n"].clone(), third["data"]["n"].clone()),
        (json!(2), json!(3))
    );
    assert!(
        second_after >= Duration::from_millis(550),
        "second frame after {second_after:?}, before the interval ended"
    );
    assert!(
        third_after - second_after < Duration::from_millis(100),
        "the held frames were written together ({second_after:?}, {third_after:?})"
    );
}

#[tokio::test]
async fn the_redis_tailer_switches_streams_without_errors_while_idle() {
    let app = TestApp::spawn(Kind::Redis).await;
    // Nobody subscribes: the tailer reads wake-ups with short blocking reads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut socket = connect(&app, "").await;
    // Now it blocks on the log for seconds, on the same connection, and the
    // log stays quiet for longer than a short read's bound.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let id = publish(&app, "test.late", 0).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["id"], id.as_str());
    let metrics = app.metrics_text().await;
    assert!(
        !metrics.contains("op=\"tail\""),
        "the tailer failed a read: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_without_waiting_out_the_interval_between_batches() {
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory).configure(|c| c.ws_write_interval = Duration::from_millis(600)),
    )
    .await;
    let mut socket = connect(&app, "?types=test.backlog").await;
    // 640 frames are ten full batches: paced at one batch per interval they
    // would take over five seconds after the first. Appended through the
    // engine, so that the backlog is there at once.
    for n in 0..640 {
        let body = attune_telemetry::events::EventBody::new(
            "test.backlog",
            "test",
            None,
            chrono::Utc::now(),
            json!({"n": n}),
        );
        app.state.engine.publish(body).await.expect("appended");
    }
    let first = next_json(&mut socket).await.expect("first frame");
    assert_eq!(first["data"]["n"], 0);
    let started = std::time::Instant::now();
    for n in 1..640 {
        let frame = next_json(&mut socket).await.expect("a frame");
        assert_eq!(frame["data"]["n"], n);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "the backlog took {took:?} after the first frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_a_close_frame() {
    let app = TestApp::spawn(Kind::Memory).await;
    let mut socket = connect(&app, "").await;
    socket.close(None).await.expect("close sent");
    let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an answer within 5 s");
    assert!(
        matches!(reply, Some(Ok(Message::Close(_)))),
        "expected the server's close frame, got {reply:?}"
    );
}

/// The `attune_event_subscribers` gauge of `/metrics`.
async fn subscribers(app: &TestApp) -> u64 {
    let text = app.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix("attune_event_subscribers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the subscriber gauge") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    let app = TestApp::spawn(Kind::Memory).await;
    // A connection that stays open but never reads, with a small window so
    // that the server's writes back up quickly.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let stream = tcp.connect(app.addr).await.unwrap();
    let request = app
        .ws_url("/v1/events/ws?types=test.stuck")
        .into_client_request()
        .unwrap();
    let (_socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("websocket connects");
    eventually(Duration::from_secs(5), || async {
        (subscribers(&app).await == 1).then_some(())
    })
    .await;
    // More than the kernel buffers a connection (4 MiB here).
    let big = "x".repeat(60 * 1024);
    for n in 0..160 {
        let (status, _) = app
            .post(
                "/v1/events",
                json!({"type": "test.stuck", "data": {"n": n, "pad": big}}),
            )
            .await;
        assert_eq!(status, 201);
    }
    // 9.6 MB the client never reads: the write stalls, and after the
    // write timeout (10 s) the server lets the socket go.
    eventually(Duration::from_secs(20), || async {
        (subscribers(&app).await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_that_overtakes_a_replay_is_announced_with_a_reset() {
    let app =
        TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| c.stream_max_len = 600)).await;
    // Events large enough that a replay batch (500) outgrows the socket's
    // buffers: the replay waits for this client while the log moves on.
    // Appended through the engine, not HTTP, so that the client's pause
    // below stays far shorter than the server's write timeout.
    let big = "x".repeat(60 * 1024);
    let send = |n: usize| {
        let engine = app.state.engine.clone();
        let body = attune_telemetry::events::EventBody::new(
            "test.long",
            "test",
            None,
            chrono::Utc::now(),
            json!({"n": n, "pad": big}),
        );
        async move { engine.publish(body).await.expect("appended") }
    };
    for n in 0..600 {
        send(n).await;
    }
    let mut socket = connect(&app, "?since=0&types=test.long").await;
    for n in 0..10 {
        let frame = next_json(&mut socket).await.expect("a replayed frame");
        assert_eq!(frame["data"]["n"], n);
    }
    // Trims every event of the first 600 the replay has not read yet.
    for n in 600..1300 {
        send(n).await;
    }
    let mut next = 10;
    let reset = loop {
        let frame = next_json(&mut socket).await.expect("a frame");
        if frame["type"] == "stream.reset" {
            break frame;
        }
        assert_eq!(
            frame["data"]["n"], next,
            "in order, no gap before the reset"
        );
        next += 1;
    };
    assert!(
        next <= 500,
        "the reset comes where the first batch ends ({next})"
    );
    let after = next_json(&mut socket).await.expect("replay goes on");
    assert_eq!(after["id"], reset["oldest_id"], "{reset}");
    assert_eq!(after["data"]["n"], 700, "the oldest event left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_log_entry_is_passed_over_not_a_stop() {
    let app = TestApp::spawn(Kind::Redis).await;
    let mut socket = connect(&app, "?types=test.*").await;
    // An entry no version of the service wrote: no type, no body.
    let mut conn = app.redis.as_ref().unwrap().conn();
    let _: String = ::redis::cmd("XADD")
        .arg(format!("{{{}}}:events", app.prefix))
        .arg("*")
        .arg("x")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    let id = publish(&app, "test.after-junk", 0).await;
    let frame = next_json(&mut socket)
        .await
        .expect("the live stream goes on");
    assert_eq!(frame["id"], id.as_str());
    let (status, page) = app.get("/v1/events?since=0&types=test.after-junk").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["id"], id.as_str());
}

/// The status of a WebSocket handshake sent with `Origin: origin`.
async fn ws_status_from(app: &TestApp, origin: &str) -> u16 {
    ws_status(app, origin, None).await
}

/// The same, also naming `host` in `Host`.
async fn ws_status(app: &TestApp, origin: &str, host: Option<&str>) -> u16 {
    let mut req = app.ws_url("/v1/events/ws").into_client_request().unwrap();
    req.headers_mut().insert("Origin", origin.parse().unwrap());
    if let Some(host) = host {
        req.headers_mut().insert("Host", host.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

/// Without a keys file a page whose site's name was pointed at 127.0.0.1
/// after it loaded (DNS rebinding) is same-origin with itself and sends no
/// `Origin` on a GET: what gives it away is the `Host` it names, which must
/// be a loopback one. With keys, a key is what it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_a_request_naming_another_host_is_refused() {
    let app = TestApp::spawn(Kind::Memory).await;
    let port = app.addr.port();
    let get = |app: &TestApp, host: String| {
        let req = app.client.get(app.url("/v1/agents")).header("Host", host);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for host in [
        "evil.example",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
    ] {
        assert_eq!(get(&app, format!("{host}:{port}")).await, 403, "{host}");
    }
    for host in [
        "localhost",
        "LocalHost",
        "app.localhost",
        "127.0.0.1",
        "127.1.2.3",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ] {
        assert_eq!(get(&app, format!("{host}:{port}")).await, 200, "{host}");
    }
    assert_eq!(get(&app, "localhost".to_owned()).await, 200);
    let rebound = format!("evil.example:{port}");
    let page = format!("http://{rebound}");
    assert_eq!(ws_status(&app, &page, Some(&rebound)).await, 403);
    let own = format!("127.0.0.1:{port}");
    assert_eq!(
        ws_status(&app, &format!("http://{own}"), Some(&own)).await,
        101
    );

    let keys = TestKeys::new();
    let keyed = TestApp::spawn_with(Options::new(Kind::Memory).keys(&keys.toml)).await;
    let status = keyed
        .client
        .get(keyed.url("/v1/agents"))
        .bearer_auth(&keys.viewer)
        .header("Host", format!("evil.example:{}", keyed.addr.port()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// Without a keys file every caller is an administrator: a page on another
/// site must not be able to read the log or write through the user's
/// browser. Clients that send no `Origin` (curl, SDKs) and the service's
/// own pages are not affected; with keys, credentials protect instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_browsers_on_other_sites_are_refused() {
    let app = TestApp::spawn(Kind::Memory).await;
    assert_eq!(ws_status_from(&app, "https://evil.example").await, 403);
    let own = format!("http://{}", app.addr);
    assert_eq!(ws_status_from(&app, &own).await, 101);
    let beat = |origin: Option<&str>| {
        let mut req = app
            .client
            .post(app.url("/v1/agents/forged/heartbeats"))
            .json(&json!({}));
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(beat(Some("https://evil.example")).await, 403);
    assert_eq!(beat(Some("null")).await, 403);
    assert_eq!(beat(Some(&own)).await, 200);
    assert_eq!(beat(None).await, 200);

    // An image or a followed link on another site's page: no `Origin`, but
    // the browser says where it comes from. Reading is harmless (the page
    // cannot see the answer); consuming an inbox is not.
    let (status, _) = app
        .post(
            "/v1/signals",
            json!({"signal_type": "task", "source_agent": "planner", "target_agent": "coder"}),
        )
        .await;
    assert_eq!(status, 201);
    let read = |query: &'static str, site: &'static str| {
        let req = app
            .client
            .get(app.url(&format!("/v1/agents/coder/signals{query}")))
            .header("Sec-Fetch-Site", site)
            .header("Sec-Fetch-Mode", "no-cors");
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(read("?consume=true", "cross-site").await, 403);
    assert_eq!(read("?consume=true", "same-site").await, 403);
    assert_eq!(read("", "cross-site").await, 200);
    let (_, inbox) = app.get("/v1/agents/coder/signals").await;
    assert_eq!(
        inbox["signals"].as_array().map(Vec::len),
        Some(1),
        "still there"
    );
    assert_eq!(read("?consume=true", "same-origin").await, 200);

    // With keys, a key is what it takes, wherever the request comes from.
    let keys = TestKeys::new();
    let keyed = TestApp::spawn_with(Options::new(Kind::Memory).keys(&keys.toml)).await;
    let status = keyed
        .client
        .post(keyed.url("/v1/agents/a/heartbeats"))
        .bearer_auth(&keys.agent)
        .header("Origin", "https://evil.example")
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}
