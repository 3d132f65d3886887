//! Tables and formats for people: aligned columns, money as `$0.0123`,
//! percentages with one decimal, times in local-free UTC `HH:MM:SS`.

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement};
use serde_json::Value;

use super::outln;

/// A borderless table with a header row.
pub struct Table(comfy_table::Table);

impl Table {
    pub fn new(header: &[&str]) -> Self {
        let mut table = comfy_table::Table::new();
        table
            .load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header.iter().map(|h| h.to_uppercase()));
        for column in table.column_iter_mut() {
            column.set_constraint(ColumnConstraint::ContentWidth);
        }
        Self(table)
    }

    /// Adds a row. Control characters in cells (text agents sent) are
    /// shown escaped: a newline would break the row, and terminal escape
    /// sequences would reach the operator's terminal.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.0
            .add_row(cells.into_iter().map(|cell| printable(&cell)));
        self
    }

    /// Right-aligns the given columns (numbers).
    pub fn numeric(&mut self, columns: &[usize]) -> &mut Self {
        for &i in columns {
            if let Some(c) = self.0.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        self
    }

    pub fn print(&self) {
        // comfy-table pads the first column with a space; trim line ends.
        for line in self.0.to_string().lines() {
            outln!("{}", line.trim_end());
        }
    }
}

/// Whether `c` would act on the terminal rather than show: a control
/// character (C0, DEL, C1: escape sequences, line breaks) or a mark that
/// reorders the text around it (bidirectional overrides, embeddings and
/// isolates), which could make a row read as something else.
pub fn unsafe_for_terminals(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character [`unsafe_for_terminals`] escaped (`\n`,
/// `\u{1b}`, `\u{202e}`).
pub fn printable(text: &str) -> String {
    if !text.chars().any(unsafe_for_terminals) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if unsafe_for_terminals(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `$0.0123` — four decimals, because single calls cost fractions of a cent;
/// `-$0.0123` below zero.
pub fn money(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x < 0.0 => format!("-${:.4}", -x),
        Some(x) => format!("${x:.4}"),
        None => "-".into(),
    }
}

/// `42.5%` from a percentage value.
pub fn percent(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.1}%"),
        None => "-".into(),
    }
}

/// `42.5%` from a fraction in 0–1.
pub fn fraction_percent(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.1}%", x * 100.0),
        None => "-".into(),
    }
}

/// `1 call`, `2 calls`: a count with its noun.
pub fn counted(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// [`counted`] for a count the server sent (`-` when it is missing).
pub fn counted_value(v: &Value, noun: &str) -> String {
    match v.as_u64() {
        Some(n) => counted(n, noun),
        None => format!("{} {noun}s", num(v)),
    }
}

pub fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Null => "-".into(),
        other => text(other),
    }
}

pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `2026-11-25 14:03:07` from an RFC 3339 time.
pub fn short_time(v: &Value) -> String {
    let s = v.as_str().unwrap_or("-");
    s.get(..19)
        .map(|t| t.replace('T', " "))
        .unwrap_or_else(|| s.to_owned())
}

/// A record's cache column: a response-cache hit, and its prompt-cache
/// reads and writes (`hit, read 20000`), or `-`.
fn cache_cell(record: &Value) -> String {
    let t = &record["tokens"];
    let mut parts = Vec::new();
    if record["cache"]["hit"].as_bool() == Some(true) {
        parts.push("hit".to_owned());
    }
    for (name, field) in [("read", "cache_read"), ("write", "cache_creation")] {
        if t[field].as_u64().unwrap_or(0) > 0 {
            parts.push(format!("{name} {}", num(&t[field])));
        }
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

pub fn recent(body: &Value) {
    let mut table = Table::new(&[
        "time", "workflow", "stage", "tier", "cost", "tokens", "cache", "duration",
    ]);
    for r in body["records"].as_array().into_iter().flatten() {
        let t = &r["tokens"];
        let tokens = format!("{}/{}", num(&t["input"]), num(&t["output"]));
        let cache = cache_cell(r);
        table.row(vec![
            short_time(&r["ts"]),
            text(&r["workflow"]),
            text(&r["stage"]),
            text(&r["tier"]),
            money(&r["cost_usd"]),
            tokens,
            cache,
            format!("{} ms", num(&r["duration_ms"])),
        ]);
    }
    table.numeric(&[4, 5, 7]).print();
    let totals = &body["totals"];
    outln!(
        "\n{}, {} total, {} input / {} output tokens",
        counted_value(&totals["calls"], "call"),
        money(&totals["cost_usd"]),
        num(&totals["tokens_input"]),
        num(&totals["tokens_output"]),
    );
}

/// The price table of a savings answer: the current one, or every table
/// that priced the window's calls when that is not only the current one.
fn price_tables(body: &Value) -> String {
    let current = text(&body["price_table_version"]);
    let tables = body["price_tables"]
        .as_object()
        .filter(|tables| tables.len() > 1 || tables.keys().any(|version| *version != current));
    match tables {
        Some(tables) => tables
            .iter()
            .map(|(version, calls)| {
                format!("{} ({})", printable(version), counted_value(calls, "call"))
            })
            .collect::<Vec<_>>()
            .join(", "),
        None => current,
    }
}

pub fn savings(body: &Value, days: u32) {
    outln!(
        "Savings over the last {} ({}, prices {})\n",
        counted(days.into(), "day"),
        counted_value(&body["total_calls"], "call"),
        price_tables(body)
    );
    let mut table = Table::new(&["", "usd"]);
    table
        .row(vec![
            "all-premium baseline".into(),
            money(&body["baseline_cost_usd"]),
        ])
        .row(vec!["actual cost".into(), money(&body["actual_cost_usd"])])
        .row(vec![
            "saved by routing".into(),
            money(&body["routing_savings_usd"]),
        ])
        .row(vec![
            "saved by caching".into(),
            money(&body["cache_savings_usd"]),
        ])
        .row(vec![
            "your savings".into(),
            format!(
                "{} ({})",
                money(&body["savings_usd"]),
                percent(&body["savings_percent"])
            ),
        ])
        .numeric(&[1])
        .print();
    if let Some(dist) = body["tier_distribution"].as_object() {
        let parts: Vec<String> = dist
            .iter()
            .map(|(tier, p)| format!("{tier} {}", percent(p)))
            .collect();
        outln!("\ncalls by tier: {}", parts.join(", "));
    }
}

pub fn cache_stats(body: &Value, days: u32) {
    outln!(
        "Prompt cache over the last {}: hit rate {}, {} of {}\n",
        counted(days.into(), "day"),
        fraction_percent(&body["hit_rate"]),
        num(&body["hit_count"]),
        counted_value(&body["total_requests"], "request"),
    );
    let mut table = Table::new(&[
        "workflow", "requests", "hits", "hit rate", "reads", "writes", "savings",
    ]);
    let mut rows: Vec<(String, Value)> = match &body["by_workflow"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Value::Array(items) => items
            .iter()
            .map(|v| (text(&v["workflow"]), v.clone()))
            .collect(),
        _ => Vec::new(),
    };
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    for (workflow, w) in rows {
        table.row(vec![
            workflow,
            num(&w["total_requests"]),
            num(&w["hit_count"]),
            fraction_percent(&w["hit_rate"]),
            num(&w["total_reads"]),
            num(&w["total_writes"]),
            money(&w["estimated_savings_usd"]),
        ]);
    }
    table.row(vec![
        "total".into(),
        num(&body["total_requests"]),
        num(&body["hit_count"]),
        fraction_percent(&body["hit_rate"]),
        num(&body["total_reads"]),
        num(&body["total_writes"]),
        money(&body["estimated_savings_usd"]),
    ]);
    table.numeric(&[1, 2, 3, 4, 5, 6]).print();
}

pub fn performance(body: &Value) {
    let mut table = Table::new(&[
        "agent",
        "runs",
        "completed",
        "failed",
        "cancelled",
        "lost",
        "running",
        "success",
        "avg duration",
    ]);
    let rows = body["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&body["total"]));
    for r in rows {
        table.row(vec![
            text(&r["agent_id"]),
            num(&r["runs"]),
            num(&r["completed"]),
            num(&r["failed"]),
            num(&r["cancelled"]),
            num(&r["lost"]),
            num(&r["running"]),
            fraction_percent(&r["success_rate"]),
            r["avg_duration_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.1} s")),
        ]);
    }
    table.numeric(&[1, 2, 3, 4, 5, 6, 7, 8]).print();
}

pub fn agents(body: &Value) {
    let mut table = Table::new(&[
        "agent",
        "state",
        "status",
        "progress",
        "task",
        "last beat",
        "silent",
    ]);
    for a in body["agents"].as_array().into_iter().flatten() {
        table.row(vec![
            text(&a["agent_id"]),
            text(&a["state"]),
            text(&a["status"]),
            fraction_percent(&a["progress"]),
            text(&a["current_task"]),
            short_time(&a["last_beat"]),
            a["seconds_since_beat"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.0} s")),
        ]);
    }
    table.numeric(&[3, 6]).print();
}

pub fn approvals(body: &Value) {
    let mut table = Table::new(&[
        "id",
        "type",
        "agent",
        "status",
        "requested by",
        "created",
        "expires",
        "responder",
    ]);
    for item in body["approvals"].as_array().into_iter().flatten() {
        let r = &item["request"];
        table.row(vec![
            text(&r["request_id"]),
            text(&r["approval_type"]),
            text(&r["agent_id"]),
            text(&r["status"]),
            text(&r["requested_by"]),
            short_time(&r["created_at"]),
            short_time(&r["expires_at"]),
            text(&item["response"]["responder"]),
        ]);
    }
    table.print();
}

pub fn signals(body: &Value) {
    let mut table = Table::new(&["id", "type", "from", "to", "sent", "expires", "payload"]);
    for s in body["signals"].as_array().into_iter().flatten() {
        let to = if s["target_agent"].is_null() {
            "(all)".into()
        } else {
            text(&s["target_agent"])
        };
        table.row(vec![
            text(&s["signal_id"]),
            text(&s["signal_type"]),
            text(&s["source_agent"]),
            to,
            short_time(&s["created_at"]),
            short_time(&s["expires_at"]),
            s["payload"].to_string(),
        ]);
    }
    table.print();
}

/// `14:03:07.123  agent.down  summarizer-1  {"ttl_seconds":30}`
pub fn event_line(e: &Value) -> String {
    let ts = e["ts"].as_str().and_then(|t| t.get(11..23)).unwrap_or("");
    // A `stream.reset` has no data: what it says is where the log now starts.
    let data = match &e["oldest_id"] {
        Value::Null => e["data"].to_string(),
        oldest => format!("oldest_id {}", text(oldest)),
    };
    // JSON escapes only the controls below 0x20: DEL and C1 are escaped here.
    printable(&format!(
        "{ts}  {:<18}  {:<16}  {data}",
        text(&e["type"]),
        e["agent_id"].as_str().unwrap_or("-"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_cache_column_shows_a_hit_and_the_prompt_cache_together() {
        let record = |hit: bool, read: u64, write: u64| {
            json!({"cache": {"hit": hit},
                   "tokens": {"input": 1, "output": 1, "cache_read": read, "cache_creation": write}})
        };
        assert_eq!(cache_cell(&record(false, 0, 0)), "-");
        assert_eq!(cache_cell(&record(true, 0, 0)), "hit");
        assert_eq!(cache_cell(&record(true, 20000, 0)), "hit, read 20000");
        assert_eq!(cache_cell(&record(false, 5, 7)), "read 5, write 7");
        assert_eq!(cache_cell(&record(false, 0, 7)), "write 7");
    }

    #[test]
    fn savings_name_the_tables_that_priced_them() {
        let one = json!({"price_table_version": "v2", "price_tables": {"v2": 3}});
        assert_eq!(price_tables(&one), "v2");
        let none = json!({"price_table_version": "v2", "price_tables": {}});
        assert_eq!(price_tables(&none), "v2");
        let mixed = json!({"price_table_version": "v2", "price_tables": {"v1": 1, "v2": 3}});
        assert_eq!(price_tables(&mixed), "v1 (1 call), v2 (3 calls)");
        let older = json!({"price_table_version": "v2", "price_tables": {"v1": 2}});
        assert_eq!(price_tables(&older), "v1 (2 calls)");
    }

    #[test]
    fn money_and_percentages_are_formatted_for_people() {
        assert_eq!(money(&json!(0.0123)), "$0.0123");
        assert_eq!(money(&json!(12)), "$12.0000");
        assert_eq!(money(&json!(-93456.62891)), "-$93456.6289");
        assert_eq!(printable("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(printable("José"), "José");
        assert_eq!(percent(&json!(42.46)), "42.5%");
        assert_eq!(counted(1, "day"), "1 day");
        assert_eq!(counted_value(&json!(1), "call"), "1 call");
        assert_eq!(counted_value(&json!(0), "call"), "0 calls");
        assert_eq!(counted_value(&Value::Null, "call"), "- calls");
        assert_eq!(fraction_percent(&json!(0.5)), "50.0%");
        assert_eq!(fraction_percent(&Value::Null), "-");
        assert_eq!(
            short_time(&json!("2026-11-25T14:03:07.123Z")),
            "2026-11-25 14:03:07"
        );
    }
}
