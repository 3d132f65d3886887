//! HTTP handlers for coordination signals.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::agents::IndexCursor;
use crate::app::AppState;
use crate::auth::{AgentWrite, AnyRole, Caller, Viewer};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ValidJson, ValidPath, ValidQuery, idempotency_key};
use crate::signals::{
    InboxQuery, Signal, SignalFilter, SignalRequest, WaitSeconds, clear_inbox, read_inbox,
    send_signal,
};
use crate::types::{DEFAULT_LIMIT, Id, Limit};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_signal, list_signals))
        .routes(routes!(post_broadcast))
        .routes(routes!(get_inbox, delete_inbox))
}

/// Send a signal.
///
/// To `target_agent`, or to every agent when it is absent (a broadcast).
/// The signal is deliverable until `expires_at`; the send appends
/// `signal.sent` and wakes the target's waiting readers.
#[utoipa::path(
    post, path = "/v1/signals", tag = "signals", request_body = SignalRequest,
    responses(
        (status = 201, description = "The stored signal", body = Signal),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "The key may not act as `source_agent`", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn post_signal(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidJson(req): ValidJson<SignalRequest>,
) -> ApiResult<(StatusCode, Json<Signal>)> {
    let signal = send_signal(&state, &caller, req, false).await?;
    Ok((StatusCode::CREATED, Json(signal)))
}

/// Broadcast a signal.
///
/// The same as `POST /v1/signals` without a `target_agent` (which must be
/// absent here): every agent receives it once, including agents that start
/// after it was sent, until it expires.
#[utoipa::path(
    post, path = "/v1/signals/broadcast", tag = "signals", request_body = SignalRequest,
    responses(
        (status = 201, description = "The stored broadcast", body = Signal),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "The key may not act as `source_agent`", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn post_broadcast(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidJson(req): ValidJson<SignalRequest>,
) -> ApiResult<(StatusCode, Json<Signal>)> {
    let signal = send_signal(&state, &caller, req, true).await?;
    Ok((StatusCode::CREATED, Json(signal)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct InboxParams {
    /// Only signals of this `signal_type`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    signal_type: Option<Id>,
    /// Only signals from this `source_agent`.
    source: Option<Id>,
    /// Remove what is returned from this inbox (default false). A broadcast
    /// is removed for this agent only.
    consume: Option<bool>,
    /// When nothing matches, wait up to this many seconds (0–60, default 0)
    /// for a matching signal.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 60)]
    wait_seconds: Option<WaitSeconds>,
    /// At most this many signals, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page of a read that does not consume
    /// (empty: the oldest first). With `consume=true` it is a 422: a
    /// consuming read takes the oldest signals.
    cursor: Option<String>,
}

/// An agent's signals.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Inbox {
    /// Oldest first.
    pub signals: Vec<Signal>,
    /// For a read that does not consume and filled its page: pass as
    /// `cursor` for the signals after these. Null otherwise (a consuming
    /// read takes what it returns: the next read starts at the oldest left).
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Read an agent's inbox.
///
/// The live signals targeted at this agent plus the live broadcasts it has
/// not consumed, oldest first — never another agent's signals. With
/// `wait_seconds`, an empty answer is held until a matching signal arrives
/// (answered at once) or the wait ends (an empty list). Agent keys may read
/// only the inboxes of agents in their scope; any other inbox is a 404.
///
/// A consuming read with an `Idempotency-Key` keeps what it took for ten
/// minutes: repeating the read with the same key and query returns those
/// signals again (less any that expired since) and takes nothing more, so
/// a read whose answer was lost can be retried without losing signals. The
/// same key with another `type`, `source` or `limit` is a 422. A read that
/// took nothing keeps nothing: its retry reads afresh.
#[utoipa::path(
    get, path = "/v1/agents/{agent_id}/signals", tag = "signals",
    params(
        ("agent_id" = Id, Path, description = "The agent's id"),
        InboxParams,
        ("Idempotency-Key" = inline(Option<crate::extract::IdempotencyKeyParam>), Header,
         description = "With `consume=true`, makes the read safe to retry \
                        (1 to 255 visible ASCII characters); ignored otherwise"),
    ),
    responses(
        (status = 200, body = Inbox), (status = 401, body = Problem),
        (status = 403, description = "Consuming needs an agent or admin key", body = Problem),
        (status = 404, description = "Not an inbox this key may read", body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_inbox(
    caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
    ValidQuery(q): ValidQuery<InboxParams>,
    headers: HeaderMap,
) -> ApiResult<Json<Inbox>> {
    let agent_id = Id::parse("agent_id", &agent_id)?;
    let consume = q.consume.unwrap_or(false);
    let after = IndexCursor::from_named_param(q.cursor.as_deref(), INBOX_LISTING)?;
    // Positions are creation times in ms: anything else was not made here
    // (and one beyond what the read script takes would page from the start).
    if after
        .as_ref()
        .is_some_and(|c| !(0..1_000_000_000_000_000).contains(&c.score))
    {
        return Err(ApiError::invalid(
            "cursor",
            "is not a cursor returned by this endpoint",
        ));
    }
    if consume && after.is_some() {
        return Err(ApiError::invalid(
            "cursor",
            "pages reads that do not consume: a consuming read takes the oldest signals",
        ));
    }
    let query = InboxQuery {
        signal_type: q.signal_type,
        source: q.source,
        limit: q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize,
        consume,
        // Only a consuming read has anything to keep. Keys are each API
        // key's own: another key's read with the same one is another read
        // (and never sees what the first took).
        receipt: if consume {
            idempotency_key(&headers)?.map(|key| format!("{}\n{key}", caller.name))
        } else {
            None
        },
        after,
    };
    let limit = query.limit;
    let wait = Duration::from_secs(q.wait_seconds.map_or(0, WaitSeconds::get));
    let signals = read_inbox(&state, &caller, agent_id, query, wait).await?;
    let next_cursor = signals
        .last()
        .filter(|_| !consume && signals.len() == limit)
        .and_then(Signal::position)
        .map(|c| c.encode(INBOX_LISTING));
    Ok(Json(Inbox {
        signals,
        next_cursor,
    }))
}

/// The listing name in an inbox's cursors (see [`IndexCursor::encode`]).
const INBOX_LISTING: &str = "inbox";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ClearParams {
    /// Clear only signals of this `signal_type`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    signal_type: Option<Id>,
}

/// How many signals a clear removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cleared {
    pub agent_id: String,
    /// Targeted signals deleted plus broadcasts marked consumed for this agent.
    pub cleared: u64,
}

/// Clear an agent's inbox.
///
/// Deletes the signals targeted at the agent and marks the live broadcasts
/// consumed for this agent only (other agents still receive them). Allowed
/// to the agent itself (an agent key in scope) and to admins.
#[utoipa::path(
    delete, path = "/v1/agents/{agent_id}/signals", tag = "signals",
    params(("agent_id" = Id, Path, description = "The agent's id"), ClearParams),
    responses(
        (status = 200, body = Cleared), (status = 401, body = Problem),
        (status = 403, body = Problem),
        (status = 404, description = "Not an inbox this key may clear", body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn delete_inbox(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidPath(agent_id): ValidPath<String>,
    ValidQuery(q): ValidQuery<ClearParams>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Cleared>> {
    // A blank parameter is taken as absent; on a clear that would widen
    // what is deleted to every type, so a blank `type` is refused.
    let blank_type = raw.as_deref().is_some_and(|query| {
        form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "type" && v.is_empty())
    });
    if blank_type {
        return Err(ApiError::invalid(
            "type",
            "must not be empty: leave it out to clear every type",
        ));
    }
    let agent_id = Id::parse("agent_id", &agent_id)?;
    let cleared = clear_inbox(&state, &caller, agent_id.clone(), q.signal_type).await?;
    Ok(Json(Cleared {
        agent_id: agent_id.to_string(),
        cleared,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only signals of this `signal_type`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    signal_type: Option<Id>,
    /// Only signals from this `source_agent`.
    source: Option<Id>,
    /// Only signals targeted at this agent (broadcasts are left out).
    target: Option<Id>,
    /// Page size, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page (empty: the first page).
    cursor: Option<String>,
}

/// A page of live signals.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignalList {
    /// Oldest first.
    pub signals: Vec<Signal>,
    /// Pass as `cursor` for the next page; null when this is the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// List live signals (viewer).
///
/// Every signal that has not expired or been consumed, oldest first:
/// targeted ones and broadcasts (a broadcast stays listed until it expires,
/// whoever consumed it).
#[utoipa::path(
    get, path = "/v1/signals", tag = "signals", params(ListParams),
    responses(
        (status = 200, body = SignalList), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn list_signals(
    _caller: Caller<Viewer>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<ListParams>,
) -> ApiResult<Json<SignalList>> {
    let cursor = IndexCursor::from_param(q.cursor.as_deref(), "signals")?;
    let filter = SignalFilter {
        signal_type: q.signal_type,
        source: q.source,
        target: q.target,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let now_ms = state.clock.now_ms();
    let (signals, next) = state
        .engine
        .list_signals(&filter, now_ms, cursor, limit)
        .await?;
    Ok(Json(SignalList {
        signals,
        next_cursor: next.map(|c| c.encode("signals")),
    }))
}
