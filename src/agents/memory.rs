//! Agents on the memory engine: records plus ordered indexes, like Redis.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::agents::{
    AgentIndex, AgentQuery, AgentRecord, AgentState, Beat, IndexCursor, IndexRange, LISTING_ROUNDS,
    RunRecord,
};
use crate::engine::EngineResult;
use crate::engine::memory::{MemoryEngine, MemoryState};
use crate::events::EventBody;
use crate::types::Id;

/// A stored agent and the bookkeeping the Redis engine keeps in its hash.
#[derive(Debug, Clone)]
struct Entry {
    record: AgentRecord,
    /// The open run, if any.
    run_key: Option<String>,
    expires_ms: i64,
}

/// An index: `(score, id)` in order, as in a Redis sorted set.
type Index = BTreeSet<(i64, Id)>;

/// Agents, their indexes and their runs. The indexes are those of the
/// Redis engine, kept in the same steps, so that listings read one range of
/// one index (two, merged, for all agents) and never every agent.
#[derive(Debug, Default)]
pub struct AgentTable {
    agents: HashMap<Id, Entry>,
    /// `(last beat, id)` of agents in a non-terminal status.
    active: Index,
    /// `(last beat, id)` of agents in a terminal status.
    finished: Index,
    /// `(end of ttl, id)` of non-terminal agents not marked down.
    late_due: Index,
    /// `(down deadline, id)` of non-terminal agents not marked down.
    down_due: Index,
    /// `(last beat, id)` of agents marked down by the sweeper.
    down: Index,
    runs: HashMap<String, RunRecord>,
    runs_by_start: BTreeSet<(i64, String)>,
}

impl AgentTable {
    fn live(&self, id: &Id, now_ms: i64) -> Option<&Entry> {
        self.agents.get(id).filter(|e| e.expires_ms > now_ms)
    }

    /// Removes the stored record of `id` from the indexes it is in (those
    /// [`Self::index`] put it in).
    fn unindex(&mut self, id: &Id) {
        let Some(old) = self.agents.get(id) else {
            return;
        };
        let r = &old.record;
        let by_beat = (r.last_beat_ms, id.clone());
        if r.status.is_terminal() {
            self.finished.remove(&by_beat);
            return;
        }
        if r.down {
            self.down.remove(&by_beat);
        } else {
            self.late_due.remove(&(alive_deadline(r), id.clone()));
            self.down_due.remove(&(down_deadline(r), id.clone()));
        }
        self.active.remove(&by_beat);
    }

    /// Adds `r` to the indexes its state puts it in.
    fn index(&mut self, r: &AgentRecord) {
        let by_beat = (r.last_beat_ms, r.agent_id.clone());
        if r.status.is_terminal() {
            self.finished.insert(by_beat);
            return;
        }
        if r.down {
            self.down.insert(by_beat.clone());
        } else {
            self.late_due
                .insert((alive_deadline(r), r.agent_id.clone()));
            self.down_due.insert((down_deadline(r), r.agent_id.clone()));
        }
        self.active.insert(by_beat);
    }
}

fn alive_deadline(r: &AgentRecord) -> i64 {
    r.last_beat_ms + (r.ttl_seconds * 1000) as i64
}

fn down_deadline(r: &AgentRecord) -> i64 {
    alive_deadline(r) + (r.grace_seconds * 1000) as i64
}

/// The first possible entry with `score`: every id starts with a letter or
/// digit, and none sorts before "0".
fn first_at(score: i64) -> (i64, Id) {
    (score, Id::new("0").expect("a valid id"))
}

/// The entries of `index` scored within `[min, max]` that come after
/// `after` in the given direction, in that direction.
fn index_range<'a>(
    index: &'a Index,
    ascending: bool,
    min: i64,
    max: i64,
    after: Option<&(i64, Id)>,
) -> Box<dyn Iterator<Item = &'a (i64, Id)> + 'a> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    if ascending {
        let from = match after {
            Some(a) if a.0 >= min => Excluded(a.clone()),
            _ => Included(first_at(min)),
        };
        Box::new(
            index
                .range((from, Unbounded))
                .take_while(move |(score, _)| *score <= max),
        )
    } else {
        let to = match after {
            Some(a) if a.0 <= max => Excluded(a.clone()),
            _ if max == i64::MAX => Unbounded,
            _ => Excluded(first_at(max + 1)),
        };
        Box::new(
            index
                .range((Unbounded, to))
                .rev()
                .take_while(move |(score, _)| *score >= min),
        )
    }
}

fn emit(state: &mut MemoryState, event: EventBody) {
    state.events.append(event);
}

impl MemoryEngine {
    pub async fn record_beat(&self, mut beat: Beat) -> EngineResult<AgentRecord> {
        // What the beat carries is moved, not copied, while the lock is held.
        let heartbeat = beat.heartbeat_event.take();
        Ok(self.write(|s| {
            let now_ms = beat.now.timestamp_millis();
            s.agents.unindex(&beat.agent_id);
            // Taken out (not copied) and put back below.
            let previous =
                (s.agents.agents.remove(&beat.agent_id)).filter(|e| e.expires_ms > now_ms);
            let (mut record, mut run_key, was_down) = match previous {
                Some(e) => {
                    let down = e.record.down;
                    (e.record, e.run_key, down)
                }
                None => (
                    AgentRecord {
                        agent_id: beat.agent_id.clone(),
                        display_name: None,
                        status: beat.status,
                        progress: None,
                        current_task: None,
                        metadata: Default::default(),
                        run_id: None,
                        last_beat_ms: now_ms,
                        ttl_seconds: beat.ttl_seconds,
                        grace_seconds: beat.grace_seconds,
                        down: false,
                    },
                    None,
                    false,
                ),
            };
            let previous_run_id = record.run_id.clone();
            record.status = beat.status;
            record.progress = beat.progress;
            record.current_task = beat.current_task.take();
            if let Some(m) = beat.metadata.take() {
                record.metadata = m.into_inner();
            }
            if let Some(d) = beat.display_name.take() {
                record.display_name = Some(d);
            }
            let new_run_id = beat.run_id.as_ref().map(|r| r.to_string());
            if new_run_id.is_some() {
                record.run_id = new_run_id.clone();
            }
            record.last_beat_ms = now_ms;
            record.ttl_seconds = beat.ttl_seconds;
            record.grace_seconds = beat.grace_seconds;
            record.down = false;

            let terminal = beat.status.is_terminal();
            let names_other_run = new_run_id.is_some() && new_run_id != previous_run_id;
            // `starting` opens a run, unless it names the open one again:
            // a retried start is the same run.
            let restarts = beat.status == crate::agents::AgentStatus::Starting
                && (run_key.is_none() || new_run_id.is_none() || names_other_run);
            let opens = (run_key.is_none() && !terminal) || restarts || names_other_run;
            let agents = &mut s.agents;
            let mut events = Vec::new();
            if opens {
                // A run opened without a `run_id` has none: the one stored
                // named an earlier run.
                if new_run_id.is_none() {
                    record.run_id = None;
                }
                if let Some(old) = run_key.take().and_then(|k| agents.runs.get_mut(&k)) {
                    // Superseded by a new run before it closed.
                    old.lost = old.outcome.is_none();
                }
                // Keyed by agent and start; a second run started in the
                // same millisecond gets a suffix instead of replacing the first.
                let base = format!("{}/{now_ms}", beat.agent_id);
                let (mut key, mut n) = (base.clone(), 1);
                while agents.runs.contains_key(&key) {
                    n += 1;
                    key = format!("{base}/{n}");
                }
                agents.runs.insert(
                    key.clone(),
                    RunRecord {
                        agent_id: beat.agent_id.to_string(),
                        run_id: record.run_id.clone(),
                        started_ms: now_ms,
                        ended_ms: None,
                        outcome: None,
                        lost: false,
                    },
                );
                agents.runs_by_start.insert((now_ms, key.clone()));
                run_key = Some(key);
                events.push(beat.lifecycle_event("agent.started", record.run_id.as_deref()));
            }
            if was_down {
                if let Some(run) = run_key.as_ref().and_then(|k| agents.runs.get_mut(k)) {
                    run.lost = false;
                }
                events.push(beat.lifecycle_event("agent.recovered", None));
            }
            if terminal {
                if let Some(run) = run_key.take().and_then(|k| agents.runs.get_mut(&k)) {
                    run.ended_ms = Some(now_ms);
                    run.outcome = Some(beat.status.as_str().to_owned());
                    run.lost = false;
                    events.push(beat.lifecycle_event("agent.finished", record.run_id.as_deref()));
                }
            }
            events.extend(heartbeat);
            agents.index(&record);
            agents.agents.insert(
                beat.agent_id.clone(),
                Entry {
                    record: record.clone(),
                    run_key,
                    expires_ms: now_ms + beat.retention.as_millis() as i64,
                },
            );
            for e in events {
                emit(s, e);
            }
            record
        }))
    }

    pub async fn get_agent(&self, id: &Id) -> EngineResult<Option<AgentRecord>> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        Ok(self
            .lock()
            .agents
            .live(id, now_ms)
            .map(|e| e.record.clone()))
    }

    pub async fn delete_agent(&self, id: &Id, event: EventBody) -> EngineResult<bool> {
        Ok(self.write(|s| {
            let existed = s.agents.agents.contains_key(id);
            s.agents.unindex(id);
            let open_run = s.agents.agents.remove(id).and_then(|e| e.run_key);
            // Nothing will close its open run now: it ends as lost.
            if let Some(run) = open_run.and_then(|k| s.agents.runs.get_mut(&k))
                && run.outcome.is_none()
            {
                run.lost = true;
            }
            if existed {
                emit(s, event);
            }
            existed
        }))
    }

    pub async fn list_agents(
        &self,
        query: AgentQuery,
        now_ms: i64,
        cursor: Option<IndexCursor>,
        limit: usize,
    ) -> EngineResult<(Vec<AgentRecord>, Option<IndexCursor>)> {
        let state = self.lock();
        let t = &state.agents;
        let IndexRange {
            indexes,
            ascending,
            min,
            max,
        } = query.selection.index_range(now_ms);
        let after = cursor.and_then(|c| Id::new(c.member).ok().map(|id| (c.score, id)));
        let mut ranges = indexes
            .iter()
            .map(|index| {
                let index = match index {
                    AgentIndex::Active => &t.active,
                    AgentIndex::Finished => &t.finished,
                    AgentIndex::LateDue => &t.late_due,
                    AgentIndex::Down => &t.down,
                };
                index_range(index, ascending, min, max, after.as_ref()).peekable()
            })
            .collect::<Vec<_>>();
        // In index order across the ranges: by score, then id (both
        // reversed when descending).
        let mut entries = std::iter::from_fn(|| {
            let next = ranges
                .iter_mut()
                .enumerate()
                .filter_map(|(i, r)| r.peek().map(|e| (i, *e)))
                .reduce(|a, b| {
                    let b_first = if ascending { b.1 < a.1 } else { b.1 > a.1 };
                    if b_first { b } else { a }
                })?;
            ranges[next.0].next()
        })
        .peekable();
        // Entries whose records expired, or that another filter leaves out,
        // are skipped; a page examines at most what the Redis engine's
        // rounds read, and the cursor marks the last entry examined.
        let mut out = Vec::with_capacity(limit);
        let mut position = None;
        for (examined, (score, id)) in entries.by_ref().enumerate() {
            position = Some(IndexCursor {
                score: *score,
                member: id.to_string(),
            });
            if let Some(e) = t
                .live(id, now_ms)
                .filter(|e| query.admits(&e.record, now_ms))
            {
                out.push(e.record.clone());
            }
            if out.len() == limit || examined + 1 >= LISTING_ROUNDS * (limit + 1) {
                break;
            }
        }
        let next = entries.peek().and(position);
        Ok((out, next))
    }

    pub async fn sweep_down_agents(&self, now_ms: i64, limit: usize) -> EngineResult<usize> {
        Ok(self.write(|s| {
            let due: Vec<(i64, Id)> = s
                .agents
                .down_due
                .iter()
                .take_while(|(deadline, _)| *deadline < now_ms)
                .take(limit)
                .cloned()
                .collect();
            let ts = crate::types::from_millis(now_ms);
            for item in &due {
                s.agents.down_due.remove(item);
                let id = &item.1;
                let Some(mut record) = s.agents.agents.get(id).map(|e| e.record.clone()) else {
                    continue;
                };
                s.agents.unindex(id);
                record.down = true;
                s.agents.index(&record);
                let Some(entry) = s.agents.agents.get_mut(id) else {
                    continue;
                };
                entry.record.down = true;
                let ttl = entry.record.ttl_seconds;
                if let Some(run) = entry
                    .run_key
                    .as_ref()
                    .and_then(|k| s.agents.runs.get_mut(k))
                {
                    run.lost = true;
                }
                let event = crate::agents::down_event(id, ttl, ts);
                emit(s, event);
            }
            due.len()
        }))
    }

    pub async fn prune_agents(&self, now_ms: i64, retention: Duration) -> EngineResult<()> {
        self.write(|s| {
            // Every agent is active or finished, both indexes by last beat.
            let cutoff = now_ms - retention.as_millis() as i64;
            let t = &s.agents;
            let expired: Vec<Id> = [&t.active, &t.finished]
                .into_iter()
                .flat_map(|index| index.iter().take_while(|(beat, _)| *beat <= cutoff))
                .filter(|(_, id)| t.agents.get(id).is_some_and(|e| e.expires_ms <= now_ms))
                .map(|(_, id)| id.clone())
                .collect();
            for id in expired {
                s.agents.unindex(&id);
                s.agents.agents.remove(&id);
            }
            let cutoff = now_ms - crate::agents::RUN_RETENTION.as_millis() as i64;
            let old: Vec<(i64, String)> = s
                .agents
                .runs_by_start
                .iter()
                .take_while(|(start, _)| *start < cutoff)
                .cloned()
                .collect();
            for item in old {
                s.agents.runs.remove(&item.1);
                s.agents.runs_by_start.remove(&item);
            }
        });
        Ok(())
    }

    pub async fn runs_since(&self, since_ms: i64) -> EngineResult<Vec<RunRecord>> {
        let state = self.lock();
        Ok(state
            .agents
            .runs_by_start
            .range((since_ms, String::new())..)
            .filter_map(|(_, key)| state.agents.runs.get(key).cloned())
            .collect())
    }

    /// Counts from the indexes, as the Redis engine does: only the agents
    /// past the end of their ttl (late, or down but not yet marked) are
    /// looked at one by one.
    pub async fn agent_state_counts(&self, now_ms: i64) -> EngineResult<[(AgentState, u64); 4]> {
        let state = self.lock();
        let t = &state.agents;
        let (mut late, mut overdue) = (0, 0);
        for (_, id) in t.late_due.range(..first_at(now_ms)) {
            match t.agents.get(id).map(|e| e.record.state_at(now_ms)) {
                Some(AgentState::Down) => overdue += 1,
                _ => late += 1,
            }
        }
        let len = |index: &Index| index.len() as u64;
        Ok([
            (AgentState::Up, len(&t.late_due) - late - overdue),
            (AgentState::Late, late),
            (AgentState::Down, len(&t.down) + overdue),
            (AgentState::Finished, len(&t.finished)),
        ])
    }
}
