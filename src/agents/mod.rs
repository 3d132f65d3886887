//! Heartbeats and liveness: who is alive, who is late, who went down.
//!
//! An agent beats with `POST /v1/agents/{id}/heartbeats`; the engine keeps
//! one record per agent (expiring `--agent-retention-seconds` after its last
//! beat, so staleness stays visible long after `ttl_seconds`) and indexes
//! ordered by last beat and by deadline, all written in one atomic step, so
//! stale and state queries never scan the keyspace.
//!
//! State is derived, never stored stale: `up` within `ttl_seconds` of the
//! last beat, `late` within `ttl + grace`, `down` beyond, `finished` after a
//! terminal status. The `up → down` *event* needs an actor, so a sweeper in
//! every replica claims due agents atomically (one script removes the agent
//! from the deadline queue and emits `agent.down`), which makes the event
//! exactly-once across replicas.
//!
//! Runs: `status: starting`, a new `run_id`, or the first non-terminal beat
//! with no open run opens a run (`agent.started`); a terminal status closes
//! it (`agent.finished`); going down marks it lost until the agent recovers.

pub mod http;
pub mod memory;
pub(crate) mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::Identity;
use crate::engine::{Engine, EngineResult, dispatch};
use crate::error::{ApiError, ApiResult};
use crate::events::EventBody;
use crate::types::{Bounded, Fraction, Id, JsonObject, Text, from_millis, rfc3339};

/// What an agent says it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Starting,
    #[default]
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl AgentStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// Liveness, derived from the last beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Non-terminal, last beat within `ttl_seconds`.
    Up,
    /// Non-terminal, within `ttl_seconds + grace`.
    Late,
    /// Non-terminal, silent for longer than that.
    Down,
    /// Reported a terminal status.
    Finished,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Late => "late",
            Self::Down => "down",
            Self::Finished => "finished",
        }
    }
}

/// `ttl_seconds` of a heartbeat: 1–3600, default 30.
pub type TtlSeconds = Bounded<1, 3600>;
const DEFAULT_TTL: TtlSeconds = TtlSeconds::constant(30);

/// The body of a heartbeat. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    /// Default `running`. `starting` opens a run; a terminal status closes it.
    pub status: Option<AgentStatus>,
    /// 0.0–1.0.
    pub progress: Option<Fraction>,
    /// What the agent is doing now (at most 1024 characters).
    #[schema(value_type = Option<String>, max_length = 1024)]
    pub current_task: Option<Text<1024>>,
    /// Kept across beats until a beat sends a new object (at most 64 KiB, 32 levels deep).
    pub metadata: Option<JsonObject>,
    /// Kept across beats until a beat sends a new one (at most 256 characters).
    #[schema(value_type = Option<String>, max_length = 256)]
    pub display_name: Option<Text<256>>,
    /// A new run id opens a new run; beats without one continue the current run.
    pub run_id: Option<Id>,
    /// Seconds until the agent counts as not alive: 1–3600, default 30.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 3600)]
    pub ttl_seconds: Option<TtlSeconds>,
}

/// One beat, validated, with everything the engine needs to apply it.
#[derive(Debug, Clone)]
pub struct Beat {
    pub agent_id: Id,
    pub status: AgentStatus,
    pub progress: Option<f64>,
    pub current_task: Option<String>,
    pub metadata: Option<JsonObject>,
    pub display_name: Option<String>,
    pub run_id: Option<Id>,
    pub ttl_seconds: u64,
    pub grace_seconds: u64,
    pub now: DateTime<Utc>,
    pub retention: Duration,
    /// The key name, the `source` of the events this beat causes.
    pub source: String,
    /// The `agent.heartbeat` event, unless `--no-heartbeat-events`.
    pub heartbeat_event: Option<EventBody>,
}

impl Beat {
    /// `agent.started`, `agent.finished` or `agent.recovered`, which the
    /// engine appends depending on the previous state. The Redis engine
    /// builds the same envelope inside its script.
    pub fn lifecycle_event(&self, kind: &str, run_id: Option<&str>) -> EventBody {
        let data = match kind {
            "agent.recovered" => serde_json::json!({ "status": self.status }),
            _ => serde_json::json!({ "run_id": run_id, "status": self.status }),
        };
        EventBody::new(kind, &self.source, Some(&self.agent_id), self.now, data)
    }
}

/// A stored agent record.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub agent_id: Id,
    pub display_name: Option<String>,
    pub status: AgentStatus,
    pub progress: Option<f64>,
    pub current_task: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub run_id: Option<String>,
    pub last_beat_ms: i64,
    pub ttl_seconds: u64,
    pub grace_seconds: u64,
    /// Set by the sweeper when the agent went down; cleared by the next beat.
    pub down: bool,
}

impl AgentRecord {
    /// State at `now`, exactly as the contract defines it.
    pub fn state_at(&self, now_ms: i64) -> AgentState {
        if self.status.is_terminal() {
            return AgentState::Finished;
        }
        let elapsed = now_ms - self.last_beat_ms;
        if self.down || elapsed > ((self.ttl_seconds + self.grace_seconds) * 1000) as i64 {
            AgentState::Down
        } else if elapsed > (self.ttl_seconds * 1000) as i64 {
            AgentState::Late
        } else {
            AgentState::Up
        }
    }

    /// Whether the last beat is within the ttl at `now_ms`.
    pub fn alive_at(&self, now_ms: i64) -> bool {
        now_ms - self.last_beat_ms <= (self.ttl_seconds * 1000) as i64
    }

    /// The view at `now_ms`, moving the record's fields into it.
    pub fn into_view(self, now_ms: i64) -> AgentView {
        let elapsed_ms = (now_ms - self.last_beat_ms).max(0);
        let (alive, state) = (self.alive_at(now_ms), self.state_at(now_ms));
        AgentView {
            agent_id: self.agent_id.into(),
            display_name: self.display_name,
            status: self.status,
            progress: self.progress,
            current_task: self.current_task,
            metadata: self.metadata,
            run_id: self.run_id,
            last_beat: rfc3339(from_millis(self.last_beat_ms)),
            ttl_seconds: self.ttl_seconds,
            alive,
            state,
            seconds_since_beat: elapsed_ms as f64 / 1000.0,
        }
    }
}

/// An agent as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub agent_id: String,
    #[schema(required = true)]
    pub display_name: Option<String>,
    pub status: AgentStatus,
    #[schema(required = true)]
    pub progress: Option<f64>,
    #[schema(required = true)]
    pub current_task: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[schema(required = true)]
    pub run_id: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub last_beat: String,
    pub ttl_seconds: u64,
    /// The last beat is within `ttl_seconds`.
    pub alive: bool,
    pub state: AgentState,
    pub seconds_since_beat: f64,
}

/// Which agents a listing wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSelection {
    /// Every retained agent, least recent beat first.
    All,
    /// Agents in one state (`up`/`late` by deadline, `down`/`finished` by
    /// last beat, oldest first).
    State(AgentState),
    /// Non-terminal agents whose last beat is before `cutoff_ms`, oldest first.
    StaleBefore(i64),
}

/// The indexes both engines keep of agents, each ordered by `(score, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentIndex {
    /// Non-terminal agents by last beat.
    Active,
    /// Agents in a terminal status by last beat.
    Finished,
    /// Non-terminal agents not marked down, by the end of their ttl.
    LateDue,
    /// Agents marked down by the sweeper, by last beat.
    Down,
}

/// Rounds of index reads one listing page may take, each of up to the
/// records it still lacks plus one, before it answers with what it has
/// and a cursor (entries it skips do not count towards the page).
pub const LISTING_ROUNDS: usize = 4;

/// Where a listing reads: every selection is one range of one index, except
/// all agents — every agent is either active or finished, both indexes
/// scored by last beat, so those two are merged.
///
/// Every listing reads its index in ascending order. A beat only ever moves
/// an agent to a later score (a later beat, a later deadline) or out of the
/// selection, so an agent that beats while a client pages lands after the
/// cursor, never before it: paging never skips an agent, though one that
/// beats meanwhile can come again. (Most recent first, such an agent would
/// jump ahead of the cursor and be missed.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRange {
    pub indexes: &'static [AgentIndex],
    pub ascending: bool,
    /// Scores within `[min, max]`.
    pub min: i64,
    pub max: i64,
}

impl AgentSelection {
    /// The index range this selection reads at `now_ms`.
    pub fn index_range(self, now_ms: i64) -> IndexRange {
        use AgentIndex::*;
        let (indexes, ascending, min, max): (&'static [AgentIndex], _, _, _) = match self {
            AgentSelection::All => (&[Active, Finished], true, i64::MIN, i64::MAX),
            AgentSelection::StaleBefore(cutoff) => (&[Active], true, i64::MIN, cutoff - 1),
            AgentSelection::State(AgentState::Up) => (&[LateDue], true, now_ms, i64::MAX),
            AgentSelection::State(AgentState::Late) => (&[LateDue], true, i64::MIN, now_ms - 1),
            AgentSelection::State(AgentState::Down) => (&[Down], true, i64::MIN, i64::MAX),
            AgentSelection::State(AgentState::Finished) => (&[Finished], true, i64::MIN, i64::MAX),
        };
        IndexRange {
            indexes,
            ascending,
            min,
            max,
        }
    }
}

/// A listing: which index to read, and an optional status every returned
/// record must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentQuery {
    pub selection: AgentSelection,
    pub status: Option<AgentStatus>,
}

impl AgentQuery {
    /// Whether `record` belongs in this listing at `now_ms`. Both engines
    /// apply it while filling a page, so a page is full whenever more
    /// matches exist, and its cursor never skips one.
    pub fn admits(&self, record: &AgentRecord, now_ms: i64) -> bool {
        let selected = match self.selection {
            AgentSelection::All => true,
            AgentSelection::State(s) => record.state_at(now_ms) == s,
            AgentSelection::StaleBefore(cutoff) => {
                !record.status.is_terminal() && record.last_beat_ms < cutoff
            }
        };
        selected && self.status.is_none_or(|s| record.status == s)
    }
}

/// One page of agent records.
#[derive(Debug, Clone, Default)]
pub struct AgentPage {
    pub records: Vec<AgentRecord>,
    /// Where the next page starts, if there may be one.
    pub next_cursor: Option<String>,
}

/// A position in an index: `(score, member)`, encoded opaquely for clients.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexCursor {
    pub score: i64,
    pub member: String,
}

impl IndexCursor {
    /// The cursor as clients see it, naming the `listing` it continues
    /// (`all`, a state, `stale`, `signals`): a position in one index means
    /// nothing in another, so a cursor is only taken back by its own.
    pub fn encode(&self, listing: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{listing}:{}:{}", self.score, self.member))
    }

    /// The `cursor` query parameter of `listing`: absent when missing or
    /// empty, a 422 naming `cursor` when it is not one of the listing's.
    pub fn from_param(raw: Option<&str>, listing: &str) -> Result<Option<Self>, ApiError> {
        raw.filter(|c| !c.is_empty())
            .map(|c| Self::decode("cursor", c, listing))
            .transpose()
    }

    /// As [`from_param`](Self::from_param), for a listing that came after
    /// cursors were named: only its own named cursors are taken.
    pub fn from_named_param(raw: Option<&str>, listing: &str) -> Result<Option<Self>, ApiError> {
        Self::from_named_param_with(raw, listing, |member| Id::new(member).is_ok())
    }

    /// [`Self::from_named_param`] for a listing whose members are not ids:
    /// `valid` tells which are.
    pub fn from_named_param_with(
        raw: Option<&str>,
        listing: &str,
        valid: impl Fn(&str) -> bool,
    ) -> Result<Option<Self>, ApiError> {
        raw.filter(|c| !c.is_empty())
            .map(|c| Self::parse("cursor", c, listing, false, &valid))
            .transpose()
    }

    /// Reads a cursor of `listing`. One without a listing (as versions
    /// before listings were named wrote them) is taken by any.
    pub fn decode(field: &str, raw: &str, listing: &str) -> Result<Self, ApiError> {
        Self::parse(field, raw, listing, true, &|member| Id::new(member).is_ok())
    }

    /// Reads a cursor of `listing`, or with `unnamed`, one of no listing.
    fn parse(
        field: &str,
        raw: &str,
        listing: &str,
        unnamed: bool,
        valid: &dyn Fn(&str) -> bool,
    ) -> Result<Self, ApiError> {
        use base64::Engine as _;
        let bad = || ApiError::invalid(field, "is not a cursor returned by this endpoint");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (first, rest) = text.split_once(':').ok_or_else(bad)?;
        // Scores are numbers and listings are words: the first part tells.
        let position = if unnamed && first.parse::<i64>().is_ok() {
            text.as_str()
        } else if first == listing {
            rest
        } else {
            return Err(bad());
        };
        let (score, member) = position.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            score: score.parse().map_err(|_| bad())?,
            member: valid(member).then(|| member.to_owned()).ok_or_else(bad)?,
        })
    }
}

impl AgentSelection {
    /// The listing's name in its cursors (see [`IndexCursor::encode`]).
    pub fn listing(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::State(state) => state.as_str(),
            Self::StaleBefore(_) => "stale",
        }
    }
}

/// One agent run, for `performance`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub agent_id: String,
    pub run_id: Option<String>,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// `completed`, `failed` or `cancelled` once closed.
    pub outcome: Option<String>,
    /// The agent went down during this run and has not come back, or was
    /// deleted before the run closed.
    pub lost: bool,
}

/// Per-agent run statistics.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
pub struct RunStats {
    /// The agent, or `total` for the total row.
    pub agent_id: String,
    /// Runs started in the window.
    pub runs: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Runs that went down and never came back.
    pub lost: u64,
    /// Runs still in progress.
    pub running: u64,
    /// completed / (completed + failed + cancelled + lost); null with none.
    #[schema(required = true)]
    pub success_rate: Option<f64>,
    /// Mean duration of closed runs, in seconds; null with none.
    #[schema(required = true)]
    pub avg_duration_seconds: Option<f64>,
}

/// Aggregates runs per agent, plus a total row.
pub fn run_stats(runs: &[RunRecord]) -> (Vec<RunStats>, RunStats) {
    #[derive(Default)]
    struct Acc {
        stats: RunStats,
        duration_ms: i64,
        closed: u64,
    }
    let mut per_agent: BTreeMap<&str, Acc> = BTreeMap::new();
    let mut total = Acc::default();
    for run in runs {
        for acc in [
            per_agent.entry(run.agent_id.as_str()).or_default(),
            &mut total,
        ] {
            acc.stats.runs += 1;
            match run.outcome.as_deref() {
                Some("completed") => acc.stats.completed += 1,
                Some("failed") => acc.stats.failed += 1,
                Some("cancelled") => acc.stats.cancelled += 1,
                _ if run.lost => acc.stats.lost += 1,
                _ => acc.stats.running += 1,
            }
            if let (Some(end), Some(_)) = (run.ended_ms, run.outcome.as_ref()) {
                acc.duration_ms += end - run.started_ms;
                acc.closed += 1;
            }
        }
    }
    let finish = |agent_id: &str, acc: Acc| {
        let mut s = acc.stats;
        s.agent_id = agent_id.to_owned();
        let decided = s.completed + s.failed + s.cancelled + s.lost;
        s.success_rate = (decided > 0).then(|| s.completed as f64 / decided as f64);
        s.avg_duration_seconds =
            (acc.closed > 0).then(|| acc.duration_ms as f64 / acc.closed as f64 / 1000.0);
        s
    };
    let rows = per_agent
        .into_iter()
        .map(|(agent, acc)| finish(agent, acc))
        .collect();
    (rows, finish("total", total))
}

/// How many runs are kept for `performance` (longer than the agent records).
pub const RUN_RETENTION: Duration = Duration::from_secs(30 * 86_400);

impl Engine {
    /// Applies a beat atomically and returns the new record.
    pub async fn record_beat(&self, beat: Beat) -> EngineResult<AgentRecord> {
        dispatch!(self, record_beat(beat))
    }

    pub async fn get_agent(&self, id: &Id) -> EngineResult<Option<AgentRecord>> {
        dispatch!(self, get_agent(id))
    }

    /// Removes an agent's record and index entries; false if it was unknown.
    pub async fn delete_agent(&self, id: &Id, event: EventBody) -> EngineResult<bool> {
        dispatch!(self, delete_agent(id, event))
    }

    /// One page of the agents `query` admits, from `cursor`.
    pub async fn list_agents(
        &self,
        query: AgentQuery,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<AgentRecord>, Option<IndexCursor>)> {
        dispatch!(self, list_agents(query, now_ms, cursor, limit))
    }

    /// Claims agents whose `ttl + grace` passed before `now_ms`, marks them
    /// down and emits `agent.down` — each exactly once across replicas.
    pub async fn sweep_down_agents(&self, now_ms: i64, limit: usize) -> EngineResult<usize> {
        dispatch!(self, sweep_down_agents(now_ms, limit))
    }

    /// Drops index entries of expired records and runs past retention.
    pub async fn prune_agents(&self, now_ms: i64, retention: Duration) -> EngineResult<()> {
        dispatch!(self, prune_agents(now_ms, retention))
    }

    /// Runs started at or after `since_ms`.
    pub async fn runs_since(&self, since_ms: i64) -> EngineResult<Vec<RunRecord>> {
        dispatch!(self, runs_since(since_ms))
    }

    /// Agents per state, for `/metrics`.
    pub async fn agent_state_counts(&self, now_ms: i64) -> EngineResult<[(AgentState, u64); 4]> {
        dispatch!(self, agent_state_counts(now_ms))
    }
}

/// Agents per state (`up`, `late`, `down`, `finished`) for `/metrics`.
pub async fn state_counts(state: &AppState) -> EngineResult<Vec<(&'static str, u64)>> {
    let counts = state
        .engine
        .agent_state_counts(state.clock.now_ms())
        .await?;
    Ok(counts.iter().map(|(s, n)| (s.as_str(), *n)).collect())
}

/// `data` of `agent.heartbeat`.
#[derive(Serialize)]
struct HeartbeatData<'a> {
    status: AgentStatus,
    progress: Option<f64>,
    current_task: Option<&'a str>,
    run_id: Option<&'a str>,
    ttl_seconds: u64,
}

/// Validates scope and applies a heartbeat.
pub async fn record_heartbeat(
    state: &AppState,
    caller: &Identity,
    agent_id: Id,
    req: HeartbeatRequest,
) -> ApiResult<AgentView> {
    caller.ensure_may_act_as(&agent_id, "agent_id")?;
    let now = state.clock.now();
    let status = req.status.unwrap_or_default();
    let ttl_seconds = req.ttl_seconds.unwrap_or(DEFAULT_TTL).get();
    let grace_seconds = state.config.down_grace.map_or(ttl_seconds, |g| g.as_secs());
    let heartbeat_event = state.config.heartbeat_events.then(|| {
        EventBody::new(
            "agent.heartbeat",
            &caller.name,
            Some(&agent_id),
            now,
            HeartbeatData {
                status,
                progress: req.progress.map(Fraction::get),
                current_task: req.current_task.as_ref().map(Text::as_str),
                run_id: req.run_id.as_ref().map(Id::as_str),
                ttl_seconds,
            },
        )
    });
    let beat = Beat {
        agent_id,
        status,
        progress: req.progress.map(Fraction::get),
        current_task: req.current_task.map(Text::into_inner),
        metadata: req.metadata,
        display_name: req.display_name.map(Text::into_inner),
        run_id: req.run_id,
        ttl_seconds,
        grace_seconds,
        now,
        retention: state.config.agent_retention,
        source: caller.name.clone(),
        heartbeat_event,
    };
    let record = state.engine.record_beat(beat).await?;
    Ok(record.into_view(now.timestamp_millis()))
}

/// Starts the sweeper that moves silent agents to `down` and prunes indexes.
pub fn spawn_sweeper(state: AppState) -> tokio::task::JoinHandle<()> {
    crate::sweeper::spawn(
        state,
        "sweep_agents",
        |state, now_ms, limit| async move { state.engine.sweep_down_agents(now_ms, limit).await },
        |state, now_ms| async move {
            let retention = state.config.agent_retention;
            state.engine.prune_agents(now_ms, retention).await
        },
    )
}

/// The `agent.down` event, emitted by the sweeper.
pub fn down_event(agent_id: &Id, ttl_seconds: u64, ts: DateTime<Utc>) -> EventBody {
    EventBody::new(
        "agent.down",
        "system",
        Some(agent_id),
        ts,
        serde_json::json!({ "ttl_seconds": ttl_seconds }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: AgentStatus, last_beat_ms: i64) -> AgentRecord {
        AgentRecord {
            agent_id: Id::new("a").unwrap(),
            display_name: None,
            status,
            progress: None,
            current_task: None,
            metadata: Default::default(),
            run_id: None,
            last_beat_ms,
            ttl_seconds: 30,
            grace_seconds: 30,
            down: false,
        }
    }

    #[test]
    fn state_follows_ttl_and_grace() {
        let r = record(AgentStatus::Running, 0);
        assert_eq!(r.state_at(30_000), AgentState::Up);
        assert_eq!(r.state_at(30_001), AgentState::Late);
        assert_eq!(r.state_at(60_000), AgentState::Late);
        assert_eq!(r.state_at(60_001), AgentState::Down);
        assert!(r.alive_at(30_000));
        assert!(!r.alive_at(30_001));
        assert_eq!(
            record(AgentStatus::Completed, 0).state_at(1_000_000),
            AgentState::Finished
        );
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = IndexCursor {
            score: 42,
            member: "agent-1".into(),
        };
        assert_eq!(
            IndexCursor::decode("cursor", &c.encode("all"), "all").unwrap(),
            c
        );
        assert!(IndexCursor::decode("cursor", "!!", "all").is_err());
        assert!(IndexCursor::decode("cursor", "eDp5", "all").is_err());
    }

    #[test]
    fn a_cursor_is_taken_back_only_by_its_listing() {
        use base64::Engine as _;
        let c = IndexCursor {
            score: -7,
            member: "agent-1".into(),
        };
        assert!(IndexCursor::decode("cursor", &c.encode("stale"), "down").is_err());
        assert!(IndexCursor::decode("cursor", &c.encode("stale"), "stale").is_ok());
        // As earlier versions wrote them: taken by any listing.
        let legacy = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("-7:agent-1");
        assert_eq!(IndexCursor::decode("cursor", &legacy, "up").unwrap(), c);
    }

    #[test]
    fn run_stats_count_outcomes_and_durations() {
        let run = |agent: &str, outcome: Option<&str>, lost: bool, dur: i64| RunRecord {
            agent_id: agent.into(),
            run_id: None,
            started_ms: 0,
            ended_ms: outcome.map(|_| dur),
            outcome: outcome.map(Into::into),
            lost,
        };
        let runs = vec![
            run("a", Some("completed"), false, 10_000),
            run("a", Some("failed"), false, 20_000),
            run("a", None, true, 0),
            run("b", None, false, 0),
        ];
        let (rows, total) = run_stats(&runs);
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!((a.runs, a.completed, a.failed, a.lost), (3, 1, 1, 1));
        assert_eq!(a.success_rate, Some(1.0 / 3.0));
        assert_eq!(a.avg_duration_seconds, Some(15.0));
        assert_eq!(rows[1].running, 1);
        assert_eq!(rows[1].success_rate, None);
        assert_eq!(total.runs, 4);
    }
}
