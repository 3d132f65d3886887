//! `POST /v1/events` (custom events) and `GET /v1/events` (history).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;
use crate::auth::{AgentWrite, Caller, Viewer};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::{EventBody, EventEnvelope, EventFilter, StreamId};
use crate::extract::{ValidJson, ValidQuery};
use crate::types::{DEFAULT_LIMIT, EventType, Id, JsonObject, Limit, TypeFilter};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(post_event, list_events))
}

/// Event types only the service itself may write.
const RESERVED_PREFIXES: [&str; 6] = [
    "agent.",
    "signal.",
    "approval.",
    "usage.",
    "feedback.",
    "stream.",
];
/// Custom agent events that share the `agent.` namespace by design.
const CUSTOM_AGENT_TYPES: [&str; 2] = ["agent.error", "agent.log"];

/// A custom event.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewEvent {
    /// `^[a-z][a-z0-9_.-]{0,63}$`, e.g. `workflow.progress`, `agent.error`.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// At most 64 KiB serialized, 32 levels deep.
    #[serde(default)]
    pub data: JsonObject,
    /// The agent the event is about (must be in the key's scope; keys
    /// limited to some agents must name one).
    pub agent_id: Option<Id>,
}

/// The appended event's id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Appended {
    pub id: String,
}

/// Append a custom event.
///
/// Types the service writes itself (`agent.heartbeat`, `signal.sent`,
/// `approval.*`, …) are refused; `agent.error` and `agent.log` are allowed.
#[utoipa::path(
    post, path = "/v1/events", tag = "events", request_body = NewEvent,
    responses(
        (status = 201, body = Appended), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn post_event(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidJson(req): ValidJson<NewEvent>,
) -> ApiResult<(StatusCode, Json<Appended>)> {
    let kind = req.kind.as_str();
    if RESERVED_PREFIXES.iter().any(|p| kind.starts_with(p)) && !CUSTOM_AGENT_TYPES.contains(&kind)
    {
        return Err(ApiError::invalid(
            "type",
            format!(
                "{kind:?} is in a namespace the service writes (agent.*, signal.*, approval.*, \
                 usage.*, feedback.*, stream.*; agent.error and agent.log are open); \
                 choose another type"
            ),
        ));
    }
    caller.ensure_may_write_for(req.agent_id.as_ref(), "agent_id")?;
    let body = EventBody::new(
        kind,
        &caller.name,
        req.agent_id.as_ref(),
        state.clock.now(),
        serde_json::Value::Object(req.data.into_inner()),
    );
    let id = state.engine.publish(body).await?;
    Ok((StatusCode::CREATED, Json(Appended { id: id.to_string() })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only events after this id (`<ms>-<seq>`, exclusive).
    #[param(value_type = Option<crate::events::EventIdParam>, inline)]
    pub since: Option<String>,
    /// Comma-separated types; `prefix.*` matches a prefix.
    #[param(value_type = Option<crate::types::TypeFilterParam>, inline)]
    pub types: Option<String>,
    /// Only events about this agent.
    #[param(value_type = Option<crate::types::IdFilterParam>, inline)]
    pub agent_id: Option<String>,
    /// Events, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    pub limit: Option<Limit>,
    /// `next_cursor` of the previous page (same as `since`).
    #[param(value_type = Option<crate::events::EventIdParam>, inline)]
    pub cursor: Option<String>,
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventEnvelope>,
    /// Pass as `since` (or `cursor`) for the next page; null at the end.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Parses the position (`since`, or the history's `cursor`, named by
/// `field` in errors) and the filters shared by history and streams.
pub fn parse_position(
    (field, since): (&'static str, Option<&str>),
    types: Option<&str>,
    agent_id: Option<&str>,
) -> ApiResult<(Option<StreamId>, EventFilter)> {
    let since = since
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<StreamId>()
                .map_err(|m| ApiError::invalid(field, m))
        })
        .transpose()?;
    let filter = EventFilter {
        types: TypeFilter::parse("types", types)?,
        agent_id: agent_id
            .filter(|s| !s.is_empty())
            .map(|a| Id::parse("agent_id", a))
            .transpose()?,
    };
    Ok((since, filter))
}

/// Most log entries one history request examines, so that a narrow filter
/// over a long log answers in bounded time (with a cursor to continue).
const SCAN_BUDGET: usize = 20_000;

/// Event history.
///
/// Ascending from `since` (exclusive; the start of the log without it).
/// When `next_cursor` is not null there may be more.
#[utoipa::path(
    get, path = "/v1/events", tag = "events", params(HistoryQuery),
    responses(
        (status = 200, body = EventList), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn list_events(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<HistoryQuery>,
) -> ApiResult<Response> {
    // An empty `cursor=` counts as absent, as on every listing.
    let position = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(cursor) => ("cursor", Some(cursor)),
        None => ("since", q.since.as_deref()),
    };
    let (since, filter) = parse_position(position, q.types.as_deref(), q.agent_id.as_deref())?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let mut position = since.unwrap_or(StreamId::ZERO);
    let mut events = Vec::new();
    let mut scanned = 0;
    let mut exhausted = false;
    while events.len() < limit && scanned < SCAN_BUDGET {
        let batch = state
            .engine
            .read_events(position, 1000.min(SCAN_BUDGET - scanned))
            .await?;
        if batch.is_empty() {
            exhausted = true;
            break;
        }
        scanned += batch.len();
        for event in batch {
            position = event.id;
            if filter.matches(&event) {
                events.push(event);
                if events.len() == limit {
                    break;
                }
            }
        }
    }
    // The stored envelopes go out as they are: splicing them into the page
    // costs a copy, parsing and re-serializing each one far more.
    let next_cursor = (!exhausted).then(|| position.to_string());
    let mut body =
        String::with_capacity(64 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event.json.as_str());
    }
    body.push_str("],\"next_cursor\":");
    body.push_str(&serde_json::to_string(&next_cursor).expect("a string serializes"));
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
