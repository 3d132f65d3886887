//! Agents on the memory engine: records plus ordered indexes, like Redis.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::agents::{
    AgentQuery, AgentRecord, AgentSelection, AgentState, Beat, IndexCursor, RunRecord,
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

/// Agents, their indexes and their runs.
#[derive(Debug, Default)]
pub struct AgentTable {
    agents: HashMap<Id, Entry>,
    /// `(last beat, id)` of every agent.
    by_beat: BTreeSet<(i64, Id)>,
    /// `(down deadline, id)` of non-terminal agents not yet down.
    down_due: BTreeSet<(i64, Id)>,
    runs: HashMap<String, RunRecord>,
    runs_by_start: BTreeSet<(i64, String)>,
}

impl AgentTable {
    fn live(&self, id: &Id, now_ms: i64) -> Option<&Entry> {
        self.agents.get(id).filter(|e| e.expires_ms > now_ms)
    }

    fn unindex(&mut self, id: &Id) {
        if let Some(old) = self.agents.get(id) {
            let r = &old.record;
            self.by_beat.remove(&(r.last_beat_ms, id.clone()));
            self.down_due.remove(&(down_deadline(r), id.clone()));
        }
    }
}

fn down_deadline(r: &AgentRecord) -> i64 {
    r.last_beat_ms + ((r.ttl_seconds + r.grace_seconds) * 1000) as i64
}

fn emit(state: &mut MemoryState, event: EventBody) {
    state.events.append(event);
}

impl MemoryEngine {
    pub async fn record_beat(&self, beat: Beat) -> EngineResult<AgentRecord> {
        Ok(self.write(|s| {
            let now_ms = beat.now.timestamp_millis();
            let previous = s.agents.live(&beat.agent_id, now_ms).cloned();
            s.agents.unindex(&beat.agent_id);
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
            record.current_task = beat.current_task.clone();
            if let Some(m) = &beat.metadata {
                record.metadata = m.as_map().clone();
            }
            if let Some(d) = &beat.display_name {
                record.display_name = Some(d.clone());
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
            let opens = (run_key.is_none() && !terminal)
                || beat.status == crate::agents::AgentStatus::Starting
                || (new_run_id.is_some() && new_run_id != previous_run_id);
            let agents = &mut s.agents;
            let mut events = Vec::new();
            if opens {
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
            if let Some(hb) = &beat.heartbeat_event {
                events.push(hb.clone());
            }
            agents.by_beat.insert((now_ms, beat.agent_id.clone()));
            if !terminal {
                agents
                    .down_due
                    .insert((down_deadline(&record), beat.agent_id.clone()));
            }
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
            s.agents.agents.remove(id);
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
        let table = &state.agents;
        let records: Vec<&AgentRecord> = table
            .by_beat
            .iter()
            .filter_map(|(_, id)| table.live(id, now_ms).map(|e| &e.record))
            .filter(|r| query.admits(r, now_ms))
            .collect();
        // Same orders as the Redis indexes: newest first for `All`, by
        // deadline for up/late, oldest beat first otherwise.
        let mut keyed: Vec<(i64, &AgentRecord)> = records
            .into_iter()
            .map(|r| match query.selection {
                AgentSelection::All => (-r.last_beat_ms, r),
                AgentSelection::State(AgentState::Up | AgentState::Late) => {
                    (r.last_beat_ms + (r.ttl_seconds * 1000) as i64, r)
                }
                _ => (r.last_beat_ms, r),
            })
            .collect();
        keyed.sort_by(|a, b| (a.0, a.1.agent_id.as_str()).cmp(&(b.0, b.1.agent_id.as_str())));
        let start = match &cursor {
            Some(c) => keyed.partition_point(|(score, r)| {
                (*score, r.agent_id.as_str()) <= (c.score, c.member.as_str())
            }),
            None => 0,
        };
        let page: Vec<(i64, &AgentRecord)> = keyed[start..].iter().take(limit).copied().collect();
        let next = (start + page.len() < keyed.len())
            .then(|| page.last())
            .flatten()
            .map(|(score, r)| IndexCursor {
                score: *score,
                member: r.agent_id.to_string(),
            });
        Ok((page.into_iter().map(|(_, r)| r.clone()).collect(), next))
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

    pub async fn prune_agents(&self, now_ms: i64, _retention: Duration) -> EngineResult<()> {
        self.write(|s| {
            let expired: Vec<Id> = s
                .agents
                .agents
                .iter()
                .filter(|(_, e)| e.expires_ms <= now_ms)
                .map(|(id, _)| id.clone())
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

    pub async fn agent_state_counts(&self, now_ms: i64) -> EngineResult<[(AgentState, u64); 4]> {
        let state = self.lock();
        let mut counts = [
            (AgentState::Up, 0),
            (AgentState::Late, 0),
            (AgentState::Down, 0),
            (AgentState::Finished, 0),
        ];
        for entry in state
            .agents
            .agents
            .values()
            .filter(|e| e.expires_ms > now_ms)
        {
            let s = entry.record.state_at(now_ms);
            if let Some(c) = counts.iter_mut().find(|(k, _)| *k == s) {
                c.1 += 1;
            }
        }
        Ok(counts)
    }
}
