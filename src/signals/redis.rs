//! Signals on Redis: one hash per signal, sorted-set indexes, key expiry.
//!
//! Every stored piece expires by itself: a signal's hash and its broadcast
//! consumption markers at the signal's expiry (`PEXPIREAT`), each index key
//! with the last signal it holds. Expired members of indexes that are still
//! alive are dropped lazily: every signal script first takes what is due
//! from the expiry queue ([`Keys::signals_expiry`]) and removes it from
//! every index, and reads skip anything past its expiry in any case. No
//! sweeper is needed for correctness.
//!
//! An inbox read merges the agent's targeted set with the broadcasts, which
//! every agent shares; the agent's watermark for the read's filters
//! ([`Keys::broadcasts_seen`]) lets the walk start past the broadcasts
//! already settled for it, so a read costs what arrived since rather than
//! every live broadcast.
//!
//! Each operation is one Lua script. Reading with `consume=true` must be:
//! read and remove in two commands would let two concurrent consumers both
//! receive the same targeted signal, or one agent the same broadcast twice.
//! Sending is one script so that the signal and its `signal.sent` event (the
//! long-poll wake-up) are written together.
//!
//! The scripts reach the hashes of the signals they read and the inboxes of
//! the expired signals they prune by key prefix rather than as declared
//! keys; every key shares the deployment's hash tag, so they live in the
//! slot of the declared keys.
//!
//! [`Keys::signals_expiry`]: crate::engine::keys::Keys::signals_expiry
//! [`Keys::broadcasts_seen`]: crate::engine::keys::Keys::broadcasts_seen

use std::sync::LazyLock;

use redis::Script;

use crate::agents::IndexCursor;
use crate::engine::redis::{RedisEngine, args, script};
use crate::engine::{EngineError, EngineResult};
use crate::events::EventBody;
use crate::signals::{
    InboxAnswer, InboxQuery, LIST_SCAN_BUDGET, RECEIPT_TTL, Signal, SignalFilter, SignalRecord,
    live_only,
};
use crate::types::Id;

/// Shared by every signal script.
///
/// KEYS: 2 all signals, 3 expiry queue, 4 broadcasts, 5 the inbox the
/// operation is about (the broadcast set when there is none).
/// ARGV: 2 now ms, 3 signal key prefix, 4 inbox key prefix; a script's own
/// arguments start at 5.
const PRELUDE: &str = r#"
local ALL, EXPIRY, BROADCAST, INBOX = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local NOW, SIG, INBOXES = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local BATCH = 100

-- Moves a key's expiry out to `at`; never brings it closer.
local function extend(key, at)
  local current = redis.call('PEXPIRETIME', key)
  if current ~= -2 and current < at then redis.call('PEXPIREAT', key, at) end
end

-- Removes a signal from storage and every index ('' target: a broadcast).
local function drop(id, target)
  redis.call('ZREM', ALL, id)
  if target == '' then
    redis.call('ZREM', BROADCAST, id)
    redis.call('ZREM', EXPIRY, id)
  else
    redis.call('ZREM', INBOXES .. target, id)
    redis.call('ZREM', EXPIRY, id .. '/' .. target)
  end
  redis.call('DEL', SIG .. id, SIG .. id .. ':consumed')
end

-- Drops up to `budget` signals whose expiry has passed.
local function prune(budget)
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', NOW, 'LIMIT', 0, budget)
  for _, member in ipairs(due) do
    local slash = string.find(member, '/', 1, true)
    if slash then
      drop(string.sub(member, 1, slash - 1), string.sub(member, slash + 1))
    else
      drop(member, '')
    end
  end
end

-- Byte order of strings (Lua's `<` follows the server's locale).
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- Index order: entries are { id, score, score as sent by Redis }.
local function earlier(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return bytes_before(a[1], b[1])
end

-- Reads a sorted set in order, a batch at a time; with `after` (an entry),
-- only what comes after it, preceded by the entries of `first` (in order,
-- each before `after`).
local function reader(key, after, first)
  local buf = {}
  for j, entry in ipairs(first or {}) do buf[j] = entry end
  return { key = key, buf = buf, i = 1, offset = nil, eof = false, after = after }
end

local function head(r)
  if not r.offset then
    -- From the first entry of `after`'s score, by rank: a rank finds its
    -- entry at once, where an offset into a score range is walked.
    r.offset = r.after and redis.call('ZCOUNT', r.key, '-inf', '(' .. r.after[3]) or 0
  end
  while r.i > #r.buf and not r.eof do
    local got = redis.call('ZRANGE', r.key, r.offset, r.offset + BATCH - 1, 'WITHSCORES')
    r.buf, r.i = {}, 1
    for j = 1, #got, 2 do
      local entry = { got[j], tonumber(got[j + 1]), got[j + 1] }
      if not r.after or earlier(r.after, entry) then r.buf[#r.buf + 1] = entry end
    end
    r.offset = r.offset + #got / 2
    r.eof = #got < 2 * BATCH
  end
  return r.buf[r.i]
end

-- An index entry written as `<score> <id>` (`entry_text`), or nil for
-- anything else, such as a score in ms that has not come yet: then a walk
-- starts at the beginning.
local function parse_entry(text)
  local digits = type(text) == 'string' and string.match(text, '^(%d+) ')
  if digits and #digits < 16 and tonumber(digits) <= NOW then
    return { string.sub(text, #digits + 2), tonumber(digits), digits }
  end
end

-- A paging cursor's position (`<score> <id>`), whatever its score: a
-- signal from a replica whose clock runs ahead may be the last of a page.
local function parse_position(text)
  local digits = string.match(text, '^(%d+) ')
  if digits and #digits < 16 then
    return { string.sub(text, #digits + 2), tonumber(digits), digits }
  end
end

local function entry_text(entry)
  return entry[3] .. ' ' .. entry[1]
end

-- Most broadcasts a watermark lists as not settled (see `watermark`).
local LISTED = 100

-- An agent's watermark over the broadcasts for one pair of filters (see
-- `Keys::broadcasts_seen`), stored at `key` as lines of `entry_text`: its
-- start, then the broadcasts up to the start that are not settled for the
-- agent and the filters (matches it has not consumed: reads that do not
-- consume leave them), at most LISTED, oldest first. Every other broadcast
-- up to the start is settled: consumed, expired, or not matching. Walks go
-- over the listed ones (`w.listed`), then past the start (`w.start`).
-- While a walk passes broadcasts in order, `settle` records whether each is
-- settled; `save` then moves the start to the last of an unbroken run of
-- broadcasts that are settled or still fit in the list, and lists the
-- unsettled ones. The start never covers a broadcast created after
-- `horizon` (ms): one sent by a replica whose clock is a little behind may
-- still arrive with an earlier score. A value that does not parse as a
-- whole is passed over: the walk starts at the first broadcast.
local function watermark(key, horizon)
  local w = { key = key, horizon = horizon, open = true, listed = {}, kept = {}, passed = 0 }
  local text = redis.pcall('GET', key)
  if type(text) ~= 'string' then return w end
  local start, listed = nil, {}
  for line in string.gmatch(text, '[^\n]+') do
    local entry = parse_entry(line)
    if not entry then return w end
    if not start then
      start = entry
    elseif earlier(start, entry) or (#listed > 0 and not earlier(listed[#listed], entry))
        or #listed == LISTED then
      return w
    else
      listed[#listed + 1] = entry
    end
  end
  w.start, w.listed = start, listed
  return w
end

local function settle(w, entry, settled)
  if w.start and not earlier(w.start, entry) then
    -- A listed one: they come first, in order.
    w.passed = w.passed + 1
    if not settled then w.kept[#w.kept + 1] = entry end
  elseif w.open and entry[2] < w.horizon and (settled or #w.kept < LISTED) then
    if not settled then w.kept[#w.kept + 1] = entry end
    w.last = entry
  else
    w.open = false
  end
end

local function save(w, lifetime)
  -- Listed ones the walk did not reach stay listed (the walk passed no
  -- broadcast after the start then).
  for j = w.passed + 1, #w.listed do w.kept[#w.kept + 1] = w.listed[j] end
  if not w.last and #w.kept == #w.listed then return end
  local lines = { entry_text(w.last or w.start) }
  for _, entry in ipairs(w.kept) do lines[#lines + 1] = entry_text(entry) end
  redis.call('SET', w.key, table.concat(lines, '\n'), 'PX', lifetime)
end
"#;

fn signal_script(body: &str) -> Script {
    script(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: 5 id, 6 target ('' for a broadcast), 7 type, 8 source, 9 created
/// ms, 10 expires ms, 11 signal JSON, 12 event, 13 wake-up key.
static SEND: LazyLock<Script> = LazyLock::new(|| {
    signal_script(
        r#"
prune(BATCH)
local id, target, created, expires = ARGV[5], ARGV[6], ARGV[9], tonumber(ARGV[10])
local body = SIG .. id
redis.call('HSET', body, 'type', ARGV[7], 'source', ARGV[8], 'target', target,
  'created', created, 'expires', ARGV[10], 'json', ARGV[11])
redis.call('PEXPIREAT', body, expires)
local index, member = BROADCAST, id
if target ~= '' then index, member = INBOX, id .. '/' .. target end
redis.call('ZADD', ALL, created, id)
redis.call('ZADD', index, created, id)
redis.call('ZADD', EXPIRY, expires, member)
for _, key in ipairs({ ALL, index, EXPIRY }) do extend(key, expires) end
emit('signal.sent', ARGV[8], ARGV[13], ARGV[12])
return 1
"#,
    )
});

/// Reads (and with `consume`, takes) an inbox: the targeted set and the
/// broadcasts, merged oldest first. ARGV: 5 agent, 6 type or '', 7 source
/// or '', 8 limit, 9 consume (0/1), 10 receipt key or '', 11 the query's
/// fingerprint, 12 receipt lifetime (ms), 13 the agent's watermark key, 14
/// its horizon (ms), 15 its lifetime (ms), 16 most broadcasts to walk in
/// one call (a consuming read: without a find), 17 where to resume the
/// targeted signals (`<score> <id>`, or ''), 18 a page's start: only what
/// comes after it is returned (`<score> <id>`, or ''; reads that do not
/// consume). Returns `{ 'read', signals' JSON }`, `{ 'again', signals'
/// JSON }` for an answer kept under the receipt key, `{ 'reused', {} }` when the key holds another query's
/// answer, or `{ 'more', { resume } }` when it stopped after walking that
/// many broadcasts, each settled for the agent or listed with the
/// watermark, and moved the watermark past them: the same call with
/// `resume` goes on from there (the targeted signals up to it matched
/// nothing).
///
/// A consuming read with a receipt key first looks for an answer kept under
/// it (a retry) and returns that; otherwise it keeps what it takes there,
/// in the same step that takes it. A kept answer that cannot be read (not
/// written by this script) is dropped, and the read goes on as a new one.
static READ: LazyLock<Script> = LazyLock::new(|| {
    signal_script(
        r#"
local receipt, fingerprint = ARGV[10], ARGV[11]
if receipt ~= '' then
  local kept = redis.pcall('GET', receipt)
  local newline = type(kept) == 'string' and string.find(kept, '\n', 1, true)
  if newline then
    if string.sub(kept, 1, newline - 1) ~= fingerprint then return { 'reused', {} } end
    local ok, signals = pcall(cjson.decode, string.sub(kept, newline + 1))
    if ok and type(signals) == 'table' then return { 'again', signals } end
  end
  if kept then redis.call('DEL', receipt) end
end
prune(10 * BATCH)
local agent, want_type, want_source = ARGV[5], ARGV[6], ARGV[7]
local limit, consume = tonumber(ARGV[8]), ARGV[9] == '1'
local seen = watermark(ARGV[13], tonumber(ARGV[14]))
-- A call after `more` goes on past the targeted signals walked before;
-- a page starts past its cursor.
local resume = parse_entry(ARGV[17])
local after = parse_position(ARGV[18])
if after and (not resume or earlier(resume, after)) then resume = after end
-- A page whose cursor lies past the watermark starts its broadcasts at
-- the cursor, by rank, rather than walking everything before it; it
-- leaves the watermark as it is (it did not look at what lies between).
local jump = after and (not seen.start or earlier(seen.start, after))
local targeted, broadcasts = reader(INBOX, resume), nil
if jump then
  broadcasts = reader(BROADCAST, after)
else
  broadcasts = reader(BROADCAST, seen.start, seen.listed)
end
local out, taken, dead, walked, more = {}, {}, {}, 0, false
-- Whether a targeted signal matched: `resume` stays before it.
local found_targeted = false
while #out < limit do
  local t, b = head(targeted), head(broadcasts)
  local entry, broadcast
  if t and (not b or earlier(t, b)) then
    entry, broadcast = t, false
    targeted.i = targeted.i + 1
  elseif b then
    entry, broadcast = b, true
    broadcasts.i = broadcasts.i + 1
  else
    break
  end
  local id = entry[1]
  -- A broadcast this agent consumed is skipped before anything of it is
  -- read, and a payload (up to 64 KiB) is read only for a match: past the
  -- watermark, most broadcasts are the ones consumed in its last seconds.
  local settled = true
  if not (broadcast and redis.call('SISMEMBER', SIG .. id .. ':consumed', agent) == 1) then
    local f = redis.call('HMGET', SIG .. id, 'type', 'source', 'expires')
    if not f[3] then
      -- The hash expired (by Redis's clock) before the queue said so.
      dead[#dead + 1] = { id, broadcast and '' or agent }
    elseif tonumber(f[3]) > NOW
      and (want_type == '' or f[1] == want_type)
      and (want_source == '' or f[2] == want_source) then
      -- A broadcast an earlier page returned is still this agent's,
      -- unsettled, but not this page's.
      if not after or earlier(after, entry) then
        out[#out + 1] = redis.call('HGET', SIG .. id, 'json')
        taken[#taken + 1] = { id, broadcast, f[3] }
      end
      settled = consume
      found_targeted = found_targeted or not broadcast
    end
  end
  if not broadcast and not found_targeted then resume = entry end
  if broadcast and not jump then
    settle(seen, entry, settled)
    walked = walked + 1
    -- A long run of broadcasts, each settled for this agent or listed
    -- with the watermark: the watermark keeps the progress and the caller
    -- asks again, so that no call holds Redis for long. A consuming read
    -- splits only before it takes anything; one that does not consume
    -- finds what it found again, listed and past `resume`.
    -- Listed broadcasts it went over again do not count: only new ones
    -- are progress, so a call never ends where it started.
    if walked - seen.passed >= tonumber(ARGV[16]) and seen.open
        and (#out == 0 or not consume) then
      more = true
      break
    end
  end
end
save(seen, ARGV[15])
for _, d in ipairs(dead) do drop(d[1], d[2]) end
if consume then
  for _, x in ipairs(taken) do
    if x[2] then
      local marks = SIG .. x[1] .. ':consumed'
      redis.call('SADD', marks, agent)
      redis.call('PEXPIREAT', marks, x[3])
    else
      drop(x[1], agent)
    end
  end
  if receipt ~= '' and #out > 0 then
    redis.call('SET', receipt, fingerprint .. '\n' .. cjson.encode(out), 'PX', ARGV[12])
  end
end
if more then return { 'more', { resume and entry_text(resume) or '' } } end
return { 'read', out }
"#,
    )
});

/// One page of live signals from `INBOX` (a `target` filter) or `ALL`.
/// ARGV: 5 type or '', 6 source or '', 7 target or '', 8 limit, 9 cursor
/// score or '', 10 cursor member, 11 most entries to examine. Returns
/// `{ signals' JSON, next score or '', next member or '' }`.
static LIST: LazyLock<Script> = LazyLock::new(|| {
    signal_script(
        r#"
prune(10 * BATCH)
local want_type, want_source = ARGV[5], ARGV[6]
local limit, budget = tonumber(ARGV[8]), tonumber(ARGV[11])
local index = ALL
if ARGV[7] ~= '' then index = INBOX end
local after, min = nil, '-inf'
if ARGV[9] ~= '' then after, min = { ARGV[10], tonumber(ARGV[9]) }, ARGV[9] end
local out, last, examined, offset = {}, nil, 0, 0
while true do
  local got = redis.call('ZRANGEBYSCORE', index, min, '+inf', 'WITHSCORES', 'LIMIT', offset, BATCH)
  offset = offset + #got / 2
  for j = 1, #got, 2 do
    local entry = { got[j], tonumber(got[j + 1]), got[j + 1] }
    if not after or earlier(after, entry) then
      local f = redis.call('HMGET', SIG .. entry[1], 'type', 'source', 'expires', 'json')
      if f[4] and tonumber(f[3]) > NOW
        and (want_type == '' or f[1] == want_type)
        and (want_source == '' or f[2] == want_source) then
        if #out == limit then return { out, last[3], last[1] } end
        out[#out + 1] = f[4]
        last = entry
      end
      examined = examined + 1
      if examined >= budget then
        -- A long run of non-matching entries: a short page that resumes here.
        return { out, entry[3], entry[1] }
      end
    end
  end
  if #got < 2 * BATCH then return { out, '', '' } end
end
"#,
    )
});

/// Clears an inbox: deletes its targeted signals and marks its broadcasts
/// consumed for this agent. ARGV: 5 agent, 6 type or '', 7 event, 8–10 the
/// agent's watermark as in [`READ`], 11 most broadcasts to walk, 12 how
/// many signals the earlier calls of this clear took out, or '' for the
/// first call (which also deletes the targeted signals). Returns
/// `{ 'cleared', n }`, n counting the earlier calls' too, or
/// `{ 'more', n }` when it stopped after walking that many broadcasts and
/// moved the watermark past them: the same call with n goes on from there.
static CLEAR: LazyLock<Script> = LazyLock::new(|| {
    signal_script(
        r#"
prune(10 * BATCH)
local agent, want_type = ARGV[5], ARGV[6]
local cleared = tonumber(ARGV[12]) or 0
if ARGV[12] == '' then
  local drops = {}
  for _, id in ipairs(redis.call('ZRANGE', INBOX, 0, -1)) do
    local f = redis.call('HMGET', SIG .. id, 'type', 'expires')
    if not f[2] then
      drops[#drops + 1] = id
    elseif tonumber(f[2]) > NOW and (want_type == '' or f[1] == want_type) then
      drops[#drops + 1] = id
      cleared = cleared + 1
    end
  end
  for _, id in ipairs(drops) do drop(id, agent) end
end
local seen = watermark(ARGV[8], tonumber(ARGV[9]))
local broadcasts = reader(BROADCAST, seen.start, seen.listed)
local walked = 0
for entry in function() return head(broadcasts) end do
  broadcasts.i = broadcasts.i + 1
  local f = redis.call('HMGET', SIG .. entry[1], 'type', 'expires')
  local live = f[2] and tonumber(f[2]) > NOW
  local settled = true
  if live and (want_type == '' or f[1] == want_type) then
    if entry[2] > NOW then
      -- Sent after the clear's moment (NOW is the same in all its calls),
      -- as targeted signals sent after its first call are: left alone.
      settled = false
    else
      local marks = SIG .. entry[1] .. ':consumed'
      if redis.call('SADD', marks, agent) == 1 then
        redis.call('PEXPIREAT', marks, f[2])
        cleared = cleared + 1
      end
    end
  end
  settle(seen, entry, settled)
  walked = walked + 1
  -- As in READ: the watermark keeps the progress, and the caller asks again.
  if walked >= tonumber(ARGV[11]) and seen.open then
    save(seen, ARGV[10])
    return { 'more', cleared }
  end
end
save(seen, ARGV[10])
if cleared > 0 then emit('signal.cleared', agent, '', ARGV[7]) end
return { 'cleared', cleared }
"#,
    )
});

/// How far an agent's broadcast watermark stays behind the reading
/// replica's clock (see [`Keys::broadcasts_seen`]), on top of the Redis
/// timeout (a send's score is taken before its call, which may take that
/// long): a broadcast is indexed by its sender's clock, so a sender this
/// much behind could otherwise index one where the walk no longer looks.
/// Broadcasts of the last ten seconds or so are walked on every read
/// instead.
///
/// [`Keys::broadcasts_seen`]: crate::engine::keys::Keys::broadcasts_seen
const SEEN_MARGIN_MS: i64 = 10_000;
/// How long a watermark is kept after its last move: the longest a signal
/// lives, after which every broadcast it covers has expired.
const SEEN_LIFETIME_MS: u64 = 86_400_000;
/// Most broadcasts one inbox read script walks (a consuming read: without
/// finding anything), and one clear script walks (the first read or clear
/// with a new filter walks every live broadcast): a few milliseconds of
/// Redis per call, and the read or clear calls again until done.
const INBOX_WALK: usize = 1_000;

impl RedisEngine {
    /// KEYS 2–5 of every signal script; `inbox` is the agent the operation
    /// is about, if any.
    fn signal_keys(&self, inbox: Option<&Id>) -> [String; 4] {
        let k = &self.keys;
        [
            k.signals_all(),
            k.signals_expiry(),
            k.signals_broadcast(),
            inbox.map_or_else(|| k.signals_broadcast(), |agent| k.inbox(agent)),
        ]
    }

    /// The newest broadcast score an agent's watermark may cover when read
    /// at `now_ms` (see [`SEEN_MARGIN_MS`]).
    fn seen_horizon(&self, now_ms: i64) -> i64 {
        let timeout = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        now_ms
            .saturating_sub(SEEN_MARGIN_MS)
            .saturating_sub(timeout)
    }

    /// ARGV 2–4 of every signal script, followed by `rest`.
    fn signal_args(&self, now_ms: i64, rest: &[String]) -> Vec<String> {
        let mut all = args![now_ms, self.keys.signal_prefix(), self.keys.inbox_prefix()].to_vec();
        all.extend_from_slice(rest);
        all
    }

    async fn invoke_signals<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        inbox: Option<&Id>,
        now_ms: i64,
        rest: &[String],
    ) -> EngineResult<T> {
        let keys = self.signal_keys(inbox);
        self.invoke(script, &keys, &self.signal_args(now_ms, rest))
            .await
    }

    pub async fn send_signal(&self, record: SignalRecord, event: EventBody) -> EngineResult<()> {
        let json = serde_json::to_string(&record.view()).expect("a signal always serializes");
        let wake = event.wake.clone().unwrap_or_default();
        let target = record.target_agent.as_ref();
        let _: i64 = self
            .invoke_signals(
                &SEND,
                target,
                record.created_ms,
                &args![
                    record.signal_id,
                    target.map(Id::to_string).unwrap_or_default(),
                    record.signal_type,
                    record.source_agent,
                    record.created_ms,
                    record.expires_ms,
                    json,
                    event.json,
                    wake,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn read_inbox(
        &self,
        agent: &Id,
        query: &InboxQuery,
        now_ms: i64,
    ) -> EngineResult<InboxAnswer> {
        let receipt = query
            .receipt()
            .map(|key| self.keys.signal_receipt(agent, key))
            .unwrap_or_default();
        let mut args = args![
            agent,
            optional(query.signal_type.as_ref()),
            optional(query.source.as_ref()),
            query.limit,
            u8::from(query.consume),
            receipt,
            query.fingerprint(),
            RECEIPT_TTL.as_millis(),
            self.keys
                .broadcasts_seen(agent, query.signal_type.as_ref(), query.source.as_ref()),
            self.seen_horizon(now_ms),
            SEEN_LIFETIME_MS,
            INBOX_WALK,
            "", // where to resume the targeted signals: from the start
            query
                .after
                .as_ref()
                .map_or(String::new(), |c| format!("{} {}", c.score, c.member)),
        ];
        // Each `more` moved the watermark past INBOX_WALK broadcasts it had
        // not listed before, so this ends.
        let (outcome, raw) = loop {
            let (outcome, mut raw): (String, Vec<String>) = self
                .invoke_signals(&READ, Some(agent), now_ms, &args)
                .await?;
            if outcome != "more" {
                break (outcome, raw);
            }
            let resume_at = args.len() - 2;
            if let (Some(resume), Some(arg)) = (raw.pop(), args.get_mut(resume_at)) {
                *arg = resume;
            }
        };
        let signals = || {
            raw.iter()
                .map(|json| decode(json))
                .collect::<EngineResult<Vec<_>>>()
        };
        match outcome.as_str() {
            "read" => signals().map(InboxAnswer::Signals),
            "again" => signals().map(|s| InboxAnswer::Signals(live_only(s, now_ms))),
            "reused" => Ok(InboxAnswer::KeyReused),
            other => Err(EngineError::Corrupt(format!(
                "unexpected answer to an inbox read: {other:?}"
            ))),
        }
    }

    pub async fn list_signals(
        &self,
        filter: &SignalFilter,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<Signal>, Option<IndexCursor>)> {
        let mut signals = Vec::with_capacity(limit);
        let mut position = cursor;
        // [`LIST_SCAN_BUDGET`] in calls of [`INBOX_WALK`] entries: one call
        // examining them all would hold Redis for a tenth of a second.
        for _ in 0..LIST_SCAN_BUDGET.div_ceil(INBOX_WALK) {
            let (score, member) = match &position {
                Some(c) => (c.score.to_string(), c.member.clone()),
                None => (String::new(), String::new()),
            };
            let (raw, next_score, next_member): (Vec<String>, String, String) = self
                .invoke_signals(
                    &LIST,
                    filter.target.as_ref(),
                    now_ms,
                    &args![
                        optional(filter.signal_type.as_ref()),
                        optional(filter.source.as_ref()),
                        optional(filter.target.as_ref()),
                        limit - signals.len(),
                        score,
                        member,
                        INBOX_WALK,
                    ],
                )
                .await?;
            for json in &raw {
                signals.push(decode(json)?);
            }
            position = if next_member.is_empty() {
                None
            } else {
                Some(IndexCursor {
                    score: next_score.parse().map_err(|_| {
                        EngineError::Corrupt(format!("signal index score {next_score:?}"))
                    })?,
                    member: next_member,
                })
            };
            // The end of the index, or a full page: otherwise the call
            // stopped at its budget, and the next goes on from there.
            if position.is_none() || signals.len() >= limit {
                break;
            }
        }
        Ok((signals, position))
    }

    pub async fn clear_inbox(
        &self,
        agent: &Id,
        signal_type: Option<&Id>,
        now_ms: i64,
        event: EventBody,
    ) -> EngineResult<u64> {
        let mut args = args![
            agent,
            optional(signal_type),
            event.json,
            self.keys.broadcasts_seen(agent, signal_type, None),
            self.seen_horizon(now_ms),
            SEEN_LIFETIME_MS,
            INBOX_WALK,
            "", // nothing cleared yet: the first call
        ];
        // Each `more` moved the watermark past INBOX_WALK broadcasts, so
        // this ends.
        loop {
            let (outcome, cleared): (String, u64) = self
                .invoke_signals(&CLEAR, Some(agent), now_ms, &args)
                .await?;
            match outcome.as_str() {
                "more" => {
                    if let Some(last) = args.last_mut() {
                        *last = cleared.to_string();
                    }
                }
                "cleared" => return Ok(cleared),
                other => {
                    return Err(EngineError::Corrupt(format!(
                        "unexpected answer to an inbox clear: {other:?}"
                    )));
                }
            }
        }
    }
}

fn optional(id: Option<&Id>) -> String {
    id.map(Id::to_string).unwrap_or_default()
}

fn decode(json: &str) -> EngineResult<Signal> {
    serde_json::from_str(json).map_err(|e| EngineError::Corrupt(format!("signal: {e}")))
}
