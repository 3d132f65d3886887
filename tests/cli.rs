//! The command-line client against a live server.

mod common;

use std::process::Output;

use common::{Kind, Options, TestApp, TestKeys};
use serde_json::{Value, json};

/// Runs the binary with `args` against `app` (blocking work off the runtime).
async fn cli(app: &TestApp, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_attune-telemetry"));
    cmd.args(args)
        .env("ATTUNE_URL", &app.base)
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_non_zero_with_the_servers_detail() {
    let keys = TestKeys::new();
    let app = TestApp::spawn_with(Options::new(Kind::Memory).keys(&keys.toml)).await;
    let out = cli(&app, None, &["agents"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("401") && stderr(&out).contains("ATTUNE_TOKEN"),
        "{}",
        stderr(&out)
    );
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
