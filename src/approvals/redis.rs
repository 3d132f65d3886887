//! Approvals on Redis: one hash per request plus indexes, and one Lua
//! script per transition.
//!
//! Why scripts: a transition must check the status, change it, move index
//! entries and append its event with nothing in between — otherwise two
//! approvers (or an approver and a sweeper on another replica) could both
//! see `pending` and both win. A script runs atomically on the server, and
//! unlike WATCH/MULTI it is safe on the shared multiplexed connection.
//!
//! Layout (see [`crate::engine::keys`]): the request hash holds `request`
//! (the request as JSON, written by Rust and never decoded by Lua; its
//! `status` is superseded by the hash's own `status` field), `status`,
//! `response` (JSON, once settled), `deadline_ms`, `agent_id`, and the
//! prepared `timeout_response` and `expired_event`. Listing indexes hold
//! every member with score 0, so they are ordered by the UUIDv7 request
//! id, that is by creation time, and a page resumes after an id with
//! `ZRANGEBYLEX` — no ties, no offsets. The deadline index is scored by
//! `expires_at` and the purge index by the end of retention.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use uuid::Uuid;

use crate::approvals::{
    Approval, ApprovalRequest, ApprovalResponse, ApprovalStatus, Created, NewApproval, Settled,
    Settlement,
};
use crate::engine::redis::{RedisEngine, args, readable, script};
use crate::engine::{EngineError, EngineResult};

/// Shared by every approval script.
///
/// KEYS: 2 request hash, 3 deadlines, 4 all, 5 purge-due, 6–10 the status
/// indexes (pending, approved, rejected, timeout, cancelled), 11 the
/// idempotency key (creation only; a placeholder otherwise).
///
/// `settle` moves a pending request to its final status: the record, its
/// retention (and that of the idempotency key that created it), every
/// index and the event, in one step. `expire` settles with the prepared
/// timeout response and `approval.expired` event.
const PRELUDE: &str = r#"
local STATUS_INDEX = { pending = KEYS[6], approved = KEYS[7], rejected = KEYS[8],
  timeout = KEYS[9], cancelled = KEYS[10] }
local function settle(rec, id, status, response, kind, event, now, retention)
  local f = redis.call('HMGET', rec, 'agent_id', 'idempotency_key')
  redis.call('HSET', rec, 'status', status, 'response', response)
  redis.call('PEXPIRE', rec, retention)
  if f[2] then redis.call('PEXPIRE', f[2], retention) end
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZADD', STATUS_INDEX[status], 0, id)
  redis.call('ZADD', KEYS[5], now + retention, id)
  emit(kind, f[1], 'approval:' .. id, event)
end
local function expire(rec, id, now, retention)
  local f = redis.call('HMGET', rec, 'timeout_response', 'expired_event')
  settle(rec, id, 'timeout', f[1], 'approval.expired', f[2], now, retention)
end
"#;

fn approval_script(body: &str) -> Script {
    script(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: 2 id, 3 deadline ms, 4 lifetime ms, 5 agent id, 6 request JSON,
/// 7 timeout response JSON, 8 expired event, 9 requested event,
/// 10 body fingerprint or '' (no idempotency key), 11 request hash prefix.
/// Returns `{'created'}`, `{'reused'}` or `{'existing', <HGETALL…>}`.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    approval_script(
        r#"
local rec, id = KEYS[2], ARGV[2]
if ARGV[10] ~= '' then
  local previous = redis.call('GET', KEYS[11])
  if previous then
    local sep = string.find(previous, ' ', 1, true)
    if string.sub(previous, 1, sep - 1) ~= ARGV[10] then return {'reused'} end
    local fields = redis.call('HGETALL', ARGV[11] .. string.sub(previous, sep + 1))
    if #fields > 0 then
      table.insert(fields, 1, 'existing')
      return fields
    end
  end
  redis.call('SET', KEYS[11], ARGV[10] .. ' ' .. id, 'PX', ARGV[4])
  redis.call('HSET', rec, 'idempotency_key', KEYS[11])
end
redis.call('HSET', rec, 'request', ARGV[6], 'status', 'pending', 'deadline_ms', ARGV[3],
  'agent_id', ARGV[5], 'timeout_response', ARGV[7], 'expired_event', ARGV[8])
redis.call('PEXPIRE', rec, ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], id)
redis.call('ZADD', KEYS[4], 0, id)
redis.call('ZADD', KEYS[6], 0, id)
emit('approval.requested', ARGV[5], 'approval:' .. id, ARGV[9])
return {'created'}
"#,
    )
});

/// A decision or cancellation. The deadline is checked here, with the
/// status, so a late decision loses to the timeout even when no sweeper
/// has run yet: it applies the timeout itself.
/// ARGV: 2 id, 3 now ms, 4 status, 5 response JSON, 6 event type, 7 event,
/// 8 retention ms. Returns `{'missing'}` or `{'won'|'lost', <HGETALL…>}`.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    approval_script(
        r#"
local rec, id = KEYS[2], ARGV[2]
local now, retention = tonumber(ARGV[3]), tonumber(ARGV[8])
local f = redis.call('HMGET', rec, 'status', 'deadline_ms')
if not f[1] then return {'missing'} end
local outcome = 'lost'
if f[1] == 'pending' then
  if now >= tonumber(f[2]) then
    expire(rec, id, now, retention)
  else
    settle(rec, id, ARGV[4], ARGV[5], ARGV[6], ARGV[7], now, retention)
    outcome = 'won'
  end
end
local fields = redis.call('HGETALL', rec)
table.insert(fields, 1, outcome)
return fields
"#,
    )
});

/// Times out due requests. Removing an id from the deadline index is the
/// claim: of several replicas' sweepers (and late decisions), exactly one
/// removes it, and only that one applies the timeout and emits the event.
/// ARGV: 2 now ms, 3 limit, 4 request hash prefix, 5 retention ms.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    approval_script(
        r#"
local now, retention = tonumber(ARGV[2]), tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  if redis.call('ZREM', KEYS[3], id) == 1 then
    local rec = ARGV[4] .. id
    if redis.call('HGET', rec, 'status') == 'pending' then
      expire(rec, id, now, retention)
    else
      -- The record expired first (its backstop lifetime passed with no
      -- sweeper running anywhere): only index entries are left to drop.
      redis.call('ZREM', KEYS[4], id)
      redis.call('ZREM', KEYS[6], id)
    end
  end
end
return #due
"#,
    )
});

/// Drops settled requests past their retention from every index (and the
/// record itself, should its expiry not have fired yet).
/// ARGV: 2 now ms, 3 request hash prefix.
static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    approval_script(
        r#"
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[2], 'LIMIT', 0, 10000)
for _, id in ipairs(old) do
  for i = 4, 10 do redis.call('ZREM', KEYS[i], id) end
  redis.call('DEL', ARGV[3] .. id)
end
return #old
"#,
    )
});

impl RedisEngine {
    /// The keys of the approval scripts, in the order of [`PRELUDE`].
    fn approval_keys(&self, id: Uuid, idempotency: Option<&str>) -> Vec<String> {
        let k = &self.keys;
        let mut keys = vec![
            k.approval(&id),
            k.approvals_deadlines(),
            k.approvals_all(),
            k.approvals_purge_due(),
        ];
        keys.extend(ApprovalStatus::ALL.map(|s| k.approvals_by_status(s.as_str())));
        keys.push(k.approval_idempotency(idempotency.unwrap_or("none")));
        keys
    }

    async fn invoke_approval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        id: Uuid,
        idempotency: Option<&str>,
        args: &[String],
    ) -> EngineResult<T> {
        let keys = self.approval_keys(id, idempotency);
        self.invoke(script, &keys, args).await
    }

    fn approval_prefix(&self) -> String {
        self.keys.sub("approval:")
    }

    pub async fn create_approval(&self, new: NewApproval) -> EngineResult<Created> {
        let id = new.approval.id();
        let reply: Vec<String> = self
            .invoke_approval(
                &CREATE,
                id,
                new.idempotency.as_ref().map(|c| c.key.as_str()),
                &args![
                    id,
                    new.approval.deadline_ms(),
                    new.lifetime.as_millis(),
                    new.approval.request.agent_id,
                    to_json(&new.approval.request)?,
                    to_json(&new.timeout_response)?,
                    new.expired_event.json,
                    new.requested_event.json,
                    new.idempotency
                        .as_ref()
                        .map(|c| c.fingerprint.clone())
                        .unwrap_or_default(),
                    self.approval_prefix(),
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("created") => Ok(Created::New(new.approval)),
            Some("reused") => Ok(Created::KeyReused),
            Some("existing") => decode(&reply[1..]).map(Created::Existing),
            _ => Err(EngineError::Corrupt(format!(
                "unexpected reply to approval creation: {reply:?}"
            ))),
        }
    }

    pub async fn get_approval(&self, id: Uuid) -> EngineResult<Option<Approval>> {
        let mut conn = self.conn();
        let fields: Vec<String> = self
            .run(
                redis::cmd("HGETALL")
                    .arg(self.keys.approval(&id))
                    .query_async(&mut conn),
            )
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(&fields).map(Some)
    }

    pub async fn settle_approval(&self, s: Settlement) -> EngineResult<Settled> {
        let response = to_json(&s.response)?;
        let reply: Vec<String> = self
            .invoke_approval(
                &SETTLE,
                s.request_id,
                None,
                &args![
                    s.request_id,
                    s.now_ms,
                    s.status.as_str(),
                    response,
                    s.event.kind,
                    s.event.json,
                    s.retention.as_millis(),
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("missing") => Ok(Settled::Missing),
            Some("won") => decode(&reply[1..]).map(Settled::Won),
            Some("lost") => decode(&reply[1..]).map(Settled::Lost),
            _ => Err(EngineError::Corrupt(format!(
                "unexpected reply to an approval decision: {reply:?}"
            ))),
        }
    }

    pub async fn approval_page(
        &self,
        status: Option<ApprovalStatus>,
        after: Option<Uuid>,
        count: usize,
    ) -> EngineResult<Vec<(Uuid, Option<Approval>)>> {
        let index = match status {
            None => self.keys.approvals_all(),
            Some(s) => self.keys.approvals_by_status(s.as_str()),
        };
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let mut conn = self.conn();
        let members: Vec<String> = self
            .run(
                redis::cmd("ZRANGEBYLEX")
                    .arg(&index)
                    .arg(start)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count)
                    .query_async(&mut conn),
            )
            .await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let ids = members
            .iter()
            .map(|m| {
                Uuid::parse_str(m)
                    .map_err(|_| EngineError::Corrupt(format!("approval index member {m:?}")))
            })
            .collect::<EngineResult<Vec<Uuid>>>()?;
        // Each reply on its own: a key of another type, or a record that is
        // not UTF-8, is one unreadable record, not a failed page.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.keys.approval(id));
        }
        let replies: Vec<redis::RedisResult<Vec<String>>> =
            self.run(pipe.query_async(&mut conn)).await?;
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|(id, reply)| {
                let approval = match reply {
                    Ok(fields) if fields.is_empty() => None,
                    Ok(fields) => readable("approval", decode(&fields)),
                    Err(err) => readable(
                        "approval",
                        Err(EngineError::Corrupt(format!("approval record: {err}"))),
                    ),
                };
                (id, approval)
            })
            .collect())
    }

    pub async fn sweep_expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
        retention: Duration,
    ) -> EngineResult<usize> {
        let args = args![now_ms, limit, self.approval_prefix(), retention.as_millis()];
        let claimed: i64 = self
            .invoke_approval(&SWEEP, Uuid::nil(), None, &args)
            .await?;
        Ok(claimed as usize)
    }

    pub async fn prune_approvals(&self, now_ms: i64) -> EngineResult<()> {
        let args = args![now_ms, self.approval_prefix()];
        let _: i64 = self
            .invoke_approval(&PRUNE, Uuid::nil(), None, &args)
            .await?;
        Ok(())
    }

    pub async fn pending_approval_count(&self) -> EngineResult<u64> {
        let mut conn = self.conn();
        self.run(
            redis::cmd("ZCARD")
                .arg(
                    self.keys
                        .approvals_by_status(ApprovalStatus::Pending.as_str()),
                )
                .query_async(&mut conn),
        )
        .await
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> EngineResult<String> {
    serde_json::to_string(value).map_err(|e| EngineError::Corrupt(format!("approval JSON: {e}")))
}

/// Decodes an `HGETALL` reply into a request and its response.
fn decode(fields: &[String]) -> EngineResult<Approval> {
    let corrupt = |what: &str| EngineError::Corrupt(format!("approval record: {what}"));
    let map = crate::engine::redis::hash_fields(fields);
    let mut request: ApprovalRequest = map
        .get("request")
        .and_then(|raw| serde_json::from_str(raw).ok())
        .ok_or_else(|| corrupt("request"))?;
    request.status = map
        .get("status")
        .and_then(|s| ApprovalStatus::parse(s))
        .ok_or_else(|| corrupt("status"))?;
    let response: Option<ApprovalResponse> = match map.get("response") {
        Some(raw) => Some(serde_json::from_str(raw).map_err(|_| corrupt("response"))?),
        None => None,
    };
    Ok(Approval { request, response })
}
