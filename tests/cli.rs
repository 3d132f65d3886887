//! The command-line client against a live server.

mod common;

use std::process::Output;

use common::{Kind, Options, TestApp, TestKeys};
use serde_json::{Value, json};

/// Runs the binary with `args` against `app` (blocking work off the runtime).
async fn cli(app: &TestApp, token: Option<&str>, args: &[&str]) -> Output {
    cli_at(&app.base, token, args).await
}

/// Runs the binary with `args` against the server at `url`.
async fn cli_at(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
    cmd.args(args)
        .env("ATTUNE_URL", url)
        .env_remove("ATTUNE_TOKEN");
    if let Some(t) = token {
        cmd.env("ATTUNE_TOKEN", t);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("binary runs"))
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_performance_print_aligned_rows_and_json_parses() {
    let app = TestApp::spawn(Kind::Memory).await;
    app.post(
        "/v1/agents/writer-1/heartbeats",
        json!({"status": "starting", "progress": 0.5, "current_task": "draft"}),
    )
    .await;
    app.post(
        "/v1/agents/writer-1/heartbeats",
        json!({"status": "completed"}),
    )
    .await;
    app.post("/v1/agents/reader-2/heartbeats", json!({"progress": 0.25}))
        .await;

    let out = cli(&app, None, &["agents"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("AGENT") && lines[0].contains("STATE"),
        "{text}"
    );
    let reader = lines
        .iter()
        .find(|l| l.contains("reader-2"))
        .expect("reader row");
    assert!(
        reader.contains("up") && reader.contains("25.0%"),
        "{reader}"
    );
    let writer = lines
        .iter()
        .find(|l| l.contains("writer-1"))
        .expect("writer row");
    assert!(
        writer.contains("finished") && writer.contains("completed"),
        "{writer}"
    );
    // Columns are aligned: the STATE column starts at the same offset on every row.
    let offset = lines[0].find("STATE").unwrap();
    assert_eq!(&reader[offset..offset + 2], "up");

    let out = cli(&app, None, &["agent-performance", "--json"]).await;
    assert!(out.status.success());
    let perf: Value = serde_json::from_str(&stdout(&out)).expect("--json parses");
    assert_eq!(perf["total"]["runs"], 2);
    let out = cli(&app, None, &["agent-performance"]).await;
    let text = stdout(&out);
    let writer = text
        .lines()
        .find(|l| l.trim_start().starts_with("writer-1"))
        .unwrap();
    assert!(writer.contains("100.0%"), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("total")));

    let out = cli(&app, None, &["agents", "--stale", "3600", "--json"]).await;
    let stale: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stale["agents"], json!([]));
    let out = cli(&app, None, &["agents", "--status", "completed"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("writer-1") && !text.contains("reader-2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_non_zero_with_the_servers_detail() {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(Kind::Memory).keys(&keys.toml)).await;
    // An empty `ATTUNE_TOKEN` is no token, and gets the same hint.
    for token in [None, Some("")] {
        let out = cli(&app, token, &["agents"]).await;
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("401") && stderr(&out).contains("ATTUNE_TOKEN"),
            "{}",
            stderr(&out)
        );
    }
    let out = cli(&app, Some(&keys.viewer), &["agents", "--state", "sideways"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("state"), "{}", stderr(&out));
    let out = cli(&app, Some(&keys.viewer), &["agents"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_gets_a_friendly_message() {
    let app = TestApp::spawn(Kind::Memory).await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
    let port = common::free_port();
    cmd.args(["agents", "--url", &format!("http://127.0.0.1:{port}")]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the server"),
        "{}",
        stderr(&out)
    );
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_listed_and_decided_from_the_command_line() {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(Kind::Memory).keys(&keys.toml)).await;
    let mut ids = Vec::new();
    for agent in ["deployer-1", "deployer-2"] {
        let (status, body) = app
            .post_as(
                "/v1/approvals",
                json!({"approval_type": "deploy", "agent_id": agent, "context": {"env": "prod"}}),
                Some(&keys.agent),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["request"]["request_id"].as_str().unwrap().to_owned());
    }
    let approver = Some(keys.approver.as_str());
    let out = cli(&app, approver, &["approvals"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for id in &ids {
        assert!(
            text.lines()
                .any(|l| l.contains(id.as_str()) && l.contains("pending") && l.contains("deploy")),
            "{text}"
        );
    }
    let out = cli(
        &app,
        approver,
        &["approvals", "approve", &ids[0], "--reason", "looks fine"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("approved") && stdout(&out).contains("alice"),
        "{}",
        stdout(&out)
    );
    let out = cli(
        &app,
        approver,
        &[
            "approvals",
            "reject",
            &ids[1],
            "--reason",
            "not today",
            "--json",
        ],
    )
    .await;
    let decided: Value = serde_json::from_str(&stdout(&out)).expect("--json parses");
    assert_eq!(decided["request"]["status"], "rejected");
    assert_eq!(decided["response"]["reason"], "not today");
    // Deciding again fails with the server's detail naming the status.
    let out = cli(&app, approver, &["approvals", "approve", &ids[1]]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("409") && stderr(&out).contains("rejected"),
        "{}",
        stderr(&out)
    );
    let out = cli(
        &app,
        approver,
        &["approvals", "list", "--status", "approved", "--json"],
    )
    .await;
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["approvals"].as_array().unwrap().len(), 1);
}

/// Sends a `ready` signal from "planner" to "coder".
async fn ready_for_coder(app: &TestApp) {
    let (status, _) = app
        .post(
            "/v1/signals",
            json!({"signal_type": "ready", "source_agent": "planner", "target_agent": "coder"}),
        )
        .await;
    assert_eq!(status, 201);
}

/// The client's consuming read carries an `Idempotency-Key`, so the service
/// keeps what it took for a retry (seen as the receipt on Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consuming_read_from_the_command_line_can_be_retried() {
    let app = TestApp::spawn(Kind::Redis).await;
    ready_for_coder(&app).await;
    let out = cli(
        &app,
        None,
        &["signals", "inbox", "coder", "--consume", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let read: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(read["signals"].as_array().map(Vec::len), Some(1));
    let mut conn = app.redis.as_ref().expect("redis").conn();
    let receipts: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{}}}:receipt:coder:*", app.prefix))
        .query(&mut conn)
        .expect("KEYS");
    assert_eq!(receipts.len(), 1, "{receipts:?}");

    // A key given by hand: the same key again gets the same answer.
    app.post(
        "/v1/signals",
        json!({"signal_type": "go", "source_agent": "planner", "target_agent": "coder"}),
    )
    .await;
    let by_hand = [
        "signals",
        "inbox",
        "coder",
        "--consume",
        "--idempotency-key",
        "k-1",
        "--json",
    ];
    let first = stdout(&cli(&app, None, &by_hand).await);
    let again = stdout(&cli(&app, None, &by_hand).await);
    let read: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(read["signals"][0]["signal_type"], "go", "{again}");
    assert_eq!(first, again);
}

/// The head of the request on `socket`: a GET without a body, so its head
/// is all there is.
async fn read_head(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A proxy in front of `app` that passes every request on but loses the
/// first two answers: the first connection is closed without one, the
/// second gets a 504. Returns its address and the `Idempotency-Key` of
/// each request it saw.
async fn lossy_proxy(
    app: &TestApp,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (base, client, log) = (app.base.clone(), app.client.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let head = read_head(&mut socket).await;
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("idempotency-key: "))
                .map(str::to_owned);
            let mut upstream = client.get(format!("{base}{path}"));
            if let Some(key) = &key {
                upstream = upstream.header("Idempotency-Key", key);
            }
            let answer = upstream.send().await.unwrap().text().await.unwrap();
            let attempt = {
                let mut log = log.lock().unwrap();
                log.push(key);
                log.len()
            };
            let reply = match attempt {
                1 => continue, // dropped: no answer at all
                2 => {
                    "HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                }
                _ => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                ),
            };
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    });
    (addr, seen)
}

/// A server that answers every request with the next of `pages` (JSON
/// bodies), recording each request's path.
async fn canned_pages(
    pages: Vec<Value>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for page in pages {
            let (mut socket, _) = listener.accept().await.unwrap();
            let head = read_head(&mut socket).await;
            log.lock()
                .unwrap()
                .push(head.split(' ').nth(1).unwrap_or("/").to_owned());
            let body = page.to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
        }
    });
    (addr, seen)
}

fn sparse_row(id: &str) -> Value {
    json!({"request": {"request_id": id, "approval_type": "deploy", "agent_id": "sparse-1",
                       "status": "pending", "requested_by": "sparse-1",
                       "created_at": "2026-11-27T10:00:00.000Z",
                       "expires_at": "2026-11-27T10:05:00.000Z"},
           "response": null})
}

/// A filtered listing may answer a short page, even an empty one, with a
/// cursor (the server reads a bounded number of records per page, more for
/// a larger page): the command line asks for pages of at least 100 rows
/// and follows the cursor; a page with more rows than it still wants says
/// there is more, and the rows up to it are read again in a page of
/// exactly what is wanted, so the cursor it gives follows the last row
/// shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_follow_the_cursor_past_short_pages() {
    let (url, seen) = canned_pages(vec![
        json!({"approvals": [], "next_cursor": "c1"}),
        json!({"approvals": [sparse_row("first")], "next_cursor": "c2"}),
        json!({"approvals": [sparse_row("second"), sparse_row("third")], "next_cursor": "c3"}),
        json!({"approvals": [sparse_row("second")], "next_cursor": "c2b"}),
    ])
    .await;
    let out = cli_at(
        &url,
        None,
        &[
            "approvals",
            "list",
            "--agent",
            "sparse-1",
            "--limit",
            "2",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let body: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ids: Vec<&str> = body["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["request"]["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["first", "second"]);
    assert_eq!(
        body["next_cursor"], "c2b",
        "the cursor after the last row shown"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "/v1/approvals?status=pending&agent_id=sparse-1&limit=100",
            "/v1/approvals?status=pending&agent_id=sparse-1&limit=100&cursor=c1",
            "/v1/approvals?status=pending&agent_id=sparse-1&limit=100&cursor=c2",
            "/v1/approvals?status=pending&agent_id=sparse-1&limit=1&cursor=c2",
        ]
    );

    // As a table: the rows, and that more follow.
    let (url, _) = canned_pages(vec![
        json!({"approvals": [sparse_row("first")], "next_cursor": "c1"}),
        json!({"approvals": [sparse_row("second"), sparse_row("third")], "next_cursor": "c2"}),
        json!({"approvals": [sparse_row("second")], "next_cursor": "c2b"}),
    ])
    .await;
    let out = cli_at(&url, None, &["approvals", "list", "--limit", "2"]).await;
    let text = stdout(&out);
    assert!(text.contains("first") && text.contains("second"), "{text}");
    assert!(!text.contains("third"), "{text}");
    assert!(text.contains("(more: raise --limit)"), "{text}");
}

/// A full page comes with a cursor whether or not anything follows it: the
/// command line looks, and says "more" only when there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listing_with_nothing_after_it_says_no_more() {
    let (url, seen) = canned_pages(vec![
        json!({"approvals": [sparse_row("only")], "next_cursor": "c1"}),
        json!({"approvals": [], "next_cursor": "c2"}),
        json!({"approvals": [], "next_cursor": null}),
    ])
    .await;
    let out = cli_at(&url, None, &["approvals", "list", "--limit", "1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("only"), "{text}");
    assert!(!text.contains("more"), "{text}");
    assert_eq!(seen.lock().unwrap().len(), 3);

    // On a real server: one failed agent among others, and one pending
    // approval of a type among others, each the whole of its listing.
    let app = TestApp::spawn(Kind::Memory).await;
    app.post("/v1/agents/a1/heartbeats", json!({"status": "failed"}))
        .await;
    app.post("/v1/agents/a2/heartbeats", json!({})).await;
    for (kind, agent) in [("deploy", "x"), ("other", "y")] {
        let (status, body) = app
            .post(
                "/v1/approvals",
                json!({"approval_type": kind, "agent_id": agent}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    for args in [
        &["agents", "--status", "failed", "--limit", "1"][..],
        &["approvals", "list", "--type", "deploy", "--limit", "1"][..],
    ] {
        let out = cli(&app, None, args).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().count(), 2, "{args:?}: {text}");
        assert!(!text.contains("more"), "{args:?}: {text}");
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let out = cli(&app, None, &json_args).await;
        let body: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert!(body["next_cursor"].is_null(), "{args:?}: {body}");
    }
}

/// `agent-performance` reads every page, but not without end: a server
/// that keeps answering with a cursor is left after 100 pages, and the
/// table says it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_performance_reads_at_most_a_hundred_pages() {
    let page = json!({"agents": [], "next_cursor": "again",
                      "total": {"agent_id": "total", "runs": 0}});
    let (url, seen) = canned_pages(vec![page; 100]).await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
    cmd.args(["agent-performance", "--url", &url, "--timeout", "5"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped after"), "{}", stdout(&out));
    assert_eq!(seen.lock().unwrap().len(), 100);
}

/// Text agents sent reaches the operator's terminal inert: in tables,
/// controls and reordering marks are escaped; in `--json`, DEL, the C1
/// controls and those marks are `\u` escapes (JSON leaves them raw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_agents_cannot_act_on_the_terminal() {
    let app = TestApp::spawn(Kind::Memory).await;
    let task = "A\u{9b}31mB\u{7f}C \u{202e}reversed";
    let (status, body) = app
        .post("/v1/agents/odd/heartbeats", json!({"current_task": task}))
        .await;
    assert_eq!(status, 200, "{body}");
    let out = cli(&app, None, &["agents", "--json"]).await;
    let text = stdout(&out);
    assert!(!text.contains(['\u{9b}', '\u{7f}', '\u{202e}']), "{text:?}");
    assert!(
        text.contains("\\u009b31mB\\u007fC \\u202ereversed"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["agents"][0]["current_task"], task);

    let out = cli(&app, None, &["agents"]).await;
    let text = stdout(&out);
    assert!(!text.contains(['\u{9b}', '\u{7f}', '\u{202e}']), "{text:?}");
    assert!(text.contains("\\u{202e}reversed"), "{text}");

    // The server's problem detail quotes what it was sent.
    let out = cli(&app, None, &["agents", "--state", "\u{1b}[31mX"]).await;
    assert!(!out.status.success());
    assert!(!stderr(&out).contains('\u{1b}'), "{:?}", stderr(&out));
    assert!(stderr(&out).contains("\\u{1b}[31mX"), "{}", stderr(&out));
}

/// When the answer of a consuming read is lost (no answer, then a 504),
/// the command line asks again with the same `Idempotency-Key` and prints
/// what the first attempt took, which is gone from the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_retries_a_lost_consuming_read_with_the_same_key() {
    let app = TestApp::spawn(Kind::Memory).await;
    ready_for_coder(&app).await;
    let (proxy, seen) = lossy_proxy(&app).await;
    let out = cli_at(
        &proxy,
        None,
        &["signals", "inbox", "coder", "--consume", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let read: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(read["signals"][0]["signal_type"], "ready", "{read}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].is_some(), "{seen:?}");
    assert!(seen.iter().all(|key| *key == seen[0]), "{seen:?}");
    let (_, inbox) = app.get("/v1/agents/coder/signals").await;
    assert_eq!(inbox["signals"], json!([]), "{inbox}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_sent_and_read_from_the_command_line() {
    let app = TestApp::spawn(Kind::Memory).await;
    let out = cli(
        &app,
        None,
        &[
            "signals",
            "send",
            "--type",
            "ready",
            "--from",
            "planner",
            "--to",
            "coder",
            "--payload",
            r#"{"step":2}"#,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("sent ready"), "{}", stdout(&out));
    let out = cli(&app, None, &["signals", "inbox", "coder"]).await;
    let text = stdout(&out);
    let row = text.lines().find(|l| l.contains("ready")).expect("a row");
    assert!(
        row.contains("planner") && row.contains("coder") && row.contains(r#"{"step":2}"#),
        "{row}"
    );
    let out = cli(
        &app,
        None,
        &["signals", "inbox", "coder", "--consume", "--json"],
    )
    .await;
    let read: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(read["signals"].as_array().unwrap().len(), 1);
    let out = cli(&app, None, &["signals", "inbox", "coder", "--json"]).await;
    let read: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(read["signals"], json!([]));
    let out = cli(
        &app,
        None,
        &[
            "signals",
            "send",
            "--type",
            "ready",
            "--from",
            "planner",
            "--payload",
            "[1]",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("payload"), "{}", stderr(&out));
}

/// `signals inbox --limit` pages like the other listings: a full page says
/// there is more, and the next read takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_from_the_command_line_takes_a_limit() {
    let app = TestApp::spawn(Kind::Memory).await;
    for step in 0..3 {
        let (status, sent) = app
            .post(
                "/v1/signals",
                json!({"signal_type": "ready", "source_agent": "planner",
                       "target_agent": "coder", "payload": {"step": step}}),
            )
            .await;
        assert_eq!(status, 201, "{sent}");
    }
    let out = cli(&app, None, &["signals", "inbox", "coder", "--limit", "2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines().filter(|l| l.contains("ready")).count(),
        2,
        "{text}"
    );
    assert!(text.contains("(more: raise --limit)"), "{text}");

    let args = [
        "signals",
        "inbox",
        "coder",
        "--consume",
        "--limit",
        "2",
        "--json",
    ];
    let out = cli(&app, None, &args).await;
    let read: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(read["signals"].as_array().unwrap().len(), 2, "{read}");
    let out = cli(&app, None, &["signals", "inbox", "coder"]).await;
    let text = stdout(&out);
    assert_eq!(
        text.lines().filter(|l| l.contains("ready")).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("more"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_summaries_print_money_and_percentages() {
    let app = TestApp::spawn(Kind::Memory).await;
    let record = |id: &str, tier: &str, model: &str, input: u64, cache_read: u64| {
        json!({
            "id": id, "workflow": "review", "stage": "lint", "tier": tier, "model": model,
            "provider": "anthropic", "duration_ms": 900,
            "tokens": {"input": input, "output": 1000, "cache_read": cache_read, "cache_creation": 0}
        })
    };
    let (status, body) = app
        .post(
            "/v1/usage",
            json!({"records": [
                record("c1", "cheap", "claude-haiku-4-5", 10_000, 20_000),
                record("c2", "premium", "claude-opus-4-8", 10_000, 0),
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let out = cli(&app, None, &["show"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // haiku: 10k × $1/M + 1k × $5/M + 20k × $0.10/M = $0.0170
    let cheap = text
        .lines()
        .find(|l| l.contains("cheap"))
        .expect("cheap row");
    assert!(
        cheap.contains("review") && cheap.contains("$0.0170") && cheap.contains("read 20000"),
        "{cheap}"
    );
    // opus: 10k × $5/M + 1k × $25/M = $0.0750
    assert!(
        text.lines()
            .any(|l| l.contains("premium") && l.contains("$0.0750")),
        "{text}"
    );
    assert!(text.contains("2 calls, $0.0920 total"), "{text}");

    let out = cli(&app, None, &["savings"]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    // Baseline: both at opus prices, cache reads at full input price:
    // (30k × 5 + 1k × 25) / 1M + $0.0750 = $0.1750 + $0.0750 = $0.2500.
    assert!(
        text.lines()
            .any(|l| l.contains("all-premium baseline") && l.contains("$0.2500")),
        "{text}"
    );
    assert!(
        text.contains("calls by tier: capable 0.0%, cheap 50.0%, premium 50.0%"),
        "{text}"
    );

    let out = cli(&app, None, &["cache-stats"]).await;
    let text = stdout(&out);
    assert!(text.contains("hit rate 50.0%, 1 of 2 requests"), "{text}");
    // 20k reads × ($1 − $0.10)/M = $0.0180 saved.
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("review"))
        .expect("workflow row");
    assert!(row.contains("20000") && row.contains("$0.0180"), "{row}");

    for command in ["show", "savings", "cache-stats"] {
        let out = cli(&app, None, &[command, "--json"]).await;
        serde_json::from_str::<Value>(&stdout(&out))
            .unwrap_or_else(|e| panic!("{command} --json: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_one_line_per_event() {
    let app = TestApp::spawn(Kind::Memory).await;
    app.post(
        "/v1/agents/tailed/heartbeats",
        json!({"status": "starting"}),
    )
    .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"))
        .args(["tail", "--since", "0", "--types", "agent.*", "--json"])
        .env("ATTUNE_URL", &app.base)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut types = Vec::new();
    while types.len() < 2 {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("still running");
        let event: Value = serde_json::from_str(&line).expect("one JSON event per line");
        types.push(event["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(types, vec!["agent.started", "agent.heartbeat"]);
}

/// Runs the binary with `args` and `env`, no server needed.
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("binary runs")
}

#[test]
fn keys_new_refuses_an_entry_the_server_would_refuse() {
    let ok = run_bin(
        &[
            "keys", "new", "--name", "ci", "--role", "agent", "--agents", "ci-*",
        ],
        &[],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).starts_with("atk_"), "{}", stdout(&ok));
    // Standard error is a keys file as it is (`2>> keys.toml`), holding
    // the key whose secret went to standard output.
    let ring = attune_telemetry::auth::KeyRing::parse(&stderr(&ok)).expect("loadable TOML");
    assert_eq!(
        ring.authenticate(Some(stdout(&ok).trim()))
            .map(|id| id.name)
            .ok(),
        Some("ci".to_owned())
    );
    for args in [
        [
            "keys", "new", "--name", "dash", "--role", "viewer", "--agents", "ci-*",
        ]
        .as_slice(),
        ["keys", "new", "--name", "system", "--role", "approver"].as_slice(),
    ] {
        let out = run_bin(args, &[]);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stdout(&out).is_empty(), "no secret for a refused entry");
        assert!(stderr(&out).contains("error:"), "{}", stderr(&out));
    }
}

#[test]
fn boolean_settings_read_1_and_yes_from_the_environment() {
    for value in ["1", "yes", "true", "0", "off"] {
        let out = run_bin(
            &["openapi"],
            &[
                ("ATTUNE_NO_HEARTBEAT_EVENTS", value),
                ("ATTUNE_INSECURE_ALLOW_ANONYMOUS", value),
            ],
        );
        assert!(out.status.success(), "{value}: {}", stderr(&out));
    }
    let out = run_bin(&["openapi"], &[("ATTUNE_NO_HEARTBEAT_EVENTS", "maybe")]);
    assert!(
        !out.status.success(),
        "a value that is no boolean is refused"
    );
}

/// A reader that goes away (`| head`) ends a command quietly, as it ends
/// any Unix tool: no panic, exit 0.
/// Runs the binary with `args`, its standard output a pipe whose reading
/// end is closed before the command writes.
fn with_output_closed(args: &[&str]) -> Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_attune-telemetry"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    drop(child.stdout.take());
    child.wait_with_output().expect("it ends")
}

#[test]
fn a_closed_output_pipe_ends_a_command_quietly() {
    // Standard output is a pipe whose reading end is closed before the
    // command writes (the OpenAPI document is far larger than a pipe holds).
    let output = with_output_closed(&["openapi"]);
    let err = stderr(&output);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(output.status.code(), Some(0), "{err}");
}

/// Standard error carries the keys file entry: where it cannot be written,
/// the command fails (exit 1, no panic) before it hands out a secret
/// nobody could install.
#[test]
fn keys_new_gives_no_secret_when_its_entry_cannot_be_written() {
    use std::process::{Command, Stdio};
    let keys_new = |stdout: Stdio, stderr: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_attune-telemetry"))
            .args(["keys", "new", "--name", "ci", "--role", "agent"])
            .stdout(stdout)
            .stderr(stderr)
            .output()
            .expect("binary runs")
    };
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let output = keys_new(Stdio::piped(), Stdio::from(full));
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));

    // Nor to a stream that goes nowhere: one closed when it started (the
    // process finds `/dev/null` in its place) or `/dev/null` itself.
    let output = keys_new(Stdio::piped(), Stdio::null());
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
    let output = keys_new(Stdio::null(), Stdio::piped());
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("standard output") && !stderr(&output).contains("[[keys]]"),
        "{}",
        stderr(&output)
    );

    // A secret that cannot be shown is a failure too, not a quiet end.
    let output = with_output_closed(&["keys", "new", "--name", "ci", "--role", "agent"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("standard output"),
        "{}",
        stderr(&output)
    );
}

/// A flag out of range is named as the flag, before any request (the
/// server's answer would name its own field, `threshold_seconds`).
#[test]
fn out_of_range_flags_are_refused_by_their_own_name() {
    for (args, flag) in [
        (&["agents", "--stale", "0"][..], "--stale"),
        (&["agents", "--limit", "10001"][..], "--limit"),
        (&["show", "--limit", "1001"][..], "--limit"),
        (&["agents", "--url", "127.0.0.1:8080"][..], "--url"),
        (&["agents", "--url", "https://127.0.0.1:8080"][..], "--url"),
        (&["agents", "--token", "two words"][..], "--token"),
        (
            &[
                "signals",
                "inbox",
                "coder",
                "--consume",
                "--idempotency-key",
                "two words",
            ][..],
            "--idempotency-key",
        ),
        (&["signals", "inbox", "coder", "--wait", "61"][..], "--wait"),
        (
            &["signals", "inbox", "coder", "--limit", "0"][..],
            "--limit",
        ),
        (
            &[
                "signals", "send", "--type", "t", "--from", "a", "--ttl", "0",
            ][..],
            "--ttl",
        ),
        (&["approvals", "list", "--limit", "0"][..], "--limit"),
    ] {
        let output = run_bin(args, &[("ATTUNE_URL", "http://127.0.0.1:9")]);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(flag),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_rejection_needs_a_reason() {
    for reason in ["", "  "] {
        let output = run_bin(&["approvals", "reject", "some-id", "--reason", reason], &[]);
        assert_eq!(output.status.code(), Some(2), "{reason:?}");
        assert!(stderr(&output).contains("--reason"), "{}", stderr(&output));
    }
}

#[test]
fn stale_and_state_or_status_are_alternatives() {
    for filter in ["--state", "--status"] {
        let output = run_bin(&["agents", "--stale", "60", filter, "down"], &[]);
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr(&output).contains("cannot be used with"),
            "{}",
            stderr(&output)
        );
    }
}

/// A server that takes the connection and never answers fails the command
/// within `--timeout`, with a reason, instead of hanging it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_the_command_in_time() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let output = cli_at(&url, None, &["agents", "--timeout", "1"]).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("did not answer in time"),
        "{}",
        stderr(&output)
    );
    drop(silent);
}

/// Text agents send is shown with control characters escaped: a row stays
/// one line, and no escape sequence reaches the terminal. An agent id with
/// a space travels as `%20` in a path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_text_cannot_break_a_table_or_reach_the_terminal() {
    let app = TestApp::spawn(Kind::Memory).await;
    app.post(
        "/v1/agents/noisy/heartbeats",
        json!({"current_task": "line1\nline2\u{1b}[31mRED\u{7}"}),
    )
    .await;
    let output = cli(&app, None, &["agents"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    let row = text.lines().find(|l| l.contains("noisy")).expect("a row");
    assert!(row.contains(r"line1\nline2\u{1b}[31mRED"), "{row}");

    let output = cli(&app, None, &["signals", "inbox", "bad id"]).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("agent_id"), "{}", stderr(&output));
    assert!(!stderr(&output).contains('+'), "{}", stderr(&output));
}

/// A hang-up (a closed terminal session, or an operator expecting a reload)
/// leaves the server running; SIGTERM still ends it cleanly. Its log, in a
/// file, has no terminal colour codes.
#[cfg(unix)]
#[test]
fn sighup_leaves_the_server_running_and_sigterm_ends_it() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let port = common::free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_attune-telemetry"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("ATTUNE_REDIS_URL")
        .env_remove("REDIS_URL")
        .stdout(Stdio::from(log.reopen().unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("binary runs");
    let healthy = || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            );
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.1 200")
        })
    };
    let started = Instant::now();
    while !healthy() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = server.id().to_string();
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    };
    signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    assert!(healthy(), "the server stopped answering after SIGHUP");
    signal("-TERM");
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("SIGHUP ignored"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text}");
}

/// A hang-up while the server still waits for Redis at start does not end
/// it either.
#[cfg(unix)]
#[test]
fn sighup_during_start_up_leaves_the_server_waiting() {
    use std::process::{Command, Stdio};
    use std::time::Duration;
    let closed = common::free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_attune-telemetry"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .args(["--redis-url", &format!("redis://127.0.0.1:{closed}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary runs");
    // Well inside its ten seconds of waiting for Redis.
    std::thread::sleep(Duration::from_millis(700));
    let hup = Command::new("kill")
        .args(["-HUP", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(300));
    let state = server.try_wait().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        state.is_none(),
        "SIGHUP ended the server at start: {state:?}"
    );
}

/// `migrate` takes the prefix and the timeout `serve` would: a prefix
/// `serve` refuses (here one that would make another Cluster hash tag) or
/// a timeout out of bounds stops it before it writes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_what_serve_refuses() {
    let redis = common::RedisServer::start();
    for (flag, value) in [
        ("--key-prefix", "x y}z"),
        ("--key-prefix", ""),
        ("--redis-timeout-ms", "0"),
        ("--redis-timeout-ms", "99999999"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
        cmd.args(["migrate", "--redis-url", &redis.url(), flag, value]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(!out.status.success(), "{flag} {value:?}: {}", stdout(&out));
        assert!(stderr(&out).contains(flag), "{flag}: {}", stderr(&out));
    }
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}
