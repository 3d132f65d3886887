//! HTTP handlers for usage records, savings and cache statistics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, de};
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;
use crate::auth::{AgentWrite, Caller, Viewer};
use crate::error::{ApiResult, Problem};
use crate::extract::{ValidJson, ValidQuery};
use crate::types::{Bounded, Limit, Param};
use crate::usage::prices::PriceTableView;
use crate::usage::{
    CacheStats, RecentUsage, Savings, UsageAccepted, UsageBody, UsageStats, cache_stats, recent,
    record_usage, savings, stats,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_usage))
        .routes(routes!(get_usage_recent))
        .routes(routes!(get_usage_stats))
        .routes(routes!(get_usage_savings))
        .routes(routes!(get_usage_cache_stats))
        .routes(routes!(get_usage_prices))
}

/// Record LLM usage.
///
/// One record, or `{"records": […]}` with 1–1000 records, applied whole or
/// not at all. A record whose `id` was recorded before (in this batch, an
/// earlier one, or through another replica) is ignored and listed in
/// `duplicate_ids`. `cost_usd` defaults to the call's tokens at its model's
/// prices. A response-cache hit (`cache.hit`) spends nothing: its cost counts
/// as cache savings. Emits one `usage.recorded` event per request that
/// records anything — with the batch's counts and totals, not one per record.
#[utoipa::path(
    post, path = "/v1/usage", tag = "usage",
    request_body(content = UsageBody, description = "One record or a batch"),
    responses(
        (status = 201, description = "Recorded (duplicates ignored)", body = UsageAccepted),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "The key may not act as a record's agent", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, description = "A field is invalid (named, e.g. `records[3].tokens.input`), \
            or the batch holds more than 1000 records", body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn post_usage(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidJson(body): ValidJson<Box<serde_json::value::RawValue>>,
) -> ApiResult<(StatusCode, Json<UsageAccepted>)> {
    let body = UsageBody::parse(body.get())?;
    let accepted = record_usage(&state, &caller, body).await?;
    Ok((StatusCode::CREATED, Json(accepted)))
}

/// A `days` window: 1–3660 (reads never go past the retention period).
type Days = Param<1, 3660>;

/// Reads an optional `days`, treating `days=` like an absent one.
fn optional_days<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Days>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .ok()
            .and_then(|v| Days::new(v).ok())
            .map(Some)
            .ok_or_else(|| de::Error::custom("must be an integer between 1 and 3660")),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DaysQuery {
    /// Today (UTC) and the `days − 1` days before it (and tomorrow, for
    /// records dated a little ahead), 1–3660 (default 30; for
    /// `cache-stats`, 7).
    #[serde(default, deserialize_with = "optional_days")]
    #[param(value_type = Option<u64>, minimum = 1, maximum = 3660)]
    days: Option<Days>,
}

impl DaysQuery {
    fn or(&self, default: u64) -> u64 {
        self.days.map_or(default, Bounded::get)
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RecentQuery {
    /// Rows, 1–1000 (default 20).
    #[param(default = 20, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// Only today (UTC) and the `days − 1` days before it (default: the
    /// whole retention period).
    #[serde(default, deserialize_with = "optional_days")]
    #[param(value_type = Option<u64>, minimum = 1, maximum = 3660)]
    days: Option<Days>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Recent usage records.
///
/// Newest first, with the totals of the rows returned, in pages
/// (`next_cursor`). The newest 1000 records of each UTC day are kept for
/// this view (for the retention period).
#[utoipa::path(
    get, path = "/v1/usage/recent", tag = "usage", params(RecentQuery),
    responses(
        (status = 200, body = RecentUsage), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_usage_recent(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<RecentQuery>,
) -> ApiResult<Json<RecentUsage>> {
    let limit = q.limit.map_or(20, Bounded::get) as usize;
    let after = crate::usage::RecentCursor::from_param(q.cursor.as_deref())?;
    recent(&state, limit, q.days.map(Bounded::get), after)
        .await
        .map(Json)
}

/// Usage statistics.
///
/// Calls, actual cost, tokens and response-cache hits over the last `days`
/// UTC days (default 30), with cost by tier, workflow, provider and model.
/// Rates are fractions 0–1.
#[utoipa::path(
    get, path = "/v1/usage/stats", tag = "usage", params(DaysQuery),
    responses(
        (status = 200, body = UsageStats), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_usage_stats(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<DaysQuery>,
) -> ApiResult<Json<UsageStats>> {
    stats(&state, q.or(30)).await.map(Json)
}

/// Cost savings.
///
/// Over the last `days` UTC days (default 30): what was spent, what the same
/// calls would have cost at the premium (baseline) model's prices without
/// caching, and how the difference splits into tier-routing and cache
/// savings. `tier_distribution` and `savings_percent` are percentages.
#[utoipa::path(
    get, path = "/v1/usage/savings", tag = "usage", params(DaysQuery),
    responses(
        (status = 200, body = Savings), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_usage_savings(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<DaysQuery>,
) -> ApiResult<Json<Savings>> {
    savings(&state, q.or(30)).await.map(Json)
}

/// Prompt-cache statistics.
///
/// Over the last `days` UTC days (default 7): the share of calls that read
/// from the prompt cache (`hit_rate`, a fraction), tokens read and written,
/// and what the reads saved (90 % of the input price); also per workflow.
#[utoipa::path(
    get, path = "/v1/usage/cache-stats", tag = "usage", params(DaysQuery),
    responses(
        (status = 200, body = CacheStats), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_usage_cache_stats(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<DaysQuery>,
) -> ApiResult<Json<CacheStats>> {
    cache_stats(&state, q.or(7)).await.map(Json)
}

/// The price table.
///
/// Per model: its tier and input, output, cache-read and cache-write prices
/// in dollars per million tokens. Built in: claude-haiku-4-5 (cheap) $1/$5,
/// claude-sonnet-5 (capable) $3/$15, claude-opus-4-8 (premium) $5/$25;
/// unknown models $3/$15; cache reads 10 % and cache writes 125 % of the
/// input price. `--prices-file` replaces it.
#[utoipa::path(
    get, path = "/v1/usage/prices", tag = "usage",
    responses(
        (status = 200, body = PriceTableView), (status = 401, body = Problem),
        (status = 403, body = Problem),
    )
)]
async fn get_usage_prices(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
) -> Json<PriceTableView> {
    Json(state.usage.prices.view())
}
