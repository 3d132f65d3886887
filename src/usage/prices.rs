//! The price table: what each model costs per million tokens, and its tier.
//!
//! Prices are kept as integer nano-dollars per token (a price of $3 per
//! million tokens is 3,000 n$ per token), so every cost, baseline and saving
//! is an exact integer sum: no float drift however many records are added.
//! Prices are therefore exact to $0.001 per million tokens; a file with a
//! finer one is refused at start-up (it would be rounded).
//!
//! The built-in table is Attune's registry: claude-haiku-4-5 (cheap) $1/$5,
//! claude-sonnet-5 (capable) $3/$15, claude-opus-4-8 (premium) $5/$25 per
//! million input/output tokens; any other model is priced $3/$15. Unless a
//! file says otherwise, a prompt-cache read costs 10 % of the model's input
//! price and a prompt-cache write 125 % of it. The *baseline model* — what
//! every call would have cost without tier routing — is the table's premium
//! model.
//!
//! `--prices-file` replaces the table with a TOML file:
//!
//! ```toml
//! version = "acme-2026-01"            # optional (letters, digits, `.`, `_`, `-`); default "sha256-" + 12 hex of the file
//! baseline_model = "claude-opus-4-8"  # optional; default the first premium model
//!
//! [unknown]                           # optional; default $3 / $15
//! input = 3.0
//! output = 15.0
//!
//! [[models]]
//! model = "claude-haiku-4-5"
//! tier = "cheap"
//! input = 1.0
//! output = 5.0
//! cache_read = 0.1                    # optional; default 10 % of input; at most input
//! cache_write = 1.25                  # optional; default 125 % of input
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::types::Id;
use crate::usage::{Tier, TokenCounts};

/// Nano-dollars in a dollar.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Version string of the built-in table.
pub const BUILTIN_VERSION: &str = "attune-2026-11";

/// Highest accepted price, in dollars per million tokens.
const MAX_PRICE: f64 = 1000.0;

/// Converts nano-dollars to dollars.
///
/// The closest `f64` to the exact amount: below 2^53 n$ (about $9M) the
/// count is exact as a float and one division rounds once; above, the
/// amount's decimal text is parsed, which also rounds once (converting
/// the count first would round twice).
pub fn usd(nanos: impl Into<i128>) -> f64 {
    let nanos = nanos.into();
    if nanos.unsigned_abs() < 1 << 53 {
        return nanos as f64 / NANOS_PER_USD as f64;
    }
    let per = NANOS_PER_USD.unsigned_abs() as u128;
    let (whole, fraction) = (nanos.unsigned_abs() / per, nanos.unsigned_abs() % per);
    let sign = if nanos < 0 { "-" } else { "" };
    format!("{sign}{whole}.{fraction:09}")
        .parse()
        .unwrap_or(nanos as f64 / NANOS_PER_USD as f64)
}

/// Converts dollars to nano-dollars (rounded).
pub fn nanos(usd: f64) -> i64 {
    (usd * NANOS_PER_USD as f64).round() as i64
}

/// One model's prices, in nano-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: i64,
    pub output: i64,
    pub cache_read: i64,
    pub cache_write: i64,
}

impl Rates {
    /// From dollars per million tokens; cache prices default to 10 % and
    /// 125 % of the input price.
    fn per_million(
        input: f64,
        output: f64,
        cache_read: Option<f64>,
        cache_write: Option<f64>,
    ) -> Self {
        // $ per million tokens × 1e9 n$/$ ÷ 1e6 tokens = × 1000 n$ per token.
        let per_token = |usd_per_million: f64| (usd_per_million * 1000.0).round() as i64;
        Self {
            input: per_token(input),
            output: per_token(output),
            cache_read: per_token(cache_read.unwrap_or(input * 0.1)),
            cache_write: per_token(cache_write.unwrap_or(input * 1.25)),
        }
    }

    /// What `tokens` cost at these rates (n$). Cache tokens are not part of
    /// `input`: each kind is priced on its own.
    pub fn cost(&self, t: &TokenCounts) -> i64 {
        t.input as i64 * self.input
            + t.output as i64 * self.output
            + t.cache_read as i64 * self.cache_read
            + t.cache_creation as i64 * self.cache_write
    }

    /// What `tokens` would cost at these rates with no prompt cache: reads
    /// priced as ordinary input (n$).
    pub fn uncached_cost(&self, t: &TokenCounts) -> i64 {
        t.input as i64 * self.input
            + t.output as i64 * self.output
            + t.cache_read as i64 * self.input
            + t.cache_creation as i64 * self.cache_write
    }

    /// What `cache_read` tokens saved against the full input price (n$):
    /// 90 % of the input price per token with the default cache-read price.
    pub fn cache_read_savings(&self, cache_read: u64) -> i64 {
        cache_read as i64 * (self.input - self.cache_read)
    }

    fn view(&self) -> RatesView {
        let per_million = |n: i64| n as f64 / 1000.0;
        RatesView {
            input: per_million(self.input),
            output: per_million(self.output),
            cache_read: per_million(self.cache_read),
            cache_write: per_million(self.cache_write),
        }
    }
}

/// Prices in dollars per million tokens.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RatesView {
    /// Ordinary input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Prompt-cache reads (default 10 % of `input`).
    pub cache_read: f64,
    /// Prompt-cache writes (default 125 % of `input`).
    pub cache_write: f64,
}

/// One model of the table, as the API shows it (dollars per million tokens).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ModelPriceView {
    pub model: String,
    pub tier: Tier,
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

/// The price table, as `GET /v1/usage/prices` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PriceTableView {
    /// `attune-2026-11` for the built-in table; a file's `version`, or
    /// `sha256-` and the first 12 hex digits of its contents.
    pub version: String,
    /// The model every call is priced at for the savings baseline.
    pub baseline_model: String,
    /// Prices of any model not in `models`.
    pub unknown_model: RatesView,
    /// Every known model, by name.
    pub models: Vec<ModelPriceView>,
}

#[derive(Debug, Clone, Copy)]
struct ModelPrice {
    tier: Tier,
    rates: Rates,
}

/// Prices of known models, the price of unknown ones, and the baseline.
#[derive(Debug, Clone)]
pub struct PriceTable {
    version: String,
    models: BTreeMap<String, ModelPrice>,
    unknown: Rates,
    baseline_model: String,
    baseline: Rates,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    version: Option<String>,
    baseline_model: Option<String>,
    unknown: Option<FileRates>,
    #[serde(default)]
    models: Vec<FileModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRates {
    input: f64,
    output: f64,
    cache_read: Option<f64>,
    cache_write: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    model: String,
    tier: Tier,
    input: f64,
    output: f64,
    cache_read: Option<f64>,
    cache_write: Option<f64>,
}

impl FileModel {
    fn rates(&self) -> Result<Rates, String> {
        FileRates {
            input: self.input,
            output: self.output,
            cache_read: self.cache_read,
            cache_write: self.cache_write,
        }
        .rates(&format!("model {:?}", self.model))
    }
}

impl FileRates {
    fn rates(&self, what: &str) -> Result<Rates, String> {
        let prices = [
            ("input", Some(self.input)),
            ("output", Some(self.output)),
            ("cache_read", self.cache_read),
            ("cache_write", self.cache_write),
        ];
        for (name, price) in prices {
            if let Some(p) = price {
                if !(p.is_finite() && (0.0..=MAX_PRICE).contains(&p)) {
                    return Err(format!(
                        "{what}: {name} must be between 0 and {MAX_PRICE} dollars per million tokens"
                    ));
                }
                // Kept as whole nano-dollars per token: a finer price would
                // be rounded without anyone knowing.
                let thousandths = p * 1000.0;
                if (thousandths - thousandths.round()).abs() > 1e-6 {
                    return Err(format!(
                        "{what}: {name} = {p} is finer than prices are kept \
                         ($0.001 per million tokens)"
                    ));
                }
            }
        }
        // A prompt-cache read is a discounted input token. Its savings
        // (input − cache_read per token) are never negative, so every
        // figure a record adds to a day is never negative, and bounding the
        // day's totals bounds each breakdown too.
        if self.cache_read.is_some_and(|read| read > self.input) {
            return Err(format!("{what}: cache_read must not be above input"));
        }
        Ok(Rates::per_million(
            self.input,
            self.output,
            self.cache_read,
            self.cache_write,
        ))
    }
}

impl PriceTable {
    /// Attune's own registry.
    pub fn builtin() -> Self {
        let model = |tier, input, output| ModelPrice {
            tier,
            rates: Rates::per_million(input, output, None, None),
        };
        let models = BTreeMap::from([
            ("claude-haiku-4-5".to_owned(), model(Tier::Cheap, 1.0, 5.0)),
            (
                "claude-sonnet-5".to_owned(),
                model(Tier::Capable, 3.0, 15.0),
            ),
            (
                "claude-opus-4-8".to_owned(),
                model(Tier::Premium, 5.0, 25.0),
            ),
        ]);
        let baseline = models["claude-opus-4-8"].rates;
        Self {
            version: BUILTIN_VERSION.to_owned(),
            models,
            unknown: Rates::per_million(3.0, 15.0, None, None),
            baseline_model: "claude-opus-4-8".to_owned(),
            baseline,
        }
    }

    /// Reads a `--prices-file`; the error is a one-line reason.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --prices-file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--prices-file {}: {e}", path.display()))
    }

    /// Parses a price table file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PriceFile =
            toml::from_str(text).map_err(|e| crate::config::toml_error(text, &e))?;
        let mut models = BTreeMap::new();
        let mut first_premium = None;
        for m in &file.models {
            Id::new(m.model.as_str()).map_err(|e| format!("model {:?} {e}", m.model))?;
            let rates = m.rates()?;
            if models
                .insert(
                    m.model.clone(),
                    ModelPrice {
                        tier: m.tier,
                        rates,
                    },
                )
                .is_some()
            {
                return Err(format!("model {:?} is listed twice", m.model));
            }
            if m.tier == Tier::Premium && first_premium.is_none() {
                first_premium = Some(m.model.clone());
            }
        }
        let baseline_model = match file.baseline_model {
            Some(name) => {
                if !models.contains_key(&name) {
                    return Err(format!("baseline_model {name:?} is not one of the models"));
                }
                name
            }
            None => first_premium
                .ok_or("the table needs a premium-tier model (the savings baseline)")?,
        };
        let unknown = match &file.unknown {
            Some(r) => r.rates("unknown")?,
            None => Rates::per_million(3.0, 15.0, None, None),
        };
        // A version names the table in answers and in the stored
        // aggregates, so it has an id's form.
        let version = match file.version {
            Some(v) => crate::types::Id::new(v.as_str())
                .map_err(|e| format!("version {v:?} {e}"))?
                .to_string(),
            None => format!("sha256-{}", &crate::types::sha256_hex(text)[..12]),
        };
        let baseline = models[&baseline_model].rates;
        Ok(Self {
            version,
            models,
            unknown,
            baseline_model,
            baseline,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The prices of `model` (the unknown-model prices if it is not listed).
    pub fn rates(&self, model: &str) -> Rates {
        self.models.get(model).map_or(self.unknown, |m| m.rates)
    }

    /// The baseline model's prices.
    pub fn baseline(&self) -> Rates {
        self.baseline
    }

    pub fn view(&self) -> PriceTableView {
        PriceTableView {
            version: self.version.clone(),
            baseline_model: self.baseline_model.clone(),
            unknown_model: self.unknown.view(),
            models: self
                .models
                .iter()
                .map(|(name, m)| {
                    let prices = m.rates.view();
                    ModelPriceView {
                        model: name.clone(),
                        tier: m.tier,
                        input: prices.input,
                        output: prices.output,
                        cache_read: prices.cache_read,
                        cache_write: prices.cache_write,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(input: u64, output: u64, cache_read: u64, cache_creation: u64) -> TokenCounts {
        TokenCounts {
            input,
            output,
            cache_read,
            cache_creation,
        }
    }

    #[test]
    fn builtin_prices_are_attunes_with_default_cache_ratios() {
        let table = PriceTable::builtin();
        let sonnet = table.rates("claude-sonnet-5");
        assert_eq!(
            sonnet,
            Rates {
                input: 3000,
                output: 15000,
                cache_read: 300,
                cache_write: 3750
            }
        );
        assert_eq!(table.rates("some-new-model"), sonnet);
        assert_eq!(table.baseline().output, 25_000);
        // 1M input + 1M output on haiku: $1 + $5.
        assert_eq!(
            table
                .rates("claude-haiku-4-5")
                .cost(&tokens(1_000_000, 1_000_000, 0, 0)),
            6 * NANOS_PER_USD
        );
        // A cache read saves 90 % of the input price.
        assert_eq!(
            table.rates("claude-opus-4-8").cache_read_savings(1_000_000),
            nanos(4.5)
        );
    }

    #[test]
    fn a_file_replaces_the_table_and_is_versioned() {
        let text = r#"
            [[models]]
            model = "small"
            tier = "cheap"
            input = 0.5
            output = 2
            [[models]]
            model = "big"
            tier = "premium"
            input = 10
            output = 40
            cache_read = 2
        "#;
        let table = PriceTable::parse(text).unwrap();
        assert!(table.version().starts_with("sha256-"));
        assert_eq!(table.version().len(), "sha256-".len() + 12);
        assert_eq!(table.baseline().cache_read, 2000);
        assert_eq!(table.baseline().cache_write, 12_500);
        assert_eq!(table.rates("other").input, 3000);
        let named = PriceTable::parse(&format!("version = \"v7\"\n{text}")).unwrap();
        assert_eq!(named.version(), "v7");
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let cheap_only = "[[models]]\nmodel = \"a\"\ntier = \"cheap\"\ninput = 1\noutput = 1\n";
        assert!(
            PriceTable::parse(cheap_only)
                .unwrap_err()
                .contains("premium")
        );
        let negative = "[[models]]\nmodel = \"a\"\ntier = \"premium\"\ninput = -1\noutput = 1\n";
        assert!(PriceTable::parse(negative).unwrap_err().contains("input"));
        let bad_name = "[[models]]\nmodel = \"a:b\"\ntier = \"premium\"\ninput = 1\noutput = 1\n";
        assert!(PriceTable::parse(bad_name).is_err());
        let premium = "[[models]]\nmodel = \"a\"\ntier = \"premium\"\ninput = 1\noutput = 1\n";
        let bad_version = format!("version = \"2026 Q1\"\n{premium}");
        let err = PriceTable::parse(&bad_version).unwrap_err();
        assert!(err.starts_with("version \"2026 Q1\""), "{err}");
        let err = PriceTable::parse("version = 'v1'\ncolour = 1").unwrap_err();
        assert!(err.starts_with("line 2: unknown field `colour`"), "{err}");
        let dear_cache = "[[models]]\nmodel = \"a\"\ntier = \"premium\"\ninput = 3\noutput = 15\ncache_read = 3.75\n";
        assert!(
            PriceTable::parse(dear_cache)
                .unwrap_err()
                .contains("cache_read must not be above input")
        );
        let fine = "[[models]]\nmodel = \"a\"\ntier = \"premium\"\ninput = 1.0001\noutput = 1\n";
        assert!(PriceTable::parse(fine).unwrap_err().contains("finer"));
        // Thousandths are kept exactly, whatever their binary form.
        let exact =
            "[[models]]\nmodel = \"a\"\ntier = \"premium\"\ninput = 0.003\noutput = 2.675\n";
        assert_eq!(PriceTable::parse(exact).unwrap().rates("a").output, 2675);
    }

    #[test]
    fn dollars_are_the_closest_float_to_the_exact_amount() {
        assert_eq!(usd(1_500_000_000i64), 1.5);
        assert_eq!(usd(-22i64), -0.000000022);
        // 8000000000.022 $: the count is past 2^53, where converting it to
        // a float first would round twice (to 8000000000.021999).
        assert_eq!(usd(8_000_000_000_022_000_000i128), 8000000000.022);
        assert_eq!(usd(-8_000_000_000_022_000_000i128), -8000000000.022);
    }
}
