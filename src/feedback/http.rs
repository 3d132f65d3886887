//! HTTP handlers for quality feedback, tier recommendations and template ratings.
//!
//! Agents write scores and ratings, and may read what they act on at run
//! time — a recommendation and a template's confidence; summaries across
//! workflows (statistics, underperforming stages, the template list) are
//! for viewers and above.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;
use crate::auth::{AgentWrite, AnyRole, Caller, Viewer};
use crate::error::{ApiResult, Problem};
use crate::extract::{ValidJson, ValidPath, ValidQuery};
use crate::feedback::{
    FeedbackIn, FeedbackRecorded, MIN_SAMPLES, QualityStats, Rating, Recommendation, StageCursor,
    TemplateCursor, TemplateOrder, TemplateRating, quality_stats, rate_template, recommendation,
    record_feedback, underperforming,
};
use crate::types::{Bounded, DEFAULT_LIMIT, Fraction, Id, Limit, Param};
use crate::usage::Tier;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_feedback))
        .routes(routes!(get_feedback_stats))
        .routes(routes!(get_feedback_recommendation))
        .routes(routes!(get_feedback_underperforming))
        .routes(routes!(post_template_feedback))
        .routes(routes!(get_template))
        .routes(routes!(list_templates))
}

/// Record a quality score.
///
/// A score 0–1 for a workflow stage run on a tier, kept 7 days. Emits
/// `feedback.recorded` (which also carries `metadata`).
#[utoipa::path(
    post, path = "/v1/feedback", tag = "feedback", request_body = FeedbackIn,
    responses(
        (status = 201, body = FeedbackRecorded),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "Not an agent or admin key, or `agent_id` out of scope", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn post_feedback(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidJson(req): ValidJson<FeedbackIn>,
) -> ApiResult<(StatusCode, Json<FeedbackRecorded>)> {
    let recorded = record_feedback(&state, &caller, req).await?;
    Ok((StatusCode::CREATED, Json(recorded)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StatsQuery {
    /// The workflow scored.
    workflow: Id,
    /// Its stage.
    stage: Id,
    /// One tier; absent: every tier together.
    tier: Option<Tier>,
}

/// Quality statistics of a stage.
///
/// Average, minimum, maximum, count and trend of the last 7 days' scores,
/// of one tier or all of them.
#[utoipa::path(
    get, path = "/v1/feedback/stats", tag = "feedback", params(StatsQuery),
    responses(
        (status = 200, body = QualityStats), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_feedback_stats(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<StatsQuery>,
) -> ApiResult<Json<QualityStats>> {
    quality_stats(&state, &q.workflow, &q.stage, q.tier)
        .await
        .map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RecommendationQuery {
    /// The workflow scored.
    workflow: Id,
    /// Its stage.
    stage: Id,
    /// The tier the stage runs on now.
    current_tier: Tier,
}

/// Recommend a tier.
///
/// Under 10 scores: keep (confidence 0). Average below 0.7: one tier up
/// (premium stays, confidence 1). Above 0.9 on capable or premium: one tier
/// down only if the lower tier's own scores average above 0.85.
/// Otherwise keep. Confidence is `min(scores / 20, 1)` unless a rule sets
/// it. Any key may ask.
#[utoipa::path(
    get, path = "/v1/feedback/recommendation", tag = "feedback", params(RecommendationQuery),
    responses(
        (status = 200, body = Recommendation), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_feedback_recommendation(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<RecommendationQuery>,
) -> ApiResult<Json<Recommendation>> {
    recommendation(&state, &q.workflow, &q.stage, q.current_tier)
        .await
        .map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UnderperformingQuery {
    /// One workflow; absent: every workflow with recent feedback.
    workflow: Option<Id>,
    /// Averages below this are listed (default 0.7).
    #[param(value_type = Option<f64>, minimum = 0.0, maximum = 1.0)]
    threshold: Option<Fraction>,
    /// Scores a stage needs to be judged, 1–10000 (default 10, as for recommendations).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 10000)]
    min_samples: Option<Param<1, 10_000>>,
    /// Rows, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page; empty: the first page.
    cursor: Option<String>,
}

/// Underperforming stages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Underperforming {
    /// One row per stage and tier, worst average first.
    pub stages: Vec<QualityStats>,
    pub threshold: f64,
    pub min_samples: u64,
    /// Pass as `cursor` (with the same filters) for the next page; null
    /// when this is the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Underperforming stages.
///
/// Stages, per tier, whose last-7-days average is below `threshold` with
/// at least `min_samples` scores, worst first.
#[utoipa::path(
    get, path = "/v1/feedback/underperforming", tag = "feedback", params(UnderperformingQuery),
    responses(
        (status = 200, body = Underperforming), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_feedback_underperforming(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<UnderperformingQuery>,
) -> ApiResult<Json<Underperforming>> {
    let threshold = q.threshold.map_or(0.7, Fraction::get);
    let min_samples = q.min_samples.map_or(MIN_SAMPLES as u64, Bounded::get);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let cursor = q
        .cursor
        .filter(|c| !c.is_empty())
        .map(|c| StageCursor::decode("cursor", &c))
        .transpose()?;
    let (stages, next) = underperforming(
        &state,
        q.workflow.as_ref(),
        threshold,
        min_samples as usize,
        cursor.as_ref(),
        limit,
    )
    .await?;
    Ok(Json(Underperforming {
        stages,
        threshold,
        min_samples,
        next_cursor: next.map(|c| c.encode()),
    }))
}

/// The body of a template rating (unknown fields refused, as for usage).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateFeedbackIn {
    pub rating: Rating,
    /// The agent giving the rating; agent keys may only name agents in
    /// their scope, and keys limited to some agents must name one.
    pub agent_id: Option<Id>,
}

/// Rate a template.
///
/// Adds one `good` or `bad` rating and answers the new counts and
/// confidence. Emits `feedback.recorded`.
#[utoipa::path(
    post, path = "/v1/templates/{template_id}/feedback", tag = "feedback",
    params(("template_id" = Id, Path, description = "The template's id")),
    request_body = TemplateFeedbackIn,
    responses(
        (status = 200, body = TemplateRating),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn post_template_feedback(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidPath(template_id): ValidPath<String>,
    ValidJson(req): ValidJson<TemplateFeedbackIn>,
) -> ApiResult<Json<TemplateRating>> {
    let id = Id::parse("template_id", &template_id)?;
    rate_template(&state, &caller, &id, req.rating, req.agent_id.as_ref())
        .await
        .map(Json)
}

/// A template's ratings.
///
/// A template nobody rated has no ratings and confidence 1.0, like any
/// other: this never answers 404. Any key may ask.
#[utoipa::path(
    get, path = "/v1/templates/{template_id}", tag = "feedback",
    params(("template_id" = Id, Path, description = "The template's id")),
    responses(
        (status = 200, body = TemplateRating), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_template(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidPath(template_id): ValidPath<String>,
) -> ApiResult<Json<TemplateRating>> {
    let id = Id::parse("template_id", &template_id)?;
    let (good, bad) = state.engine.template_counts(&id).await?;
    Ok(Json(TemplateRating::new(&id, good, bad)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TemplatesQuery {
    /// `template_id` (default), `confidence` (highest first) or
    /// `-confidence` (lowest first).
    #[param(inline)]
    order: Option<TemplateOrder>,
    /// Page size, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page (same `order`); empty: the first page.
    cursor: Option<String>,
}

/// A page of rated templates.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateRating>,
    /// Pass as `cursor` for the next page; null when this is the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// List rated templates.
#[utoipa::path(
    get, path = "/v1/templates", tag = "feedback", params(TemplatesQuery),
    responses(
        (status = 200, body = TemplateList), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn list_templates(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<TemplatesQuery>,
) -> ApiResult<Json<TemplateList>> {
    let order = q.order.unwrap_or_default();
    let cursor = q
        .cursor
        .filter(|c| !c.is_empty())
        .map(|c| TemplateCursor::decode("cursor", &c, order))
        .transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let (rows, next) = state.engine.list_templates(order, cursor, limit).await?;
    Ok(Json(TemplateList {
        templates: rows
            .iter()
            .map(|(id, good, bad)| TemplateRating::new(id, *good, *bad))
            .collect(),
        next_cursor: next.map(|c| c.encode()),
    }))
}
