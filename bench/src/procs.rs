//! The processes a run starts itself (Redis, the service, the reference
//! gateway), and what `/proc` says about them.
//!
//! Every child is held by a [`Child`] guard that kills it when dropped, so
//! an error, a panic or Ctrl-C in the middle of a scenario never leaves a
//! server behind. Children inherit the bench's raised open-file limit, which
//! is what lets the service hold 10,000 WebSockets.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A started process, killed (SIGKILL) and reaped on drop.
pub struct Child {
    pub name: String,
    pub url: String,
    child: std::process::Child,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("{} exited early ({status})", self.name)),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("cannot check on {}: {e}", self.name)),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Runs a build command to completion, its output going to our stderr.
pub fn build(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("building {what} …");
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo to build {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building {what} failed ({status})"))
    }
}

/// Where logs of started processes go.
pub struct Spawner {
    pub log_dir: PathBuf,
}

impl Spawner {
    fn spawn(&self, name: &str, url: String, cmd: &mut Command) -> Result<Child, String> {
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Child {
            name: name.to_owned(),
            url,
            child,
        })
    }

    /// A private `redis-server` that keeps nothing on disk.
    pub async fn redis(&self) -> Result<Child, String> {
        let port = free_port()?;
        let url = format!("redis://127.0.0.1:{port}");
        let mut child = self.spawn(
            "redis",
            url.clone(),
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(&self.log_dir),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            child.check_running()?;
            if let Ok(client) = redis::Client::open(url.as_str())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(child);
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The service; `redis_url: None` runs the memory engine.
    pub async fn service(
        &self,
        name: &str,
        bin: &Path,
        redis_url: Option<&str>,
        key_prefix: &str,
        extra: &[&str],
    ) -> Result<Child, String> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--key-prefix", key_prefix, "--log", "warn"])
            .args(extra)
            // Configuration comes from the flags above only.
            .env_remove("REDIS_URL")
            .env_remove("ATTUNE_REDIS_URL")
            .env_remove("ATTUNE_KEYS_FILE");
        if let Some(r) = redis_url {
            cmd.args(["--redis-url", r]);
        }
        let mut child = self.spawn(name, url.clone(), &mut cmd)?;
        wait_http(&mut child, &format!("{url}/healthz")).await?;
        Ok(child)
    }

    /// The reference gateway (`minimal-gateway`), configured by environment.
    pub async fn gateway(&self, bin: &Path, redis_url: &str) -> Result<Child, String> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut child = self.spawn(
            "gateway",
            url.clone(),
            Command::new(bin)
                .env("REDIS_URL", redis_url)
                .env("ADDR", format!("127.0.0.1:{port}")),
        )?;
        wait_http(&mut child, &format!("{url}/hello")).await?;
        Ok(child)
    }
}

/// Polls `url` until it answers 200, the child exits, or 30 s pass.
async fn wait_http(child: &mut Child, url: &str) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        child.check_running()?;
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not answer {url} within 30 s", child.name));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may
    // contain spaces: state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// Raises this process's soft open-file limit to its hard limit (children
/// inherit it) and returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}
