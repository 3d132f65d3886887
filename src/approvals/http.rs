//! HTTP handlers for approval gates.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::app::AppState;
use crate::approvals::{
    Approval, ApprovalFilter, ApprovalStatus, CancelRequest, DecisionRequest, NewApprovalRequest,
    WaitSeconds,
};
use crate::auth::{AgentWrite, AnyRole, Caller, Decide};
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::{ValidJson, ValidPath, ValidQuery, idempotency_key};
use crate::types::{DEFAULT_LIMIT, Id, Limit};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_approval, list_approvals))
        .routes(routes!(get_approval))
        .routes(routes!(decide_approval))
        .routes(routes!(cancel_approval))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// Hold the request until the approval leaves `pending`, at most this
    /// many seconds (0–60, default 0); then answer with the current state.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 60)]
    wait_seconds: Option<WaitSeconds>,
}

impl WaitQuery {
    fn wait(&self) -> Duration {
        Duration::from_secs(self.wait_seconds.map_or(0, WaitSeconds::get))
    }
}

/// A request id from the path; one that is not a UUID names no approval.
fn parse_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("no approval {raw:?}")))
}

/// Request an approval.
///
/// Creates a `pending` request that times out after `timeout_seconds`. With
/// an `Idempotency-Key`, repeating the same body returns the request the
/// key created (in its current state) instead of a new one; the same key
/// with another body is a 422. With `wait_seconds`, the answer is held until
/// the request is decided, like `GET /v1/approvals/{request_id}`.
#[utoipa::path(
    post, path = "/v1/approvals", tag = "approvals",
    params(
        WaitQuery,
        ("Idempotency-Key" = inline(Option<crate::extract::IdempotencyKeyParam>), Header,
         description = "Makes retries safe: the same key and body return the same request \
                        (1 to 255 visible ASCII characters)"),
    ),
    request_body = NewApprovalRequest,
    responses(
        (status = 201, description = "The request (possibly already decided, when waiting or repeated)", body = Approval),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "The key may not act as this agent, or is not an agent or admin key", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem),
        (status = 422, description = "Invalid body, or an Idempotency-Key reused with another body", body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn create_approval(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    headers: HeaderMap,
    ValidQuery(q): ValidQuery<WaitQuery>,
    ValidJson(req): ValidJson<NewApprovalRequest>,
) -> ApiResult<(StatusCode, Json<Approval>)> {
    let key = idempotency_key(&headers)?;
    let created = super::create(&state, &caller, req, key.as_deref()).await?;
    // The request exists now: a failure while waiting on it (Redis went
    // away) answers with it as created, never with an error that would
    // lose its id and make a client without a key create it again.
    let approval = match super::wait_while_pending(&state, created.clone(), q.wait()).await {
        Ok(approval) => approval,
        Err(err) => {
            tracing::warn!(request_id = %created.id(), error = %err, "waiting on a created approval failed; answering with it as created");
            created
        }
    };
    Ok((StatusCode::CREATED, Json(approval)))
}

/// Which statuses a listing wants.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum StatusFilter {
    #[default]
    Pending,
    Approved,
    Rejected,
    Timeout,
    Cancelled,
    /// Every status.
    All,
}

impl StatusFilter {
    fn status(self) -> Option<ApprovalStatus> {
        match self {
            Self::Pending => Some(ApprovalStatus::Pending),
            Self::Approved => Some(ApprovalStatus::Approved),
            Self::Rejected => Some(ApprovalStatus::Rejected),
            Self::Timeout => Some(ApprovalStatus::Timeout),
            Self::Cancelled => Some(ApprovalStatus::Cancelled),
            Self::All => None,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// `pending` (the default), `approved`, `rejected`, `timeout`,
    /// `cancelled`, or `all`.
    #[param(inline)]
    status: Option<StatusFilter>,
    /// Only requests of this `approval_type`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    approval_type: Option<Id>,
    /// Only requests from this agent.
    agent_id: Option<Id>,
    /// Page size, 1–1000 (default 100).
    #[param(default = 100, value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<Limit>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of approvals.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovalList {
    /// Oldest first.
    pub approvals: Vec<Approval>,
    /// Pass as `cursor` for the next page; null when this is the last.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// List approvals.
///
/// Oldest first; pending ones by default. Agent keys see only requests for
/// agents in their scope.
#[utoipa::path(
    get, path = "/v1/approvals", tag = "approvals", params(ListQuery),
    responses(
        (status = 200, body = ApprovalList), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn list_approvals(
    caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidQuery(q): ValidQuery<ListQuery>,
) -> ApiResult<Json<ApprovalList>> {
    let cursor = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| {
            Uuid::parse_str(c).map_err(|_| {
                ApiError::invalid("cursor", "is not a cursor returned by this endpoint")
            })
        })
        .transpose()?;
    let filter = ApprovalFilter {
        status: q.status.unwrap_or_default().status(),
        approval_type: q.approval_type,
        agent_id: q.agent_id,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).get() as usize;
    let (approvals, next) = super::list(&state, &caller, &filter, cursor, limit).await?;
    Ok(Json(ApprovalList {
        approvals,
        next_cursor: next.map(|id| id.to_string()),
    }))
}

/// Get (or wait for) an approval.
///
/// With `wait_seconds`, answers as soon as the request leaves `pending` —
/// within milliseconds of the decision, on whichever replica it was made —
/// or when the wait ends, with the then current (still pending) state.
#[utoipa::path(
    get, path = "/v1/approvals/{request_id}", tag = "approvals",
    params(("request_id" = Uuid, Path, description = "The request's id"), WaitQuery),
    responses(
        (status = 200, body = Approval), (status = 401, body = Problem),
        (status = 404, description = "Unknown, past its retention, or another agent's", body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    )
)]
async fn get_approval(
    caller: Caller<AnyRole>,
    State(state): State<AppState>,
    ValidPath(request_id): ValidPath<String>,
    ValidQuery(q): ValidQuery<WaitQuery>,
) -> ApiResult<Json<Approval>> {
    let id = parse_id(&request_id)?;
    let approval = super::get_visible(&state, &caller, id).await?;
    super::wait_while_pending(&state, approval, q.wait())
        .await
        .map(Json)
}

/// Decide an approval (approver or admin).
///
/// The responder recorded is the key's name. Exactly one decision ever
/// wins; a decision on a request that is no longer pending — decided,
/// cancelled, or past its deadline — is a 409 naming the status and the
/// responder. The key that requested an approval may not decide it.
#[utoipa::path(
    post, path = "/v1/approvals/{request_id}/decision", tag = "approvals",
    params(("request_id" = Uuid, Path, description = "The request's id")),
    request_body = DecisionRequest,
    responses(
        (status = 200, description = "The decided request", body = Approval),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "Not an approver or admin key, or the key that requested it", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "No longer pending", body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn decide_approval(
    caller: Caller<Decide>,
    State(state): State<AppState>,
    ValidPath(request_id): ValidPath<String>,
    ValidJson(req): ValidJson<DecisionRequest>,
) -> ApiResult<Json<Approval>> {
    let id = parse_id(&request_id)?;
    super::decide(&state, &caller, id, req).await.map(Json)
}

/// Cancel an approval (the requesting agent's keys, or an admin).
///
/// Moves a pending request to `cancelled`; 409 if it is no longer pending.
#[utoipa::path(
    post, path = "/v1/approvals/{request_id}/cancel", tag = "approvals",
    params(("request_id" = Uuid, Path, description = "The request's id")),
    request_body(content = Option<CancelRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The cancelled request", body = Approval),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "Not a key of the requesting agent, nor an admin", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "No longer pending", body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem),
    )
)]
async fn cancel_approval(
    caller: Caller<AgentWrite>,
    State(state): State<AppState>,
    ValidPath(request_id): ValidPath<String>,
    // No body, `{}` and `null` all cancel without a reason.
    ValidJson(req): ValidJson<Option<CancelRequest>>,
) -> ApiResult<Json<Approval>> {
    let id = parse_id(&request_id)?;
    super::cancel(&state, &caller, id, req.unwrap_or_default())
        .await
        .map(Json)
}
