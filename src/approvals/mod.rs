//! Human approval gates: an agent asks, a person decides, exactly once.
//!
//! An agent creates a request (`POST /v1/approvals`) and waits for it
//! (`GET /v1/approvals/{id}?wait_seconds=N`); an approver decides it
//! (`POST …/decision`); the requester may withdraw it (`POST …/cancel`).
//!
//! # One state machine, one atomic step per transition
//!
//! `pending → approved | rejected | timeout | cancelled` is changed only by
//! [`Engine::settle_approval`] and [`Engine::sweep_expired_approvals`], each
//! one atomic step (one `write` closure on memory, one Lua script on Redis)
//! that checks the status, changes it, moves index entries and appends the
//! event together. So exactly one transition ever wins — two approvers
//! racing, a cancel racing a decision, a decision racing the deadline — and
//! exactly one event is written for it. The loser is told (409) which status
//! won and who answered.
//!
//! # Deadlines are the server's
//!
//! Every pending request sits in a deadline index. Each replica runs a
//! sweeper ([`spawn_sweeper`]) that claims due requests from that index
//! inside the atomic step, so a request moves to `timeout` once, within one
//! sweep interval of `expires_at`, whether or not anybody waits for it. A
//! decision that arrives after `expires_at` but before any sweeper got there
//! applies the timeout itself and loses: the deadline is a property of the
//! request, not of who happened to look last. The timeout response
//! (`approved: false`, responder `system`, reason `timed out after N
//! seconds`, `decided_at` = `expires_at`) and its `approval.expired` event
//! are prepared when the request is created, so whichever actor applies the
//! timeout stores the same thing. A timeout is its own status, never shown
//! as a human rejection.
//!
//! # Waiting is pushed
//!
//! Every transition's event carries the wake-up key `approval:<id>`; each
//! replica's tailer wakes its own waiters ([`crate::events::hub::wait_for`]),
//! which then re-read the record. A waiter whose wait ends gets the current
//! (still pending) state and can wait again, on any replica.
//!
//! # Who may do what
//!
//! Agents (and admins) create, wait and cancel for agent ids in their scope;
//! approvers and admins decide. The responder recorded is the deciding key's
//! name, never a client field, and the key that requested an approval can
//! never decide it. Agent keys get 404 for approvals outside their scope.
//!
//! Decided requests are kept `--approval-retention-seconds`; pending ones
//! live until they are decided or time out.

pub mod http;
pub mod memory;
mod redis;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{Identity, Role};
use crate::clock::Clock;
use crate::engine::{Engine, EngineError, EngineResult, dispatch};
use crate::error::{ApiError, ApiResult};
use crate::events::EventBody;
use crate::events::hub::wait_for;
use crate::types::{Bounded, Id, JsonObject, Text, from_millis, millis_time, sha256_hex};

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    /// Waiting for a decision.
    Pending,
    /// An approver said yes.
    Approved,
    /// An approver said no.
    Rejected,
    /// Nobody decided before `expires_at`.
    Timeout,
    /// The requester withdrew it.
    Cancelled,
}

impl ApprovalStatus {
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Approved,
        Self::Rejected,
        Self::Timeout,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

/// `timeout_seconds` of a request: 1–86400, default 300.
pub type TimeoutSeconds = Bounded<1, 86_400>;
const DEFAULT_TIMEOUT: TimeoutSeconds = TimeoutSeconds::constant(300);

/// `wait_seconds` of a long poll: 0–60.
pub type WaitSeconds = crate::types::Param<0, 60>;

/// The responder recorded for timeouts.
pub const SYSTEM: &str = "system";

/// The body of `POST /v1/approvals`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NewApprovalRequest {
    /// What kind of approval this is (`deploy`, `spend`, …).
    pub approval_type: Id,
    /// The agent asking (must be in the key's scope).
    pub agent_id: Id,
    /// What the approver needs to know (at most 64 KiB, 32 levels deep).
    pub context: Option<JsonObject>,
    /// Seconds until the request times out: 1–86400, default 300.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<TimeoutSeconds>,
}

/// The body of `POST /v1/approvals/{request_id}/decision`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DecisionRequest {
    /// `true` approves, `false` rejects.
    pub approved: bool,
    /// Why (at most 2048 characters).
    #[schema(value_type = Option<String>, max_length = 2048)]
    pub reason: Option<Text<2048>>,
}

/// The body of `POST /v1/approvals/{request_id}/cancel` (optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CancelRequest {
    /// Why (at most 2048 characters).
    #[schema(value_type = Option<String>, max_length = 2048)]
    pub reason: Option<Text<2048>>,
}

/// A request for approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalRequest {
    /// Server-made UUIDv7.
    pub request_id: Uuid,
    pub approval_type: Id,
    pub agent_id: Id,
    #[schema(value_type = Object)]
    pub context: serde_json::Map<String, serde_json::Value>,
    pub status: ApprovalStatus,
    /// RFC 3339, UTC, milliseconds.
    #[serde(with = "millis_time")]
    pub created_at: DateTime<Utc>,
    /// When the request times out if nobody decides it.
    #[serde(with = "millis_time")]
    pub expires_at: DateTime<Utc>,
    pub timeout_seconds: u64,
    /// The name of the key that created it.
    pub requested_by: String,
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalResponse {
    pub request_id: Uuid,
    /// False for rejections, timeouts and cancellations.
    pub approved: bool,
    /// The deciding (or cancelling) key's name, or `system` for a timeout.
    pub responder: String,
    #[schema(required = true)]
    pub reason: Option<String>,
    /// RFC 3339, UTC, milliseconds; `expires_at` for a timeout.
    #[serde(with = "millis_time")]
    pub decided_at: DateTime<Utc>,
}

/// A request and its response (null while pending).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    pub request: ApprovalRequest,
    #[schema(required = true)]
    pub response: Option<ApprovalResponse>,
}

impl Approval {
    pub fn id(&self) -> Uuid {
        self.request.request_id
    }

    pub fn status(&self) -> ApprovalStatus {
        self.request.status
    }

    pub fn is_pending(&self) -> bool {
        self.status() == ApprovalStatus::Pending
    }

    /// The request's deadline in milliseconds since the epoch.
    pub fn deadline_ms(&self) -> i64 {
        self.request.expires_at.timestamp_millis()
    }

    /// Whether it is still pending at `now_ms`, past its deadline: its
    /// timeout is due but not recorded yet.
    fn timeout_due(&self, now_ms: i64) -> bool {
        self.is_pending() && now_ms >= self.deadline_ms()
    }
}

/// The response of a request that nobody decided in time: the same
/// whoever applies it.
fn timeout_response(request: &ApprovalRequest) -> ApprovalResponse {
    ApprovalResponse {
        request_id: request.request_id,
        approved: false,
        responder: SYSTEM.to_owned(),
        reason: Some(format!(
            "timed out after {} seconds",
            request.timeout_seconds
        )),
        decided_at: request.expires_at,
    }
}

/// A new request with everything the engine stores alongside it.
#[derive(Debug, Clone)]
pub struct NewApproval {
    /// The request, `pending`, with no response.
    pub approval: Approval,
    /// The response stored if the request times out, prepared now so that
    /// every actor that may apply the timeout stores the same one.
    pub timeout_response: ApprovalResponse,
    /// `approval.requested`.
    pub requested_event: EventBody,
    /// `approval.expired`, emitted by whichever actor applies the timeout.
    pub expired_event: EventBody,
    /// Longest possible life of the record: its timeout plus the retention.
    pub lifetime: Duration,
    /// Present when the client sent an `Idempotency-Key`.
    pub idempotency: Option<IdempotencyClaim>,
}

/// An `Idempotency-Key`, reduced to what storage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// Hex SHA-256 of the key's name and the header: keys are per caller,
    /// and no client text reaches a storage key.
    pub key: String,
    /// Hex SHA-256 of the request body in canonical form.
    pub fingerprint: String,
}

/// What [`Engine::create_approval`] did.
#[derive(Debug, Clone)]
pub enum Created {
    /// A new request.
    New(Approval),
    /// The request this idempotency key created before (current state).
    Existing(Approval),
    /// The idempotency key was used before with another body.
    KeyReused,
}

/// A transition out of `pending` requested by a person (or the timeout,
/// by a reader that found the request past its deadline: see
/// [`read_recorded`]).
#[derive(Debug, Clone)]
pub struct Settlement {
    pub request_id: Uuid,
    /// `approved`, `rejected` or `cancelled`; or `timeout`, only with a
    /// `now_ms` at or past the deadline, where the engines apply the stored
    /// timeout whatever the settlement says.
    pub status: ApprovalStatus,
    pub response: ApprovalResponse,
    /// `approval.decided` or `approval.cancelled` (unused for the timeout:
    /// the engines emit the `approval.expired` stored with the request).
    pub event: EventBody,
    /// Compared with the deadline: at or after it, the timeout wins.
    pub now_ms: i64,
    /// How long the settled record is kept.
    pub retention: Duration,
}

/// What [`Engine::settle_approval`] did.
#[derive(Debug, Clone)]
pub enum Settled {
    /// This transition won; the record after it.
    Won(Approval),
    /// Another transition won earlier (or the deadline had passed); the
    /// record as it is.
    Lost(Approval),
    /// No such request (never existed, or past its retention).
    Missing,
}

impl Engine {
    /// Stores a new request and emits `approval.requested`, or finds the
    /// request an idempotency key already created.
    pub async fn create_approval(&self, new: NewApproval) -> EngineResult<Created> {
        dispatch!(self, create_approval(new))
    }

    pub async fn get_approval(&self, id: Uuid) -> EngineResult<Option<Approval>> {
        dispatch!(self, get_approval(id))
    }

    /// Applies a decision or cancellation if the request is still pending
    /// and its deadline has not passed; applies the timeout instead if it
    /// has. One atomic step, with its event.
    pub async fn settle_approval(&self, settlement: Settlement) -> EngineResult<Settled> {
        dispatch!(self, settle_approval(settlement))
    }

    /// Up to `count` entries of the index of `status` (every request when
    /// `None`), oldest first, after `after`. Entries whose record is gone,
    /// or cannot be read (see [`crate::engine::redis::readable`]), come
    /// back as `None`.
    pub async fn approval_page(
        &self,
        status: Option<ApprovalStatus>,
        after: Option<Uuid>,
        count: usize,
    ) -> EngineResult<Vec<(Uuid, Option<Approval>)>> {
        dispatch!(self, approval_page(status, after, count))
    }

    /// Claims pending requests whose deadline is at or before `now_ms` and
    /// times them out with `approval.expired` — each exactly once across
    /// replicas. Returns how many deadline entries it claimed.
    pub async fn sweep_expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
        retention: Duration,
    ) -> EngineResult<usize> {
        dispatch!(self, sweep_expired_approvals(now_ms, limit, retention))
    }

    /// Drops settled requests past their retention from the indexes.
    pub async fn prune_approvals(&self, now_ms: i64) -> EngineResult<()> {
        dispatch!(self, prune_approvals(now_ms))
    }

    /// Pending requests, for `/metrics`.
    pub async fn pending_approval_count(&self) -> EngineResult<u64> {
        dispatch!(self, pending_approval_count())
    }
}

/// Pending approvals, for the `attune_approvals_pending` gauge.
pub async fn pending_count(engine: &Engine) -> EngineResult<u64> {
    engine.pending_approval_count().await
}

/// The wake-up key of one request's waiters.
pub fn wake_key(id: Uuid) -> String {
    format!("approval:{id}")
}

/// Now, at the millisecond precision every stored time has.
fn now_millis(clock: &Clock) -> DateTime<Utc> {
    from_millis(clock.now_ms())
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("no approval {id}"))
}

/// The 409 for a transition that lost: names the status and responder.
fn conflict(approval: &Approval) -> ApiError {
    let responder = approval
        .response
        .as_ref()
        .map_or("nobody", |r| r.responder.as_str());
    ApiError::Conflict(format!(
        "approval {} is no longer pending: status {}, responder {responder}",
        approval.id(),
        approval.status().as_str()
    ))
}

/// Event data shared by the events of settled requests.
fn settled_event(
    kind: &str,
    source: &str,
    request: &ApprovalRequest,
    status: ApprovalStatus,
    response: &ApprovalResponse,
    ts: DateTime<Utc>,
) -> EventBody {
    EventBody::new(
        kind,
        source,
        Some(&request.agent_id),
        ts,
        serde_json::json!({
            "request_id": request.request_id,
            "approval_type": request.approval_type,
            "status": status,
            "requested_by": request.requested_by,
            "response": response,
        }),
    )
    .waking(wake_key(request.request_id))
}

/// `approval.expired`, as of the request's deadline.
fn expired_event(request: &ApprovalRequest, response: &ApprovalResponse) -> EventBody {
    settled_event(
        "approval.expired",
        SYSTEM,
        request,
        ApprovalStatus::Timeout,
        response,
        request.expires_at,
    )
}

/// Serializes JSON with object keys sorted at every level, so that equal
/// bodies hash equally whatever order their keys were sent in.
fn canonical_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let fields: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        serde_json::Value::from(k.as_str()),
                        canonical_json(v)
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// Validates scope, stores a new request (or finds the one an idempotency
/// key created) and returns it.
pub async fn create(
    state: &AppState,
    caller: &Identity,
    req: NewApprovalRequest,
    idempotency_key: Option<&str>,
) -> ApiResult<Approval> {
    caller.ensure_may_act_as(&req.agent_id, "agent_id")?;
    let timeout_seconds = req.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT).get();
    let context = req.context.map(JsonObject::into_inner).unwrap_or_default();
    // "The same body" means the same request once defaults are applied.
    let idempotency = idempotency_key.map(|key| {
        let body = serde_json::json!({
            "approval_type": req.approval_type,
            "agent_id": req.agent_id,
            "context": context,
            "timeout_seconds": timeout_seconds,
        });
        IdempotencyClaim {
            key: sha256_hex(format!("{}\n{key}", caller.name)),
            fingerprint: sha256_hex(canonical_json(&body)),
        }
    });
    let now = now_millis(&state.clock);
    let request_id = Uuid::now_v7();
    let expires_at = now + chrono::Duration::seconds(timeout_seconds as i64);
    let request = ApprovalRequest {
        request_id,
        approval_type: req.approval_type,
        agent_id: req.agent_id,
        context,
        status: ApprovalStatus::Pending,
        created_at: now,
        expires_at,
        timeout_seconds,
        requested_by: caller.name.clone(),
    };
    let timeout_response = timeout_response(&request);
    let requested_event = EventBody::new(
        "approval.requested",
        &caller.name,
        Some(&request.agent_id),
        now,
        serde_json::json!({
            "request_id": request_id,
            "approval_type": request.approval_type,
            "context": request.context,
            "timeout_seconds": timeout_seconds,
            "expires_at": crate::types::rfc3339(expires_at),
            "requested_by": request.requested_by,
        }),
    )
    .waking(wake_key(request_id));
    let expired_event = expired_event(&request, &timeout_response);
    let new = NewApproval {
        approval: Approval {
            request,
            response: None,
        },
        timeout_response,
        requested_event,
        expired_event,
        lifetime: Duration::from_secs(timeout_seconds) + state.config.approval_retention,
        idempotency,
    };
    match state.engine.create_approval(new).await? {
        Created::New(approval) => Ok(approval),
        // A retry after the deadline finds the request timed out.
        Created::Existing(approval) => {
            Ok(recorded(state, approval.clone()).await?.unwrap_or(approval))
        }
        Created::KeyReused => Err(ApiError::invalid(
            "Idempotency-Key",
            "was already used with a different request body",
        )),
    }
}

/// The request, if it exists and `caller` may see it (404 otherwise: an
/// agent key learns nothing about other agents' approvals).
pub async fn get_visible(state: &AppState, caller: &Identity, id: Uuid) -> ApiResult<Approval> {
    match read_recorded(state, id).await? {
        Some(approval) if caller.may_act_as(&approval.request.agent_id) => Ok(approval),
        _ => Err(not_found(id)),
    }
}

/// Request `id` as stored, with its timeout recorded first if it is due
/// (see [`recorded`]).
async fn read_recorded(state: &AppState, id: Uuid) -> EngineResult<Option<Approval>> {
    match state.engine.get_approval(id).await? {
        Some(approval) => recorded(state, approval).await,
        None => Ok(None),
    }
}

/// `approval` as stored. One still pending past its deadline gets its
/// timeout recorded at once, as a sweeper would within a sweep interval,
/// so that a read, a wait or a listing answers with the final state from
/// the deadline on: through the settle step, which applies the timeout
/// itself to a request past its deadline (exactly once, with its
/// `approval.expired`) and otherwise returns whatever won before. A
/// decision that reaches storage after it loses, as it would to the
/// sweeper.
async fn recorded(state: &AppState, approval: Approval) -> EngineResult<Option<Approval>> {
    let now_ms = state.clock.now_ms();
    if !approval.timeout_due(now_ms) {
        return Ok(Some(approval));
    }
    let request = &approval.request;
    let response = timeout_response(request);
    let event = expired_event(request, &response);
    let settlement = Settlement {
        request_id: approval.id(),
        status: ApprovalStatus::Timeout,
        response,
        event,
        now_ms,
        retention: state.config.approval_retention,
    };
    Ok(match state.engine.settle_approval(settlement).await? {
        Settled::Won(approval) | Settled::Lost(approval) => Some(approval),
        Settled::Missing => None,
    })
}

/// Waits until `approval` leaves `pending` or `wait` elapses, woken by the
/// request's events on any replica, and at its deadline at the latest
/// (when the wait records its timeout, see [`recorded`]); returns the state
/// at that moment.
pub async fn wait_while_pending(
    state: &AppState,
    approval: Approval,
    wait: Duration,
) -> ApiResult<Approval> {
    let id = approval.id();
    let ends = tokio::time::Instant::now() + wait;
    let mut current = approval;
    // Woken at the deadline by the service's clock, which may step; until
    // the wait ends, a request still pending is waited on again. At
    // shutdown a wait answers at once with the current state.
    while current.is_pending() && !state.hub.shutdown().is_cancelled() {
        let left = ends.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let until_deadline = u64::try_from(current.deadline_ms() - state.clock.now_ms())
            .map_or(Duration::ZERO, Duration::from_millis)
            .max(DEADLINE_RECHECK);
        let found = wait_for(
            &state.hub,
            &[wake_key(id)],
            left.min(until_deadline),
            || async move {
                let found = read_recorded(state, id).await?;
                let done = found.as_ref().is_none_or(|a| !a.is_pending());
                Ok::<_, EngineError>((found, done))
            },
        )
        .await?;
        current = found.ok_or_else(|| not_found(id))?;
    }
    Ok(current)
}

/// Least time a wait sleeps before it looks at a request's deadline again.
const DEADLINE_RECHECK: Duration = Duration::from_millis(10);

/// Decides a request as `caller` (an approver or admin).
pub async fn decide(
    state: &AppState,
    caller: &Identity,
    id: Uuid,
    req: DecisionRequest,
) -> ApiResult<Approval> {
    let current = get_visible(state, caller, id).await?;
    // An identity that requested an approval can never decide it. Without a
    // keys file every request is the one anonymous admin: it is the only
    // identity there is, so refusing would leave approvals undecidable on a
    // zero-setup server. Anonymous mode therefore allows it.
    if state.keys.requires_keys() && current.request.requested_by == caller.name {
        return Err(ApiError::Forbidden(format!(
            "key {:?} requested approval {id} and may not decide it",
            caller.name
        )));
    }
    let now = now_millis(&state.clock);
    let status = if req.approved {
        ApprovalStatus::Approved
    } else {
        ApprovalStatus::Rejected
    };
    let response = ApprovalResponse {
        request_id: id,
        approved: req.approved,
        responder: caller.name.clone(),
        reason: req.reason.map(Text::into_inner),
        decided_at: now,
    };
    let event = settled_event(
        "approval.decided",
        &caller.name,
        &current.request,
        status,
        &response,
        now,
    );
    settle(state, id, status, response, event, now).await
}

/// Withdraws a request as `caller`: an agent key that may act as the
/// request's agent (the key that asked or another), or an admin.
pub async fn cancel(
    state: &AppState,
    caller: &Identity,
    id: Uuid,
    req: CancelRequest,
) -> ApiResult<Approval> {
    let current = get_visible(state, caller, id).await?;
    // The requesting agent: any agent key that may act as it (the one that
    // asked or another of its keys), besides an admin.
    let agent = &current.request.agent_id;
    let may_cancel = caller.role == Role::Admin
        || current.request.requested_by == caller.name
        || (caller.is_agent() && caller.may_act_as(agent));
    if !may_cancel {
        return Err(ApiError::Forbidden(format!(
            "only the requesting agent's keys or an admin may cancel approval {id}; key {:?} \
             does not act as agent {agent:?}",
            caller.name
        )));
    }
    let now = now_millis(&state.clock);
    let response = ApprovalResponse {
        request_id: id,
        approved: false,
        responder: caller.name.clone(),
        reason: req.reason.map(Text::into_inner),
        decided_at: now,
    };
    let status = ApprovalStatus::Cancelled;
    let event = settled_event(
        "approval.cancelled",
        &caller.name,
        &current.request,
        status,
        &response,
        now,
    );
    settle(state, id, status, response, event, now).await
}

async fn settle(
    state: &AppState,
    id: Uuid,
    status: ApprovalStatus,
    response: ApprovalResponse,
    event: EventBody,
    now: DateTime<Utc>,
) -> ApiResult<Approval> {
    let settlement = Settlement {
        request_id: id,
        status,
        response,
        event,
        now_ms: now.timestamp_millis(),
        retention: state.config.approval_retention,
    };
    match state.engine.settle_approval(settlement).await? {
        Settled::Won(approval) => Ok(approval),
        Settled::Lost(approval) => Err(conflict(&approval)),
        Settled::Missing => Err(not_found(id)),
    }
}

/// Which requests a listing wants.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFilter {
    /// `None`: every status.
    pub status: Option<ApprovalStatus>,
    pub approval_type: Option<Id>,
    pub agent_id: Option<Id>,
}

/// Most index entries one listing examines, so that a narrow filter over a
/// long history answers in bounded time (with a cursor to continue).
const SCAN_BUDGET: usize = 10_000;

/// One page of requests matching `filter` that `caller` may see, oldest
/// first, after `cursor`; and where the next page starts, if there may be one.
pub async fn list(
    state: &AppState,
    caller: &Identity,
    filter: &ApprovalFilter,
    cursor: Option<Uuid>,
    limit: usize,
) -> ApiResult<(Vec<Approval>, Option<Uuid>)> {
    let matches = |a: &Approval| {
        filter
            .approval_type
            .as_ref()
            .is_none_or(|t| *t == a.request.approval_type)
            && filter
                .agent_id
                .as_ref()
                .is_none_or(|id| *id == a.request.agent_id)
            && caller.may_act_as(&a.request.agent_id)
    };
    let batch = (limit + 1).max(100);
    let mut out = Vec::with_capacity(limit);
    let mut position = cursor;
    let mut scanned = 0;
    loop {
        let entries = state
            .engine
            .approval_page(filter.status, position, batch)
            .await?;
        let exhausted = entries.len() < batch;
        for (id, approval) in entries {
            if out.len() == limit {
                // Full, and at least this entry follows.
                return Ok((out, position));
            }
            position = Some(id);
            scanned += 1;
            // One past its deadline has its timeout recorded, as reads do.
            let approval = match approval {
                Some(approval) if matches(&approval) => recorded(state, approval).await?,
                _ => None,
            };
            // A record can change status between its index read and its
            // record read; the index of a status lists only that status.
            if let Some(approval) =
                approval.filter(|a| filter.status.is_none_or(|s| a.status() == s))
            {
                out.push(approval);
            }
        }
        if exhausted {
            return Ok((out, None));
        }
        if scanned >= SCAN_BUDGET {
            return Ok((out, position));
        }
    }
}

/// Starts the sweeper that times out due requests and prunes old ones.
pub fn spawn_sweeper(state: AppState) -> tokio::task::JoinHandle<()> {
    crate::sweeper::spawn(
        state,
        "sweep_approvals",
        |state, now_ms, limit| async move {
            let retention = state.config.approval_retention;
            state
                .engine
                .sweep_expired_approvals(now_ms, limit, retention)
                .await
        },
        |state, now_ms| async move { state.engine.prune_approvals(now_ms).await },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in ApprovalStatus::ALL {
            assert_eq!(ApprovalStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        assert_eq!(ApprovalStatus::parse("denied"), None);
    }

    #[test]
    fn canonical_json_ignores_key_order_but_not_values() {
        let a = serde_json::json!({"b": [1, {"y": 2, "x": 1}], "a": "s"});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let c = serde_json::json!({"a": "s", "b": [{"x": 1, "y": 2}, 1]});
        assert_ne!(canonical_json(&a), canonical_json(&c));
    }

    #[test]
    fn a_conflict_names_the_status_and_the_responder() {
        let now = now_millis(&Clock::default());
        let id = Uuid::now_v7();
        let approval = Approval {
            request: ApprovalRequest {
                request_id: id,
                approval_type: Id::new("deploy").unwrap(),
                agent_id: Id::new("a").unwrap(),
                context: Default::default(),
                status: ApprovalStatus::Timeout,
                created_at: now,
                expires_at: now,
                timeout_seconds: 1,
                requested_by: "k".into(),
            },
            response: Some(ApprovalResponse {
                request_id: id,
                approved: false,
                responder: SYSTEM.into(),
                reason: None,
                decided_at: now,
            }),
        };
        let detail = conflict(&approval).to_string();
        assert!(
            detail.contains("timeout") && detail.contains("system"),
            "{detail}"
        );
    }
}
