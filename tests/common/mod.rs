//! Test harness: boots the real app on an ephemeral port against either
//! engine, with a private `redis-server` that tests can kill and restart.
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use attune_telemetry::app;
use attune_telemetry::config::Config;
use serde_json::Value;

/// Which engine a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
}

/// Generates one test per engine from `async fn name(kind: Kind)` functions.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Memory).await }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Redis).await }
            )*
        }
    };
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            port: free_port(),
            child: None,
            dir,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (or starts again) the server on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().expect("utf-8 path"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run the Redis tests");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (data is lost: it keeps nothing on disk).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Holds every client's commands for `ms` (`CLIENT PAUSE … ALL`): a
    /// Redis that accepts connections and answers nothing.
    pub fn pause(&self, ms: u64) {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query(&mut self.conn())
            .expect("CLIENT PAUSE");
    }

    /// A synchronous connection for assertions on the raw keyspace.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

static PREFIX_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh key prefix for one test.
pub fn fresh_prefix() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running service.
pub struct TestApp {
    pub kind: Kind,
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub redis: Option<RedisServer>,
    pub prefix: String,
    /// The token sent with every request made through the helpers.
    pub token: Option<String>,
    /// The app's state (its clock, engine and hub).
    pub state: app::AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

/// Settings for [`TestApp::spawn_with`].
pub struct Options {
    pub kind: Kind,
    /// Adjusts the config before the app is built.
    pub configure: Box<dyn FnOnce(&mut Config) + Send>,
    /// Reuse this Redis (and prefix) instead of starting one: for several
    /// service instances sharing one Redis.
    pub redis_url: Option<(String, String)>,
    /// A keys file to write and use.
    pub keys_file: Option<String>,
}

impl Options {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            configure: Box::new(|_| {}),
            redis_url: None,
            keys_file: None,
        }
    }

    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure = Box::new(f);
        self
    }

    pub fn shared_redis(mut self, url: &str, prefix: &str) -> Self {
        self.redis_url = Some((url.to_owned(), prefix.to_owned()));
        self
    }

    pub fn keys(mut self, toml: &str) -> Self {
        self.keys_file = Some(toml.to_owned());
        self
    }
}

/// The Redis timeout of test apps (see [`TestApp::spawn_with`]).
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

impl TestApp {
    pub async fn spawn(kind: Kind) -> Self {
        Self::spawn_with(Options::new(kind)).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let mut config = Config::for_tests();
        config.sweep_interval = Duration::from_millis(50);
        config.shutdown_grace = Duration::from_secs(2);
        // Generous: on a loaded machine a debug build's calls can queue past
        // the production 500 ms, and a 503 there would fail a test about
        // something else. Tests of the bound itself set it back.
        config.redis_timeout = REDIS_TIMEOUT;
        let mut redis = None;
        let mut prefix = fresh_prefix();
        match (options.kind, options.redis_url) {
            (Kind::Memory, _) => config.redis_url = None,
            (Kind::Redis, Some((url, shared_prefix))) => {
                config.redis_url = Some(url);
                prefix = shared_prefix;
            }
            (Kind::Redis, None) => {
                let server = RedisServer::start();
                config.redis_url = Some(server.url());
                redis = Some(server);
            }
        }
        config.key_prefix = prefix.clone();
        if let Some(keys) = options.keys_file {
            let path: PathBuf = std::env::temp_dir().join(format!("attune-keys-{prefix}.toml"));
            std::fs::write(&path, keys).expect("write keys file");
            config.keys_file = Some(path);
        }
        (options.configure)(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        config.listen = addr;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let built = app::build(config).await.expect("app builds");
        let state = built.state.clone();
        let task = tokio::spawn(app::serve(built, listener, async move {
            let _ = rx.await;
        }));
        Self {
            kind: options.kind,
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .expect("client"),
            redis,
            prefix,
            token: None,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A service with `keys`, whose helpers send the admin's token.
    pub async fn spawn_as_admin(kind: Kind, keys: &TestKeys) -> Self {
        Self::spawn_with(Options::new(kind).keys(&keys.toml))
            .await
            .with_token(&keys.admin)
    }

    /// Another instance of the service on the same Redis and prefix.
    pub async fn replica(&self) -> Self {
        let url = self.redis_url().expect("replicas need the Redis engine");
        Self::spawn_with(Options::new(Kind::Redis).shared_redis(&url, &self.prefix)).await
    }

    pub fn redis_url(&self) -> Option<String> {
        self.redis.as_ref().map(RedisServer::url)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    fn auth(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
        match token.or(self.token.as_deref()) {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, None).await
    }

    pub async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let resp = self
            .auth(self.client.get(self.url(path)), token)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_as(path, body, None).await
    }

    pub async fn post_as(&self, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
        let resp = self
            .auth(self.client.post(self.url(path)).json(&body), token)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    /// Posts `body` as written, as JSON: for bodies a `Value` cannot
    /// carry (malformed, a field twice, nested past the parser).
    pub async fn post_text(&self, path: &str, body: impl Into<String>) -> (u16, Value) {
        let req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.into());
        decode(self.auth(req, None).send().await.expect("request")).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.delete_as(path, None).await
    }

    pub async fn delete_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let resp = self
            .auth(self.client.delete(self.url(path)), token)
            .send()
            .await
            .expect("request");
        decode(resp).await
    }

    /// The text of `/metrics`, read with the app's token if it has one.
    pub async fn metrics_text(&self) -> String {
        self.auth(self.client.get(self.url("/metrics")), None)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Every event in the log, oldest first (via the history endpoint).
    pub async fn all_events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut since = String::new();
        loop {
            let (status, body) = self
                .get(&format!("/v1/events?limit=1000&since={since}"))
                .await;
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().expect("events").clone();
            out.extend(events);
            match body["next_cursor"].as_str() {
                Some(c) => since = c.to_owned(),
                None => return out,
            }
        }
    }

    /// Events of one type.
    pub async fn events_of(&self, kind: &str) -> Vec<Value> {
        self.all_events()
            .await
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Asks the service to stop and returns its serving task, to see when
    /// it ends.
    pub fn begin_stop(&mut self) -> tokio::task::JoinHandle<Result<(), String>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("the service is running")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn decode(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

/// A keys file with one key per role (plus a scoped agent key), and the
/// secrets to use them.
pub struct TestKeys {
    pub toml: String,
    pub admin: String,
    pub agent: String,
    /// An agent key limited to `ci-*`.
    pub ci_agent: String,
    pub approver: String,
    pub viewer: String,
}

impl TestKeys {
    pub fn new() -> Self {
        use attune_telemetry::auth::{Role, new_key};
        let (admin, a) = new_key("ops-admin", Role::Admin, &[]);
        let (agent, b) = new_key("agent-key", Role::Agent, &[]);
        let (ci_agent, c) = new_key("ci-key", Role::Agent, &["ci-*".to_owned()]);
        let (approver, d) = new_key("alice", Role::Approver, &[]);
        let (viewer, e) = new_key("dashboard", Role::Viewer, &[]);
        Self {
            toml: [a, b, c, d, e].join("\n"),
            admin,
            agent,
            ci_agent,
            approver,
            viewer,
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The field named by the first entry of a problem's `errors`.
pub fn problem_field(body: &Value) -> String {
    body["errors"][0]["field"].as_str().unwrap_or("").to_owned()
}

/// Where two JSON values first differ, as a JSON pointer
/// (`/body/by_workflow/review/calls`), if they do.
pub fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.keys()
                .chain(y.keys())
                .find_map(|k| match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, &format!("{path}/{k}")),
                    _ => Some(format!("{path}/{k}")),
                })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}/{i}"))),
        _ => (a != b).then(|| path.to_owned()),
    }
}

/// Calls `f` on every string in `value`, however deep: to put one app's
/// ids in the other app's terms before two answers are compared.
pub fn for_each_string(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| for_each_string(v, f)),
        Value::Object(fields) => fields.values_mut().for_each(|v| for_each_string(v, f)),
        _ => {}
    }
}

/// Replaces every string in `value` that `names` has a name for by that
/// name: ids one app made, renamed to the other app's for the same thing.
pub fn rename_strings(value: &mut Value, names: &std::collections::HashMap<String, String>) {
    for_each_string(value, &mut |s| {
        if let Some(name) = names.get(s.as_str()) {
            *s = name.clone();
        }
    });
}
