//! Runs `wrk` and reads its `--latency` report.
//!
//! wrk is a C load generator that costs far less CPU per request than any
//! client we could write here, which matters when the load generator, the
//! server and Redis share two cores.

use std::path::Path;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers that were not 2xx/3xx: a fast error is not throughput.
    pub non_2xx: u64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
}

/// One wrk thread, `connections` connections; `script: None` sends plain
/// GETs of `url`.
pub async fn run(
    script: Option<&Path>,
    url: &str,
    connections: u32,
    duration: Duration,
) -> Result<WrkResult, String> {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("--latency");
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .arg(url)
        .output()
        .await
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse(&stdout)
}

/// Reads wrk's text report.
pub fn parse(out: &str) -> Result<WrkResult, String> {
    let mut result = WrkResult {
        requests: 0,
        requests_per_sec: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
        socket_errors: 0,
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            result.requests_per_sec = v.trim().parse().map_err(|_| bad(line))?;
        } else if let Some(v) = line.strip_prefix("50%") {
            result.p50_ms = duration_ms(v.trim()).ok_or_else(|| bad(line))?;
        } else if let Some(v) = line.strip_prefix("99%") {
            result.p99_ms = duration_ms(v.trim()).ok_or_else(|| bad(line))?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = v.trim().parse().map_err(|_| bad(line))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            result.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            result.requests = n.trim().parse().map_err(|_| bad(line))?;
        }
    }
    if result.requests_per_sec.is_nan() || result.p99_ms.is_nan() {
        return Err(format!("unexpected wrk output:\n{out}"));
    }
    Ok(result)
}

fn bad(line: &str) -> String {
    format!("cannot read wrk line {line:?}")
}

/// `654.00us`, `1.50ms`, `1.02s`, `2.00m` → milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:18080
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   711.88us  201.10us   8.92ms   91.00%
    Req/Sec    88.52k     2.11k   91.20k    80.00%
  Latency Distribution
     50%  654.00us
     75%  780.00us
     90%  920.00us
     99%    1.50ms
  880912 requests in 10.00s, 98.41MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:  88091.20
Transfer/sec:      9.84MB
";

    #[test]
    fn a_wrk_latency_report_yields_rate_percentiles_and_errors() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 880_912);
        assert!((r.requests_per_sec - 88_091.2).abs() < 1e-6);
        assert!((r.p50_ms - 0.654).abs() < 1e-9);
        assert!((r.p99_ms - 1.5).abs() < 1e-9);
        assert_eq!(r.non_2xx, 17);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn output_without_a_rate_is_an_error() {
        assert!(parse("Running 10s test\n").is_err());
    }
}
