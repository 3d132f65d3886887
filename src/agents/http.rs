//! HTTP handlers for heartbeats and liveness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::agents::{
    AgentQuery, AgentSelection, AgentState, AgentStatus, AgentView, HeartbeatRequest, IndexCursor,
    RunStats, record_heartbeat, run_stats,
};
use crate::app::AppState;
use crate::auth::{Admin, AgentWrite, AnyRole, Caller};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::EventBody;
use crate::extract::{ValidJson, ValidPath, ValidQuery};
use crate::types::{Bounded, DEFAULT_LIMIT, Id, Limit, Param};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_heartbeat))
        .routes(routes!(list_agents))
        .routes(routes!(get_stale_agents))
        .routes(routes!(get_agent_performance))
        .routes(routes!(get_agent, delete_agent))
        .routes(routes!(get_agent_alive))
}

/// Agent ids that are paths of their own under `/v1/agents/`.
const RESERVED_IDS: [&str; 2] = ["stale", "performance"];

/// Record a heartbeat.
///
/// Creates the agent on its first beat. `metadata` and `display_name` persist
/// until a beat sends new ones; `status: starting` or a new `run_id` opens a
/// run and a terminal status closes it.
#[utoipa::path(
    post, path = "/v1/agents/{agent_id}/heartbeats", tag = "agents",
    params(("agent_id" = Id, Path, description = "The agent's id")),
    request_body(content = Option<HeartbeatRequest>, description = "Every field is optional; no body (or `null`) is an empty object"),
    responses(
        (status = 200, description = "The agent after this beat", body = AgentView),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "The key may not act as this agent", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn post_heartbeat(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
    ValidJson(req): ValidJson<Option<HeartbeatRequest>>,
) -> ApiResult<Json<AgentView>> {
    let agent_id = Id::parse("agent_id", &agent_id)?;
    if RESERVED_IDS.contains(&agent_id.as_str()) {
        return Err(ApiError::invalid(
            "agent_id",
            format!(
                "is reserved: /v1/agents/{agent_id} is a listing, so such an agent could not be read or deleted"
            ),
        ));
    }
    record_heartbeat(&state, &caller, agent_id, req.unwrap_or_default())
        .await
        .map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only agents in this state.
    state: Option<AgentState>,
    /// Only agents reporting this status.
    status: Option<AgentStatus>,
    /// Page size, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of agents.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
    /// Pass as `cursor` for the next page; null when this is the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// List agents.
///
/// Without `state`, the least recently seen first; with `state=up|late`,
/// by the moment they stop being alive; with `state=down|finished`, oldest
/// beat first. A beat only moves an agent later in these orders, so paging
/// never skips an agent; one that beats while you page can come again.
#[utoipa::path(
    get, path = "/v1/agents", tag = "agents", params(ListQuery),
    responses(
        (status = 200, body = AgentList), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn list_agents(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<ListQuery>,
) -> ApiResult<Json<AgentList>> {
    let selection = q.state.map_or(AgentSelection::All, AgentSelection::State);
    page(&state, selection, q.status, q.cursor, q.limit).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StaleQuery {
    /// Seconds since the last beat (default 60). Up to ten years, the
    /// longest retention period; past the deployment's own, nothing is
    /// kept to find.
    #[param(default = 60, value_type = Option<u64>, minimum = 1, maximum = 315_360_000)]
    threshold_seconds: Option<Param<1, 315_360_000>>,
    /// Rows, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List stale agents.
///
/// Non-terminal agents whose last beat is older than the threshold, oldest
/// first — whatever their `ttl_seconds`, for any threshold up to the
/// retention period.
#[utoipa::path(
    get, path = "/v1/agents/stale", tag = "agents", params(StaleQuery),
    responses(
        (status = 200, body = AgentList), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_stale_agents(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<StaleQuery>,
) -> ApiResult<Json<AgentList>> {
    let threshold = q.threshold_seconds.map_or(60, Bounded::get);
    let cutoff = state.clock.now_ms() - (threshold * 1000) as i64;
    page(
        &state,
        AgentSelection::StaleBefore(cutoff),
        None,
        q.cursor,
        q.limit,
    )
    .await
}

async fn page(
    state: &AppState,
    selection: AgentSelection,
    status: Option<AgentStatus>,
    cursor: Option<String>,
    limit: Option<Limit>,
) -> ApiResult<Json<AgentList>> {
    let cursor = IndexCursor::from_param(cursor.as_deref(), selection.listing())?;
    let limit = limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let now_ms = state.clock.now_ms();
    let query = AgentQuery { selection, status };
    let (records, next) = state
        .engine
        .list_agents(query, now_ms, cursor, limit)
        .await?;
    Ok(Json(AgentList {
        agents: records.into_iter().map(|r| r.into_view(now_ms)).collect(),
        next_cursor: next.map(|c| c.encode(selection.listing())),
    }))
}

/// Get one agent.
#[utoipa::path(
    get, path = "/v1/agents/{agent_id}", tag = "agents",
    params(("agent_id" = Id, Path, description = "The agent's id")),
    responses(
        (status = 200, body = AgentView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn get_agent(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
) -> ApiResult<Json<AgentView>> {
    let agent_id = Id::parse("agent_id", &agent_id)?;
    let record = state
        .engine
        .get_agent(&agent_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {agent_id:?}")))?;
    Ok(Json(record.into_view(state.clock.now_ms())))
}

/// Whether an agent is alive.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Alive {
    pub agent_id: String,
    /// The last beat is within `ttl_seconds`; false for unknown agents.
    pub alive: bool,
}

/// Is the agent alive?
///
/// True while the last beat is within its `ttl_seconds`; false for agents
/// that are silent, finished long ago, or unknown.
#[utoipa::path(
    get, path = "/v1/agents/{agent_id}/alive", tag = "agents",
    params(("agent_id" = Id, Path, description = "The agent's id")),
    responses(
        (status = 200, body = Alive), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_agent_alive(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
) -> ApiResult<Json<Alive>> {
    let agent_id = Id::parse("agent_id", &agent_id)?;
    let now_ms = state.clock.now_ms();
    let alive = state
        .engine
        .get_agent(&agent_id)
        .await?
        .is_some_and(|r| r.alive_at(now_ms));
    Ok(Json(Alive {
        agent_id: agent_id.to_string(),
        alive,
    }))
}

/// Delete an agent (admin).
///
/// Removes its record and index entries; its past runs stay in `performance`.
#[utoipa::path(
    delete, path = "/v1/agents/{agent_id}", tag = "agents",
    params(("agent_id" = Id, Path, description = "The agent's id")),
    responses(
        (status = 204, description = "Deleted"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 405, description = "`stale` and `performance`: those paths are listings", body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn delete_agent(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
) -> ApiResult<StatusCode> {
    let agent_id = Id::parse("agent_id", &agent_id)?;
    let event = EventBody::new(
        "agent.deleted",
        &caller.name,
        Some(&agent_id),
        state.clock.now(),
        serde_json::json!({}),
    );
    if state.engine.delete_agent(&agent_id, event).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no agent {agent_id:?}")))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PerformanceQuery {
    /// Window in hours, 1–720 (default 168).
    #[param(default = 168, value_type = Option<u64>, minimum = 1, maximum = 720)]
    hours: Option<Param<1, 720>>,
    /// Agent rows per page (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Run statistics per agent.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Performance {
    pub hours: u64,
    /// One row per agent with runs in the window, by agent id: a page of
    /// them.
    pub agents: Vec<RunStats>,
    /// All agents together (`agent_id` is `total`), on every page.
    pub total: RunStats,
    /// Pass as `cursor` for the next page of agents; null on the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Agent performance.
///
/// Runs started in the last `hours`: how many completed, failed, were
/// cancelled or lost (went down and never came back), the success rate over
/// finished runs and their average duration. Agents come a page at a time,
/// by agent id; the total row counts them all.
#[utoipa::path(
    get, path = "/v1/agents/performance", tag = "agents", params(PerformanceQuery),
    responses(
        (status = 200, body = Performance), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_agent_performance(
    _caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<PerformanceQuery>,
) -> ApiResult<Json<Performance>> {
    const LISTING: &str = "performance";
    let after = IndexCursor::from_param(q.cursor.as_deref(), LISTING)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let hours = q.hours.map_or(168, Bounded::get);
    let since = state.clock.now_ms() - (hours * 3_600_000) as i64;
    let runs = state.engine.runs_since(since).await?;
    let (rows, total) = run_stats(&runs);
    // Rows come by agent id: the page starts after the cursor's.
    let start = after.map_or(0, |c| rows.partition_point(|r| r.agent_id <= c.member));
    let mut agents: Vec<RunStats> = rows.into_iter().skip(start).take(limit + 1).collect();
    let next_cursor = (agents.len() > limit).then(|| {
        agents.truncate(limit);
        IndexCursor {
            score: 0,
            member: agents[limit - 1].agent_id.clone(),
        }
        .encode(LISTING)
    });
    Ok(Json(Performance {
        hours,
        agents,
        total,
        next_cursor,
    }))
}
