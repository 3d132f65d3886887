//! Usage on Redis: one aggregate hash and one capped record set per UTC
//! day, and one `SET NX` marker per client id.
//!
//! A batch is one Lua script. The service has already added up the batch
//! per day in Rust, so the script does a few hundred `HINCRBY`s, not one
//! per record and field. It first checks that no day total would pass
//! [`TOTAL_LIMIT`], then claims every client id with `SET NX PX`; if any id
//! was claimed before, it releases the claims it just made and reports the
//! repeats without writing anything (the service drops them and retries).
//! Claiming and counting in one script is what makes "a repeat is counted
//! once" hold across concurrent batches and replicas.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::NaiveDate;
use redis::Script;

use crate::engine::redis::{RedisEngine, args, script};
use crate::engine::{EngineError, EngineResult};
use crate::usage::{
    NAMES_PER_DAY, OTHER, RECENT_PER_DAY, RecentCursor, TOTAL_LIMIT, UsageOutcome, UsageWrite,
};

/// KEYS: 2..1+n claim markers, then per day its hash and its record set,
/// and last the `user_id` HMAC secret.
/// ARGV: 2 n, 3 number of days, 4 claim ttl ms, 5 records kept per day,
/// 6 event, 7 event agent or '', 8 total limit, 9 names a day breaks each
/// group down by, 10 the entry of the names past them; then per day:
/// expire-at ms, field count f, record count r, f `(field, increment)`
/// pairs and r `(score, record)` pairs; and last the secret the batch's
/// `user_id`s were hashed with.
///
/// The secret is checked first: missing (Redis lost its data), it is put
/// back, so that replicas started later load it; another one (a replica
/// started meanwhile made a new one), nothing is written and the reply says
/// so: the service takes the stored secret and hashes the batch again.
///
/// A breakdown (`<group>:<name>:<metric>`) of a name the day does not have
/// yet counts under that name while the day's `names:<group>` count has
/// room, and under the other entry after that (see [`NAMES_PER_DAY`]).
///
/// Returns `{0}` when applied, `{1, i…}` with the 0-based indexes of
/// repeated claims, `{2, j}` when day `j` (1-based) would overflow, or
/// `{3}` when the stored secret is another.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local stored = redis.call('GET', KEYS[#KEYS])
if not stored then
  redis.call('SET', KEYS[#KEYS], ARGV[#ARGV])
elseif stored ~= ARGV[#ARGV] then
  return {3}
end
local n, d = tonumber(ARGV[2]), tonumber(ARGV[3])
local names_per_day, other = tonumber(ARGV[9]), ARGV[10]
local days, p = {}, 11
for j = 1, d do
  local nf, nr = tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  days[j] = { hash = KEYS[n + 2 * j], recent = KEYS[n + 2 * j + 1],
              expire = ARGV[p], nf = nf, nr = nr, at = p + 3, placed = {} }
  p = p + 3 + 2 * nf + 2 * nr
end
-- Where an increment of `field` counts (see above); a total where it is named.
local function place(day, field)
  local group, name, metric = string.match(field, '^([^:]+):([^:]+):(.+)$')
  if not group then return field end
  local key = group .. ':' .. name
  local target = day.placed[key]
  if not target then
    target = name
    if redis.call('HEXISTS', day.hash, key .. ':calls') == 0 then
      local names = 'names:' .. group
      if tonumber(redis.call('HGET', day.hash, names) or '0') < names_per_day then
        redis.call('HINCRBY', day.hash, names, 1)
      else
        target = other
      end
    end
    day.placed[key] = target
  end
  return group .. ':' .. target .. ':' .. metric
end
-- An integer written in decimal, as the digits above its last nine and
-- those nine (signed alike): Lua's numbers are doubles, which hold every
-- integer only up to 2^53, and totals may come near the limit (~9e18).
local function parts(s)
  local sign = 1
  if string.sub(s, 1, 1) == '-' then sign, s = -1, string.sub(s, 2) end
  return sign * (tonumber(string.sub(s, 1, -10)) or 0), sign * tonumber(string.sub(s, -9))
end
-- Whether the integers a + b > c, exactly: in parts, the high sum is
-- below 3e10 and the low one below 3e9, so both are exact.
local function sum_above(a, b, c)
  local ah, al = parts(a)
  local bh, bl = parts(b)
  local ch, cl = parts(c)
  local high, low = ah + bh - ch, al + bl - cl
  if high >= 3 then return true elseif high <= -3 then return false end
  return high * 1e9 + low > 0
end
for j, day in ipairs(days) do
  for k = 0, day.nf - 1 do
    local name = ARGV[day.at + 2 * k]
    if not string.find(name, ':', 1, true) then
      local cur = redis.call('HGET', day.hash, name) or '0'
      if sum_above(cur, ARGV[day.at + 2 * k + 1], ARGV[8]) then return {2, j} end
    end
  end
end
local claimed, dups = {}, {}
for i = 1, n do
  if redis.call('SET', KEYS[1 + i], '1', 'NX', 'PX', ARGV[4]) then
    claimed[#claimed + 1] = KEYS[1 + i]
  else
    dups[#dups + 1] = i - 1
  end
end
if #dups > 0 then
  for _, key in ipairs(claimed) do redis.call('DEL', key) end
  local out = {1}
  for _, i in ipairs(dups) do out[#out + 1] = i end
  return out
end
for _, day in ipairs(days) do
  for k = 0, day.nf - 1 do
    redis.call('HINCRBY', day.hash, place(day, ARGV[day.at + 2 * k]), ARGV[day.at + 2 * k + 1])
  end
  redis.call('PEXPIREAT', day.hash, day.expire)
  if day.nr > 0 then
    local base, members = day.at + 2 * day.nf, {}
    for k = 0, 2 * day.nr - 1 do members[k + 1] = ARGV[base + k] end
    redis.call('ZADD', day.recent, unpack(members))
    redis.call('ZREMRANGEBYRANK', day.recent, 0, -(tonumber(ARGV[5]) + 1))
    redis.call('PEXPIREAT', day.recent, day.expire)
  end
end
emit('usage.recorded', ARGV[7], '', ARGV[6])
return {0}
"#,
    )
});

/// The records of one day's recent set after a cursor, newest first: after
/// the cursor's record if the set still holds it, else those older than it.
/// KEYS: 2 the day's set. ARGV: 2 the record's time (ms), 3 how its JSON
/// begins (see [`RecentCursor::record_prefix`]), 4 how many.
static RECENT_AFTER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local count = tonumber(ARGV[4])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], ARGV[2])) do
  if string.sub(m, 1, #ARGV[3]) == ARGV[3] then
    local rank = redis.call('ZREVRANK', KEYS[2], m)
    return redis.call('ZREVRANGE', KEYS[2], rank + 1, rank + count)
  end
end
return redis.call('ZREVRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '-inf', 'LIMIT', 0, count)
"#,
    )
});

/// Days read per round trip by `recent`.
const RECENT_DAYS_PER_ROUND: usize = 7;

impl RedisEngine {
    pub async fn usage_secret(&self) -> EngineResult<Vec<u8>> {
        let mut conn = self.conn();
        let secret: Option<String> = self
            .run(
                redis::cmd("GET")
                    .arg(self.keys.user_hmac_secret())
                    .query_async(&mut conn),
            )
            .await?;
        secret.map(String::into_bytes).ok_or_else(|| {
            EngineError::Corrupt(
                "the user-id HMAC secret is missing; run `attune-telemetry migrate`".into(),
            )
        })
    }

    pub async fn apply_usage(&self, write: &UsageWrite) -> EngineResult<UsageOutcome> {
        let mut keys: Vec<String> = write
            .claims
            .iter()
            .map(|id| self.keys.usage_seen(id))
            .collect();
        let mut argv: Vec<String> = args![
            write.claims.len(),
            write.days.len(),
            write.claim_ttl_ms,
            RECENT_PER_DAY,
            write.event.json,
            write.event.agent_id.as_deref().unwrap_or(""),
            TOTAL_LIMIT,
            NAMES_PER_DAY,
            OTHER,
        ]
        .into_iter()
        .collect();
        for day in &write.days {
            keys.push(self.keys.usage_day(day.day));
            keys.push(self.keys.usage_recent(day.day));
            argv.extend(args![day.expire_at_ms, day.fields.len(), day.recent.len()]);
            for (name, inc) in &day.fields {
                argv.push(name.clone());
                argv.push(inc.to_string());
            }
            for (score, member) in &day.recent {
                argv.push(score.to_string());
                argv.push(member.clone());
            }
        }
        keys.push(self.keys.user_hmac_secret());
        argv.push(String::from_utf8_lossy(&write.user_secret).into_owned());
        let reply: Vec<i64> = self.invoke(&APPLY, &keys, &argv).await?;
        match reply.split_first() {
            Some((&0, _)) => Ok(UsageOutcome::Applied),
            Some((&1, repeats)) => Ok(UsageOutcome::Duplicates(
                repeats.iter().map(|i| *i as usize).collect(),
            )),
            Some((&2, [day])) => write
                .days
                .get((*day as usize).wrapping_sub(1))
                .map(|d| UsageOutcome::Overflow(d.day))
                .ok_or_else(|| EngineError::Corrupt("usage script named no day".into())),
            Some((&3, [])) => Ok(UsageOutcome::OtherSecret),
            _ => Err(EngineError::Corrupt(format!(
                "unexpected usage script reply {reply:?}"
            ))),
        }
    }

    pub async fn usage_days(&self, days: &[NaiveDate]) -> EngineResult<Vec<HashMap<String, i64>>> {
        if days.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for day in days {
            pipe.cmd("HGETALL").arg(self.keys.usage_day(*day));
        }
        let mut conn = self.conn();
        self.run(pipe.query_async(&mut conn)).await
    }

    pub async fn usage_recent(
        &self,
        days: &[NaiveDate],
        after: Option<&RecentCursor>,
        limit: usize,
    ) -> EngineResult<Vec<String>> {
        let mut out = Vec::with_capacity(limit);
        let mut days = days;
        if let Some(cursor) = after {
            let Some(day) = cursor.day() else {
                return Ok(out);
            };
            // Days after the cursor's are done; its own continues after it.
            let from = days.iter().position(|d| *d <= day).unwrap_or(days.len());
            days = &days[from..];
            if days.first() == Some(&day) {
                let page: Vec<String> = self
                    .invoke(
                        &RECENT_AFTER,
                        &[self.keys.usage_recent(day)],
                        &args![cursor.ts_ms, cursor.record_prefix(), limit],
                    )
                    .await?;
                out.extend(page);
                days = &days[1..];
            }
        }
        let mut conn = self.conn();
        for chunk in days.chunks(RECENT_DAYS_PER_ROUND) {
            if out.len() >= limit {
                break;
            }
            let want = limit - out.len();
            let mut pipe = redis::pipe();
            for day in chunk {
                pipe.cmd("ZREVRANGE")
                    .arg(self.keys.usage_recent(*day))
                    .arg(0)
                    .arg(want as i64 - 1);
            }
            let replies: Vec<Vec<String>> = self.run(pipe.query_async(&mut conn)).await?;
            out.extend(replies.into_iter().flatten().take(want));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}
