//! LLM usage records, cost savings and prompt-cache statistics.
//!
//! Agents post what each LLM call cost (`POST /v1/usage`, one record or a
//! batch of up to 1000). Summaries must stay fast however many records
//! there are, so they are never computed from the records: every write
//! adds its numbers to one aggregate per UTC day (calls, cost, tokens,
//! baseline, savings, and the same per tier, workflow, provider and model),
//! and `stats`, `savings` and `cache-stats` read at most `days` of those.
//! The newest records of each day are also kept (at most
//! [`RECENT_PER_DAY`]) for `recent`; since any window is a set of whole
//! days, the newest 1000 records of a window are always among them.
//!
//! Money is integer nano-dollars everywhere below the HTTP edge (see
//! [`prices`]), so sums are exact. For each call:
//!
//! - *own cost* — `cost_usd` as sent, else its tokens at its model's prices:
//!   `input × in + output × out + cache_read × cache_read_price +
//!   cache_creation × cache_write_price` (cache tokens are not part of `input`);
//! - *actual cost* — the own cost, or 0 for a response-cache hit
//!   (`cache.hit: true`: the response came from a cache and nothing was spent);
//! - *baseline* — its tokens at the baseline (premium) model's prices with
//!   no prompt cache: what it would have cost without tier routing or caching;
//! - *prompt-cache savings* — `cache_read × (input price − cache-read price)`
//!   of its model: 90 % of the input price with the default cache-read price;
//! - *response-cache savings* — the own cost of a response-cache hit.
//!
//! So `baseline − actual` splits exactly into routing savings and cache
//! savings: `routing = baseline − actual − prompt-cache − response-cache`
//! is what choosing a cheaper model saved.
//!
//! A client `id` makes a record idempotent: the first time it is seen is
//! recorded, with the aggregates, in one atomic step; every repeat (in the
//! same batch, a later one, or on another replica) is reported as a
//! duplicate and counted nowhere.
//!
//! `user_id`s are never stored: only the first 16 hex digits of their
//! HMAC-SHA256 under a deployment secret (created by a migration on Redis,
//! random per process on the memory engine).

pub mod http;
pub mod memory;
pub mod prices;
mod redis;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, de};
use sha2::Sha256;
use utoipa::ToSchema;

use crate::agents::IndexCursor;
use crate::app::AppState;
use crate::auth::Identity;
use crate::config::Config;
use crate::engine::{Engine, EngineResult, dispatch};
use crate::error::{ApiError, ApiResult};
use crate::events::EventBody;
use crate::types::{Bounded, Id, Text, rfc3339};

pub use prices::{PriceTable, usd};

/// Most records in one `POST /v1/usage`.
pub const MAX_BATCH: usize = 1000;

/// Records kept per UTC day for `recent` (the largest `limit`).
pub const RECENT_PER_DAY: usize = 1000;

/// How far in the future a record's `ts` may lie (clock skew).
const MAX_FUTURE: ChronoDuration = ChronoDuration::minutes(5);

/// Names (workflows, models, providers) a day breaks its aggregates down
/// by, per group: the first ones seen that day (within a batch, in name
/// order). Later names count under [`OTHER`], so a client that sends a new
/// workflow name on every call (a run id, say) cannot grow a day's hash,
/// and every summary that reads it, without bound.
pub const NAMES_PER_DAY: usize = 500;

/// The breakdown entry of the names past [`NAMES_PER_DAY`]. No [`Id`]
/// starts with `_`, so it never meets a client's name.
pub const OTHER: &str = "_other";

/// The breakdown of a day's calls by the version of the price table that
/// priced them (costs are fixed when a call is recorded).
const PRICE_TABLES: &str = "pt";

/// Where a day counts how many names of `group` it breaks down by (the
/// Redis script writes the same field). Summaries pass over it: it has one
/// `:`, where breakdowns have two.
pub fn names_field(group: &str) -> String {
    format!("names:{group}")
}

/// The largest value any day total may reach; a batch that would pass it
/// is refused whole (it would take about $9 billion in one day).
pub const TOTAL_LIMIT: i64 = 9_000_000_000_000_000_000;

/// A model tier. Accepted in any case, always written lower-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Cheap,
    Capable,
    Premium,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Cheap, Tier::Capable, Tier::Premium];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cheap => "cheap",
            Self::Capable => "capable",
            Self::Premium => "premium",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cheap" => Some(Self::Cheap),
            "capable" => Some(Self::Capable),
            "premium" => Some(Self::Premium),
            _ => None,
        }
    }

    /// The next tier up (premium stays premium).
    pub fn up(self) -> Self {
        match self {
            Self::Cheap => Self::Capable,
            Self::Capable | Self::Premium => Self::Premium,
        }
    }

    /// The next tier down, if there is one.
    pub fn down(self) -> Option<Self> {
        match self {
            Self::Cheap => None,
            Self::Capable => Some(Self::Cheap),
            Self::Premium => Some(Self::Capable),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Tier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Tier::parse(&s).ok_or_else(|| de::Error::custom("must be one of cheap, capable, premium"))
    }
}

/// Token counts of one call. Cache tokens are not part of `input`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCounts {
    /// Ordinary (uncached) input tokens.
    pub input: u64,
    pub output: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read: u64,
    /// Input tokens written to the prompt cache.
    pub cache_creation: u64,
}

/// A token count: a non-negative integer, at most one billion.
pub type TokenCount = Bounded<0, 1_000_000_000>;

/// `tokens` of a usage record.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokensIn {
    /// Ordinary input tokens, not counting cache reads or writes.
    #[schema(value_type = u64, maximum = 1_000_000_000)]
    pub input: TokenCount,
    #[schema(value_type = u64, maximum = 1_000_000_000)]
    pub output: TokenCount,
    /// Input tokens read from the prompt cache (default 0).
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000)]
    pub cache_read: Option<TokenCount>,
    /// Input tokens written to the prompt cache (default 0).
    #[schema(value_type = Option<u64>, maximum = 1_000_000_000)]
    pub cache_creation: Option<TokenCount>,
}

impl TokensIn {
    fn counts(&self) -> TokenCounts {
        TokenCounts {
            input: self.input.get(),
            output: self.output.get(),
            cache_read: self.cache_read.map_or(0, Bounded::get),
            cache_creation: self.cache_creation.map_or(0, Bounded::get),
        }
    }
}

/// `cache` of a usage record: whether the response came from a response cache.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheInfo {
    /// The response was served from a response cache: nothing was spent.
    pub hit: bool,
    /// The kind of cache (`hash`, `semantic`, …).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<Id>,
}

/// An amount of dollars, 0–1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[schema(value_type = f64)]
pub struct Usd(f64);

impl Usd {
    pub fn new(value: f64) -> Result<Self, String> {
        if value.is_finite() && (0.0..=1_000_000.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err("must be a number of dollars between 0 and 1000000".into())
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Usd::new(f64::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// One LLM call, as posted. Unknown fields are refused: a misspelt
/// `cost_usd` or cache count would otherwise be dropped and the figures
/// silently wrong.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRecordIn {
    /// Client id: a repeat of an id already recorded is ignored.
    pub id: Option<Id>,
    /// When the call happened (RFC 3339; default now). At most 5 minutes
    /// ahead, and within the usage retention period.
    #[serde(default, deserialize_with = "crate::types::optional_client_time")]
    pub ts: Option<DateTime<Utc>>,
    pub workflow: Id,
    pub stage: Option<Id>,
    /// `cheap`, `capable` or `premium`, in any case.
    pub tier: Tier,
    pub model: Id,
    pub provider: Id,
    /// The agent that made the call; agent keys may only name agents in
    /// their scope, and keys limited to some agents must name one.
    pub agent_id: Option<Id>,
    /// Stored only as the first 16 hex digits of a keyed HMAC-SHA256.
    #[schema(value_type = Option<String>, min_length = 1, max_length = 256, pattern = r"\S")]
    #[serde(default, deserialize_with = "crate::types::optional_non_blank")]
    pub user_id: Option<Text<256>>,
    #[serde(deserialize_with = "crate::types::object")]
    pub tokens: TokensIn,
    /// A response-cache hit, if any.
    #[serde(default, deserialize_with = "crate::types::optional_object")]
    pub cache: Option<CacheInfo>,
    /// What the call cost, 0–1,000,000 dollars; computed from the price
    /// table when absent. For a response-cache hit: what the call would have cost.
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1_000_000)]
    pub cost_usd: Option<Usd>,
    /// How long the call took, 0–86,400,000.
    #[schema(value_type = u64, maximum = 86_400_000)]
    pub duration_ms: Bounded<0, 86_400_000>,
}

/// A batch of records.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatchIn {
    /// 1–1000 records.
    #[schema(min_items = 1, max_items = 1000)]
    #[serde(deserialize_with = "crate::types::objects")]
    pub records: Vec<UsageRecordIn>,
}

/// The body of `POST /v1/usage`: one record, or `{"records": […]}`.
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
pub enum UsageBody {
    One(Box<UsageRecordIn>),
    Batch(UsageBatchIn),
}

impl UsageBody {
    /// Decodes a JSON object as sent: one with `records` is a batch. Errors
    /// name the field (`records[3].tokens.input`, or `tokens.input` for one
    /// record), a field sent twice included.
    pub fn parse(body: &str) -> ApiResult<Self> {
        // Its fields' names, their values skipped, not built.
        let fields: BTreeMap<String, de::IgnoredAny> =
            serde_json::from_str(body).unwrap_or_default();
        if fields.contains_key("records") {
            crate::extract::parse_json::<UsageBatchIn>(body.as_bytes()).map(Self::Batch)
        } else {
            crate::extract::parse_json::<UsageRecordIn>(body.as_bytes())
                .map(|r| Self::One(Box::new(r)))
        }
    }
}

/// A stored usage record, as `recent` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct UsageRecordView {
    /// The client's id, or a server-made UUIDv7.
    pub id: String,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    pub workflow: String,
    #[schema(required = true)]
    pub stage: Option<String>,
    pub tier: Tier,
    pub model: String,
    pub provider: String,
    #[schema(required = true)]
    pub agent_id: Option<String>,
    /// First 16 hex digits of the HMAC-SHA256 of the `user_id` sent.
    #[schema(required = true)]
    pub user_hash: Option<String>,
    pub tokens: TokenCounts,
    pub cache: CacheInfo,
    /// The call's own cost (for a response-cache hit, what it would have cost).
    pub cost_usd: f64,
    pub duration_ms: u64,
}

/// Settings the usage domain needs at run time.
pub struct UsageSettings {
    /// Model prices and the savings baseline.
    pub prices: PriceTable,
    /// Key of the `user_id` HMAC, shared by every replica on Redis: the
    /// stored one, replaced when a write finds Redis holds another (see
    /// [`record_usage`]).
    user_secret: std::sync::RwLock<Arc<[u8]>>,
    /// `--usage-retention-days`.
    pub retention_days: u64,
}

impl std::fmt::Debug for UsageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageSettings")
            .field("prices", &self.prices.version())
            .field("retention_days", &self.retention_days)
            .finish_non_exhaustive()
    }
}

impl UsageSettings {
    /// Loads the price table (built-in, or `--prices-file`) and the HMAC
    /// secret; the error is a one-line reason.
    pub async fn load(config: &Config, engine: &Engine) -> Result<Self, String> {
        let prices = match &config.prices_file {
            Some(path) => PriceTable::load(path)?,
            None => PriceTable::builtin(),
        };
        let user_secret = engine
            .usage_secret()
            .await
            .map_err(|e| format!("cannot read the user-id HMAC secret: {e}"))?;
        Ok(Self::new(prices, user_secret, config.usage_retention_days))
    }

    pub fn new(prices: PriceTable, user_secret: Vec<u8>, retention_days: u64) -> Self {
        Self {
            prices,
            user_secret: std::sync::RwLock::new(user_secret.into()),
            retention_days,
        }
    }

    /// The `user_id` HMAC secret as this replica knows it.
    pub fn user_secret(&self) -> Arc<[u8]> {
        self.user_secret
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace_user_secret(&self, secret: Vec<u8>) {
        *self
            .user_secret
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = secret.into();
    }

    /// The stored form of a `user_id`: 16 hex digits of its HMAC-SHA256.
    pub fn hash_user(&self, user_id: &str) -> String {
        hash_user(&self.user_secret(), user_id)
    }

    fn retention(&self) -> ChronoDuration {
        ChronoDuration::days(self.retention_days as i64)
    }

    /// The UTC days of a `days` window ending today, newest first, and
    /// tomorrow before them: a record may be dated up to [`MAX_FUTURE`]
    /// ahead of the clock of the replica that took it, which may run ahead
    /// of this one's, and one accepted is shown at once. Never more than
    /// the retention period holds.
    pub fn window(&self, now: DateTime<Utc>, days: u64) -> Vec<NaiveDate> {
        let today = now.date_naive();
        let count = days.min(self.retention_days + 1);
        today
            .succ_opt()
            .into_iter()
            .chain((0..count).filter_map(|back| today.checked_sub_days(chrono::Days::new(back))))
            .collect()
    }

    /// When a day's aggregates expire: `retention` after the day ends (ms).
    fn day_expiry_ms(&self, day: NaiveDate) -> i64 {
        let end = day
            .succ_opt()
            .unwrap_or(day)
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc();
        (end + self.retention()).timestamp_millis()
    }
}

/// 16 hex digits of the HMAC-SHA256 of `user_id` under `secret`.
fn hash_user(secret: &[u8], user_id: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(user_id.as_bytes());
    let digest = mac.finalize().into_bytes();
    hex::encode(&digest[..8])
}

/// Everything one batch adds to storage, grouped by day.
#[derive(Debug, Clone)]
pub struct UsageWrite {
    /// Client ids to claim, each as `claim_of` names it; a duplicate is
    /// reported by its index here.
    pub claims: Vec<String>,
    /// How long a claimed id is remembered (the retention, ms).
    pub claim_ttl_ms: i64,
    pub days: Vec<DayWrite>,
    /// The `usage.recorded` event, appended in the same atomic step.
    pub event: EventBody,
    /// The secret the batch's `user_id`s were hashed with. On Redis the
    /// write puts it back if the stored one is gone (Redis restarted
    /// empty), and is refused if the stored one is another.
    pub user_secret: Arc<[u8]>,
    pub now_ms: i64,
}

/// One day's part of a batch.
#[derive(Debug, Clone)]
pub struct DayWrite {
    pub day: NaiveDate,
    /// When the day's aggregates and records expire (ms).
    pub expire_at_ms: i64,
    /// Increments of the day's aggregate fields (non-zero only).
    pub fields: Vec<(String, i64)>,
    /// `(ts ms, record JSON)` for `recent`.
    pub recent: Vec<(i64, String)>,
}

/// What applying a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageOutcome {
    /// Everything was recorded.
    Applied,
    /// Nothing was recorded: these claims (indexes into `claims`) were seen before.
    Duplicates(Vec<usize>),
    /// Nothing was recorded: a total of this day would pass [`TOTAL_LIMIT`].
    Overflow(NaiveDate),
    /// Nothing was recorded: the stored `user_id` secret is not the one
    /// the batch was hashed with.
    OtherSecret,
}

/// Names of the aggregate fields of a day.
///
/// Totals have plain names; breakdowns are `<group>:<name>:<metric>` with
/// `<name>` an [`Id`] (which cannot contain `:`). Every breakdown is part of
/// a total and no figure a record adds is negative (a price file may not
/// price cache reads above input), so bounding the totals
/// ([`TOTAL_LIMIT`]) bounds everything.
mod field {
    pub const CALLS: &str = "calls";
    pub const COST: &str = "cost";
    pub const BASELINE: &str = "baseline";
    pub const PROMPT_SAVINGS: &str = "prompt_savings";
    pub const RESPONSE_SAVINGS: &str = "response_savings";
    pub const TOKENS_IN: &str = "tokens_in";
    pub const TOKENS_OUT: &str = "tokens_out";
    pub const CACHE_READ: &str = "cache_read";
    pub const CACHE_CREATION: &str = "cache_creation";
    pub const CACHE_HITS: &str = "cache_hits";
    pub const CACHE_READ_CALLS: &str = "cache_read_calls";
    pub const DURATION_MS: &str = "duration_ms";
}

/// A record checked, priced and ready to aggregate.
#[derive(Debug, Clone)]
struct Prepared {
    view: UsageRecordView,
    /// The `user_id` sent, kept (never stored) to hash it again under
    /// another secret.
    user_id: Option<Text<256>>,
    claim: Option<Id>,
    day: NaiveDate,
    ts_ms: i64,
    /// n$ actually spent (0 for a response-cache hit).
    actual: i64,
    baseline: i64,
    prompt_savings: i64,
    response_savings: i64,
}

impl Prepared {
    /// Hashes the `user_id` again, under `secret`.
    fn rehash(&mut self, secret: &[u8]) {
        if let Some(user_id) = &self.user_id {
            self.view.user_hash = Some(hash_user(secret, user_id.as_str()));
        }
    }

    /// Adds this call to a day's aggregates; `price_table` is the version
    /// of the table that priced it.
    fn add_fields(&self, into: &mut BTreeMap<String, i64>, price_table: &str) {
        let mut add = |name: String, v: i64| {
            if v != 0 {
                *into.entry(name).or_default() += v;
            }
        };
        let t = &self.view.tokens;
        let reads_cache = i64::from(t.cache_read > 0);
        add(field::CALLS.into(), 1);
        add(field::COST.into(), self.actual);
        add(field::BASELINE.into(), self.baseline);
        add(field::PROMPT_SAVINGS.into(), self.prompt_savings);
        add(field::RESPONSE_SAVINGS.into(), self.response_savings);
        add(field::TOKENS_IN.into(), t.input as i64);
        add(field::TOKENS_OUT.into(), t.output as i64);
        add(field::CACHE_READ.into(), t.cache_read as i64);
        add(field::CACHE_CREATION.into(), t.cache_creation as i64);
        add(field::CACHE_HITS.into(), i64::from(self.view.cache.hit));
        add(field::CACHE_READ_CALLS.into(), reads_cache);
        add(field::DURATION_MS.into(), self.view.duration_ms as i64);
        for (group, name) in [
            ("tier", self.view.tier.as_str()),
            ("provider", &self.view.provider),
            ("model", &self.view.model),
            ("wf", &self.view.workflow),
        ] {
            add(format!("{group}:{name}:calls"), 1);
            add(format!("{group}:{name}:cost"), self.actual);
        }
        add(format!("{PRICE_TABLES}:{price_table}:calls"), 1);
        let wf = &self.view.workflow;
        add(format!("wf:{wf}:cache_read"), t.cache_read as i64);
        add(format!("wf:{wf}:cache_creation"), t.cache_creation as i64);
        add(format!("wf:{wf}:cache_read_calls"), reads_cache);
        add(format!("wf:{wf}:prompt_savings"), self.prompt_savings);
    }
}

impl Engine {
    /// The secret keying `user_id` HMACs.
    pub async fn usage_secret(&self) -> EngineResult<Vec<u8>> {
        dispatch!(self, usage_secret())
    }

    /// Claims the batch's ids and adds its aggregates, records and event in
    /// one atomic step — or changes nothing and says why.
    pub async fn apply_usage(&self, write: &UsageWrite) -> EngineResult<UsageOutcome> {
        dispatch!(self, apply_usage(write))
    }

    /// The aggregate fields of each of `days` (empty maps for days with no usage).
    pub async fn usage_days(&self, days: &[NaiveDate]) -> EngineResult<Vec<HashMap<String, i64>>> {
        dispatch!(self, usage_days(days))
    }

    /// Up to `limit` record JSONs of `days` (given newest first), newest
    /// first, after `after` if given.
    pub async fn usage_recent(
        &self,
        days: &[NaiveDate],
        after: Option<&RecentCursor>,
        limit: usize,
    ) -> EngineResult<Vec<String>> {
        dispatch!(self, usage_recent(days, after, limit))
    }
}

/// What `POST /v1/usage` answers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageAccepted {
    /// Records recorded by this request.
    pub accepted: u64,
    /// Records ignored because their `id` was recorded before (or earlier in this batch).
    pub duplicates: u64,
    /// The id of every record, in request order (server-made UUIDv7 where none was sent).
    pub ids: Vec<String>,
    /// The ids of the ignored records.
    pub duplicate_ids: Vec<String>,
}

/// Checks, prices and records a body of usage records.
pub async fn record_usage(
    state: &AppState,
    caller: &Identity,
    body: UsageBody,
) -> ApiResult<UsageAccepted> {
    let settings = &state.usage;
    let (records, batch) = match body {
        UsageBody::One(r) => (vec![*r], false),
        UsageBody::Batch(b) => (b.records, true),
    };
    if batch && records.is_empty() {
        return Err(ApiError::invalid(
            "records",
            "must hold at least one record",
        ));
    }
    if records.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "records",
            format!(
                "must hold at most {MAX_BATCH} records (got {})",
                records.len()
            ),
        ));
    }
    let now = state.clock.now();
    let mut secret = settings.user_secret();
    let mut prepared = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        let at = |name: &str| {
            if batch {
                format!("records[{i}].{name}")
            } else {
                name.to_owned()
            }
        };
        prepared.push(prepare(settings, caller, record, now, &secret, &at)?);
    }

    // Repeats inside the batch never reach storage: the first one counts.
    let mut duplicate = vec![false; prepared.len()];
    let mut seen = HashSet::new();
    for (i, p) in prepared.iter().enumerate() {
        if let Some(id) = &p.claim {
            if !seen.insert(id.clone()) {
                duplicate[i] = true;
            }
        }
    }
    // A batch is applied whole or not at all; when storage reports ids it
    // has seen, they are set aside and the rest is tried again. Each round
    // sets aside at least one record, so this ends. When it holds another
    // `user_id` secret (another replica made a new one after Redis lost
    // its data), this replica takes that one and hashes the batch again:
    // one user hashes one way whichever replica records it.
    let mut secrets_replaced = 0;
    loop {
        let live: Vec<usize> = (0..prepared.len()).filter(|i| !duplicate[*i]).collect();
        if live.is_empty() {
            break;
        }
        let (write, claim_owner) = plan(settings, &prepared, &live, caller, now, &secret);
        match state.engine.apply_usage(&write).await? {
            UsageOutcome::OtherSecret if secrets_replaced < 3 => {
                secrets_replaced += 1;
                settings.replace_user_secret(state.engine.usage_secret().await?);
                secret = settings.user_secret();
                tracing::warn!(
                    "the stored user-id HMAC secret changed (Redis lost its data?); using it"
                );
                for p in &mut prepared {
                    p.rehash(&secret);
                }
            }
            UsageOutcome::OtherSecret => {
                return Err(ApiError::Unavailable(
                    "the user-id HMAC secret keeps changing".into(),
                ));
            }
            UsageOutcome::Applied => break,
            UsageOutcome::Duplicates(claims) => {
                for c in claims {
                    if let Some(&i) = claim_owner.get(c) {
                        duplicate[i] = true;
                    }
                }
            }
            UsageOutcome::Overflow(day) => {
                return Err(ApiError::invalid(
                    "records",
                    format!("would take the usage totals of {day} past their limit"),
                ));
            }
        }
    }
    let ids: Vec<String> = prepared.iter().map(|p| p.view.id.clone()).collect();
    let duplicate_ids: Vec<String> = prepared
        .iter()
        .zip(&duplicate)
        .filter(|(_, d)| **d)
        .map(|(p, _)| p.view.id.clone())
        .collect();
    Ok(UsageAccepted {
        accepted: (ids.len() - duplicate_ids.len()) as u64,
        duplicates: duplicate_ids.len() as u64,
        ids,
        duplicate_ids,
    })
}

/// Validates one record against the clock, the caller's scope and the price table.
fn prepare(
    settings: &UsageSettings,
    caller: &Identity,
    r: UsageRecordIn,
    now: DateTime<Utc>,
    secret: &[u8],
    at: &dyn Fn(&str) -> String,
) -> ApiResult<Prepared> {
    // To the millisecond it is stored and listed by: a leap second
    // (`23:59:60.5`) becomes the next day's first second, the day its
    // milliseconds count in, so the record's day and its place agree.
    let ts = r.ts.unwrap_or(now);
    let ts = DateTime::from_timestamp_millis(ts.timestamp_millis()).unwrap_or(ts);
    if ts > now + MAX_FUTURE {
        return Err(ApiError::invalid(
            at("ts"),
            "must not be more than 5 minutes in the future",
        ));
    }
    if ts < now - settings.retention() {
        return Err(ApiError::invalid(
            at("ts"),
            format!(
                "must be within the last {} days (the usage retention)",
                settings.retention_days
            ),
        ));
    }
    caller.ensure_may_write_for(r.agent_id.as_ref(), &at("agent_id"))?;
    let tokens = r.tokens.counts();
    let prices = &settings.prices;
    let rates = prices.rates(r.model.as_str());
    let own = match r.cost_usd {
        Some(c) => prices::nanos(c.get()),
        None => rates.cost(&tokens),
    };
    let hit = r.cache.as_ref().is_some_and(|c| c.hit);
    let view = UsageRecordView {
        id: r
            .id
            .as_ref()
            .map_or_else(|| uuid::Uuid::now_v7().to_string(), Id::to_string),
        ts: rfc3339(ts),
        workflow: r.workflow.to_string(),
        stage: r.stage.map(|s| s.to_string()),
        tier: r.tier,
        model: r.model.to_string(),
        provider: r.provider.to_string(),
        agent_id: r.agent_id.map(|a| a.to_string()),
        user_hash: r.user_id.as_ref().map(|u| hash_user(secret, u.as_str())),
        tokens,
        cache: r.cache.unwrap_or(CacheInfo {
            hit: false,
            kind: None,
        }),
        cost_usd: usd(own),
        duration_ms: r.duration_ms.get(),
    };
    Ok(Prepared {
        user_id: r.user_id,
        view,
        claim: r.id,
        day: ts.date_naive(),
        ts_ms: ts.timestamp_millis(),
        actual: if hit { 0 } else { own },
        baseline: prices.baseline().uncached_cost(&tokens),
        prompt_savings: rates.cache_read_savings(tokens.cache_read),
        response_savings: if hit { own } else { 0 },
    })
}

/// What a record's client `id` claims: the id within the caller's key, so
/// that one key's ids never set another's records aside (a key scoped to
/// some agents could otherwise pre-empt the records of others). A hex
/// SHA-256, so key names of any form never enter a storage key.
fn claim_of(caller: &Identity, id: &Id) -> String {
    crate::types::sha256_hex(format!("{}\n{id}", caller.name))
}

/// A record as stored for `recent`: for a record with a client id, first
/// whose id it is (`key`, 16 hex digits of its claim), so that two keys'
/// records alike in every field stay two members of the day's set; then
/// its view, `id` first. A cursor finds a record by how it begins (see
/// [`RecentCursor::record_prefix`]). Readers take the view and pass over
/// `key`.
#[derive(Serialize)]
struct StoredRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(flatten)]
    view: &'a UsageRecordView,
}

/// The `key` a stored record begins with, if it has one.
fn stored_key(json: &str) -> Option<&str> {
    json.strip_prefix(r#"{"key":""#)?.split('"').next()
}

/// Builds the storage write for the records at `live`; also returns, for
/// each claim, the index of the record it belongs to.
fn plan(
    settings: &UsageSettings,
    prepared: &[Prepared],
    live: &[usize],
    caller: &Identity,
    now: DateTime<Utc>,
    user_secret: &Arc<[u8]>,
) -> (UsageWrite, Vec<usize>) {
    let mut claims = Vec::new();
    let mut claim_owner = Vec::new();
    let mut fields: BTreeMap<NaiveDate, BTreeMap<String, i64>> = BTreeMap::new();
    let mut recent: BTreeMap<NaiveDate, Vec<(i64, String)>> = BTreeMap::new();
    let (mut cost, mut tokens_in, mut tokens_out, mut hits) = (0i64, 0u64, 0u64, 0u64);
    let mut agents: HashSet<Option<&str>> = HashSet::new();
    for &i in live {
        let p = &prepared[i];
        let claim = p.claim.as_ref().map(|id| claim_of(caller, id));
        let stored = StoredRecord {
            view: &p.view,
            key: claim.as_deref().map(|c| &c[..16]),
        };
        let json = serde_json::to_string(&stored).expect("a record view always serializes");
        if let Some(claim) = claim {
            claims.push(claim);
            claim_owner.push(i);
        }
        p.add_fields(fields.entry(p.day).or_default(), settings.prices.version());
        recent.entry(p.day).or_default().push((p.ts_ms, json));
        cost += p.actual;
        tokens_in += p.view.tokens.input;
        tokens_out += p.view.tokens.output;
        hits += u64::from(p.view.cache.hit);
        agents.insert(p.view.agent_id.as_deref());
    }
    // The event names the agent when the whole batch is one agent's.
    let agent = match agents.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(a)] => Id::new(*a).ok(),
        _ => None,
    };
    let event = EventBody::new(
        "usage.recorded",
        &caller.name,
        agent.as_ref(),
        now,
        serde_json::json!({
            "accepted": live.len(),
            "duplicates": prepared.len() - live.len(),
            "cost_usd": usd(cost),
            "tokens_input": tokens_in,
            "tokens_output": tokens_out,
            "cache_hits": hits,
        }),
    );
    // Both maps have the same days, in the same order.
    let days = fields
        .into_iter()
        .zip(recent.into_values())
        .map(|((day, fields), recent)| DayWrite {
            day,
            expire_at_ms: settings.day_expiry_ms(day),
            fields: fields.into_iter().collect(),
            recent,
        })
        .collect();
    let write = UsageWrite {
        claims,
        claim_ttl_ms: settings.retention().num_milliseconds(),
        days,
        event,
        now_ms: now.timestamp_millis(),
        user_secret: user_secret.clone(),
    };
    (write, claim_owner)
}

/// The sum of several days' aggregates, decoded. Each day's totals stay
/// within [`TOTAL_LIMIT`], but their sum over a window may not fit an
/// `i64`: it is summed in an `i128`.
#[derive(Debug, Default)]
struct Totals {
    top: HashMap<String, i128>,
    /// `group → name → metric → value`.
    groups: BTreeMap<String, BTreeMap<String, HashMap<String, i128>>>,
}

impl Totals {
    fn sum(days: Vec<HashMap<String, i64>>) -> Self {
        let mut totals = Self::default();
        for day in days {
            for (name, value) in day {
                let mut parts = name.splitn(3, ':');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(top), None, None) => {
                        *totals.top.entry(top.to_owned()).or_default() += i128::from(value)
                    }
                    (Some(group), Some(key), Some(metric)) => {
                        *totals
                            .groups
                            .entry(group.to_owned())
                            .or_default()
                            .entry(key.to_owned())
                            .or_default()
                            .entry(metric.to_owned())
                            .or_default() += i128::from(value);
                    }
                    _ => {}
                }
            }
        }
        totals
    }

    fn get(&self, name: &str) -> i128 {
        self.top.get(name).copied().unwrap_or(0)
    }

    fn group(&self, group: &str) -> impl Iterator<Item = (&String, &HashMap<String, i128>)> {
        self.groups.get(group).into_iter().flatten()
    }
}

fn metric(m: &HashMap<String, i128>, name: &str) -> i128 {
    m.get(name).copied().unwrap_or(0)
}

/// A summed count as answered (counts are never negative; a sum past
/// `u64` is answered as its largest value).
fn count(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

fn ratio(part: i128, whole: i128) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

async fn totals(state: &AppState, days: u64) -> ApiResult<Totals> {
    let window = state.usage.window(state.clock.now(), days);
    Ok(Totals::sum(state.engine.usage_days(&window).await?))
}

/// Calls and actual cost of one group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct GroupCost {
    pub calls: u64,
    /// Actual spending (response-cache hits count 0).
    pub cost_usd: f64,
}

/// `GET /v1/usage/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageStats {
    /// The window: today (UTC) and the `days − 1` days before it (and
    /// tomorrow, for records dated a little ahead).
    pub days: u64,
    pub total_calls: u64,
    /// Actual spending: response-cache hits count 0.
    pub total_cost_usd: f64,
    pub tokens_input: u64,
    pub tokens_output: u64,
    pub tokens_cache_read: u64,
    pub tokens_cache_creation: u64,
    /// Calls answered from a response cache.
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// `cache_hits / total_calls`, a fraction 0–1 (0 with no calls).
    pub cache_hit_rate: f64,
    /// Mean call duration; 0 with no calls.
    pub avg_duration_ms: f64,
    /// Every tier, with zeros where there were no calls.
    pub by_tier: BTreeMap<String, GroupCost>,
    pub by_workflow: BTreeMap<String, GroupCost>,
    pub by_provider: BTreeMap<String, GroupCost>,
    pub by_model: BTreeMap<String, GroupCost>,
}

pub async fn stats(state: &AppState, days: u64) -> ApiResult<UsageStats> {
    let t = totals(state, days).await?;
    let calls = t.get(field::CALLS);
    let hits = t.get(field::CACHE_HITS);
    let by = |group: &str| -> BTreeMap<String, GroupCost> {
        t.group(group)
            .map(|(name, m)| {
                let cost = GroupCost {
                    calls: count(metric(m, "calls")),
                    cost_usd: usd(metric(m, "cost")),
                };
                (name.clone(), cost)
            })
            .collect()
    };
    let mut by_tier = by("tier");
    for tier in Tier::ALL {
        by_tier.entry(tier.as_str().to_owned()).or_default();
    }
    Ok(UsageStats {
        days,
        total_calls: count(calls),
        total_cost_usd: usd(t.get(field::COST)),
        tokens_input: count(t.get(field::TOKENS_IN)),
        tokens_output: count(t.get(field::TOKENS_OUT)),
        tokens_cache_read: count(t.get(field::CACHE_READ)),
        tokens_cache_creation: count(t.get(field::CACHE_CREATION)),
        cache_hits: count(hits),
        cache_misses: count(calls - hits),
        cache_hit_rate: ratio(hits, calls),
        avg_duration_ms: ratio(t.get(field::DURATION_MS), calls),
        by_tier,
        by_workflow: by("wf"),
        by_provider: by("provider"),
        by_model: by("model"),
    })
}

/// `GET /v1/usage/savings`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Savings {
    pub days: u64,
    pub total_calls: u64,
    /// What was spent (response-cache hits count 0).
    pub actual_cost_usd: f64,
    /// Every call priced at the baseline (premium) model's prices for its
    /// own tokens, with prompt-cache reads at the full input price.
    pub baseline_cost_usd: f64,
    /// `baseline − actual`.
    pub savings_usd: f64,
    /// `savings / baseline × 100` (0 with no baseline).
    pub savings_percent: f64,
    /// `baseline − actual − cache_savings`: what choosing cheaper tiers saved.
    pub routing_savings_usd: f64,
    /// Prompt-cache plus response-cache savings.
    pub cache_savings_usd: f64,
    /// Prompt-cache reads at 90 % off their model's input price.
    pub prompt_cache_savings_usd: f64,
    /// Response-cache hits at the call's own cost.
    pub response_cache_savings_usd: f64,
    /// Percent of calls per tier (every tier listed).
    pub tier_distribution: BTreeMap<String, f64>,
    /// The model the baseline is priced at, in the current price table.
    pub baseline_model: String,
    /// The current price table's version (see `price_tables`).
    pub price_table_version: String,
    /// Calls in the window by the version of the price table that priced
    /// them. Costs and baselines are fixed when a call is recorded, so after
    /// a change of table (or with replicas on different tables) a window
    /// adds up figures priced by each table listed here.
    pub price_tables: BTreeMap<String, u64>,
}

pub async fn savings(state: &AppState, days: u64) -> ApiResult<Savings> {
    let t = totals(state, days).await?;
    let calls = t.get(field::CALLS);
    let actual = t.get(field::COST);
    let baseline = t.get(field::BASELINE);
    let prompt = t.get(field::PROMPT_SAVINGS);
    let response = t.get(field::RESPONSE_SAVINGS);
    let saved = baseline - actual;
    let tier_calls: HashMap<&str, i128> = t
        .group("tier")
        .map(|(n, m)| (n.as_str(), metric(m, "calls")))
        .collect();
    let tier_distribution = Tier::ALL
        .iter()
        .map(|tier| {
            let n = tier_calls.get(tier.as_str()).copied().unwrap_or(0);
            (tier.as_str().to_owned(), ratio(n, calls) * 100.0)
        })
        .collect();
    let prices = &state.usage.prices;
    Ok(Savings {
        days,
        total_calls: count(calls),
        actual_cost_usd: usd(actual),
        baseline_cost_usd: usd(baseline),
        savings_usd: usd(saved),
        savings_percent: ratio(saved, baseline) * 100.0,
        routing_savings_usd: usd(saved - prompt - response),
        cache_savings_usd: usd(prompt + response),
        prompt_cache_savings_usd: usd(prompt),
        response_cache_savings_usd: usd(response),
        tier_distribution,
        baseline_model: prices.view().baseline_model,
        price_table_version: prices.version().to_owned(),
        price_tables: t
            .group(PRICE_TABLES)
            .map(|(version, m)| (version.clone(), count(metric(m, "calls"))))
            .collect(),
    })
}

/// Prompt-cache figures of a set of calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CacheFigures {
    /// `hit_count / total_requests`, a fraction 0–1 (0 with no requests).
    pub hit_rate: f64,
    /// Tokens read from the prompt cache.
    pub total_reads: u64,
    /// Tokens written to the prompt cache.
    pub total_writes: u64,
    /// Calls that read from the prompt cache.
    pub hit_count: u64,
    /// Every recorded call.
    pub total_requests: u64,
    /// Reads at 90 % off their model's input price.
    pub estimated_savings_usd: f64,
}

impl CacheFigures {
    fn new(requests: i128, hits: i128, reads: i128, writes: i128, savings: i128) -> Self {
        Self {
            hit_rate: ratio(hits, requests),
            total_reads: count(reads),
            total_writes: count(writes),
            hit_count: count(hits),
            total_requests: count(requests),
            estimated_savings_usd: usd(savings),
        }
    }
}

/// `GET /v1/usage/cache-stats`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CacheStats {
    pub days: u64,
    #[serde(flatten)]
    pub totals: CacheFigures,
    pub by_workflow: BTreeMap<String, CacheFigures>,
}

pub async fn cache_stats(state: &AppState, days: u64) -> ApiResult<CacheStats> {
    let t = totals(state, days).await?;
    let by_workflow = t
        .group("wf")
        .map(|(name, m)| {
            let figures = CacheFigures::new(
                metric(m, "calls"),
                metric(m, "cache_read_calls"),
                metric(m, "cache_read"),
                metric(m, "cache_creation"),
                metric(m, "prompt_savings"),
            );
            (name.clone(), figures)
        })
        .collect();
    Ok(CacheStats {
        days,
        totals: CacheFigures::new(
            t.get(field::CALLS),
            t.get(field::CACHE_READ_CALLS),
            t.get(field::CACHE_READ),
            t.get(field::CACHE_CREATION),
            t.get(field::PROMPT_SAVINGS),
        ),
        by_workflow,
    })
}

/// Totals of the rows `recent` returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RecentTotals {
    pub calls: u64,
    /// Actual spending of these rows (response-cache hits count 0).
    pub cost_usd: f64,
    pub tokens_input: u64,
    pub tokens_output: u64,
    pub tokens_cache_read: u64,
    pub tokens_cache_creation: u64,
    pub cache_hits: u64,
    pub duration_ms: u64,
}

/// `GET /v1/usage/recent`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecentUsage {
    /// Newest first.
    pub records: Vec<UsageRecordView>,
    /// The totals of `records` (this page).
    pub totals: RecentTotals,
    /// Pass as `cursor` for the records after these; null at the end.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Where a page of recent records ends: its last record, by the time it
/// is filed under (ms), its id and, for a client id, whose it is. The next
/// page starts after that record, or, if it has been dropped meanwhile (a
/// day keeps its newest records), with the records older than it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentCursor {
    pub ts_ms: i64,
    pub id: String,
    pub key: Option<String>,
}

impl RecentCursor {
    /// The listing's name in its cursors (see [`IndexCursor::encode`]).
    const LISTING: &'static str = "recent";

    /// The id and the key are one member, `id/key` (ids have no `/`).
    fn encode(&self) -> String {
        let member = match &self.key {
            Some(key) => format!("{}/{key}", self.id),
            None => self.id.clone(),
        };
        IndexCursor {
            score: self.ts_ms,
            member,
        }
        .encode(Self::LISTING)
    }

    /// A `cursor` parameter: absent or empty is none.
    pub fn from_param(raw: Option<&str>) -> ApiResult<Option<Self>> {
        let split = |member: &str| match member.split_once('/') {
            Some((id, key)) => (id.to_owned(), Some(key.to_owned())),
            None => (member.to_owned(), None),
        };
        let valid = |member: &str| {
            let (id, key) = split(member);
            Id::new(id).is_ok()
                && key.is_none_or(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        let Some(cursor) = IndexCursor::from_named_param_with(raw, Self::LISTING, valid)? else {
            return Ok(None);
        };
        let (id, key) = split(&cursor.member);
        let cursor = Self {
            ts_ms: cursor.score,
            id,
            key,
        };
        // A time no record can have (outside the calendar) is no cursor.
        cursor.day().ok_or_else(|| {
            ApiError::invalid("cursor", "is not a cursor returned by this endpoint")
        })?;
        Ok(Some(cursor))
    }

    /// How the stored record begins (see [`StoredRecord`]).
    pub fn record_prefix(&self) -> String {
        match &self.key {
            Some(key) => format!("{{\"key\":\"{key}\",\"id\":\"{}\",", self.id),
            None => format!("{{\"id\":\"{}\",", self.id),
        }
    }

    /// The UTC day the record is filed under.
    pub fn day(&self) -> Option<NaiveDate> {
        DateTime::<Utc>::from_timestamp_millis(self.ts_ms).map(|t| t.date_naive())
    }
}

pub async fn recent(
    state: &AppState,
    limit: usize,
    days: Option<u64>,
    after: Option<RecentCursor>,
) -> ApiResult<RecentUsage> {
    let days = days.unwrap_or(state.usage.retention_days + 1);
    let window = state.usage.window(state.clock.now(), days);
    // One more than asked, to tell whether a next page starts after it.
    let mut raw = state
        .engine
        .usage_recent(&window, after.as_ref(), limit + 1)
        .await?;
    let more = raw.len() > limit;
    raw.truncate(limit);
    let mut records = Vec::with_capacity(raw.len());
    let mut totals = RecentTotals::default();
    let mut cost = 0i64;
    let last_key = raw
        .last()
        .and_then(|json| stored_key(json))
        .map(str::to_owned);
    for json in raw {
        let r: UsageRecordView = serde_json::from_str(&json)
            .map_err(|e| ApiError::Internal(format!("stored usage record: {e}")))?;
        totals.calls += 1;
        if !r.cache.hit {
            cost += prices::nanos(r.cost_usd);
        }
        totals.tokens_input += r.tokens.input;
        totals.tokens_output += r.tokens.output;
        totals.tokens_cache_read += r.tokens.cache_read;
        totals.tokens_cache_creation += r.tokens.cache_creation;
        totals.cache_hits += u64::from(r.cache.hit);
        totals.duration_ms += r.duration_ms;
        records.push(r);
    }
    totals.cost_usd = usd(cost);
    let next_cursor = records
        .last()
        .filter(|_| more)
        .map(|r| {
            let ts_ms = DateTime::parse_from_rfc3339(&r.ts)
                .map(|t| t.timestamp_millis())
                .map_err(|e| ApiError::Internal(format!("stored usage record: {e}")))?;
            Ok::<_, ApiError>(
                RecentCursor {
                    ts_ms,
                    id: r.id.clone(),
                    key: last_key,
                }
                .encode(),
            )
        })
        .transpose()?;
    Ok(RecentUsage {
        records,
        totals,
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> UsageSettings {
        UsageSettings::new(PriceTable::builtin(), b"secret".to_vec(), 90)
    }

    #[test]
    fn tiers_parse_in_any_case_and_step_up_and_down() {
        assert_eq!(
            serde_json::from_str::<Tier>("\"PREMIUM\"").unwrap(),
            Tier::Premium
        );
        assert_eq!(
            serde_json::from_str::<Tier>("\"Cheap\"").unwrap(),
            Tier::Cheap
        );
        assert!(serde_json::from_str::<Tier>("\"gold\"").is_err());
        assert_eq!(
            serde_json::to_string(&Tier::Capable).unwrap(),
            "\"capable\""
        );
        assert_eq!(Tier::Premium.up(), Tier::Premium);
        assert_eq!(Tier::Cheap.down(), None);
    }

    #[test]
    fn user_ids_hash_to_16_stable_hex_digits() {
        let s = settings();
        let h = s.hash_user("alice@example.com");
        assert_eq!(h.len(), 16);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(h, s.hash_user("alice@example.com"));
        assert_ne!(h, s.hash_user("bob@example.com"));
        let other = UsageSettings::new(PriceTable::builtin(), b"other".to_vec(), 90);
        assert_ne!(h, other.hash_user("alice@example.com"));
    }

    #[test]
    fn windows_are_whole_utc_days_bounded_by_retention() {
        let s = settings();
        let now = "2026-03-10T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let w = s.window(now, 3);
        assert_eq!(
            w.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            ["2026-03-11", "2026-03-10", "2026-03-09", "2026-03-08"],
            "tomorrow, for records dated a little ahead, then the window"
        );
        assert_eq!(s.window(now, 10_000).len(), 92);
    }

    #[test]
    fn totals_sum_days_and_split_breakdowns() {
        let day = |calls: i64, cost: i64| {
            HashMap::from([
                ("calls".to_owned(), calls),
                ("wf:review:cost".to_owned(), cost),
            ])
        };
        let t = Totals::sum(vec![day(2, 10), day(3, 5)]);
        assert_eq!(t.get("calls"), 5);
        let (name, m) = t.group("wf").next().unwrap();
        assert_eq!((name.as_str(), metric(m, "cost")), ("review", 15));
    }
}
