//! Usage on the memory engine: the same per-day aggregates and capped
//! record sets as Redis, with expiry checked on read and purged on write.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::NaiveDate;

use crate::engine::EngineResult;
use crate::engine::memory::MemoryEngine;
use crate::usage::{
    NAMES_PER_DAY, OTHER, RECENT_PER_DAY, RecentCursor, TOTAL_LIMIT, UsageOutcome, UsageWrite,
    names_field,
};

/// One UTC day: what the Redis day hash and record set hold.
#[derive(Debug, Default)]
struct Day {
    fields: HashMap<String, i64>,
    /// `(ts ms, record JSON)`, ordered like a Redis sorted set.
    recent: BTreeSet<(i64, String)>,
    expire_at_ms: i64,
}

impl Day {
    /// Where a breakdown increment `field` (`<group>:<name>:<metric>`) is
    /// counted: under its name, or [`OTHER`] once the day breaks `group`
    /// down by [`NAMES_PER_DAY`] names (a total goes where it is named).
    /// `placed` keeps, per `<group>:<name>`, what an earlier field of the
    /// same batch decided. The Redis script does the same.
    fn place(&mut self, field: &str, placed: &mut HashMap<String, String>) -> String {
        let mut parts = field.splitn(3, ':');
        let (Some(group), Some(name), Some(metric)) = (parts.next(), parts.next(), parts.next())
        else {
            return field.to_owned();
        };
        let key = format!("{group}:{name}");
        let target = placed.entry(key.clone()).or_insert_with(|| {
            if self.fields.contains_key(&format!("{key}:calls")) {
                return name.to_owned();
            }
            let names = self.fields.entry(names_field(group)).or_default();
            if *names < NAMES_PER_DAY as i64 {
                *names += 1;
                name.to_owned()
            } else {
                OTHER.to_owned()
            }
        });
        format!("{group}:{target}:{metric}")
    }
}

/// Usage aggregates, recent records and claimed ids.
#[derive(Debug, Default)]
pub struct UsageTable {
    /// The `user_id` HMAC key: random, made on first use, lost on exit.
    secret: Option<Vec<u8>>,
    days: BTreeMap<NaiveDate, Day>,
    /// Claimed client ids (as `UsageWrite::claims` names them) and when
    /// each claim expires (ms).
    claimed: HashMap<String, i64>,
    /// `(expiry ms, claim)` of claims, to purge them in order.
    claim_expiry: BTreeSet<(i64, String)>,
}

impl UsageTable {
    fn purge(&mut self, now_ms: i64) {
        self.days.retain(|_, day| day.expire_at_ms > now_ms);
        while let Some((expires, id)) = self.claim_expiry.first().cloned() {
            if expires > now_ms {
                break;
            }
            self.claim_expiry.pop_first();
            if self.claimed.get(&id) == Some(&expires) {
                self.claimed.remove(&id);
            }
        }
    }

    fn live_day(&self, day: &NaiveDate, now_ms: i64) -> Option<&Day> {
        self.days.get(day).filter(|d| d.expire_at_ms > now_ms)
    }
}

impl MemoryEngine {
    pub async fn usage_secret(&self) -> EngineResult<Vec<u8>> {
        Ok(self.write(|s| {
            s.usage
                .secret
                .get_or_insert_with(|| rand::random::<[u8; 32]>().to_vec())
                .clone()
        }))
    }

    pub async fn apply_usage(&self, write: &UsageWrite) -> EngineResult<UsageOutcome> {
        Ok(self.write(|s| {
            let now = write.now_ms;
            let table = &mut s.usage;
            table.purge(now);
            // Check everything first: the batch is applied whole or not at all.
            for d in &write.days {
                let current = table.live_day(&d.day, now);
                for (name, inc) in d.fields.iter().filter(|(name, _)| !name.contains(':')) {
                    let cur = current
                        .and_then(|day| day.fields.get(name))
                        .copied()
                        .unwrap_or(0);
                    if cur
                        .checked_add(*inc)
                        .is_none_or(|total| total > TOTAL_LIMIT)
                    {
                        return UsageOutcome::Overflow(d.day);
                    }
                }
            }
            let duplicates: Vec<usize> = write
                .claims
                .iter()
                .enumerate()
                .filter(|(_, id)| table.claimed.contains_key(*id))
                .map(|(i, _)| i)
                .collect();
            if !duplicates.is_empty() {
                return UsageOutcome::Duplicates(duplicates);
            }
            let expires = now + write.claim_ttl_ms;
            for id in &write.claims {
                table.claimed.insert(id.clone(), expires);
                table.claim_expiry.insert((expires, id.clone()));
            }
            for d in &write.days {
                let day = table.days.entry(d.day).or_default();
                day.expire_at_ms = d.expire_at_ms;
                let mut placed = HashMap::new();
                for (name, inc) in &d.fields {
                    let name = day.place(name, &mut placed);
                    *day.fields.entry(name).or_default() += inc;
                }
                day.recent.extend(d.recent.iter().cloned());
                while day.recent.len() > RECENT_PER_DAY {
                    day.recent.pop_first();
                }
            }
            s.events.append(write.event.clone());
            UsageOutcome::Applied
        }))
    }

    pub async fn usage_days(&self, days: &[NaiveDate]) -> EngineResult<Vec<HashMap<String, i64>>> {
        let now = chrono::Utc::now().timestamp_millis();
        let state = self.lock();
        Ok(days
            .iter()
            .map(|d| {
                state
                    .usage
                    .live_day(d, now)
                    .map(|day| day.fields.clone())
                    .unwrap_or_default()
            })
            .collect())
    }

    pub async fn usage_recent(
        &self,
        days: &[NaiveDate],
        after: Option<&RecentCursor>,
        limit: usize,
    ) -> EngineResult<Vec<String>> {
        let now = chrono::Utc::now().timestamp_millis();
        let state = self.lock();
        let after_day = after.and_then(RecentCursor::day);
        let mut out = Vec::with_capacity(limit);
        for (date, day) in days
            .iter()
            .filter(|d| after_day.is_none_or(|a| **d <= a))
            .filter_map(|d| state.usage.live_day(d, now).map(|day| (d, day)))
        {
            // Newest first, as Redis lists a sorted set in reverse: by time,
            // then by the record's JSON.
            let records = match after {
                Some(cursor) if Some(*date) == after_day => {
                    let prefix = cursor.record_prefix();
                    let at = day
                        .recent
                        .range(
                            (cursor.ts_ms, String::new())
                                ..(cursor.ts_ms.saturating_add(1), String::new()),
                        )
                        .find(|(_, json)| json.starts_with(&prefix))
                        .cloned()
                        .unwrap_or((cursor.ts_ms, String::new()));
                    day.recent.range(..at)
                }
                _ => day.recent.range::<(i64, String), _>(..),
            };
            out.extend(
                records
                    .rev()
                    .take(limit - out.len())
                    .map(|(_, json)| json.clone()),
            );
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}
