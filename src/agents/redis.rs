//! Agents on Redis: one hash per agent plus sorted-set indexes.
//!
//! A beat is one Lua script: it reads the previous status, down flag and
//! open run, writes the record, updates every index, opens or closes the
//! run and appends the events — atomically, so concurrent beats and the
//! sweepers of several replicas never see half an update. Record fields
//! hold JSON produced by Rust; the scripts move them without decoding.
//! Beats that change no state go in a short form checked against a token
//! in the record (see [`BEATS`]).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::{Cmd, ErrorKind, Script, ServerErrorKind};
use tokio::sync::{mpsc, oneshot};

use crate::agents::{
    AgentIndex, AgentQuery, AgentRecord, AgentState, AgentStatus, Beat, IndexCursor, IndexRange,
    LISTING_ROUNDS, RunRecord,
};
use crate::engine::redis::{RedisEngine, args, readable, script};
use crate::engine::{EngineError, EngineResult};
use crate::events::EventBody;
use crate::types::{Id, from_millis, rfc3339};

/// [`script`] with the agents' Lua helpers in front.
fn agent_script(body: &str) -> Script {
    script(&format!("{RUNS_PRELUDE}\n{body}"))
}

/// The agents' Lua helpers.
///
/// `update_run(runs, key, fn)` rewrites one run's JSON record in the runs
/// hash `runs` with `fn`, if it is still there: beats open, close and
/// recover runs; the sweeper and deletes mark them lost.
/// A record that does not decode (written by hand or by another program) is
/// left as it is: an error would abort the script partway, failing every
/// beat of the batch and leaving the ones before it applied. The
/// performance report passes over such records (see
/// [`RedisEngine::runs_since`]).
///
/// `not_a_record(reply)` tells, from the reply of a `redis.pcall` on an
/// agent's record key, whether that key holds another type (another
/// program's key): such a key costs only its own agent. Any other error (a
/// command the Redis user may not run) is every call's, and is raised as
/// it is.
const RUNS_PRELUDE: &str = r#"
local function not_a_record(reply)
  if type(reply) ~= 'table' or not reply.err then return false end
  if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then return true end
  error(reply)
end

local function update_run(runs, key, fn)
  local raw = redis.call('HGET', runs, key)
  if raw then
    local ok, run = pcall(cjson.decode, raw)
    if ok and type(run) == 'table' then
      fn(run)
      redis.call('HSET', runs, key, cjson.encode(run))
    end
  end
end
"#;

/// Applies a batch of beats, each exactly as if alone, in order.
///
/// KEYS: 2 active, 3 late-due, 4 down-due, 5 down, 6 finished, 7 runs,
/// 8 runs-by-start, then one record key per beat.
/// ARGV: 2 retention ms, 3 expiry slack ms, 4 a nonce for the tokens this
/// call issues, then per beat one of two forms, told apart by the first
/// value:
///
/// - a quick beat ([`QUICK_ARGS`] values, status `running`): the record's
///   token as the writer last saw it, agent id, now ms, progress JSON,
///   current_task JSON, heartbeat event or '', the moment it stops being
///   alive (ms) and its down-due score (ms; '' to leave it, see below);
/// - a full beat ([`FULL_ARGS`] values): '', agent id, now ms, status,
///   terminal (0/1), ttl s, grace s, progress JSON, current_task JSON,
///   metadata JSON or '', display_name JSON or '', run_id or '', event
///   timestamp, source as a JSON string, heartbeat event or '', and the two
///   moments as above.
///
/// Returns, per beat, `q` (a quick beat applied), `d` (deferred: not
/// applied, see below), `e` (not applied: the record's key holds another
/// type) or `f` followed by the stored `metadata`,
/// `display_name` and `run_id`, the record's token (false when the agent is
/// not in the typical state: not `running`) and its expiry (ms).
///
/// Inside a script every `redis.call` and every argument costs more than
/// the work of a typical command, so a typical beat — one that changes no
/// state — is sent in the quick form: the writer keeps, per agent, what the
/// last beat returned (the token, the expiry and the three stored fields),
/// decides from it that the beat changes nothing but the moving fields (ttl
/// and grace included: they rarely change), and sends only those; the script
/// only checks that the token still matches. If it does not (another
/// replica applied a beat, the agent went down, was deleted), the beat and
/// every later beat of that agent in the batch are deferred: the writer
/// sends them again in the full form at once.
///
/// The token lives in the record's `down` field, which holds `1` while the
/// agent is down and otherwise a random value the script writes whenever
/// anything the writers keep changes. Every script that changes an agent's
/// state rewrites `down` (the sweeper, every full beat, and those of
/// earlier versions too, which write `0`), so a quick beat can never be
/// applied to a record whose state changed since its writer looked, whatever
/// changed it.
///
/// A token is only issued for a `running` record, so quick beats leave the
/// status alone. Nor do they move the agent's down-due score on every beat:
/// that index only tells the sweepers when to claim an agent, and a score
/// somewhat past the deadline is as good, so for an agent beating more
/// often than every [`DOWN_DUE_AHEAD_MS`] a writer puts it that far beyond
/// the deadline and leaves it until the deadline catches up (the score
/// never falls behind the deadline, so no agent is ever claimed early). An
/// agent beating less often gets its exact deadline: no later beat would
/// skip a write, and it would only go down later. Other writers may hold the same token
/// (a typical full beat keeps it), and one of them may have put the score
/// further ahead than this writer knows (a later beat, or a replica whose
/// clock runs ahead) and count on it: quick beats and a full beat that
/// keeps the token only ever raise the score (`ZADD GT`). A full beat that
/// issues a new token sets it exactly; no writer holds that token yet.
///
/// The index scores of the whole batch go out as one `ZADD` per index at
/// the end (flushed early before any other write to those indexes, so they
/// all apply in beat order), the event log is trimmed once per call, and the record's
/// expiry is pushed out only when it falls short of `retention` from now:
/// it is set `slack` beyond that, so an agent beating often renews it once
/// per slack rather than on every beat.
static BEATS: LazyLock<Script> = LazyLock::new(|| {
    agent_script(
        &r#"
local retention, slack, nonce = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
-- Relative, so that the lifetime does not depend on how the clocks of
-- Redis and the replicas agree.
local lifetime = string.format('%d', retention + slack)
local out, n_out = {}, 0
local function put(v) n_out = n_out + 1; out[n_out] = v end
-- Agents with a deferred beat in this call: their later beats wait too.
local deferred = {}
-- ZADD arguments of the batch (score, member, …) for active, late-due,
-- down-due (raised only: quick beats; or set: full beats) and finished,
-- with their lengths; flushed at the end, and before any other write to
-- those indexes so that all apply in beat order. (An agent's quick beats
-- in a call all come before its full ones, so raising first keeps order.)
local za, zl, zr, zd, zf = {}, {}, {}, {}, {}
local na, nl, nr, nd, nf = 0, 0, 0, 0, 0
local function flush()
  if na > 0 then redis.call('ZADD', KEYS[2], unpack(za, 1, na)); na = 0 end
  if nl > 0 then redis.call('ZADD', KEYS[3], unpack(zl, 1, nl)); nl = 0 end
  if nr > 0 then redis.call('ZADD', KEYS[4], 'GT', unpack(zr, 1, nr)); nr = 0 end
  if nd > 0 then redis.call('ZADD', KEYS[4], unpack(zd, 1, nd)); nd = 0 end
  if nf > 0 then redis.call('ZADD', KEYS[6], unpack(zf, 1, nf)); nf = 0 end
end
local function zrem(k, id) flush(); redis.call('ZREM', KEYS[k], id) end
local function is_terminal(s) return s == 'completed' or s == 'failed' or s == 'cancelled' end
-- `agent.heartbeat`: no wake-up key, and the log is trimmed once per call.
local function heartbeat(id, body)
  redis.call('XADD', KEYS[1], '*', 't', 'agent.heartbeat', 'a', id, 'b', body)
end
-- The quick form does the same inline. Without `down_at` ('') the
-- down-due score is left alone.
local function live_indexes(id, now_s, alive_until, down_at)
  na = na + 2; za[na - 1] = now_s; za[na] = id
  nl = nl + 2; zl[nl - 1] = alive_until; zl[nl] = id
  if down_at ~= '' then nd = nd + 2; zd[nd - 1] = down_at; zd[nd] = id end
end
local function event(a, kind, data)
  return '{"type":"' .. kind .. '","ts":"' .. ARGV[a + 11] .. '","source":' .. ARGV[a + 12]
    .. ',"agent_id":"' .. ARGV[a] .. '","data":' .. data .. '}'
end
local function run_data(run_id, status)
  local rid = run_id and ('"' .. run_id .. '"') or 'null'
  return '{"run_id":' .. rid .. ',"status":"' .. status .. '"}'
end

-- Any beat that may change state: runs, recovery, finishing, new metadata,
-- a first beat, an expiry to renew. Returns the stored metadata,
-- display_name and run_id, and the expiry.
local function full_beat(rec, a, prev, renew, token)
  local id, now_s, status, terminal = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3] == '1'
  local now = tonumber(now_s)
  local was_terminal, was_down, run_key, run_id = is_terminal(prev[1]), prev[2] == '1', prev[3], prev[4]
  local metadata, display_name, expires = prev[5], prev[6], prev[7]
  -- The token (not down) first: a new record keeps it at the front of its
  -- listpack, where the quick beat's lookup finds it at once.
  local fields = { 'down', token, 'agent_id', id, 'status', status, 'progress', ARGV[a + 6],
    'current_task', ARGV[a + 7], 'last_beat', now_s, 'ttl', ARGV[a + 4], 'grace', ARGV[a + 5] }
  local function set(name, value) fields[#fields + 1] = name; fields[#fields + 1] = value end
  if ARGV[a + 8] ~= '' then metadata = ARGV[a + 8]; set('metadata', metadata) end
  if ARGV[a + 9] ~= '' then display_name = ARGV[a + 9]; set('display_name', display_name) end
  local new_run_id = ARGV[a + 10] ~= '' and ARGV[a + 10] ~= run_id
  -- `starting` opens a run, unless it names the open one again: a retried
  -- start is the same run.
  local restarts = status == 'starting' and (not run_key or ARGV[a + 10] == '' or new_run_id)
  if ARGV[a + 10] ~= '' then run_id = ARGV[a + 10]; set('run_id', run_id) end
  -- When the record expires, by the service's clock: decides renewals.
  if renew then
    expires = string.format('%d', now + retention + slack)
    set('expires', expires)
  end

  if (not run_key and not terminal) or restarts or new_run_id then
    if run_key then
      update_run(KEYS[7], run_key, function(r) if r.outcome == nil then r.lost = true end end)
    end
    -- Keyed by agent and start; a second run started in the same
    -- millisecond gets a suffix instead of overwriting the first.
    local base, n = id .. '/' .. now_s, 1
    run_key = base
    while redis.call('HEXISTS', KEYS[7], run_key) == 1 do
      n = n + 1
      run_key = base .. '/' .. n
    end
    -- A run opened without a `run_id` has none: the one stored named an
    -- earlier run.
    if ARGV[a + 10] == '' and run_id then
      run_id = nil
      redis.call('HDEL', rec, 'run_id')
    end
    local run = { agent_id = id, started_ms = now, lost = false }
    if run_id then run.run_id = run_id end
    redis.call('HSET', KEYS[7], run_key, cjson.encode(run))
    redis.call('ZADD', KEYS[8], now, run_key)
    set('run_key', run_key)
    emit('agent.started', id, '', event(a, 'agent.started', run_data(run_id, status)))
  end
  if was_down then
    if run_key then update_run(KEYS[7], run_key, function(r) r.lost = false end) end
    emit('agent.recovered', id, '', event(a, 'agent.recovered', '{"status":"' .. status .. '"}'))
  end
  redis.call('HSET', rec, unpack(fields))
  if renew then redis.call('PEXPIRE', rec, lifetime) end
  if terminal and run_key then
    update_run(KEYS[7], run_key, function(r) r.ended_ms = now; r.outcome = status; r.lost = false end)
    redis.call('HDEL', rec, 'run_key')
    emit('agent.finished', id, '', event(a, 'agent.finished', run_data(run_id, status)))
  end
  if terminal then
    if not was_terminal then
      for k = 2, 5 do zrem(k, id) end
    end
  else
    if was_down then zrem(5, id) end
    if was_terminal then zrem(6, id) end
  end
  return metadata, display_name, run_id, expires
end

local a = 5
for i = 9, #KEYS do
  local rec = KEYS[i]
  if ARGV[a] ~= '' then
    -- Quick form.
    local id, now_s = ARGV[a + 1], ARGV[a + 2]
    -- A key of another type answers an error, which matches no token.
    if deferred[id] == nil and redis.pcall('HGET', rec, 'down') == ARGV[a] then
      -- Tokens are only issued for `running` records: the status stays.
      redis.call('HSET', rec, 'progress', ARGV[a + 3], 'current_task', ARGV[a + 4], 'last_beat', now_s)
      if ARGV[a + 5] ~= '' then heartbeat(id, ARGV[a + 5]) end
      na = na + 2; za[na - 1] = now_s; za[na] = id
      nl = nl + 2; zl[nl - 1] = ARGV[a + 6]; zl[nl] = id
      if ARGV[a + 7] ~= '' then nr = nr + 2; zr[nr - 1] = ARGV[a + 7]; zr[nr] = id end
      put('q')
    else
      deferred[id] = true
      put('d')
    end
    a = a + QUICK_ARGS
  else
    -- Full form; from here on `b` is where its values start.
    local b = a + 1
    local id, now_s, status = ARGV[b], ARGV[b + 1], ARGV[b + 2]
    local prev = not deferred[id] and redis.pcall('HMGET', rec, 'status', 'down', 'run_key', 'run_id',
      'metadata', 'display_name', 'expires', 'ttl', 'grace')
    if deferred[id] then
      put('d')
    elseif not_a_record(prev) then
      -- This beat fails alone instead of aborting the call with every
      -- beat in it.
      put('e')
    else
      local now, terminal = tonumber(now_s), ARGV[b + 3] == '1'
      local token = nonce .. '.' .. (i - 8)
      local expires = tonumber(prev[7])
      local renew = not expires or expires < now + retention or expires > now + retention + slack
      local metadata, display_name, run_id, stored_expires = prev[5], prev[6], prev[4], prev[7]
      local kept = false
      if not terminal and prev[3] and prev[2] and prev[2] ~= '1' and not is_terminal(prev[1])
          and status ~= 'starting'
          and not renew and ARGV[b + 8] == '' and ARGV[b + 9] == ''
          and (ARGV[b + 10] == '' or ARGV[b + 10] == run_id) then
        -- A typical beat the writer had no token for: only the moving
        -- fields are written, and the record's token is kept (a new one if
        -- it had none, or if ttl or grace change: quick beats omit them).
        if prev[2] ~= '0' and prev[8] == ARGV[b + 4] and prev[9] == ARGV[b + 5] then
          token, kept = prev[2], true
        end
        redis.call('HSET', rec, 'status', status, 'progress', ARGV[b + 6], 'current_task', ARGV[b + 7],
          'last_beat', now_s, 'ttl', ARGV[b + 4], 'grace', ARGV[b + 5], 'down', token)
      else
        metadata, display_name, run_id, stored_expires = full_beat(rec, b, prev, renew, token)
      end
      if ARGV[b + 13] ~= '' then heartbeat(id, ARGV[b + 13]) end
      -- Scores are passed as strings: a Lua number would be formatted anew.
      if terminal then
        nf = nf + 2; zf[nf - 1] = now_s; zf[nf] = id
      elseif kept then
        -- Writers holding the token may have put the down-due score ahead
        -- of this beat's deadline: it only moves forward here.
        live_indexes(id, now_s, ARGV[b + 14], '')
        flush()
        redis.call('ZADD', KEYS[4], 'GT', ARGV[b + 15], id)
      else
        live_indexes(id, now_s, ARGV[b + 14], ARGV[b + 15])
      end
      put('f')
      put(metadata or false)
      put(display_name or false)
      put(run_id or false)
      put(status == 'running' and token)
      put(stored_expires or false)
    end
    a = a + FULL_ARGS
  end
end
flush()
redis.call('XTRIM', KEYS[1], 'MAXLEN', trim_mode(), ARGV[1])
return out
"#
        .replace("QUICK_ARGS", &QUICK_ARGS.to_string())
        .replace("FULL_ARGS", &FULL_ARGS.to_string()),
    )
});

/// Values of a quick beat in [`BEATS`]'s `ARGV`.
const QUICK_ARGS: usize = 8;
/// Values of a full beat in [`BEATS`]'s `ARGV`.
const FULL_ARGS: usize = 17;
/// How far beyond the down deadline of an agent beating more often than
/// this a quick beat puts its down-due score (see [`BEATS`]): the sweepers
/// claim it at most this much later (on top of their interval), and the
/// beats of that much time after it leave the index alone.
const DOWN_DUE_AHEAD_MS: i64 = 250;
/// Most beats applied by one script call.
const MAX_BATCH: usize = 128;
/// Writers, each with one batch in flight (see [`BeatBatcher`]).
const WRITERS: usize = 2;
/// Agents whose last beat a writer remembers (see [`BEATS`]); when a new
/// one would exceed this, the writer forgets them all and relearns them
/// from their next beats, which then go in the full form once.
const KNOWN_AGENTS: usize = 50_000;
/// Most bytes of stored fields (metadata, display name, run id, as JSON)
/// an agent may have for its writer to remember it: with [`KNOWN_AGENTS`],
/// a writer keeps at most about 60 MiB however large agents' metadata is
/// (up to 64 KiB each).
const KNOWN_STORED_BYTES: usize = 1024;

/// A beat waiting for its writer.
struct PendingBeat {
    beat: Beat,
    /// When it was queued (see [`BatchWriter::apply`]).
    queued: Instant,
    reply: oneshot::Sender<EngineResult<AgentRecord>>,
}

/// Group commit for heartbeats.
///
/// Agents beat constantly and concurrently, and on Redis the cost of a beat
/// is dominated by the per-call overhead of a script and its round trip, not
/// by its few commands. Beats are queued to a writer task, which takes
/// whatever is waiting (up to [`MAX_BATCH`]) and applies it in one script
/// call, then the next. Nothing waits for a batch to fill: a lone beat goes
/// out at once, and batches form only under load — while one is applied, the
/// next gathers.
///
/// A writer has one call in flight, which keeps its beats in queue order:
/// two calls in flight could reach Redis in either order, and a `completed`
/// beat applied before the `running` one queued ahead of it would leave the
/// agent running. Order matters only between beats of the same agent, so
/// there are [`WRITERS`] writers and each agent always goes to the same one:
/// while Redis applies one writer's batch, the other's is already on its way
/// and Redis does not sit idle between batches.
pub struct BeatBatcher {
    queues: Vec<mpsc::UnboundedSender<PendingBeat>>,
    /// Picks an agent's writer; one per process, so stable for its life.
    hasher: std::hash::RandomState,
}

impl BeatBatcher {
    fn start(engine: &RedisEngine) -> Self {
        Self {
            queues: (0..WRITERS).map(|_| BatchWriter::start(engine)).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The queue of `agent`'s writer.
    fn queue(&self, agent: &Id) -> &mpsc::UnboundedSender<PendingBeat> {
        use std::hash::BuildHasher;
        let n = self.hasher.hash_one(agent.as_str()) as usize % self.queues.len();
        &self.queues[n]
    }
}

/// The stored fields a beat does not send but its answer shows.
#[derive(Debug, Clone, Default)]
struct Stored {
    metadata: serde_json::Map<String, serde_json::Value>,
    display_name: Option<String>,
    run_id: Option<String>,
    /// Their size as stored (JSON text), which bounds what a writer keeps.
    bytes: usize,
}

/// What a writer remembers of an agent in the typical state after its last
/// beat: enough to tell whether the next beat may go in the quick form of
/// [`BEATS`], and to answer it.
struct Known {
    /// The record's token when the last beat was applied.
    token: String,
    /// The record's expiry (ms).
    expires_ms: i64,
    /// The record's `ttl` and `grace` (s), which quick beats do not write.
    ttl_seconds: u64,
    grace_seconds: u64,
    /// The agent's down-due score, or less (ms).
    down_due_ms: i64,
    /// When its last beat was (ms).
    last_beat_ms: i64,
    stored: Stored,
}

impl Known {
    /// Whether `beat` changes nothing this writer remembers, so that it can
    /// go in the quick form: the same checks as the script's typical beat.
    /// Metadata or a display name sent again unchanged (clients that send
    /// them with every beat) change nothing either.
    fn admits(&self, beat: &Beat, retention_ms: i64, slack_ms: i64) -> bool {
        let now = beat.now.timestamp_millis();
        beat.status == AgentStatus::Running
            && beat
                .metadata
                .as_ref()
                .is_none_or(|m| *m.as_map() == self.stored.metadata)
            && beat
                .display_name
                .as_ref()
                .is_none_or(|name| Some(name) == self.stored.display_name.as_ref())
            && (beat.ttl_seconds, beat.grace_seconds) == (self.ttl_seconds, self.grace_seconds)
            && beat
                .run_id
                .as_ref()
                .is_none_or(|id| Some(id.as_str()) == self.stored.run_id.as_deref())
            && (now + retention_ms..=now + retention_ms + slack_ms).contains(&self.expires_ms)
    }
}

struct BatchWriter {
    link: std::sync::Arc<crate::engine::redis::Link>,
    /// The shared index keys (`KEYS[2..=8]` of [`BEATS`]).
    index_keys: [String; 7],
    keys: crate::engine::keys::Keys,
    events: String,
    stream_max_len: usize,
    /// Agents of this writer in the typical state, by id (at most
    /// [`KNOWN_AGENTS`]).
    known: HashMap<Id, Known>,
}

/// How one beat of a call went.
enum Outcome {
    /// Applied, with the stored fields its answer shows, or failed alone.
    Answered(EngineResult<Stored>),
    /// To be sent again in the full form.
    Deferred,
}

impl BatchWriter {
    /// Starts a writer task; it ends when the returned queue is dropped.
    fn start(engine: &RedisEngine) -> mpsc::UnboundedSender<PendingBeat> {
        let (queue, mut rx) = mpsc::unbounded_channel::<PendingBeat>();
        let mut writer = Self {
            link: engine.link.clone(),
            index_keys: engine.index_keys(),
            keys: engine.keys.clone(),
            events: engine.keys.events(),
            stream_max_len: engine.stream_max_len,
            known: HashMap::new(),
        };
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                writer.apply(batch).await;
            }
        });
        queue
    }

    /// Applies `batch`, and then at once, in the full form, whatever the
    /// script deferred, so that an agent's beats still apply in order.
    async fn apply(&mut self, mut batch: Vec<PendingBeat>) {
        // A beat is sent only while it has waited at most one call's bound,
        // so that it is answered within two: the calls ahead of it, then
        // its own (a beat the script defers is sent again at once, after a
        // call Redis answered). One that waited longer, behind calls Redis
        // did not answer or a backlog, fails unsent. This is the beats'
        // time limit: a timer per beat would cost more than this check per
        // batch.
        let now = Instant::now();
        let bound = self.link.timeout();
        let (late, ready): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| now.duration_since(p.queued) > bound);
        batch = ready;
        for PendingBeat { reply, .. } in late {
            let _ = reply.send(Err(EngineError::Unavailable(
                "the heartbeat waited longer than --redis-timeout-ms for Redis".into(),
            )));
        }
        loop {
            // A beat whose request already gave up (its client left, or the
            // request's time limit passed) is dropped rather than sent late.
            batch.retain(|p| !p.reply.is_closed());
            if batch.is_empty() {
                return;
            }
            let (cmd, quick) = self.command(&batch);
            let mut conn = self.link.conn();
            let call = async {
                match cmd.query_async(&mut conn).await {
                    // Redis lost its script cache (a restart, `SCRIPT
                    // FLUSH`): load the script and send the same call again.
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        BEATS.load_async(&mut conn).await?;
                        cmd.query_async(&mut conn).await
                    }
                    result => result,
                }
            };
            let result: EngineResult<Vec<Option<String>>> = self.link.run(call).await;
            let outcomes = match result {
                Ok(values) => self.outcomes(&batch, quick, values),
                Err(err) => Err(err),
            };
            let outcomes = match outcomes {
                Ok(outcomes) => outcomes,
                Err(err) => {
                    // The call may or may not have been applied: forget what
                    // it would have taught.
                    for PendingBeat { beat, reply, .. } in batch {
                        self.known.remove(&beat.agent_id);
                        let _ = reply.send(Err(err.clone()));
                    }
                    return;
                }
            };
            let mut again = Vec::new();
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Answered(stored) => {
                        let record = stored.map(|stored| record_after(pending.beat, stored));
                        let _ = pending.reply.send(record);
                    }
                    Outcome::Deferred => again.push(pending),
                }
            }
            batch = again;
        }
    }

    /// The `EVALSHA` of [`BEATS`] for `batch`, its values written straight
    /// into the command (no string per value), and for each beat sent in
    /// the quick form what its answer shows besides the beat itself.
    fn command(&mut self, batch: &[PendingBeat]) -> (Cmd, Vec<Option<Stored>>) {
        let retention = batch[0].beat.retention.as_millis();
        let slack = expiry_slack(retention);
        let (retention_ms, slack_ms) = (
            i64::try_from(retention).unwrap_or(i64::MAX / 4),
            i64::try_from(slack).unwrap_or(0),
        );
        let n_keys = 1 + self.index_keys.len() + batch.len();
        let mut cmd =
            Cmd::with_capacity(3 + n_keys + 4 + batch.len() * FULL_ARGS, 512 * batch.len());
        cmd.arg("EVALSHA").arg(BEATS.get_hash()).arg(n_keys);
        cmd.arg(&self.events).arg(&self.index_keys[..]);
        for PendingBeat { beat, .. } in batch {
            cmd.arg(self.keys.agent(&beat.agent_id));
        }
        cmd.arg(self.stream_max_len)
            .arg(retention_ms)
            .arg(slack_ms)
            .arg(rand::random::<u64>());
        let mut json = Vec::with_capacity(256);
        let mut quick = Vec::with_capacity(batch.len());
        for PendingBeat { beat, .. } in batch {
            match self.known.get_mut(&beat.agent_id) {
                Some(known) if known.admits(beat, retention_ms, slack_ms) => {
                    let (alive_until, down_at) = deadlines(beat);
                    let now = beat.now.timestamp_millis();
                    let often = now.saturating_sub(known.last_beat_ms) < DOWN_DUE_AHEAD_MS;
                    known.last_beat_ms = now;
                    let down_due = (known.down_due_ms < down_at).then(|| {
                        let ahead = if often { DOWN_DUE_AHEAD_MS } else { 0 };
                        known.down_due_ms = down_at.saturating_add(ahead);
                        known.down_due_ms
                    });
                    cmd.arg(&known.token);
                    write_quick_args(&mut cmd, &mut json, beat, alive_until, down_due);
                    quick.push(Some(known.stored.clone()));
                }
                _ => {
                    // Its later beats in this batch follow it in the full form.
                    self.known.remove(&beat.agent_id);
                    write_full_args(&mut cmd, &mut json, beat);
                    quick.push(None);
                }
            }
        }
        (cmd, quick)
    }

    /// Reads the script's answer for `batch` (sent as `command` built it),
    /// learning each agent's token and stored fields from its full beats.
    fn outcomes(
        &mut self,
        batch: &[PendingBeat],
        quick: Vec<Option<Stored>>,
        values: Vec<Option<String>>,
    ) -> EngineResult<Vec<Outcome>> {
        let corrupt = || EngineError::Corrupt("unexpected answer from the beat script".into());
        let mut values = values.into_iter();
        let mut outcomes = Vec::with_capacity(batch.len());
        for (PendingBeat { beat, .. }, quick) in batch.iter().zip(quick) {
            let kind = values.next().flatten().ok_or_else(corrupt)?;
            let outcome = match (kind.as_str(), quick) {
                ("q", Some(stored)) => Outcome::Answered(Ok(stored)),
                ("d", _) => {
                    self.known.remove(&beat.agent_id);
                    Outcome::Deferred
                }
                ("e", None) => Outcome::Answered(Err(EngineError::Corrupt(format!(
                    "the record of agent {} is not a hash",
                    beat.agent_id
                )))),
                ("f", None) => {
                    let mut next = || values.next().ok_or_else(corrupt);
                    let (metadata, display_name, run_id, token, expires) =
                        (next()?, next()?, next()?, next()?, next()?);
                    let stored = decode_stored(
                        metadata.as_deref(),
                        display_name.as_deref(),
                        run_id.as_deref(),
                    );
                    if let Ok(stored) = &stored {
                        self.learn(beat, token, expires, stored);
                    }
                    Outcome::Answered(stored)
                }
                _ => return Err(corrupt()),
            };
            outcomes.push(outcome);
        }
        if values.next().is_some() {
            return Err(corrupt());
        }
        Ok(outcomes)
    }

    /// Remembers `beat`'s agent after a full beat, if it is in the typical
    /// state (the script returned a token).
    fn learn(
        &mut self,
        beat: &Beat,
        token: Option<String>,
        expires: Option<String>,
        stored: &Stored,
    ) {
        let expires_ms = expires.and_then(|e| e.parse().ok());
        let (Some(token), Some(expires_ms)) = (token, expires_ms) else {
            self.known.remove(&beat.agent_id);
            return;
        };
        // An agent with large metadata is not remembered (its beats go in
        // the full form), so that what writers keep stays bounded.
        if stored.bytes > KNOWN_STORED_BYTES {
            self.known.remove(&beat.agent_id);
            return;
        }
        if self.known.len() >= KNOWN_AGENTS && !self.known.contains_key(&beat.agent_id) {
            self.known.clear();
        }
        let known = Known {
            token,
            expires_ms,
            ttl_seconds: beat.ttl_seconds,
            grace_seconds: beat.grace_seconds,
            // What the beat sent; a kept token may have kept a later score.
            down_due_ms: deadlines(beat).1,
            last_beat_ms: beat.now.timestamp_millis(),
            stored: stored.clone(),
        };
        self.known.insert(beat.agent_id.clone(), known);
    }
}

/// How far beyond the retention period a record's expiry is set, so that
/// an agent beating often renews it once per slack instead of on every beat:
/// 1 % of the retention, at most a minute.
fn expiry_slack(retention_ms: u128) -> u128 {
    (retention_ms / 100).min(60_000)
}

/// Serializes plain data (numbers, strings, a JSON object) into the
/// scratch buffer `json` and appends it as one argument. Serializing cannot
/// fail; should it, the script gets `null`.
fn arg_json<T: serde::Serialize + ?Sized>(cmd: &mut Cmd, json: &mut Vec<u8>, value: &T) {
    json.clear();
    if serde_json::to_writer(&mut *json, value).is_err() {
        json.clear();
        json.extend_from_slice(b"null");
    }
    cmd.arg(&json[..]);
}

/// The moments `beat`'s agent stops being alive and is due down (ms).
fn deadlines(beat: &Beat) -> (i64, i64) {
    let ms = |seconds: u64| i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let alive_until = beat
        .now
        .timestamp_millis()
        .saturating_add(ms(beat.ttl_seconds));
    (
        alive_until,
        alive_until.saturating_add(ms(beat.grace_seconds)),
    )
}

/// Appends the [`QUICK_ARGS`] script arguments of one beat after its token:
/// `down_due` is the down-due score to write, if any.
fn write_quick_args(
    cmd: &mut Cmd,
    json: &mut Vec<u8>,
    beat: &Beat,
    alive_until: i64,
    down_due: Option<i64>,
) {
    cmd.arg(beat.agent_id.as_str())
        .arg(beat.now.timestamp_millis());
    arg_json(cmd, json, &beat.progress);
    arg_json(cmd, json, &beat.current_task);
    cmd.arg(heartbeat_event(beat)).arg(alive_until);
    match down_due {
        Some(score) => cmd.arg(score),
        None => cmd.arg(""),
    };
}

/// Appends the [`FULL_ARGS`] script arguments of one beat.
fn write_full_args(cmd: &mut Cmd, json: &mut Vec<u8>, beat: &Beat) {
    let (alive_until, down_at) = deadlines(beat);
    cmd.arg("")
        .arg(beat.agent_id.as_str())
        .arg(beat.now.timestamp_millis())
        .arg(beat.status.as_str())
        .arg(u8::from(beat.status.is_terminal()))
        .arg(beat.ttl_seconds)
        .arg(beat.grace_seconds);
    arg_json(cmd, json, &beat.progress);
    arg_json(cmd, json, &beat.current_task);
    match &beat.metadata {
        Some(metadata) => arg_json(cmd, json, metadata.as_map()),
        None => {
            cmd.arg("");
        }
    }
    match &beat.display_name {
        Some(name) => arg_json(cmd, json, name),
        None => {
            cmd.arg("");
        }
    }
    cmd.arg(beat.run_id.as_ref().map_or("", Id::as_str))
        .arg(rfc3339(beat.now));
    arg_json(cmd, json, &beat.source);
    cmd.arg(heartbeat_event(beat)).arg(alive_until).arg(down_at);
}

/// The `agent.heartbeat` event's JSON, or '' without one.
fn heartbeat_event(beat: &Beat) -> &str {
    beat.heartbeat_event
        .as_ref()
        .map_or("", |e| e.json.as_str())
}

/// Parses the stored fields the script returned for a full beat.
fn decode_stored(
    metadata: Option<&str>,
    display_name: Option<&str>,
    run_id: Option<&str>,
) -> EngineResult<Stored> {
    Ok(Stored {
        metadata: match record_json("metadata", metadata)? {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        },
        display_name: record_json("display_name", display_name)?
            .as_str()
            .map(str::to_owned),
        run_id: run_id.map(str::to_owned),
        bytes: [metadata, display_name, run_id]
            .iter()
            .map(|field| field.map_or(0, str::len))
            .sum(),
    })
}

/// A record field holding JSON, `null` when absent.
fn record_json(name: &str, raw: Option<&str>) -> EngineResult<serde_json::Value> {
    raw.map_or(Ok(serde_json::Value::Null), |raw| {
        serde_json::from_str(raw).map_err(|_| EngineError::Corrupt(format!("agent record: {name}")))
    })
}

/// The record after `beat`, with the stored fields it did not send.
fn record_after(beat: Beat, stored: Stored) -> AgentRecord {
    AgentRecord {
        display_name: stored.display_name,
        metadata: stored.metadata,
        run_id: stored.run_id,
        last_beat_ms: beat.now.timestamp_millis(),
        agent_id: beat.agent_id,
        status: beat.status,
        progress: beat.progress,
        current_task: beat.current_task,
        ttl_seconds: beat.ttl_seconds,
        grace_seconds: beat.grace_seconds,
        down: false,
    }
}

/// Claims due agents: KEYS as in [`RedisEngine::agent_keys`]; ARGV: 2 now
/// ms, 3 limit,
/// 4 record key prefix, 5 event timestamp.
///
/// The record keys are derived from the prefix inside the script; they share
/// the deployment's hash tag, so they live in the same slot as the declared keys.
static SWEEP_DOWN: LazyLock<Script> = LazyLock::new(|| {
    agent_script(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[5], id)
  redis.call('ZREM', KEYS[4], id)
  local rec = ARGV[4] .. id
  -- A key of another type in the record's place leaves the indexes with
  -- nothing to mark, instead of failing the claims of every agent due with it.
  local f = redis.pcall('HMGET', rec, 'last_beat', 'ttl', 'run_key', 'status')
  if not not_a_record(f) and f[1]
      and f[4] ~= 'completed' and f[4] ~= 'failed' and f[4] ~= 'cancelled' then
    redis.call('HSET', rec, 'down', '1')
    redis.call('ZADD', KEYS[6], f[1], id)
    if f[3] then update_run(KEYS[8], f[3], function(r) r.lost = true end) end
    emit('agent.down', id, '',
      '{"type":"agent.down","ts":"' .. ARGV[5] .. '","source":"system","agent_id":"' .. id
      .. '","data":{"ttl_seconds":' .. f[2] .. '}}')
  end
end
return #due
"#,
    )
});

/// Drops index entries of agents whose records expired, and old runs.
/// KEYS as in [`RedisEngine::agent_keys`]; ARGV: 2 agent cutoff ms, 3 run
/// cutoff ms.
static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
-- Every agent is either active or finished, both indexes scored by last beat.
local n = 0
for _, index in ipairs({ KEYS[3], KEYS[7] }) do
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. ARGV[2], 'LIMIT', 0, 10000)
  for _, id in ipairs(old) do
    for i = 3, 7 do redis.call('ZREM', KEYS[i], id) end
  end
  n = n + #old
end
local runs = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', '(' .. ARGV[3], 'LIMIT', 0, 10000)
for _, key in ipairs(runs) do
  redis.call('HDEL', KEYS[8], key)
  redis.call('ZREM', KEYS[9], key)
end
return n + #runs
"#,
    )
});

/// Deletes an agent: KEYS as in [`RedisEngine::agent_keys`]; ARGV: 2 agent id,
/// 3 event. Nothing will close the agent's open run now: it ends as lost.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    agent_script(
        r#"
-- A key of another type in the record's place is deleted all the same.
local run_key = redis.pcall('HGET', KEYS[2], 'run_key')
if not not_a_record(run_key) and run_key then
  update_run(KEYS[8], run_key, function(r) if r.outcome == nil then r.lost = true end end)
end
local existed = redis.call('DEL', KEYS[2])
for i = 3, 7 do redis.call('ZREM', KEYS[i], ARGV[2]) end
if existed == 1 then emit('agent.deleted', ARGV[2], '', ARGV[3]) end
return existed
"#,
    )
});

impl RedisEngine {
    /// `KEYS[2..]` of the scripts about one agent (a placeholder record
    /// for those about many): 2 the record, 3 active, 4 late-due, 5
    /// down-due, 6 down, 7 finished, 8 runs, 9 runs-by-start.
    fn agent_keys(&self, id: &Id) -> [String; 8] {
        let k = &self.keys;
        [
            k.agent(id),
            k.agents_active(),
            k.agents_late_due(),
            k.agents_down_due(),
            k.agents_down(),
            k.agents_finished(),
            k.runs(),
            k.runs_by_start(),
        ]
    }

    /// The same keys with a placeholder record (scripts over many agents).
    fn index_and_placeholder_keys(&self) -> [String; 8] {
        self.agent_keys(&Id::new("unused").expect("valid id"))
    }

    /// The indexes every beat updates, without a record key.
    fn index_keys(&self) -> [String; 7] {
        let [_, rest @ ..] = self.index_and_placeholder_keys();
        rest
    }

    pub async fn record_beat(&self, beat: Beat) -> EngineResult<AgentRecord> {
        let batcher = self.beat_batcher.get_or_init(|| BeatBatcher::start(self));
        let (reply, answer) = oneshot::channel();
        let pending = PendingBeat {
            beat,
            queued: Instant::now(),
            reply,
        };
        let stopped = || EngineError::Unavailable("heartbeat writer stopped".into());
        batcher
            .queue(&pending.beat.agent_id)
            .send(pending)
            .map_err(|_| stopped())?;
        // Bounded by the writer (see `BatchWriter::apply`).
        answer.await.map_err(|_| stopped())?
    }

    pub async fn get_agent(&self, id: &Id) -> EngineResult<Option<AgentRecord>> {
        let mut records = self
            .get_agents(std::slice::from_ref(&id.to_string()))
            .await?;
        records.pop().flatten().transpose()
    }

    pub async fn delete_agent(&self, id: &Id, event: EventBody) -> EngineResult<bool> {
        let keys = self.agent_keys(id);
        let existed: i64 = self.invoke(&DELETE, &keys, &args![id, event.json]).await?;
        Ok(existed == 1)
    }

    pub async fn list_agents(
        &self,
        query: AgentQuery,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<AgentRecord>, Option<IndexCursor>)> {
        let k = &self.keys;
        let IndexRange {
            indexes,
            ascending,
            min,
            max,
        } = query.selection.index_range(now_ms);
        let indexes: Vec<String> = indexes
            .iter()
            .map(|index| match index {
                AgentIndex::Active => k.agents_active(),
                AgentIndex::Finished => k.agents_finished(),
                AgentIndex::LateDue => k.agents_late_due(),
                AgentIndex::Down => k.agents_down(),
            })
            .collect();
        let mut out = Vec::with_capacity(limit);
        let mut position = cursor;
        // Index entries whose records expired, changed state since they were
        // read, or have another status are skipped; a few more rounds fill
        // the page, and the cursor marks the last entry examined.
        for _ in 0..LISTING_ROUNDS {
            let want = limit - out.len() + 1;
            let mut entries = Vec::with_capacity(want * indexes.len());
            for index in &indexes {
                entries.extend(
                    self.index_range(index, ascending, min, max, position.as_ref(), want)
                        .await?,
                );
            }
            if indexes.len() > 1 {
                // In index order: by score, then member (both reversed
                // when descending), as the cursor expects.
                entries.sort_unstable_by(|(m1, s1), (m2, s2)| {
                    let order = (s1, m1).cmp(&(s2, m2));
                    if ascending { order } else { order.reverse() }
                });
                entries.truncate(want);
            }
            let more = entries.len() == want;
            let take: Vec<(String, i64)> = entries.into_iter().take(limit - out.len()).collect();
            let ids: Vec<String> = take.iter().map(|(m, _)| m.clone()).collect();
            let records = self.get_agents(&ids).await?;
            for ((member, score), record) in take.iter().zip(records) {
                position = Some(IndexCursor {
                    score: *score,
                    member: member.clone(),
                });
                let record = record.and_then(|r| readable("agent", r));
                if let Some(r) = record.filter(|r| query.admits(r, now_ms)) {
                    out.push(r);
                }
            }
            if !more {
                return Ok((out, None));
            }
            if out.len() >= limit {
                return Ok((out, position));
            }
        }
        Ok((out, position))
    }

    /// Up to `count` `(member, score)` pairs of `index` within `[min, max]`,
    /// after `cursor`, in the given direction.
    async fn index_range(
        &self,
        index: &str,
        ascending: bool,
        min: i64,
        max: i64,
        cursor: Option<&IndexCursor>,
        count: usize,
    ) -> EngineResult<Vec<(String, i64)>> {
        let bound = |v: i64, inf: &str| {
            if v == i64::MIN || v == i64::MAX {
                inf.to_owned()
            } else {
                v.to_string()
            }
        };
        let (mut lo, mut hi) = (bound(min, "-inf"), bound(max, "+inf"));
        // Resume at the cursor's score (inclusive) and drop the members
        // already returned with that same score.
        let mut skip_ties = None;
        if let Some(c) = cursor {
            if ascending {
                lo = c.score.to_string()
            } else {
                hi = c.score.to_string()
            }
            skip_ties = Some(c);
        }
        let mut conn = self.conn();
        let mut fetched = 0usize;
        let mut out = Vec::with_capacity(count);
        loop {
            let batch = count + 64;
            let mut cmd = if ascending {
                let mut c = redis::cmd("ZRANGEBYSCORE");
                c.arg(index).arg(&lo).arg(&hi);
                c
            } else {
                let mut c = redis::cmd("ZREVRANGEBYSCORE");
                c.arg(index).arg(&hi).arg(&lo);
                c
            };
            cmd.arg("WITHSCORES").arg("LIMIT").arg(fetched).arg(batch);
            let entries: Vec<(String, f64)> = self.run(cmd.query_async(&mut conn)).await?;
            let n = entries.len();
            fetched += n;
            for (member, score) in entries {
                let score = score as i64;
                if let Some(c) = skip_ties {
                    // Within a score Redis orders members lexicographically
                    // (reversed for REV ranges).
                    let seen = score == c.score
                        && if ascending {
                            member.as_str() <= c.member.as_str()
                        } else {
                            member.as_str() >= c.member.as_str()
                        };
                    if seen {
                        continue;
                    }
                }
                out.push((member, score));
                if out.len() == count {
                    return Ok(out);
                }
            }
            if n < batch {
                return Ok(out);
            }
        }
    }

    /// Fetches several records in one round trip; each is `None` when it
    /// does not exist and an error when it cannot be read: an index member
    /// that is not an agent id, a key of another type, a record that does
    /// not decode (Redis's own failures still fail the whole call).
    async fn get_agents(
        &self,
        ids: &[String],
    ) -> EngineResult<Vec<Option<EngineResult<AgentRecord>>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Result<Id, String>> = ids.iter().map(|id| Id::new(id.as_str())).collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in ids.iter().flatten() {
            pipe.cmd("HGETALL").arg(self.keys.agent(id));
        }
        let mut conn = self.conn();
        let replies: Vec<redis::RedisResult<Vec<String>>> =
            self.run(pipe.query_async(&mut conn)).await?;
        let mut replies = replies.into_iter();
        Ok(ids
            .into_iter()
            .map(|id| {
                let corrupt =
                    |e: String| Some(Err(EngineError::Corrupt(format!("agent record: {e}"))));
                // Only valid ids were fetched, one reply each.
                match id.map(|_| replies.next()) {
                    Err(e) => corrupt(format!("index member: {e}")),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => corrupt(e.to_string()),
                    Ok(Some(Ok(fields))) if fields.is_empty() => None,
                    Ok(Some(Ok(fields))) => Some(decode_record(&fields)),
                }
            })
            .collect())
    }

    pub async fn sweep_down_agents(&self, now_ms: i64, limit: usize) -> EngineResult<usize> {
        let keys = self.index_and_placeholder_keys();
        let record_prefix = self.keys.sub("agent:");
        let claimed: i64 = self
            .invoke(
                &SWEEP_DOWN,
                &keys,
                &args![now_ms, limit, record_prefix, rfc3339(from_millis(now_ms))],
            )
            .await?;
        Ok(claimed as usize)
    }

    pub async fn prune_agents(&self, now_ms: i64, retention: Duration) -> EngineResult<()> {
        let keys = self.index_and_placeholder_keys();
        let agent_cutoff = now_ms - retention.as_millis() as i64;
        let run_cutoff = now_ms - crate::agents::RUN_RETENTION.as_millis() as i64;
        let _: i64 = self
            .invoke(&PRUNE, &keys, &args![agent_cutoff, run_cutoff])
            .await?;
        Ok(())
    }

    pub async fn runs_since(&self, since_ms: i64) -> EngineResult<Vec<RunRecord>> {
        let mut conn = self.conn();
        let keys: Vec<String> = self
            .run(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.runs_by_start())
                    .arg(since_ms)
                    .arg("+inf")
                    .query_async(&mut conn),
            )
            .await?;
        let mut runs = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            // Bytes: one record that is not UTF-8 must not fail the rest.
            let raw: Vec<Option<Vec<u8>>> = self
                .run(
                    redis::cmd("HMGET")
                        .arg(self.keys.runs())
                        .arg(chunk)
                        .query_async(&mut conn),
                )
                .await?;
            runs.extend(raw.into_iter().flatten().filter_map(|json| {
                let run = serde_json::from_slice(&json)
                    .map_err(|e| EngineError::Corrupt(format!("run record: {e}")));
                readable("run", run)
            }));
        }
        Ok(runs)
    }

    pub async fn agent_state_counts(&self, now_ms: i64) -> EngineResult<[(AgentState, u64); 4]> {
        let k = &self.keys;
        let mut pipe = redis::pipe();
        pipe.cmd("ZCOUNT")
            .arg(k.agents_late_due())
            .arg(now_ms)
            .arg("+inf");
        pipe.cmd("ZCOUNT")
            .arg(k.agents_late_due())
            .arg("-inf")
            .arg(format!("({now_ms}"));
        pipe.cmd("ZCARD").arg(k.agents_down());
        pipe.cmd("ZCARD").arg(k.agents_finished());
        let mut conn = self.conn();
        let (up, late, down, finished): (u64, u64, u64, u64) =
            self.run(pipe.query_async(&mut conn)).await?;
        Ok([
            (AgentState::Up, up),
            (AgentState::Late, late),
            (AgentState::Down, down),
            (AgentState::Finished, finished),
        ])
    }
}

/// Decodes an `HGETALL` reply into a record.
fn decode_record(fields: &[String]) -> EngineResult<AgentRecord> {
    let corrupt = |what: &str| EngineError::Corrupt(format!("agent record: {what}"));
    let get = crate::engine::redis::hash_fields(fields);
    let json = |name: &str| record_json(name, get.get(name).copied());
    let stored = decode_stored(
        get.get("metadata").copied(),
        get.get("display_name").copied(),
        get.get("run_id").copied(),
    )?;
    let int = |name: &str| -> EngineResult<i64> {
        get.get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt(name))
    };
    Ok(AgentRecord {
        agent_id: get
            .get("agent_id")
            .and_then(|v| Id::new(*v).ok())
            .ok_or_else(|| corrupt("agent_id"))?,
        display_name: stored.display_name,
        status: get
            .get("status")
            .and_then(|s| AgentStatus::parse(s))
            .ok_or_else(|| corrupt("status"))?,
        progress: json("progress")?.as_f64(),
        current_task: json("current_task")?.as_str().map(str::to_owned),
        metadata: stored.metadata,
        run_id: stored.run_id,
        last_beat_ms: int("last_beat")?,
        ttl_seconds: int("ttl")? as u64,
        grace_seconds: int("grace")? as u64,
        down: get.get("down") == Some(&"1"),
    })
}
