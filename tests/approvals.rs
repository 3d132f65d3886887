//! Approval gates: the state machine under races, server-side deadlines,
//! pushed waits across replicas, idempotent creation, and who may do what.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde_json::{Value, json};

use common::{Kind, Options, TestApp, TestKeys, eventually, for_each_string, problem_field};

/// A service with one key per role; the helpers' default token is the admin's.
async fn spawn(kind: Kind) -> (TestApp, TestKeys) {
    let keys = TestKeys::new();
    (TestApp::spawn_as_admin(kind, &keys).await, keys)
}

/// Another instance on the same Redis and prefix, with the same keys.
async fn replica(app: &TestApp, keys: &TestKeys) -> TestApp {
    let url = app.redis_url().expect("a Redis-backed app");
    let options = Options::new(Kind::Redis)
        .shared_redis(&url, &app.prefix)
        .keys(&keys.toml);
    TestApp::spawn_with(options).await.with_token(&keys.admin)
}

fn request(agent_id: &str, timeout_seconds: u64) -> Value {
    json!({
        "approval_type": "deploy",
        "agent_id": agent_id,
        "context": {"service": "billing", "version": "1.4.2"},
        "timeout_seconds": timeout_seconds,
    })
}

/// Creates an approval as `token` and returns its id.
async fn create(app: &TestApp, token: &str, body: Value) -> String {
    let (status, created) = app.post_as("/v1/approvals", body, Some(token)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["request"]["status"], "pending");
    assert!(created["response"].is_null());
    created["request"]["request_id"]
        .as_str()
        .expect("request_id")
        .to_owned()
}

async fn decide(app: &TestApp, token: &str, id: &str, approved: bool) -> (u16, Value) {
    app.post_as(
        &format!("/v1/approvals/{id}/decision"),
        json!({"approved": approved, "reason": "looked at it"}),
        Some(token),
    )
    .await
}

/// `POST /v1/approvals` with an `Idempotency-Key` header.
async fn create_with_key(app: &TestApp, token: &str, key: &str, body: &str) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url("/v1/approvals"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON body"))
}

fn ms(t: &Value) -> DateTime<Utc> {
    t.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("{t} is not an RFC 3339 time"))
}

async fn two_decisions_racing_on_each_of_200_requests_have_exactly_one_winner(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(create(&app, &keys.agent, request(&format!("agent-{}", i % 7), 300)).await);
    }
    let races = ids.iter().map(|id| {
        let (app, keys) = (&app, &keys);
        async move {
            let (approve, reject) = tokio::join!(
                decide(app, &keys.approver, id, true),
                decide(app, &keys.admin, id, false),
            );
            (id.clone(), approve, reject)
        }
    });
    let results = join_all(races).await;
    let mut approvals_won = 0;
    for (id, (approve_status, approve_body), (reject_status, reject_body)) in results {
        let mut statuses = [approve_status, reject_status];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "{id}: {approve_body} / {reject_body}");
        let winner = if approve_status == 200 {
            approvals_won += 1;
            approve_body
        } else {
            reject_body
        };
        let (_, stored) = app.get(&format!("/v1/approvals/{id}")).await;
        assert_eq!(stored, winner, "the stored state is the winner's");
    }
    println!("approve won {approvals_won} of 200 races");
    let mut decided: HashMap<String, usize> = HashMap::new();
    for event in app.events_of("approval.decided").await {
        let id = event["data"]["request_id"].as_str().expect("request_id");
        *decided.entry(id.to_owned()).or_default() += 1;
    }
    assert_eq!(decided.len(), 200);
    assert!(
        decided.values().all(|n| *n == 1),
        "one approval.decided per request"
    );
}

async fn a_decision_at_the_deadline_gives_its_waiter_exactly_the_stored_final_state(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    // Decisions land from 40 ms before to 60 ms after the 1-second deadline.
    let offsets_ms: [i64; 20] = [
        -40, -25, -15, -10, -6, -4, -2, -1, 0, 0, 1, 2, 3, 5, 8, 12, 16, 25, 40, 60,
    ];
    let trials = offsets_ms.iter().enumerate().map(|(i, offset)| {
        let (app, keys) = (&app, &keys);
        async move {
            let (status, created) = app
                .post_as(
                    "/v1/approvals",
                    request(&format!("agent-{i}"), 1),
                    Some(&keys.agent),
                )
                .await;
            assert_eq!(status, 201, "{created}");
            let id = created["request"]["request_id"]
                .as_str()
                .unwrap()
                .to_owned();
            let expires_at = ms(&created["request"]["expires_at"]);
            let path = format!("/v1/approvals/{id}");
            let wait_path = format!("{path}?wait_seconds=5");
            let waiter = app.get_as(&wait_path, Some(&keys.viewer));
            let decider = async {
                let at = expires_at + chrono::Duration::milliseconds(*offset);
                let delay = (at - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(delay).await;
                decide(app, &keys.approver, &id, true).await
            };
            let ((wait_status, seen), (decision_status, decision)) = tokio::join!(waiter, decider);
            let (_, stored) = app.get(&path).await;
            assert_eq!(wait_status, 200, "{seen}");
            assert_ne!(stored["request"]["status"], "pending");
            assert_eq!(
                seen, stored,
                "offset {offset} ms: the waiter saw the final state"
            );
            match decision_status {
                200 => {
                    assert_eq!(decision, stored);
                    assert_eq!(stored["request"]["status"], "approved");
                }
                409 => {
                    assert_eq!(stored["request"]["status"], "timeout");
                    assert_eq!(stored["response"]["responder"], "system");
                    assert_eq!(stored["response"]["approved"], false);
                }
                other => panic!("decision answered {other}: {decision}"),
            }
            stored["request"]["status"].as_str().unwrap().to_owned()
        }
    });
    let outcomes = join_all(trials).await;
    let approved = outcomes.iter().filter(|s| *s == "approved").count();
    println!(
        "at the deadline: {approved} decisions won, {} timeouts won",
        outcomes.len() - approved
    );
    // Each request settled exactly once, whichever way.
    let settled = app.events_of("approval.decided").await.len()
        + app.events_of("approval.expired").await.len();
    assert_eq!(settled, offsets_ms.len());
}

async fn an_approval_nobody_waits_on_times_out_once_within_two_seconds(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    // On Redis a second replica runs a second sweeper over the same
    // deadlines; both race to claim every due request.
    let second = match kind {
        Kind::Redis => Some(replica(&app, &keys).await),
        Kind::Memory => None,
    };
    let id = create(&app, &keys.agent, request("agent-1", 1)).await;
    let path = format!("/v1/approvals/{id}");
    // Nobody reads or waits for it: the server alone moves it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired_once = || async {
        app.events_of("approval.expired")
            .await
            .into_iter()
            .filter(|e| e["data"]["request_id"] == id.as_str())
            .collect::<Vec<Value>>()
    };
    let expired = expired_once().await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    let (_, timed_out) = app.get(&path).await;
    assert_eq!(timed_out["request"]["status"], "timeout", "{timed_out}");
    // Not before its deadline (both are RFC 3339 UTC with milliseconds).
    let deadline = timed_out["request"]["expires_at"].as_str().unwrap();
    assert!(
        expired[0]["ts"].as_str().unwrap() >= deadline,
        "{expired:?}"
    );
    let response = &timed_out["response"];
    assert_eq!(response["approved"], false);
    assert_eq!(response["responder"], "system");
    assert_eq!(response["reason"], "timed out after 1 seconds");
    assert_eq!(response["decided_at"], timed_out["request"]["expires_at"]);
    // Give every sweeper several more rounds to (wrongly) expire it again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let expired = expired_once().await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["source"], "system");
    assert_eq!(expired[0]["data"]["status"], "timeout");
    assert!(app.events_of("approval.decided").await.is_empty());
    drop(second);
}

async fn the_same_idempotency_key_twice_creates_one_approval_and_another_body_is_refused(
    kind: Kind,
) {
    let (app, keys) = spawn(kind).await;
    let body = r#"{"approval_type":"deploy","agent_id":"agent-1","context":{"a":1,"b":[1,2]}}"#;
    let (s1, first) = create_with_key(&app, &keys.agent, "retry-7", body).await;
    let (s2, again) = create_with_key(&app, &keys.agent, "retry-7", body).await;
    assert_eq!((s1, s2), (201, 201), "{first} / {again}");
    assert_eq!(first, again);
    // The same body with its keys in another order is the same body.
    let reordered = r#"{"context":{"b":[1,2],"a":1},"timeout_seconds":300,"agent_id":"agent-1","approval_type":"deploy"}"#;
    let (s3, same) = create_with_key(&app, &keys.agent, "retry-7", reordered).await;
    assert_eq!(s3, 201);
    assert_eq!(
        same["request"]["request_id"],
        first["request"]["request_id"]
    );
    // Retries racing each other still create one request.
    let racing =
        join_all((0..10).map(|_| create_with_key(&app, &keys.agent, "retry-8", body))).await;
    let ids: std::collections::HashSet<String> = racing
        .iter()
        .map(|(status, b)| {
            assert_eq!(*status, 201, "{b}");
            b["request"]["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);

    let other = r#"{"approval_type":"deploy","agent_id":"agent-1","context":{"a":2}}"#;
    let (status, problem) = create_with_key(&app, &keys.agent, "retry-7", other).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem_field(&problem), "Idempotency-Key");
    // Two keys for one request: which one would it be retried under?
    let resp = app
        .client
        .post(app.url("/v1/approvals"))
        .bearer_auth(&keys.agent)
        .header("Idempotency-Key", "retry-9")
        .header("Idempotency-Key", "retry-10")
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 422);
    let problem: Value = resp.json().await.expect("a JSON body");
    assert_eq!(problem_field(&problem), "Idempotency-Key");

    let (_, list) = app.get("/v1/approvals?status=all").await;
    assert_eq!(list["approvals"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(app.events_of("approval.requested").await.len(), 2);
}

async fn an_agent_key_cannot_decide_and_a_requester_cannot_decide_its_own_approval(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let id = create(&app, &keys.agent, request("agent-1", 300)).await;
    let (status, problem) = decide(&app, &keys.agent, &id, true).await;
    assert_eq!(status, 403, "{problem}");
    let (status, _) = decide(&app, &keys.viewer, &id, true).await;
    assert_eq!(status, 403);

    let own = create(&app, &keys.admin, request("agent-1", 300)).await;
    let (status, problem) = decide(&app, &keys.admin, &own, true).await;
    assert_eq!(status, 403, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("ops-admin"));
    // Refusals change nothing; a different approver decides both.
    let (status, decided) = decide(&app, &keys.approver, &own, false).await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["request"]["status"], "rejected");
    assert_eq!(decided["response"]["responder"], "alice");
    assert_eq!(decided["response"]["approved"], false);
    let (status, decided) = decide(&app, &keys.approver, &id, true).await;
    assert_eq!(status, 200);
    assert_eq!(decided["request"]["status"], "approved");
    assert_eq!(decided["request"]["requested_by"], "agent-key");
}

async fn a_responder_field_sent_by_the_client_is_ignored(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let id = create(&app, &keys.agent, request("agent-1", 300)).await;
    let (status, decided) = app
        .post_as(
            &format!("/v1/approvals/{id}/decision"),
            json!({"approved": true, "responder": "the-ceo"}),
            Some(&keys.approver),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["response"]["responder"], "alice");
}

async fn a_conflict_names_the_current_status_and_responder(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let detail = |problem: &Value| problem["detail"].as_str().unwrap_or("").to_owned();

    let approved = create(&app, &keys.agent, request("agent-1", 300)).await;
    assert_eq!(decide(&app, &keys.approver, &approved, true).await.0, 200);
    let (status, problem) = decide(&app, &keys.admin, &approved, false).await;
    assert_eq!(status, 409, "{problem}");
    let text = detail(&problem);
    assert!(
        text.contains("approved") && text.contains("alice"),
        "{text}"
    );

    let cancelled = create(&app, &keys.agent, request("agent-1", 300)).await;
    let (status, body) = app
        .post_as(
            &format!("/v1/approvals/{cancelled}/cancel"),
            json!({"reason": "no longer needed"}),
            Some(&keys.agent),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, problem) = decide(&app, &keys.approver, &cancelled, true).await;
    assert_eq!(status, 409);
    let text = detail(&problem);
    assert!(
        text.contains("cancelled") && text.contains("agent-key"),
        "{text}"
    );

    let timed_out = create(&app, &keys.agent, request("agent-1", 1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, problem) = decide(&app, &keys.approver, &timed_out, true).await;
    assert_eq!(status, 409);
    let text = detail(&problem);
    assert!(
        text.contains("timeout") && text.contains("system"),
        "{text}"
    );

    let (status, problem) = app
        .post_as(
            &format!("/v1/approvals/{approved}/cancel"),
            json!({}),
            Some(&keys.agent),
        )
        .await;
    assert_eq!(status, 409);
    assert!(detail(&problem).contains("approved"));
}

async fn a_cancel_racing_a_decision_has_exactly_one_winner(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(create(&app, &keys.agent, request("agent-1", 300)).await);
    }
    let races = ids.iter().map(|id| {
        let (app, keys) = (&app, &keys);
        async move {
            let cancel_path = format!("/v1/approvals/{id}/cancel");
            let cancel = app.post_as(&cancel_path, json!({}), Some(&keys.agent));
            let ((c, _), (d, _)) = tokio::join!(cancel, decide(app, &keys.approver, id, true));
            let mut statuses = [c, d];
            statuses.sort();
            assert_eq!(statuses, [200, 409], "{id}");
        }
    });
    join_all(races).await;
    let settled = app.events_of("approval.cancelled").await.len()
        + app.events_of("approval.decided").await.len();
    assert_eq!(settled, 50);
}

/// "The requesting agent" cancels: any agent key that may act as the
/// approval's agent, not only the key that asked.
async fn the_requesting_agent_or_an_admin_may_cancel(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let id = create(&app, &keys.agent, request("ci-1", 300)).await;
    let path = format!("/v1/approvals/{id}/cancel");
    let (status, _) = app.post_as(&path, json!({}), Some(&keys.approver)).await;
    assert_eq!(status, 403);
    // Another agent key, whose scope covers the agent, did not ask but acts
    // for the requesting agent.
    let (status, cancelled) = app.post_as(&path, json!({}), Some(&keys.ci_agent)).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["request"]["status"], "cancelled");
    assert_eq!(cancelled["response"]["responder"], "ci-key");
    assert_eq!(cancelled["response"]["approved"], false);

    let other = create(&app, &keys.agent, request("agent-2", 300)).await;
    let path = format!("/v1/approvals/{other}/cancel");
    // Outside its scope it does not even exist.
    let (status, _) = app.post_as(&path, json!({}), Some(&keys.ci_agent)).await;
    assert_eq!(status, 404);
    // A `null` body, like none, cancels without a reason.
    let (status, body) = app.post_as(&path, json!(null), Some(&keys.admin)).await;
    assert_eq!(status, 200, "{body}");
    let events = app.events_of("approval.cancelled").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["data"]["response"]["responder"], "ci-key");
}

async fn an_agent_key_sees_and_creates_only_approvals_in_its_scope(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let (status, problem) = app
        .post_as(
            "/v1/approvals",
            request("prod-1", 300),
            Some(&keys.ci_agent),
        )
        .await;
    assert_eq!(status, 403, "{problem}");
    let theirs = create(&app, &keys.agent, request("prod-1", 300)).await;
    let mine = create(&app, &keys.ci_agent, request("ci-1", 300)).await;

    let (status, _) = app
        .get_as(&format!("/v1/approvals/{theirs}"), Some(&keys.ci_agent))
        .await;
    assert_eq!(status, 404);
    let (status, _) = app
        .get_as(&format!("/v1/approvals/{mine}"), Some(&keys.ci_agent))
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .post_as(
            &format!("/v1/approvals/{theirs}/cancel"),
            json!({}),
            Some(&keys.ci_agent),
        )
        .await;
    assert_eq!(status, 404);

    let (_, list) = app.get_as("/v1/approvals", Some(&keys.ci_agent)).await;
    let listed: Vec<&Value> = list["approvals"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["request"]["request_id"], mine.as_str());
    let (_, list) = app.get_as("/v1/approvals", Some(&keys.viewer)).await;
    assert_eq!(list["approvals"].as_array().unwrap().len(), 2);
}

async fn a_waiter_whose_wait_ends_gets_the_pending_state_and_can_wait_again(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let id = create(&app, &keys.agent, request("agent-1", 300)).await;
    let path = format!("/v1/approvals/{id}");
    let started = Instant::now();
    let (status, pending) = app
        .get_as(&format!("{path}?wait_seconds=1"), Some(&keys.agent))
        .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(pending["request"]["status"], "pending");
    assert!(pending["response"].is_null());

    let wait_path = format!("{path}?wait_seconds=10");
    let waiter = app.get_as(&wait_path, Some(&keys.agent));
    let decider = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        decide(&app, &keys.approver, &id, false).await
    };
    let started = Instant::now();
    let ((status, seen), (_, decided)) = tokio::join!(waiter, decider);
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered when decided"
    );
    assert_eq!(seen, decided);
    assert_eq!(seen["request"]["status"], "rejected");
}

/// How soon after a decision is answered its waiters are (the original
/// polled once a second; a poll of even a few hundred ms would miss this).
const WAKE_BOUND: Duration = Duration::from_millis(100);

async fn a_waiter_is_answered_within_100_ms_of_the_decision(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let app = std::sync::Arc::new(app);
    let id = create(&app, &keys.agent, request("agent-1", 300)).await;
    let waiter = {
        let (app, token, path) = (
            app.clone(),
            keys.agent.clone(),
            format!("/v1/approvals/{id}?wait_seconds=10"),
        );
        tokio::spawn(async move {
            let (status, seen) = app.get_as(&path, Some(&token)).await;
            (status, seen, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "answered before the decision");
    let (status, decided) = decide(&app, &keys.approver, &id, true).await;
    let decided_at = Instant::now();
    assert_eq!(status, 200, "{decided}");
    let (status, seen, answered) = waiter.await.expect("waiter task");
    assert_eq!((status, &seen), (200, &decided));
    let latency = answered.saturating_duration_since(decided_at);
    assert!(
        latency < WAKE_BOUND,
        "answered {latency:?} after the decision"
    );
}

async fn creating_with_wait_seconds_returns_the_decision_made_meanwhile(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let creator = app.post_as(
        "/v1/approvals?wait_seconds=10",
        request("agent-1", 300),
        Some(&keys.agent),
    );
    let decider = async {
        let id = eventually(Duration::from_secs(5), || async {
            let (_, list) = app.get_as("/v1/approvals", Some(&keys.approver)).await;
            list["approvals"][0]["request"]["request_id"]
                .as_str()
                .map(str::to_owned)
        })
        .await;
        decide(&app, &keys.approver, &id, true).await
    };
    let ((status, created), (_, decided)) = tokio::join!(creator, decider);
    assert_eq!(status, 201, "{created}");
    assert_eq!(created, decided);
    assert_eq!(created["request"]["status"], "approved");
}

async fn listing_is_oldest_first_paginated_and_filtered(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({
            "approval_type": if i % 2 == 0 { "deploy" } else { "spend" },
            "agent_id": format!("agent-{}", i % 3),
        });
        ids.push(create(&app, &keys.agent, body).await);
    }
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = app
            .get(&format!("/v1/approvals?limit=2&cursor={cursor}"))
            .await;
        assert_eq!(status, 200, "{page}");
        for a in page["approvals"].as_array().unwrap() {
            seen.push(a["request"]["request_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ids, "oldest first, every request once");

    let ids_of = |list: &Value| -> Vec<String> {
        list["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["request"]["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, list) = app.get("/v1/approvals?type=spend").await;
    assert_eq!(ids_of(&list), vec![ids[1].clone(), ids[3].clone()]);
    let (_, list) = app.get("/v1/approvals?agent_id=agent-0").await;
    assert_eq!(ids_of(&list), vec![ids[0].clone(), ids[3].clone()]);

    assert_eq!(decide(&app, &keys.approver, &ids[2], true).await.0, 200);
    let (_, list) = app.get("/v1/approvals?status=approved").await;
    assert_eq!(ids_of(&list), vec![ids[2].clone()]);
    let (_, list) = app.get("/v1/approvals").await;
    assert_eq!(ids_of(&list).len(), 4, "pending is the default");
    let (_, list) = app.get("/v1/approvals?status=all").await;
    assert_eq!(ids_of(&list), ids);
    assert_eq!(list["next_cursor"], Value::Null);
}

async fn invalid_requests_are_refused_naming_the_field(kind: Kind) {
    let (app, _keys) = spawn(kind).await;
    let cases = [
        (
            json!({"approval_type": "deploy", "agent_id": "a", "timeout_seconds": 0}),
            "timeout_seconds",
        ),
        (
            json!({"approval_type": "deploy", "agent_id": "a", "timeout_seconds": 86401}),
            "timeout_seconds",
        ),
        (
            json!({"approval_type": "deploy", "agent_id": "a", "timeout_seconds": "30"}),
            "timeout_seconds",
        ),
        (
            json!({"approval_type": "deploy", "agent_id": "a:b"}),
            "agent_id",
        ),
        (
            json!({"approval_type": "de ploy", "agent_id": "a"}),
            "approval_type",
        ),
        (json!({"agent_id": "a"}), "approval_type"),
        (
            json!({"approval_type": "deploy", "agent_id": "a", "context": [1]}),
            "context",
        ),
        // Deeper than the 32 levels every reader of the answers can take
        // (the command line's serde_json stops at 128).
        (
            serde_json::from_str(&format!(
                r#"{{"approval_type": "deploy", "agent_id": "a", "context": {}1{}}}"#,
                r#"{"k":"#.repeat(33),
                "}".repeat(33)
            ))
            .unwrap(),
            "context",
        ),
    ];
    for (body, field) in cases {
        let (status, problem) = app.post("/v1/approvals", body.clone()).await;
        assert_eq!(status, 422, "{body}: {problem}");
        assert_eq!(problem_field(&problem), field, "{body}");
    }
    let (status, problem) = app
        .post("/v1/approvals?wait_seconds=61", request("a", 300))
        .await;
    assert_eq!(status, 422);
    assert_eq!(problem_field(&problem), "wait_seconds");
    let (status, problem) = app.get("/v1/approvals?status=maybe").await;
    assert_eq!(status, 422);
    assert_eq!(problem_field(&problem), "status");
    let (status, problem) = app.get("/v1/approvals?cursor=nope").await;
    assert_eq!(status, 422);
    assert_eq!(problem_field(&problem), "cursor");
    let (status, _) = app.get("/v1/approvals/not-a-request").await;
    assert_eq!(status, 404);
    let (status, _) = app
        .get(&format!("/v1/approvals/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, 404);
}

async fn in_anonymous_mode_the_single_identity_may_decide_what_it_requested(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (status, created) = app.post("/v1/approvals", request("agent-1", 300)).await;
    assert_eq!(status, 201);
    let id = created["request"]["request_id"].as_str().unwrap();
    let (status, decided) = app
        .post(
            &format!("/v1/approvals/{id}/decision"),
            json!({"approved": true}),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["response"]["responder"], "anonymous");
}

async fn pending_approvals_are_counted_in_the_metrics(kind: Kind) {
    let (app, keys) = spawn(kind).await;
    let first = create(&app, &keys.agent, request("agent-1", 300)).await;
    create(&app, &keys.agent, request("agent-1", 300)).await;
    let scrape = || async {
        let resp = app
            .client
            .get(app.url("/metrics"))
            .bearer_auth(&keys.viewer)
            .send()
            .await
            .expect("request");
        resp.text().await.expect("body")
    };
    assert!(scrape().await.contains("attune_approvals_pending 2"));
    decide(&app, &keys.approver, &first, true).await;
    assert!(scrape().await.contains("attune_approvals_pending 1"));
}

/// The deadline is the request's own: past it, a wait, a read or a
/// listing records the timeout itself (here no sweeper runs), once, and
/// answers with it.
async fn a_request_past_its_deadline_is_timed_out_by_its_reader_without_a_sweep(kind: Kind) {
    let keys = TestKeys::new();
    let options = Options::new(kind)
        .keys(&keys.toml)
        .configure(|c| c.sweep_interval = Duration::from_secs(86_400));
    let app = TestApp::spawn_with(options).await.with_token(&keys.admin);
    let id = create(&app, &keys.agent, request("agent-1", 1)).await;
    let started = Instant::now();
    let (status, waited) = app
        .get(&format!("/v1/approvals/{id}?wait_seconds=10"))
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(3),
        "the wait ended {took:?} after the request"
    );
    assert_eq!(waited["request"]["status"], "timeout", "{waited}");
    let response = &waited["response"];
    assert_eq!(response["approved"], false);
    assert_eq!(response["responder"], "system");
    assert_eq!(response["reason"], "timed out after 1 seconds");
    assert_eq!(response["decided_at"], waited["request"]["expires_at"]);
    assert_eq!(app.get(&format!("/v1/approvals/{id}")).await.1, waited);
    let (_, pending) = app.get("/v1/approvals").await;
    assert_eq!(pending["approvals"], json!([]), "{pending}");
    let (_, all) = app.get("/v1/approvals?status=all").await;
    assert_eq!(all["approvals"], json!([waited]), "{all}");
    // Nobody can decide it any more; the decision records the timeout.
    let (status, conflict) = decide(&app, &keys.approver, &id, true).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(app.get(&format!("/v1/approvals/{id}")).await.1, waited);
    assert_eq!(app.events_of("approval.expired").await.len(), 1);
    // A listing, read by nobody else, does the same.
    let other = create(&app, &keys.agent, request("agent-2", 1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, pending) = app.get("/v1/approvals").await;
    assert_eq!(pending["approvals"], json!([]), "{pending}");
    let (_, timed_out) = app.get("/v1/approvals?status=timeout").await;
    let listed: Vec<&Value> = timed_out["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["request"]["request_id"])
        .collect();
    assert_eq!(listed, vec![&json!(id), &json!(other)], "{timed_out}");
    assert_eq!(app.events_of("approval.expired").await.len(), 2);
}

/// At shutdown a waiter answers at once with the current state.
async fn a_waiter_answers_at_once_at_shutdown(kind: Kind) {
    let (mut app, keys) = spawn(kind).await;
    let id = create(&app, &keys.agent, request("agent-1", 300)).await;
    let client = app.client.clone();
    let url = app.url(&format!("/v1/approvals/{id}?wait_seconds=30"));
    let token = keys.admin.clone();
    let waiter = tokio::spawn(async move {
        let resp = client.get(url).bearer_auth(token).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    app.stop().await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("answered at once")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request"]["status"], "pending");
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
}

conformance!(
    two_decisions_racing_on_each_of_200_requests_have_exactly_one_winner,
    a_decision_at_the_deadline_gives_its_waiter_exactly_the_stored_final_state,
    an_approval_nobody_waits_on_times_out_once_within_two_seconds,
    the_same_idempotency_key_twice_creates_one_approval_and_another_body_is_refused,
    an_agent_key_cannot_decide_and_a_requester_cannot_decide_its_own_approval,
    a_responder_field_sent_by_the_client_is_ignored,
    a_conflict_names_the_current_status_and_responder,
    a_cancel_racing_a_decision_has_exactly_one_winner,
    the_requesting_agent_or_an_admin_may_cancel,
    an_agent_key_sees_and_creates_only_approvals_in_its_scope,
    a_waiter_whose_wait_ends_gets_the_pending_state_and_can_wait_again,
    a_waiter_is_answered_within_100_ms_of_the_decision,
    creating_with_wait_seconds_returns_the_decision_made_meanwhile,
    listing_is_oldest_first_paginated_and_filtered,
    invalid_requests_are_refused_naming_the_field,
    in_anonymous_mode_the_single_identity_may_decide_what_it_requested,
    pending_approvals_are_counted_in_the_metrics,
    a_request_past_its_deadline_is_timed_out_by_its_reader_without_a_sweep,
    a_waiter_answers_at_once_at_shutdown,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_one_replica_is_answered_when_another_replica_decides() {
    let (a, keys) = spawn(Kind::Redis).await;
    let b = replica(&a, &keys).await;
    let id = create(&a, &keys.agent, request("agent-1", 300)).await;
    let waiter = {
        let (client, url, token) = (
            a.client.clone(),
            a.url(&format!("/v1/approvals/{id}?wait_seconds=10")),
            keys.agent.clone(),
        );
        tokio::spawn(async move {
            let resp = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("wait");
            let answered = Instant::now();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"), answered)
        })
    };
    // Let the waiter register before deciding.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, decided) = decide(&b, &keys.approver, &id, true).await;
    let decided_at = Instant::now();
    assert_eq!(status, 200, "{decided}");
    let (status, seen, answered) = waiter.await.expect("waiter task");
    let latency = answered.saturating_duration_since(decided_at);
    println!("waiter on replica A answered {latency:?} after replica B answered the decision");
    assert_eq!(status, 200);
    assert_eq!(seen, decided);
    // Pushed, not polled: a poll of even a few hundred ms would miss this.
    assert!(latency < WAKE_BOUND, "{latency:?}");
}

/// The memory engine serves one process, so its "replicas" are sweepers
/// sharing one state: two of them race for every due request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweepers_on_one_memory_engine_time_a_request_out_once() {
    use attune_telemetry::approvals::{self, NewApprovalRequest};
    use attune_telemetry::auth::Identity;
    use attune_telemetry::events::StreamId;

    // The app runs one sweeper; start a second on the same state.
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory).configure(|c| c.sweep_interval = Duration::from_millis(10)),
    )
    .await;
    let state = app.state.clone();
    let second = approvals::spawn_sweeper(state.clone());
    let mut ids = Vec::new();
    for i in 0..50 {
        let req: NewApprovalRequest =
            serde_json::from_value(request(&format!("agent-{i}"), 1)).unwrap();
        let created = approvals::create(&state, &Identity::anonymous(), req, None)
            .await
            .expect("created");
        ids.push(created.request.request_id);
    }
    eventually(Duration::from_secs(3), || async {
        let mut all = true;
        for id in &ids {
            let approval = state.engine.get_approval(*id).await.unwrap().unwrap();
            all &= approval.request.status == approvals::ApprovalStatus::Timeout;
        }
        all.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = state
        .engine
        .read_events(StreamId::ZERO, 10_000)
        .await
        .unwrap();
    let expired = events
        .iter()
        .filter(|e| e.kind == "approval.expired")
        .count();
    assert_eq!(expired, 50);
    state.shutdown.cancel();
    second.await.unwrap();
}

/// An approval record the service cannot decode (written by hand, or by
/// another version) is passed over and counted by listings, so the queue a
/// human works from still shows; reading that one approval is an error.
/// Once created, the request exists: if Redis stops answering while its
/// creator waits on it, the answer is the request as created, not a 503
/// that loses its id (a retry without a key would create it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_creator_whose_wait_fails_gets_the_request_as_created() {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(
        Options::new(Kind::Redis)
            .keys(&keys.toml)
            .configure(|c| c.redis_timeout = Duration::from_millis(500)),
    )
    .await
    .with_token(&keys.admin);
    let creator = app.post_as(
        "/v1/approvals?wait_seconds=2",
        request("agent-1", 300),
        Some(&keys.agent),
    );
    let hang = async {
        eventually(Duration::from_secs(5), || async {
            let (_, list) = app.get_as("/v1/approvals", Some(&keys.approver)).await;
            list["approvals"][0]["request"]["request_id"]
                .as_str()
                .map(str::to_owned)
        })
        .await;
        // Every client's commands are held for 4 s: the wait's deadline
        // passes while Redis does not answer.
        app.redis.as_ref().expect("redis").pause(4000);
    };
    let ((status, created), ()) = tokio::join!(creator, hang);
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["request"]["status"], "pending");
    let id = created["request"]["request_id"].as_str().expect("its id");
    let listed = eventually(Duration::from_secs(10), || async {
        let (status, list) = app.get_as("/v1/approvals", Some(&keys.approver)).await;
        (status == 200).then_some(list)
    })
    .await;
    let ids: Vec<&str> = listed["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["request"]["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id]);
}

#[tokio::test]
async fn redis_an_unreadable_approval_does_not_fail_the_listing() {
    let (app, keys) = spawn(Kind::Redis).await;
    let kept = create(&app, &keys.agent, request("agent-1", 300)).await;
    let broken = create(&app, &keys.agent, request("agent-2", 300)).await;
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let _: () = ::redis::cmd("HSET")
        .arg(format!("{{{}}}:approval:{broken}", app.prefix))
        .arg("status")
        .arg("mulling")
        .query(&mut conn)
        .expect("HSET");

    let (status, page) = app.get("/v1/approvals").await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&str> = page["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .map(|a| a["request"]["request_id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, [kept.as_str()]);
    let (status, _) = app.get(&format!("/v1/approvals/{broken}")).await;
    assert_eq!(status, 500);
    assert!(
        app.metrics_text()
            .await
            .contains("attune_records_unreadable_total{kind=\"approval\"}")
    );
}

/// The agents and approval types of a random history: few, so that
/// filters, scopes and idempotency keys collide.
const HISTORY_AGENTS: [&str; 3] = ["ci-1", "ci-2", "prod-1"];
const HISTORY_TYPES: [&str; 2] = ["deploy", "spend"];
const HISTORY_KEYS: [&str; 3] = ["retry-1", "retry-2", "retry-3"];
/// Whole minutes, like every move of the clock, so that whether a deadline
/// has passed never hangs on the milliseconds between the two apps' clocks
/// or on the seconds of real time a history takes. Absent means 300 s.
const HISTORY_TIMEOUTS: [Option<u64>; 6] = [
    None,
    Some(60),
    Some(120),
    Some(180),
    Some(300),
    Some(86_400),
];
/// An approval id neither app ever gave.
const UNKNOWN_ID: &str = "0190f2c4-7a1e-7000-8000-000000000000";

/// The key a random operation is sent with.
#[derive(Debug, Clone, Copy)]
enum Who {
    Admin,
    Agent,
    /// The agent key limited to `ci-*`.
    CiAgent,
    Approver,
    Viewer,
}

impl Who {
    fn token(self, keys: &TestKeys) -> &str {
        match self {
            Who::Admin => &keys.admin,
            Who::Agent => &keys.agent,
            Who::CiAgent => &keys.ci_agent,
            Who::Approver => &keys.approver,
            Who::Viewer => &keys.viewer,
        }
    }
}

/// The approval an operation names.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The one created at this step.
    Step(usize),
    Unknown,
    NotAnId,
}

/// One step of a random history, applied alike to both apps.
#[derive(Debug)]
enum Op {
    Create {
        who: Who,
        key: Option<&'static str>,
        body: Value,
    },
    Decide {
        who: Who,
        target: Target,
        body: Value,
    },
    Cancel {
        who: Who,
        target: Target,
        body: Value,
    },
    Get {
        who: Who,
        target: Target,
        query: &'static str,
    },
    /// Every page (at most four) of one listing.
    List {
        who: Who,
        query: String,
    },
    Advance(Duration),
    /// A timeout sweep of both engines: each at its own clock's now, or,
    /// with `near: Some((step, delta_ms))`, each at `delta_ms` (-1 s, -1 ms
    /// or 0) from its own deadline of the request created at `step` — a
    /// moment up to three minutes ahead of the clocks, as a replica whose
    /// clock runs ahead would sweep.
    Sweep {
        limit: usize,
        near: Option<(usize, i64)>,
    },
}

fn pick<T: Copy>(rng: &mut rand::rngs::StdRng, items: &[T]) -> T {
    use rand::RngExt;
    items[rng.random_range(0..items.len())]
}

/// An existing approval (often a recent one, so that it is decided twice),
/// now and then one that does not exist.
fn random_target(rng: &mut rand::rngs::StdRng, created: &[usize]) -> Target {
    use rand::RngExt;
    if created.is_empty() || rng.random_bool(0.06) {
        return Target::Unknown;
    }
    if rng.random_bool(0.03) {
        return Target::NotAnId;
    }
    let back = if rng.random_bool(0.5) {
        rng.random_range(0..created.len().min(4))
    } else {
        rng.random_range(0..created.len())
    };
    Target::Step(created[created.len() - 1 - back])
}

/// A random operation. `bodies` remembers the last body sent with each
/// caller's idempotency key, so that keys come back with the same body as
/// often as with another one; `due_soon` are the steps whose request's
/// deadline is ahead, by at most three minutes.
fn random_op(
    rng: &mut rand::rngs::StdRng,
    created: &[usize],
    due_soon: &[usize],
    bodies: &mut HashMap<String, Value>,
) -> Op {
    use rand::RngExt;
    match rng.random_range(0..100) {
        0..=29 => {
            let who = pick(
                rng,
                &[Who::Agent, Who::Agent, Who::Agent, Who::CiAgent, Who::Admin],
            );
            let key = rng.random_bool(0.4).then(|| pick(rng, &HISTORY_KEYS));
            let remembered = key.and_then(|k| bodies.get(&format!("{who:?} {k}")));
            let body = match remembered {
                Some(body) if rng.random_bool(0.6) => body.clone(),
                _ => {
                    let mut body = json!({
                        "approval_type": pick(rng, &HISTORY_TYPES),
                        "agent_id": pick(rng, &HISTORY_AGENTS),
                    });
                    if let Some(n) = pick(rng, &[None, Some(0), Some(1), Some(2)]) {
                        // `{}` is the same body as no context at all.
                        let context = if n == 0 { json!({}) } else { json!({ "n": n }) };
                        body["context"] = context;
                    }
                    if let Some(t) = pick(rng, &HISTORY_TIMEOUTS) {
                        body["timeout_seconds"] = json!(t);
                    }
                    body
                }
            };
            if let Some(k) = key {
                bodies.insert(format!("{who:?} {k}"), body.clone());
            }
            Op::Create { who, key, body }
        }
        30..=49 => Op::Decide {
            who: pick(
                rng,
                &[
                    Who::Approver,
                    Who::Approver,
                    Who::Approver,
                    Who::Admin,
                    Who::Agent,
                ],
            ),
            target: random_target(rng, created),
            body: match rng.random_range(0..3) {
                0 => json!({ "approved": rng.random_bool(0.5) }),
                _ => {
                    json!({ "approved": rng.random_bool(0.5), "reason": pick(rng, &["ok", "no"]) })
                }
            },
        },
        50..=55 => Op::Cancel {
            who: pick(rng, &[Who::Agent, Who::CiAgent, Who::Admin, Who::Approver]),
            target: random_target(rng, created),
            body: if rng.random_bool(0.5) {
                json!({})
            } else {
                json!({ "reason": "not needed" })
            },
        },
        56..=65 => Op::Get {
            who: pick(rng, &[Who::Viewer, Who::Agent, Who::CiAgent]),
            target: random_target(rng, created),
            query: pick(rng, &["", "?wait_seconds=0"]),
        },
        66..=79 => {
            let mut query = Vec::new();
            let statuses = [
                "pending",
                "approved",
                "rejected",
                "timeout",
                "cancelled",
                "all",
            ];
            if rng.random_bool(0.8) {
                query.push(format!("status={}", pick(rng, &statuses)));
            }
            if rng.random_bool(0.3) {
                query.push(format!("type={}", pick(rng, &HISTORY_TYPES)));
            }
            if rng.random_bool(0.3) {
                query.push(format!("agent_id={}", pick(rng, &HISTORY_AGENTS)));
            }
            if rng.random_bool(0.5) {
                query.push(format!("limit={}", pick(rng, &[1, 3, 10])));
            }
            Op::List {
                who: pick(rng, &[Who::Viewer, Who::Viewer, Who::CiAgent]),
                query: query.join("&"),
            }
        }
        80..=89 => Op::Advance(Duration::from_secs(60 * rng.random_range(1..=3))),
        _ => Op::Sweep {
            limit: pick(rng, &[1, 2, 500]),
            near: (!due_soon.is_empty() && rng.random_bool(0.5))
                .then(|| (pick(rng, due_soon), pick(rng, &[-1000, -1, 0]))),
        },
    }
}

/// One app of the comparison and the approvals it created.
struct Side {
    app: TestApp,
    /// Each approval id it gave: the step that created it, its
    /// `created_at` and its `expires_at`.
    known: HashMap<String, (usize, DateTime<Utc>, DateTime<Utc>)>,
    /// The id each creating step got.
    ids: HashMap<usize, String>,
}

impl Side {
    /// An app with `keys` whose sweeper never runs by itself: the history
    /// sweeps.
    async fn unswept(kind: Kind, keys: &TestKeys) -> Self {
        let options = Options::new(kind)
            .keys(&keys.toml)
            .configure(|c| c.sweep_interval = Duration::from_secs(86_400));
        Self {
            app: TestApp::spawn_with(options).await.with_token(&keys.admin),
            known: HashMap::new(),
            ids: HashMap::new(),
        }
    }

    fn path(&self, target: Target) -> String {
        let id = match target {
            Target::Step(step) => self.ids[&step].as_str(),
            Target::Unknown => UNKNOWN_ID,
            Target::NotAnId => "not-a-request",
        };
        format!("/v1/approvals/{id}")
    }

    /// This app's answer to `op`: its status and body (for a listing, every
    /// page; for a sweep, how many requests it claimed).
    async fn answer(&self, keys: &TestKeys, op: &Op) -> (u16, Value) {
        let app = &self.app;
        match op {
            Op::Create { who, key, body } => {
                let mut req = app
                    .client
                    .post(app.url("/v1/approvals"))
                    .bearer_auth(who.token(keys))
                    .json(body);
                if let Some(key) = key {
                    req = req.header("Idempotency-Key", *key);
                }
                let resp = req.send().await.expect("request");
                let status = resp.status().as_u16();
                (status, resp.json().await.expect("a JSON body"))
            }
            Op::Decide { who, target, body } => {
                let path = format!("{}/decision", self.path(*target));
                app.post_as(&path, body.clone(), Some(who.token(keys)))
                    .await
            }
            Op::Cancel { who, target, body } => {
                let path = format!("{}/cancel", self.path(*target));
                app.post_as(&path, body.clone(), Some(who.token(keys)))
                    .await
            }
            Op::Get { who, target, query } => {
                let path = format!("{}{query}", self.path(*target));
                app.get_as(&path, Some(who.token(keys))).await
            }
            Op::List { who, query } => {
                let mut pages = Vec::new();
                let mut cursor = String::new();
                for _ in 0..4 {
                    let path = format!("/v1/approvals?{query}&cursor={cursor}");
                    let (status, page) = app.get_as(&path, Some(who.token(keys))).await;
                    let next = page["next_cursor"].as_str().map(str::to_owned);
                    pages.push(json!([status, page]));
                    match next {
                        Some(next) => cursor = next,
                        None => break,
                    }
                }
                (200, Value::Array(pages))
            }
            Op::Advance(by) => {
                app.state.clock.advance(*by);
                (200, Value::Null)
            }
            Op::Sweep { limit, near } => {
                let state = &app.state;
                let now_ms = match near {
                    Some((step, delta_ms)) => self.deadline_ms(*step) + delta_ms,
                    None => state.clock.now_ms(),
                };
                let retention = state.config.approval_retention;
                let claimed = state
                    .engine
                    .sweep_expired_approvals(now_ms, *limit, retention)
                    .await
                    .expect("sweep");
                (200, json!(claimed))
            }
        }
    }

    /// Learns the id of a request this app created at `step`; returns
    /// whether it was new.
    fn learn(&mut self, step: usize, created: &Value) -> bool {
        let request = &created["request"];
        let id = request["request_id"].as_str().expect("request_id");
        if self.known.contains_key(id) {
            return false;
        }
        let (created_at, expires_at) = (ms(&request["created_at"]), ms(&request["expires_at"]));
        (self.known).insert(id.to_owned(), (step, created_at, expires_at));
        self.ids.insert(step, id.to_owned());
        true
    }

    /// What the `attune_approvals_pending` gauge shows.
    async fn pending(&self) -> u64 {
        let engine = &self.app.state.engine;
        engine
            .pending_approval_count()
            .await
            .expect("pending count")
    }

    /// The deadline of the request created at `step`.
    fn deadline_ms(&self, step: usize) -> i64 {
        self.known[&self.ids[&step]].2.timestamp_millis()
    }

    /// Which requests a sweep at `delta_ms` from the deadline of the one
    /// created at `step` finds due, by the step that created them.
    fn due_near(&self, step: usize, delta_ms: i64) -> Vec<usize> {
        let now_ms = self.deadline_ms(step) + delta_ms;
        let mut due: Vec<usize> = (self.known.values())
            .filter(|(_, _, expires_at)| expires_at.timestamp_millis() <= now_ms)
            .map(|(step, _, _)| *step)
            .collect();
        due.sort();
        due
    }

    /// `answer` as comparable with the other app's: each id this app gave
    /// replaced by the step that created it (in every string, problem
    /// details included), and each time of an approval written relative to
    /// its `created_at` — but for `created_at` itself and a person's
    /// `decided_at`, which are this app's reading of its own clock, and read
    /// `now`.
    fn comparable(&self, answer: &Value) -> Value {
        let mut answer = answer.clone();
        relative_approval_times(&mut answer);
        self.rename_ids(&mut answer);
        answer
    }

    fn rename_ids(&self, value: &mut Value) {
        for_each_string(value, &mut |s| *s = self.renamed(s));
    }

    /// `text` with every id this app gave replaced by `#<step>`.
    fn renamed(&self, text: &str) -> String {
        let is_id_char = |c: char| c.is_ascii_hexdigit() || c == '-';
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(is_id_char) {
            out.push_str(&rest[..start]);
            let token = &rest[start..];
            let end = token.find(|c| !is_id_char(c)).unwrap_or(token.len());
            match self.known.get(&token[..end]) {
                Some((step, _, _)) => out.push_str(&format!("#{step}")),
                None => out.push_str(&token[..end]),
            }
            rest = &token[end..];
        }
        out.push_str(rest);
        out
    }

    /// Each approval's events in the log, in order, by the step that created
    /// it, comparable with the other app's (stream ids left out).
    async fn approval_events(&self) -> std::collections::BTreeMap<usize, Vec<Value>> {
        let mut out: std::collections::BTreeMap<usize, Vec<Value>> = Default::default();
        for mut event in self.app.all_events().await {
            let kind = event["type"].as_str().unwrap_or("").to_owned();
            if !kind.starts_with("approval.") {
                continue;
            }
            let id = event["data"]["request_id"].as_str().expect("request_id");
            let (step, created, _) = *self.known.get(id).unwrap_or_else(|| {
                panic!(
                    "{:?}: an event of an approval no answer gave: {event}",
                    self.app.kind
                )
            });
            event.as_object_mut().expect("an event").remove("id");
            let timed_out = kind == "approval.expired";
            event["ts"] = match kind.as_str() {
                "approval.requested" | "approval.expired" => since(created, &event["ts"]),
                _ => json!("now"),
            };
            let data = &mut event["data"];
            if data.get("expires_at").is_some() {
                data["expires_at"] = since(created, &data["expires_at"]);
            }
            if data.get("response").is_some() {
                let decided_at = &mut data["response"]["decided_at"];
                *decided_at = if timed_out {
                    since(created, decided_at)
                } else {
                    json!("now")
                };
            }
            self.rename_ids(&mut event);
            out.entry(step).or_default().push(event);
        }
        out
    }
}

/// `time` as milliseconds after `created`.
fn since(created: DateTime<Utc>, time: &Value) -> Value {
    let after = (ms(time) - created).num_milliseconds();
    json!(format!("created_at + {after} ms"))
}

/// Rewrites the times of every approval in `value` (see
/// [`Side::comparable`]).
fn relative_approval_times(value: &mut Value) {
    match value {
        Value::Object(map) if map.contains_key("request") && map.contains_key("response") => {
            let request = &mut map["request"];
            let created = ms(&request["created_at"]);
            let timed_out = request["status"] == "timeout";
            request["created_at"] = json!("now");
            request["expires_at"] = since(created, &request["expires_at"]);
            if let Some(response) = map.get_mut("response").filter(|r| !r.is_null()) {
                let decided_at = &mut response["decided_at"];
                *decided_at = if timed_out {
                    since(created, decided_at)
                } else {
                    json!("now")
                };
            }
        }
        Value::Object(map) => map.values_mut().for_each(relative_approval_times),
        Value::Array(items) => items.iter_mut().for_each(relative_approval_times),
        _ => {}
    }
}

/// The memory engine is the model of the Redis engine's scripts: a random
/// history of requests (with and without idempotency keys, repeated with
/// the same and another body, in and out of an agent key's scope),
/// decisions and cancellations (of pending, settled, timed-out and unknown
/// requests, by keys allowed and not allowed to make them), reads and
/// listings with every filter and a cursor, moves of the clock and timeout
/// sweeps is applied to a memory app and a Redis app, and each operation
/// must be answered the same by both; at the end, each approval's events in
/// the log must be the same too. Each app gives its own ids and reads its
/// own clock, so ids are compared by the step that created them, and times
/// relative to the request's creation (see [`Side::comparable`]).
///
/// The apps' sweepers never run by themselves: the history sweeps both
/// engines at the same step, each at its own clock's now, or each at the
/// same distance (-1 s, -1 ms, 0) from its own deadline of one request, so
/// that a sweep that claims a request early or late is seen. Timeouts and
/// moves of the clock are whole minutes, far beyond the real time a history
/// takes (about a second), so that both apps agree on every deadline
/// whatever milliseconds apart they created the requests; a sweep near a
/// deadline that requests created milliseconds apart could straddle
/// differently on the two apps sweeps at the clocks' now instead. After
/// every step the pending gauge must agree too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_approvals_answer_as_the_memory_engines_do() {
    use rand::SeedableRng;
    let keys = TestKeys::new();
    for seed in 1..=3u64 {
        let (mut memory, mut redis) = (
            Side::unswept(Kind::Memory, &keys).await,
            Side::unswept(Kind::Redis, &keys).await,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut created = Vec::new();
        let mut bodies = HashMap::new();
        for step in 0..300 {
            let now_ms = memory.app.state.clock.now_ms();
            let due_soon: Vec<usize> = (created.iter().copied())
                .filter(|s| (now_ms + 1..=now_ms + 180_000).contains(&memory.deadline_ms(*s)))
                .collect();
            let mut op = random_op(&mut rng, &created, &due_soon, &mut bodies);
            if let Op::Sweep { near, .. } = &mut op {
                // Requests created within the same few milliseconds can sit
                // on either side of such a moment, one way on one app and
                // the other way on the other: then sweep at the clocks' now.
                if let Some((s, delta_ms)) = *near {
                    if memory.due_near(s, delta_ms) != redis.due_near(s, delta_ms) {
                        *near = None;
                    }
                }
            }
            let at = format!("seed {seed}, step {step}: {op:?}");
            let ((expected_status, expected), (status, got)) =
                tokio::join!(memory.answer(&keys, &op), redis.answer(&keys, &op));
            if matches!(op, Op::Create { .. }) && expected_status == 201 {
                if memory.learn(step, &expected) {
                    created.push(step);
                }
                if status == 201 {
                    redis.learn(step, &got);
                }
            }
            assert_eq!(
                (status, redis.comparable(&got)),
                (expected_status, memory.comparable(&expected)),
                "{at}\nredis answered {status} {got}\nmemory answered {expected_status} {expected}"
            );
            let (expected, got) = tokio::join!(memory.pending(), redis.pending());
            assert_eq!(got, expected, "{at}: the approvals_pending gauge");
        }
        let (expected, got) = (
            memory.approval_events().await,
            redis.approval_events().await,
        );
        for (step, expected) in &expected {
            assert_eq!(
                got.get(step),
                Some(expected),
                "seed {seed}: the events of the approval of step {step}"
            );
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "seed {seed}: the approvals with events"
        );
    }
}
