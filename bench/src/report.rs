//! Figures, the printed table and the JSON file.
//!
//! Every measured number becomes one [`Figure`]: the scenario it belongs to,
//! what it is, its value and unit, and the target it is held against (if
//! any). A scenario that could not run records a figure without a value and
//! says why, so the table always shows every scenario that was asked for.

use serde_json::{Value, json};

/// What a figure must satisfy.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    Below(f64),
    Equal(f64),
}

impl Target {
    fn holds(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::Below(t) => value < t,
            Target::Equal(t) => (value - t).abs() < f64::EPSILON,
        }
    }

    fn describe(self, unit: &str) -> String {
        let (op, t) = match self {
            Target::AtLeast(t) => ("≥", t),
            Target::Below(t) => ("<", t),
            Target::Equal(t) => ("=", t),
        };
        format!("{op} {}", format_value(t, unit))
    }

    fn to_json(self) -> Value {
        match self {
            Target::AtLeast(t) => json!({"at_least": t}),
            Target::Below(t) => json!({"below": t}),
            Target::Equal(t) => json!({"equal": t}),
        }
    }
}

/// One measured (or unavailable) number.
#[derive(Debug, Clone)]
pub struct Figure {
    pub scenario: u8,
    pub name: String,
    /// `None` when the scenario could not measure it.
    pub value: Option<f64>,
    pub unit: &'static str,
    pub target: Option<Target>,
    /// Context a reader needs to trust the value (error counts, sizes).
    pub note: String,
}

impl Figure {
    fn verdict(&self) -> &'static str {
        match (self.value, self.target) {
            (None, _) => "n/a",
            (Some(_), None) => "-",
            (Some(v), Some(t)) if t.holds(v) => "pass",
            (Some(_), Some(_)) => "FAIL",
        }
    }
}

/// Everything a run measured, in the order it was measured.
#[derive(Debug, Default)]
pub struct Report {
    /// Date, machine, commit: printed first so the output can be pasted.
    pub header: Vec<(String, String)>,
    pub figures: Vec<Figure>,
    /// Remarks printed under the table.
    pub notes: Vec<String>,
}

impl Report {
    /// Records a value; returns it so a note can be attached.
    pub fn add(
        &mut self,
        scenario: u8,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
    ) -> &mut Figure {
        self.figures.push(Figure {
            scenario,
            name: name.into(),
            value: Some(value),
            unit,
            target,
            note: String::new(),
        });
        self.figures.last_mut().expect("just pushed")
    }

    /// Records that a figure could not be measured, and why.
    pub fn unavailable(&mut self, scenario: u8, name: impl Into<String>, why: impl Into<String>) {
        self.figures.push(Figure {
            scenario,
            name: name.into(),
            value: None,
            unit: "",
            target: None,
            note: why.into(),
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn print_header(&self) {
        for (k, v) in &self.header {
            println!("{k:<9} {v}");
        }
    }

    pub fn print_table(&self) {
        let rows: Vec<[String; 6]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.scenario.to_string(),
                    f.name.clone(),
                    f.value
                        .map_or_else(|| "-".to_owned(), |v| format_value(v, f.unit)),
                    f.target.map_or_else(String::new, |t| t.describe(f.unit)),
                    f.verdict().to_owned(),
                    f.note.clone(),
                ]
            })
            .collect();
        let titles = ["#", "figure", "value", "target", "result", "note"];
        let mut widths = titles.map(|t| t.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i == cells.len() - 1 {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            println!("{}", out.trim_end());
        };
        line(&titles.map(str::to_owned));
        line(&widths.map(|w| "-".repeat(w)));
        for row in &rows {
            line(row);
        }
        for n in &self.notes {
            println!("* {n}");
        }
    }

    pub fn to_json(&self) -> Value {
        let header: serde_json::Map<String, Value> = self
            .header
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "scenario": f.scenario,
                    "figure": f.name,
                    "value": f.value,
                    "unit": f.unit,
                    "target": f.target.map(Target::to_json),
                    "result": f.verdict(),
                    "note": f.note,
                })
            })
            .collect();
        json!({"header": header, "figures": figures, "notes": self.notes})
    }
}

fn format_value(v: f64, unit: &str) -> String {
    match unit {
        "ms" => format!("{v:.2} ms"),
        "ratio" => format!("{v:.3}"),
        "KiB/conn" | "MiB" | "s" => format!("{v:.1} {unit}"),
        "" => format!("{v:.0}"),
        _ => format!("{v:.0} {unit}"),
    }
}
